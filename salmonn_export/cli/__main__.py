"""`python -m salmonn_export.cli`: the same app as the console script."""

from salmonn_export.cli import app

app()
