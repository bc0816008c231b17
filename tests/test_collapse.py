"""The collapse detector: fires on a constructed collapse, silent on healthy runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kimi_rl.collapse import CollapseDetector
from kimi_rl.config import CollapseConfig

# per-iteration metrics of real demo runs, from their TensorBoard files (an earlier demo
# design: checking pass before the answer, a fresh Adam every iteration): "healthy" ones
# that learned steadily, and one whose level-3 training accuracy fell from ~0.95 to
# 0.42-0.73 for twelve iterations (iterations 9-20) before it recovered; and one of a
# later design (checking pass after the answer, Adam kept across iterations) that collapsed
DEMO_TRACES = Path(__file__).parent / "data" / "demo_metrics.json"


def iteration_metrics(acc: dict[int, float], n_per_level: int, repeat: float, entropy: float,
                      length: float) -> dict[str, float]:
    m = {f"accuracy/train_L{lv}": a for lv, a in acc.items()}
    m.update({f"rollout/samples_L{lv}": n_per_level for lv in acc})
    m.update({"rollout/samples": n_per_level * len(acc),
              "rollout/repeat_terminated_fraction": repeat, "train/entropy": entropy,
              "response_length/mean": length})
    return m


def run(trace: list[dict], cfg: CollapseConfig | None = None) -> CollapseDetector:
    det = CollapseDetector(cfg or CollapseConfig())
    for it, m in enumerate(trace):
        det.update(it, m)
    return det


def test_fires_on_a_collapse_to_repeated_characters():
    # learning for 12 iterations, then every response one character repeated (as seen:
    # '1111...' cut by repeat detection at 32 tokens, accuracy 0, entropy near 0)
    healthy = [iteration_metrics({1: 0.9, 2: 0.8, 3: 0.5 + 0.02 * i}, 64, 0.01, 0.3, 50.0)
               for i in range(12)]
    collapse = [iteration_metrics({1: 0.0, 2: 0.0, 3: 0.0}, 64, 0.95, 0.02, 32.0)
                for _ in range(6)]
    det = run(healthy + collapse)
    s = det.summary()
    assert s["detected"]
    assert 12 <= s["first_iteration"] <= 14  # within the window after the collapse began
    assert s["firing_at_end"] and s["firing_iterations"] == 18 - s["first_iteration"]
    assert {"accuracy_L1", "accuracy_L2", "accuracy_L3", "repeat", "entropy"} <= set(s["rules"])
    assert "length" not in s["rules"]  # 32/50 is above the length rule's 0.3


def test_silent_on_constructed_healthy_learning_with_curriculum_and_penalty():
    rng = np.random.default_rng(0)
    trace = []
    for i in range(40):
        levels = {1: 0.95, 2: 0.9, 3: 0.8} if i < 8 else {1: 0.95, 2: 0.9, 3: 0.85, 4: 0.3, 5: 0.2}
        acc = {lv: float(np.clip(a + 0.015 * i + rng.normal(0, 0.05), 0, 1))
               for lv, a in levels.items()}
        length = 52.0 if i < 8 else 52.0 - (i - 8) * 0.5  # the length penalty at work
        trace.append(iteration_metrics(acc, 40, 0.02 * rng.random(), 0.4 - 0.006 * i,
                                       length))
    det = run(trace)
    assert not det.summary()["detected"], det.summary()


def test_a_rarely_sampled_level_is_judged_over_enough_responses():
    # one group of 8 an iteration; a single group all wrong is no collapse ...
    acc = [1.0] * 10 + [0.0] + [1.0] * 5
    trace = [iteration_metrics({1: a}, 8, 0.0, 0.3, 40.0) for a in acc]
    assert not run(trace, CollapseConfig(min_samples=64)).summary()["detected"]
    assert run(trace, CollapseConfig(min_samples=8)).summary()["detected"]  # 3 groups judged
    # ... but a level that stays wrong is, once its window holds 64 responses
    trace = [iteration_metrics({1: a}, 8, 0.0, 0.3, 40.0) for a in [1.0] * 10 + [0.0] * 8]
    s = run(trace, CollapseConfig(min_samples=64)).summary()
    # iteration 12: the last 8 iterations (64 responses) hold 5 right groups of 8
    assert s["detected"] and s["rules"] == {"accuracy_L1": 12}


def test_state_dict_resumes_exactly():
    trace = [iteration_metrics({1: 0.9 - 0.1 * i}, 32, 0.1 * i, 0.3, 40.0) for i in range(9)]
    straight = run(trace)
    first = run(trace[:4])
    resumed = CollapseDetector(CollapseConfig())
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for it, m in enumerate(trace[4:], start=4):
        resumed.update(it, m)
    assert resumed.summary() == straight.summary()
    assert resumed.summary()["detected"]


def test_real_demo_runs_healthy_and_with_a_dip():
    traces = json.loads(DEMO_TRACES.read_text())
    assert len(traces["healthy"]) >= 3
    for name, trace in traces["healthy"].items():
        det = run(trace)
        assert not det.summary()["detected"], (name, det.summary())
    s = run(traces["dip"]["seed1_penalty_off"]).summary()
    assert s["detected"] and 9 <= s["first_iteration"] <= 13
    assert "accuracy_L3" in s["rules"]
    assert not s["firing_at_end"] and 1 <= s["firing_iterations"] < 10  # it recovered
    # a run that collapsed (the optimizer kept across iterations: training accuracy of
    # every level fell to 0-0.1 from iteration 16 on); reported as its level 4 fell
    s = run(traces["collapse"]["seed0_adam_kept"]).summary()
    assert s["detected"] and 11 <= s["first_iteration"] <= 15
    assert {"accuracy_L1", "accuracy_L2", "accuracy_L3", "accuracy_L4"} <= set(s["rules"])
    assert s["firing_at_end"] and s["firing_iterations"] >= 5
