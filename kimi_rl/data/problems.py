"""Problem records, and loading them from local files with validation that names file and row.

Sources (`load_problems`): a JSONL file (`.jsonl`, or `.json` holding JSONL or one JSON
array of objects), a Parquet file (`.parquet`, read through `datasets`), or a directory
written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its "train"
split, or its only split). Rows are numbered from 1 in file order: the line number for
JSONL (blank lines are skipped but counted), the row index + 1 otherwise.

Schema of a row (each field read from the column of the same name unless `columns` maps it
elsewhere, e.g. {"prompt": "question", "answer": "final_answer", "difficulty": "level"}):

  prompt      str, required, not blank
  answer      str or number, required, not blank; numbers become strings
  difficulty  int, optional (default 1); an integral float is accepted, bools are not
  task        str, optional (default: the `task` argument, data.task)
  id          str or int, optional (default "<file stem>-<row>"); must be unique
  tests       optional list of test cases for code problems (any JSON values, e.g.
              {"input": ..., "output": ...}), or a string holding such a JSON list; stored
              on the Problem as canonical JSON text (`Problem.tests`), decoded by
              `Problem.test_cases`

A null value counts as absent for the optional fields. A bad row either raises `DataError`
naming file and row (bad_rows="fail") or is skipped and listed in the `LoadReport`
(bad_rows="skip"); good rows are always kept, in file order.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ("prompt", "answer", "difficulty", "task", "id", "tests")
BAD_ROWS = ("fail", "skip")


@dataclass(frozen=True)
class Problem:
    """One verifiable problem: the prompt text, the reference answer and a difficulty level;
    `tests` holds a code problem's test cases as JSON text of a list (None: no tests)."""

    id: str
    prompt: str
    answer: str
    level: int = 1
    task: str = "modsum"
    tests: str | None = None

    @property
    def test_cases(self) -> list[Any] | None:
        return None if self.tests is None else json.loads(self.tests)


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


@dataclass
class LoadReport:
    """What loading a problem file did: rows loaded, and one message per skipped bad row."""

    path: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self, limit: int = 20) -> str:
        """One line with the count and the first bad row, then up to `limit` messages."""
        if not self.skipped:
            return f"data: loaded {self.loaded} problems from {self.path}"
        lines = [f"data: skipped {len(self.skipped)} bad rows of {self.path} "
                 f"(first: {self.skipped[0]})"]
        lines += [f"  {m}" for m in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


class _BadRow(Exception):
    pass


def load_jsonl(path: str | Path, task: str = "math", id_prefix: str | None = None) -> list[Problem]:
    """Read problems from a JSONL file; the first bad row raises `DataError`."""
    return load_problems(path, task, id_prefix=id_prefix)[0]


def load_problems(path: str | Path, task: str = "math", columns: Mapping[str, str] | None = None,
                  bad_rows: str = "fail", id_prefix: str | None = None,
                  ) -> tuple[list[Problem], LoadReport]:
    """Problems from a JSONL/JSON file, a Parquet file or a saved `datasets` directory (see
    the module docstring for the schema); returns them with a `LoadReport`."""
    path = Path(path)
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"data.columns: unknown field(s) {unknown} (choose from {list(FIELDS)})")
    if bad_rows not in BAD_ROWS:
        raise DataError(f"data.bad_rows: {bad_rows!r} is not one of {list(BAD_ROWS)}")
    if not path.exists():
        raise DataError(f"problem file not found: {path}")
    col = {f: str(columns.get(f, f)) for f in FIELDS}
    if path.is_dir():
        rows, names = _read_saved(path)
    elif path.suffix.lower() in (".jsonl", ".json"):
        rows, names = _read_jsonl(path)
    elif path.suffix.lower() == ".parquet":
        rows, names = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported problem file (expected .jsonl, .json, .parquet "
                        "or a directory written by datasets' save_to_disk)")
    # a column named in data.columns (or a required one of a table) must exist in the source
    must = set(columns.values()) | (set() if names is None else {col["prompt"], col["answer"]})
    if names is None:  # JSONL: the keys of any row; no check when no row is an object
        rows = list(rows)
        names = sorted({k for _, r in rows if isinstance(r, dict) for k in r}) or None
    missing = [] if names is None else sorted(must - set(names))
    if missing:
        used = {c: [f for f in FIELDS if col[f] == c] for c in missing}
        raise DataError(f"{path}: column(s) {missing} not found (for fields {used}); the "
                        f"file has columns {list(names)}; map fields with data.columns")

    prefix = id_prefix or path.stem
    report = LoadReport(str(path))
    problems: list[Problem] = []
    seen: set[str] = set()
    for row, rec in rows:
        where = f"{path}, row {row}"
        try:
            p = _problem(rec, col, task, f"{prefix}-{row}")
            if p.id in seen:
                raise _BadRow(f"duplicate id {p.id!r}")
        except _BadRow as e:
            if bad_rows == "fail":
                raise DataError(f"{where}: {e}") from None
            report.skipped.append(f"{where}: {e}")
            continue
        seen.add(p.id)
        problems.append(p)
    report.loaded = len(problems)
    if not problems:
        if report.skipped:
            raise DataError(f"{path}: no good problems; all {len(report.skipped)} rows are bad "
                            f"(first: {report.skipped[0]})")
        raise DataError(f"{path}: no problems in file")
    return problems, report


def _problem(rec: Any, col: dict[str, str], task: str, default_id: str) -> Problem:
    """Validate one row (an error raises `_BadRow` with the message, without the place)."""
    if isinstance(rec, _BadRow):
        raise rec
    if not isinstance(rec, dict):
        raise _BadRow(f"expected a JSON object, got {type(rec).__name__}")

    def name(f: str) -> str:
        return f"'{f}'" if col[f] == f else f"'{f}' (column {col[f]!r})"

    prompt, answer = rec.get(col["prompt"]), rec.get(col["answer"])
    if not isinstance(prompt, str) or not prompt.strip():
        raise _BadRow(f"{name('prompt')} is missing or empty")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise _BadRow(f"{name('answer')} is missing or empty")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise _BadRow(f"{name('answer')} must be a string or a number, got {answer!r}")
    level = rec.get(col["difficulty"])
    if level is None:
        level = 1
    elif isinstance(level, float) and level.is_integer():
        level = int(level)
    if not isinstance(level, int) or isinstance(level, bool):
        raise _BadRow(f"{name('difficulty')} must be an integer, got {level!r}")
    kind = rec.get(col["task"])
    if kind is None:
        kind = task
    elif not isinstance(kind, str) or not kind.strip():
        raise _BadRow(f"{name('task')} must be a non-empty string, got {kind!r}")
    pid = rec.get(col["id"])
    if pid is None:
        pid = default_id
    elif isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
        raise _BadRow(f"{name('id')} must be a non-empty string or an integer, got {pid!r}")
    tests = rec.get(col["tests"])
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            raise _BadRow(f"{name('tests')} is a string but not a JSON list") from None
    if tests is not None:
        if not isinstance(tests, list):
            raise _BadRow(f"{name('tests')} must be a list of test cases, got "
                          f"{type(tests).__name__}")
        tests = json.dumps(tests, sort_keys=True, ensure_ascii=False)
    return Problem(str(pid), prompt, str(answer), level, kind, tests)


Rows = Iterator[tuple[int, Any]]


def _read_jsonl(path: Path) -> tuple[Rows, None]:
    """(row, record or _BadRow) per non-blank line; a `.json` file may instead hold one
    JSON array of records (row = its index + 1)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        return iter(enumerate(data, start=1)), None

    def rows() -> Rows:
        for row, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield row, json.loads(line)
            except json.JSONDecodeError as e:
                yield row, _BadRow(f"not valid JSON ({e.msg})")

    return rows(), None


def _table_rows(ds: Any) -> tuple[Rows, list[str]]:
    return iter(enumerate(ds, start=1)), list(ds.column_names)


def _read_parquet(path: Path) -> tuple[Rows, list[str]]:
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:  # the prepared Arrow cache goes to a temporary directory, the rows stay in memory
        with tempfile.TemporaryDirectory(prefix="kimi_rl_data_") as cache:
            ds = datasets.load_dataset("parquet", data_files=str(path), split="train",
                                       cache_dir=cache, keep_in_memory=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise DataError(f"{path}: cannot read Parquet file ({type(e).__name__}: {e})") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    return _table_rows(ds)


def _read_saved(path: Path) -> tuple[Rows, list[str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a directory written by datasets' save_to_disk "
                        f"({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"{path}: a DatasetDict without a 'train' split and with several "
                            f"splits {splits}; save the one to use on its own")
    return _table_rows(ds)
