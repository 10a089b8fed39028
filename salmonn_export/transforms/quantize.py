"""Weight-only quantization of the merged LLM's Linear layers: RTN and GPTQ.

Both produce, per Linear [N out, K in], integer codes [N, K] and scales [N, K/group] with a
fixed symmetric zero point 2^(bits-1): W ≈ (codes − zero)·scale. That is exactly the layout of
ONNX Runtime's MatMulNBits (block = group), so export packs these codes as they are.

GPTQ (Frantar et al. 2022) with act-order uses *static groups*: group scales are fixed from the
natural column order before the columns are permuted by Hessian diagonal, so groups stay
contiguous and no g_idx is needed at inference. Layers are quantized in order (sequentially),
each calibrated on the outputs of the already-quantized layers before it, each decoder layer run
alone on its captured inputs (one pass per layer, not one pass of the whole model per layer).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from salmonn_export.recipes import WeightQuant
from salmonn_export.transforms.quant_cache import LayerStore


@dataclass
class QuantizedLinear:
    codes: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K // group]
    bits: int
    group_size: int

    @property
    def zero(self) -> int:
        return 2 ** (self.bits - 1)

    def dequantize(self) -> torch.Tensor:
        scales = self.scales.repeat_interleave(self.group_size, dim=1)
        return (self.codes.float() - self.zero) * scales

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `dequantize()` (float32), without dequantizing the rest."""
        scales = self.scales[start:stop].repeat_interleave(self.group_size, dim=1)
        return (self.codes[start:stop].float() - self.zero) * scales


@dataclass
class QuantResult:
    layers: dict[str, QuantizedLinear] = field(default_factory=dict)
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # per layer: weight / output error
    seconds: float = 0.0


def target_linears(model: nn.Module, skip: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The decoder's Linear layers to quantize (HF names), skipping `lm_head`/embeddings by default."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(s == name.split(".")[-1] or s == name for s in skip):
            out[name] = module
    return out


def effective_group(in_features: int, group_size: int) -> int:
    """The recipe's group, or for narrow layers (K not a multiple of it) the largest power of two ≥16 dividing K."""
    if in_features % group_size == 0:
        return group_size
    g = group_size
    while g > 16 and in_features % g:
        g //= 2
    if in_features % g:
        raise ValueError(f"in_features {in_features} has no power-of-two group >= 16")
    return g


def _for_layer(q: WeightQuant, in_features: int) -> WeightQuant:
    g = effective_group(in_features, q.group_size)
    return q if g == q.group_size else replace(q, group_size=g)


def group_scales(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric per-group scales as GPTQ computes them: 2·max|w| / (2^bits − 1)."""
    N, K = weight.shape
    groups = weight.reshape(N, K // group_size, group_size)
    absmax = groups.abs().amax(dim=2)
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    return 2 * absmax / (2**bits - 1)


def _quantize_column(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def rtn(weight: torch.Tensor, q: WeightQuant) -> QuantizedLinear:
    weight = weight.float()
    scales = group_scales(weight, q.bits, q.group_size)
    expanded = scales.repeat_interleave(q.group_size, dim=1)
    codes = _quantize_column(weight, expanded, q.bits)
    return QuantizedLinear(codes.to(torch.uint8), scales, q.bits, q.group_size)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, q: WeightQuant, block: int = 128) -> QuantizedLinear:
    """GPTQ on one Linear. `hessian` = 2/n Σ xxᵀ over calibration inputs [K, K]."""
    W = weight.float().clone()
    H = hessian.double().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = group_scales(W, q.bits, q.group_size)
    perm = torch.argsort(torch.diag(H), descending=True) if q.act_order else torch.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]
    damp = q.damp * torch.mean(torch.diag(H))
    H[range(K), range(K)] += damp
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    codes = torch.zeros(N, K)
    zero = 2 ** (q.bits - 1)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            scale = scales[:, col // q.group_size]
            w = W1[:, i]
            c = _quantize_column(w, scale, q.bits)
            codes[:, i1 + i] = c
            deq = (c - zero) * scale
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return QuantizedLinear(codes[:, inverse].to(torch.uint8), scales, q.bits, q.group_size)


class CodesLinear(nn.Module):
    """A quantized Linear [N out, K in] that holds only its codes and scales (1 byte per weight, not 4).

    `weight` is the dequantized fp32 matrix, computed on each access (what graph writers read and
    check against the codes); `forward` is `F.linear` with it, so outputs equal the dequantized model's.
    """

    def __init__(self, q: QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        self.q = q
        self.in_features, self.out_features = q.codes.shape[1], q.codes.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.q.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _set_weight(model: nn.Module, module: nn.Linear, weight: torch.Tensor) -> None:
    """Write the dequantized weight; a tied lm_head is untied first so the input embeddings stay as they are."""
    with torch.no_grad():
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and module.weight is embeddings.weight:
            module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)
            return
        module.weight.copy_(weight.to(module.weight.dtype))


class _LayerInputs(Exception):
    """Raised by the capture hook on the first decoder layer: the rest of the model need not run."""


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    q: WeightQuant,
    skip: tuple[str, ...],
    calibration: list[dict[str, torch.Tensor]] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    release_weights: bool = False,
    store: LayerStore | None = None,
) -> QuantResult:
    """Quantize `model`'s Linear layers in place and return the codes.

    By default each Linear keeps its module and gets its dequantized weight (fp32). With
    `release_weights`, each Linear is replaced by a `CodesLinear` (its uint8 codes, dequantized on
    use) as soon as it is quantized, so fp32 weights are freed layer by layer (how `build` fits a
    3B LLM in memory).
    A tied `lm_head` (when not skipped) is untied first: the input embeddings keep full precision.

    `calibration` holds forward kwargs (`inputs_embeds` [1, S, hidden] fp32, `attention_mask`
    [1, S]); GPTQ needs it, RTN ignores it. GPTQ is sequential (as GPTQModel/AutoGPTQ): the first
    decoder layer's inputs are captured once, then each layer runs alone on its inputs, its
    Linears' Hessians are accumulated in that one pass (all from the not-yet-quantized layer), the
    Linears are quantized, and the layer's outputs with quantized weights feed the next layer.
    A quantized `lm_head` is calibrated on the final-norm outputs of the quantized stack.
    Per-layer errors: relative weight error, and for GPTQ the relative output error on the
    calibration inputs, ‖X(W−Ŵ)ᵀ‖/‖XWᵀ‖ computed through the Hessian.

    With a `store` (quant_cache.LayerStore), each decoder layer's results and the hidden states after
    it are saved as it finishes; a later call with the same store skips every stored layer (and the
    stored lm_head) and continues from the stored hidden states, with bit-identical results.
    """
    t0 = time.perf_counter()
    result = QuantResult()
    linears = target_linears(model, skip)
    total = len(linears)

    def finish(name: str, ql: QuantizedLinear, errors: dict[str, float]) -> None:
        module = linears.pop(name)
        result.errors[name] = errors
        result.layers[name] = ql
        if release_weights:
            _replace_module(model, name, CodesLinear(ql, module.bias))
        else:
            _set_weight(model, module, ql.dequantize())
        if progress:
            progress(name, len(result.layers), total)

    if q.method == "rtn":
        for name in list(linears):
            module = linears[name]
            ql = rtn(module.weight, _for_layer(q, module.in_features))
            err = float((ql.dequantize() - module.weight).norm() / module.weight.norm())
            finish(name, ql, {"weight_rel_err": err})
        result.seconds = time.perf_counter() - t0
        return result
    if not calibration:
        raise ValueError("GPTQ needs calibration data")

    def gptq_all(names: list[str], hessians: dict[str, torch.Tensor]) -> None:
        for n in names:
            module = linears[n]
            ql = gptq(module.weight, hessians[n], _for_layer(q, module.in_features))
            w = module.weight.float()
            H = hessians.pop(n).float()
            err2 = ref2 = diff2 = 0.0
            for r0 in range(0, w.shape[0], 4096):  # row chunks: a 128k-row lm_head stays small; fp32 is ample here
                wc = w[r0:r0 + 4096]
                dc = wc - ql.dequantize_rows(r0, r0 + 4096)
                err2 += float(((dc @ H) * dc).sum())
                ref2 += float(((wc @ H) * wc).sum())
                diff2 += float(dc.square().sum())
            finish(n, ql, {"weight_rel_err": math.sqrt(diff2) / float(w.norm()),
                           "output_rel_err": math.sqrt(max(err2, 0.0) / ref2)})

    layers = _decoder_layers(model)
    captured: list[tuple[tuple, dict]] = []

    def capture(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _LayerInputs

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for kwargs in calibration:
            try:
                model(**kwargs, use_cache=False)
            except _LayerInputs:
                pass
    finally:
        handle.remove()
    layer_names = [[n for n, m in linears.items() if any(m is mm for mm in layer.modules())] for layer in layers]
    start = 0
    resumed = store.latest_hidden() if store is not None else None
    if resumed is not None and len(resumed[1]) == len(captured):
        done = [store.load_layer(i, layer_names[i]) for i in range(resumed[0] + 1)]
        if all(entry is not None for entry in done):
            for entry in done:
                for n, (ql, errors) in entry.items():
                    finish(n, ql, errors)
            captured = [((hidden,) + tuple(args[1:]), kwargs) for hidden, (args, kwargs) in zip(resumed[1], captured)]
            start = resumed[0] + 1
    for index in range(start, len(layers)):
        layer, names = layers[index], layer_names[index]
        stored = store.load_layer(index, names) if store is not None else None
        if stored is not None:
            for n, (ql, errors) in stored.items():
                finish(n, ql, errors)
            names = []
        accumulators = {n: HessianAccumulator(linears[n].in_features) for n in names}
        handles = [linears[n].register_forward_hook(accumulators[n].hook) for n in names]
        if names:
            for args, kwargs in captured:
                layer(*args, **kwargs)
        for h in handles:
            h.remove()
        gptq_all(names, {n: a.hessian for n, a in accumulators.items()})
        del accumulators
        if store is not None and names:
            store.save_layer(index, {n: (result.layers[n], result.errors[n]) for n in layer_names[index]})
        outputs = []
        for args, kwargs in captured:
            out = layer(*args, **kwargs)
            outputs.append(((out[0] if isinstance(out, tuple) else out,) + tuple(args[1:]), kwargs))
        captured = outputs
        if store is not None:
            store.save_hidden(index, [args[0] for args, _kwargs in captured])
    head = [n for n in linears if n.split(".")[-1] == "lm_head"]
    stored_head = store.load_module(head[0]) if head and store is not None else None
    if stored_head is not None:
        finish(head[0], *stored_head)
    elif head:  # calibrated on what it sees: the final norm of the quantized stack's outputs
        norm = _final_norm(model)
        acc = HessianAccumulator(linears[head[0]].in_features)
        for args, _kwargs in captured:
            acc.hook(None, (norm(args[0]),), None)
        gptq_all(head, {head[0]: acc.hessian})
        if store is not None:
            store.save_module(head[0], (result.layers[head[0]], result.errors[head[0]]))
    for n in list(linears):  # Linear layers outside the decoder stack (none for Llama): RTN
        module = linears[n]
        ql = rtn(module.weight, _for_layer(q, module.in_features))
        finish(n, ql, {"weight_rel_err": float((ql.dequantize() - module.weight).norm() / module.weight.norm())})
    result.seconds = time.perf_counter() - t0
    return result


class HessianAccumulator:
    """Running H = 2/n Σ xxᵀ over every row of a Linear's inputs (float64)."""

    def __init__(self, in_features: int):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def hook(self, _module, inputs, _output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        total = self.count + x.shape[0]
        self.hessian *= self.count / total
        x = math.sqrt(2 / total) * x
        self.hessian += x.T @ x
        self.count = total


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = model.model if hasattr(model, "model") else model
    return list(inner.layers)


def _final_norm(model: nn.Module) -> nn.Module:
    inner = model.model if hasattr(model, "model") else model
    return inner.norm


@torch.no_grad()
def output_error(model_q: nn.Module, model_ref: nn.Module, layer_name: str,
                 calibration: list[dict[str, torch.Tensor]]) -> float:
    """Relative output error of one Linear between two models on the calibration inputs."""
    captured: dict[str, list[torch.Tensor]] = {"x": []}
    ref_linear = dict(model_ref.named_modules())[layer_name]
    q_linear = dict(model_q.named_modules())[layer_name]
    handle = ref_linear.register_forward_hook(lambda m, i, o: captured["x"].append(i[0].detach()))
    for kwargs in calibration:
        model_ref(**kwargs, use_cache=False)
    handle.remove()
    num = den = 0.0
    for x in captured["x"]:
        ref = ref_linear(x)
        out = x @ q_linear.weight.T
        num += float((ref - out).pow(2).sum())
        den += float(ref.pow(2).sum())
    return math.sqrt(num / den)
