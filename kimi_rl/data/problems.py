"""Problem records and loading from JSONL files, with validation that names file and row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One verifiable problem: the prompt text, the reference answer and a difficulty level."""

    id: str
    prompt: str
    answer: str
    level: int = 1
    task: str = "modsum"


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


def load_jsonl(path: str | Path, task: str = "math", id_prefix: str | None = None) -> list[Problem]:
    """Read problems from a JSONL file: one object per line with `prompt` and `answer`
    (non-empty) and an optional integer `difficulty` (default 1) and `id`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"problem file not found: {path}")
    prefix = id_prefix or path.stem
    problems, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, row {row}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            prompt, answer = rec.get("prompt"), rec.get("answer")
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{where}: 'prompt' is missing or empty")
            if answer is None or (isinstance(answer, str) and not answer.strip()):
                raise DataError(f"{where}: 'answer' is missing or empty")
            level = rec.get("difficulty", 1)
            if not isinstance(level, int) or isinstance(level, bool):
                raise DataError(f"{where}: 'difficulty' must be an integer, got {level!r}")
            pid = str(rec.get("id", f"{prefix}-{row}"))
            if pid in seen:
                raise DataError(f"{where}: duplicate id {pid!r}")
            seen.add(pid)
            problems.append(Problem(pid, prompt, str(answer), level, rec.get("task", task)))
    if not problems:
        raise DataError(f"{path}: no problems in file")
    return problems
