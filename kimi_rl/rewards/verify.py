"""Rule-based verifiers by task (SPEC.md section 2): only the final answer counts."""

from __future__ import annotations

import re
from typing import Callable

from ..data import modsum
from ..data.problems import Problem

Verifier = Callable[[Problem, str], float]

_BOXED = re.compile(r"\\boxed\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")
_ANSWER_LINE = re.compile(r"^\s*answer\s*[:=]?\s*(.+?)\s*$", re.IGNORECASE)


def final_answer(response: str) -> str | None:
    """The last \\boxed{...} expression, else an explicit final `answer: X` line."""
    boxed = _BOXED.findall(response)
    if boxed:
        return boxed[-1].strip()
    lines = [ln for ln in response.strip().splitlines() if ln.strip()]
    if lines:
        m = _ANSWER_LINE.match(lines[-1])
        if m:
            return m.group(1)
    return None


def _normalise(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def verify_exact(problem: Problem, response: str) -> float:
    """Exact match of the normalised final answer (whitespace, case, trailing period)."""
    ans = final_answer(response)
    return float(ans is not None and _normalise(ans) == _normalise(problem.answer))


VERIFIERS: dict[str, Verifier] = {"modsum": modsum.verify, "math": verify_exact}


def get_verifier(task: str) -> Verifier:
    if task not in VERIFIERS:
        raise ValueError(f"no verifier for task {task!r} (choose from {sorted(VERIFIERS)})")
    return VERIFIERS[task]
