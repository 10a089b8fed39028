"""Run the salmonn-export CLI from a checkout: `python cli.py --help` (same app as the console script)."""

from salmonn_export.cli import app

if __name__ == "__main__":
    app()
