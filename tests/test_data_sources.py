"""Problem files as JSONL, Parquet and saved `datasets` directories: schema, column mapping,
and bad rows that either fail the run or are skipped and reported with file and row."""

from __future__ import annotations

import json

import datasets
import pytest

from kimi_rl.config import DataConfig
from kimi_rl.data import load_task
from kimi_rl.data.problems import DataError, Problem, load_jsonl, load_problems

TESTS = [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]
ROWS = [
    {"id": "a", "prompt": "What is 2+2?", "answer": "4", "difficulty": 1, "task": "math",
     "tests": None},
    {"id": "b", "prompt": "Add two numbers.", "answer": "def f(a, b): ...", "difficulty": 3,
     "task": "code", "tests": TESTS},
    {"id": "c", "prompt": "Ünïcode", "answer": "\\frac{1}{2}", "difficulty": None,
     "task": None, "tests": None},
]
EXPECTED = [
    Problem("a", "What is 2+2?", "4", 1, "math"),
    Problem("b", "Add two numbers.", "def f(a, b): ...", 3, "code",
            json.dumps(TESTS, sort_keys=True)),
    Problem("c", "Ünïcode", "\\frac{1}{2}", 1, "math"),
]


def write_jsonl(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")


def rename(rows, mapping):
    return [{mapping.get(k, k): v for k, v in r.items()} for r in rows]


@pytest.fixture(params=["jsonl", "json", "parquet", "saved", "saved_dict"])
def source(request, tmp_path):
    """A writer: rows -> the path of a problem file in the selected format."""
    def make(rows, name="probs"):
        if request.param == "jsonl":
            path = tmp_path / f"{name}.jsonl"
            write_jsonl(path, rows)
        elif request.param == "json":
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps(rows), encoding="utf-8")
        elif request.param == "parquet":
            path = tmp_path / f"{name}.parquet"
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        else:
            path = tmp_path / name
            ds = datasets.Dataset.from_list(rows)
            if request.param == "saved_dict":
                ds = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
            ds.save_to_disk(str(path))
        return path
    return make


def test_formats_load_equal_problems(source, tmp_path):
    path = source(ROWS)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    problems, report = load_problems(path)
    assert problems == EXPECTED
    assert report.loaded == 3 and report.skipped == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "no cache files written"
    assert problems[1].test_cases == TESTS and problems[0].test_cases is None
    assert len(set(problems)) == 3  # hashable


def test_column_mapping(source):
    mapping = {"prompt": "question", "answer": "final_answer", "difficulty": "level",
               "id": "uid", "tests": "cases"}
    path = source(rename(ROWS, mapping))
    problems, _ = load_problems(path, columns=mapping)
    assert problems == EXPECTED


def test_default_ids_and_task(source):
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS]
    problems, _ = load_problems(source(rows), task="code")
    assert [p.id for p in problems] == ["probs-1", "probs-2", "probs-3"]
    assert {p.task for p in problems} == {"code"}


def test_missing_mapped_column_names_file_and_column(source):
    path = source(ROWS)
    with pytest.raises(DataError) as err:
        load_problems(path, columns={"prompt": "question"})
    msg = str(err.value)
    assert str(path) in msg and "'question'" in msg and "'answer'" in msg  # columns that exist


def test_unknown_columns_key(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, ROWS)
    with pytest.raises(DataError, match="promt"):
        load_problems(path, columns={"promt": "question"})
    with pytest.raises(DataError, match="bad_rows"):
        load_problems(path, bad_rows="ignore")


GOOD = [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)]
BROKEN = [  # (line, the error message's key phrase); rows numbered from 1
    GOOD[0],
    '{"prompt": "q", "answer": ',                                 # 2: bad JSON
    GOOD[1],
    {"prompt": "q"},                                              # 4: missing answer
    {"prompt": "", "answer": "1"},                                # 5: empty prompt
    "",                                                           # 6: blank, not a row
    GOOD[2],
    {"prompt": "q", "answer": "1", "difficulty": "hard"},         # 8: non-int difficulty
    {"prompt": "q", "answer": "1", "id": "probs-1"},              # 9: duplicate id
    '["q", "1"]',                                                 # 10: not an object
    GOOD[3],
    {"prompt": "q", "answer": "1", "tests": "nope"},              # 12: tests not a list
    GOOD[4],
]
BAD = {2: "not valid JSON", 4: "'answer' is missing or empty",
       5: "'prompt' is missing or empty", 8: "'difficulty' must be an integer",
       9: "duplicate id 'probs-1'", 10: "expected a JSON object", 12: "'tests'"}


def test_broken_rows_fail_on_the_first(tmp_path):
    path = tmp_path / "probs.jsonl"
    write_jsonl(path, BROKEN)
    with pytest.raises(DataError) as err:
        load_problems(path, bad_rows="fail")
    assert str(err.value).startswith(f"{path}, row 2: not valid JSON")
    with pytest.raises(DataError, match="row 2"):
        load_jsonl(path)


def test_broken_rows_skipped_and_reported(tmp_path):
    path = tmp_path / "probs.jsonl"
    write_jsonl(path, BROKEN)
    problems, report = load_problems(path, bad_rows="skip")
    assert [(p.prompt, p.answer) for p in problems] == [(g["prompt"], g["answer"]) for g in GOOD]
    assert [p.id for p in problems] == ["probs-1", "probs-3", "probs-7", "probs-11", "probs-13"]
    assert report.loaded == 5 and len(report.skipped) == len(BAD)
    for msg, (row, phrase) in zip(report.skipped, sorted(BAD.items()), strict=True):
        assert msg.startswith(f"{path}, row {row}: ") and phrase in msg, msg
    summary = report.summary()
    assert summary.splitlines()[0].startswith(f"data: skipped 7 bad rows of {path} (first: ")
    assert all(m in summary for m in report.skipped)


def test_summary_caps_messages():
    from kimi_rl.data.problems import LoadReport
    report = LoadReport("f.jsonl", 1, [f"f.jsonl, row {i}: bad" for i in range(1, 31)])
    lines = report.summary().splitlines()
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 10 more"


def test_all_rows_bad_is_an_error(tmp_path):
    path = tmp_path / "probs.jsonl"
    write_jsonl(path, [{"prompt": "q"}, "nonsense"])
    with pytest.raises(DataError, match="no good problems"):
        load_problems(path, bad_rows="skip")


def test_parquet_null_answer_skipped(tmp_path):
    path = tmp_path / "probs.parquet"
    rows = [{"prompt": "q1", "answer": "1"}, {"prompt": "q2", "answer": None},
            {"prompt": "q3", "answer": "3"}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"row 2: 'answer' is missing or empty"):
        load_problems(path)
    problems, report = load_problems(path, bad_rows="skip")
    assert [p.id for p in problems] == ["probs-1", "probs-3"]
    assert report.skipped == [f"{path}, row 2: 'answer' is missing or empty"]


def test_saved_dict_without_train_names_the_splits(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"\['a', 'b'\]"):
        load_problems(tmp_path / "d")
    datasets.DatasetDict({"only": ds}).save_to_disk(str(tmp_path / "e"))
    assert load_problems(tmp_path / "e")[0] == EXPECTED


def test_unsupported_or_missing(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,answer\nq,1\n")
    with pytest.raises(DataError, match="unsupported"):
        load_problems(tmp_path / "p.csv")
    with pytest.raises(DataError, match="not found"):
        load_problems(tmp_path / "nope.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir"):
        load_problems(tmp_path / "empty_dir")


def test_load_task_uses_config(tmp_path, capsys):
    path = tmp_path / "probs.parquet"
    rows = [{"question": f"q{i}", "final": str(i), "level": 1 + i % 2} for i in range(20)]
    rows[3]["final"] = None
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    cfg = DataConfig(task="math", path=str(path), test_per_level=2, bad_rows="skip",
                     columns={"prompt": "question", "answer": "final", "difficulty": "level"})
    task = load_task(cfg)
    assert len(task.train) + len(task.test) == 19
    assert len(task.test) == 3  # 2 of level 1 (10 rows), 1 of level 2 (9 rows: a fifth)
    assert {p.task for p in task.train} == {"math"}
    err = capsys.readouterr().err
    assert f"data: skipped 1 bad rows of {path} (first: {path}, row 4:" in err
    cfg.bad_rows = "fail"
    with pytest.raises(DataError, match="row 4"):
        load_task(cfg)


def test_columns_and_bad_rows_from_the_command_line():
    from hydra import compose, initialize_config_module

    from kimi_rl.config import register_configs

    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        cfg = compose("train", overrides=["data=jsonl", "data.path=/x.parquet"])
        assert dict(cfg.data.columns) == {} and cfg.data.bad_rows == "fail"
        cfg = compose("train", overrides=[
            "data=jsonl", "data.path=/x.parquet", "data.bad_rows=skip",
            "++data.columns={prompt: question, answer: final_answer}"])
        assert dict(cfg.data.columns) == {"prompt": "question", "answer": "final_answer"}
        assert cfg.data.bad_rows == "skip"
        cfg = compose("train", overrides=["data=jsonl", "data.path=/x",
                                          "+data.columns.difficulty=level"])
        assert dict(cfg.data.columns) == {"difficulty": "level"}
