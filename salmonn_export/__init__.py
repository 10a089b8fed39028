"""salmonn-export: compile a trained SALMONN into fast, verified engine bundles."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes whenever it is installed (the test extra has it); on CPUs with AVX512-BF16
# its CPU backend then warns, at import, that an optional hub kernel package ("kernels") is missing.
# No bitsandbytes kernel ever runs here (NF4 bases are dequantized in torch), so that one logger is quieted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
