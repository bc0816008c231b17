"""Rollout replicas under torchrun: each replica generates its share of an iteration's
requests, and every rank then holds all results, in request order.

The world's ranks split into `count` replicas of world / count consecutive ranks (the
built-in torch engine: one rank is one replica; ranks of one replica generate the same
share). The plan comes from `assign` on replicated state, so every rank knows who
generates what without a message; the results travel once, in one all-gather. With one
replica nothing travels: every rank generates everything (the layout before replicas, kept
for comparison). Requests carry their own random keys (`sample_key`), so a response's
tokens do not depend on the replica that generates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import RolloutConfig
from .assign import GroupCost, assign
from .engine import Request, RolloutEngine, SamplingParams, Segment


@dataclass
class ReplicaStats:
    """Per replica: requests started, tokens generated, seconds in its generate call, and
    idle fraction (1 - generated tokens / (rows x decode steps) of its call)."""

    requests: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    idle_fraction: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        n = len(self.seconds)
        mean = sum(self.seconds) / n if n else 0.0
        m: dict[str, float] = {
            "rollout/replicas": n,
            # max / mean of the replicas' generate times: 1 is perfectly balanced (clock
            # figures go under time/)
            "time/rollout_imbalance": max(self.seconds) / mean if mean > 0 else 1.0,
        }
        for r in range(n):
            m[f"replica/{r}/requests"] = self.requests[r]
            m[f"replica/{r}/tokens"] = self.tokens[r]
            m[f"replica/{r}/idle_fraction"] = self.idle_fraction[r]
            m[f"time/rollout_replica_{r}"] = self.seconds[r]
        return m


def idle_fraction(segments: Sequence[Segment], limits: Sequence[int], rows: int,
                  max_steps: int | None) -> float:
    """1 - generated / (rows x decode steps) of one generate call: the decode steps are
    `max_steps` when the call was cut by it, else its longest segment."""
    lengths = [len(s.tokens) for s in segments]
    cut = max_steps is not None and any(
        s.finish_reason == "pending" or (s.finish_reason == "length" and len(s.tokens) < n)
        for s, n in zip(segments, limits, strict=True))
    steps = max_steps if cut else max(lengths, default=0)
    if not steps:
        return 0.0
    return 1.0 - sum(lengths) / (min(len(segments), rows) * steps)


@dataclass
class Replicas:
    """This rank's place among `count` rollout replicas of a world of `world` ranks, and
    how results travel: `gather(x)` returns every rank's x, in rank order (a collective
    all ranks call together; unused with one replica)."""

    count: int = 1
    rank: int = 0
    world: int = 1
    margin: float = RolloutConfig.replica_margin
    gather: Callable[[object], list] | None = None
    context_scale: float = RolloutConfig.replica_context_scale  # assign.expected_cost

    def __post_init__(self) -> None:
        if self.count < 1 or self.world % self.count:
            raise ValueError(f"rollout.replicas={self.count} must be >= 1 and divide the "
                             f"world size {self.world}")
        if self.count > 1 and self.gather is None:
            raise ValueError("rollout replicas: more than one needs a gather function")

    @property
    def index(self) -> int:
        """This rank's replica."""
        return self.rank * self.count // self.world

    def generate(self, engine: RolloutEngine, requests: Sequence[Request],
                 limits: Sequence[int], groups: Sequence[int], homes: Sequence[int | None],
                 costs: Sequence[float], params: SamplingParams, max_running: int | None,
                 max_steps: int | None) -> tuple[list[Segment], list[int], ReplicaStats]:
        """Generate `requests` across the replicas: request i belongs to group `groups[i]`
        (kept whole), was started by replica `homes[i]` (None: new, or a replica that no
        longer exists) and costs about `costs[i]`. Returns every request's segment (on
        every rank), the replica that generated each, and per-replica figures.
        `max_running` is the whole world's: each replica runs its share of it."""
        order: list[int] = []
        cost: dict[int, float] = {}
        home: dict[int, int | None] = {}
        for g, h, c in zip(groups, homes, costs, strict=True):
            if g not in cost:
                order.append(g)
                cost[g], home[g] = 0.0, None
            cost[g] += c
            if h is not None and h < self.count and home[g] is None:
                home[g] = h
        plan = assign([GroupCost(g, cost[g], home[g]) for g in order], self.count, self.margin)
        replica_of = {g: r for r, keys in enumerate(plan) for g in keys}
        where = [replica_of[g] for g in groups]
        running = None if max_running is None else -(-max_running // self.count)
        mine = [i for i, r in enumerate(where) if r == self.index]
        t0 = time.perf_counter()
        segs = (engine.generate([requests[i] for i in mine], [limits[i] for i in mine], params,
                                max_running=running, max_steps=max_steps) if mine else [])
        payload = (time.perf_counter() - t0,
                   [(s.tokens, s.logprobs, s.finish_reason) for s in segs])
        if self.count == 1:
            shares = [payload]
        else:  # the first rank of each replica speaks for it
            everyone = self.gather(payload)
            shares = [everyone[r * self.world // self.count] for r in range(self.count)]
        out: list[Segment | None] = [None] * len(requests)
        stats = ReplicaStats()
        for r, (seconds, share) in enumerate(shares):
            idx = [i for i, w in enumerate(where) if w == r]
            if len(idx) != len(share):
                raise RuntimeError(f"rollout replica {r} returned {len(share)} segments for "
                                   f"{len(idx)} requests: replicas disagree on the plan")
            got = [Segment(list(t), list(lp), f) for t, lp, f in share]
            for i, seg in zip(idx, got, strict=True):
                out[i] = seg
            stats.requests.append(sum(s.finish_reason != "pending" for s in got))
            stats.tokens.append(sum(len(s.tokens) for s in got))
            stats.seconds.append(seconds)
            stats.idle_fraction.append(idle_fraction(
                got, [limits[i] for i in idx], running or len(idx), max_steps))
        return out, where, stats  # type: ignore[return-value]
