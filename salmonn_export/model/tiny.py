"""Tiny trained-SALMONN folders in the real on-disk formats, for tests and benchmarks.

`write_tiny_salmonn(out, preset, seed)` writes what a user of the challenge codebase has after
training: an HF Whisper folder, a BEATs `.pt` (`cfg` + `model`), an HF Llama folder with a
byte-level BPE tokenizer trained here (Llama-3 special tokens), the training `.pth` holding
exactly the trainable tensors (plus the buffers the challenge keeps), and a challenge-style
YAML. Weights are random but "decisive" (large LoRA-B and projection) so outputs depend on the
audio. Same preset + seed → byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from salmonn_export.errors import SalmonnError
from salmonn_export.files import atomic_dir
from salmonn_export.model.beats import BEATs, BEATsConfig
from salmonn_export.model.hf_compat import write_config_for_446, write_for_446
from salmonn_export.model.llm import apply_lora
from salmonn_export.model.prompts import builtin_test_prompts
from salmonn_export.model.qformer import BERT_HIDDEN, SpeechQFormer

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]

CORPUS = """
the quick brown fox jumps over the lazy dog near the river bank.
a man is speaking while birds chirp in the background.
rain falls steadily on a metal roof as thunder rumbles far away.
she said that the meeting will start at nine in the morning.
please write down what you hear in the audio and keep it short.
a dog barks twice and a car passes by on a wet road.
music plays softly while people talk and laugh in a busy room.
the weather today is sunny with a light breeze from the west.
an engine starts, idles for a moment and then drives away.
recognize the speech and give me the transcription of every word.
water is running from a tap and dishes clatter in a sink.
the children are playing football in the park after school.
he asked whether the train to london leaves from platform four.
a bell rings three times and footsteps echo down a long hall.
wind blows through the trees and leaves rustle on the ground.
we should finish the report before the end of the week.
a phone rings, someone answers and speaks quietly.
one two three four five six seven eight nine ten eleven twelve.
the colour of the sky changed from grey to a bright blue.
listen to the speech and describe the sound of the scene.
"""


@dataclass(frozen=True)
class Preset:
    whisper: dict
    beats: dict
    llama: dict
    bpe_vocab: int
    llm_init_range: float = 0.3
    lora_std: tuple[float, float] = (0.2, 0.5)  # A, B: "decisive", so the adapters visibly matter
    proj_std: float = 0.3
    # real-size presets: Llama-3.2's tied embeddings and 128,256-id vocabulary (BPE padded with unreachable
    # entries to 128,000, then the 256 Llama-3 specials), base weights written in fp16 as the HF folders are
    tied: bool = False
    vocab_size: int | None = None
    fp16: bool = False
    beats_finetuned: bool = False


LLAMA32_ROPE_SCALING = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# distil-large-v3: the encoder of large-v3 (32 layers, d 1280, 20 heads, 128 mels), 2 decoder layers
DISTIL_LARGE_V3 = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                       decoder_layers=2, decoder_attention_heads=20, decoder_ffn_dim=5120, num_mel_bins=128,
                       vocab_size=51866, max_target_positions=448)
BEATS_ITER3 = dict(embed_dim=512, encoder_embed_dim=768, encoder_layers=12, encoder_attention_heads=12,
                   encoder_ffn_embed_dim=3072)
LLAMA3_VOCAB = 128256  # 128,000 BPE ids + 256 specials; `[PAD]` makes 128,257 at training time


PRESETS = {
    "tiny": Preset(
        whisper=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, decoder_layers=1,
                     decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=80, vocab_size=100,
                     max_target_positions=64),
        beats=dict(embed_dim=32, encoder_embed_dim=64, encoder_layers=2, encoder_attention_heads=4,
                   encoder_ffn_embed_dim=128),
        llama=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16),
        bpe_vocab=384,
    ),
    "small": Preset(
        whisper=dict(d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, decoder_layers=1,
                     decoder_attention_heads=6, decoder_ffn_dim=1536, num_mel_bins=128, vocab_size=512,
                     max_target_positions=448),
        beats=dict(embed_dim=256, encoder_embed_dim=384, encoder_layers=4, encoder_attention_heads=6,
                   encoder_ffn_embed_dim=1536),
        llama=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64),
        bpe_vocab=1024,
        # Llama's own scales: at 12 layers the tiny preset's large values make activations chaotic,
        # so that fp32 rounding differences between runtimes explode
        llm_init_range=0.02, lora_std=(0.02, 0.02), proj_std=0.05,
    ),
    # The challenge's model at its real size (random, well-scaled weights): Llama-3.2-3B / -1B shapes
    "challenge-3b": Preset(
        whisper=DISTIL_LARGE_V3, beats=BEATS_ITER3,
        llama=dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                   num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                   rope_scaling=LLAMA32_ROPE_SCALING),
        bpe_vocab=2048, llm_init_range=0.02, lora_std=(0.02, 0.02), proj_std=0.02,
        tied=True, vocab_size=LLAMA3_VOCAB, fp16=True, beats_finetuned=True,
    ),
    "challenge-1b": Preset(
        whisper=DISTIL_LARGE_V3, beats=BEATS_ITER3,
        llama=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rope_scaling=LLAMA32_ROPE_SCALING),
        bpe_vocab=2048, llm_init_range=0.02, lora_std=(0.02, 0.02), proj_std=0.02,
        tied=True, vocab_size=LLAMA3_VOCAB, fp16=True, beats_finetuned=True,
    ),
}


def llama3_specials(count: int) -> list[str]:
    """Llama-3's special tokens in id order: the 11 named ones, then reserved ones up to `count` in all."""
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + count - len(LLAMA3_SPECIALS))]
    return LLAMA3_SPECIALS + reserved


def train_tokenizer(vocab_size: int, total: int | None = None) -> Tokenizer:
    """Byte-level BPE trained on a local corpus, Llama-3 specials appended after the BPE vocab.

    With `total` (Llama-3's 128,256), the BPE vocabulary is padded to `total − 256` with entries no
    merge produces (`<|unused_bpe_N|>`: decodable, never encoded), then 256 specials follow, so the
    ids of `<|begin_of_text|>` (128,000), `<|eot_id|>` (128,009) etc. are Llama-3's.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [line for line in CORPUS.strip().splitlines()] + list(builtin_test_prompts().values())
    texts += ["USER: {}\nASSISTANT:", "<Speech></Speech>"]
    tok.train_from_iterator(texts, trainer=trainer)
    if total is None:
        tok.add_special_tokens(LLAMA3_SPECIALS)
        return tok
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    bpe_total = total - 256
    if len(vocab) > bpe_total:
        raise ValueError(f"trained BPE has {len(vocab)} ids, more than {bpe_total}")
    vocab.update({f"<|unused_bpe_{i}|>": i for i in range(len(vocab), bpe_total)})
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(llama3_specials(256))
    return tok


def _write_whisper(folder: Path, preset: Preset) -> None:
    config = WhisperConfig(**preset.whisper, max_source_positions=1500, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    model = WhisperModel(config)
    if preset.fp16:  # distil-large-v3's HF folder holds fp16 weights
        model = model.half()
    model.save_pretrained(str(folder))
    del model
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(str(folder))
    write_config_for_446(folder)  # the challenge's transformers 4.46.3 reads it as we do


def _write_beats(path: Path, preset: Preset) -> None:
    cfg = BEATsConfig(input_patch_size=16, conv_bias=False, activation_fn="gelu", layer_norm_first=False,
                      deep_norm=True, conv_pos=128, conv_pos_groups=16, relative_position_embedding=True,
                      num_buckets=320, max_distance=800, gru_rel_pos=True,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                      dropout_input=0.0, layer_wise_gradient_decay_ratio=0.6, **preset.beats,
                      finetuned_model=preset.beats_finetuned, predictor_class=527)
    model = BEATs(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5)
            elif "layer_norm" not in name and "grep_a" not in name:
                p.normal_(0.0, 0.02)
    torch.save({"cfg": asdict(cfg), "model": model.state_dict()}, str(path))


def _write_llama(folder: Path, preset: Preset) -> LlamaForCausalLM:
    tok = train_tokenizer(preset.bpe_vocab, preset.vocab_size)
    bpe = tok.get_vocab_size() - (256 if preset.vocab_size else len(LLAMA3_SPECIALS))
    ids = {s: bpe + i for i, s in enumerate(LLAMA3_SPECIALS)}
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=preset.tied, bos_token_id=ids["<|begin_of_text|>"],
                         eos_token_id=ids["<|end_of_text|>"], initializer_range=preset.llm_init_range,
                         **{"max_position_embeddings": 2048, **preset.llama})
    # fp16 presets are built in fp16 directly (a 3B model in fp32 would be 12.8 GB)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float16) if preset.fp16 else LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
    )
    model.save_pretrained(str(folder))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))
    write_for_446(folder)  # the challenge's transformers 4.46.3 reads the same ids and rope values
    return model


def _trainable_state(llm: LlamaForCausalLM, whisper_width: int, beats_width: int, preset: Preset) -> dict[str, torch.Tensor]:
    """The `model` dict of a challenge `.pth`: trainable tensors + the Q-Former position_ids buffer."""
    state: dict[str, torch.Tensor] = {}
    ln_speech = torch.nn.LayerNorm(whisper_width)
    ln_audio = torch.nn.LayerNorm(beats_width)
    qformer = SpeechQFormer(whisper_width + beats_width)
    with torch.no_grad():
        for ln in (ln_speech, ln_audio):
            ln.weight.normal_(1.0, 0.1)
            ln.bias.normal_(0.0, 0.1)
        for name, p in qformer.named_parameters():
            # fan-in scaled (not BERT's 0.02) so the windows visibly steer the outputs
            if p.dim() > 1:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
            else:
                p.fill_(1.0) if "LayerNorm.weight" in name else p.normal_(0.0, 0.1)
    state["speech_query_tokens"] = torch.randn(1, 1, BERT_HIDDEN) * 0.02
    for k, v in ln_speech.state_dict().items():
        state[f"ln_speech.{k}"] = v
    for k, v in ln_audio.state_dict().items():
        state[f"ln_audio.{k}"] = v
    for k, v in qformer.state_dict().items():
        state[f"speech_Qformer.{k}"] = v
    hidden = llm.config.hidden_size
    proj = torch.nn.Linear(BERT_HIDDEN, hidden)
    with torch.no_grad():
        proj.weight.normal_(0.0, preset.proj_std)
        proj.bias.normal_(0.0, preset.proj_std)
    state["speech_llama_proj.weight"] = proj.weight.detach().clone()
    state["speech_llama_proj.bias"] = proj.bias.detach().clone()
    peft_model = apply_lora(llm, rank=8, alpha=32, dropout=0.05)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_" in name:
                p.normal_(0.0, preset.lora_std[1] if ".lora_B." in name else preset.lora_std[0])
                state[f"llama_model.{name}"] = p.detach().clone()
    if preset.tied:
        # The challenge's runner drops frozen parameters via named_parameters(), which lists the tied tensor
        # once (as embed_tokens), so its .pth keeps lm_head.weight: the whole resized matrix, [PAD] row
        # included (fixtures/challenge-made-tiny-tied). The row is a draw around the old rows' mean, as
        # transformers 4.46's mean_resizing makes it.
        emb = llm.get_input_embeddings().weight.detach()
        pad = emb.mean(0, dtype=torch.float32) + torch.randn(emb.shape[1]) * preset.llm_init_range
        state["llama_model.base_model.model.lm_head.weight"] = torch.cat([emb, pad.to(emb.dtype)[None]])
    return {k: v.contiguous() for k, v in state.items()}


def challenge_config(train_prompt: str = "prompts/train_prompt.json") -> dict:
    """The YAML a challenge user has (eval config shape), relative paths."""
    return {
        "model": {
            "llama_path": "llm", "whisper_path": "whisper", "beats_path": "beats.pt", "token": "",
            "only_preprocessor": False, "ckpt": "checkpoint_best.pth", "freeze_whisper": True, "freeze_beats": True,
            "use_speech_Qformer": True, "freeze_speech_QFormer": False, "window_level_Qformer": True,
            "num_speech_query_token": 1, "second_per_window": 0.333333, "second_stride": 0.333333,
            "speech_llama_proj_model": "", "freeze_speech_llama_proj": False, "lora": True, "lora_rank": 8,
            "lora_alpha": 32, "lora_dropout": 0.1, "multi_prompt": True, "prompt_template": "USER: {}\nASSISTANT:",
            "prompt_path": train_prompt, "max_txt_len": 300, "end_sym": "<|end_of_text|>",
        },
        "generate": {
            "max_new_tokens": 24, "num_beams": 4, "do_sample": False, "min_length": 1, "temperature": 1.0,
            "top_p": 0.9, "repetition_penalty": 1.0, "length_penalty": 1.0, "end_sym": "<|end_of_text|>",
        },
        "datasets": {"prefix": ".", "whisper_path": "whisper"},
        "run": {"batch_size_eval": 8, "num_workers": 0, "device": "cpu"},
    }


def write_challenge_config(folder: Path, config: dict) -> None:
    """`config.yaml` and the training prompt file it names, as a challenge user's folder has them."""
    (folder / "prompts").mkdir()
    prompts = builtin_test_prompts()
    train_prompts = {"asr": [prompts["asr"]], "audiocaption_v2": [prompts["audiocaption_v2"]]}
    (folder / "prompts" / "train_prompt.json").write_text(json.dumps(train_prompts, indent=1))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


def write_tiny_salmonn(out_dir: str | Path, preset: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write a complete trained-SALMONN folder; atomic (temp folder + rename)."""
    if preset not in PRESETS:
        raise SalmonnError(f"unknown preset `{preset}`; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    with atomic_dir(out_dir, force) as tmp:
        torch.manual_seed(seed)
        _write_whisper(tmp / "whisper", p)
        torch.manual_seed(seed + 1)
        _write_beats(tmp / "beats.pt", p)
        torch.manual_seed(seed + 2)
        llm = _write_llama(tmp / "llm", p)
        torch.manual_seed(seed + 3)
        beats_width = p.beats["encoder_embed_dim"]
        state = _trainable_state(llm, p.whisper["d_model"], beats_width, p)
        torch.save({"model": state, "optimizer": None, "config": challenge_config(), "scaler": None, "epoch": 0},
                   str(tmp / "checkpoint_best.pth"))
        write_challenge_config(tmp, challenge_config())
        (tmp / "TINY.json").write_text(json.dumps({"preset": preset, "seed": seed}, indent=1))
    return Path(out_dir).expanduser().resolve()
