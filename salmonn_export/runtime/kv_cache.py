"""The decoder's KV cache (float32, or float16 in fp16 bundles) as preallocated buffers that the graph reads and writes in place.

The fused decoder graph (GroupQueryAttention) accepts one buffer of capacity C as both
`past_key_i` and `present_key_i`: it writes a step's new keys at slots [T − S, T) and attends
over [0, T), T = attention_mask length. So a generation allocates its cache once, binds it once
(one IOBinding reused for every step), and nothing is copied per step. Beam search reorders rows
in place (only rows whose source beam changed, only the first T slots); expanding a batch-1
prefill to the beams copies rows into a new cache of the wider batch.

Limits of GroupQueryAttention the step keeps to (see `export/decoder_graph.py`): a prompt
(a step without past) is rotated at positions 0..S−1, so a prompt row with padding is prefilled
at batch 1 in two chunks (its leading tokens, then the rest with the first chunk as past).
"""

from __future__ import annotations

import numpy as np

from salmonn_export.errors import SalmonnError


class KVCache:
    """past/present buffers float32 [batch, kv_heads, capacity, head_dim] per layer (keys and
    values interleaved: key_0, value_0, key_1, …), plus the IOBinding that binds them.

    `length` is the number of filled slots (the attention-mask length of the last step)."""

    def __init__(self, session, output_names: list[str], batch: int, capacity: int, layers: int, kv_heads: int,
                 head_dim: int, vocab: int, dtype: np.dtype = np.float32):
        import onnxruntime as ort

        self.batch, self.capacity, self.length = batch, capacity, 0
        self.arrays = [np.zeros((batch, kv_heads, capacity, head_dim), dtype=dtype) for _ in range(2 * layers)]
        self.logits = np.zeros((batch, 1, vocab), dtype=np.float32)
        self.binding = session.io_binding()
        for i, array in enumerate(self.arrays):
            kind, layer = ("key" if i % 2 == 0 else "value"), i // 2
            value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy memory
            self.binding.bind_ortvalue_input(f"past_{kind}_{layer}", value)
            self.binding.bind_ortvalue_output(f"present_{kind}_{layer}", value)
        self.binding.bind_ortvalue_output(output_names[0], ort.OrtValue.ortvalue_from_numpy(self.logits))
        self._session = session
        self._shape = (layers, kv_heads, head_dim, vocab)
        self._outputs = output_names
        self.dtype = dtype

    def run(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One decoder call writing slots [T − S, T). Returns logits [batch, 1, V] — a view of a
        buffer the next call overwrites. Raises SalmonnError when T exceeds the capacity."""
        total = mask.shape[1]
        if total > self.capacity:
            raise SalmonnError(f"sequence of {total} positions exceeds the KV cache capacity {self.capacity}")
        b = self.binding
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        b.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        self._session.run_with_iobinding(b)
        self.length = total
        return self.logits

    def like(self, batch: int) -> KVCache:
        """An empty cache of the same capacity for `batch` rows."""
        layers, kv_heads, head_dim, vocab = self._shape
        return KVCache(self._session, self._outputs, batch, self.capacity, layers, kv_heads, head_dim, vocab, self.dtype)

    def reorder(self, indices: np.ndarray) -> KVCache:
        """Row j becomes old row indices[j] (beam search). Same batch: in place, copying only the
        rows that change and only the filled slots. Another batch (beam expansion): a new cache."""
        indices = np.asarray(indices, dtype=np.int64)
        t = self.length
        if len(indices) != self.batch:
            out = self.like(len(indices))
            for src, dst in zip(self.arrays, out.arrays):
                dst[:, :, :t] = src[indices, :, :t]
            out.length = t
            return out
        changed = np.flatnonzero(indices != np.arange(self.batch))
        if not len(changed):
            return self
        sources = {int(indices[j]) for j in changed}
        overwritten = sources & {int(j) for j in changed}
        for a in self.arrays:
            saved = {s: a[s, :, :t].copy() for s in overwritten}
            for j in changed:
                s = int(indices[j])
                a[j, :, :t] = saved[s] if s in saved else a[s, :, :t]
        return self


def prefill(cache: KVCache, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Run a prompt (no past) into an empty `cache`; returns last-position logits [B, 1, V] (a copy).

    Rows without padding go through in one call; a padded row (zeros in its mask: `prompt_wrap`
    pads shorter prompts on the right) runs at batch 1 as its leading unpadded tokens, then the
    remainder with those as past — the chunk GroupQueryAttention rotates by `position_ids`.
    Raises SalmonnError for a row whose first slot is padding (nothing to start the row from)."""
    if mask.all():
        return cache.run(embeds, mask, positions).copy()
    if not mask[:, 0].all():
        raise SalmonnError("prompt rows must not start with padding (left padding is not supported)")
    logits = np.empty((embeds.shape[0], 1, cache.logits.shape[-1]), dtype=np.float32)
    row_cache = cache.like(1)
    total = mask.shape[1]
    for r in range(embeds.shape[0]):
        zeros = np.flatnonzero(mask[r] == 0)
        split = int(zeros[0]) if len(zeros) else total
        row_cache.run(embeds[r:r + 1, :split], mask[r:r + 1, :split], positions[r:r + 1, :split])
        if split < total:
            row_cache.run(embeds[r:r + 1, split:], mask[r:r + 1], positions[r:r + 1, split:])
        logits[r] = row_cache.logits[0]
        for src, dst in zip(row_cache.arrays, cache.arrays):
            dst[r, :, :total] = src[0, :, :total]
    cache.length = total
    return logits
