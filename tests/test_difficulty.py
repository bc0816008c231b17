"""`kimi-rl difficulty`: pass rates against an independent count over the same samples (the
real torch engine and a tiny model), the level mapping, the easy-to-hack filter on a table
of cases, a scripted engine with known answers through `run_difficulty`, and the CLI end to
end on a small file."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import hydra
import pytest

from kimi_rl import build
from kimi_rl import difficulty as dif
from kimi_rl.config import DifficultyConfig, register_configs
from kimi_rl.data import load_problems, load_task, modsum
from kimi_rl.data.problems import Problem
from kimi_rl.rewards import verify as vf
from kimi_rl.rollout.engine import Request, SamplingParams, Segment
from kimi_rl.rollout.torch_engine import TorchEngine


def compose(overrides: list[str]):
    register_configs()
    with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return hydra.compose("train", overrides=overrides)


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("rate, level", [
    (1.0, 1), (0.8, 1), (0.79, 2), (0.6, 2), (0.5, 3), (0.4, 3), (0.3, 4), (0.2, 4),
    (0.1, 5), (0.0, 5)])
def test_level_of_pass_rate(rate, level):
    assert dif.level_of(rate, [0.8, 0.6, 0.4, 0.2]) == level


def test_level_of_with_other_thresholds():
    assert [dif.level_of(r / 10, [0.5]) for r in range(11)] == [2] * 5 + [1] * 6
    assert dif.level_of(0.0, []) == dif.level_of(1.0, []) == 1  # one level
    assert dif.level_of(0.99, [1.0]) == 2 and dif.level_of(1.0, [1.0]) == 1


@pytest.mark.parametrize("bad", [[0.2, 0.8], [0.5, 0.5], [1.2, 0.5], [0.5, 0.0], [0.5, -0.1]])
def test_thresholds_must_descend_in_the_unit_interval(bad):
    with pytest.raises(ValueError, match=r"difficulty.thresholds: must be strictly descending"):
        dif.check_thresholds(bad)


MC_PROMPT = "Which is prime?\n(A) 4\n(B) 6\n(C) 7\n(D) 9\n"
MC_LINES = "Which is prime?\nA. 4\nB. 6\nC) 7\nD: 9\n"


@pytest.mark.parametrize("prompt, answer, form", [
    ("Is 7 prime?", "Yes", "true_false"),
    ("Is 7 prime?", "no.", "true_false"),
    ("True or false: 2 > 3.", "False", "true_false"),
    ("True or false: 2 > 3.", "\\text{false}", "true_false"),
    ("Is the statement right?", "$correct$", "true_false"),
    (MC_PROMPT, "C", "multiple_choice"),
    (MC_PROMPT, "(C)", "multiple_choice"),
    (MC_PROMPT, "\\text{(C)}", "multiple_choice"),
    (MC_PROMPT, "c", "multiple_choice"),
    (MC_LINES, "C", "multiple_choice"),
    (MC_PROMPT, "7", None),  # the choice's content, not a letter
    (MC_PROMPT, "E", None),  # not one of the listed choices
    ("Solve for x: 2x = 6, where x is point (A) on the line.", "3", None),
    ("Let A and B be sets. What is |A|?", "A", None),  # a letter, but no choices listed
    ("Prove that there are infinitely many primes.", "See proof", "proof"),
    ("Show that n^2 - n is even for every integer n.", "QED", "proof"),
    ("Give a proof of the AM-GM inequality.", "x", "proof"),
    ("How many ways to improve the score to 10?", "4", None),  # "improve" is no "prove"
    ("What is 2 + 3?", "5", None),
    ("Is 7 prime? Answer 1 for yes and 0 for no.", "1", None),
])
def test_easy_to_hack_forms(prompt, answer, form):
    assert dif.hack_form(Problem("p", prompt, answer)) == form


def test_count_correct_reads_each_problems_responses():
    problems = [Problem("a", "a1 b2\n", "3", 1, "modsum"), Problem("b", "c4 d4\n", "8", 1,
                                                                    "modsum")]
    texts = ["answer 3", "answer 4", "x\nanswer 3", "answer 8", "answer 8", "answer 3"]
    assert dif.count_correct(problems, texts, 3) == [2, 2]
    assert dif.count_correct(problems, ["3", "3", "8"] * 2, 3,
                             prefix=lambda p: "answer ") == [2, 1]
    with pytest.raises(ValueError, match="5 responses for 2 problems x 3"):
        dif.count_correct(problems, texts[:5], 3)


# ---------------------------------------------------------------- pass rates, real engine

def coin(problem: Problem, response: str) -> float:
    """A verifier for a random model: right when the response starts with a character of
    even code (about half the time)."""
    return float(bool(response) and ord(response[0]) % 2 == 0)


def test_pass_rates_equal_a_direct_count_over_the_same_samples(make_model, tokenizer,
                                                               monkeypatch):
    """annotate's pass rates and levels, against the same engine calls made directly (same
    seeds, same chunks) and counted here with the verifier's rule."""
    monkeypatch.setitem(vf.VERIFIERS, "coin", coin)
    model = make_model(seed=1, std=0.5)
    train, _ = modsum.generate([1, 2], 4, 0, seed=0)
    problems = [Problem(p.id, p.prompt, p.answer, p.level, "coin") for p in train]
    d = DifficultyConfig(output="x.jsonl", samples=6, temperature=1.0, guess_tries=0,
                         problems_per_call=3, seed=5)

    def engine():
        return TorchEngine(copy.deepcopy(model), tokenizer.eos_token_id, tokenizer.pad_token_id)

    out = dif.annotate(engine(), tokenizer, problems, d, 8, progress=False)
    direct = engine()
    expect = []
    for call, lo in enumerate(range(0, len(problems), 3)):
        chunk = problems[lo:lo + 3]
        requests = [Request(tokenizer(p.prompt).input_ids) for p in chunk for _ in range(6)]
        segs = direct.generate(requests, 8, SamplingParams(1.0, 1.0,
                                                           seed=dif.call_seed(5, "sample", call)))
        texts = [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in segs]
        expect += [sum(bool(t) and ord(t[0]) % 2 == 0 for t in texts[i * 6:(i + 1) * 6])
                   for i in range(len(chunk))]
    assert [a.correct for a in out] == expect
    assert len(set(expect)) >= 3  # pass rates spread over levels
    for a, c in zip(out, expect, strict=True):
        assert a.samples == 6 and a.pass_rate == c / 6 and a.dropped is None
        assert a.level == 1 + sum(c / 6 < t for t in (0.8, 0.6, 0.4, 0.2))
    again = dif.annotate(engine(), tokenizer, problems, d, 8, progress=False)
    assert [a.correct for a in again] == expect  # reproducible for a seed


# ---------------------------------------------------------------- scripted engine

class KnownAnswers:
    """Answers modsum prompts with known results. A full prompt (CoT sampling) gets the
    right answer on its first right[prompt] copies in a call, a wrong one after; a guess
    prompt (ending in "answer ") gets the right digit only for prompts in `guessed`. Other
    prompts get "answer 0"."""

    def __init__(self, tokenizer, right: dict[str, int], guessed: set[str]):
        self.tok, self.right, self.guessed = tokenizer, right, guessed

    def generate(self, requests, max_new_tokens, params, max_running=None, max_steps=None):
        seen: dict[str, int] = {}
        out = []
        for r in requests:
            prompt = self.tok.decode(r.prompt_ids, skip_special_tokens=True)
            if prompt.endswith("answer "):
                base = prompt[:-len("answer ")]
                ok = base in self.guessed
                text = self._answer(base, ok)
            else:
                m = seen[prompt] = seen.get(prompt, -1) + 1
                text = "0+x0=0\nanswer " + self._answer(prompt, m < self.right.get(prompt, 0))
            ids = self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            out.append(Segment(ids, [0.0] * len(ids), "stop"))
        return out

    def _answer(self, prompt: str, ok: bool) -> str:
        if prompt not in self.right:
            return "0"
        right = sum(int(t[1:]) for t in prompt.split()) % 10
        return str(right if ok else (right + 1) % 10)


@pytest.fixture
def model_dir(tmp_path, make_model, tokenizer):
    path = tmp_path / "model"
    make_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_difficulty_with_known_answers(tmp_path, tokenizer, model_dir, monkeypatch):
    """10 samples: right counts 10, 8, 7, 5, 3, 1, 0 give levels 1, 1, 2, 3, 4, 5, 5; one
    guessable problem and three of hackable forms are dropped; the output trains as a file."""
    train, _ = modsum.generate([1, 2, 3], 4, 0, seed=0)
    counts = [10, 8, 7, 5, 3, 1, 0]
    kept, guessed = train[:7], train[7]
    right = {p.prompt: c for p, c in zip(kept, counts, strict=True)} | {guessed.prompt: 10}
    engine = KnownAnswers(tokenizer, right, {guessed.prompt})
    monkeypatch.setattr(build, "build_engine", lambda cfg, policy, tok: engine)
    rows = [{"prompt": p.prompt, "answer": p.answer, "task": "modsum", "id": f"m{i}",
             "difficulty": 9} for i, p in enumerate(kept + [guessed])]
    rows += [{"prompt": "a1 b2\nIs the sum 3?\n", "answer": "yes", "task": "modsum", "id": "tf"},
             {"prompt": "a1\n(A) 1\n(B) 2\n", "answer": "A", "task": "modsum", "id": "mc"},
             {"prompt": "Prove that a1 is 1.\n", "answer": "1", "task": "modsum", "id": "pf"}]
    src = tmp_path / "in.jsonl"
    write_rows(src, rows)
    out = tmp_path / "out" / "annotated.jsonl"
    cfg = compose(["model=hf", f"model.path={model_dir}", "data=jsonl", f"data.path={src}",
                   f"difficulty.output={out}", "progress=false", "num_threads=1"])
    rep = dif.run_difficulty(cfg)

    problems, _ = load_problems(out)
    assert [p.id for p in problems] == [f"m{i}" for i in range(7)]
    assert [p.level for p in problems] == [1, 1, 2, 3, 4, 5, 5]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["correct"] for x in lines] == counts
    assert [x["pass_rate"] for x in lines] == [c / 10 for c in counts]
    assert rep["levels"] == {"1": 2, "2": 1, "3": 1, "4": 1, "5": 2}
    assert rep["dropped"] == {"guessed": 1, "true_false": 1, "multiple_choice": 1, "proof": 1}
    assert {x["id"]: x["reason"] for x in rep["dropped_problems"]} == {
        "m7": "guessed", "tf": "true_false", "mc": "multiple_choice", "pf": "proof"}
    assert json.loads(dif.report_path(out).read_text()) == json.loads(json.dumps(rep))
    assert rep["problems"] == 11 and rep["kept"] == 7
    # the output is a problem file the trainer's data loading takes as it is
    cfg = compose(["data=jsonl", f"data.path={out}", "data.test_per_level=0"])
    assert sorted(p.level for p in load_task(cfg.data).train) == [1, 1, 2, 3, 4, 5, 5]
    assert not list(out.parent.glob(".*tmp*"))

    # forms not listed are kept, and no guessing with guess_tries=0
    cfg = compose(["model=hf", f"model.path={model_dir}", "data=jsonl", f"data.path={src}",
                   f"difficulty.output={out}", "progress=false", "difficulty.guess_tries=0",
                   "difficulty.drop_forms=[proof]", "difficulty.thresholds=[0.5]"])
    rep = dif.run_difficulty(cfg)
    assert rep["dropped"] == {"proof": 1} and rep["levels"] == {"1": 5, "2": 5}


def test_run_difficulty_on_reasoning_gym_problems(tmp_path, monkeypatch):
    """Without data.path the task's problems are annotated (here reasoning-gym's, tiny model
    with their character vocabulary); rows keep the entries the verifier needs."""
    cfg = compose(["data=reasoning_gym", "data.rg_datasets=[chain_sum]",
                   "data.train_per_level=2", "data.test_per_level=1", "model.hidden_size=32",
                   "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
                   "model.intermediate_size=64", "difficulty.samples=2",
                   "difficulty.guess_tries=1", "difficulty.max_new_tokens=4",
                   f"difficulty.output={tmp_path / 'rg.jsonl'}", "progress=false"])
    rep = dif.run_difficulty(cfg)
    assert rep["problems"] == 12 and rep["kept"] + sum(rep["dropped"].values()) == 12
    problems, _ = load_problems(tmp_path / "rg.jsonl")
    built = {p.id: p for p in (lambda t: t.train + t.test)(load_task(cfg.data))}
    for p in problems:
        assert p.tests == built[p.id].tests and p.task == "reasoning_gym"
        assert vf.verify_reasoning_gym(p, f"\\boxed{{{p.answer}}}") == 1.0


@pytest.mark.parametrize("override, match", [
    ("difficulty.thresholds=[0.2,0.8]", "difficulty.thresholds"),
    ("difficulty.samples=0", "difficulty.samples: must be an integer >= 1, got 0"),
    ("difficulty.drop_forms=[essay]", "difficulty.drop_forms: must be a subset"),
    ("difficulty.output=out.csv", "difficulty.output: must be the path"),
    ("difficulty.temperature=0", "difficulty.temperature"),
])
def test_bad_settings_are_named(override, match, tmp_path):
    cfg = compose([f"difficulty.output={tmp_path / 'o.jsonl'}", override])
    with pytest.raises(ValueError, match=match):
        dif.run_difficulty(cfg)
    assert not (tmp_path / "o.jsonl").exists()


def test_problem_without_a_verifier_is_named_before_sampling(tmp_path, model_dir):
    src = tmp_path / "in.jsonl"
    write_rows(src, [{"prompt": "a1\n", "answer": "1", "task": "modsum"},
                     {"prompt": "a2\n", "answer": "2", "task": "chess"}])
    cfg = compose(["model=hf", f"model.path={model_dir}", "data=jsonl", f"data.path={src}",
                   f"difficulty.output={tmp_path / 'o.jsonl'}", "progress=false"])
    with pytest.raises(ValueError, match=rf"{src}: problem 'in-2': no verifier for task 'chess'"):
        dif.run_difficulty(cfg)
    assert not (tmp_path / "o.jsonl").exists()


def test_nothing_half_written_when_a_write_fails(tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(dif.os, "replace", fail_second)
    with pytest.raises(OSError):
        dif.write_atomic({out: "new\n", dif.report_path(out): "{}"})
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.jsonl"]  # no temporary left


# ---------------------------------------------------------------- CLI

def cli(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kimi_rl.cli", "difficulty", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, model_dir):
    """The real command on a small file with the real torch engine and a tiny model: the
    output loads with its levels, the report counts every problem."""
    train, _ = modsum.generate([1, 2], 3, 0, seed=0)
    rows = [{"prompt": p.prompt, "answer": p.answer, "task": "modsum"} for p in train]
    rows.append({"prompt": "a1\nIs it 1?\n", "answer": "True", "task": "modsum"})
    src = tmp_path / "in.jsonl"
    write_rows(src, rows)
    res = cli(["model=hf", f"model.path={model_dir}", "data=jsonl", f"data.path={src}",
               "difficulty.output=out.jsonl", "difficulty.samples=3", "difficulty.guess_tries=2",
               "rollout.max_new_tokens=8", "progress=false", f"run_dir={tmp_path / 'run'}"],
              tmp_path)
    assert res.returncode == 0, res.stderr
    assert "kept" in res.stdout and "dropped (true_false): 1" in res.stdout
    problems, _ = load_problems(tmp_path / "out.jsonl")
    rep = json.loads((tmp_path / "out.report.json").read_text())
    assert len(problems) == rep["kept"] == 6 - rep["dropped"].get("guessed", 0)
    assert all(1 <= p.level <= 5 for p in problems)
    assert sum(rep["levels"].values()) == rep["kept"]


def test_bad_row_is_named_and_nothing_is_written(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    write_rows(bad, [{"prompt": "a1\n", "answer": "1"}, {"prompt": "a1\n", "answer": ""}])
    cfg = compose(["model=hf", f"model.path={model_dir}", "data=jsonl", f"data.path={bad}",
                   f"difficulty.output={tmp_path / 'o.jsonl'}", "progress=false"])
    with pytest.raises(ValueError, match=rf"{bad}, row 2: 'answer' is missing or empty"):
        dif.run_difficulty(cfg)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.jsonl", "model"]
