"""Engine runtime: onnxruntime + numpy + tokenizer only (no torch, no model/)."""
