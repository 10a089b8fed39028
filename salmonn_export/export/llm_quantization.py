"""The LLM quantization stage shared by every build target (ONNX and torch): calibration sequences
from the chosen data, GPTQ or RTN over the merged LLM, and the quantized-vs-reference check.

One function so the targets cannot drift: the torch bundle's int4 codes must equal the ONNX
bundle's (tests/test_torch_engine.py compares them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from salmonn_export.dataset import DataSource
from salmonn_export.export.stages import StageLog, source_hashes
from salmonn_export.model.salmonn import SALMONN
from salmonn_export.recipes import Recipe
from salmonn_export.transforms.calibration import build_calibration, calibration_items
from salmonn_export.transforms.quant_cache import QuantCache
from salmonn_export.transforms.quantize import QuantResult, quantize_model


@dataclass
class LLMQuantization:
    """What the quantization stage produced: the codes, the data that calibrated them, and the check."""

    quant: QuantResult | None = None
    calibration: dict | None = None
    evaluation: dict | None = None
    cache: dict | None = None  # quantization cache use (build report only: the manifest stays cache-independent)


@torch.no_grad()
def log_probs(llm: torch.nn.Module, sequences: list[dict]) -> list[torch.Tensor]:
    """Next-token log-probabilities [1, S, vocab] fp32 per calibration sequence (the reference for
    `quantization_eval`, taken before quantizing so no second copy of the LLM is needed)."""
    return [torch.log_softmax(llm(**kwargs).logits.double(), -1).float() for kwargs in sequences]


@torch.no_grad()
def quantization_eval(reference: list[torch.Tensor], quantized: torch.nn.Module, sequences: list[dict]) -> dict:
    """Next-token KL and top-1 agreement of the quantized LLM vs the merged fp32 LLM's log-probs (all positions)."""
    kls, agree, n = 0.0, 0, 0
    for ref, kwargs in zip(reference, sequences):
        lr = ref.double()
        lq = torch.log_softmax(quantized(**kwargs).logits.double(), -1)
        kls += float((lr.exp() * (lr - lq)).sum(-1).sum())
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        n += lr.shape[0] * lr.shape[1]
    return {"positions": n, "mean_kl": kls / max(n, 1), "top1_agreement": agree / max(n, 1)}


def quantize_llm(salmonn: SALMONN, llm: torch.nn.Module, recipe: Recipe, calib_data: DataSource | None,
                 log: StageLog, calib_samples: int | None = None, evaluate: bool = True,
                 cache: QuantCache | None = None, model_hashes: dict[str, str] | None = None) -> LLMQuantization:
    """Quantize the merged `llm` in place as `recipe.llm.weights` says (nothing when it has none).

    Calibration sequences come from `calib_data` (GPTQ needs them; for RTN they only feed the KL
    check, so a target without `evaluate` may pass None). Each Linear becomes its codes as soon as
    it is quantized (fp32 weights freed layer by layer). Stages are timed through `log`.

    With an enabled `cache` (quant_cache.QuantCache), the calibration sequences, the reference
    log-probs and each GPTQ layer are read back when an earlier build (or an interrupted one) made
    them from the same model files (`model_hashes`, stages.source_hashes; computed when None), data
    and settings; what was read or written is in the returned `LLMQuantization.cache`.
    """
    cache = cache or QuantCache(None)
    weights = recipe.llm.weights
    if weights is None:
        return LLMQuantization()
    sequences: list[dict] = []
    calibration = None
    if calib_data is not None:
        with log.stage("calibration data"):
            settings = recipe.calibration
            if calib_samples:
                settings = replace(settings, samples=calib_samples)
            items = calibration_items(calib_data.path, calib_data.audio_root)
            record = calib_data.record()  # hashes the annotation, or every clip of an audio folder: once
            key = cache.calibration_key(model_hashes or source_hashes(salmonn.config), record,
                                        [item.audio for item in items], settings) if cache.root else ""
            sequences = cache.cached("sequences", key, lambda: build_calibration(salmonn, items, settings))
            calibration = {**record, "sequences": len(sequences),
                           "tokens": int(sum(s["inputs_embeds"].shape[1] for s in sequences)),
                           "settings": asdict(settings)}
    reference = None
    if evaluate and sequences:
        with log.stage("reference log-probs"):
            reference = cache.cached("reference_log_probs", key, lambda: log_probs(llm, sequences))
    with log.stage(f"quantize LLM ({weights.method} int{weights.bits})"):
        store = cache.layer_store(key, weights) if weights.method == "gptq" and sequences and cache.root else None
        quant = quantize_model(llm, weights, recipe.llm.skip_modules, sequences if weights.method == "gptq" else None,
                               progress=log.on_progress, release_weights=True, store=store)
    cache_info = None
    if calibration is not None and cache.root is not None:
        cache_info = {"folder": str(cache.root), "key": key, **cache.used,
                      "gptq_entries_read": store.hits if store is not None else 0}
        if store is not None and store.write_error:
            cache_info["write_error"] = store.write_error
    evaluation = None
    if reference is not None:
        with log.stage("quantization eval"):
            evaluation = quantization_eval(reference, llm, sequences)
    return LLMQuantization(quant, calibration, evaluation, cache_info)
