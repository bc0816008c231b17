"""`kimi-rl train|sft|eval [hydra overrides]`: each subcommand is a Hydra app on the
configs shipped in the package (kimi_rl/conf); the default experiment is the demo."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .config import register_configs

register_configs()
HYDRA = dict(version_base=None, config_path="pkg://kimi_rl.conf", config_name="train")
USAGE = """usage: kimi-rl {train,sft,eval} [hydra overrides ...]

  train   RL training (default experiment: the CPU demo); resume=<run dir> continues a run
  sft     supervised cold start only; writes <run dir>/hf_model
  eval    held-out accuracy per level of eval.checkpoint=<run dir> or model.path=<HF dir>

Show the composed config:  kimi-rl train --cfg job
"""


def _run_dir(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir or cfg.resume or HydraConfig.get().runtime.output_dir)


def _user_errors(fn):
    """Bad input (files, paths, values) ends the command with its message, no traceback;
    HYDRA_FULL_ERROR=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> None:
        try:
            fn(cfg)
        except (FileNotFoundError, ValueError, KeyError) as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"kimi-rl: error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


@hydra.main(**HYDRA)
@_user_errors
def train_app(cfg: DictConfig) -> None:
    from .loop import train
    from .preemption import Preempted, Preemption

    pe = cfg.preemption
    try:
        with Preemption(pe.signals, pe.grace_seconds, pe.exit_code) as preempt:
            summary = train(cfg, _run_dir(cfg), preempt)
    except Preempted as e:
        print(f"kimi-rl: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    keys = ("eval_before", "eval_after", "sft_control", "trained_levels",
            "correct_length_at_warmup_end", "correct_length_final", "wall_seconds")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, default=str))


@hydra.main(**HYDRA)
@_user_errors
def sft_app(cfg: DictConfig) -> None:
    from .build import build_policy, save_hf
    from .data import load_task
    from .sft import encode_demos, run_sft

    task = load_task(cfg.data)
    policy, tokenizer = build_policy(cfg, task)
    demos = encode_demos(tokenizer, task.demonstrations(cfg.data.check_prob, cfg.seed))
    stats = run_sft(policy, demos, cfg.sft, cfg.seed, steps=cfg.sft.steps)
    out = save_hf(policy, tokenizer, _run_dir(cfg) / "hf_model")
    print(f"sft: {stats['steps']} steps, loss {stats['loss']:.4f}; model saved to {out}")


@hydra.main(**HYDRA)
@_user_errors
def eval_app(cfg: DictConfig) -> None:
    from .evaluate import run_evaluation

    run_evaluation(cfg, _run_dir(cfg))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    apps = {"train": train_app, "sft": sft_app, "eval": eval_app}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in apps:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.argv = [f"kimi-rl {argv[0]}"] + argv[1:]
    apps[argv[0]]()


if __name__ == "__main__":
    main()
