"""Run a `target: torch` bundle end to end on PyTorch (CPU or CUDA).

audio → Whisper log-mel (the bundle's feature-extractor config) and the BEATs fbank (inside the
reference BEATs module) → the reference's Whisper encoder, BEATs and Q-Former modules rebuilt from
`encoders.safetensors` → prompt wrap → the static-cache Llama (int4 layers on PyTorch's int4
kernels) → the runtime's greedy / beam search (`runtime/generation.py`: transformers' semantics, the
same code the ONNX engine uses) → the reference's post-processing.

Precision: CPU runs everything in fp32 (as the reference does on CPU). CUDA runs the encoders under
fp16 autocast with fp32 weights (as the challenge does) and the LLM in bf16 when it has int4 layers
(the CUDA int4 kernel takes bf16 only) or fp16 otherwise; the decode step can be captured with
`torch.compile(mode="reduce-overhead")` (CUDA graphs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from salmonn_export.audio import load_audio
from salmonn_export.bundle import read_manifest
from salmonn_export.errors import SalmonnError
from salmonn_export.runtime.engine import BundleTokenizer, decode_texts
from salmonn_export.runtime.generation import GenerationSettings, generate
from salmonn_export.tasks import templated_prompt
from salmonn_export.torch_engine.encoders import SpeechEncoders
from salmonn_export.torch_engine.weights import load_llm

CACHE_BLOCK = 128  # static cache lengths are rounded up to this, so CUDA graphs are reused across prompts


def resolve_device(device: str) -> torch.device:
    """`cpu` or `cuda[:i]` → torch.device. Raises SalmonnError when CUDA is asked for and absent."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SalmonnError(f"unknown --device `{device}` for a torch bundle; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SalmonnError(f"--device {device}: this PyTorch ({torch.__version__}) sees no CUDA device; "
                           "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
    return torch.device(device)


def is_torch_bundle(manifest: dict) -> bool:
    return manifest.get("target") == "torch"


@dataclass
class EngineOutput:
    texts: list[str]
    token_ids: list[list[int]]
    speech_embeds: np.ndarray


class TorchEngine:
    """A loaded torch bundle. `TorchEngine(path, "cuda").transcribe(files, "asr")` → texts.

    `compile_decode` captures the decode step with torch.compile (reduce-overhead: CUDA graphs on
    CUDA); `dense` runs int4 layers as dequantized dense weights (the reference for the kernels)."""

    def __init__(self, bundle: str | Path, device: str = "cpu", compile_decode: bool = False,
                 compile_encoders: bool = False, llm_dtype: torch.dtype | None = None, dense: bool = False,
                 verify_hashes: bool = True):
        self.bundle = Path(bundle)
        self.device = resolve_device(device)
        self.manifest = read_manifest(self.bundle, verify_hashes=verify_hashes)
        if not is_torch_bundle(self.manifest):
            raise SalmonnError("not a torch bundle (manifest target is not `torch`); run it with the ONNX engine",
                               self.bundle)
        try:
            self._load(compile_decode, compile_encoders, llm_dtype, dense)
        except KeyError as exc:
            raise SalmonnError(f"manifest.json lacks {exc}: the bundle is incomplete; rebuild it", self.bundle) from None

    def _load(self, compile_decode: bool, compile_encoders: bool, llm_dtype: torch.dtype | None, dense: bool) -> None:
        spec = self.manifest["torch_engine"]
        cuda = self.device.type == "cuda"
        quantized = bool(spec["quantized_layers"])
        if llm_dtype is None:
            llm_dtype = torch.float32 if not cuda else (torch.bfloat16 if quantized and not dense else torch.float16)
        self.llm_dtype = llm_dtype
        self.encoders = SpeechEncoders.from_bundle(self.bundle, spec, self.manifest["qformer"], self.device)
        if compile_encoders:
            self.encoders.compile()
        self.llm, self.kernels = load_llm(self.bundle / spec["llm"], spec, self.device, llm_dtype, dense=dense)
        self.tokenizer = BundleTokenizer(self.bundle / self.manifest["tokenizer"]["folder"], self.manifest)
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else contextlib.nullcontext
        self.decode_fn = self.llm.decode
        if compile_decode:
            mode = "reduce-overhead" if cuda else None
            self.decode_fn = torch.compile(self.llm.decode, mode=mode, fullgraph=True)
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)

    # ------------------------------------------------------------------ stages

    @torch.inference_mode()
    def encode_speech(self, waves: list[np.ndarray]) -> torch.Tensor:
        """Clips (16 kHz float64) → speech embeddings [B, 88, H] in the LLM dtype, on the device."""
        with self.autocast():
            return self.encoders(waves).to(self.llm_dtype)

    def prompt(self, task: str) -> str:
        p = self.manifest["prompts"]
        return templated_prompt(p["test_prompts"], task, p["template"])

    @torch.inference_mode()
    def prompt_wrap(self, speech: torch.Tensor, tasks: list[str]) -> tuple[torch.Tensor, np.ndarray]:
        """BOS + emb(p_before) + speech + emb(p_after right-padded with [PAD]) → (embeds [B, S, H] on
        the device, mask [B, S] int64 numpy), as the reference's prompt_wrap (spec 3)."""
        placeholder = self.manifest["prompts"]["placeholder"]
        befores, afters = zip(*(self.prompt(t).split(placeholder) for t in tasks))
        before_ids = [self.tokenizer.encode(b) for b in befores]
        after_ids = [self.tokenizer.encode(a) for a in afters]
        if len({len(b) for b in before_ids}) != 1:
            raise SalmonnError("prompts differ before the speech placeholder; the challenge batches them unpadded")
        longest = max(len(a) for a in after_ids)
        pad = self.tokenizer.pad_token_id
        bos = self.tokenizer.bos_token_id
        rows = [[bos] + before_ids[i] for i in range(len(tasks))]
        tails = [a + [pad] * (longest - len(a)) for a in after_ids]
        head = self.llm.embed(torch.tensor(rows, device=self.device))
        tail = self.llm.embed(torch.tensor(tails, device=self.device))
        embeds = torch.cat([head, speech.to(self.llm_dtype), tail], dim=1)
        mask = np.asarray([[1] * (len(rows[i]) + speech.shape[1] + len(after_ids[i])) + [0] * (longest - len(after_ids[i]))
                           for i in range(len(tasks))], dtype=np.int64)
        return embeds, mask

    # ------------------------------------------------------------------ decoder

    def cache_length(self, prompt_len: int, max_new_tokens: int) -> int:
        need = prompt_len + max_new_tokens
        return -(-need // CACHE_BLOCK) * CACHE_BLOCK

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, mask: np.ndarray, positions: np.ndarray, max_new_tokens: int) -> torch.Tensor:
        """Fresh static cache for the rows of `embeds` [N, S, H]; fills slots 0..S−1 → last-position
        logits [N, 1, V] on the device."""
        x = embeds if isinstance(embeds, torch.Tensor) else torch.as_tensor(embeds)
        x = x.to(device=self.device, dtype=self.llm_dtype)
        self.llm.setup_cache(x.shape[0], self.cache_length(x.shape[1], max_new_tokens))
        pos = torch.as_tensor(np.ascontiguousarray(positions), device=self.device)
        return self.llm.prefill(x, torch.as_tensor(mask, device=self.device), pos)

    @torch.inference_mode()
    def decode_step(self, embeds: torch.Tensor, positions: np.ndarray | torch.Tensor, slot: int) -> torch.Tensor:
        """One token per row into cache slot `slot`: embeds [N, 1, H] (LLM dtype, device) → logits [N, 1, V]."""
        pos = torch.as_tensor(positions, device=self.device)
        return self.decode_fn(embeds, pos, torch.tensor([slot], device=self.device))

    def _step(self, max_new_tokens: int):
        """A `runtime.generation.StepFn` over the static cache (past = the number of filled slots)."""

        def step(embeds, mask, positions, past):
            if past is None:
                logits = self.prefill(embeds, mask, positions, max_new_tokens)
                filled = embeds.shape[1]
            else:
                logits = self.decode_step(embeds, np.ascontiguousarray(positions), past)
                filled = past + 1
            return logits.float().cpu().numpy(), filled

        return step

    def reorder(self, past, indices: np.ndarray):
        with torch.inference_mode():
            self.llm.reorder_cache(torch.as_tensor(indices, device=self.device))
        return past

    @torch.inference_mode()
    def embed_ids(self, ids) -> torch.Tensor:
        return self.llm.embed(torch.as_tensor(np.asarray(ids, dtype=np.int64), device=self.device))[:, None, :]

    def generation_settings(self, **overrides) -> GenerationSettings:
        return GenerationSettings.from_manifest(self.manifest["generation"], **overrides)

    def generate_ids(self, embeds: torch.Tensor, mask: np.ndarray, **overrides) -> np.ndarray:
        """Greedy or beam search exactly as the ONNX engine runs it; token ids [B, L]."""
        settings = self.generation_settings(**overrides)
        host = embeds.float().cpu().numpy()  # the search repeats rows per beam in numpy
        return generate(host, mask, settings, self._step(settings.max_new_tokens), self.reorder, self.embed_ids)

    def decode(self, ids: np.ndarray) -> list[str]:
        return decode_texts(self.tokenizer, ids, self.manifest["generation"]["end_sym"])

    # ------------------------------------------------------------------ end to end

    def run_waves(self, waves: list[np.ndarray], tasks: list[str], **overrides) -> EngineOutput:
        speech = self.encode_speech(waves)
        embeds, mask = self.prompt_wrap(speech, tasks)
        ids = self.generate_ids(embeds, mask, **overrides)
        return EngineOutput(self.decode(ids), [list(map(int, r)) for r in ids], speech.float().cpu().numpy())

    def transcribe(self, audio_paths: list[str | Path], task: str | list[str], batch_size: int = 1,
                   **overrides) -> list[str]:
        tasks = [task] * len(audio_paths) if isinstance(task, str) else list(task)
        texts: list[str] = []
        for start in range(0, len(audio_paths), batch_size):
            waves = [load_audio(p) for p in audio_paths[start:start + batch_size]]
            texts += self.run_waves(waves, tasks[start:start + batch_size], **overrides).texts
        return texts

    @property
    def providers(self) -> list[str]:
        """What runs the bundle, in the ONNX engine's terms (for `run --json`): torch:<device>:<LLM dtype>."""
        return [f"torch:{self.device}:{str(self.llm_dtype).replace('torch.', '')}"]

    def describe(self) -> dict:
        """What runs where: device, dtypes, int4 kernel vs dense layer counts (for reports)."""
        return {"device": str(self.device), "llm_dtype": str(self.llm_dtype).replace("torch.", ""),
                "kernels": self.kernels, "bundle": str(self.bundle),
                "recipe": self.manifest["recipe"]["name"]}

