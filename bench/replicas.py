"""Rollout replicas: measured on this machine (2 processes under torchrun) and simulated at
32K tokens on 64 replicas (bench/cluster_sim.py).

Measured part: the rollout step of the loop (kimi_rl/rollout/partial.py with
kimi_rl/rollout/replicas.py) under torchrun, 2 processes with 1 thread each, gloo, the
built-in torch engine on the demo's tiny random-init Llama, the built-in task: the same
iterations with rollout.replicas=1 (every rank generates every request) and with 2 (each
rank its share, then one all-gather). The same problems, weights and keys, so both draw
the same samples (`same_samples`: digests of every finished response compared). The
iteration is the demo's: 32 problems x 8 samples (at 8 problems a replica's decode batch is
32 rows, where a step's fixed cost, not its rows, sets the time: see bench/RESULTS.md). The
policy is not trained (its backend is not what is measured), so the weights stay those of
the random init.

    rollout_time_ratio_2_replicas = mean rollout seconds per iteration, 2 replicas / 1
                                    (the median over --repeats pairs run one after another)

Simulated part: `cluster_sim.replica_scaling` with the default 64 x 32-slot workload and
its 32K long-tailed lengths, partial rollouts with refill (its default budget), without
refill, and synchronous: rollout throughput of 64 replicas relative to 64 x one replica,
balanced rule and naive contiguous split.

    python bench/replicas.py [--quick] [--iterations 6]

Prints a progress line per run and a final JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: the rollout iterations; rank 0 prints a JSON line."""
    import torch

    from kimi_rl import distributed
    from kimi_rl.config import ModelConfig
    from kimi_rl.data import modsum
    from kimi_rl.data.tokenizer import char_tokenizer
    from kimi_rl.policy.model import tiny_model
    from kimi_rl.rollout.engine import SamplingParams
    from kimi_rl.rollout.partial import PartialRollouts
    from kimi_rl.rollout.replicas import Replicas
    from kimi_rl.rollout.torch_engine import TorchEngine

    torch.set_num_threads(1)
    distributed.init_distributed()
    world, rank = distributed.world_size(), distributed.rank()
    tokenizer = char_tokenizer(modsum.vocabulary())
    model = tiny_model(ModelConfig(), tokenizer, seed=0)
    engine = TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)
    problems, _ = modsum.generate([2, 3, 4], 200, 0, seed=0)
    k = 8
    rollouts = PartialRollouts(group_size=k, slots=args.problems * k, seed=0,
                               budget=args.budget or None, refill=False)
    replicas = Replicas(args.replicas, rank, world, gather=distributed.all_gather)
    params = SamplingParams(temperature=1.0)
    times, digest, tokens = [], hashlib.sha256(), 0
    used = 0
    for it in range(args.iterations):
        want = rollouts.new_groups_wanted()
        rollouts.add_groups(problems[used:used + want], tokenizer, it)
        used += want
        distributed.barrier()
        t0 = time.perf_counter()
        done, stats = rollouts.step(engine, it, args.cap, params,
                                    lambda t: tokenizer.decode(t, skip_special_tokens=True),
                                    replicas)
        times.append(time.perf_counter() - t0)
        tokens += stats.generated_tokens
        for s in done:
            digest.update(repr((s.problem.id, s.tokens)).encode())
    steady = times[1:] or times  # the first iteration warms up allocators and caches
    if rank == 0:
        print(json.dumps({"replicas": args.replicas, "rollout_seconds": sum(steady) / len(steady),
                          "generated_tokens": tokens, "samples_digest": digest.hexdigest()}))


def measure(replicas: int, args: argparse.Namespace) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", __file__, "--worker",
           "--replicas", str(replicas), "--iterations", str(args.iterations),
           "--problems", str(args.problems), "--cap", str(args.cap), "--budget", str(args.budget)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"replicas={replicas}: {result['rollout_seconds']:.2f} s per iteration", flush=True)
    return result


def simulate() -> dict:
    spec = importlib.util.spec_from_file_location("cluster_sim", ROOT / "bench" / "cluster_sim.py")
    cs = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cluster_sim", cs)
    spec.loader.exec_module(cs)
    work, cost = cs.Workload(), cs.CostModel()
    return {"partial_refill": cs.replica_scaling(work, cost, cs.BUDGET, True),
            "partial_no_refill": cs.replica_scaling(work, cost, cs.BUDGET_NO_REFILL, False),
            "sync": cs.replica_scaling(work, cost, work.cap, False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--problems", type=int, default=32,
                   help="problems per iteration, k = 8 samples each (default: the demo's 32)")
    p.add_argument("--cap", type=int, default=160, help="max response length")
    p.add_argument("--budget", type=int, default=0, help="partial rollouts (0: off)")
    p.add_argument("--repeats", type=int, default=3,
                   help="pairs (1 replica, then 2) measured; the ratio is their median")
    p.add_argument("--quick", action="store_true",
                   help="3 iterations, one pair, no simulation")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.iterations, args.repeats = 3, 1
    if args.repeats < 1:
        p.error(f"--repeats: at least 1, got {args.repeats}")
    # pairs measured one after the other, the median of their ratios: this machine's speed
    # drifts by tens of percent within minutes, more than between the two halves of a pair
    pairs = [(measure(1, args), measure(2, args)) for _ in range(args.repeats)]
    ratios = sorted(two["rollout_seconds"] / one["rollout_seconds"] for one, two in pairs)
    out = {"rollout_time_ratio_2_replicas": ratios[len(ratios) // 2],
           "ratios": ratios,
           "rollout_seconds": [{"1": one["rollout_seconds"], "2": two["rollout_seconds"]}
                               for one, two in pairs],
           "same_samples": all(one["samples_digest"] == two["samples_digest"]
                               for one, two in pairs),
           "iterations": args.iterations, "repeats": args.repeats,
           "problems_per_iteration": args.problems, "cap": args.cap, "budget": args.budget}
    if not args.quick:
        sims = simulate()
        out["simulated_scaling_64"] = sims["partial_refill"]
        out["simulated_scaling_64_all"] = sims
    print(json.dumps(out))


if __name__ == "__main__":
    main()
