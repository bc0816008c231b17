"""Builders: config -> components (tokenizer, policy backend, rollout engine, sampler)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from curriculum import CurriculumSampler

from .config import TrainConfig
from .data import TaskData
from .data.tokenizer import char_tokenizer
from .distributed import init_distributed
from .policy.hf import HFPolicy
from .policy.model import DTYPES, load_pretrained, tiny_model
from .prompts import prompt_format
from .rollout.torch_engine import TorchEngine

BACKENDS = ("hf", "megatron")
ENGINES = ("torch", "vllm")


def build_policy(cfg: TrainConfig, task: TaskData) -> tuple[HFPolicy, PreTrainedTokenizerBase]:
    """The policy and its tokenizer; the prompt format is checked against the tokenizer here,
    at the start of every command (e.g. `chat` needs a chat template)."""
    fmt = prompt_format(cfg)
    if cfg.backend.name not in BACKENDS:
        raise ValueError(
            f"backend.name: unknown backend {cfg.backend.name!r} (choose from {BACKENDS})")
    data_parallel = cfg.backend.name == "hf" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if data_parallel:
        init_distributed()  # data parallel with FSDP2 (kimi_rl/policy/hf.py)
    if cfg.model.path:
        model, tokenizer = load_pretrained(cfg.model.path, cfg.model.dtype)
    else:
        if task.vocabulary is None:
            raise ValueError("model.path is required for a problem file (no built-in tokenizer)")
        # the prompt format's own text (a template, an instruction) is encoded too
        tokenizer = char_tokenizer(task.vocabulary + sorted(set(fmt.fixed_text())))
        model = tiny_model(cfg.model, tokenizer, seed=cfg.seed)
    fmt.check(tokenizer, cfg.model.path)
    if cfg.backend.name == "megatron":  # imported only when chosen (megatron-core is optional)
        if cfg.backend.share_prompts:
            raise ValueError("backend.share_prompts: the megatron backend packs every "
                             "sequence whole; set backend.share_prompts=false")
        from .policy.megatron import MegatronPolicy

        return MegatronPolicy(model, cfg.backend, cfg.algo, seed=cfg.seed), tokenizer
    return HFPolicy(model, cfg.backend, cfg.algo, data_parallel=data_parallel), tokenizer


def build_engine(cfg: TrainConfig, policy: HFPolicy, tokenizer: PreTrainedTokenizerBase,
                 eos_token_id: int | None = None) -> TorchEngine:
    """The configured rollout engine. A response ends at the prompt format's stop tokens:
    the tokenizer's EOS, and with `prompt.format=chat` the chat template's end-of-turn
    token, whatever eos_token says, and after its stop strings (kimi_rl/prompts.py).
    `eos_token_id`: the one stop token instead, and no stop strings (-1: none, every
    response runs to its token limit)."""
    fmt = prompt_format(cfg)
    eos = fmt.stop_token_ids(tokenizer) if eos_token_id is None else [eos_token_id]
    texts = fmt.stop_text(tokenizer) if eos_token_id is None else None
    if cfg.rollout.engine not in ENGINES:
        raise ValueError(
            f"rollout.engine: unknown engine {cfg.rollout.engine!r} (choose from {ENGINES})")
    if cfg.rollout.engine == "vllm":
        from .rollout.vllm_engine import VllmEngine  # vllm is an optional dependency

        return VllmEngine(policy.model, tokenizer, cfg.rollout.vllm, seed=cfg.seed + 1,
                          max_batch_size=cfg.rollout.max_batch_size, model_path=cfg.model.path,
                          eos_token_id=eos, dtype=cfg.rollout.dtype, stop_strings=texts)
    # under FSDP the policy's `model` is already a whole copy that only weight export
    # writes: the engine shares it rather than holding a third copy
    shared = (getattr(policy, "world", 1) > 1 and cfg.backend.name == "hf"
              and cfg.rollout.dtype == "auto")
    model = policy.model if shared else copy.deepcopy(policy.model)
    if cfg.rollout.dtype != "auto":  # auto: the policy's dtype
        model = model.to(DTYPES[cfg.rollout.dtype])
    return TorchEngine(model, eos,
                       tokenizer.pad_token_id, seed=cfg.seed + 1,
                       max_batch_size=cfg.rollout.max_batch_size, stop_strings=texts)


def build_sampler(cfg: TrainConfig, task: TaskData) -> CurriculumSampler:
    return CurriculumSampler({p.id: p.level for p in task.train}, cfg.curriculum.stages,
                             prioritized=cfg.curriculum.prioritized,
                             priority_floor=cfg.curriculum.priority_floor, seed=cfg.seed + 2)


def save_hf(policy: HFPolicy, tokenizer: PreTrainedTokenizerBase, out: str | Path) -> Path:
    """The policy as a Hugging Face model directory (loads with transformers)."""
    out = Path(out)
    policy.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
