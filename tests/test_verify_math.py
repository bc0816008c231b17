"""The `math` verifier: final-answer extraction, equivalence through math-verify, and
attempts to game them. The rules are in kimi_rl/rewards/verify.py's module doc."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kimi_rl.data import modsum
from kimi_rl.data.problems import Problem
from kimi_rl.rewards import verify as V
from kimi_rl.rewards.verify import final_answer, get_verifier, verify_math


def score(answer: str, response: str) -> float:
    return verify_math(Problem("p", "q", answer, 1, "math"), response)


def boxed(ans: str) -> str:
    return f"Some reasoning, 2 + 2 = 4.\n\nSo the answer is $\\boxed{{{ans}}}$."


def junk(n: int, seed: int = 0) -> str:
    """n characters of reasoning-like text with braces, numbers and stray closers."""
    rng = random.Random(seed)
    words = ["the", "so", "x", "=", "3", "{", "}", "\\frac", "+", "then", "1/2", "\n", "$"]
    out, size = [], 0
    while size < n:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


# reference answer, final answer: equivalent by math-verify (or the exact rule)
EQUIVALENT = [
    ("1/2", "\\frac{1}{2}"),
    ("1/2", "0.5"),
    ("0.5", "\\dfrac12"),
    ("\\frac{1}{2}", "1/2"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("2", "\\sqrt{4}"),
    ("2\\pi", "6.283185"),  # floats: equal once rounded to 6 decimal places
    ("1/3", "0.333333"),
    ("3", "3.0"),
    ("3", "x=3"),
    ("x=3", "3"),
    ("x=3", "x = 3"),
    ("3", "x = 1 + 2 = 3"),  # an equation chain: its last side
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\{1,2\\}", "2, 1"),
    ("(0,1]", "(0, 1]"),
    ("[0, 1)", "[0,1)"),
    ("(-\\infty, 0] \\cup [1, \\infty)", "(-\\infty,0]\\cup[1,\\infty)"),
    ("10\\%", "0.1"),  # math-verify: a percentage equals its fraction and its number
    ("10\\%", "10"),
    ("10\\%", "10\\%"),
    ("0.1", "10\\%"),
    ("10", "10%"),
    ("5", "5\\text{ cm}"),
    ("1000", "1,000"),
    ("1000", "1{,}000"),
    ("1000", "1\\,000"),
    ("A", "(A)"),
    ("A", "\\text{(A)}"),
    ("x+1", "1+X"),
    ("x^2-1", "(x-1)(x+1)"),
    ("(x+1)^2", "x^2+2x+1"),
    ("6", "3!"),
    ("2^{2023}", "2\\cdot 2^{2022}"),
    ("\\infty", "\\infty"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\frac{3}{4}", "\\frac{3}{4}."),
    ("yes", "\\text{Yes}"),
    ("no solution", "No solution"),
    ("\\text{even}", "even"),
]

NOT_EQUIVALENT = [
    ("1/2", "1/3"),
    ("1/2", "2"),
    ("3", "-3"),
    ("2", "\\sqrt{2}"),
    ("\\sqrt{2}", "2"),
    ("2\\pi", "6.28"),
    ("1/3", "0.33"),
    ("0.5", "0.50001"),
    ("x=3", "y=3"),
    ("x+1", "y+1"),
    ("x^2-1", "(x-1)^2"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("(0,1]", "[0,1)"),
    ("(1,2)", "(2,1)"),
    ("(-\\infty, 0] \\cup [1, \\infty)", "(-\\infty,0)\\cup[1,\\infty)"),
    ("10\\%", "0.01"),
    ("A", "B"),
    ("yes", "sey"),  # a word is text: not the product s*e*y
    ("\\text{yes}", "sey"),
    ("1", "1, 2"),  # a set is not one of its members
    ("2", "\\pm 2"),
    ("1", "1 \\text{ or } 2"),
    ("2", "1 \\text{ or } 2"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("-1", "e^{i\\pi}"),
    ("3", ""),
]


@pytest.mark.parametrize("answer, final", EQUIVALENT)
def test_equivalent(answer, final):
    assert score(answer, boxed(final)) == 1.0
    assert score(answer, f"reasoning\n\nanswer: {final}") == 1.0


@pytest.mark.parametrize("answer, final", NOT_EQUIVALENT)
def test_not_equivalent(answer, final):
    assert score(answer, boxed(final)) == 0.0
    assert score(answer, f"reasoning\n\nanswer: {final}") == 0.0


@pytest.mark.parametrize("response", [
    "answer: \\(3\\)", "answer: $3$", "Answer = 3", "ANSWER 3.", "\\boxed{\\mathbf{3}}",
    "\\boxed {3}", "\\boxed{\\boxed{3}}",
])
def test_answer_forms(response):
    assert score("3", response) == 1.0


def test_works_in_worker_threads():
    """math-verify's alarms are main-thread only; elsewhere it runs without them."""
    cases = [(a, boxed(f), 1.0) for a, f in EQUIVALENT] + \
            [(a, boxed(f), 0.0) for a, f in NOT_EQUIVALENT]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: score(c[0], c[1]), cases))
    assert got == [want for _, _, want in cases]


# ---------------------------------------------------------------- gaming the extractor

def test_several_boxes_the_last_counts():
    # a box corrected in a later paragraph: only the last box counts
    assert score("1/2", "\\boxed{1/3}\n\nWait, that is wrong: \\boxed{1/2}") == 1.0
    assert score("1/3", "\\boxed{1/3}\n\nWait, that is wrong: \\boxed{1/2}") == 0.0
    # the same answer boxed twice is no hedge
    assert score("1/2", "So \\boxed{1/2}, that is \\boxed{ 1/2 }.") == 1.0


@pytest.mark.parametrize("response", [
    "\\boxed{1} or \\boxed{2}",
    "\\boxed{2} or \\boxed{1}",
    "\\boxed{1}\\boxed{2}",
    "It is \\boxed{1},\nor maybe \\boxed{2},\nor \\boxed{3}.",
    "\\boxed{1} or \\boxed{\\boxed{2}}",
])
def test_hedging_scores_zero(response):
    for answer in ("1", "2", "3"):
        assert score(answer, response) == 0.0


def test_answer_hidden_in_the_chain_of_thought():
    cot = "Maybe the answer is 1/2, or \\(\\frac{1}{2}\\); answer: 1/2.\n\n"
    assert score("1/2", cot + "After all, answer: 1/3") == 0.0
    assert score("1/2", cot + "After all, \\boxed{1/3}") == 0.0
    assert score("1/2", "\\boxed{1/2}\n\n" + junk(2000) + "\n\nFinal: \\boxed{1/3}") == 0.0


@pytest.mark.parametrize("response", [
    "The answer is 1/2, let me check the other cases.",
    "answer: 1/2\nbut then more text",
    "I get $\\frac{1}{2}$ here. Now the next step",
    "The final answer is $\\frac{1}{2}$ I hope, but",
])
def test_correct_only_mid_reasoning_scores_zero(response):
    assert final_answer(response) is None
    assert score("1/2", response) == 0.0


def test_box_wins_over_a_later_answer_line():
    response = "So \\boxed{1/2}.\n\nanswer: 3"
    assert final_answer(response) == "1/2"
    assert score("1/2", response) == 1.0
    assert score("3", response) == 0.0


def test_unclosed_and_nested_boxes():
    assert score("1/2", "\\boxed{1/2") == 0.0
    assert score("3", "\\boxed{3} and then \\boxed{1/2") == 1.0  # an unclosed box is no box
    assert score("\\frac{\\sqrt{2}}{2}", "\\boxed{\\frac{1}{\\sqrt{2}}}") == 1.0
    assert score("2", "\\boxed{anything at all \\boxed{2}}") == 0.0  # the outer box counts
    assert score("\\{1, 2\\}", "\\boxed{\\{1, 2\\}}") == 1.0  # escaped braces are literal


@pytest.mark.parametrize("response, right, wrong", [
    ("\\boxed{1}\\text{ (just kidding, the answer is 2)}", "1", "2"),
    ("\\boxed{1 \\text{ answer: } 2}", None, "2"),
    ("\\boxed{\\text{final answer is } \\frac{1}{2} \\text{ or } 3}", None, "1/2"),
    ("\\boxed{2}$ \\boxed{3", "2", "3"),
    ("\\boxed{3}\\\\ \\boxed{4}", None, "4"),
])
def test_latex_injection(response, right, wrong):
    if right is not None:
        assert score(right, response) == 1.0
    assert score(wrong, response) == 0.0


def test_huge_responses_are_fast():
    big = junk(1 << 20)
    for response, want in [(big + "\n\nSo \\boxed{\\frac{1}{2}}.", 1.0),
                           ("\\boxed{\\frac{1}{2}}\n\n" + big, 0.0),
                           ("\\boxed{" * 100_000 + big + "\\boxed{1/2}", 1.0),
                           ("answer: 1/2\n" + big, 0.0),
                           (big + "\nanswer: 1/2", 1.0)]:
        t = time.perf_counter()
        assert score("1/2", response) == want
        assert time.perf_counter() - t < 0.5


def test_answer_must_close_in_the_tail():
    assert score("3", "\\boxed{3}" + "." * V.MAX_SCAN_CHARS) == 0.0
    assert score("3", "\\boxed{3}" + "." * (V.MAX_SCAN_CHARS - 100)) == 1.0


def test_huge_extracted_answers_score_zero():
    n = 600  # 1+1+...+1 = 600: right, but 1199 characters long
    long_sum = "+".join(["1"] * n)
    assert len(long_sum) > V.MAX_ANSWER_CHARS
    assert score(str(n), f"\\boxed{{{long_sum}}}") == 0.0
    assert score(str(n), f"answer: {long_sum}") == 0.0
    t = time.perf_counter()
    assert score("1", "\\boxed{" + "1" * 100_000 + "}") == 0.0  # 100 KB
    assert score("1", "answer: " + "1" * 100_000) == 0.0
    assert time.perf_counter() - t < 0.5


@pytest.mark.parametrize("final, answer", [
    ("9^{9^{9^{9}}}", "3"),
    ("2^{2^{30}}", "3"),
    ("(10^{6})!", "3"),
    ("\\binom{10^{9}}{10^{8}}", "3"),
    ("\\prod_{i=1}^{10^{7}} i", "3"),
    ("(x+1)^{1000}", "3"),
    ("(x+y+1)^{100}", "3"),
    ("\\int_0^1 x^2 dx", "1/3"),  # not a final answer either
    ("\\sin(" * 160 + "x" + ")" * 160, "0"),
    ("{" * 400 + "1" + "}" * 400, "1"),
])
def test_costly_answers_score_zero_fast(final, answer):
    """Sympy would take seconds to hours on these; in a worker thread math-verify has no
    time limit, so the guards must catch them."""
    with ThreadPoolExecutor(1) as pool:
        t = time.perf_counter()
        assert pool.submit(score, answer, boxed(final)).result() == 0.0
        assert time.perf_counter() - t < 1.0


def test_cheap_answers_pass_the_cost_guard():
    assert score("2^{2023}", boxed("2^{2023}")) == 1.0
    assert score("(x+1)^{2}", boxed("(1+x)^2")) == 1.0
    assert score("5050", boxed("\\sum_{i=1}^{100} i")) == 1.0


def test_registry():
    assert get_verifier("math") is verify_math
    assert get_verifier("modsum") is modsum.verify
