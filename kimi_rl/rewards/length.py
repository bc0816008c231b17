"""Kimi k1.5 length penalty (SPEC.md section 2, report section 2.3.3).

Total reward of response i is r_i + w * len_reward(i), with w from
:func:`length_penalty_weight`.
"""

from __future__ import annotations

from collections.abc import Sequence


def length_rewards(lengths: Sequence[int], correct: Sequence[bool],
                   only_solved: bool = False) -> list[float]:
    """len_reward(i) for one group of k responses to a problem.

    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len); correct responses get
    lambda_i, incorrect ones min(0, lambda_i); all zeros when every length is equal.
    `only_solved` (an option, not the report's formula): all zeros too when no response
    is correct, where min(0, lambda) would reward the shortest wrong response.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    if only_solved and not any(correct):
        return [0.0] * len(lengths)
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct, strict=True)]


def length_penalty_weight(iteration: int, weight: float, warmup: int) -> float:
    """w for ``iteration``: 0 during the first ``warmup`` iterations, then ``weight``."""
    return 0.0 if iteration < warmup else weight
