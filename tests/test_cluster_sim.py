"""bench/cluster_sim.py: the partial-rollout scheduling model and its bookkeeping."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

_path = Path(__file__).resolve().parents[1] / "bench" / "cluster_sim.py"
_spec = importlib.util.spec_from_file_location("cluster_sim", _path)
cs = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cluster_sim", cs)
_spec.loader.exec_module(cs)

# A small cluster with the same shape of workload: 8 workers x 16 slots, k = 4, cap 8K.
SMALL = cs.Workload(workers=8, slots=16, k=4, problems_per_iteration=32, prompt_len=100,
                    cap=8192, iterations=30, warmup=5,
                    lengths=cs.LengthModel(median=1500.0))
COST = cs.CostModel()


def _run(budget: int, **kw) -> dict:
    return cs.simulate(SMALL, COST, budget, record=True, **kw)


def test_budget_at_or_above_cap_is_sync() -> None:
    sync = cs.simulate(SMALL, COST, SMALL.cap)
    above = cs.simulate(SMALL, COST, 4 * SMALL.cap)
    assert {**above, "budget": SMALL.cap} == sync
    assert sync["segments_per_trajectory"] == 1.0 and sync["buffer_size"] == 0.0
    assert cs.compare(SMALL, COST, budget=SMALL.cap)["simulated_speedup"] == 1.0


@pytest.mark.parametrize("budget", [512, 1000, 2048])
def test_segments_span_ceil_length_over_budget(budget: int) -> None:
    rec = _run(budget)["records"]
    done = rec["status"] == cs.FINISHED
    expected = np.ceil(rec["target"][done] / budget).astype(int)
    assert done.sum() > 100 and (rec["segments"][done] == expected).all()
    assert rec["target"].max() == SMALL.cap and rec["truncated"].any()
    # one segment per iteration, consecutive, from the start to the finishing iteration
    assert (rec["finish"][done] - rec["start"][done] + 1 == expected).all()
    per_traj = np.bincount(rec["seg_traj"], weights=rec["seg_tokens"], minlength=len(done))
    assert (per_traj[done] == rec["target"][done]).all()
    assert rec["seg_tokens"].max() <= budget


@pytest.mark.parametrize("age", [None, 2])
def test_group_trains_only_when_all_members_finished(age: int | None) -> None:
    rec = _run(700, max_trajectory_age=age)["records"]
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


@pytest.mark.parametrize("staleness", [None, 1])
def test_tokens_trained_once(staleness: int | None) -> None:
    out = _run(1024, max_staleness=staleness)
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


@pytest.mark.parametrize("budget", [SMALL.cap, 1024])
def test_idle_fraction_in_unit_interval(budget: int) -> None:
    out = _run(budget)
    it = out["records"]["per_iteration"]
    idle = 1 - it["used"] / (SMALL.workers * SMALL.slots * it["rollout"])
    assert ((idle >= 0) & (idle <= 1)).all()
    assert 0.0 <= out["idle_fraction"] <= 1.0


def test_rollout_matches_step_by_step_loop() -> None:
    rng = np.random.default_rng(0)
    cost = replace(COST, step_per_seq=1e-3)
    gen, ctx = rng.integers(1, 50, 20), rng.integers(10, 500, 20)
    worker = np.arange(20) % 3
    time, used = cs.rollout(gen, ctx, worker, 3, 8, cost)
    busy, used_ref = [], 0.0
    for w in range(3):
        g, c = gen[worker == w], ctx[worker == w]
        prefill = c.sum() / cost.prefill_tokens_per_s
        t_w, used_ref = prefill, used_ref + len(g) * prefill
        for t in range(g.max()):
            on = g > t
            step = (cost.step_base + cost.step_per_seq * on.sum()
                    + cost.step_per_ctx_token * (c[on] + t).sum())
            t_w, used_ref = t_w + step, used_ref + on.sum() * step
        busy.append(t_w)
    assert math.isclose(time, max(busy)) and math.isclose(used, used_ref)


def test_speedup_on_default_long_tailed_workload() -> None:
    work = replace(cs.Workload(), iterations=16, warmup=4)
    stats = cs.length_stats(work)
    assert stats["p50"] < stats["p90"] < stats["p99"] and 0.01 < stats["truncated_share"] < 0.1
    out = cs.compare(work)
    assert out["simulated_speedup"] > 1.0
    assert out["idle_fraction_partial"] < out["idle_fraction_sync"]


def test_main_prints_one_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    cs.main(["--workers", "4", "--slots", "8", "--problems-per-iteration", "8", "--k", "4",
             "--cap", "4096", "--median", "800", "--iterations", "8", "--warmup", "2",
             "--budget", "512", "--max-staleness", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["workload"]["workers"] == 4 and out["max_staleness"] == 2
    assert {"simulated_speedup", "idle_fraction_sync", "idle_fraction_partial",
            "throughput_sync", "throughput_partial", "lengths", "cost_model"} <= out.keys()
