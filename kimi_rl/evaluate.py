"""Held-out evaluation per difficulty level."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from . import checkpoint
from .build import build_engine, build_policy
from .config import TrainConfig
from .data import load_task
from .data.problems import Problem
from .rewards.verify import get_verifier
from .rollout.engine import RolloutEngine, SamplingParams
from .rollout.samples import generate_groups


def evaluate(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase,
             problems: Sequence[Problem], max_new_tokens: int,
             params: SamplingParams | None = None) -> dict:
    """Accuracy per level (one response per problem) and the mean token length of the
    correct responses per level. Returns {"accuracy": {level: acc}, "correct_length":
    {level: mean}, "samples": [...]}."""
    params = params or SamplingParams(greedy=True)
    samples = generate_groups(engine, tokenizer, problems, 1, max_new_tokens, params)
    hits: dict[int, list[float]] = defaultdict(list)
    lengths: dict[int, list[int]] = defaultdict(list)
    for s in samples:
        ok = get_verifier(s.problem.task)(s.problem, s.text)
        hits[s.problem.level].append(ok)
        if ok:
            lengths[s.problem.level].append(len(s.tokens))
    return {
        "accuracy": {lv: sum(v) / len(v) for lv, v in sorted(hits.items())},
        "correct_length": {lv: sum(v) / len(v) for lv, v in sorted(lengths.items())},
        "samples": samples,
    }


def format_accuracy(title: str, acc: dict[int, float]) -> str:
    cells = "  ".join(f"L{lv}: {100 * a:5.1f}" for lv, a in sorted(acc.items()))
    return f"{title:<22} {cells}"


def run_evaluation(cfg, out_dir) -> dict:
    """`kimi-rl eval`: greedy held-out accuracy of a run's latest checkpoint
    (eval.checkpoint=<run dir>) or of model.path, written to <out_dir>/eval.json."""
    task = load_task(cfg.data)
    if cfg.eval.checkpoint:
        state = checkpoint.load(checkpoint.latest(cfg.eval.checkpoint))
        saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), state["config"])
        policy, tokenizer = build_policy(saved, task)
        policy.load_state_dict(state["policy"])
    else:
        policy, tokenizer = build_policy(cfg, task)
    engine = build_engine(cfg, policy, tokenizer)
    result = evaluate(engine, tokenizer, task.test, cfg.eval.max_new_tokens)
    print(format_accuracy("held-out accuracy", result["accuracy"]))
    out = {"accuracy": result["accuracy"], "correct_length": result["correct_length"]}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "eval.json").write_text(json.dumps(out, indent=2))
    return out
