"""bench/cluster_sim.py: the partial-rollout scheduling model and its bookkeeping."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import load_bench

cs = load_bench("cluster_sim")

# A small cluster with the same shape of workload: 8 workers x 16 slots, k = 4, cap 8K.
SMALL = cs.Workload(workers=8, slots=16, k=4, problems_per_iteration=32, prompt_len=100,
                    cap=8192, iterations=30, warmup=5,
                    lengths=cs.LengthModel(median=1500.0))
COST = cs.CostModel()
N = SMALL.problems_per_iteration * SMALL.k


def _run(budget: int, **kw) -> dict:
    return cs.simulate(SMALL, COST, budget, record=True, **kw)


def test_budget_at_or_above_cap_is_sync() -> None:
    sync = cs.simulate(SMALL, COST, SMALL.cap, refill=False)
    above = cs.simulate(SMALL, COST, 4 * SMALL.cap, refill=False)
    assert {**above, "budget": SMALL.cap} == sync
    assert sync["segments_per_trajectory"] == 1.0 and sync["buffer_size"] == 0.0
    out = cs.compare(SMALL, COST, budget_no_refill=SMALL.cap)
    assert out["simulated_speedup_no_refill"] == 1.0


def test_refill_budget_at_or_above_cap_is_not_sync() -> None:
    """With refill 2N trajectories are in flight but only N run at once, so a budget >= cap
    is not sync: what starts at step 0 finishes there, what starts later may be cut."""
    rec = _run(SMALL.cap)["records"]
    at_zero = rec["seg_step"] == 0
    traj = rec["seg_traj"]
    assert (rec["tokens"][traj[at_zero]] == rec["target"][traj[at_zero]]).all()
    cut = rec["tokens"][traj] < rec["target"][traj]
    assert cut.any() and (rec["seg_step"][cut] > 0).all()
    assert (rec["per_iteration"]["requests"] > 2 * N - SMALL.k).all()


@pytest.mark.parametrize("budget", [512, 1000, 2048])
def test_segments_span_ceil_length_over_budget(budget: int) -> None:
    rec = _run(budget, refill=False)["records"]
    done = rec["status"] == cs.FINISHED
    expected = np.ceil(rec["target"][done] / budget).astype(int)
    assert done.sum() > 100 and (rec["segments"][done] == expected).all()
    assert rec["target"].max() == SMALL.cap and rec["truncated"].any()
    # one segment per iteration, consecutive, from the start to the finishing iteration
    assert (rec["finish"][done] - rec["start"][done] + 1 == expected).all()
    per_traj = np.bincount(rec["seg_traj"], weights=rec["seg_tokens"], minlength=len(done))
    assert (per_traj[done] == rec["target"][done]).all()
    assert rec["seg_tokens"].max() <= budget


@pytest.mark.parametrize("budget", [512, 2048])
def test_refill_segments_and_token_conservation(budget: int) -> None:
    rec = _run(budget)["records"]
    done, started = rec["status"] == cs.FINISHED, rec["segments"] > 0
    per_traj = np.bincount(rec["seg_traj"], weights=rec["seg_tokens"], minlength=len(done))
    assert (per_traj == rec["tokens"]).all() and (rec["tokens"][done] == rec["target"][done]).all()
    assert (rec["tokens"][~done] < rec["target"][~done]).all()
    assert (rec["seg_tokens"] >= 1).all()
    assert (rec["seg_step"] + rec["seg_tokens"] <= budget).all()  # within the window
    # a started trajectory is continued every iteration, from step 0, until it finishes
    assert (rec["segments"][done] >= np.ceil(rec["target"][done] / budget)).all()
    last = np.where(done, rec["finish"], SMALL.iterations - 1)
    assert (last[started] - rec["start"][started] + 1 == rec["segments"][started]).all()
    later = np.ones(len(rec["seg_traj"]), bool)
    later[np.unique(rec["seg_traj"], return_index=True)[1]] = False  # not the first segment
    assert (rec["seg_step"][later] == 0).all() and (rec["seg_step"] > 0).any()


def test_refill_never_started_requests_carry_nothing() -> None:
    rec = _run(1024)["records"]
    unstarted = rec["segments"] == 0
    assert unstarted.any() and (rec["per_iteration"]["queued"][1:] > 0).all()
    assert (rec["tokens"][unstarted] == 0).all() and (rec["start"][unstarted] == -1).all()
    assert not np.isin(np.flatnonzero(unstarted), rec["seg_traj"]).any()
    assert (rec["status"][unstarted] == cs.UNFINISHED).all()
    # queued trajectories start in order, oldest first: (iteration, step) of the first
    # segment never decreases with the trajectory's index
    first = np.unique(rec["seg_traj"], return_index=True)[1]
    key = rec["seg_iter"][first] * (SMALL.cap + 1) + rec["seg_step"][first]
    assert (np.diff(key) >= 0).all()


@pytest.mark.parametrize("budget", [700, 3000])
def test_refill_keeps_2n_in_flight_and_s_per_worker(budget: int) -> None:
    out = _run(budget)
    rec, it = out["records"], out["records"]["per_iteration"]
    # whole new groups while fewer than 2N trajectories are unfinished
    assert (np.bincount(rec["group"]) == SMALL.k).all()
    assert ((it["requests"] - it["buffer"]) % SMALL.k == 0).all()
    assert ((2 * N - SMALL.k < it["requests"]) & (it["requests"] <= 2 * N)).all()
    for n in range(SMALL.iterations):
        seg = rec["seg_iter"] == n
        w, t0, gen = rec["seg_worker"][seg], rec["seg_step"][seg], rec["seg_tokens"][seg]
        active = np.zeros((SMALL.workers, budget + 1), np.int64)
        np.add.at(active, (w, t0), 1)
        np.add.at(active, (w, t0 + gen), -1)
        active = active.cumsum(axis=1)
        assert active.max() <= SMALL.slots and (active[:, 0] == SMALL.slots).all()
    assert out["refills_per_iteration"] > 0


@pytest.mark.parametrize("refill, age", [(False, None), (False, 2), (True, None), (True, 2)])
def test_group_trains_only_when_all_members_finished(refill: bool, age: int | None) -> None:
    rec = _run(700, max_trajectory_age=age, refill=refill)["records"]
    if age is not None:
        assert (rec["status"] == cs.DROPPED).any()
    live = rec["status"] != cs.DROPPED
    for g, trained_at in enumerate(rec["trained_at"]):
        members = live & (rec["group"] == g)
        assert members.sum() == SMALL.k
        if trained_at >= 0:
            assert (rec["status"][members] == cs.FINISHED).all()
            assert rec["finish"][members].max() == trained_at
        else:
            assert (rec["status"][members] == cs.UNFINISHED).any()


@pytest.mark.parametrize("refill, staleness", [(False, None), (False, 1), (True, None),
                                               (True, 1)])
def test_tokens_trained_once(refill: bool, staleness: int | None) -> None:
    out = _run(1024, max_staleness=staleness, refill=refill)
    rec, it = out["records"], out["records"]["per_iteration"]
    trained_at = rec["trained_at"][rec["group"][rec["seg_traj"]]]
    trained_at[rec["status"][rec["seg_traj"]] != cs.FINISHED] = -1  # dropped members
    for n in range(SMALL.iterations):
        seg = trained_at == n
        assert it["trained"][n] == rec["seg_tokens"][seg].sum()
        if staleness is not None:
            seg &= n - rec["seg_iter"] <= staleness
        assert it["loss"][n] == rec["seg_tokens"][seg].sum()
    finished = (rec["trained_at"][rec["group"]] >= 0) & (rec["status"] == cs.FINISHED)
    assert it["trained"].sum() == rec["target"][finished].sum()
    if staleness is None:
        assert it["loss"].sum() == it["trained"].sum() and out["masked_fraction"] == 0.0
    else:
        assert 0.0 < out["masked_fraction"] < 1.0


@pytest.mark.parametrize("budget, refill", [(SMALL.cap, False), (1024, False), (1024, True)])
def test_idle_fraction_in_unit_interval(budget: int, refill: bool) -> None:
    out = _run(budget, refill=refill)
    it = out["records"]["per_iteration"]
    idle = 1 - it["used"] / (SMALL.workers * SMALL.slots * it["rollout"])
    assert ((idle >= 0) & (idle <= 1)).all()
    assert 0.0 <= out["idle_fraction"] <= 1.0


@pytest.mark.parametrize("refill", [False, True])
def test_rollout_matches_step_by_step_loop(refill: bool) -> None:
    rng = np.random.default_rng(0)
    cost = replace(COST, step_per_seq=1e-3)
    gen, ctx = rng.integers(1, 50, 20), rng.integers(10, 500, 20)
    worker = np.arange(20) % 3
    t0 = rng.integers(0, 30, 20) * refill
    time, used = cs.rollout(gen, ctx, worker, 3, 8, cost, t0)
    busy, used_ref = [], 0.0
    for w in range(3):
        g, c, s = gen[worker == w], ctx[worker == w], t0[worker == w]
        t_w = 0.0
        for t in range((s + g).max()):
            on = (s <= t) & (t < s + g)
            prefill = c[s == t].sum() / cost.prefill_tokens_per_s  # batch started at t
            step = (cost.step_base * on.any() + cost.step_per_seq * on.sum()
                    + cost.step_per_ctx_token * (c[on] + t - s[on]).sum())
            t_w, used_ref = t_w + prefill + step, used_ref + on.sum() * (prefill + step)
        busy.append(t_w)
    assert math.isclose(time, max(busy)) and math.isclose(used, used_ref)


def _engine_reference(limit: np.ndarray, first_worker: np.ndarray, window: int, workers: int,
                      slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TorchEngine._run's loop, step by step, one engine of `slots` rows per worker and one
    shared queue (workers in index order within a step)."""
    n, n0 = len(limit), len(first_worker)
    worker, t0, gen = np.full(n, -1), np.full(n, -1), np.zeros(n, np.int64)
    worker[:n0], t0[:n0] = first_worker, 0
    rows = [list(np.flatnonzero(first_worker == w)) for w in range(workers)]
    refill_at, q = max(1, int(slots * 0.125)), n0
    for step in range(1, window + 1):
        for w in range(workers):
            gen[rows[w]] += 1
            rows[w] = [i for i in rows[w] if gen[i] < limit[i]]
        if step == window:
            break
        for w in range(workers):
            free = slots - len(rows[w])
            if q < n and (free >= refill_at or not rows[w]):
                new = list(range(q, min(q + free, n)))
                q += len(new)
                worker[new], t0[new] = w, step
                rows[w] += new
    return worker, t0, gen


@pytest.mark.parametrize("slots, seed", [(4, 0), (16, 1), (32, 2)])
def test_schedule_matches_step_by_step_engine(slots: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    workers, window = 3, 60
    limit = np.minimum(rng.integers(1, 90, 8 * slots), window)
    first = np.arange(workers * slots) % workers
    got = cs.schedule(limit, first, window, workers, slots)
    want = _engine_reference(limit, first, window, workers, slots)
    for a, b in zip(got, want, strict=True):
        assert (a == b).all()
    assert (got[1] > 0).any() and (got[1] < 0).any()  # some refilled, some left queued


def test_speedup_on_default_long_tailed_workload() -> None:
    work = replace(cs.Workload(), iterations=16, warmup=4)
    stats = cs.length_stats(work)
    assert stats["p50"] < stats["p90"] < stats["p99"] and 0.01 < stats["truncated_share"] < 0.1
    out = cs.compare(work)
    assert out["simulated_speedup"] > out["simulated_speedup_no_refill"] > 1.0
    assert (out["idle_fraction_partial"] < out["idle_fraction_partial_no_refill"]
            < out["idle_fraction_sync"])


def test_main_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    cs.main(["--workers", "4", "--slots", "8", "--problems-per-iteration", "8", "--k", "4",
             "--cap", "4096", "--median", "800", "--iterations", "8", "--warmup", "2",
             "--budget", "512", "--max-staleness", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["workload"]["workers"] == 4 and out["max_staleness"] == 2
    assert out["budget"] == 512 and out["budget_no_refill"] == cs.BUDGET_NO_REFILL
    assert out["partial"]["refill"] and not out["partial_no_refill"]["refill"]
    assert {"simulated_speedup", "simulated_speedup_no_refill", "idle_fraction_sync",
            "idle_fraction_partial", "idle_fraction_partial_no_refill", "throughput_sync",
            "throughput_partial", "throughput_partial_no_refill", "lengths",
            "cost_model"} <= out.keys()


# --- rollout replicas: each worker a replica with its own queue ----------------------------

def test_one_replica_is_the_shared_queue() -> None:
    """With one worker every placement is the same schedule (its queue is the only one)."""
    one = replace(SMALL, workers=1, problems_per_iteration=4)
    for budget, refill in ((1024, True), (1024, False), (SMALL.cap, False)):
        outs = [cs.simulate(one, COST, budget, refill=refill, placement=p)
                for p in cs.PLACEMENTS]
        assert all({**o, "placement": ""} == {**outs[0], "placement": ""} for o in outs)


@pytest.mark.parametrize("placement", ["contiguous", "balanced"])
def test_replicas_keep_groups_whole(placement: str) -> None:
    rec = _run(1024, placement=placement)["records"]
    where: dict[tuple[int, int], set] = {}
    for traj, it, w in zip(rec["seg_traj"], rec["seg_iter"], rec["seg_worker"], strict=True):
        where.setdefault((int(it), int(rec["group"][traj])), set()).add(int(w))
    assert len(where) > 100 and all(len(ws) == 1 for ws in where.values())


def test_balanced_replicas_scale_better_than_contiguous() -> None:
    """Partial rollouts with refill on 8 replicas: the balanced rule's rollout throughput
    is nearer linear (8 x one replica with an eighth of the batch) than the naive split's."""
    out = cs.replica_scaling(SMALL, COST, 2048, refill=True)
    assert 0 < out["naive"] < out["balanced"] <= 1.05
    with pytest.raises(ValueError, match="placement"):
        cs.simulate(SMALL, COST, 1024, placement="random")
