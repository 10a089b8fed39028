"""salmonn-export: compile a trained SALMONN into fast, verified engine bundles."""

__version__ = "0.1.0"
