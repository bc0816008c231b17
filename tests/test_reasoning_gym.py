"""reasoning-gym as a problem source: problems built offline with levels from their
settings, the verifier (reasoning-gym's scorers behind our final-answer extraction), bad
settings named, problem files round trip, and a short RL run on it."""

from __future__ import annotations

import json
import re
import socket

import hydra
import pytest
from reasoning_gym.factory import create_dataset

from kimi_rl.config import DataConfig, register_configs
from kimi_rl.data import load_problems, load_task
from kimi_rl.data import reasoning_gym as rg
from kimi_rl.data.problems import Problem
from kimi_rl.loop import train
from kimi_rl.rewards import verify as vf
from kimi_rl.rewards.verify import get_verifier

LEVELS = {
    "chain_sum": {1: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
                  2: {"min_terms": 4, "max_terms": 4, "min_digits": 2, "max_digits": 2}},
    "countdown": {2: {"min_numbers": 3, "max_numbers": 3, "min_target": 10, "max_target": 50,
                      "min_value": 1, "max_value": 20},
                  3: {"min_numbers": 5, "max_numbers": 5}},
}
verify = get_verifier("reasoning_gym")


def build(names=("chain_sum", "countdown"), levels=LEVELS, train=6, test=2, seed=3):
    return rg.generate(list(names), levels, train, test, seed)


def compose(overrides: list[str]):
    register_configs()
    with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return hydra.compose("train", overrides=overrides)


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def operands(prompt: str) -> list[str]:
    """The numbers of a chain_sum question, read from its text."""
    expr = re.search(r"problem: (.*) =", prompt).group(1)
    return re.findall(r"\d+", expr)


def test_levels_follow_the_settings(offline):
    train, test = build()
    problems = train + test
    assert {(p.id.split("-")[0], p.level) for p in problems} == {
        ("chain_sum", 1), ("chain_sum", 2), ("countdown", 2), ("countdown", 3)}
    for name, level in {(p.id.split("-")[0], p.level) for p in problems}:
        mine = [p for p in problems if p.id.startswith(f"{name}-L{level}-")]
        assert len([p for p in mine if p in train]) == 6
        assert len([p for p in mine if p in test]) == 2
    for p in problems:
        assert p.task == "reasoning_gym" and rg.INSTRUCTION in p.prompt
        if p.id.startswith("chain_sum"):  # from the question text
            nums = operands(p.prompt)
            terms, digits = (2, 1) if p.level == 1 else (4, 2)
            assert len(nums) == terms and all(len(n) == digits for n in nums), p.prompt
        else:
            _, _, entry = rg.entry_of(p)
            assert len(entry["metadata"]["numbers"]) == (3 if p.level == 2 else 5)
            assert all(str(n) in p.prompt for n in entry["metadata"]["numbers"])
    # no question twice, none shared by the splits
    questions = [rg.entry_of(p)[2]["question"] for p in problems]
    assert len(set(questions)) == len(questions)


def test_problems_are_reasoning_gyms_own_entries_and_seeded():
    train, test = build()
    assert (train, test) == build()
    assert train != build(seed=4)[0]
    p = train[0]
    name, settings, entry = rg.entry_of(p)
    level_settings = LEVELS[name][p.level]
    index = int(p.id.rsplit("-", 1)[1])
    ds = create_dataset(name, **level_settings, seed=rg.level_seed(3, name, p.level),
                        size=index + 1)
    assert ds[index]["question"] == entry["question"] and ds[index]["answer"] == p.answer
    assert settings == level_settings


def test_a_level_with_few_distinct_questions_warns(capsys):
    one_digit_pairs = {"chain_sum": {1: {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                         "max_digits": 1}}}
    train, test = rg.generate(["chain_sum"], one_digit_pairs, 400, 0, seed=0)
    assert len(train) == len({p.prompt for p in train}) < 400
    assert "distinct problems" in capsys.readouterr().err


def test_shipped_config_builds_offline_and_gold_answers_verify(offline):
    cfg = compose(["data=reasoning_gym", "data.train_per_level=2", "data.test_per_level=1"])
    task = load_task(cfg.data)
    names = {p.id.split("-")[0] for p in task.train}
    assert names == {"chain_sum", "basic_arithmetic", "countdown", "gsm_symbolic"}
    assert task.levels == [1, 2, 3, 4]
    assert set(task.vocabulary) >= {c for p in task.train for c in p.prompt + p.answer}
    for p in task.train + task.test:
        assert verify(p, f"Working...\n\\boxed{{{p.answer}}}") == 1.0, p.id
        assert verify(p, f"\\boxed{{{p.answer}1}}") == 0.0, p.id


@pytest.mark.parametrize("response, score", [
    ("4 - 1 = 3, then 3 - 7 = -4.\n\\boxed{-4}", 1.0),
    ("\\boxed{ -4 }", 1.0),
    ("so the result is\nAnswer: -4", 1.0),  # an explicit answer line
    ("\\boxed{-3}", 0.0),
    ("\\boxed{-44}", 0.0),  # the default scorer gives partial credit for containing "-4"
    ("\\boxed{-4} or \\boxed{-3}", 0.0),  # hedging
    ("-4 is what I first thought, but \\boxed{5}", 0.0),  # only the final answer counts
    ("the answer is -4", 0.0),  # no box, no answer line
    ("", 0.0),
])
def test_verifier_scores_the_final_answer(response, score):
    entry = {"question": "State the final answer to the following arithmetic problem: "
                         "4 - 1 - 7 =", "answer": "-4", "metadata": {"num_terms": 3}}
    p = Problem("c", entry["question"], "-4", 1, "reasoning_gym",
                json.dumps([{"dataset": "chain_sum", "settings": {}, "entry": entry}]))
    assert verify(p, response) == score


def test_partial_credit_scores_zero():
    """countdown gives 0.01 to a well-formed wrong expression; the reward is 0 or 1."""
    train, _ = rg.generate(["countdown"], {"countdown": LEVELS["countdown"]}, 3, 0, seed=0)
    for p in train:
        name, settings, entry = rg.entry_of(p)
        nums = entry["metadata"]["numbers"]
        wrong = " + ".join(map(str, nums))
        if sum(nums) == entry["metadata"]["target"]:
            continue
        credit = create_dataset(name, **settings, seed=0, size=1).score_answer(wrong, entry)
        assert 0 < credit < 1
        assert verify(p, f"\\boxed{{{wrong}}}") == 0.0
        assert verify(p, f"\\boxed{{{p.answer}}}") == 1.0


def test_problem_file_round_trip(tmp_path):
    """Problems written as JSONL rows (tests as a list) load and verify as built; gsm_symbolic
    entries hold fractions, stored as text."""
    train, test = rg.generate(["gsm_symbolic", "chain_sum"], {}, 3, 0, seed=1)
    path = tmp_path / "rg.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer,
                                        "difficulty": p.level, "task": p.task,
                                        "tests": json.loads(p.tests)}) + "\n" for p in train))
    loaded, _ = load_problems(path)
    assert loaded == train
    for p in loaded:
        assert verify(p, f"\\boxed{{{p.answer}}}") == 1.0
        assert verify(p, f"\\boxed{{{p.answer}0}}") == 0.0


@pytest.mark.parametrize("names, levels, match", [
    (["chain_sun"], {}, r"data.rg_datasets\[0\]: unknown reasoning-gym dataset 'chain_sun' "
                        r"\(did you mean \['chain_sum'"),
    ([], {}, "data.rg_datasets: empty"),
    (["chain_sum", "chain_sum"], {}, "named twice"),
    (["chain_sum"], {"countdwn": {1: {}}}, "data.rg_levels.countdwn: unknown reasoning-gym"),
    (["chain_sum"], {"chain_sum": {1: {"max_term": 3}}},
     r"data.rg_levels.chain_sum.1.max_term: is not a chain_sum setting \(choose from"),
    (["chain_sum"], {"chain_sum": {2: {"seed": 3}}}, "data.rg_levels.chain_sum.2.seed: is set"),
    (["chain_sum"], {"chain_sum": {0: {}}}, "data.rg_levels.chain_sum.0: a level must be"),
    (["chain_sum"], {"chain_sum": {}}, "data.rg_levels.chain_sum: no levels"),
    (["chain_sum"], {"chain_sum": {1: {"min_terms": 5, "max_terms": 2}}},
     r"data.rg_levels.chain_sum: reasoning-gym rejects the settings \{'min_terms': 5, "
     r"'max_terms': 2\}"),
    (["gsm_symbolic"], {"gsm_symbolic": {1: {"difficulty": 2.0}}},
     r"rejects the settings \{'difficulty': 2.0\} of gsm_symbolic"),
])
def test_bad_settings_name_the_key_and_value(names, levels, match):
    with pytest.raises(ValueError, match=match):
        rg.generate(names, levels, 2, 1, seed=0)


def test_bad_settings_through_the_config():
    with pytest.raises(ValueError, match="data.rg_levels.chain_sum.1.max_term"):
        load_task(compose(["data=reasoning_gym",
                                 "++data.rg_levels={chain_sum: {1: {max_term: 3}}}"]).data)
    with pytest.raises(ValueError, match=r"data.task: unknown built-in task 'rgym'"):
        load_task(DataConfig(task="rgym"))


def test_problem_without_its_entry_is_named():
    p = Problem("q7", "What is 1+1?", "2", 1, "reasoning_gym")
    with pytest.raises(ValueError, match="problem 'q7' \\(task reasoning_gym\\): its 'tests'"):
        verify(p, "\\boxed{2}")
    bad = Problem("q8", "x", "2", 1, "reasoning_gym",
                  json.dumps([{"dataset": "nope", "entry": {"answer": "2"}}]))
    with pytest.raises(ValueError, match="problem 'q8': unknown reasoning-gym dataset 'nope'"):
        verify(bad, "\\boxed{2}")


@pytest.mark.slow
def test_rl_loop_trains_on_reasoning_gym(tmp_path, monkeypatch):
    """Two RL iterations of the tiny model (character tokenizer over the problems' text)
    on chain_sum, rewarded by the reasoning_gym verifier."""
    calls: list[str] = []

    def counting(problem, response):
        calls.append(problem.id)
        return vf.verify_reasoning_gym(problem, response)

    monkeypatch.setitem(vf.VERIFIERS, "reasoning_gym", counting)
    cfg = compose([
        "data=reasoning_gym", "data.rg_datasets=[chain_sum]", "data.train_per_level=8",
        "data.test_per_level=2", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=64",
        "sft.enabled=false", "sft.control=false", "curriculum=all_levels", "iterations=2",
        "rollout.problems_per_iteration=2", "rollout.group_size=2",
        "rollout.max_new_tokens=8", "rollout.partial.enabled=false", "eval.max_new_tokens=8",
        "progress=false", "num_threads=1", f"run_dir={tmp_path}"])
    summary = train(cfg, tmp_path)
    assert set(summary["eval_after"]) == {1, 2, 3, 4}
    assert len(calls) >= 2 * 2 * 2 and all(c.startswith("chain_sum-L") for c in calls)


TEACHER_LEVELS = {"chain_sum": {1: {"min_terms": 2, "max_terms": 2},
                                2: {"min_terms": 4, "max_terms": 4, "min_digits": 1,
                                    "max_digits": 3}},
                  "basic_arithmetic": {1: {"min_terms": 3, "max_terms": 3, "min_digits": 1,
                                           "max_digits": 1}},
                  "countdown": {1: {}}}


def test_teacher_demonstrations_are_right_and_step_by_step():
    """The chain-of-thought teacher: one line per operation, left to right (recomputed here
    from the expression with Python's own arithmetic), the answer boxed on the last line,
    full credit from the dataset's scorer; no demonstration where it cannot teach."""
    train, _ = rg.generate(list(TEACHER_LEVELS), TEACHER_LEVELS, 30, 0, 3)
    verifier = get_verifier("reasoning_gym")
    taught = skipped = 0
    for p in train:
        name, _, entry = rg.entry_of(p)
        expression = entry["metadata"].get("expression", "")
        demo = rg.demonstration(p)
        plain = re.fullmatch(r"-?\d+( [+-] -?\d+)+", expression or "")
        if name == "countdown" or not plain:
            assert demo is None, (p.id, expression)
            skipped += 1
            continue
        taught += 1
        *steps, last = demo.split("\n")
        assert len(steps) == len(expression.split()) // 2
        assert int(steps[-1].rsplit("= ", 1)[1]) == eval(expression)  # noqa: S307 (digits)
        for a, b in zip(steps, steps[1:], strict=False):  # a line starts from the last result
            assert b.startswith(a.rsplit("= ", 1)[1] + " ")
        assert last == f"The answer is \\boxed{{{eval(expression)}}}."  # noqa: S307
        assert verifier(p, demo) == 1.0
    assert taught > 40 and skipped > 30  # countdown, and basic_arithmetic's * / ( )


def test_demonstrations_per_dataset_and_level():
    cfg = DataConfig(task="reasoning_gym", rg_datasets=["chain_sum", "basic_arithmetic"],
                     rg_levels={k: v for k, v in TEACHER_LEVELS.items() if k != "countdown"},
                     rg_demos={"chain_sum": {1: 5, 2: 3}}, train_per_level=20,
                     test_per_level=2)
    demos = load_task(cfg).demonstrations(0.0, 0)
    ids = [p.id for p, _ in demos]
    assert sum(i.startswith("chain_sum-L1-") for i in ids) == 5
    assert sum(i.startswith("chain_sum-L2-") for i in ids) == 3
    assert len(ids) == 8  # none of basic_arithmetic: not asked for
    assert not {p.id for p in load_task(cfg).test} & set(ids)


def test_flawed_teacher_demonstrations():
    """data.flawed on reasoning-gym: at level 2 every demonstration is flawed. stop_early
    leaves out the last operation (the correct chain's lines but the last, answer the result
    before it), slip makes the last result one too high; both are scored wrong (chains whose
    last operand is 0 excepted for stop_early); level 1 stays correct."""
    verifier = get_verifier("reasoning_gym")
    for flaw in ("stop_early", "slip"):
        cfg = DataConfig(task="reasoning_gym", rg_datasets=["chain_sum"],
                         rg_levels={"chain_sum": TEACHER_LEVELS["chain_sum"]},
                         rg_demos={"chain_sum": {1: 5, 2: 8}}, train_per_level=20,
                         test_per_level=2, flawed={2: 1.0}, flaw=flaw)
        demos = load_task(cfg).demonstrations(0.0, 0)
        for p, demo in demos:
            right = rg.demonstration(p).split("\n")
            lines = demo.split("\n")
            if p.level == 1:
                assert lines == right and verifier(p, demo) == 1.0
                continue
            if flaw == "stop_early":
                assert lines[:-1] == right[:-2]
                answer = int(right[-3].rsplit("= ", 1)[1])
                last_operand_zero = right[-2].split(" = ")[0].endswith(" 0")
                assert verifier(p, demo) == (1.0 if last_operand_zero else 0.0)
            else:
                assert lines[:-2] == right[:-2]
                answer = int(right[-2].rsplit("= ", 1)[1]) + 1
                assert lines[-2] == right[-2].rsplit("= ", 1)[0] + f"= {answer}"
                assert verifier(p, demo) == 0.0
            assert lines[-1] == f"The answer is \\boxed{{{answer}}}."
        assert sum(p.level == 2 for p, _ in demos) == 8
    with pytest.raises(ValueError, match="unknown flaw 'typo'"):
        rg.demonstration(demos[0][0], "typo")


@pytest.mark.parametrize("demos, match", [
    ({"countdown": {1: 3}}, r"data.rg_demos.countdown: 'countdown' is not in data.rg_datasets"),
    ({"chain_sum": {3: 3}}, r"data.rg_demos.chain_sum.3: chain_sum has no level 3 .*\[1, 2\]"),
    ({"chain_sum": {1: -1}}, r"data.rg_demos.chain_sum.1: a count must be an integer >= 0"),
])
def test_bad_demonstration_settings_are_named(demos, match):
    levels = {k: v for k, v in TEACHER_LEVELS.items() if k != "countdown"}
    with pytest.raises(ValueError, match=match):
        rg.demo_table(list(levels), levels, demos)
    with pytest.raises(ValueError, match=r"data.rg_demos.countdown: countdown has no "
                                         r"programmatic teacher"):
        rg.demo_table(list(TEACHER_LEVELS), TEACHER_LEVELS, {"countdown": {1: 3}})


class GoldForChainSum:
    """An engine that answers chain_sum questions with the gold answer (read from the
    prompt, summed here) and anything else wrongly."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, requests, max_new_tokens, params, max_running=None, max_steps=None):
        from kimi_rl.rollout.engine import Segment

        out = []
        for r in requests:
            prompt = self.tok.decode(r.prompt_ids, skip_special_tokens=True)
            m = re.search(r"problem: (.*) =", prompt)
            text = f"\\boxed{{{eval(m.group(1))}}}" if m else "\\boxed{no idea}"
            ids = self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            out.append(Segment(ids, [0.0] * len(ids), "stop"))
        return out


def test_evaluation_reports_each_dataset():
    """Held-out accuracy per task and level: a reasoning-gym problem counts under its
    dataset, so two datasets at the same level are told apart (the per-level figure mixes
    them)."""
    from kimi_rl.data.tokenizer import char_tokenizer
    from kimi_rl.evaluate import evaluate, task_name

    _, test = build(levels={"chain_sum": {1: {"min_terms": 2, "max_terms": 2}, 2: {}},
                            "countdown": {1: LEVELS["countdown"][2]}}, train=0, test=3)
    tokenizer = char_tokenizer(rg.vocabulary(test))
    out = evaluate(GoldForChainSum(tokenizer), tokenizer, test, 16)
    assert sorted({task_name(p) for p in test}) == ["chain_sum", "countdown"]
    assert out["by_task"] == {"chain_sum": {1: 1.0, 2: 1.0}, "countdown": {1: 0.0}}
    assert out["accuracy"] == {1: 0.5, 2: 1.0}
    assert task_name(Problem("m", "x", "1", 1, "modsum")) == "modsum"
    # pass@k and maj@k per task too (the gold engine answers every sample alike)
    from kimi_rl.evaluate import sampled_metrics
    from kimi_rl.rollout.engine import SamplingParams

    m = sampled_metrics(GoldForChainSum(tokenizer), tokenizer, test, 2, [1, 2], 16,
                        SamplingParams())
    assert m["by_task"]["chain_sum"]["pass@k"]["2"] == {"1": 1.0, "2": 1.0, "all": 1.0}
    assert m["by_task"]["countdown"]["maj@k"]["1"] == {"1": 0.0, "all": 0.0}
    assert m["pass@k"]["1"]["1"] == 0.5
