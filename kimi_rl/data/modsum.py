"""The built-in verifiable task: labelled digit sums modulo 10, graded by length.

A level-L problem has L + 1 labelled digits, e.g. the prompt ``k7 q3 b9\n``; the answer is
their sum modulo 10. The chain of thought adds one operand per line, naming its label:

    0+k7=7
    7+q3=0
    0+b9=9
    answer 9

A demonstration may close with a redundant confirmation line (``all steps look right``)
before its answer, so lengths vary and the length penalty has something to remove. The line
is constant text: it neither helps nor hurts the answer, so a verifier-only reward has no
reason to keep or drop it, and removing it is the length penalty's doing alone (an optional
pass that recomputed the steps would cost accuracy, and RL alone would remove it). A
demonstration can also be flawed: it stops one operand early, as an imperfect teacher that
cuts long reasoning short would, or slip on its last addition (`FLAWS`). Only the final
``answer N`` line counts.
"""

from __future__ import annotations

import math
import random
import re

from .problems import Problem

LABELS = "abcdefghijklmnopqrstuvwxyz"
ANSWER_RE = re.compile(r"answer (\d+)")


def make_problem(rng: random.Random, level: int, pid: str) -> Problem:
    n = level + 1
    labels = rng.sample(LABELS, n)
    digits = [rng.randrange(10) for _ in range(n)]
    prompt = " ".join(f"{a}{d}" for a, d in zip(labels, digits, strict=True)) + "\n"
    return Problem(pid, prompt, str(sum(digits) % 10), level, "modsum")


def _steps(prompt: str) -> list[str]:
    acc, lines = 0, []
    for tok in prompt.split():
        d = int(tok[1:])
        lines.append(f"{acc}+{tok}={(acc + d) % 10}")
        acc = (acc + d) % 10
    return lines


CONFIRM = "all steps look right"
# an imperfect teacher's flawed demonstrations: `stop_early` skips the last operand and
# answers with the sum so far (wrong unless that operand is 0); `slip` adds the last
# operand one too high and answers with that (always wrong). A stop_early teacher teaches
# two stopping rules (after the last operand, and after the one before it), which RL must
# tell apart by the operands left; a slip teacher stops where the correct chain does, so
# what RL corrects (the last sum) is what the other levels already do right
FLAWS = ("stop_early", "slip")


def demonstration(problem: Problem, confirm: bool, flaw: str | None = None) -> str:
    """The chain-of-thought response for a problem, with or without the confirmation line
    before the answer; `flaw` (one of FLAWS) gives a flawed one."""
    lines = _steps(problem.prompt)
    if flaw == "stop_early":
        lines = lines[:-1]
    elif flaw == "slip":
        head, total = lines[-1].rsplit("=", 1)
        lines[-1] = f"{head}={(int(total) + 1) % 10}"
    elif flaw is not None:
        raise ValueError(f"demonstration: unknown flaw {flaw!r} (choose from {list(FLAWS)})")
    answer = lines[-1].rsplit("=", 1)[1]
    if confirm:
        lines.append(CONFIRM)
    return "\n".join(lines + [f"answer {answer}"])


def extract_answer(response: str) -> str | None:
    """The answer on the final non-empty line, if that line is exactly ``answer N``."""
    lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    m = ANSWER_RE.fullmatch(lines[-1])
    return m.group(1) if m else None


def verify(problem: Problem, response: str) -> float:
    """1.0 if the final answer line equals the reference answer exactly, else 0.0."""
    return float(extract_answer(response) == problem.answer)


def generate(levels: list[int], train_per_level: int, test_per_level: int, seed: int
             ) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out test problems per level; test prompts never appear in train.
    Small levels have few distinct problems: test takes at most a fifth of them."""
    rng = random.Random(seed)
    train, test = [], []
    for level in levels:
        space = 10 ** (level + 1) * math.perm(len(LABELS), level + 1)
        n_test = min(test_per_level, space // 5)
        n_train = min(train_per_level, space - n_test)
        seen: set[str] = set()
        for split, count, out in (("test", n_test, test), ("train", n_train, train)):
            made = 0
            while made < count:
                p = make_problem(rng, level, f"modsum-L{level}-{split}-{made:05d}")
                if p.prompt not in seen:
                    seen.add(p.prompt)
                    out.append(p)
                    made += 1
    return train, test


def vocabulary() -> list[str]:
    """Every character the task's prompts and responses use."""
    chars = set(LABELS + "0123456789+= \n" + CONFIRM)
    return sorted(chars)
