"""The demo over seeds and float-rounding perturbations, each with the length penalty off
as the causal comparison, judged against the demo's bars.

For each seed and perturbation, two runs of `kimi-rl train` (the real CLI, one process each):
- `on`: the demo as `make demo` runs it (SFT cold start, RL, SFT control);
- `off`: the same with `reward.length_penalty_weight=0`, starting from the `on` run's SFT
  start (`sft.from_run`), so the two arms differ only in the penalty.

A run passes when (hardest = the highest trained level):
- RL beats imitation: on the hardest level, held-out accuracy after RL exceeds both the SFT
  start and the SFT control by at least 10 points;
- the penalty shortens: the mean length of correct held-out responses at the end is at
  most 0.8x the `off` arm's, with accuracy on every trained level at most 3 points below
  the `off` arm's;
- the penalty costs nothing: no trained level loses more than 3 points after the warmup;
- the `on` run's training (SFT, RL and control) takes at most 10 minutes.

`--sft-from DIR` reuses the SFT starts of an earlier output directory of this script
(DIR/seed<N>-<perturbation>/on): the `on` arm loads it (`sft.from_run`) instead of training
its own, and its SFT control is time-matched by the source's cold-start step time. A
change that touches only RL is then judged over seeds in a fraction of the time; the
10-minute check counts the source's cold-start seconds.

Perturbations (each moves float rounding only): `none`; `threads1` (num_threads=1);
`microbatch` (backend.micro_batch_tokens=1024: the packed rows split differently);
`bf16` (bfloat16 autocast in the trainer and a bfloat16 rollout engine).

    python bench/demo_seeds.py --seeds 0-9 [--perturbations none,threads1] [--jobs 2]
        [--out bench_runs/demo_seeds] [--sft-from DIR] [-- extra overrides]

--jobs 2 runs two seeds at once with one thread each (num_threads=1 is then part of every
run, and its row says so). Prints a line per finished run and a final JSON line:
{"runs": [{"seed", "perturbation", "pass", "checks", <summary figures>}], "passed", "total"}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PERTURBATIONS = {
    "none": [],
    "threads1": ["num_threads=1"],
    "microbatch": ["backend.micro_batch_tokens=1024"],
    "bf16": ["backend.autocast=bfloat16", "rollout.dtype=bfloat16"],
}
MIN_GAIN = 0.10  # RL over the SFT start and the control, hardest level
MAX_LENGTH_RATIO = 0.8  # correct-response length, penalty on / off
MAX_ACCURACY_LOSS = 0.03  # vs the off arm, and after the warmup
MAX_TRAIN_SECONDS = 600.0


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def train(run_dir: Path, overrides: list[str]) -> dict:
    """One `kimi-rl train` process; its summary.json, or {"error": ...}."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kimi_rl.cli", "train", f"run_dir={run_dir}", "progress=false",
           *overrides]
    with open(run_dir / "stdout.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    summary = run_dir / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        return {"error": f"exit {proc.returncode}; see {run_dir / 'stdout.log'}"}
    return json.loads(summary.read_text())


def train_seconds(on: dict) -> float:
    """The `on` run's training time: its own, plus the cold start it loaded, if any."""
    sft = on.get("sft") or {}
    return on["wall_seconds"] + ((sft.get("seconds") or 0.0) if sft.get("from_run") else 0.0)


def judge(on: dict, off: dict) -> dict[str, bool]:
    """The demo's bars (module docstring) for one seed and perturbation."""
    trained = [str(lv) for lv in on["trained_levels"]]
    hard = trained[-1]
    after, off_after = on["eval_after"], off["eval_after"]
    gain = after[hard] - max(on["eval_before"][hard], on["sft_control"][hard])
    len_on, len_off = on["correct_length_final"], off["correct_length_final"]
    change = on["accuracy_change_after_warmup"] or {}
    return {
        "rl_beats_sft": gain >= MIN_GAIN - 1e-9,
        "penalty_shortens": bool(len_on and len_off and len_on <= MAX_LENGTH_RATIO * len_off),
        "accuracy_vs_off": all(after[lv] >= off_after[lv] - MAX_ACCURACY_LOSS - 1e-9
                               for lv in trained),
        "holds_after_warmup": bool(change) and all(
            change[lv] >= -MAX_ACCURACY_LOSS - 1e-9 for lv in trained),
        "within_10_minutes": train_seconds(on) <= MAX_TRAIN_SECONDS,
    }


def one(out: Path, seed: int, perturbation: str, extra: list[str],
        sft_from: Path | None = None) -> dict:
    base = [f"seed={seed}", *PERTURBATIONS[perturbation], *extra]
    d = out / f"seed{seed}-{perturbation}"
    t0 = time.perf_counter()
    # a missing source start fails the run with the loop's own error (in its stdout.log)
    on = train(d / "on", [*base, *([f"sft.from_run={sft_from / d.name / 'on'}"]
                                   if sft_from else [])])
    off = (train(d / "off", [*base, "reward.length_penalty_weight=0", "sft.control=false",
                             f"sft.from_run={d / 'on'}"])
           if "error" not in on else {"error": "not run"})
    row = {"seed": seed, "perturbation": perturbation, "overrides": extra,
           "seconds": round(time.perf_counter() - t0, 1)}
    if "error" in on or "error" in off:
        return {**row, "pass": False, "error": on.get("error") or off.get("error")}
    checks = judge(on, off)
    hard = str(on["trained_levels"][-1])
    row.update({
        "pass": all(checks.values()), "checks": checks,
        "sft_heldout_loss": (on.get("sft") or {}).get("heldout_loss"),
        "eval_before": on["eval_before"], "eval_warmup_end": on["eval_warmup_end"],
        "eval_after": on["eval_after"], "sft_control": on["sft_control"],
        "eval_after_penalty_off": off["eval_after"],
        "hardest_gain_over_best_sft": round(
            on["eval_after"][hard] - max(on["eval_before"][hard], on["sft_control"][hard]), 3),
        "correct_length_at_warmup_end": on["correct_length_at_warmup_end"],
        "correct_length_final": on["correct_length_final"],
        "correct_length_final_penalty_off": off["correct_length_final"],
        "collapse": on.get("collapse"), "collapse_penalty_off": off.get("collapse"),
        "wall_seconds": round(on["wall_seconds"], 1),
        "train_seconds": round(train_seconds(on), 1),
    })
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--perturbations", default="none")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="bench_runs/demo_seeds")
    ap.add_argument("--sft-from", type=Path, default=None,
                    help="an earlier --out directory whose SFT starts the on arms load")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = ap.parse_args()
    perts = args.perturbations.split(",")
    for p in perts:
        if p not in PERTURBATIONS:
            ap.error(f"--perturbations: unknown {p!r} (choose from {list(PERTURBATIONS)})")
    extra = list(args.overrides) + (["num_threads=1"] if args.jobs > 1 else [])
    out = Path(args.out)
    tasks = [(s, p) for p in perts for s in parse_seeds(args.seeds)]

    def task(sp):
        row = one(out, sp[0], sp[1], extra, args.sft_from)
        print(json.dumps({k: row.get(k) for k in ("seed", "perturbation", "pass", "checks",
                                                  "hardest_gain_over_best_sft",
                                                  "correct_length_final",
                                                  "correct_length_final_penalty_off",
                                                  "train_seconds", "error")}), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(task, tasks))
    print(json.dumps({"runs": runs, "passed": sum(r["pass"] for r in runs),
                      "total": len(runs)}))


if __name__ == "__main__":
    main()
