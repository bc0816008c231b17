"""Difficulty annotation, `kimi-rl difficulty` (SPEC.md section 3; report sections 2.1, 2.3.4).

Each problem (of data.path, or of the configured task when no file is given) goes through:

1. Form filter (`hack_form`, difficulty.drop_forms): multiple-choice, true/false and proof
   problems are dropped, as the report excludes them (their rewards are easy to hack or
   cannot be checked against a reference). Read from the text:
   - true_false: the answer is true, false, yes, no, correct or incorrect (case, a
     \\text{} wrapper, $ and a trailing period aside);
   - multiple_choice: the answer is one letter A-J (also "(B)", "B." or "\\text{(B)}") and
     the prompt lists choices, i.e. at least two distinct markers "(A)" or "A)" / "A." /
     "A:" at the start of a line, one of them the answer's;
   - proof: the prompt asks to prove (the words "prove", "proof" or "show that").
2. Guess filter (difficulty.guess_tries > 0): the model answers guess_tries times with no
   room to reason: the prompt is followed by the task's guess prefix (`guess_prefix`: an
   opened \\boxed{ for boxed answers, "answer " for modsum), at most guess_max_new_tokens
   tokens are sampled, and the prefix plus them is verified. One correct guess drops the
   problem as easy to hack ("guessed"; the report's filter, with N tries).
3. Pass rate: difficulty.samples responses per remaining problem (difficulty.temperature,
   top_p, max_new_tokens; rollout.repeat_* stop loops), verified by the problem's task
   verifier; the pass rate is the share that scores 1.
4. Level (`level_of`): descending thresholds t_1 > ... > t_m in (0, 1]: level 1 if the pass
   rate is >= t_1, level k if t_k <= rate < t_{k-1}, level m + 1 if below t_m. Harder means
   a lower pass rate; a problem never solved gets the last level.

Outputs, written to temporary files and renamed into place once complete: the kept problems
as JSONL (id, prompt, answer, difficulty = the level, task, tests when set, and pass_rate,
correct, samples), which `data=jsonl data.path=<output>` trains on directly; and next to it
<stem>.report.json (counts per level, dropped counts per reason, each dropped problem with
its reason, the settings). Engine calls take difficulty.problems_per_call problems each, with
a fixed sampling seed per call (`call_seed`), so a run is reproducible for a seed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from tqdm import tqdm

from .data.problems import Problem
from .prompts import RAW, PromptFormat, prompt_format
from .rewards.verify import get_verifier
from .rollout.engine import SamplingParams
from .rollout.samples import generate_groups

FORMS = ("multiple_choice", "true_false", "proof")
GUESS_PREFIX = {"modsum": "answer "}  # task -> guess prefix; other tasks: DEFAULT_GUESS_PREFIX
DEFAULT_GUESS_PREFIX = "\nFinal answer: \\boxed{"
TAGS_GUESS_PREFIX = "</think> <answer> "  # prompt formats with an <answer> block (r1_zero)

_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{(.*)\}", re.DOTALL)
_TRUE_FALSE = {"true", "false", "yes", "no", "correct", "incorrect"}
_CHOICE_ANSWER = re.compile(r"\(?([A-Ja-j])\)?\.?")
_CHOICE_MARKER = re.compile(r"\(([A-J])\)|^[ \t]*([A-J])[.):][ \t]", re.MULTILINE)
_PROOF = re.compile(r"\b(?:prove|proof|show that)\b", re.IGNORECASE)


# ---------------------------------------------------------------- pure functions

def check_thresholds(thresholds: Sequence[float]) -> list[float]:
    """The thresholds as floats; a ValueError names difficulty.thresholds unless they are
    strictly descending and each in (0, 1]."""
    ts = [float(t) for t in thresholds]
    if not all(0 < t <= 1 for t in ts) or any(a <= b for a, b in pairwise(ts)):
        raise ValueError(f"difficulty.thresholds: must be strictly descending pass rates in "
                         f"(0, 1], e.g. [0.8, 0.5, 0.2], got {list(thresholds)}")
    return ts


def level_of(pass_rate: float, thresholds: Sequence[float]) -> int:
    """The level of a pass rate: 1 + the number of thresholds above it (module doc, 4)."""
    return 1 + sum(pass_rate < t for t in thresholds)


def _plain(answer: str) -> str:
    s = answer.strip().replace("$", "").strip()
    while m := _WRAPPER.fullmatch(s):
        s = m.group(1).strip()
    return s.rstrip(".").strip()


def hack_form(problem: Problem) -> str | None:
    """The easy-to-hack form of a problem ("multiple_choice", "true_false", "proof"), or
    None; the rules are in the module doc (step 1)."""
    answer = _plain(problem.answer)
    if answer.lower() in _TRUE_FALSE:
        return "true_false"
    if m := _CHOICE_ANSWER.fullmatch(answer):
        letters = {a or b for a, b in _CHOICE_MARKER.findall(problem.prompt)}
        if len(letters) >= 2 and m.group(1).upper() in letters:
            return "multiple_choice"
    if _PROOF.search(problem.prompt):
        return "proof"
    return None


def count_correct(problems: Sequence[Problem], texts: Sequence[str], n: int,
                  verifier: Callable[[str], Callable[[Problem, str], float]] = get_verifier,
                  prefix: Callable[[Problem], str] = lambda p: "") -> list[int]:
    """Per problem, how many of its n responses (texts[i*n:(i+1)*n], each preceded by
    prefix(problem)) its task's verifier scores 1."""
    if len(texts) != n * len(problems):
        raise ValueError(f"{len(texts)} responses for {len(problems)} problems x {n}")
    return [sum(verifier(p.task)(p, prefix(p) + t) == 1.0 for t in texts[i * n:(i + 1) * n])
            for i, p in enumerate(problems)]


def call_seed(seed: int, phase: str, call: int) -> int:
    """The sampling seed of engine call number `call` of a phase ("guess" or "sample")."""
    return (seed * 1_000_003 + zlib.crc32(f"{phase}/{call}".encode())) % 2**31


# ---------------------------------------------------------------- annotation

@dataclass
class Annotation:
    problem: Problem
    dropped: str | None = None  # a form, or "guessed"
    guessed: int = 0  # correct guesses
    correct: int = 0  # correct responses of `samples`
    samples: int = 0
    pass_rate: float | None = None
    level: int | None = None


def guess_prefix(problem: Problem, override: str | None = None, answer: str = "final") -> str:
    """The text a guess starts with: `override`, else per task, or (answer location
    "tags") the closed reasoning and an opened answer block."""
    if override is not None:
        return override
    if answer == "tags":
        return TAGS_GUESS_PREFIX
    return GUESS_PREFIX.get(problem.task, DEFAULT_GUESS_PREFIX)


def check_settings(d) -> list[float]:
    """Values of a DifficultyConfig the schema cannot check; returns the thresholds."""
    def require(key: str, ok: bool, want: str) -> None:
        if not ok:
            raise ValueError(f"difficulty.{key}: must be {want}, got {getattr(d, key)!r}")

    require("output", bool(d.output) and str(d.output).endswith(".jsonl"),
            "the path of the annotated JSONL file to write (ending in .jsonl)")
    require("samples", d.samples >= 1, "an integer >= 1")
    require("temperature", d.temperature > 0, "a number > 0 (sampled responses)")
    require("top_p", 0 < d.top_p <= 1, "a number in (0, 1]")
    require("max_new_tokens", d.max_new_tokens is None or d.max_new_tokens >= 1,
            "null or an integer >= 1")
    require("drop_forms", set(d.drop_forms) <= set(FORMS), f"a subset of {list(FORMS)}")
    require("guess_tries", d.guess_tries >= 0, "an integer >= 0")
    require("guess_max_new_tokens", d.guess_max_new_tokens >= 1, "an integer >= 1")
    require("problems_per_call", d.problems_per_call >= 1, "an integer >= 1")
    return check_thresholds(d.thresholds)


def annotate(engine, tokenizer, problems: Sequence[Problem], d, max_new_tokens: int,
             repeat=None, progress: bool = True, fmt: PromptFormat | None = None
             ) -> list[Annotation]:
    """Steps 1-4 of the module doc for every problem, in order; `d` is a DifficultyConfig,
    `fmt` the prompt format (default raw): guesses follow its prompt, and verifiers read
    the answer where it puts it."""
    fmt = fmt or RAW
    where = fmt.answer_location
    thresholds = check_thresholds(d.thresholds)
    out = [Annotation(p) for p in problems]
    for a in out:
        form = hack_form(a.problem)
        if form in d.drop_forms:
            a.dropped = form

    def phase(name: str, todo: list[Annotation], k: int, tokens: int, prefix) -> None:
        per_call = d.problems_per_call
        bar = tqdm(total=len(todo), desc=name, disable=not progress, leave=False)
        for call, lo in enumerate(range(0, len(todo), per_call)):
            chunk = todo[lo:lo + per_call]
            asked = [a.problem for a in chunk]
            params = SamplingParams(d.temperature, d.top_p, repeat=repeat,
                                    seed=call_seed(d.seed, name, call))
            samples = generate_groups(engine, tokenizer, asked, k, tokens, params, fmt, prefix)
            hits = count_correct(asked, [s.text for s in samples], k,
                                 lambda task: get_verifier(task, answer=where), prefix)
            for a, c in zip(chunk, hits, strict=True):
                if name == "guess":
                    a.guessed = c
                    a.dropped = "guessed" if c else None
                else:
                    a.correct, a.samples, a.pass_rate = c, k, c / k
                    a.level = level_of(a.pass_rate, thresholds)
            bar.update(len(chunk))
        bar.close()

    if d.guess_tries:
        phase("guess", [a for a in out if a.dropped is None], d.guess_tries,
              d.guess_max_new_tokens, lambda p: guess_prefix(p, d.guess_prefix, where))
    phase("sample", [a for a in out if a.dropped is None], d.samples, max_new_tokens,
          lambda p: "")
    return out


def row(a: Annotation) -> dict:
    """The output JSONL row of a kept problem (load_problems' schema plus the counts)."""
    p = a.problem
    out = {"id": p.id, "prompt": p.prompt, "answer": p.answer, "difficulty": a.level,
           "task": p.task}
    if p.tests is not None:
        out["tests"] = p.test_cases
    out.update(pass_rate=a.pass_rate, correct=a.correct, samples=a.samples)
    return out


def report(annotations: Sequence[Annotation], thresholds: Sequence[float]) -> dict:
    """Counts per level (kept problems), dropped counts per reason, dropped problems."""
    kept = [a for a in annotations if a.dropped is None]
    levels = Counter(a.level for a in kept)
    dropped = [a for a in annotations if a.dropped is not None]
    return {
        "problems": len(annotations),
        "kept": len(kept),
        "levels": {str(lv): levels.get(lv, 0) for lv in range(1, len(thresholds) + 2)},
        "pass_rate_mean": sum(a.pass_rate for a in kept) / len(kept) if kept else None,
        "dropped": dict(Counter(a.dropped for a in dropped)),
        "dropped_problems": [{"id": a.problem.id, "reason": a.dropped, "guessed": a.guessed}
                             for a in dropped],
    }


def write_atomic(files: dict[Path, str]) -> None:
    """Write every file to a temporary name beside it, then rename them all into place:
    a failure leaves no half-written output."""
    tmps = {}
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps[path] = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmps[path].write_text(text, encoding="utf-8")
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def report_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".report.json")


def format_report(rep: dict) -> str:
    lines = [f"kept {rep['kept']} of {rep['problems']} problems"]
    lines += [f"  level {lv}: {n}" for lv, n in rep["levels"].items()]
    lines += [f"  dropped ({reason}): {n}" for reason, n in sorted(rep["dropped"].items())]
    return "\n".join(lines)


def load_input(cfg) -> tuple[list[Problem], object]:
    """The problems to annotate (data.path in file order, else the task's train and test
    problems) and the TaskData to build the policy from."""
    from .data import TaskData, load_problems, load_task

    if cfg.data.path:
        row_task = "math" if cfg.data.task == "modsum" else cfg.data.task
        problems, rep = load_problems(cfg.data.path, row_task, dict(cfg.data.columns),
                                      cfg.data.bad_rows)
        if rep.skipped:
            print(rep.summary(), file=sys.stderr, flush=True)
        return problems, TaskData(problems, [])
    task = load_task(cfg.data)
    return task.train + task.test, task


def check_problems(problems: Sequence[Problem], source: str) -> None:
    """Every problem has a verifier that accepts it (run on an empty response), before any
    sampling; a ValueError names the source and the problem."""
    for p in problems:
        try:
            get_verifier(p.task)(p, "")
        except ValueError as e:
            raise ValueError(f"{source}: problem {p.id!r}: {e}") from None


def run_difficulty(cfg) -> dict:
    """`kimi-rl difficulty`: annotate, write the output JSONL and its report, return the
    report."""
    from omegaconf import OmegaConf

    from . import host
    from .build import build_engine, build_policy
    from .loop import repeat_detection

    d = cfg.difficulty
    thresholds = check_settings(d)
    host.setup(cfg.num_threads)
    problems, task = load_input(cfg)
    check_problems(problems, cfg.data.path or f"data.task={cfg.data.task}")
    policy, tokenizer = build_policy(cfg, task)
    engine = build_engine(cfg, policy, tokenizer)
    tokens = d.max_new_tokens or cfg.rollout.max_new_tokens
    annotations = annotate(engine, tokenizer, problems, d, tokens,
                           repeat_detection(cfg.rollout), cfg.progress, prompt_format(cfg))
    rep = report(annotations, thresholds)
    output = Path(d.output)
    rep = {"input": cfg.data.path or f"data.task={cfg.data.task}", "output": str(output),
           **rep, "settings": {**OmegaConf.to_container(d), "max_new_tokens": tokens,
                               "model": cfg.model.path}}
    rows = "".join(json.dumps(row(a), ensure_ascii=False) + "\n"
                   for a in annotations if a.dropped is None)
    write_atomic({output: rows, report_path(output): json.dumps(rep, indent=2) + "\n"})
    print(format_report(rep))
    print(f"wrote {output} and {report_path(output)}")
    if not rep["kept"]:
        print(f"warning: every problem was dropped; {output} is empty", file=sys.stderr)
    return rep
