"""Partial rollouts vs synchronous rollouts: the real loop on this machine, and a cluster
simulation (bench/cluster_sim.py) at 32K tokens.

Measured part: `kimi_rl.loop.train` with the built-in torch engine and a tiny random-init
Llama (the demo's size) on the built-in task. A random model's next token is close to
uniform over the 44-symbol vocabulary, so a response ends with probability ~1/44 per token:
lengths are geometric, most short (median ~35 tokens), a few percent reaching the cap (160).
Both runs have the same batch (problems_per_iteration x group_size = 32 trajectory slots),
cap, model and training; only rollout.partial differs (budget 32 tokens, refill on, every
segment trained so both count the same tokens). Rounds alternate the two runs (seeds 0, 1,
...) because this machine's speed drifts by tens of percent between runs.

    measured_speedup = steady-state trained response tokens per second, with / without

Steady state: the loop's own time per iteration (rollout, reward, optimizer steps, weight
sync) and the tokens trained in it, over the iterations after the first fifth (the buffer
fills first; work left in the buffer at the end is not held against the partial run).
`measured_speedup_whole_run` counts every iteration instead.

Why the figure on a CPU is small (measured 2026-11-21, see the README): a decode step of
32 sequences costs ~1.8x one of a single sequence here (decoding is compute-bound), so the
idle slots of the synchronous long tail are cheap, while every continuation's context must
be prefilled again under the new weights (~35 us per token, against ~150 us per decoded
token: on a GPU the ratio is ~100x, not ~4x). The simulation models GPU costs.

Prints a progress line per run and a final JSON line.

    python bench/partial_rollouts.py [--rounds 3] [--cap 160 --budget 32] [--quick]

--quick: one round of 2 and 5 iterations, and 20 simulated iterations instead of 60.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import hydra
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster_sim  # noqa: E402

from kimi_rl.config import register_configs  # noqa: E402
from kimi_rl.loop import train  # noqa: E402

PROBLEMS, GROUP = 8, 4
WORKLOAD = [
    "sft.enabled=false", "sft.control=false", "eval.before=false", "eval.after=false",
    "eval.at_warmup_end=false", "progress=false", "num_threads=2", "curriculum=all_levels",
    "curriculum.stages=[{start:0}]", "reward.length_penalty_weight=0.0",
    f"rollout.problems_per_iteration={PROBLEMS}", f"rollout.group_size={GROUP}",
    "log_samples=0",
]


SYNC = ["rollout.partial.enabled=false"]


def partial_overrides(cap: int, budget: int, refill: bool = True) -> list[str]:
    return ["rollout.partial.enabled=true", f"rollout.partial.budget={budget}",
            "rollout.partial.loss_segments=all", f"rollout.partial.refill={refill}",
            f"rollout.partial.max_trajectory_age={-(-cap // budget) + 2}"]


def compose(overrides: list[str]):
    register_configs()
    with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return hydra.compose("train", overrides=overrides)


def scalars(run_dir: Path) -> dict[str, list[float]]:
    """tag -> values by iteration."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in sorted(acc.Scalars(t), key=lambda e: e.step)]
            for t in acc.Tags()["scalars"]}


MEANS = ["response_length/mean", "response_length/p90", "rollout/truncated_fraction",
         "rollout/idle_fraction", "time/rollout", "time/train", "time/iteration",
         "partial/segments_per_trajectory", "partial/buffer_size", "partial/masked_fraction"]
TOTALS = ["iterations", "rl_seconds", "trained_tokens", "generated_tokens", "steady_seconds",
          "steady_trained_tokens"]


def run(name: str, overrides: list[str], iterations: int) -> dict:
    """One training run in a temporary directory: totals, steady-state totals (iterations
    after the first fifth: the replay buffer has filled, and work left in it at the end
    does not count against the run) and mean scalars."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(compose(WORKLOAD + overrides + [
            f"iterations={iterations}", f"checkpoint_every={iterations}"]), tmp)
        s = scalars(Path(tmp))
    skip = max(1, iterations // 5)
    out = {
        "iterations": iterations, "rl_seconds": summary["rl_seconds"],
        "trained_tokens": summary["trained_tokens"],
        "generated_tokens": summary["generated_tokens"],
        "steady_seconds": sum(s["time/iteration"][skip:]),
        "steady_trained_tokens": sum(s["partial/trained_tokens"][skip:]),
        **{k.replace("/", "_"): float(np.mean(s[k])) for k in MEANS if k in s},
    }
    rate = out["steady_trained_tokens"] / out["steady_seconds"]
    print(f"{name}: {out['trained_tokens']} trained tokens in {out['rl_seconds']:.1f} s, "
          f"steady state {rate:.0f}/s, idle fraction {out.get('rollout_idle_fraction', 0):.2f}, "
          f"wall {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def combine(runs: list[dict]) -> dict:
    """Totals over rounds, scalar means averaged over rounds, and the rates."""
    out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if k not in TOTALS}
    for k in TOTALS:
        out[k] = sum(r[k] for r in runs)
    out["trained_tokens_per_s"] = rate(out)
    out["trained_tokens_per_s_whole_run"] = out["trained_tokens"] / out["rl_seconds"]
    return out


def rate(r: dict) -> float:
    return r["steady_trained_tokens"] / r["steady_seconds"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating synchronous / partial runs (machine noise)")
    ap.add_argument("--iterations-sync", type=int, default=8, help="per round")
    ap.add_argument("--iterations-partial", type=int, default=0,
                    help="per round; default: iterations-sync * cap / budget / 2")
    ap.add_argument("--cap", type=int, default=160, help="max response length")
    ap.add_argument("--budget", type=int, default=32, help="partial: tokens per iteration")
    ap.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    ap.add_argument("overrides", nargs="*", help="more config overrides, for both runs")
    args = ap.parse_args(argv)
    rounds, n_sync = (1, 2) if args.quick else (args.rounds, args.iterations_sync)
    cap, budget = args.cap, args.budget
    n_partial = args.iterations_partial or max(2, n_sync * cap // budget // 2)
    common = [f"rollout.max_new_tokens={cap}", *args.overrides]
    syncs, partials = [], []
    for r in range(rounds):
        syncs.append(run(f"round {r + 1}/{rounds} synchronous",
                         SYNC + common + [f"seed={r}"], n_sync))
        partials.append(run(f"round {r + 1}/{rounds} partial",
                            partial_overrides(cap, budget) + common + [f"seed={r}"], n_partial))
    sync, partial = combine(syncs), combine(partials)
    # --quick: a shorter simulated run (the smoke test checks the wiring, not the figure)
    sim = cluster_sim.compare(cluster_sim.Workload(iterations=20, warmup=5) if args.quick
                              else None)
    result = {
        "workload": {"problems_per_iteration": PROBLEMS, "group_size": GROUP, "cap": cap,
                     "budget": budget, "model": "tiny random-init llama (demo size)",
                     "response_length_mean": sync.get("response_length_mean"),
                     "truncated_fraction": sync.get("rollout_truncated_fraction")},
        "sync": sync, "partial": partial,
        "measured_speedup": partial["trained_tokens_per_s"] / sync["trained_tokens_per_s"],
        "measured_speedup_by_round": [rate(p) / rate(q)
                                      for p, q in zip(partials, syncs, strict=True)],
        "measured_speedup_whole_run": (partial["trained_tokens_per_s_whole_run"]
                                       / sync["trained_tokens_per_s_whole_run"]),
        "idle_fraction_measured_sync": sync.get("rollout_idle_fraction"),
        "idle_fraction_measured_partial": partial.get("rollout_idle_fraction"),
        "simulated_speedup_32k": sim["simulated_speedup"],
        "idle_fraction_sync": sim["idle_fraction_sync"],
        "idle_fraction_partial": sim["idle_fraction_partial"],
        "simulated_speedup_32k_no_refill": sim["simulated_speedup_no_refill"],
        "idle_fraction_partial_no_refill": sim["idle_fraction_partial_no_refill"],
        "simulation": {k: v for k, v in sim.items()
                       if k not in ("sync", "partial", "partial_no_refill")},
    }
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
