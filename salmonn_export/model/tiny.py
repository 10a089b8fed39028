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
}


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on a local corpus, Llama-3 specials appended after the BPE vocab."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = [line for line in CORPUS.strip().splitlines()] + list(builtin_test_prompts().values())
    texts += ["USER: {}\nASSISTANT:", "<Speech></Speech>"]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS)
    return tok


def _write_whisper(folder: Path, preset: Preset) -> None:
    config = WhisperConfig(**preset.whisper, max_source_positions=1500, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    WhisperModel(config).save_pretrained(str(folder))
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(str(folder))


def _write_beats(path: Path, preset: Preset) -> None:
    cfg = BEATsConfig(input_patch_size=16, conv_bias=False, activation_fn="gelu", layer_norm_first=False,
                      deep_norm=True, conv_pos=128, conv_pos_groups=16, relative_position_embedding=True,
                      num_buckets=320, max_distance=800, gru_rel_pos=True, finetuned_model=False,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                      dropout_input=0.0, layer_wise_gradient_decay_ratio=0.6, **preset.beats)
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
    tok = train_tokenizer(preset.bpe_vocab)
    bpe = tok.get_vocab_size() - len(LLAMA3_SPECIALS)
    ids = {s: bpe + i for i, s in enumerate(LLAMA3_SPECIALS)}
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=ids["<|begin_of_text|>"],
                         eos_token_id=ids["<|end_of_text|>"], initializer_range=preset.llm_init_range,
                         **preset.llama)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
    )
    model.save_pretrained(str(folder))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(folder))
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
