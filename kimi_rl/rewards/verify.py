"""Rule-based verifiers by task (SPEC.md section 2): only the final answer counts."""

from __future__ import annotations

import re
from collections.abc import Callable

from ..data import modsum
from ..data.problems import Problem

Verifier = Callable[[Problem, str], float]

# what the brace scan looks at: an escaped backslash, an escaped brace (a literal, not a
# group), a box opener, a group brace
_BRACE_TOKENS = re.compile(r"\\\\|\\[{}]|\\boxed\s*\{|[{}]")
_ANSWER_LINE = re.compile(r"^\s*answer\s*[:=]?\s*(.+?)\s*$", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (the one closed last), braces
    matched at any depth; None if no box is closed. One pass, linear in the text."""
    stack: list[int | None] = []  # per open group: its content start if it is a box
    last = None
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if tok.startswith("\\boxed"):
            stack.append(m.end())
        elif tok == "{":
            stack.append(None)
        elif tok == "}" and stack:
            start = stack.pop()
            if start is not None:
                last = text[start:m.start()]
    return last


def final_answer(response: str) -> str | None:
    """The last \\boxed{...} expression, else an explicit final `answer: X` line."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
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
