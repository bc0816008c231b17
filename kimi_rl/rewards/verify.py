"""Rule-based verifiers by task (SPEC.md section 2): only the final answer counts.

The `math` verifier (`verify_math`, problems from JSONL files) scores a response 1.0 or 0.0
by these rules, in this order (tests/test_verify_math.py holds the table of cases):

1. Final answer. Only the tail of the response is read, its last MAX_SCAN_CHARS (8 KiB)
   characters. The final answer is the content of the last complete `\\boxed{...}` there
   (braces matched at any depth, `\\{` `\\}` literal, an unclosed box is no box); with no
   box, the last non-empty line if it reads `answer: X` (also `answer = X`, `Answer X`).
   A box wins over a later answer line. An answer stated earlier in the reasoning never
   counts, nor does one that closes before the last 8 KiB of the response. Under a prompt
   format whose answers go in <answer> </answer> blocks (r1_zero; `get_verifier(...,
   answer="tags")`, `answer_view`), only the last complete block is read: a box or answer
   line inside it as above, else the block's whole text is the final answer; no block: 0.
2. Hedging. Every outermost box in the final box's paragraph (from the last blank line
   before it) must hold the same answer as the final box, up to whitespace, case and a
   trailing period; else 0 ("\\boxed{1} or \\boxed{2}" scores 0 whatever the reference).
   A box corrected in an earlier paragraph is no hedge: only the last one counts.
3. Size. A final answer longer than MAX_ANSWER_CHARS (1000) scores 0 unread, and so does
   one nested deeper than MAX_DEPTH (8) brackets when it is to be parsed (rule 4c): the
   LaTeX parser's time grows fast with nesting (seconds at depth 12).
4. Equivalence with the problem's `answer` (the reference):
   a. equal after normalisation (whitespace, case, a trailing period): 1;
   b. a reference that is a word or phrase ("yes", "no solution", `\\text{even}`: letters,
      spaces, `'` and `-`, two letters at least) is compared as text only, `\\text{}`-style
      wrappers and case aside (math parsing would read "sey" as s*e*y = "yes");
   c. otherwise both are parsed whole as LaTeX by math-verify (`parse`, the answer
      wrapped in `$...$`; a trailing percent sign is kept as a percentage) and compared by
      `math_verify.verify` (strict: variables matter). The whole answer is one expression,
      never a part of it: math-verify's plain-expression extraction, which searches a text
      for its last number, is not used on responses, and an answer containing the word
      "answer" (math-verify's anchor) is not parsed. A reference that does not parse whole
      is parsed by math-verify's defaults (LaTeX, then plain expressions) as a fallback.
      What math-verify accepts, as tested here: 1/2 = \\frac12 = 0.5; \\frac{\\sqrt2}{2} =
      1/\\sqrt2; \\sqrt8 = 2\\sqrt2; decimals equal once rounded to 6 places (1/3 = 0.333333,
      2\\pi = 6.283185, but 2\\pi != 6.28); x=3 = 3 either way round, y=3 != x=3, and in an
      equation chain the last side is the value (x = 1+2 = 3); sets in any order, and a
      comma list as a set ({1,2} = {2,1} = "1, 2"); intervals with their end types;
      10\\% = 10% = 0.1 = 10 (math-verify: a percentage equals its fraction and its
      number); units in \\text stripped (5\\text{ cm} = 5); 1,000 = 1{,}000 = 1\\,000 = 1000;
      choice letters A = (A) = \\text{(A)}; letter case of variables ignored (X+1 = x+1).
      Anything unparsable scores by rule a alone.
5. Cost. Extraction reads only the tail, so a 1 MB response verifies in milliseconds. A
   parsed answer too costly to compare scores 0 unread (`_too_costly`: over MAX_NODES
   nodes, a number of over MAX_DIGITS digits such as 10^{10^{10}} or (10^6)!, a sum or
   product of over MAX_TERMS terms, a sum of symbols raised past MAX_SYMBOLIC_POWER such as
   (x+1)^{1000}, an unevaluated integral, limit or derivative): sympy would take seconds
   to hours on them. On top of that, math-verify's own time limits (PARSE_TIMEOUT_S and
   VERIFY_TIMEOUT_S each, then 0) apply in the main thread. They are SIGALRM alarms, which
   exist only there: while they run they replace any other SIGALRM handler, and they cancel
   a pending alarm. In any other thread math-verify is called without them, as it must be
   (it raises otherwise, and logs once that timeouts are off): verification works there
   but has no hard time limit, only the guards above, which keep an answer of at most
   1000 characters to a few seconds at worst (typical answers: milliseconds to 0.1 s).
   The trainer verifies in its main thread.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from functools import cache, lru_cache
from typing import Any

from ..data import modsum, reasoning_gym
from ..data.problems import Problem
from .code import CodeVerifier

Verifier = Callable[[Problem, str], float]

MAX_SCAN_CHARS = 8192  # the tail of a response that is searched for its final answer
MAX_ANSWER_CHARS = 1000  # a longer final answer scores 0
PARSE_TIMEOUT_S = 3  # math-verify's time limits (whole seconds, SIGALRM), main thread only
VERIFY_TIMEOUT_S = 3
MAX_NODES = 400  # cost guard on a parsed expression, see rule 5
MAX_DIGITS = 1e5
MAX_TERMS = 1000
MAX_SYMBOLIC_POWER = 16
MAX_DEPTH = 8  # bracket nesting past which an answer is not parsed (parsing time grows fast)

# what the brace scan looks at: an escaped backslash, an escaped brace (a literal, not a
# group), a box opener, a group brace
_BRACE_TOKENS = re.compile(r"\\\\|\\[{}]|\\boxed\s*\{|[{}]")
_ANSWER_LINE = re.compile(r"^\s*answer\s*[:=]?\s*(.+?)\s*$", re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """The outermost complete \\boxed{...} in `text`, in order, as (start of `\\boxed`,
    start of content, end of content). Braces are matched at any depth, escaped braces
    are literals, unclosed boxes are skipped (a complete box inside one is outermost).
    One pass, linear in the text."""
    stack: list[int | None] = []  # per open group: its box's start if it is a box
    boxes: list[tuple[int, int, int]] = []
    opener: dict[int, int] = {}  # box start -> content start
    for m in _BRACE_TOKENS.finditer(text):
        tok = m.group()
        if tok.startswith("\\boxed"):
            stack.append(m.start())
            opener[m.start()] = m.end()
        elif tok == "{":
            stack.append(None)
        elif tok == "}" and stack:
            start = stack.pop()
            if start is not None:
                while boxes and boxes[-1][0] > start:  # boxes inside this one
                    boxes.pop()
                boxes.append((start, opener.pop(start), m.start()))
    return boxes


def last_boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...} (the one closed last), braces
    matched at any depth; None if no box is closed. One pass, linear in the text."""
    boxes = boxed_spans(text)
    return text[boxes[-1][1]:boxes[-1][2]] if boxes else None


def _final(response: str) -> tuple[str | None, bool]:
    """(final answer, hedged) of a response's tail: rules 1 and 2 of the module doc."""
    tail = response[-MAX_SCAN_CHARS:]
    boxes = boxed_spans(tail)
    if boxes:
        start, lo, hi = boxes[-1]
        answer = tail[lo:hi].strip()
        para = max((m.end() for m in _BLANK_LINE.finditer(tail, 0, start)), default=0)
        key = normalise_answer(answer)
        hedged = any(normalise_answer(tail[b_lo:b_hi]) != key
                     for b_start, b_lo, b_hi in boxes[:-1] if b_start >= para)
        return answer, hedged
    lines = [ln for ln in tail.strip().splitlines() if ln.strip()]
    if lines:
        m = _ANSWER_LINE.match(lines[-1])
        if m:
            return m.group(1), False
    return None, False


def final_answer(response: str) -> str | None:
    """The last \\boxed{...} expression, else an explicit final `answer: X` line, in the
    last MAX_SCAN_CHARS characters of the response."""
    return _final(response)[0]


def normalise_answer(s: str) -> str:
    """Whitespace removed, a trailing period dropped, lower case: how answers compare as text."""
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def verify_exact(problem: Problem, response: str) -> float:
    """Exact match of the normalised final answer (whitespace, case, trailing period)."""
    ans = final_answer(response)
    return float(ans is not None and normalise_answer(ans) == normalise_answer(problem.answer))


# ---------------------------------------------------------------- math (math-verify)

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{(.*)\}",
                           re.DOTALL)
_WORDS = re.compile(r"[A-Za-z][A-Za-z' -]*[A-Za-z]")
_MATH_DELIMS = re.compile(r"\\\((.*)\\\)|\\\[(.*)\\\]", re.DOTALL)
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\[,!;: ](?=\d{3}(?!\d))")
_TRAILING_PERCENT = re.compile(r"\s*(\\?%)$")


def _depth(s: str) -> int:
    """The deepest nesting of brackets ( [ { in `s` (closers of any kind close)."""
    depth = deepest = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _as_words(s: str) -> str | None:
    """`s` as a normalised word or phrase (rule 4b), else None."""
    s = s.strip().rstrip(".").strip()
    while m := _TEXT_WRAPPER.fullmatch(s):
        s = m.group(1).strip().rstrip(".").strip()
    return " ".join(s.lower().split()) if _WORDS.fullmatch(s) else None


@cache
def _mv() -> tuple[Any, list]:
    """math-verify, imported on first use (the modsum task needs none of it), and its
    extraction config for whole answers: LaTeX only, no box searched for."""
    import math_verify
    from math_verify import LatexExtractionConfig, LatexNormalizationConfig

    norm = LatexNormalizationConfig(basic_latex=True, units=True, malformed_operators=True,
                                    nits=True, boxed="none", equations=False)
    return math_verify, [LatexExtractionConfig(boxed_match_priority=-1,
                                               normalization_config=norm)]


def _timeouts() -> tuple[int | None, int | None]:
    """math-verify's (parse, verify) time limits: SIGALRM ones work in the main thread only."""
    if threading.current_thread() is threading.main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    return None, None


def _parse_whole(s: str, fallback: bool = False) -> list:
    """`s` parsed whole as one LaTeX expression by math-verify ([] if it does not parse);
    with `fallback` (references only), math-verify's default extraction after that."""
    mv, whole_answer = _mv()
    timeout = _timeouts()[0]
    s = s.strip()
    if m := _MATH_DELIMS.fullmatch(s):
        s = m.group(1) if m.group(1) is not None else m.group(2)
    s = _UNESCAPED_DOLLAR.sub("", s).replace("\n", " ").strip()
    s = _THIN_SPACE_THOUSANDS.sub("", s)
    if s.endswith("."):
        s = s[:-1].rstrip()
    parsed = []
    if s and "answer" not in s.lower():
        pct = _TRAILING_PERCENT.search(s)
        wrapped = f"${s[:pct.start()]}${pct.group(1)}" if pct else f"${s}$"
        parsed = mv.parse(wrapped, extraction_config=whole_answer,
                          fallback_mode="no_fallback", extraction_mode="first_match",
                          parsing_timeout=timeout)
    if not parsed and fallback:
        parsed = mv.parse(s, fallback_mode="no_fallback", parsing_timeout=timeout)
    return parsed


@lru_cache(maxsize=4096)
def _reference(answer: str) -> tuple[str | None, list]:
    """A reference answer, once: (as words (rule 4b) or None, parsed by math-verify)."""
    words = _as_words(answer)
    if words is not None:
        return words, []
    return None, _parse_whole(answer, fallback=True)


def _too_costly(exprs: list) -> bool:
    """Rule 5's guard: would comparing these parsed expressions be too costly?"""
    import sympy

    budget = [MAX_NODES]

    def digits(e: Any) -> float:
        """A rough upper bound on the digits of e's value (a symbol counts one digit),
        math.inf when it is past a limit."""
        budget[0] -= 1
        if budget[0] < 0:
            return math.inf
        if isinstance(e, sympy.MatrixBase):
            return max((digits(x) for x in e), default=0.0)
        if isinstance(e, str) or not isinstance(e, sympy.Basic):
            return 1.0
        if isinstance(e, sympy.Rational):
            return 0.30103 * max(abs(e.p).bit_length(), e.q.bit_length()) + 1
        if isinstance(e, sympy.Float):
            return 20.0
        if e.is_Atom:
            return 1.0
        if isinstance(e, (sympy.Integral, sympy.Limit, sympy.Derivative)):
            return math.inf
        args = [digits(a) for a in e.args]
        if math.inf in args:
            return math.inf
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            n = abs(int(exp)) if isinstance(exp, sympy.Integer) else 10 ** min(args[1], 300)
            if base.free_symbols and not base.is_Symbol and n > MAX_SYMBOLIC_POWER:
                return math.inf
            return args[0] * n
        if isinstance(e, (sympy.Sum, sympy.Product)):
            terms = 1.0
            for limit in e.limits:  # (variable, low, high): integers, or bounded by digits
                lo, hi = (limit[1:] + (None, None))[:2]
                if isinstance(lo, sympy.Integer) and isinstance(hi, sympy.Integer):
                    terms *= max(int(hi) - int(lo) + 1, 1)
                else:
                    terms *= 10 ** min(max(digits(x) for x in limit), 300)
            return math.inf if terms > MAX_TERMS else args[0] * terms
        if isinstance(e, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.binomial,
                          sympy.subfactorial)):
            n = max(abs(int(a)) if isinstance(a, sympy.Integer) else 10 ** min(d, 300)
                    for a, d in zip(e.args, args, strict=True))
            return n * max(1.0, math.log10(n + 1))
        if isinstance(e, sympy.Mul):
            return sum(args)
        return max(args, default=0.0) + 1

    return any(digits(e) > MAX_DIGITS for e in exprs)


def verify_math(problem: Problem, response: str) -> float:
    """1.0 if the response's final answer is equivalent to the problem's answer, by the
    rules of the module doc (last box or answer line, no hedging, math-verify)."""
    ans, hedged = _final(response)
    if ans is None or hedged or len(ans) > MAX_ANSWER_CHARS:
        return 0.0
    if normalise_answer(ans) == normalise_answer(problem.answer):
        return 1.0
    words, gold = _reference(problem.answer)
    if words is not None:
        return float(_as_words(ans) == words)
    if not gold:
        return 0.0
    if _depth(ans) > MAX_DEPTH:
        return 0.0
    pred = _parse_whole(ans)
    if not pred or _too_costly(pred) or _too_costly(gold):
        return 0.0
    return float(_mv()[0].verify(gold, pred, timeout_seconds=_timeouts()[1]))


def verify_reasoning_gym(problem: Problem, response: str) -> float:
    """reasoning-gym's own scorer (kimi_rl.data.reasoning_gym) on the final answer, taken
    as by rules 1-3 (last box or answer line, no hedging, size); full credit scores 1.0."""
    ans, hedged = _final(response)
    if hedged or (ans is not None and len(ans) > MAX_ANSWER_CHARS):
        ans = None
    return reasoning_gym.score(problem, ans)


def answer_view(response: str, task: str, location: str = "final") -> str:
    """What the task's verifier reads of a response. location "final": the response (its
    last box or final answer line counts). "tags" (prompt formats whose answer goes in
    <answer> </answer>, e.g. r1_zero): only the last complete <answer> block of the
    response's tail, given to the verifier as its final answer: as it is when it holds a
    box or a final answer line (or, for code, a program), else as an `answer X` line with
    its whitespace collapsed; no block: "" (scores 0)."""
    if location == "final":
        return response
    if location != "tags":
        raise ValueError(f"prompt.answer: unknown answer location {location!r}")
    from ..prompts import answer_block

    block = answer_block(response[-MAX_SCAN_CHARS:])
    if block is None or not block.strip():
        return ""
    if task == "code" or _final(block)[0] is not None:
        return block
    return "answer " + " ".join(block.split())


class AnswerIn:
    """A verifier that reads the answer where the prompt format puts it (`answer_view`);
    a batch verifier keeps its `batch` method."""

    def __init__(self, verify: Verifier, task: str, location: str):
        self.verify, self.task, self.location = verify, task, location
        if hasattr(verify, "batch"):
            self.batch = lambda problems, texts: verify.batch(
                problems, [answer_view(t, task, location) for t in texts])

    def __call__(self, problem: Problem, response: str) -> float:
        return self.verify(problem, answer_view(response, self.task, self.location))


VERIFIERS: dict[str, Verifier] = {"modsum": modsum.verify, "math": verify_math,
                                  "reasoning_gym": verify_reasoning_gym,
                                  "code": CodeVerifier()}  # default sandbox limits


def get_verifier(task: str, reward: Any = None, answer: str = "final") -> Verifier:
    """The verifier of `task`; with `reward` (a RewardConfig) the code verifier uses its
    sandbox limits and workers (it has a `batch` method: parallel sandboxes). `answer`:
    where the final answer is read ("final", or "tags": the <answer> block, see
    `answer_view`; a PromptFormat's `answer_location`)."""
    if task not in VERIFIERS:
        raise ValueError(f"no verifier for task {task!r} (choose from {sorted(VERIFIERS)})")
    verify = (CodeVerifier.from_config(reward) if task == "code" and reward is not None
              else VERIFIERS[task])
    return verify if answer == "final" else AnswerIn(verify, task, answer)
