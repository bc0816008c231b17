"""Problem files, the built-in task, its tokenizer and the answer verifiers."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from transformers import AutoTokenizer

from kimi_rl.config import DataConfig
from kimi_rl.data import load_task, modsum
from kimi_rl.data.problems import DataError, Problem, load_jsonl
from kimi_rl.rewards.verify import final_answer, get_verifier, verify_exact

# ---------------------------------------------------------------- JSONL problem files

GOOD = [
    {"prompt": "What is 2+2?", "answer": "4", "difficulty": 1, "id": "a"},
    {"prompt": "Solve x^2 = 9, x > 0.", "answer": 3, "difficulty": 3},
    {"prompt": "Ünïcode prompt", "answer": "\\frac{1}{2}", "task": "modsum"},
]


def write(path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")


def test_load_good_file(tmp_path):
    path = tmp_path / "probs.jsonl"
    write(path, [GOOD[0], "", GOOD[1], "   ", GOOD[2]])  # blank lines are skipped
    problems = load_jsonl(path)
    assert problems == [
        Problem("a", GOOD[0]["prompt"], "4", 1, "math"),
        Problem("probs-3", GOOD[1]["prompt"], "3", 3, "math"),
        Problem("probs-5", GOOD[2]["prompt"], "\\frac{1}{2}", 1, "modsum"),
    ]
    assert [p.id for p in load_jsonl(path, task="code", id_prefix="x")] == ["a", "x-3", "x-5"]
    assert load_jsonl(path, task="code")[1].task == "code"


BAD_ROWS = {
    "missing answer": '{"prompt": "q"}',
    "empty answer": '{"prompt": "q", "answer": "  "}',
    "empty prompt": '{"prompt": "", "answer": "1"}',
    "blank prompt": '{"prompt": "  \\n", "answer": "1"}',
    "missing prompt": '{"answer": "1"}',
    "invalid json": '{"prompt": "q", "answer": ',
    "not an object": '["q", "1"]',
    "string difficulty": '{"prompt": "q", "answer": "1", "difficulty": "hard"}',
    "float difficulty": '{"prompt": "q", "answer": "1", "difficulty": 2.5}',
    "bool difficulty": '{"prompt": "q", "answer": "1", "difficulty": true}',
    "duplicate id": '{"prompt": "q", "answer": "1", "id": "a"}',
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_file_and_row(tmp_path, case):
    path = tmp_path / "bad.jsonl"
    write(path, [GOOD[0], GOOD[1], "", BAD_ROWS[case], GOOD[2]])  # the bad one is row 4
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    msg = str(err.value)
    assert str(path) in msg
    assert re.search(r"(?<!\d)4(?!\d)", msg.replace(str(path), "")), msg


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_jsonl(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    write(empty, ["", " "])
    with pytest.raises(DataError, match="empty.jsonl"):
        load_jsonl(empty)


# ---------------------------------------------------------------- the built-in task

LEVELS = [1, 2, 3, 4]


def by_level(problems, level):
    return [p for p in problems if p.level == level]


def test_generate_counts_disjoint_and_deterministic():
    train, test = modsum.generate(LEVELS, 40, 10, seed=7)
    for level in LEVELS:
        tr, te = by_level(train, level), by_level(test, level)
        assert (len(tr), len(te)) == (40, 10)
        tr_prompts, te_prompts = {p.prompt for p in tr}, {p.prompt for p in te}
        assert len(tr_prompts) == 40 and len(te_prompts) == 10, "no duplicates"
        assert not tr_prompts & te_prompts, "test prompts never appear in train"
    assert len({p.id for p in train + test}) == len(train) + len(test)
    assert all(p.task == "modsum" for p in train + test)
    assert modsum.generate(LEVELS, 40, 10, seed=7) == (train, test)
    assert modsum.generate(LEVELS, 40, 10, seed=8) != (train, test)


def distinct_problems_estimate(level: int, draws: int = 60000) -> float:
    """How many distinct prompts a level has, from how many distinct ones `draws` random
    problems give (the expected count is S * (1 - (1 - 1/S)^draws)); exact when small."""
    rng = random.Random(123)
    d = len({modsum.make_problem(rng, level, "x").prompt for _ in range(draws)})
    expected = lambda s: s * -math.expm1(draws * math.log1p(-1.0 / s))
    lo, hi = d, 10**15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if expected(mid) < d else (lo, mid)
    return hi


def test_small_level_counts_are_capped():
    space = distinct_problems_estimate(1)
    _, test = modsum.generate([1], 0, 10**9, seed=0)
    assert len({p.prompt for p in test}) == len(test)
    assert len(test) <= space / 5 * 1.015  # 1.5 %: error of the estimate
    assert len(test) >= space / 5 * 0.985


@pytest.fixture(scope="module")
def problems():
    train, test = modsum.generate(LEVELS, 30, 10, seed=3)
    return train + test


def test_answers_are_digit_sums(problems):
    for p in problems:
        assert p.answer == str(sum(map(int, re.findall(r"\d", p.prompt))) % 10)


@pytest.mark.parametrize("confirm", [False, True])
def test_demonstrations_verify(problems, confirm):
    verify = get_verifier("modsum")
    for p in problems:
        demo = modsum.demonstration(p, confirm)
        assert modsum.extract_answer(demo) == p.answer
        assert demo.rstrip().splitlines()[-1].split()[-1] == p.answer  # the final line
        assert modsum.verify(p, demo) == 1.0 == verify(p, demo)
        assert modsum.verify(p, demo + "\n\n") == 1.0  # trailing blank lines are not lines
        # the confirmation line before the answer is the only difference
        lines = demo.splitlines()
        plain = modsum.demonstration(p, False).splitlines()
        assert lines == (plain[:-1] + [modsum.CONFIRM] + plain[-1:] if confirm else plain)


def test_confirm_prob_is_the_share_of_confirmed_demonstrations():
    task = load_task(DataConfig(levels=[1, 2, 3], train_per_level=500, test_per_level=10,
                                demos={1: 500, 2: 500, 3: 500}))
    demos = task.demonstrations(0.7, seed=0)
    confirmed = sum(modsum.CONFIRM in demo for _, demo in demos)
    assert len(demos) == 1500 and abs(confirmed / len(demos) - 0.7) < 0.04
    none = task.demonstrations(0.0, seed=0)
    assert not any(modsum.CONFIRM in demo for _, demo in none)


def other_answer(problems, p):
    return next(q for q in problems if q.answer != p.answer)


def test_only_the_final_line_counts(problems):
    for p in problems[:20]:
        demo = modsum.demonstration(p, confirm=False)
        q = other_answer(problems, p)
        wrong_final = modsum.demonstration(q, confirm=False).splitlines()[-1]
        first = demo.splitlines()[0]
        # an answer line followed by more text
        assert modsum.verify(p, demo + "\n" + first) == 0.0
        assert modsum.verify(p, demo + " and more") == 0.0
        # the right answer inside the chain of thought, a wrong final line
        assert modsum.verify(p, demo + "\n" + wrong_final) == 0.0
        # a wrong chain of thought with the right final line still scores
        wrong_cot = modsum.demonstration(q, confirm=False).splitlines()[:-1]
        assert modsum.verify(p, "\n".join(wrong_cot + [demo.splitlines()[-1]])) == 1.0
    assert modsum.extract_answer("") is None
    assert modsum.verify(problems[0], "") == 0.0


def test_tokenizer_round_trips_demonstrations(tokenizer, problems, tmp_path):
    texts = [p.prompt + modsum.demonstration(p, confirm) for p in problems
             for confirm in (False, True)]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1, "one token per character"
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer)
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        assert getattr(loaded, attr) == getattr(tokenizer, attr)
    for text in texts:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_any_string_over_the_vocabulary(tokenizer):
    chars = modsum.vocabulary()
    rng = random.Random(0)
    for _ in range(50):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 30)))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text


# ---------------------------------------------------------------- verify.py

@pytest.mark.parametrize("response, expected", [
    ("so \\boxed{4}", "4"),
    ("first \\boxed{3}, then \\boxed{4}", "4"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("x = \\boxed{ 12 } ok", "12"),
    ("chain of thought says 7\nanswer: 42", "42"),
    ("Answer = 42", "42"),
    ("reasoning\n\nanswer 5\n\n", "5"),
    ("answer: 3\nbut then more text", None),
    ("no answer here", None),
    ("", None),
])
def test_final_answer(response, expected):
    assert final_answer(response) == expected


def test_final_answer_deeply_nested_box():
    text = "try \\boxed{1}, no: \\boxed{\\frac{\\sqrt{3}}{2}}"
    assert final_answer(text) == "\\frac{\\sqrt{3}}{2}"


@pytest.mark.parametrize("response, expected", [
    ("\\boxed{\\frac{\\sqrt{\\frac{1}{x^{2}}}}{2}}", "\\frac{\\sqrt{\\frac{1}{x^{2}}}}{2}"),
    ("\\boxed{1} then \\boxed{2", "1"),  # an unclosed box at the end is no answer
    ("\\boxed{1} then \\boxed{a \\boxed{2}", "2"),  # a complete box inside an unclosed one
    ("\\boxed{\\boxed{3}}", "\\boxed{3}"),  # the box closed last
    ("{ stray \\boxed{4} }", "4"),
    ("\\boxed{5} } stray closer", "5"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
    ("\\boxed{\\{1\\} then \\boxed{6}", "6"),  # \\{ opens no group
    ("\\boxed {7}", "7"),
    ("\\boxed{}", ""),
])
def test_final_answer_brace_matching(response, expected):
    assert final_answer(response) == expected


def test_final_answer_is_linear_in_unclosed_boxes():
    text = "\\boxed{" * 20000 + "\\boxed{9}"
    assert final_answer(text) == "9"


@pytest.mark.parametrize("response, answer, score", [
    ("\\boxed{X + 1}", "x+1", 1.0),
    ("answer:   Yes.", "yes", 1.0),
    ("\\boxed{ \\frac{1}{2} }", "\\frac{1}{2}", 1.0),
    ("the answer is 42 somewhere\nanswer: 41", "42", 0.0),
    ("\\boxed{42} and finally \\boxed{41}", "42", 0.0),
    ("42", "42", 0.0),  # no boxed expression, no answer line
])
def test_verify_exact(response, answer, score):
    assert verify_exact(Problem("p", "q", answer), response) == score
    assert get_verifier("math")(Problem("p", "q", answer), response) == score


def test_unknown_verifier():
    with pytest.raises(ValueError, match="nope"):
        get_verifier("nope")


def test_flawed_demonstrations_stop_one_step_early(problems):
    for p in problems:
        good, bad = modsum.demonstration(p, False), modsum.demonstration(p, False, "stop_early")
        assert bad.count("\n") == good.count("\n") - 1
        last_digit = int(p.prompt.split()[-1][1:])
        assert modsum.verify(p, bad) == float(last_digit == 0)


def test_slipped_demonstrations_differ_in_the_last_sum_only(problems):
    for p in problems:
        good = modsum.demonstration(p, True).splitlines()
        bad = modsum.demonstration(p, True, "slip").splitlines()
        n = len(p.prompt.split())  # one step line per operand, then confirmation and answer
        assert len(bad) == len(good) == n + 2
        assert bad[:n - 1] == good[:n - 1] and bad[n] == good[n]
        # the last step's sum and the answer are one too high, mod 10
        slipped = str((int(p.answer) + 1) % 10)
        assert good[n - 1].endswith(f"={p.answer}") and bad[n - 1].endswith(f"={slipped}")
        assert bad[n - 1].rsplit("=", 1)[0] == good[n - 1].rsplit("=", 1)[0]
        assert bad[-1] == f"answer {slipped}" and modsum.verify(p, "\n".join(bad)) == 0.0
    with pytest.raises(ValueError, match="unknown flaw 'typo'"):
        modsum.demonstration(problems[0], False, "typo")


def test_bad_flaw_settings_are_named():
    from kimi_rl.config import TrainConfig, check_config
    cfg = TrainConfig()
    cfg.data.flaw = "typo"
    with pytest.raises(ValueError, match="data.flaw: must be stop_early or slip, got 'typo'"):
        check_config(cfg)
    cfg = TrainConfig()
    cfg.data.flawed = {4: 1.5}
    with pytest.raises(ValueError, match=r"data.flawed.4: must be a share in \[0, 1\]"):
        check_config(cfg)


def test_demonstrations_outside_the_levels_are_named_with_the_fix():
    """The error names the levels and an override that fixes them, checked by composing
    the demo's config with it (int-keyed mappings take a whole mapping on the command
    line: `data.demos.5=0` is refused by OmegaConf)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from kimi_rl.config import TrainConfig, register_configs

    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        cfg = compose("train", overrides=["data.levels=[1,2,3,4]"])
        with pytest.raises(ValueError, match=r"levels \[5, 6\] are not in data.levels "
                           r"\[1, 2, 3, 4\].*add 'data.demos=\{5: 0, 6: 0\}'") as err:
            load_task(OmegaConf.to_object(cfg).data)
        fix = re.search(r"add '(.*)'", str(err.value)).group(1)
        cfg = compose("train", overrides=["data.levels=[1,2,3,4]", fix])
    data = OmegaConf.to_object(cfg).data
    assert isinstance(OmegaConf.to_object(cfg), TrainConfig)
    assert load_task(data).demos == {1: 2000, 2: 2000, 3: 2000, 4: 2000}
