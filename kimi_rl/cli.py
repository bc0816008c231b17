"""`kimi-rl train|sft|eval|difficulty|long2short [hydra overrides]`: each subcommand is a
Hydra app on the configs shipped in the package (kimi_rl/conf); the default experiment is
the demo."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import host
from .config import int_key_override, int_keys, register_configs

register_configs()
HYDRA = dict(version_base=None, config_path="pkg://kimi_rl.conf", config_name="train")
USAGE = """usage: kimi-rl {train,sft,eval,difficulty,long2short} [hydra overrides ...]

  train   RL training (default experiment: the CPU demo); resume=<run dir> continues a run
  sft     supervised cold start only (sft.demos_file=<jsonl>: on those demonstrations);
          writes <run dir>/hf_model
  eval    held-out accuracy per level of eval.checkpoint=<run dir> or model.path=<HF dir>
  difficulty  pass rates, levels and easy-to-hack filter of data.path's problems ->
              difficulty.output=<file>.jsonl (with a report beside it)
  long2short  method=merge|shortest|dpo|rl long2short.start=<run dir or HF dir>: a
              shorter model in <run dir>/hf_model, its held-out evaluation in eval.json

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
            int_keys(cfg)
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
    from .distributed import is_main
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
    if is_main():  # under torchrun, once
        print(json.dumps({k: summary[k] for k in keys if k in summary}, default=str))


@hydra.main(**HYDRA)
@_user_errors
def sft_app(cfg: DictConfig) -> None:
    from tqdm import tqdm

    from .build import build_policy, save_hf
    from .data import load_task
    from .loop import sft_report
    from .prompts import prompt_format
    from .sft import encode_demos, load_demos, progress_callbacks, run_sft, split_heldout

    host.setup(cfg.num_threads)
    task = load_task(cfg.data)
    policy, tokenizer = build_policy(cfg, task)
    pairs = (load_demos(cfg.sft.demos_file) if cfg.sft.demos_file
             else task.demonstrations(cfg.data.confirm_prob, cfg.seed))
    demos, heldout = split_heldout(encode_demos(tokenizer, pairs, prompt_format(cfg)),
                                   cfg.sft.heldout, cfg.seed)
    with tqdm(total=cfg.sft.steps, desc="sft", disable=not cfg.progress, dynamic_ncols=True) as bar:
        on_step, on_eval = progress_callbacks(bar)
        stats = run_sft(policy, demos, cfg.sft, cfg.seed, cfg.sft.steps, heldout, on_step,
                        on_eval=on_eval)
    out = save_hf(policy, tokenizer, _run_dir(cfg) / "hf_model")
    print(f"{sft_report('sft', stats, len(demos), len(heldout))}; model saved to {out}")


@hydra.main(**HYDRA)
@_user_errors
def eval_app(cfg: DictConfig) -> None:
    from .evaluate import run_evaluation

    host.setup(cfg.num_threads)
    given = prompt_given(HydraConfig.get().overrides.task)
    run_evaluation(cfg, _run_dir(cfg), prompt_given=given)


def prompt_given(overrides: Sequence[str]) -> bool:
    """Whether command-line overrides set the prompt format (`prompt=chat`,
    `prompt.system=...`, `+prompt.template=...`)."""
    return any(re.match(r"[+~]*prompt[.=]", o) for o in overrides)


@hydra.main(**{**HYDRA, "config_name": "long2short"})
@_user_errors
def long2short_app(cfg: DictConfig) -> None:
    from .long2short import run_long2short

    summary = run_long2short(cfg, _run_dir(cfg))
    print(json.dumps({k: summary[k] for k in ("method", "start", "eval")}, default=str))


@hydra.main(**HYDRA)
@_user_errors
def difficulty_app(cfg: DictConfig) -> None:
    from .difficulty import run_difficulty

    run_difficulty(cfg)


def rank_overrides(env: Mapping[str, str] = os.environ) -> list[str]:
    """Hydra overrides for a process that is not rank 0 of a torchrun world: it neither
    writes Hydra's files (.hydra/, the job log) nor logs through Hydra, so every file in the
    run directory has one writer. Rank 0, and a single process, change nothing."""
    if int(env.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    apps = {"train": train_app, "sft": sft_app, "eval": eval_app, "difficulty": difficulty_app,
            "long2short": long2short_app}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in apps:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    sys.argv = [f"kimi-rl {argv[0]}"] + hydra_overrides(argv[1:]) + rank_overrides()
    apps[argv[0]]()


def hydra_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides as Hydra takes them: `group=null` deletions
    (group_deletions), and one key of an int-keyed mapping (`data.flawed.2=0.5`, which
    Hydra would look up as the string "2" and refuse) passed as `++data.flawed.2=0.5`;
    kimi_rl.config's `int_keys` then makes its key an int."""
    return ["++" + o if int_key_override(o) else o for o in group_deletions(overrides)]


def group_deletions(overrides: list[str]) -> list[str]:
    """`group=null` for a config group of the root defaults (`experiment=null`) means
    "no file from this group", which Hydra spells `~group`; other overrides are unchanged."""
    groups = {p.name for p in resources.files("kimi_rl.conf").iterdir() if p.is_dir()}
    out = []
    for o in overrides:
        name, sep, value = o.partition("=")
        out.append(f"~{name}" if sep and value == "null" and name in groups else o)
    return out


if __name__ == "__main__":
    main()
