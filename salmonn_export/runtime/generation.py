"""Greedy and beam search over a KV-cache decoder, in numpy, with transformers' semantics.

This follows transformers 5's `_sample` (greedy) and vectorised `_beam_search` step by step, so
the same logits give the same tokens: log-softmax in float32, processors (min length,
repetition penalty) after it, top-k over beams×vocab with K = max(2, 1 + #eos)·beams, finished
hypotheses scored sum_logprobs / generated_len^length_penalty, the `early_stopping=False`
heuristic, and outputs padded with pad_token_id. With `inputs_embeds` only, max_length =
max_new_tokens and min_length shrinks by the prompt length, as `generate` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from salmonn_export.generation_rules import check_generate

# step(inputs_embeds [N,S,H], attention_mask [N,T], position_ids [N,S], past | None) -> (logits [N,S,V], past)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, object], tuple[np.ndarray, object]]
# reorder(past, indices [N]) -> past
ReorderFn = Callable[[object, np.ndarray], object]
# embed(ids [N]) -> [N, 1, H]
EmbedFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class GenerationSettings:
    max_new_tokens: int
    num_beams: int
    eos_token_ids: list[int]
    pad_token_id: int
    min_length: int = 1
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    @classmethod
    def from_manifest(cls, generation: dict, **overrides) -> GenerationSettings:
        """A bundle manifest's `generation` section with the non-None `overrides` applied
        (range-checked by `check_generate`: SalmonnError naming the value)."""
        check_generate(overrides, overrides=True)
        g = generation
        values = dict(max_new_tokens=g["max_new_tokens"], num_beams=g["num_beams"], eos_token_ids=g["eos_token_id"],
                      pad_token_id=g["pad_token_id"], min_length=g["min_length"],
                      repetition_penalty=g["repetition_penalty"], length_penalty=g["length_penalty"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids as generate made them in transformers 4.46: cumsum(mask) − 1, 1 at masked slots."""
    pos = mask.astype(np.int64).cumsum(-1) - 1
    return np.where(mask == 0, 1, pos)


def _process(scores: np.ndarray, generated: np.ndarray, s: GenerationSettings, min_length: int) -> np.ndarray:
    if generated.shape[1] < min_length:
        scores[:, s.eos_token_ids] = -np.inf
    if s.repetition_penalty != 1.0 and generated.shape[1]:
        for row in range(scores.shape[0]):
            ids = np.unique(generated[row])
            vals = scores[row, ids]
            scores[row, ids] = np.where(vals < 0, vals * s.repetition_penalty, vals / s.repetition_penalty)
    return scores


def _top_k_stable(scores: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """Indices [R, k] of each row's k largest scores, ties in index order — exactly the first k
    of a stable descending argsort, without sorting the row: the row's chunk maxima (one reduce)
    pick the chunks that can hold a top-k element (any chunk whose maximum reaches the k-th
    largest maximum; the k-th largest score is at least that), and only those are sorted."""
    R, n = scores.shape
    if k >= n or n <= 4 * chunk:
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    full = n // chunk * chunk
    out = np.empty((R, k), dtype=np.int64)
    for r, row in enumerate(scores):
        maxima = row[:full].reshape(-1, chunk).max(axis=1)
        if full < n:
            maxima = np.append(maxima, row[full:].max())
        kk = min(k, maxima.size)
        kth = np.partition(maxima, maxima.size - kk)[maxima.size - kk]
        chunks = np.flatnonzero(maxima >= kth)
        idx = (chunks[:, None] * chunk + np.arange(chunk)).ravel()
        idx = idx[idx < n]
        vals = row[idx]
        out[r] = idx[np.lexsort((idx, -vals))[:k]]
    return out


def generate(embeds: np.ndarray, mask: np.ndarray, settings: GenerationSettings, step: StepFn,
             reorder: ReorderFn, embed: EmbedFn) -> np.ndarray:
    """Token ids [B, L] of the new tokens (L = longest output), padded with pad_token_id."""
    min_length = max(settings.min_length - embeds.shape[1], 0)
    if settings.num_beams == 1:
        return _greedy(embeds, mask, settings, step, embed, min_length)
    return _beam(embeds, mask, settings, step, reorder, embed, min_length)


def _greedy(embeds, mask, s: GenerationSettings, step, embed, min_length) -> np.ndarray:
    B = embeds.shape[0]
    generated = np.zeros((B, 0), dtype=np.int64)
    unfinished = np.ones(B, dtype=bool)
    logits, past = step(embeds, mask, positions_from_mask(mask), None)
    eos = np.array(s.eos_token_ids)
    while True:
        scores = _process(np.array(logits[:, -1, :], dtype=np.float32), generated, s, min_length)
        tokens = scores.argmax(-1)
        tokens = np.where(unfinished, tokens, s.pad_token_id)
        generated = np.concatenate([generated, tokens[:, None]], axis=1)
        unfinished &= ~np.isin(tokens, eos)
        if not unfinished.any() or generated.shape[1] >= s.max_new_tokens:
            return generated
        mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
        logits, past = step(embed(tokens), mask, positions_from_mask(mask)[:, -1:], past)


def _beam(embeds, mask, s: GenerationSettings, step, reorder, embed, min_length) -> np.ndarray:
    B, nb = embeds.shape[0], s.num_beams
    max_len = s.max_new_tokens
    eos = np.array(s.eos_token_ids)
    keep = max(2, 1 + len(eos)) * nb
    fill = s.pad_token_id if s.pad_token_id else (s.eos_token_ids[0] if s.eos_token_ids else -1)
    top_mask = np.arange(keep) < nb
    running = np.full((B, nb, max_len), fill, dtype=np.int64)
    running_scores = np.zeros((B, nb), dtype=np.float32)
    running_scores[:, 1:] = -1e9
    running_bidx = np.full((B, nb, max_len), -1, dtype=np.int64)
    finished = running.copy()
    finished_scores = np.full((B, nb), -1e9, dtype=np.float32)
    finished_bidx = running_bidx.copy()
    is_finished = np.zeros((B, nb), dtype=bool)
    improvable = np.ones((B, 1), dtype=bool)
    # prefill the B prompts once, then give every beam a copy of its prompt's cache and logits
    # (transformers prefills B·nb identical rows; the rows' results are the same)
    logits, past = step(embeds, mask, positions_from_mask(mask), None)
    expand = np.repeat(np.arange(B), nb)
    logits = logits[expand, -1:]
    past = reorder(past, expand)
    mask = np.repeat(mask, nb, axis=0)
    cur = 0
    while True:
        flat_seq = running[:, :, :cur].reshape(B * nb, cur)
        log_probs = _log_softmax(logits[:, -1, :])
        log_probs = _process(log_probs, flat_seq, s, min_length)
        V = log_probs.shape[-1]
        acc = (log_probs.reshape(B, nb, V) + running_scores[:, :, None]).reshape(B, nb * V)
        top_idx = _top_k_stable(acc, keep)
        top_lp = np.take_along_axis(acc, top_idx, axis=1)
        src_beam = top_idx // V
        token = top_idx % V
        top_seq = np.take_along_axis(running, src_beam[:, :, None], axis=1).copy()
        top_bidx = np.take_along_axis(running_bidx, src_beam[:, :, None], axis=1).copy()
        top_seq[:, :, cur] = token
        top_bidx[:, :, cur] = src_beam + (np.arange(B) * nb)[:, None]
        hits = np.isin(token, eos) | (cur + 1 >= max_len)
        # running beams for the next step: best non-finished
        run_lp = top_lp + hits.astype(np.float32) * -1e9
        nxt = np.argsort(-run_lp, axis=1, kind="stable")[:, :nb]
        running = np.take_along_axis(top_seq, nxt[:, :, None], axis=1)
        running_scores = np.take_along_axis(run_lp, nxt, axis=1).astype(np.float32)
        running_bidx = np.take_along_axis(top_bidx, nxt[:, :, None], axis=1)
        # finished hypotheses
        just_done = hits & top_mask[None, :]
        fin_lp = (top_lp / np.float32((cur + 1) ** s.length_penalty)).astype(np.float32)
        fin_lp = fin_lp + (~improvable).astype(np.float32) * -1e9
        fin_lp = fin_lp + (~just_done).astype(np.float32) * -1e9
        merged_seq = np.concatenate([finished, top_seq], axis=1)
        merged_scores = np.concatenate([finished_scores, fin_lp], axis=1)
        merged_bidx = np.concatenate([finished_bidx, top_bidx], axis=1)
        merged_done = np.concatenate([is_finished, just_done], axis=1)
        best = np.argsort(-merged_scores, axis=1, kind="stable")[:, :nb]
        finished = np.take_along_axis(merged_seq, best[:, :, None], axis=1)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished_bidx = np.take_along_axis(merged_bidx, best[:, :, None], axis=1)
        is_finished = np.take_along_axis(merged_done, best, axis=1)
        beam_idx = running_bidx[:, :, cur].reshape(-1)
        cur += 1
        best_possible = running_scores[:, :1] / np.float32(cur**s.length_penalty)
        worst_done = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), -1e9)
        improvable = improvable & np.any(best_possible > worst_done, axis=-1, keepdims=True)
        if not (improvable.any() and not hits.all()):
            break
        past = reorder(past, beam_idx)
        mask = np.concatenate([mask, np.ones((B * nb, 1), dtype=mask.dtype)], axis=1)
        tokens = running[:, :, cur - 1].reshape(-1)
        logits, past = step(embed(tokens), mask, positions_from_mask(mask)[:, -1:], past)
    best_seq = finished[:, 0, :]
    length = int(((finished_bidx[:, 0, :] + 1) != 0).sum(axis=1).max())
    return best_seq[:, :length]
