"""Partial rollouts (SPEC.md section 4): a per-iteration token budget per trajectory, a
replay buffer of unfinished trajectories, and groups that train only when complete.

Each iteration the loop asks `PartialRollouts` how many new groups fit the batch, samples
that many problems (none of those already in flight) and calls `step`, which

1. drops or regenerates unfinished trajectories that have reached `max_trajectory_age`,
2. sends the engine the buffered continuations first (prompt + tokens so far), then the
   new groups, each allowed min(budget, cap - tokens so far) new tokens,
3. appends each new segment (tokens, sampling logprobs, this iteration) to its trajectory;
   a trajectory is finished by EOS, repeat detection or the max response length `cap`,
   and parked in the buffer when only the budget stopped it,
4. returns the groups whose k trajectories are all finished; the others wait.

With `refill`, slots do not wait for the slowest trajectory either: the engine keeps
`slots` sequences running and starts a queued trajectory as soon as one ends (continuous
batching), and the call ends after `budget` decode steps; trajectories still queued then
start in a later iteration. Twice `slots` trajectories are kept in flight so the queue
does not run dry.

With `budget=None` every trajectory runs to the end in its first iteration: synchronous
rollouts, the same code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from ..data.problems import Problem
from ..prompts import PromptFormat
from .assign import LengthHistory, expected_cost
from .engine import Request, RolloutEngine, SamplingParams, sample_key
from .replicas import Replicas, ReplicaStats, idle_fraction
from .samples import Sample, encode_prompt

STALE_ACTIONS = ("drop", "regenerate")


@dataclass
class StepStats:
    """What one `step` did, for logging."""

    requests: int = 0  # trajectories the engine worked on
    continued: int = 0  # of them, continuations of buffered trajectories
    generated_tokens: int = 0
    carried_tokens: int = 0  # tokens of the continued trajectories, generated earlier
    idle_fraction: float = 0.0  # 1 - generated / (requests * longest segment)
    dropped_groups: int = 0
    regenerated: int = 0
    groups_finished: int = 0
    buffered: int = 0  # unfinished trajectories parked after this step
    buffered_tokens: int = 0  # their tokens so far
    waiting: int = 0  # finished trajectories waiting for the rest of their group
    groups_in_flight: int = 0
    replicas: ReplicaStats = field(default_factory=ReplicaStats)


@dataclass
class PartialRollouts:
    """Trajectories in flight between iterations, grouped by problem (k per group).

    slots: trajectories generated per iteration (problems_per_iteration * k); new groups
    fill what the buffered continuations leave. budget: new tokens per trajectory per
    iteration (None: no limit). max_trajectory_age: an unfinished trajectory whose first
    segment is this many iterations old is handled by `stale` ("drop": its whole group is
    dropped and its problem may be sampled again; "regenerate": it restarts from the
    prompt). None: no limit. refill: see the module docstring (needs an engine whose
    generate takes max_running and max_steps).
    """

    group_size: int
    slots: int
    budget: int | None = None
    max_trajectory_age: int | None = None
    stale: str = "regenerate"
    refill: bool = False
    prompt: PromptFormat | None = None  # how problems are encoded (None: raw)
    # requests carry sample_key(seed, problem, sample index, iteration, segment): samples
    # that do not depend on the replica, batch or world size. None: the engine's stream
    seed: int | None = None
    groups: dict[int, list[Sample]] = field(default_factory=dict)  # in flight, oldest first
    next_group: int = 0
    lengths: LengthHistory = field(default_factory=LengthHistory)  # expected new tokens

    def __post_init__(self) -> None:
        if self.stale not in STALE_ACTIONS:
            raise ValueError(f"stale trajectories: unknown action {self.stale!r} "
                             f"(choose from {list(STALE_ACTIONS)})")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"partial rollout budget must be >= 1, got {self.budget}")

    def unfinished(self) -> list[Sample]:
        return [s for g in self.groups.values() for s in g if s.finish_reason is None]

    def new_groups_wanted(self) -> int:
        """Whole groups that fit the slots (twice the slots with refill) the unfinished
        trajectories leave free."""
        target = self.slots * (2 if self.refill and self.budget is not None else 1)
        return max(0, target - len(self.unfinished())) // self.group_size

    def problems_in_flight(self) -> set[str]:
        return {g[0].problem.id for g in self.groups.values()}

    def add_groups(self, problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase,
                   iteration: int) -> None:
        """k fresh trajectories for each problem, generated from the next `step` on."""
        in_flight = self.problems_in_flight()
        for p in problems:
            if p.id in in_flight:
                raise ValueError(f"problem {p.id!r} is already in flight")
            prompt = encode_prompt(tokenizer, p, self.prompt)
            self.groups[self.next_group] = [
                Sample(p, self.next_group, prompt, [], [], None, started=iteration)
                for _ in range(self.group_size)]
            in_flight.add(p.id)
            self.next_group += 1

    def step(self, engine: RolloutEngine, iteration: int, cap: int, params: SamplingParams,
             decode: Callable[[list[int]], str], replicas: Replicas | None = None
             ) -> tuple[list[Sample], StepStats]:
        """Generate this iteration's segments; return the samples of the groups that are
        now complete (group by group, the order they entered) and what happened. With
        `replicas`, each replica generates its assigned groups and every rank gets all
        segments (the same on every rank)."""
        replicas = replicas or Replicas()
        stats = StepStats()
        self._handle_stale(iteration, stats)
        todo = self.unfinished()
        for s in todo:  # the max response length may have shrunk below a trajectory's length
            if len(s.tokens) >= cap:
                s.finish_reason = "length"
        # continuations first, then trajectories not started yet, oldest first
        todo = sorted((s for s in todo if s.finish_reason is None), key=lambda s: not s.tokens)
        stats.continued = sum(1 for s in todo if s.tokens)
        stats.carried_tokens = sum(len(s.tokens) for s in todo)
        limits = [cap - len(s.tokens) if self.budget is None
                  else min(self.budget, cap - len(s.tokens)) for s in todo]
        requests = [Request(s.prompt_ids, s.tokens, self._key(s, iteration)) for s in todo]
        window = self.refill and self.budget is not None
        # expected cost of the context and the tokens it may generate (a new one: the
        # mean length of its problem, else its level, so far, within its limit)
        costs = [expected_cost(len(s.prompt_ids) + len(s.tokens),
                               n if s.tokens else min(n, self.lengths.expected(
                                   s.problem.id, s.problem.level, n)),
                               replicas.context_scale)
                 for s, n in zip(todo, limits, strict=True)]
        segments, where, stats.replicas = replicas.generate(
            engine, requests, limits, [s.group for s in todo],
            [s.replica if s.tokens else None for s in todo], costs, params,
            max_running=self.slots if window else None,
            max_steps=self.budget if window else None)
        for s, seg, r in zip(todo, segments, where, strict=True):
            if seg.finish_reason == "pending":  # not started before the call ended
                continue
            s.replica = r
            if not s.segments:
                s.started = iteration
            s.tokens = s.tokens + seg.tokens
            s.logprobs = s.logprobs + seg.logprobs
            s.segments.append((iteration, len(seg.tokens)))
            if seg.finish_reason != "length" or len(s.tokens) >= cap:
                s.finish_reason = seg.finish_reason
                s.text = decode(s.tokens)
        stats.requests = sum(seg.finish_reason != "pending" for seg in segments)
        stats.generated_tokens = sum(len(seg.tokens) for seg in segments)
        # decode steps of the call (approximate without a cut), times its rows; with
        # replicas, the mean of the replicas' own
        idle = stats.replicas.idle_fraction
        stats.idle_fraction = (sum(idle) / len(idle) if len(idle) > 1 else idle_fraction(
            segments, limits, self.slots, self.budget if window else None))

        done: list[Sample] = []
        for gid in [g for g, members in self.groups.items()
                    if all(s.finish_reason is not None for s in members)]:
            finished = self.groups.pop(gid)
            self.lengths.update((x.problem.id, x.problem.level, len(x.tokens))
                                for x in finished)
            done += finished
            stats.groups_finished += 1
        rest = [s for g in self.groups.values() for s in g]
        stats.buffered = sum(1 for s in rest if s.finish_reason is None)
        stats.buffered_tokens = sum(len(s.tokens) for s in rest if s.finish_reason is None)
        stats.waiting = len(rest) - stats.buffered
        stats.groups_in_flight = len(self.groups)
        return done, stats

    def _key(self, s: Sample, iteration: int) -> int | None:
        """The random key of trajectory `s`'s next segment (None without a seed)."""
        if self.seed is None:
            return None
        index = next(i for i, x in enumerate(self.groups[s.group]) if x is s)
        return sample_key(self.seed, s.problem.id, index, iteration, len(s.segments))

    def _handle_stale(self, iteration: int, stats: StepStats) -> None:
        if self.max_trajectory_age is None:
            return
        for gid, members in list(self.groups.items()):
            stale = [s for s in members if s.finish_reason is None and s.segments
                     and iteration - s.started >= self.max_trajectory_age]
            if not stale:
                continue
            if self.stale == "drop":
                del self.groups[gid]
                stats.dropped_groups += 1
                continue
            for s in stale:
                s.tokens, s.logprobs, s.segments, s.started = [], [], [], iteration
                stats.regenerated += 1

    def state_dict(self) -> dict:
        """Plain data (problem ids, not problems): the buffer, finished members waiting for
        their group, and the next group id."""
        return {
            "next_group": self.next_group,
            "groups": [[{"problem": s.problem.id, "group": s.group, "prompt_ids": s.prompt_ids,
                         "tokens": s.tokens, "logprobs": s.logprobs,
                         "finish_reason": s.finish_reason, "text": s.text,
                         "segments": [list(x) for x in s.segments], "started": s.started,
                         "replica": s.replica}
                        for s in members] for members in self.groups.values()],
            "lengths": self.lengths.state_dict(),
        }

    def load_state_dict(self, state: dict, problems: dict[str, Problem]) -> None:
        groups: dict[int, list[Sample]] = {}
        for members in state["groups"]:
            out = []
            for d in members:
                if d["problem"] not in problems:
                    raise KeyError(f"the checkpoint's rollout buffer holds problem "
                                   f"{d['problem']!r}, which the data no longer has")
                out.append(Sample(problems[d["problem"]], d["group"], list(d["prompt_ids"]),
                                  list(d["tokens"]), list(d["logprobs"]), d["finish_reason"],
                                  text=d["text"], segments=[tuple(x) for x in d["segments"]],
                                  started=d["started"], replica=d.get("replica")))
            groups[out[0].group] = out
        self.groups, self.next_group = groups, state["next_group"]
        self.lengths = LengthHistory()
        if "lengths" in state:  # checkpoints written before length history have none
            self.lengths.load_state_dict(state["lengths"])
