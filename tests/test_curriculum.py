"""Tests for curriculum/prioritized sampling and step schedules (SPEC.md section 3)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
from omegaconf import OmegaConf

from curriculum import CurriculumSampler, ProblemStats, piecewise
from kimi_rl.config import CurriculumConfig, StageConfig

# Upper 0.1% points of the chi-square distribution, used when scipy is absent.
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi2_stat(counts: Counter, expected_p: dict[str, float], draws: int) -> float:
    return sum((counts[k] - draws * p) ** 2 / (draws * p) for k, p in expected_p.items())


def fits(counts: Counter, expected_p: dict[str, float], draws: int) -> bool:
    """Goodness of fit at the 0.1% level (scipy if available, else a fixed critical value)."""
    assert set(counts) <= set(expected_p), f"drew ids outside the support: {set(counts)}"
    stat, df = chi2_stat(counts, expected_p, draws), len(expected_p) - 1
    try:
        from scipy.stats import chi2
    except ImportError:
        return stat < CHI2_CRIT_001[df]
    return chi2.sf(stat, df) > 1e-3


def draw_many(sampler: CurriculumSampler, draws: int, iteration: int = 0, **kw) -> Counter:
    return Counter(sampler.sample(1, iteration, **kw)[0] for _ in range(draws))


# Four problems of one level with success rates 0, 0.25, 0.5, 1 and two unseen ones.
RATES = {"a": 0.0, "b": 0.25, "c": 0.5, "d": 1.0}


def prioritized_sampler(floor: float = 0.05, seed: int = 1) -> CurriculumSampler:
    levels = {pid: 1 for pid in [*RATES, "e", "f"]}
    sampler = CurriculumSampler(levels, [{"start": 0, "levels": {}}], priority_floor=floor,
                                seed=seed)
    for pid, rate in RATES.items():  # 4 rollouts each with success 1 for rate*4 of them
        sampler.update([(pid, 1.0 if k < rate * 4 else 0.0) for k in range(4)])
    return sampler


def test_problem_stats() -> None:
    stats = ProblemStats()
    assert stats.success_rate("x") == 0.0
    for s in (1.0, 0.0, 0.5):
        stats.update("x", s)
    assert stats.success_rate("x") == pytest.approx(0.5)
    clone = ProblemStats()
    clone.load_state_dict(copy.deepcopy(stats.state_dict()))
    assert clone.success_rate("x") == pytest.approx(0.5) and clone.attempts["x"] == 3.0
    with pytest.raises(ValueError):
        stats.update("x", 1.5)


def test_probabilities_match_formula() -> None:
    floor = 0.05
    sampler = prioritized_sampler(floor)
    rates = {**RATES, "e": 0.0, "f": 0.0}
    w = {pid: 1 - s + floor for pid, s in rates.items()}
    expected = {pid: wi / sum(w.values()) for pid, wi in w.items()}
    probs = sampler.probabilities(0)
    assert probs == pytest.approx(expected)
    assert sum(probs.values()) == pytest.approx(1.0)
    assert probs["d"] == pytest.approx(floor / sum(w.values()))  # solved: floor only


def test_prioritized_frequencies_chi_square() -> None:
    floor, draws = 0.05, 20_000
    sampler = prioritized_sampler(floor)
    rates = {**RATES, "e": 0.0, "f": 0.0}
    w = {pid: 1 - s + floor for pid, s in rates.items()}
    expected = {pid: wi / sum(w.values()) for pid, wi in w.items()}
    counts = draw_many(sampler, draws)
    assert fits(counts, expected, draws), (counts, expected)
    # The test has power: the same counts reject uniform and floor-free weighting.
    uniform = {pid: 1 / len(w) for pid in w}
    assert not fits(counts, uniform, draws)
    no_floor = {pid: (1 - s) + 1e-9 for pid, s in rates.items()}
    no_floor = {pid: v / sum(no_floor.values()) for pid, v in no_floor.items()}
    assert chi2_stat(counts, no_floor, draws) > CHI2_CRIT_001[5]


def test_uniform_within_band_and_band_weights() -> None:
    levels = {"p1": 1, "p2": 1, "p3": 1, "q1": 2, "q2": 2, "r1": 7}
    stages = [StageConfig(start=0, levels={1: 1.0, 2: 3.0})]  # level 7 not eligible
    sampler = CurriculumSampler(levels, stages, prioritized=False, seed=3)
    sampler.update([("p1", 1.0)] * 5 + [("q1", 0.0)] * 5)  # ignored without prioritization
    expected = {"p1": 0.25 / 3, "p2": 0.25 / 3, "p3": 0.25 / 3, "q1": 0.375, "q2": 0.375}
    assert sampler.level_weights(0) == pytest.approx({1: 0.25, 2: 0.75})
    assert sampler.probabilities(0) == pytest.approx(expected)
    draws = 20_000
    counts = draw_many(sampler, draws)
    assert "r1" not in counts
    assert fits(counts, expected, draws), counts


def test_bands_combine_with_prioritization() -> None:
    levels = {"a": 1, "b": 1, "c": 2}
    sampler = CurriculumSampler(levels, [{"start": 0, "levels": {1: 1, 2: 1}}], priority_floor=0.1)
    sampler.update([("a", 1.0), ("b", 0.0), ("c", 1.0)])
    probs = sampler.probabilities(0)
    assert probs["a"] == pytest.approx(0.5 * 0.1 / (0.1 + 1.1))
    assert probs["b"] == pytest.approx(0.5 * 1.1 / (0.1 + 1.1))
    assert probs["c"] == pytest.approx(0.5)  # alone in its band, whatever its success rate


def test_stage_transitions() -> None:
    levels = {f"l{lv}_{k}": lv for lv in (1, 2, 3) for k in range(4)}
    cfg = OmegaConf.structured(
        CurriculumConfig(
            stages=[
                StageConfig(start=0, levels={1: 1.0}),
                StageConfig(start=10, levels={2: 1.0, 3: 1.0}),
                StageConfig(start=20, levels={}),
            ]
        )
    )
    # String keys, as YAML/OmegaConf may deliver them, for the middle stage.
    stages = [cfg.stages[0], {"start": 10, "levels": {"2": 1.0, "3": 1.0}}, cfg.stages[2]]
    sampler = CurriculumSampler(levels, stages, cfg.prioritized, cfg.priority_floor, seed=5)
    assert [sampler.stage_index(i) for i in (0, 9, 10, 19, 20, 1000)] == [0, 0, 1, 1, 2, 2]
    assert sampler.level_weights(9) == {1: 1.0}
    assert sampler.level_weights(10) == pytest.approx({2: 0.5, 3: 0.5})
    assert sampler.level_weights(20) == pytest.approx({1: 1 / 3, 2: 1 / 3, 3: 1 / 3})
    for iteration, allowed in ((9, {1}), (10, {2, 3}), (19, {2, 3}), (20, {1, 2, 3})):
        drawn = {levels[pid] for _ in range(200) for pid in sampler.sample(3, iteration)}
        assert drawn == allowed, (iteration, drawn)
    assert sampler.sampling_entropy(9) == pytest.approx(2 * 0.6931471805599453)  # log 4


def test_stage_errors() -> None:
    levels = {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="levels \\[5\\]"):
        CurriculumSampler(levels, [{"start": 0, "levels": {}}, {"start": 3, "levels": {5: 1}}])
    late = CurriculumSampler(levels, [{"start": 5, "levels": {}}])
    with pytest.raises(ValueError, match="before the first"):
        late.stage_index(4)
    # A level absent from the data is dropped, the rest renormalised.
    partial = CurriculumSampler(levels, [{"start": 0, "levels": {2: 1.0, 9: 3.0}}])
    assert partial.level_weights(0) == {2: 1.0}


def test_exclude_and_distinct() -> None:
    levels = {f"p{k}": 1 for k in range(6)} | {"q0": 2, "q1": 2}
    sampler = CurriculumSampler(levels, [{"start": 0, "levels": {1: 1, 2: 1}}], seed=7)
    exclude = {"p0", "p1", "q0"}
    for _ in range(300):
        ids = sampler.sample(3, 0, exclude=exclude)
        assert len(set(ids)) == 3 and not set(ids) & exclude
    everything = sampler.sample(5, 0, exclude=exclude)
    assert set(everything) == set(levels) - exclude
    # Excluding a whole band leaves a distribution over the other band that sums to 1.
    probs = sampler.probabilities(0, exclude={"q0", "q1"})
    assert set(probs) == {f"p{k}" for k in range(6)} and sum(probs.values()) == pytest.approx(1)
    with pytest.raises(ValueError, match="only 5 are eligible"):
        sampler.sample(6, 0, exclude=exclude)


def test_state_dict_round_trip() -> None:
    levels = {f"p{k:02d}": 1 + k % 3 for k in range(30)}
    stages = [{"start": 0, "levels": {1: 1}}, {"start": 2, "levels": {}}]

    def step(sampler: CurriculumSampler, iteration: int) -> list[str]:
        ids = sampler.sample(4, iteration)
        sampler.update((pid, float(int(pid[1:]) % 2)) for pid in ids for _ in range(2))
        return ids

    a = CurriculumSampler(levels, stages, seed=11)
    saved = None
    draws_a = []
    for iteration in range(5):
        if iteration == 2:
            saved = copy.deepcopy(a.state_dict())
        draws_a.append(step(a, iteration))
    b = CurriculumSampler(levels, stages, seed=999)
    b.load_state_dict(saved)
    assert [step(b, iteration) for iteration in range(2, 5)] == draws_a[2:]
    # Without the loaded state the draws differ (so the comparison above is meaningful).
    c = CurriculumSampler(levels, stages, seed=999)
    assert [step(c, iteration) for iteration in range(2, 5)] != draws_a[2:]


def test_piecewise() -> None:
    schedule = [[0, 8192], [100, 16384], [200, 32768]]
    assert [piecewise(schedule, i) for i in (0, 99, 100, 199, 200, 10**6)] == [
        8192, 8192, 16384, 16384, 32768, 32768
    ]
    assert piecewise({"50": 0.5, "0": 1.0}, 49) == 1.0  # string keys, unsorted
    assert piecewise({"50": 0.5, "0": 1.0}, 50) == 0.5
    assert piecewise(OmegaConf.create({"l": [[10, 1], [0, 2]]}).l, 10) == 1
    with pytest.raises(ValueError, match="empty"):
        piecewise([], 0)
    with pytest.raises(ValueError, match="before the schedule's first start"):
        piecewise([[5, 1]], 4)
    with pytest.raises(ValueError, match="start_iteration, value"):
        piecewise([[0, 1, 2]], 0)
