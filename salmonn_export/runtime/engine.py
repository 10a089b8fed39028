"""Run an engine bundle end to end with onnxruntime + numpy + the tokenizer (no torch).

audio → Whisper log-mel / BEATs fbank (numpy) → encoder graphs → Q-Former graph → prompt wrap
with the bundle's embedding table → KV-cache decoder → greedy or beam search → text, with the
reference's post-processing (specials kept, split on end_sym, lowercased, no strip).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from salmonn_export.audio import load_audio
from salmonn_export.bundle import read_manifest
from salmonn_export.errors import SalmonnError, SlowKernelWarning
from salmonn_export.generation_rules import check_generate
from salmonn_export.runtime.features import beats_inputs, whisper_log_mel
from salmonn_export.runtime.generation import GenerationSettings, generate
from salmonn_export.runtime.kv_cache import KVCache, prefill
from salmonn_export.tasks import templated_prompt

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def choose_providers(device: str, bundle: Path | None = None) -> list:
    """Execution providers for `device` (cpu | cuda | tensorrt | auto). A requested one that is
    missing is an error, never a silent fallback; `auto` picks TensorRT → CUDA → CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "auto":
        chosen = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        return chosen + ["CPUExecutionProvider"]
    if device not in PROVIDERS:
        raise SalmonnError(f"unknown --device `{device}`; choose cpu, cuda, tensorrt or auto")
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise SalmonnError(f"--device {device}: onnxruntime here has no {wanted} (available: {', '.join(available)}); "
                           "install onnxruntime-gpu on a machine with CUDA")
    if device == "tensorrt":
        cache = str((bundle or Path(".")) / "trt_cache")
        return [(wanted, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache, "trt_fp16_enable": True}),
                "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [wanted, "CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [wanted]


def slow_kernel_note(manifest: dict, providers: list) -> str | None:
    """Why this bundle will decode slowly here, or None. ONNX Runtime 1.32's CPU MatMulNBits has no
    prepacked 8-bit kernel below accuracy_level 4: each call dequantizes the whole matrix and runs an
    SGEMM (measured: challenge-1b w8a16 3.15 s per token, 13.7x PyTorch fp32; benchmarks/results/
    peers_challenge_1b_a.md)."""
    weights = ((manifest.get("recipe") or {}).get("components", {}).get("llm") or {}).get("weights") or {}
    cpu_only = all((p[0] if isinstance(p, tuple) else p) == "CPUExecutionProvider" for p in providers)
    if cpu_only and weights.get("bits") == 8 and weights.get("accuracy_level", 0) < 4:
        return (f"recipe {manifest['recipe'].get('name')}: 8-bit MatMulNBits at accuracy_level "
                f"{weights.get('accuracy_level', 0)} has no fast CPU kernel in ONNX Runtime and decodes far slower "
                "than fp32 here; on CPU build recipe w8a8 (int8 activations) instead")
    return None


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (applied when the tokenizer config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class BundleTokenizer:
    """The bundle's tokenizer via the `tokenizers` library (no transformers)."""

    def __init__(self, folder: Path, manifest: dict):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False))
        info = manifest["tokenizer"]
        self.bos_token_id = info["bos_token_id"]
        self.pad_token_id = info["pad_token_id"]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(list(map(int, ids)), skip_special_tokens=False)
        return clean_up_tokenization(text) if self.clean_up else text


def decode_texts(tokenizer: BundleTokenizer, ids: np.ndarray, end_sym: str) -> list[str]:
    """Generated ids [B, L] → texts as the challenge's eval writes them: cut at `end_sym`, lower-cased."""
    return [tokenizer.decode(row).split(end_sym)[0].lower() for row in ids]


@dataclass
class EngineOutput:
    texts: list[str]
    token_ids: list[list[int]]
    speech_embeds: np.ndarray


class Engine:
    """A loaded bundle. `Engine(path).transcribe(files, "asr")` → texts."""

    def __init__(self, bundle: str | Path, device: str = "cpu", threads: int | None = None, verify_hashes: bool = True):
        import onnxruntime as ort

        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle, verify_hashes=verify_hashes)
        if isinstance(self.manifest.get("generation"), dict):  # manifest.json is not hashed: hand edits happen
            check_generate(self.manifest["generation"], self.bundle / "manifest.json", prefix="generation.")
        try:
            self._load(ort, device, threads)
        except KeyError as exc:
            raise SalmonnError(f"manifest.json lacks {exc}: the bundle is incomplete; rebuild it", self.bundle) from None

    def _load(self, ort, device: str, threads: int | None) -> None:
        self.providers = choose_providers(device, self.bundle)
        note = slow_kernel_note(self.manifest, self.providers)
        if note:
            warnings.warn(note, SlowKernelWarning, stacklevel=3)
        threads = threads if threads is not None else int(os.environ.get("SALMONN_EXPORT_THREADS", "0"))

        def options(name: str):
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.intra_op_num_threads = threads
            if name != "decoder":  # run once per clip: their idle pools must not spin beside the decoder's
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return opts

        comps = self.manifest["components"]
        self.sessions = {name: ort.InferenceSession(str(self.bundle / c["file"]), options(name), providers=self.providers)
                         for name, c in comps.items()}
        audio = self.manifest["audio"]
        self.mel_filters = np.load(self.bundle / audio["whisper"]["mel_filters"])
        self.beats_cfg = audio.get("beats")
        if self.beats_cfg:
            self.beats_banks = np.load(self.bundle / self.beats_cfg["mel_banks"])
            self.beats_window = np.load(self.bundle / self.beats_cfg["window"])
        self.embed_table = np.load(self.bundle / self.manifest["embed_tokens"], mmap_mode="r")
        self.tokenizer = BundleTokenizer(self.bundle / self.manifest["tokenizer"]["folder"], self.manifest)
        llm = self.manifest["llm"]
        self.layers, self.kv_heads, self.head_dim = llm["layers"], llm["kv_heads"], llm["head_dim"]
        self.decoder_outputs = [o["name"] for o in comps["decoder"]["outputs"]]
        if comps["decoder"].get("kv_cache") != "shared-buffer":
            raise SalmonnError("the bundle's decoder graph predates the fused KV-cache decoder: rebuild it", self.bundle)
        self.max_positions = comps["decoder"]["max_positions"]
        past = next(i for i in comps["decoder"]["inputs"] if i["name"] == "past_key_0")
        self.kv_dtype = np.dtype(past["dtype"])

    # ------------------------------------------------------------------ stages

    def whisper_features(self, waves: list[np.ndarray]) -> np.ndarray:
        w = self.manifest["audio"]["whisper"]
        return np.stack([whisper_log_mel(x, self.mel_filters, w["n_fft"], w["hop_length"], w["n_samples"]) for x in waves])

    def encode_whisper(self, features: np.ndarray) -> np.ndarray:
        return self.sessions["whisper_encoder"].run(None, {"input_features": features})[0]

    def encode_beats(self, waves: list[np.ndarray]) -> np.ndarray:
        c = self.beats_cfg
        fbank, mask = beats_inputs(waves, self.beats_banks, self.beats_window, c["patch"], c["fbank_mean"],
                                   c["fbank_std"], c["scale"])
        return self.sessions["beats"].run(None, {"fbank": fbank, "padding_mask": mask})[0]

    def qformer(self, whisper_hidden: np.ndarray, beats_features: np.ndarray | None) -> np.ndarray:
        feeds = {"whisper_hidden": whisper_hidden}
        if beats_features is not None:
            feeds["beats_features"] = beats_features
        return self.sessions["qformer"].run(None, feeds)[0]

    def encode_speech(self, waves: list[np.ndarray]) -> np.ndarray:
        hidden = self.encode_whisper(self.whisper_features(waves))
        beats = self.encode_beats(waves) if self.beats_cfg else None
        return self.qformer(hidden, beats)

    def embed(self, ids) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)

    def prompt(self, task: str) -> str:
        p = self.manifest["prompts"]
        return templated_prompt(p["test_prompts"], task, p["template"])

    def prompt_wrap(self, speech: np.ndarray, tasks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BOS + emb(p_before) + speech + emb(p_after right-padded with [PAD]); mask."""
        placeholder = self.manifest["prompts"]["placeholder"]
        befores, afters = zip(*(self.prompt(t).split(placeholder) for t in tasks))
        before_ids = [self.tokenizer.encode(b) for b in befores]
        after_ids = [self.tokenizer.encode(a) for a in afters]
        if len({len(b) for b in before_ids}) != 1:
            raise SalmonnError("prompts differ before the speech placeholder; the challenge batches them unpadded")
        longest = max(len(a) for a in after_ids)
        B = speech.shape[0]
        rows, masks = [], []
        for i in range(B):
            pad = longest - len(after_ids[i])
            ids_after = after_ids[i] + [self.tokenizer.pad_token_id] * pad
            rows.append(np.concatenate([self.embed([self.tokenizer.bos_token_id]), self.embed(before_ids[i]),
                                        speech[i].astype(np.float32), self.embed(ids_after)], axis=0))
            masks.append([1] * (1 + len(before_ids[i]) + speech.shape[1] + len(after_ids[i])) + [0] * pad)
        return np.stack(rows), np.asarray(masks, dtype=np.int64)

    # ------------------------------------------------------------------ decoder

    def decoder_step(self, embeds, mask, positions, past, capacity: int | None = None):
        """One decoder call → (logits [B, 1, V] of the last position, cache).

        `past` None starts a generation: a `KVCache` of `capacity` slots (default: the prompt
        plus the manifest's max_new_tokens) is allocated and bound once, and the prompt is
        prefilled; later calls with that cache write their new slots into it in place. The
        logits of a later call are a view the next call on the cache overwrites."""
        if past is None:
            gen = self.manifest["generation"]
            cache = KVCache(self.sessions["decoder"], self.decoder_outputs, embeds.shape[0],
                            capacity or mask.shape[1] + gen["max_new_tokens"], self.layers, self.kv_heads,
                            self.head_dim, self.manifest["llm"]["vocab"], self.kv_dtype)
            if cache.capacity > self.max_positions:
                raise SalmonnError(f"{cache.capacity} positions exceed the decoder's rotary table ({self.max_positions})")
            return prefill(cache, embeds, mask, positions), cache
        return past.run(embeds, mask, positions), past

    @staticmethod
    def reorder(past: KVCache, indices: np.ndarray) -> KVCache:
        """Beam reordering / expansion of the cache rows (see `KVCache.reorder`)."""
        return past.reorder(indices)

    def generation_settings(self, **overrides) -> GenerationSettings:
        """The bundle's generation settings with non-None overrides applied (range-checked: SalmonnError)."""
        return GenerationSettings.from_manifest(self.manifest["generation"], **overrides)

    def generate_ids(self, embeds: np.ndarray, mask: np.ndarray, **overrides) -> np.ndarray:
        settings = self.generation_settings(**overrides)
        capacity = mask.shape[1] + settings.max_new_tokens

        def step(e, m, p, past):
            return self.decoder_step(e, m, p, past, capacity=capacity)

        return generate(embeds, mask, settings, step, self.reorder, lambda ids: self.embed(ids)[:, None, :])

    def decode(self, ids: np.ndarray) -> list[str]:
        return decode_texts(self.tokenizer, ids, self.manifest["generation"]["end_sym"])

    # ------------------------------------------------------------------ end to end

    def run_waves(self, waves: list[np.ndarray], tasks: list[str], **overrides) -> EngineOutput:
        speech = self.encode_speech(waves)
        embeds, mask = self.prompt_wrap(speech, tasks)
        ids = self.generate_ids(embeds, mask, **overrides)
        return EngineOutput(self.decode(ids), [list(map(int, r)) for r in ids], speech)

    def transcribe(self, audio_paths: list[str | Path], task: str | list[str], batch_size: int = 1,
                   **overrides) -> list[str]:
        tasks = [task] * len(audio_paths) if isinstance(task, str) else list(task)
        texts: list[str] = []
        for start in range(0, len(audio_paths), batch_size):
            waves = [load_audio(p) for p in audio_paths[start:start + batch_size]]
            texts += self.run_waves(waves, tasks[start:start + batch_size], **overrides).texts
        return texts
