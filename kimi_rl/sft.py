"""Supervised fine-tuning on chain-of-thought demonstrations (the long-CoT cold start).

The learning rate warms up linearly, then decays by a cosine to `final_lr_ratio` of its
peak over the run's steps (`schedule="cosine"`), so that the last steps, which make the
model RL starts from, are small ones: at a constant rate the final model is whatever the
last noisy steps left, and which one that is depends on float rounding. A slice of the
demonstrations is held out; its loss is measured every `eval_every` steps and at the end,
and `select="best"` keeps the weights of the best measurement.

`schedule="wsd"` (warmup-stable-decay) holds the peak rate and decays over the last
`decay_steps`; with `target_loss`, the decay starts as soon as the held-out loss reaches
the target. A small model can sit on a loss plateau for a number of steps that varies with
the seed before it learns the task, and a fixed step count then ends some seeds'
cold starts on the plateau; a target ends each one when its demonstrations are learned.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .config import SFTConfig
from .data.problems import Problem
from .policy.hf import HFPolicy
from .policy.packing import pack
from .prompts import RAW, PromptFormat
from .rollout.samples import encode_prompt

Demo = tuple[list[int], list[int]]  # (prompt ids, response ids + EOS)


def encode_demos(tokenizer: PreTrainedTokenizerBase, demos: Sequence[tuple[Problem, str]],
                 fmt: PromptFormat | None = None) -> list[Demo]:
    """(prompt ids, response ids + end) per demonstration, the prompt in the run's format;
    the end is the token that ends a response in that format: the chat template's
    end-of-turn token with `chat`, else EOS."""
    fmt = fmt or RAW
    end = fmt.end_token_id(tokenizer)
    return [
        (encode_prompt(tokenizer, p, fmt),
         tokenizer(text, add_special_tokens=False).input_ids + [end])
        for p, text in demos
    ]


def write_demos(path: str | Path, demos: Sequence[tuple[Problem, str]]) -> Path:
    """Demonstrations as JSONL, one per row: id, prompt, answer, difficulty, task, response
    (what `sft.demos_file` reads)."""
    path = Path(path)
    with path.open("w") as f:
        for p, response in demos:
            f.write(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer,
                                "difficulty": p.level, "task": p.task,
                                "response": response}) + "\n")
    return path


def load_demos(path: str | Path) -> list[tuple[Problem, str]]:
    """(problem, response) per row of a JSONL file of demonstrations: prompt and response
    (strings) required; id (default <stem>-<row>), answer, difficulty (default 1) and
    task (default modsum) optional. A bad row is named by file and row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sft.demos_file: file not found: {path}")
    out = []
    for row, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, row {row}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}, row {row}: not a JSON object")
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise ValueError(f"{path}, row {row}: {key!r} must be a non-empty string")
        level = rec.get("difficulty", 1)
        if not isinstance(level, int) or isinstance(level, bool):
            raise ValueError(f"{path}, row {row}: 'difficulty' must be an integer, "
                             f"got {level!r}")
        out.append((Problem(str(rec.get("id", f"{path.stem}-{row}")), rec["prompt"],
                            str(rec.get("answer", "")), level,
                            str(rec.get("task", "modsum"))), rec["response"]))
    if not out:
        raise ValueError(f"sft.demos_file: {path} holds no demonstrations")
    return out


def split_heldout(data: Sequence[Demo], n: int, seed: int) -> tuple[list[Demo], list[Demo]]:
    """(train, held out): `n` demonstrations drawn at random are held out, at most a
    quarter of them (none when there are fewer than 8)."""
    n = min(n, len(data) // 4) if len(data) >= 8 else 0
    held = set(random.Random(seed).sample(range(len(data)), n))
    return ([d for i, d in enumerate(data) if i not in held],
            [d for i, d in enumerate(data) if i in held])


def lr_at(cfg: SFTConfig, step: int, total: int, decay_start: int | None = None) -> float:
    """The learning rate of step `step` (0-based) of `total`: linear warmup over
    `warmup_steps`, then constant, or a cosine from `lr` down to `lr * final_lr_ratio` at
    the last step. The cosine starts after the warmup (`schedule="cosine"`) or at
    `decay_start` (`"wsd"`; by default `total - decay_steps`)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        start = wsd_decay_start(cfg, total) if decay_start is None else decay_start
        start = max(start, cfg.warmup_steps)
    else:
        start = cfg.warmup_steps
    if step < start:
        return cfg.lr
    frac = min(1.0, (step - start) / max(total - 1 - start, 1))
    low = cfg.lr * cfg.final_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * frac))


def wsd_decay_start(cfg: SFTConfig, total: int) -> int:
    """The step a wsd run of `total` steps starts its decay at, unless a held-out target
    starts it earlier: `decay_steps` before the end, not before the warmup's end."""
    return max(total - cfg.decay_steps, min(cfg.warmup_steps, total))


def _nll_fn(n_tokens: int):
    def nll(lp, mb):
        loss = -lp.sum() / n_tokens
        return loss, {"loss/nll": loss.item()}
    return nll


@torch.no_grad()
def heldout_loss(policy: HFPolicy, data: Sequence[Demo]) -> float:
    """Mean token NLL of the responses of `data` (no gradient)."""
    n_tokens = sum(len(r) for _, r in data)
    total = 0.0
    batches = pack([p for p, _ in data], [r for _, r in data], policy.cfg.micro_batch_tokens)
    for lp, _ in policy.logprobs_many(batches):  # data parallel: each rank its share
        total += -float(lp.sum())
    return total / max(n_tokens, 1)


def progress_callbacks(bar, on_step=None, on_eval=None):
    """run_sft's on_step and on_eval that show the batch loss and the held-out loss on a
    tqdm `bar`, then call `on_step(step, loss, lr)` / `on_eval(step, loss)` if given."""
    shown: dict[str, str] = {}

    def step_shown(step, loss, lr):
        shown["loss"] = f"{loss:.3f}"
        bar.set_postfix(shown, refresh=False)
        bar.update(1)
        if on_step:
            on_step(step, loss, lr)

    def eval_shown(step, loss):
        shown["held-out"] = f"{loss:.3f}"
        if on_eval:
            on_eval(step, loss)

    return step_shown, eval_shown


def run_sft(policy: HFPolicy, data: Sequence[Demo], cfg: SFTConfig, seed: int, steps: int,
            heldout: Sequence[Demo] = (), on_step=None, on_eval=None,
            until_target: bool = True) -> dict:
    """Minimise the mean token NLL of the responses over at most `steps` random batches
    with a fresh optimizer (`cfg.betas`) and the schedule of `lr_at`. With `heldout`
    demonstrations, their loss is measured every `cfg.eval_every` steps and after the
    last; `cfg.select="best"` then leaves the policy at the weights of the lowest one. With
    the wsd schedule and `cfg.target_loss` (and `until_target`), the first measurement at
    or below the target starts the decay: the run ends `cfg.decay_steps` later.
    `on_step(step, loss, lr)` after each step, `on_eval(step, heldout_loss)` after each
    measurement.

    Returns steps (those run), the last batch's loss, seconds, lr_decay_start (wsd), and
    (with `heldout`) heldout_loss (the kept weights') and best_step."""
    if not data:
        raise ValueError("sft: no demonstrations (data.demos selects none)")
    target = cfg.target_loss if until_target and cfg.schedule == "wsd" else None
    if target is not None and not (heldout and cfg.eval_every):
        raise ValueError("sft.target_loss: no held-out loss to compare it with "
                         "(sft.heldout and sft.eval_every must be > 0)")
    rng = random.Random(seed)
    policy.reset_optimizer(cfg.lr, cfg.betas)
    start, loss = time.perf_counter(), float("nan")
    total = steps
    decay_start = wsd_decay_start(cfg, steps) if cfg.schedule == "wsd" else None
    # the measurement kept: (held-out loss, step, weights when they must be restored)
    best: tuple[float, int, dict | None] = (math.inf, 0, None)

    def measure(step: int) -> float:
        nonlocal best
        loss = heldout_loss(policy, heldout)
        if on_eval is not None:
            on_eval(step, loss)
        if cfg.select != "best":  # final: the last measurement, the weights as they are
            best = (loss, step, None)
        elif loss < best[0]:
            best = (loss, step, policy.model_state())
        return loss

    step = 0
    while step < total:
        lr = lr_at(cfg, step, total, decay_start)
        policy.set_lr(lr)
        batch = [data[rng.randrange(len(data))] for _ in range(cfg.batch_size)]
        micro = pack([p for p, _ in batch], [r for _, r in batch], policy.cfg.micro_batch_tokens)
        loss = policy.train_step(micro, _nll_fn(sum(len(r) for _, r in batch)))["loss/nll"]
        step += 1
        if on_step is not None:
            on_step(step, loss, lr)
        if heldout and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            measured = measure(step)
            if target is not None and measured <= target and step < decay_start:
                decay_start, total = step, min(step + cfg.decay_steps, total)
    stats = {"steps": total, "loss": loss}
    if decay_start is not None:
        stats["lr_decay_start"] = decay_start
    if heldout:
        measure(total)
        if best[2] is not None and best[1] != total:
            policy.load_model_state(best[2])
        stats.update(heldout_loss=best[0], best_step=best[1])
    stats["seconds"] = time.perf_counter() - start
    return stats
