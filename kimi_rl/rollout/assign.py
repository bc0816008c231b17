"""Which rollout replica generates which request groups: a pure function of replicated state.

Under torchrun the world splits into rollout replicas, each generating a share of the
iteration's requests. Every rank computes the same plan from the same inputs (the groups
in flight, their expected costs, the replica that started each buffered continuation), so
no message decides it. The rule:

- a group's k samples stay together (they share the prompt's prefill);
- groups are placed longest first (by expected cost) onto the least-loaded replica (LPT:
  its largest load is within 4/3 of the optimum);
- a group with buffered continuations stays on the replica that started it (its prefix is
  that replica's work in progress; no engine keeps its cache across the weight update, so
  staying saves no prefill today, and a small margin keeps it from costing balance),
  unless that replica's load would then exceed (1 + margin) x the balanced load
  max(total / replicas, largest group): then it goes to the least-loaded replica too.

Ties (equal cost, equal load) break by group key and replica index, so the plan does not
depend on dictionary order or floating-point sums taken in another order.

A group's expected cost is the sum over its samples of `expected_cost`: the context's
prefill (prompt plus tokens so far) plus the expected new tokens, each of which also
reads the KV cache of everything before it; the expected new tokens are the remaining
budget for a continuation, and for a new group the mean response length of its problem so
far, else of its level, else the budget (`LengthHistory`). Counting tokens alone
(`context_scale=0`) undercounts long continuations, whose decode steps read the longest
caches: at 32K responses that left the replica holding them the slowest (bench/cluster_sim.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupCost:
    """A request group of the iteration: `key` names it (the group id), `cost` is its
    expected work, `home` the replica that started its buffered continuations (None: a
    new group, or one whose replica no longer exists)."""

    key: int
    cost: float
    home: int | None = None


def expected_cost(context: float, new: float, context_scale: float) -> float:
    """One request's expected work in units of a generated token's non-attention work:
    `context` tokens to prefill (one unit each) and `new` tokens to generate, the j-th
    reading context + j cached tokens. `context_scale`: the cached length whose reads cost
    one unit (the weights' per-token work over the KV cache's per-token reads; 0: none)."""
    if context_scale <= 0:
        return context + new
    return context + new + (new * context + new * (new - 1) / 2.0) / context_scale


def lower_bound(costs: Iterable[float], replicas: int) -> float:
    """No plan's largest replica load is below max(total / replicas, largest group)."""
    costs = list(costs)
    return max(sum(costs) / replicas, max(costs, default=0.0))


def assign(groups: Sequence[GroupCost], replicas: int, margin: float = 0.25
           ) -> list[list[int]]:
    """The plan: for each replica the keys of its groups, in the order `groups` lists them.

    Continuations (home set) are placed first, longest first, on their home unless it
    would exceed (1 + margin) x lower_bound; then new groups, longest first, on the
    least-loaded replica."""
    if replicas < 1:
        raise ValueError(f"rollout replicas must be >= 1, got {replicas}")
    if margin < 0:
        raise ValueError(f"rollout.replica_margin must be >= 0, got {margin}")
    keys = [g.key for g in groups]
    if len(set(keys)) != len(keys):
        raise ValueError(f"assign: group keys must be unique, got {keys}")
    for g in groups:
        if g.cost < 0:
            raise ValueError(f"assign: group {g.key} has a negative cost {g.cost}")
        if g.home is not None and not 0 <= g.home < replicas:
            raise ValueError(f"assign: group {g.key} has home replica {g.home}, outside "
                             f"0..{replicas - 1}")
    cap = (1.0 + margin) * lower_bound((g.cost for g in groups), replicas)
    load = [0.0] * replicas
    where: dict[int, int] = {}

    def longest_first(gs):
        return sorted(gs, key=lambda g: (-g.cost, g.key))

    def least_loaded() -> int:
        return min(range(replicas), key=lambda r: (load[r], r))

    for g in longest_first(g for g in groups if g.home is not None):
        r = g.home if load[g.home] + g.cost <= cap else least_loaded()
        where[g.key] = r
        load[r] += g.cost
    for g in longest_first(g for g in groups if g.home is None):
        r = least_loaded()
        where[g.key] = r
        load[r] += g.cost
    plan: list[list[int]] = [[] for _ in range(replicas)]
    for g in groups:
        plan[where[g.key]].append(g.key)
    return plan


def contiguous(groups: Sequence[GroupCost], replicas: int) -> list[list[int]]:
    """The naive split, for comparison: equal numbers of consecutive groups per replica."""
    n = len(groups)
    bounds = [n * r // replicas for r in range(replicas + 1)]
    return [[g.key for g in groups[bounds[r]:bounds[r + 1]]] for r in range(replicas)]


def loads(plan: Sequence[Sequence[int]], groups: Sequence[GroupCost]) -> list[float]:
    """Each replica's total cost under `plan`."""
    cost = {g.key: g.cost for g in groups}
    return [sum(cost[k] for k in keys) for keys in plan]


@dataclass
class LengthHistory:
    """Mean response length so far, per problem and per level, of finished trajectories:
    the expected new tokens of a group not started yet. Replicated state (updated from the
    gathered batch on every rank), saved with the checkpoint."""

    by_problem: dict[str, list[float]] = field(default_factory=dict)  # id -> [sum, count]
    by_level: dict[int, list[float]] = field(default_factory=dict)

    def update(self, finished: Iterable[tuple[str, int, int]]) -> None:
        """(problem id, level, response length) of finished trajectories."""
        for pid, level, n in finished:
            for table, key in ((self.by_problem, pid), (self.by_level, int(level))):
                s = table.setdefault(key, [0.0, 0.0])
                s[0] += n
                s[1] += 1

    def expected(self, problem_id: str, level: int, default: float) -> float:
        """The problem's mean length, else its level's, else `default`."""
        for table, key in ((self.by_problem, problem_id), (self.by_level, int(level))):
            if key in table:
                total, count = table[key]
                return total / count
        return float(default)

    def state_dict(self) -> dict:
        return {"by_problem": {k: list(v) for k, v in self.by_problem.items()},
                "by_level": {int(k): list(v) for k, v in self.by_level.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.by_problem = {k: list(v) for k, v in state["by_problem"].items()}
        self.by_level = {int(k): list(v) for k, v in state["by_level"].items()}
