"""Repeat detection (SPEC.md section 2, report section 2.6.2): a response whose tail is a
loop is cut short during generation (finish reason "repeat"), and may be penalised.

A tail is a loop when, for some period p in 1..max_period, its last r * p tokens are one
p-token block repeated r times, with r >= min_repeats and r * p >= min_tokens. Checking
the smallest such r is enough (a longer periodic tail contains it), so period p needs a
periodic span of

    span(p) = p * max(min_repeats, ceil(min_tokens / p))

tokens. The defaults (64, 4, 32) leave ordinary text alone, and also a passage repeated
two or three times (a checking pass that goes over earlier lines again): a block must come
back four times in a row, over at least 32 tokens, before generation is stopped.

Two implementations of the same condition:
- :func:`find_loop`, a pure function on a token list (the definition; tests, tools);
- :class:`RepeatTracker`, incremental and batched on tensors, for the rollout engine.
  Per row it keeps, for every period p, the number of consecutive newest tokens with
  x[t] == x[t - p]; a new token updates all periods with one (rows, max_period)
  comparison, and the tail loops with period p exactly when that count reaches
  span(p) - p. So every token is checked (the stop position is exact, no checking every
  few tokens) at O(max_period) per row per token, against O(max_period * span) for
  re-running the definition on the tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RepeatDetection:
    """Loop condition parameters (see the module docstring)."""

    max_period: int = 64
    min_repeats: int = 4
    min_tokens: int = 32

    def __post_init__(self) -> None:
        for name, low in (("max_period", 1), ("min_repeats", 2), ("min_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"repeat detection: {name} must be an integer >= {low}, "
                                 f"got {value!r}")

    def span(self, period: int) -> int:
        """Tokens of periodic tail that make a loop of this period."""
        return period * max(self.min_repeats, math.ceil(self.min_tokens / period))


def find_loop(tokens: Sequence[int], max_period: int = 64, min_repeats: int = 4,
              min_tokens: int = 32) -> int | None:
    """The smallest period p with which the tail of `tokens` loops (see the module
    docstring), or None if it does not loop."""
    spec = RepeatDetection(max_period, min_repeats, min_tokens)
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = spec.span(p)
        if span > n:
            continue
        if all(tokens[i] == tokens[i - p] for i in range(n - 1, n - span + p - 1, -1)):
            return p
    return None


class RepeatTracker:
    """Incremental :func:`find_loop` for `rows` token streams at once.

    `prefixes` (one per row, or None) are tokens already in each stream, e.g. the earlier
    segments of a partial rollout: they count towards a loop but are not checked themselves.
    """

    def __init__(self, spec: RepeatDetection, rows: int,
                 prefixes: Sequence[Sequence[int]] | None = None):
        periods = torch.arange(1, spec.max_period + 1)
        self.need = torch.tensor([spec.span(p) - p for p in periods.tolist()])
        # newest first: history[:, j] is x[t - 1 - j]; -1 (no token) matches nothing
        self.history = torch.full((rows, spec.max_period), -1, dtype=torch.long)
        self.run = torch.zeros((rows, spec.max_period), dtype=torch.long)
        if prefixes is not None:
            self._seed(prefixes, max(spec.span(p) for p in periods.tolist()))

    def _seed(self, prefixes: Sequence[Sequence[int]], window: int) -> None:
        # the last `window` tokens decide every count up to its threshold
        tails = [list(p)[-window:] for p in prefixes]
        width = max((len(t) for t in tails), default=0)
        for j in range(width):
            rows = [i for i, t in enumerate(tails) if len(t) >= width - j]
            toks = [tails[i][len(tails[i]) - (width - j)] for i in rows]
            self.push(torch.tensor(rows, dtype=torch.long), torch.tensor(toks))

    def push(self, rows: Tensor, tokens: Tensor) -> Tensor:
        """Append tokens[i] to stream rows[i]; True where that stream now ends in a loop."""
        history = self.history[rows]
        run = torch.where(history == tokens[:, None], self.run[rows] + 1, 0)
        self.run[rows] = run
        self.history[rows] = torch.cat([tokens[:, None], history[:, :-1]], dim=1)
        return (run >= self.need).any(-1)
