"""Policy-collapse detection: signals that RL is destroying what the policy knew.

Each watched quantity is averaged over the last `window` iterations and compared with the
best such average so far:
- training accuracy per difficulty level (levels enter and leave with the curriculum, so
  the overall mean would fall at a stage change without any collapse): a level whose
  accuracy over its last `window` iterations (more, until they hold `min_samples`
  responses: one hard group of a rarely sampled level is no collapse) falls
  `accuracy_drop` below its best;
- the share of responses stopped by repeat detection, `repeat_rise` above its lowest;
- the policy's mean token entropy, below `entropy_ratio` of its highest;
- the mean response length, below `length_ratio` of its longest.
The entropy and length rules are loose by default: both fall in healthy runs (RL sharpens
the policy; the length penalty shortens responses). A rule that fires names itself; the
detector reports, it does not change the run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import CollapseConfig


@dataclass
class _Window:
    """Sums of (value, weight) pairs over the last n iterations, or over as many more as
    it takes to reach `min_weight` (a level seen by few responses an iteration)."""

    n: int
    min_weight: float = 0.0

    def __post_init__(self) -> None:
        self.items: deque[tuple[float, float]] = deque()

    def add(self, value_sum: float, weight: float) -> None:
        self.items.append((value_sum, weight))
        while (len(self.items) > self.n
               and self.weight() - self.items[0][1] >= self.min_weight):
            self.items.popleft()

    def weight(self) -> float:
        return sum(w for _, w in self.items)

    def mean(self) -> float | None:
        w = self.weight()
        return sum(v for v, _ in self.items) / w if w > 0 else None

    def full(self) -> bool:
        return len(self.items) >= self.n and self.weight() >= self.min_weight


class CollapseDetector:
    """Feed it each iteration's metrics (`update`, which returns the collapse/* scalars);
    `fired` holds the rules that fired at the last update, `summary()` the run's record."""

    def __init__(self, cfg: CollapseConfig):
        self.cfg = cfg
        self.windows: dict[str, _Window] = {}
        self.best: dict[str, float] = {}
        self.reasons: dict[str, int] = {}  # rule -> first iteration it fired
        self.fired: list[str] = []  # the rules that fired at the last update
        self.firing_iterations = 0  # updates at which any rule fired

    def _window(self, key: str, min_weight: float = 0.0) -> _Window:
        return self.windows.setdefault(key, _Window(self.cfg.window, min_weight))

    def _track(self, key: str, value_sum: float, weight: float, higher_is_better: bool,
               min_weight: float = 0.0) -> tuple[float, float] | None:
        """Add to `key`'s window; (windowed mean, best windowed mean so far) once the
        window spans `window` iterations and `min_weight`."""
        w = self._window(key, min_weight)
        w.add(value_sum, weight)
        mean = w.mean()
        if mean is None or not w.full():
            return None
        best = self.best.get(key)
        if best is None or (mean > best if higher_is_better else mean < best):
            self.best[key] = mean
        return mean, (mean if best is None else best)

    def update(self, iteration: int, metrics: dict[str, float]) -> dict[str, float]:
        """The collapse scalars of this iteration (collapse/...), firing rules included."""
        c = self.cfg
        out: dict[str, float] = {}
        fired: list[str] = []
        n = metrics.get("rollout/samples", 0.0)
        for key, value in metrics.items():
            level = key.removeprefix("accuracy/train_")  # "L3"
            if not key.startswith("accuracy/train_L") or f"rollout/samples_{level}" not in metrics:
                continue
            count = metrics[f"rollout/samples_{level}"]
            seen = self._track(key, value * count, count, True, c.min_samples)
            if seen:
                out[f"collapse/accuracy_drop_{level}"] = seen[1] - seen[0]
                if seen[1] - seen[0] > c.accuracy_drop:
                    fired.append(f"accuracy_{level}")
        if "rollout/repeat_terminated_fraction" in metrics and n:
            seen = self._track("repeat", metrics["rollout/repeat_terminated_fraction"] * n, n,
                               False)
            if seen:
                out["collapse/repeat_rise"] = seen[0] - seen[1]
                if seen[0] - seen[1] > c.repeat_rise:
                    fired.append("repeat")
        for key, name, ratio in (("train/entropy", "entropy", c.entropy_ratio),
                                 ("response_length/mean", "length", c.length_ratio)):
            if key in metrics:
                seen = self._track(name, metrics[key], 1.0, True)
                if seen and seen[1] > 0:
                    out[f"collapse/{name}_ratio"] = seen[0] / seen[1]
                    if seen[0] < ratio * seen[1]:
                        fired.append(name)
        for rule in fired:
            self.reasons.setdefault(rule, iteration)
        self.firing_iterations += bool(fired)
        out["collapse/firing"] = float(bool(fired))
        out["collapse/detected"] = float(self.first_iteration is not None)
        self.fired = fired
        return out

    @property
    def first_iteration(self) -> int | None:
        return min(self.reasons.values(), default=None)

    def summary(self) -> dict:
        """detected: a rule fired at some iteration (the first: first_iteration; rules:
        rule -> its first iteration); firing_iterations: how many iterations one fired;
        firing_at_end: one still fired at the last update (not recovered)."""
        return {"detected": self.first_iteration is not None,
                "first_iteration": self.first_iteration, "rules": dict(self.reasons),
                "firing_iterations": self.firing_iterations,
                "firing_at_end": bool(self.fired)}

    def state_dict(self) -> dict:
        return {"windows": {k: list(w.items) for k, w in self.windows.items()},
                "best": dict(self.best), "reasons": dict(self.reasons),
                "fired": list(self.fired), "firing_iterations": self.firing_iterations}

    def load_state_dict(self, state: dict) -> None:
        for k, items in state["windows"].items():
            self._window(k, self.cfg.min_samples if k.startswith("accuracy/") else 0.0
                         ).items.extend(tuple(i) for i in items)
        self.best = dict(state["best"])
        self.reasons = dict(state["reasons"])
        self.fired = list(state.get("fired", []))
        self.firing_iterations = int(state.get("firing_iterations", 0))
