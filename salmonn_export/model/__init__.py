"""The PyTorch reference SALMONN."""
