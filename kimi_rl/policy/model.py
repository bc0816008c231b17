"""Building the policy model: a tiny Llama/Qwen2 from the config, or a local HF directory."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from ..config import ModelConfig

SUPPORTED = ("llama", "qwen2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r} (choose from {sorted(DTYPES)})")
    return DTYPES[name]


def tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A randomly initialised model of the configured shape, sized to the tokenizer."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.arch == "llama":
        config = LlamaConfig(**kwargs)
    elif cfg.arch == "qwen2":
        config = Qwen2Config(**kwargs)
    else:
        raise ValueError(f"model.arch: unknown architecture {cfg.arch!r} (choose from {SUPPORTED})")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(cfg.dtype))
    return model


def load_pretrained(path: str, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local HF model directory (Llama or Qwen2 family) and its tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model.path: model directory not found: {p}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {p} has no config.json (not a HF model directory)")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=_dtype(dtype))
    if model.config.model_type not in SUPPORTED:
        raise ValueError(
            f"model.path: {p} is a {model.config.model_type!r} model; supported: {SUPPORTED}"
        )
    tokenizer = AutoTokenizer.from_pretrained(p)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
