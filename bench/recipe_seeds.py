"""A pretrained-model recipe (default `experiment=smollm2_gym`) over seeds, judged against
its bars.

For each seed, one `kimi-rl train experiment=<recipe> seed=<N>` process (the real CLI): SFT
cold start, RL, time-matched SFT control. A run passes when
- RL teaches: greedy held-out accuracy on the trained levels (their mean) after RL is at
  least 10 points above both the model RL started from (after the cold start) and the SFT
  control;
- it fits the laptop budget: training (cold start, RL and control) takes at most 30
  minutes.

    python bench/recipe_seeds.py --seeds 0-2 [--experiment smollm2_gym]
        [--out bench_runs/recipe_seeds] [-- extra overrides]

Prints a line per finished run and a final JSON line:
{"runs": [{"seed", "pass", "checks", <summary figures>}], "passed", "total"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_seeds import parse_seeds, train  # noqa: E402

MIN_GAIN = 0.10  # RL over the start and over the control, mean of the trained levels
MAX_TRAIN_SECONDS = 1800.0


def trained_mean(acc: dict, trained: list[str]) -> float:
    return sum(acc[lv] for lv in trained) / len(trained)


def train_seconds(summary: dict) -> float:
    """Cold start, RL and SFT control (evaluations and start-up not counted)."""
    return ((summary.get("sft") or {}).get("seconds") or 0.0) + summary["rl_seconds"] + (
        (summary.get("sft_control_stats") or {}).get("seconds") or 0.0)


def judge(summary: dict) -> tuple[dict[str, bool], dict[str, float]]:
    trained = [str(lv) for lv in summary["trained_levels"]]
    start, after, control = (trained_mean(summary[k], trained)
                             for k in ("eval_before", "eval_after", "sft_control"))
    figures = {"start": start, "after": after, "control": control,
               "train_seconds": train_seconds(summary)}
    # reported beside the bar: every evaluated level, trained or not (what RL costs the
    # levels it does not train shows here)
    every = sorted(summary["eval_after"], key=int)
    for k, key in (("start", "eval_before"), ("after", "eval_after"), ("control", "sft_control")):
        figures[f"all_levels_{k}"] = trained_mean(summary[key], every)
    return {
        "rl_beats_start": after - start >= MIN_GAIN - 1e-9,
        "rl_beats_control": after - control >= MIN_GAIN - 1e-9,
        "within_30_minutes": figures["train_seconds"] <= MAX_TRAIN_SECONDS,
    }, figures


def one(out: Path, experiment: str, seed: int, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    summary = train(out / f"seed{seed}", [f"experiment={experiment}", f"seed={seed}", *extra])
    row = {"seed": seed, "experiment": experiment, "overrides": extra,
           "seconds": round(time.perf_counter() - t0, 1)}
    if "error" in summary:
        return {**row, "pass": False, "error": summary["error"]}
    checks, figures = judge(summary)
    return {**row, "pass": all(checks.values()), "checks": checks,
            **{(k if k.startswith("all_levels") else f"trained_{k}"): round(v, 3)
               for k, v in figures.items() if k != "train_seconds"},
            "trained_levels": summary["trained_levels"],
            "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
            "sft_control": summary["sft_control"],
            "sft_steps": (summary.get("sft") or {}).get("steps"),
            "control_steps": (summary.get("sft_control_stats") or {}).get("steps"),
            "rl_seconds": round(summary["rl_seconds"], 1),
            "train_seconds": round(figures["train_seconds"], 1),
            "wall_seconds": round(summary["wall_seconds"], 1),
            "collapse": summary.get("collapse")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-2")
    ap.add_argument("--experiment", default="smollm2_gym")
    ap.add_argument("--out", default="bench_runs/recipe_seeds")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    runs = []
    for seed in parse_seeds(args.seeds):
        row = one(Path(args.out), args.experiment, seed, list(args.overrides))
        print(json.dumps({k: row.get(k) for k in (
            "seed", "pass", "checks", "trained_start", "trained_after", "trained_control",
            "train_seconds", "error")}), flush=True)
        runs.append(row)
    print(json.dumps({"runs": runs, "passed": sum(r["pass"] for r in runs),
                      "total": len(runs)}))


if __name__ == "__main__":
    main()
