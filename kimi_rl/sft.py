"""Supervised fine-tuning on chain-of-thought demonstrations (the long-CoT cold start)."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .config import SFTConfig
from .data.problems import Problem
from .policy.hf import HFPolicy
from .policy.packing import pack
from .rollout.samples import encode_prompt


def encode_demos(tokenizer: PreTrainedTokenizerBase, demos: Sequence[tuple[Problem, str]]
                 ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per demonstration."""
    eos = tokenizer.eos_token_id
    return [
        (encode_prompt(tokenizer, p), tokenizer(text, add_special_tokens=False).input_ids + [eos])
        for p, text in demos
    ]


def run_sft(policy: HFPolicy, data: Sequence[tuple[list[int], list[int]]], cfg: SFTConfig,
            seed: int, steps: int | None = None, seconds: float | None = None,
            warmup: bool = True, on_step=None) -> dict[str, float]:
    """Minimise the mean token NLL of the responses over random batches, for `steps`
    steps or until `seconds` of wall time have passed. Uses a fresh optimizer with
    linear warmup (when `warmup`) to a constant learning rate."""
    if not data:
        raise ValueError("sft: no demonstrations (data.demos selects none)")
    rng = random.Random(seed)
    policy.reset_optimizer(cfg.lr)
    start, step, loss = time.perf_counter(), 0, float("nan")
    while True:
        if steps is not None and step >= steps:
            break
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        if warmup and cfg.warmup_steps > 0:
            policy.set_lr(cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps))
        batch = [data[rng.randrange(len(data))] for _ in range(cfg.batch_size)]
        micro = pack([p for p, _ in batch], [r for _, r in batch], policy.cfg.micro_batch_tokens)
        n_tokens = sum(len(r) for _, r in batch)

        def nll(lp, mb, n_tokens=n_tokens):
            loss = -lp.sum() / n_tokens
            return loss, {"loss/nll": loss.item()}

        loss = policy.train_step(micro, nll)["loss/nll"]
        step += 1
        if on_step is not None:
            on_step(step, loss)
    return {"steps": step, "loss": loss, "seconds": time.perf_counter() - start}
