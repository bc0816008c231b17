"""Curriculum stages x prioritized sampling of training problems (SPEC.md section 3).

The stage in force picks the eligible difficulty bands and their weights; inside a band,
problem i is weighted by w_i = (1 - s_i) + floor (s_i: its observed success rate), or 1
without prioritization.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curriculum.stats import ProblemStats

StageLike = Any  # an object or mapping with `start` (int) and `levels` ({level: weight})


@dataclass(frozen=True)
class _Stage:
    start: int
    bands: dict[int, float]  # normalised weights of the levels present in the data


def _field(stage: StageLike, name: str, default: Any) -> Any:
    if isinstance(stage, Mapping):
        return stage.get(name, default)
    return getattr(stage, name, default)


class CurriculumSampler:
    """Draws distinct problem ids for an iteration (SPEC.md section 3)."""

    def __init__(
        self,
        levels: Mapping[str, int],
        stages: Sequence[StageLike],
        prioritized: bool = True,
        priority_floor: float = 0.05,
        seed: int = 0,
    ) -> None:
        if not levels:
            raise ValueError("CurriculumSampler needs at least one problem")
        if not stages:
            raise ValueError("CurriculumSampler needs at least one curriculum stage")
        if priority_floor < 0:
            raise ValueError(f"priority_floor must be >= 0, got {priority_floor}")
        self.ids: list[str] = sorted(levels)  # fixed order keeps draws reproducible
        self.level_of: dict[str, int] = {pid: int(levels[pid]) for pid in self.ids}
        self.prioritized = prioritized
        self.priority_floor = float(priority_floor)
        self.stats = ProblemStats()
        self._index = {pid: i for i, pid in enumerate(self.ids)}
        self._levels = np.array([self.level_of[pid] for pid in self.ids])
        self._sync_arrays()
        self.rng = np.random.default_rng(seed)
        present = sorted(set(self.level_of.values()))
        self.stages = sorted(
            (self._build_stage(i, s, present) for i, s in enumerate(stages)), key=lambda s: s.start
        )
        starts = [s.start for s in self.stages]
        if len(set(starts)) != len(starts):
            raise ValueError(f"curriculum stages have duplicate start iterations: {starts}")

    @staticmethod
    def _build_stage(index: int, stage: StageLike, present: list[int]) -> _Stage:
        start = int(_field(stage, "start", 0))
        named = {int(k): float(v) for k, v in dict(_field(stage, "levels", None) or {}).items()}
        if any(not math.isfinite(w) or w < 0 for w in named.values()):
            raise ValueError(f"curriculum stage {index} (start={start}) has bad weights {named}")
        if not named:
            named = {level: 1.0 for level in present}
        bands = {lv: w for lv, w in sorted(named.items()) if lv in present and w > 0}
        if not bands:
            raise ValueError(
                f"curriculum stage {index} (start={start}) names levels {sorted(named)} "
                f"with positive weight, none of which is in the data (levels {present})"
            )
        total = sum(bands.values())
        return _Stage(start, {lv: w / total for lv, w in bands.items()})

    def stage_index(self, iteration: int) -> int:
        """Index (in start order) of the last stage with start <= iteration."""
        if iteration < self.stages[0].start:
            raise ValueError(
                f"iteration {iteration} is before the first curriculum stage "
                f"(start={self.stages[0].start})"
            )
        return max(i for i, s in enumerate(self.stages) if s.start <= iteration)

    def level_weights(self, iteration: int) -> dict[int, float]:
        """Normalised band weights {level: weight} of the stage in force."""
        return dict(self.stages[self.stage_index(iteration)].bands)

    def _weights(self) -> np.ndarray:
        """w_i for every problem, in `ids` order."""
        if not self.prioritized:
            return np.ones(len(self.ids))
        att, succ = self._attempts, self._successes
        rate = np.divide(succ, att, out=np.zeros_like(succ), where=att > 0)
        return 1.0 - rate + self.priority_floor

    def _probability_array(self, iteration: int, exclude: Collection[str]
                           ) -> tuple[np.ndarray, np.ndarray]:
        """(P(problem) in `ids` order, mask of the problems in a live band)."""
        bands = self.level_weights(iteration)
        eligible = np.ones(len(self.ids), dtype=bool)
        for pid in exclude:
            if pid in self._index:
                eligible[self._index[pid]] = False
        members = {lv: eligible & (self._levels == lv) for lv in bands}
        live = {lv: w for lv, w in bands.items() if members[lv].any()}
        probs = np.zeros(len(self.ids))
        in_band = np.zeros(len(self.ids), dtype=bool)
        if not live:
            return probs, in_band
        band_total = sum(live.values())
        weights = self._weights()
        for lv, band_weight in live.items():
            m = members[lv]
            w = weights[m]
            total = w.sum()
            if total <= 0:
                w, total = np.ones_like(w), float(len(w))
            probs[m] = band_weight / band_total * w / total
            in_band |= m
        return probs, in_band

    def probabilities(self, iteration: int, exclude: Collection[str] = ()) -> dict[str, float]:
        """P(problem) = band weight of its level * w_i / sum of w_j over its non-excluded band.

        Bands left empty by `exclude` are dropped and the others renormalised, so the result
        sums to 1; a band whose weights are all 0 (floor 0, all solved) is spread evenly.
        """
        probs, in_band = self._probability_array(iteration, exclude)
        return {self.ids[i]: float(probs[i]) for i in np.flatnonzero(in_band)}

    def sample(self, n: int, iteration: int, exclude: Collection[str] = ()) -> list[str]:
        """Draw `n` distinct ids, none in `exclude` (ids in flight elsewhere).

        Uses numpy's weighted choice without replacement, which is successive draws: each
        next id is drawn with probability proportional to probabilities() among those not
        yet drawn. For n=1 this is exactly probabilities().
        """
        probs, _ = self._probability_array(iteration, exclude)
        idx = np.flatnonzero(probs > 0)
        if n > len(idx):
            raise ValueError(
                f"asked for {n} problems at iteration {iteration} but only {len(idx)} are "
                f"eligible (stage levels {sorted(self.level_weights(iteration))}, "
                f"{len(set(exclude))} excluded)"
            )
        if n <= 0:
            return []
        p = probs[idx]
        picks = self.rng.choice(len(idx), size=n, replace=False, p=p / p.sum())
        return [self.ids[idx[i]] for i in picks]

    def update(self, results: Iterable[tuple[str, float]]) -> None:
        """Record one (problem_id, success in [0, 1]) per finished rollout."""
        for problem_id, success in results:
            if problem_id not in self.level_of:
                raise KeyError(f"unknown problem id {problem_id!r}")
            self.stats.update(problem_id, success)
            i = self._index[problem_id]
            self._attempts[i] = self.stats.attempts[problem_id]
            self._successes[i] = self.stats.successes[problem_id]

    def sampling_entropy(self, iteration: int) -> float:
        """Shannon entropy (nats) of probabilities(iteration), for logging."""
        probs, _ = self._probability_array(iteration, ())
        probs = probs[probs > 0]
        return float(-(probs * np.log(probs)).sum())

    def state_dict(self) -> dict[str, Any]:
        """RNG state and success statistics; enough for a resumed run to draw identically."""
        return {"rng": self.rng.bit_generator.state, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.stats.load_state_dict(state["stats"])
        self._sync_arrays()

    def _sync_arrays(self) -> None:
        """Attempts and successes as arrays in `ids` order, from `stats`."""
        self._attempts = np.array([self.stats.attempts.get(p, 0.0) for p in self.ids])
        self._successes = np.array([self.stats.successes.get(p, 0.0) for p in self.ids])
