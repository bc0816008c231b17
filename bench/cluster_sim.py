"""Cluster simulation of RL rollouts: synchronous vs partial rollouts (SPEC.md section 4).

Discrete-time model of the scheduling kimi-rl implements (kimi_rl/rollout/partial.py,
TorchEngine._run), iteration n:
  1. the batch has N = problems_per_iteration * k slots; F trajectories are kept in flight
     (F = N, 2N with refill): floor((F - unfinished) / k) new problems with k fresh
     trajectories each join the unfinished ones (started or not);
  2. requests: continuations (tokens so far > 0), then trajectories not started yet, oldest
     group first; each may generate min(budget, target - tokens so far) tokens (targets are
     clipped to the cap); sync is budget = cap without refill;
  3. the first min(requests, N) are sorted by prompt+tokens-so-far (what the trainer knows;
     not the remaining length) and dealt round robin over W workers of S slots (W*S >= N,
     = N with refill: the engine's max_running; no waves). A worker prefills them (prompt
     plus tokens so far: no KV cache kept between iterations), then decodes in lock step.
     Without refill that is every request; the rollout lasts until the longest ends. With
     refill the rest wait in one shared in-order queue: once max(1, S/8) of a worker's rows
     are free (REFILL_FRACTION) at decode step t, it takes the next queued requests
     (workers in order of t, ties by index: decode steps, not wall clock), prefills them in
     one batch (its running rows stall) and decodes them from t on. After `budget` steps
     the call ends: a request started at t got at most budget - t tokens; rows cut are
     parked (finished if at their target); requests not started stay queued, with no
     tokens and no segment. Rollout time = max over workers;
  4. a group trains once all k members finished; with max_staleness s a token generated at
     iteration m is in the loss at iteration n only if n - m <= s; with max_trajectory_age a
     trajectory whose first segment is more than that many iterations old is dropped and
     regenerated from scratch (fresh length draw for the same problem, not started yet);
  5. iteration time = rollout + train + weight_sync (rollout and training alternate).

Rollout replicas (`placement`, `replica_scaling`): the workers as rollout replicas, each
with its own queue, the iteration's groups split by the naive contiguous split or by the
balanced rule of kimi_rl/rollout/assign.py (expected cost `expected_cost`: the context's
prefill plus the expected new tokens, the remaining budget for a continuation, for a new
trajectory the mean finished length so far (the model has no per-problem history), each
new token also paying for its KV-cache reads, at REPLICA_CONTEXT_SCALE; continuations stay
home within REPLICA_MARGIN). replica_scaling: rollout throughput (generated tokens per
rollout second) of W replicas relative to W x one replica with 1/W of the batch. Measured
with the defaults (64 x 32 slots), workload seeds 0/1/2: partial with refill (budget
12288) balanced 0.92/0.90/0.93, naive 0.62/0.60/0.62; without refill (4096) balanced
0.96/0.90/0.97, naive 0.56/0.53/0.57. Both parts of the rule matter (seed 0, refill):
costs by tokens only with the former 0.25 margin 0.87; by tokens, margin 0.1: 0.86; by
reads, margin 0.25: 0.88; margin 0 (never sticky): 0.94. Staying home saves nothing here
(no cache outlives the iteration's weight update) and a home loaded to 1.25x the balanced
load sets the rollout time; counting tokens only puts the 32K continuations, whose decode
steps read the longest caches, together.

Cost model (defaults; assumptions for a ~7B GQA model, e.g. Qwen2.5-7B, one H100 per worker):
  step_base = 10 ms           one decode step reads the 15 GB of bf16 weights (~5 ms at
                              ~3 TB/s) plus launch/sampling/scheduler overhead.
  step_per_seq = 0.05 ms      per-sequence matmul/sampling work (14 GFLOP/token).
  step_per_ctx_token = 23 ns  KV-cache reads: 57 KB of K/V per context token (28 layers x
                              4 KV heads x 128 x 2 x bf16) at ~2.5 TB/s, per active sequence;
                              a step costs base + sum over active seqs of (per_seq + ctx * this).
  slots S = 32                80 GB - 15 GB weights ~ 1M KV tokens = 32 sequences of 32K.
  prefill 15k tokens/s        ~50% MFU on 14 GFLOP/token plus long-context attention; linear.
  train 5k tokens/s per GPU   6N FLOPs + attention at 32K, recomputation and the logp_ref
                              forward, ~40% MFU; hybrid deployment: the W rollout GPUs train.
                              Masked (stale) tokens still cost training compute.
  weight_sync = 5 s           push 15 GB of weights to the engines / switch modes.
Response lengths (LengthModel): per problem a median m = 6000 * exp(0.7 z), per sample
L = m * exp(0.5 z'), rounded, >= 32; total log-sd 0.86: p50 ~6K, p90 ~18K, ~2.5% reach the
32K cap (truncated). Same problems, same draws, for every mode (pre-drawn pool).

Metrics, over iterations [warmup, iterations) (the buffer needs a few iterations to fill):
  throughput       response tokens in the loss per second of iteration time;
  idle_fraction    1 - sum_workers used slot-seconds / (W * S * rollout_time), summed over the
                   window's iterations; a slot is used while it holds a sequence that is being
                   prefilled (the whole prefill batch) or decoded (integral of active
                   sequences dt). Workers waiting for the slowest one are idle.
  segments_per_trajectory (finished in window), buffer_size (unfinished at iteration start),
  queued (not started at its end), refills_per_iteration (segments started after step 0),
  masked_fraction (trained tokens left out of the loss by max_staleness).

Measured with the defaults (64 x 32 slots, k=8, cap 32K, 60 iterations; speedup over sync,
mean of seeds 0-3, each within +-0.03; sync idle 0.75):
  budget           2K    4K    8K   12K   16K
  no refill      1.58  1.76  1.74  1.60  1.45   idle 0.12 0.21 0.36 0.48 0.57
  refill         1.62  1.91  2.08  2.11  2.04   idle 0.07 0.08 0.09 0.13 0.22
Without refill the plateau is 4K-6K (default 4096); with refill 10K-12K (2.10-2.14 at 10K,
2.07-2.10 at 14K; default 12288): past ~10K the 2N trajectories in flight no longer fill the
window (queued 235 at 8K, 0 at 12K) and idle rises. With max_staleness=2 (seeds 0-1) a
group's early segments wait for its longest member: refill 1.61-1.65 at 8K (22% of tokens
masked), 2.03-2.06 at 12K (3.5%); no refill 0.79 at 4K (55%), 1.44 at 8K (17%). The 2.5x
target is not reached: the per-token KV-read cost and the re-prefill of continuations are not
amortised by full batches, and training and weight sync are not sped up.
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from kimi_rl.config import RolloutConfig
from kimi_rl.rollout.assign import GroupCost, assign, expected_cost

UNFINISHED, FINISHED, DROPPED = 1, 2, 3
# how requests reach the workers: "sorted" (the idealised scheduler above: by context,
# round robin, one shared queue) or as rollout replicas, each with its own queue
# (kimi_rl/rollout/replicas.py): "contiguous" (equal numbers of consecutive groups, the
# naive split) or "balanced" (kimi_rl/rollout/assign.py: whole groups, longest expected
# cost first onto the least-loaded replica, continuations sticky within REPLICA_MARGIN)
PLACEMENTS = ("sorted", "contiguous", "balanced")
REPLICA_MARGIN = RolloutConfig.replica_margin
# (this cost model's own ratio, step_per_seq / step_per_ctx_token, is 2174)
REPLICA_CONTEXT_SCALE = RolloutConfig.replica_context_scale
REFILL_FRACTION = 0.125  # as kimi_rl/rollout/torch_engine.py: free rows that trigger a refill
BUDGET, BUDGET_NO_REFILL = 12288, 4096  # measured, see the module docstring


@dataclass(frozen=True)
class CostModel:
    step_base: float = 0.010
    step_per_seq: float = 5e-5
    step_per_ctx_token: float = 2.3e-8
    prefill_tokens_per_s: float = 15_000.0
    train_tokens_per_s_per_worker: float = 5_000.0
    weight_sync: float = 5.0


@dataclass(frozen=True)
class LengthModel:
    """Long-tailed response lengths, correlated within a problem (lognormal x lognormal)."""

    median: float = 6000.0
    sigma_problem: float = 0.7
    sigma_sample: float = 0.5
    min_len: int = 32

    def problem_medians(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.median * np.exp(self.sigma_problem * rng.standard_normal(n))

    def samples(self, rng: np.random.Generator, medians: np.ndarray, k: int) -> np.ndarray:
        noise = np.exp(self.sigma_sample * rng.standard_normal((len(medians), k)))
        return np.maximum(self.min_len, np.rint(medians[:, None] * noise)).astype(np.int64)


@dataclass(frozen=True)
class Workload:
    workers: int = 64
    slots: int = 32
    k: int = 8
    problems_per_iteration: int = 256  # N = 2048 = W * S
    prompt_len: int = 300
    cap: int = 32768
    iterations: int = 60
    warmup: int = 10
    seed: int = 0
    lengths: LengthModel = field(default_factory=LengthModel)


def draw_problems(work: Workload) -> tuple[np.ndarray, np.ndarray]:
    """The problem pool, identical for every mode: medians [P] and raw lengths [P, k], with
    P = 2 x iterations x problems_per_iteration (refill takes up to 2N trajectories a turn)."""
    rng = np.random.default_rng(work.seed)
    medians = work.lengths.problem_medians(rng, 2 * work.iterations
                                           * work.problems_per_iteration)
    return medians, work.lengths.samples(rng, medians, work.k)


def length_stats(work: Workload) -> dict:
    lengths = np.minimum(draw_problems(work)[1], work.cap)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    return dict(p50=float(p50), p90=float(p90), p99=float(p99), mean=float(lengths.mean()),
                truncated_share=float((lengths >= work.cap).mean()))


def schedule(limit: np.ndarray, first_worker: np.ndarray, window: int | None, workers: int,
             slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(worker, start step, tokens decoded) of each request; -1, -1, 0 if it never started.

    Requests [0, len(first_worker)) start at step 0 on first_worker. With a window (refill)
    the rest wait in one shared in-order queue: a worker whose rows end at step t < window
    takes the next requests once max(1, S/8) of its S rows are free, in order of t (ties:
    lower worker first); a request started at step t decodes min(limit, window - t).
    """
    n, n0 = len(limit), len(first_worker)
    worker, t0, gen = np.full(n, -1), np.full(n, -1), np.zeros(n, np.int64)
    worker[:n0], t0[:n0], gen[:n0] = first_worker, 0, limit[:n0]
    if window is None:
        assert n0 == n, "no refill: every request starts at once"
        return worker, t0, gen
    running = np.bincount(first_worker, minlength=workers)
    heap = [(e, w) for e, w in zip(gen[:n0].tolist(), first_worker.tolist(), strict=True)
            if e < window]
    heapq.heapify(heap)
    refill_at, q = max(1, int(slots * REFILL_FRACTION)), n0
    while heap and q < n:
        t, w = heapq.heappop(heap)
        running[w] -= 1
        free = slots - running[w]
        if free < refill_at or (heap and heap[0] == (t, w)):  # (more of w's rows end at t)
            continue
        new = slice(q, min(q + free, n))
        q = new.stop
        worker[new], t0[new] = w, t
        gen[new] = np.minimum(limit[new], window - t)
        running[w] += len(gen[new])
        for e in (t + gen[new]).tolist():
            if e < window:
                heapq.heappush(heap, (e, w))
    return worker, t0, gen


def replica_plan(placement: str, group: np.ndarray, cost: np.ndarray, home: np.ndarray,
                 workers: int) -> np.ndarray:
    """The replica of each request (requests of one group are consecutive or not; a group
    stays whole): `cost` per request, `home` the worker of its last segment (-1: none)."""
    keys = list(dict.fromkeys(group.tolist()))
    if placement == "contiguous":
        per = {g: w for w, share in enumerate(np.array_split(np.array(keys), workers))
               for g in share.tolist()}
    else:
        total = dict.fromkeys(keys, 0.0)
        start: dict[int, int | None] = dict.fromkeys(keys)
        for g, c, h in zip(group.tolist(), cost.tolist(), home.tolist(), strict=True):
            total[g] += c
            if h >= 0 and start[g] is None:
                start[g] = h
        plan = assign([GroupCost(g, total[g], start[g]) for g in keys], workers, REPLICA_MARGIN)
        per = {g: w for w, share in enumerate(plan) for g in share}
    return np.array([per[g] for g in group.tolist()], np.int64)


def replica_schedule(limit: np.ndarray, replica: np.ndarray, window: int | None, workers: int,
                     slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`schedule` per replica, on its own requests and queue: (worker, start step, tokens
    decoded) of each request. Without a window a replica with more requests than slots
    starts the rest as rows end (the engine's continuous batching), none cut."""
    n = len(limit)
    worker, t0, gen = np.full(n, -1), np.full(n, -1), np.zeros(n, np.int64)
    for w in range(workers):
        idx = np.flatnonzero(replica == w)
        if not len(idx):
            continue
        n0 = min(len(idx), slots)
        win = window if window is not None or n0 == len(idx) else int(limit.max()) + 1
        wk, s, g = schedule(limit[idx], np.zeros(n0, np.int64), win, 1, slots)
        worker[idx], t0[idx], gen[idx] = np.where(wk >= 0, w, -1), s, g
    return worker, t0, gen


def rollout(gen: np.ndarray, ctx: np.ndarray, worker: np.ndarray, workers: int, slots: int,
            cost: CostModel, t0: np.ndarray | None = None) -> tuple[float, float]:
    """(rollout time, used slot-seconds) of one iteration, analytically per worker.

    Segment i decodes gen[i] tokens on worker[i] at steps [t0[i], t0[i] + gen[i]) (t0
    default 0), context ctx[i] + t - t0[i] (ctx = prompt + tokens so far). The segments a
    worker starts at a step are prefilled in one batch first; every sequence it holds at that
    step counts as used meanwhile. active[w, t] etc. from cumulative start - end counts.
    """
    t0 = np.zeros_like(gen) if t0 is None else t0
    steps = int((t0 + gen).max())
    shape, size = (workers, steps + 1), workers * (steps + 1)
    first, last = worker * (steps + 1) + t0, worker * (steps + 1) + t0 + gen

    def per_step(weights: np.ndarray | None) -> np.ndarray:
        starts = np.bincount(first, weights=weights, minlength=size)
        return np.cumsum((starts - np.bincount(last, weights=weights, minlength=size))
                         .reshape(shape), axis=1)[:, :steps]

    active, ctx_active = per_step(None), per_step((ctx - t0).astype(np.float64))
    assert 0 <= active.min() and active.max() <= slots
    t = np.arange(steps)
    step = ((active > 0) * cost.step_base + active * cost.step_per_seq
            + cost.step_per_ctx_token * (ctx_active + t * active))
    prefill = np.bincount(first, weights=ctx, minlength=size).reshape(shape)[:, :steps]
    prefill /= cost.prefill_tokens_per_s
    busy = prefill.sum(axis=1) + step.sum(axis=1)
    return float(busy.max()), float((active * (prefill + step)).sum())


def simulate(work: Workload, cost: CostModel, budget: int, max_staleness: int | None = None,
             max_trajectory_age: int | None = None, refill: bool = True,
             record: bool = False, placement: str = "sorted") -> dict:
    """One mode (sync: budget >= cap, refill=False): metrics, plus 'records' if record.
    `placement`: see PLACEMENTS."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement: unknown {placement!r} (choose from {PLACEMENTS})")
    k, n_slots, iters = work.k, work.problems_per_iteration * work.k, work.iterations
    W, S = work.workers, work.slots
    assert W * S == n_slots if refill else W * S >= n_slots, \
        "W*S must hold the batch (no waves); with refill W*S = N (the engine's max_running)"
    in_flight = n_slots * (2 if refill else 1)
    medians, pool = draw_problems(work)
    regen_rng = np.random.default_rng([work.seed, 1])
    size = iters * in_flight  # at most in_flight new trajectories (segments) per iteration
    group, target, truncated = (np.zeros(size, np.int64) for _ in range(3))
    tokens, start, status, segments, finish = (np.zeros(size, np.int64) for _ in range(5))
    start[:], finish[:] = -1, -1  # start: iteration of the first segment
    pending = np.zeros(len(medians), np.int64)  # unfinished members per problem
    trained_at = np.full(len(medians), -1)
    seg = {key: np.zeros(size, np.int64) for key in ("traj", "iter", "tokens", "worker", "step")}
    last_worker = np.full(size, -1)  # worker of each trajectory's latest segment
    n_traj = n_seg = n_problems = 0
    it = {key: np.zeros(iters) for key in ("rollout", "train", "time", "used", "trained", "loss",
                                           "buffer", "requests", "queued", "refills",
                                           "generated")}

    def add(groups: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        nonlocal n_traj
        idx = np.arange(n_traj, n_traj + len(groups))
        group[idx], target[idx] = groups, np.minimum(lengths, work.cap)
        truncated[idx], status[idx] = lengths >= work.cap, UNFINISHED
        n_traj += len(groups)
        return idx

    for n in range(iters):
        buffered = np.flatnonzero(status[:n_traj] == UNFINISHED)
        if max_trajectory_age is not None:
            old = buffered[(segments[buffered] > 0)
                           & (n - start[buffered] > max_trajectory_age)]
            status[old] = DROPPED
            redraw = work.lengths.samples(regen_rng, medians[group[old]], 1)[:, 0]
            buffered = np.concatenate([buffered[~np.isin(buffered, old)],
                                       add(group[old], redraw)])
        it["buffer"][n] = len(buffered)
        new_problems = (in_flight - len(buffered)) // k
        groups = np.arange(n_problems, n_problems + new_problems)
        pending[groups] = k
        req = np.concatenate([buffered, add(np.repeat(groups, k), pool[groups].ravel())])
        n_problems += new_problems
        # continuations first, then trajectories not started yet; oldest group first
        req = req[np.lexsort((req, group[req], tokens[req] == 0))]
        it["requests"][n] = len(req)

        limit = np.minimum(budget, target[req] - tokens[req])
        ctx = work.prompt_len + tokens[req]
        if placement == "sorted":
            n0 = min(len(req), n_slots)
            first_worker = np.empty(n0, np.int64)
            first_worker[np.argsort(-ctx[:n0], kind="stable")] = np.arange(n0) % W
            worker, t0, gen = schedule(limit, first_worker, budget if refill else None, W, S)
        else:  # expected new tokens of a new trajectory: the mean finished length so far
            done_so_far = target[:n_traj][status[:n_traj] == FINISHED]
            mean = done_so_far.mean() if len(done_so_far) else np.inf
            expect = np.where(tokens[req] > 0, limit, np.minimum(limit, mean))
            cost_of = np.vectorize(expected_cost)(ctx, expect, REPLICA_CONTEXT_SCALE)
            replica = replica_plan(placement, group[req], cost_of, last_worker[req], W)
            worker, t0, gen = replica_schedule(limit, replica, budget if refill else None, W,
                                               S)
        on = t0 >= 0
        run = req[on]
        it["rollout"][n], it["used"][n] = rollout(gen[on], ctx[on], worker[on], W, S, cost,
                                                  t0[on])
        it["queued"][n], it["refills"][n] = (~on).sum(), (t0 > 0).sum()
        new_seg = slice(n_seg, n_seg + len(run))
        for key, v in (("traj", run), ("iter", n), ("tokens", gen[on]),
                       ("worker", worker[on]), ("step", t0[on])):
            seg[key][new_seg] = v
        n_seg += len(run)
        last_worker[run] = worker[on]
        it["generated"][n] = gen[on].sum()
        start[run[segments[run] == 0]] = n
        tokens[run] += gen[on]
        segments[run] += 1

        done = run[tokens[run] == target[run]]
        status[done], finish[done] = FINISHED, n
        np.subtract.at(pending, group[done], 1)
        complete = np.unique(group[done])
        trained_at[complete[pending[complete] == 0]] = n
        members = (trained_at[group[:n_traj]] == n) & (status[:n_traj] == FINISHED)
        in_loss = members[seg["traj"][:n_seg]]
        if max_staleness is not None:
            in_loss &= n - seg["iter"][:n_seg] <= max_staleness
        it["trained"][n] = target[:n_traj][members].sum()
        it["loss"][n] = seg["tokens"][:n_seg][in_loss].sum()
        train_tokens = it["trained"][n] + work.prompt_len * members.sum()
        it["train"][n] = train_tokens / (cost.train_tokens_per_s_per_worker * W)
        it["time"][n] = it["rollout"][n] + it["train"][n] + cost.weight_sync

    w = slice(work.warmup, iters)
    total = it["time"][w].sum()
    finished_in_window = (finish[:n_traj] >= work.warmup)
    out = dict(
        budget=budget, refill=refill, max_staleness=max_staleness,
        max_trajectory_age=max_trajectory_age, placement=placement,
        throughput=float(it["loss"][w].sum() / total),
        # generated tokens per second of rollout time
        rollout_throughput=float(it["generated"][w].sum() / it["rollout"][w].sum()),
        throughput_all_tokens=float(it["trained"][w].sum() / total),
        idle_fraction=float(1 - it["used"][w].sum() / (W * S * it["rollout"][w].sum())),
        rollout_share=float(it["rollout"][w].sum() / total),
        masked_fraction=float(1 - it["loss"][w].sum() / max(it["trained"][w].sum(), 1)),
        mean_iteration_s=float(it["time"][w].mean()),
        mean_rollout_s=float(it["rollout"][w].mean()),
        segments_per_trajectory=float(segments[:n_traj][finished_in_window].mean()),
        buffer_size=float(it["buffer"][w].mean()), queued=float(it["queued"][w].mean()),
        refills_per_iteration=float(it["refills"][w].mean()),
        dropped_trajectories=int((status[:n_traj] == DROPPED).sum()),
    )
    if record:
        per_traj = dict(group=group, target=target, truncated=truncated, status=status,
                        start=start, finish=finish, tokens=tokens, segments=segments)
        out["records"] = dict(
            trained_at=trained_at[:n_problems], **{key: v[:n_traj] for key, v in per_traj.items()},
            **{"seg_" + key: v[:n_seg] for key, v in seg.items()},
            per_iteration={key: v.copy() for key, v in it.items()})
    return out


def compare(work: Workload | None = None, cost: CostModel | None = None, budget: int = BUDGET,
            max_staleness: int | None = None, max_trajectory_age: int | None = None,
            budget_no_refill: int = BUDGET_NO_REFILL) -> dict:
    """Sync (budget = cap) vs partial rollouts with refill (`budget`) and without
    (`budget_no_refill`), on the same problems and lengths."""
    work, cost = work or Workload(), cost or CostModel()
    sync = simulate(work, cost, work.cap, refill=False)
    partial = simulate(work, cost, budget, max_staleness, max_trajectory_age)
    no_refill = simulate(work, cost, budget_no_refill, max_staleness, max_trajectory_age,
                         refill=False)
    return dict(
        simulated_speedup=partial["throughput"] / sync["throughput"],
        simulated_speedup_no_refill=no_refill["throughput"] / sync["throughput"],
        throughput_sync=sync["throughput"], throughput_partial=partial["throughput"],
        throughput_partial_no_refill=no_refill["throughput"],
        idle_fraction_sync=sync["idle_fraction"], idle_fraction_partial=partial["idle_fraction"],
        idle_fraction_partial_no_refill=no_refill["idle_fraction"],
        budget=budget, budget_no_refill=budget_no_refill, cap=work.cap,
        max_staleness=max_staleness, max_trajectory_age=max_trajectory_age,
        lengths=length_stats(work), cost_model=asdict(cost), workload=asdict(work),
        sync=sync, partial=partial, partial_no_refill=no_refill)


def replica_scaling(work: Workload, cost: CostModel, budget: int, refill: bool) -> dict:
    """Rollout throughput (generated tokens per rollout second) of `work.workers` replicas
    sharing the batch, relative to workers x that of one replica with its 1/workers share
    of the batch (the same slots): 1.0 is linear scaling. For the naive contiguous split
    and the balanced rule; sync is budget >= cap, refill=False."""
    if work.problems_per_iteration % work.workers:
        raise ValueError(f"problems_per_iteration {work.problems_per_iteration} must be a "
                         f"multiple of workers {work.workers}")
    one = replace(work, workers=1, problems_per_iteration=work.problems_per_iteration
                  // work.workers)
    base = simulate(one, cost, budget, refill=refill, placement="contiguous")
    linear = work.workers * base["rollout_throughput"]
    return {p: simulate(work, cost, budget, refill=refill, placement=rule)
            ["rollout_throughput"] / linear
            for p, rule in (("balanced", "balanced"), ("naive", "contiguous"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    w, c, lm = Workload(), CostModel(), LengthModel()
    p.add_argument("--budget", type=int, default=BUDGET, help="partial rollouts with refill")
    p.add_argument("--budget-no-refill", type=int, default=BUDGET_NO_REFILL)
    p.add_argument("--max-staleness", type=int, default=None)
    p.add_argument("--max-trajectory-age", type=int, default=None)
    for name, default in [*asdict(w).items(), *asdict(c).items(), *asdict(lm).items()]:
        if name != "lengths":
            p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    a = vars(p.parse_args(argv))
    lengths = LengthModel(**{f: a[f] for f in asdict(lm)})
    work = replace(w, lengths=lengths, **{f: a[f] for f in asdict(w) if f != "lengths"})
    cost = CostModel(**{f: a[f] for f in asdict(c)})
    print(json.dumps(compare(work, cost, a["budget"], a["max_staleness"],
                             a["max_trajectory_age"], a["budget_no_refill"])))


if __name__ == "__main__":
    main()
