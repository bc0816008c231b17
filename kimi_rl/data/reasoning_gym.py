"""reasoning-gym datasets as a problem source (data.task=reasoning_gym).

reasoning-gym (the `reasoning_gym` package) generates procedural reasoning problems from a
dataset name, a config of difficulty settings and a seed, and scores answers with each
dataset's own scorer. Here:

- Levels. `data.rg_levels` maps a dataset name to a table {level: config overrides}: the
  problems of level L are generated with that dataset's config plus the level's overrides,
  e.g. chain_sum {1: {min_terms: 2, max_terms: 2}, 2: {min_terms: 3, max_terms: 3}}. A
  dataset contributes only to the levels its table lists; one named in `data.rg_datasets`
  without a table gives level 1 with its default settings. `seed` and `size` are set here,
  not in the overrides.
- Sizes and seeds. Per dataset and level, `test_per_level` held-out problems and then
  `train_per_level` training problems, drawn in index order from a dataset seeded by
  data.seed, the dataset name and the level. A question seen before (in any dataset or
  level) is skipped, so no question appears twice and none is in both splits; a level whose
  settings allow fewer distinct questions yields fewer problems, with a warning.
- Problems. The prompt is the question plus an instruction to reason and put the final
  answer in \\boxed{}; `answer` is the dataset's gold answer; `task` is "reasoning_gym";
  `tests` holds one object {"dataset", "settings", "entry"}: the dataset's entry
  (question, answer, metadata), which its scorer reads, and the settings it was made with.
  Values JSON cannot hold (fractions, sets) are stored as text; the build checks that the
  stored entry still gives the gold answer full credit.
- Scoring (`score`, used by the "reasoning_gym" verifier in kimi_rl.rewards.verify): the
  dataset's `score_answer` on the response's final answer; only full credit counts (1.0),
  partial credit (some scorers give 0.01 for a well-formed wrong answer) scores 0.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import fields
from functools import lru_cache
from typing import Any

from .modsum import FLAWS
from .problems import Problem

TASK = "reasoning_gym"
INSTRUCTION = ("Think step by step, then give your final answer, in the form the question "
               "asks for, as \\boxed{...} on the last line.")
RESERVED = ("seed", "size")  # settings set from data.seed and the sizes
SEARCH_FACTOR, SEARCH_EXTRA = 4, 200  # indices tried per level: need * factor + extra


def _datasets() -> dict:
    from reasoning_gym.factory import DATASETS

    return DATASETS


def _check_name(name: str, key: str) -> None:
    known = _datasets()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {close}?" if close else f"choose from {sorted(known)}"
        raise ValueError(f"{key}: unknown reasoning-gym dataset {name!r} ({hint})")


def level_table(names: Sequence[str], levels: Mapping[str, Mapping[int, Mapping[str, Any]]]
                ) -> dict[str, dict[int, dict[str, Any]]]:
    """The validated {dataset: {level: overrides}} for the datasets in `names` (a dataset
    without a table: {1: {}}). Every dataset, level and setting named is checked, also in
    tables of datasets not used; errors name the key (data.rg_datasets / data.rg_levels...)."""
    if not names:
        raise ValueError("data.rg_datasets: empty; name the reasoning-gym datasets to use, "
                         "e.g. data.rg_datasets=[chain_sum,countdown]")
    for i, name in enumerate(names):
        _check_name(name, f"data.rg_datasets[{i}]")
    if len(set(names)) != len(names):
        raise ValueError(f"data.rg_datasets: a dataset is named twice: {list(names)}")
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_level in levels.items():
        _check_name(name, f"data.rg_levels.{name}")
        allowed = {f.name for f in fields(_datasets()[name][1])} - set(RESERVED)
        table[name] = {}
        for level, settings in by_level.items():
            key = f"data.rg_levels.{name}.{level}"
            if isinstance(level, bool) or not isinstance(level, int) or level < 1:
                raise ValueError(f"{key}: a level must be an integer >= 1, got {level!r}")
            if not isinstance(settings, Mapping):
                raise ValueError(f"{key}: must be a mapping of {name} settings, got {settings!r}")
            for setting in settings:
                if setting not in allowed:
                    why = ("is set from data.seed and the sizes" if setting in RESERVED
                           else f"is not a {name} setting (choose from {sorted(allowed)})")
                    raise ValueError(f"{key}.{setting}: {why}")
            table[name][level] = dict(settings)
        if not table[name]:
            raise ValueError(f"data.rg_levels.{name}: no levels; give {{level: settings}}")
    return {name: table.get(name, {1: {}}) for name in names}


def level_seed(seed: int, name: str, level: int) -> int:
    """The generation seed of one dataset and level (stable across runs and machines)."""
    return (seed * 1_000_003 + zlib.crc32(f"{name}/{level}".encode())) % 2**31


def _jsonable(value: Any) -> Any:
    """A JSON stand-in for a value JSON cannot hold: sets as sorted lists, others (such as
    fractions) as text."""
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


def _dataset(name: str, settings: dict[str, Any], seed: int, size: int):
    from reasoning_gym.factory import create_dataset

    key = f"data.rg_levels.{name}"
    try:
        return create_dataset(name, **settings, seed=seed, size=size)
    except (AssertionError, TypeError, ValueError) as e:
        raise ValueError(f"{key}: reasoning-gym rejects the settings {settings} of {name}: "
                         f"{e or 'a setting is out of range'}") from None


def generate(names: Sequence[str], levels: Mapping[str, Mapping[int, Mapping[str, Any]]],
             train_per_level: int, test_per_level: int, seed: int
             ) -> tuple[list[Problem], list[Problem]]:
    """(train, test) problems of the datasets in `names` at the levels of their tables
    (module doc); `levels` as data.rg_levels. Deterministic for a seed."""
    if train_per_level < 0 or test_per_level < 0:
        raise ValueError(f"data.train_per_level / data.test_per_level: must be >= 0, got "
                         f"{train_per_level} / {test_per_level}")
    from tqdm import tqdm

    table = level_table(names, levels)
    train: list[Problem] = []
    test: list[Problem] = []
    seen: set[str] = set()
    need = train_per_level + test_per_level
    bar = tqdm(total=need * sum(map(len, table.values())), desc="reasoning-gym",
               disable=None, leave=False)  # shown on a terminal only
    for name, by_level in table.items():
        for level, settings in sorted(by_level.items()):
            size = need * SEARCH_FACTOR + SEARCH_EXTRA
            ds = _dataset(name, settings, level_seed(seed, name, level), size)
            made: list[Problem] = []
            for index in range(size):
                if len(made) == need:
                    break
                entry = ds[index]
                if entry["question"] in seen:
                    continue
                seen.add(entry["question"])
                made.append(_problem(name, level, index, settings, entry))
                bar.update(1)
            if made:
                _check_scorer(made[0])
            if len(made) < need:
                print(f"reasoning-gym {name} level {level}: {len(made)} distinct problems "
                      f"in {size} tries, {need} asked for", file=sys.stderr, flush=True)
            test += made[:test_per_level]
            train += made[test_per_level:]
    bar.close()
    if not train and not test:
        raise ValueError("data.rg_datasets: no problems (data.train_per_level and "
                         "data.test_per_level are 0)")
    return train, test


def _problem(name: str, level: int, index: int, settings: dict[str, Any], entry: dict
             ) -> Problem:
    spec = {"dataset": name, "settings": settings,
            "entry": {k: entry[k] for k in ("question", "answer", "metadata") if k in entry}}
    tests = json.dumps([spec], sort_keys=True, ensure_ascii=False, default=_jsonable)
    prompt = f"{entry['question'].rstrip()}\n\n{INSTRUCTION}\n"
    return Problem(f"{name}-L{level}-{index}", prompt, str(entry["answer"]), level, TASK, tests)


def _check_scorer(problem: Problem) -> None:
    """The stored entry must still give the gold answer full credit (a scorer that needs a
    value JSON cannot hold would not)."""
    if score(problem, problem.answer) != 1.0:
        name = json.loads(problem.tests)[0]["dataset"]
        raise ValueError(f"data.rg_datasets: reasoning-gym dataset {name!r} is not supported: "
                         "its scorer does not give its own gold answer full credit once the "
                         "entry is stored as JSON")


def entry_of(problem: Problem) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(dataset name, settings, entry) stored on a reasoning-gym problem; a ValueError
    names the problem when its `tests` field does not hold them."""
    spec = None
    try:
        cases = problem.test_cases
        if isinstance(cases, list) and len(cases) == 1 and isinstance(cases[0], dict):
            spec = cases[0]
    except json.JSONDecodeError:
        pass
    if (spec is None or not isinstance(spec.get("dataset"), str)
            or not isinstance(spec.get("entry"), dict)
            or not isinstance(spec.get("settings", {}), dict)):
        raise ValueError(f"problem {problem.id!r} (task {TASK}): its 'tests' field must hold "
                         '[{"dataset": name, "settings": {...}, "entry": {question, answer, '
                         "metadata}}], as kimi_rl.data.reasoning_gym writes it")
    return spec["dataset"], spec.get("settings", {}), spec["entry"]


@lru_cache(maxsize=256)
def _scorer(name: str, settings_json: str):
    settings = json.loads(settings_json)
    return _dataset(name, settings, 0, 1).score_answer


def score(problem: Problem, answer: str | None) -> float:
    """1.0 if the dataset's own scorer gives `answer` (a final answer, already extracted)
    full credit for the problem's stored entry, else 0.0."""
    name, settings, entry = entry_of(problem)
    _check_name(name, f"problem {problem.id!r}")
    if answer is None:
        return 0.0
    fn = _scorer(name, json.dumps(settings, sort_keys=True))
    try:
        credit = float(fn(answer, entry))
    except Exception:  # noqa: BLE001 - a scorer that chokes on an answer gives it nothing
        return 0.0
    return float(credit >= 1.0)


# datasets with a programmatic chain-of-thought teacher (`demonstration`)
TEACHERS = ("chain_sum", "basic_arithmetic")


def demo_table(names: Sequence[str], levels: Mapping[str, Mapping[int, Any]],
               demos: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
    """The validated data.rg_demos: every dataset named is used (data.rg_datasets) and has a
    teacher, every level is one of its table's, every count an integer >= 0."""
    table = level_table(names, levels)
    out: dict[str, dict[int, int]] = {}
    for name, by_level in demos.items():
        key = f"data.rg_demos.{name}"
        if name not in table:
            raise ValueError(f"{key}: {name!r} is not in data.rg_datasets {list(names)}")
        if name not in TEACHERS:
            raise ValueError(f"{key}: {name} has no programmatic teacher (datasets with one: "
                             f"{list(TEACHERS)})")
        if not isinstance(by_level, Mapping):
            raise ValueError(f"{key}: must be a mapping level -> count, got {by_level!r}")
        for level, count in by_level.items():
            if level not in table[name]:
                raise ValueError(f"{key}.{level}: {name} has no level {level} (its levels: "
                                 f"{sorted(table[name])})")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"{key}.{level}: a count must be an integer >= 0, got "
                                 f"{count!r}")
        out[name] = {int(k): int(v) for k, v in by_level.items() if v}
    return out


def _terms(expression: str) -> tuple[list[int], list[str]] | None:
    """Integers and the + / - between them of `a op b op c ...` (space-separated, negative
    numbers allowed); None for anything else (parentheses, * or /)."""
    tokens = expression.split()
    if len(tokens) < 3 or len(tokens) % 2 == 0:
        return None
    try:
        numbers = [int(t) for t in tokens[0::2]]
    except ValueError:
        return None
    ops = tokens[1::2]
    return (numbers, ops) if all(op in ("+", "-") for op in ops) else None


def demonstration(problem: Problem, flaw: str | None = None) -> str | None:
    """A chain-of-thought response for a reasoning-gym problem whose dataset has a teacher
    (TEACHERS) and whose expression is a chain of + and - (left to right, a line per
    operation), ending with the answer as \\boxed{} on the last line; None otherwise. The
    response is checked by the dataset's own scorer: it is right. `flaw` gives an imperfect
    teacher's response instead (the built-in task's FLAWS): `stop_early` leaves out the
    last operation and answers with the result so far, `slip` gets the last result one too
    high; either answers wrongly (stop_early unless the last operand is 0)."""
    name, _, entry = entry_of(problem)
    if name not in TEACHERS:
        return None
    parsed = _terms(str(entry.get("metadata", {}).get("expression", "")))
    if parsed is None:
        return None
    numbers, ops = parsed
    lines, results = [], [numbers[0]]
    for op, b in zip(ops, numbers[1:], strict=True):
        acc = results[-1]
        results.append(acc + b if op == "+" else acc - b)
        lines.append(f"{acc} {op} {b} = {results[-1]}")
    if score(problem, str(results[-1])) != 1.0:
        return None
    if flaw == "stop_early":
        lines, results = lines[:-1], results[:-1]
    elif flaw == "slip":
        results[-1] += 1
        lines[-1] = f"{lines[-1].rsplit(' = ', 1)[0]} = {results[-1]}"
    elif flaw is not None:
        raise ValueError(f"demonstration: unknown flaw {flaw!r} (choose from {list(FLAWS)})")
    return "\n".join(lines + [f"The answer is \\boxed{{{results[-1]}}}."])


def vocabulary(problems: Sequence[Problem]) -> list[str]:
    """Characters for the built-in character tokenizer: printable ASCII and newline, plus
    every character of the prompts and answers."""
    chars = {chr(c) for c in range(32, 127)} | {"\n"}
    for p in problems:
        chars.update(p.prompt)
        chars.update(p.answer)
    return sorted(chars)
