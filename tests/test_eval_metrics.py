"""pass@k and maj@k: the estimators against independent references, and `kimi-rl eval`
(run_evaluation) end to end with the torch engine, a scripted engine and a problem file."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import hydra
import pytest
from transformers import PreTrainedTokenizerBase

from kimi_rl import evaluate as ev
from kimi_rl.config import register_configs
from kimi_rl.data import modsum
from kimi_rl.data.problems import Problem
from kimi_rl.evaluate import answer_extractor, by_level, majority, pass_at_k, sampled_metrics
from kimi_rl.rollout.engine import Request, SamplingParams, Segment

TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=2", "model.intermediate_size=64", "data.train_per_level=10",
        "data.test_per_level=2", "eval.max_new_tokens=16"]
SAMPLED = ["eval.samples=4", "eval.k=[1,2,4]"]


def compose(overrides: list[str]):
    register_configs()
    with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return hydra.compose("train", overrides=overrides)


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n responses (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration_over_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k))


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every 3 of them hold a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share correct
    assert pass_at_k(200, 1, 200) == 1.0  # exact for large n
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_majority_vote_and_ties():
    assert majority(["3", "5", "5"]) == "5"
    assert majority(["3", "5", "5", "3"]) == "3"  # tie: the answer seen first
    assert majority(["5", "3", "3", "5"]) == "5"
    assert majority([None, None, "7"]) == "7"  # responses without an answer do not vote
    assert majority([None, "2", None, "4", None]) == "2"
    assert majority([None, None]) is None and majority([]) is None


def test_answer_extractors():
    assert answer_extractor("modsum")("0+a3=3\nanswer 3") == "3"
    assert answer_extractor("modsum")("answer 3\n0+a3=3") is None  # not the final line
    math_answer = answer_extractor("math")
    assert math_answer("so \\boxed{ 1/2 }.") == math_answer("Answer: 1/2") == "1/2"
    assert math_answer("no answer here") is None
    with pytest.raises(ValueError, match="no answer extractor"):
        answer_extractor("chess")


def test_by_level_means_per_level_and_over_all_problems():
    problems = [Problem(f"p{i}", "a1\n", "1", level) for i, level in enumerate([2, 1, 1, 1])]
    out = by_level(problems, [1.0, 0.0, 0.0, 1.0])
    assert list(out) == ["1", "2", "all"]
    assert out == {"1": pytest.approx(1 / 3), "2": 1.0, "all": 0.5}  # not the mean of levels


class ScriptedEngine:
    """Answers modsum prompts: the m-th copy of a level-L prompt in a call is right when
    m < L, else wrong with one fixed wrong answer (so votes of wrong answers agree)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tok = tokenizer

    def generate(self, requests: Sequence[Request], max_new_tokens, params: SamplingParams,
                 max_running=None, max_steps=None) -> list[Segment]:
        seen: dict[str, int] = {}
        out = []
        for r in requests:
            prompt = self.tok.decode(r.prompt_ids, skip_special_tokens=True)
            level = len(prompt.split()) - 1
            right = sum(int(t[1:]) for t in prompt.split()) % 10
            m = seen[prompt] = seen.get(prompt, -1) + 1
            text = f"answer {right if m < level else (right + 1) % 10}"
            ids = self.tok(text, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
            out.append(Segment(ids, [0.0] * len(ids), "stop"))
        return out


def test_sampled_metrics_with_a_scripted_engine(tokenizer):
    """n=4; level L has min(L, 4) right responses first, then wrong ones that agree."""
    _, problems = modsum.generate([1, 2, 3], 0, 2, seed=0)
    m = sampled_metrics(ScriptedEngine(tokenizer), tokenizer, problems, 4, [1, 2, 4], 16,
                        SamplingParams())
    c = {1: 1, 2: 2, 3: 3}
    for k in (1, 2, 4):
        expect = {str(lv): brute_pass_at_k(4, c[lv], k) for lv in c}
        assert m["pass@k"][str(k)] == pytest.approx({**expect, "all": sum(expect.values()) / 3})
    # level 1 votes [R, W, W, W]: maj@1 R, maj@2 a tie won by R (seen first), maj@4 W;
    # level 2 [R, R, W, W]: the tie at k=4 goes to R
    assert m["maj@k"]["1"] == {"1": 1.0, "2": 1.0, "3": 1.0, "all": 1.0}
    assert m["maj@k"]["2"] == {"1": 1.0, "2": 1.0, "3": 1.0, "all": 1.0}
    assert m["maj@k"]["4"] == {"1": 0.0, "2": 1.0, "3": 1.0, "all": pytest.approx(2 / 3)}
    assert m["by_task"] == {"modsum": {"pass@k": m["pass@k"], "maj@k": m["maj@k"]}}


def check_eval_json(out_dir, levels: set[str], ks=("1", "2", "4")) -> dict:
    result = json.loads((out_dir / "eval.json").read_text())
    assert set(result["accuracy"]) == levels
    for name in ("pass@k", "maj@k"):
        assert list(result[name]) == list(ks)
        for per_level in result[name].values():
            assert set(per_level) == levels | {"all"}
            assert all(0.0 <= v <= 1.0 for v in per_level.values())
    for lv in levels | {"all"}:
        values = [result["pass@k"][k][lv] for k in ks]
        assert values == sorted(values)  # pass@k does not decrease in k
    return result


def test_eval_command_with_the_torch_engine(tmp_path, capsys):
    out = ev.run_evaluation(compose(TINY + SAMPLED), tmp_path)
    result = check_eval_json(tmp_path, {"1", "2", "3", "4", "5", "6"})
    assert result == json.loads(json.dumps(out))
    assert result["sampling"] == {"samples": 4, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    table = capsys.readouterr().out
    assert "pass@1" in table and "maj@4" in table and "\nall " in table
    # the same seed gives the same samples
    assert ev.run_evaluation(compose(TINY + SAMPLED), tmp_path / "again") == out


def test_eval_command_with_another_engine(tmp_path, monkeypatch, tokenizer):
    """run_evaluation uses whatever engine build_engine returns."""
    monkeypatch.setattr(ev, "build_engine", lambda cfg, policy, tok: ScriptedEngine(tok))
    levels = ["data.levels=[1,2,3]", "data.demos={1:0,2:0,3:0,4:0,5:0,6:0}"]
    ev.run_evaluation(compose(TINY + SAMPLED + levels), tmp_path)
    result = check_eval_json(tmp_path, {"1", "2", "3"})
    assert result["accuracy"] == {"1": 1.0, "2": 1.0, "3": 1.0}  # greedy: first copies
    assert result["pass@k"]["1"]["all"] == pytest.approx((1 + 2 + 3) / 12)
    assert result["pass@k"]["4"]["all"] == 1.0


def test_eval_without_samples_and_bad_k(tmp_path):
    out = ev.run_evaluation(compose(TINY), tmp_path)
    assert set(out) == {"accuracy", "by_task", "correct_length", "prompt_format"}
    assert out["by_task"] == {"modsum": out["accuracy"]}
    with pytest.raises(ValueError, match="eval.k"):
        ev.run_evaluation(compose(TINY + ["eval.samples=2", "eval.k=[1,4]"]), tmp_path)


def test_problem_file_without_held_out_split_is_evaluated_whole(tmp_path, tokenizer,
                                                                make_model, capsys):
    """Three problems per level: too few to hold any out, so every problem is evaluated."""
    model_dir = tmp_path / "model"
    make_model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train, _ = modsum.generate([1, 2], 3, 0, seed=0)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer,
                                            "difficulty": p.level}) + "\n" for p in train))
    cfg = compose(TINY + SAMPLED + ["model=hf", f"model.path={model_dir}", "data=jsonl",
                                    f"data.path={problems}"])
    ev.run_evaluation(cfg, tmp_path / "eval")
    assert "evaluating on all 6 problems" in capsys.readouterr().out
    check_eval_json(tmp_path / "eval", {"1", "2"})


def test_checkpoint_evaluated_in_its_own_prompt_format_unless_one_is_given(tmp_path):
    """`kimi-rl eval eval.checkpoint=<run>` uses the run's saved prompt format; a `prompt`
    override on the command line replaces it."""
    from omegaconf import OmegaConf

    from kimi_rl import checkpoint
    from kimi_rl.build import build_policy
    from kimi_rl.cli import prompt_given
    from kimi_rl.data import load_task

    trained = compose(TINY + ["prompt=template"])
    trained.prompt.template = "Q {prompt}"
    policy, _ = build_policy(trained, load_task(trained.data))
    checkpoint.save(tmp_path / "run", "iter_000001",
                    {"config": OmegaConf.to_container(trained), "policy": policy.state_dict()})
    run = [f"eval.checkpoint={tmp_path / 'run'}"]
    own = ev.run_evaluation(compose(TINY + run), tmp_path / "own")
    assert own["prompt_format"] == "template"
    given = ev.run_evaluation(compose(TINY + run + ["prompt=raw"]), tmp_path / "given",
                              prompt_given=True)
    assert given["prompt_format"] == "raw"
    assert prompt_given(["eval.checkpoint=x", "prompt=chat"])
    assert prompt_given(["+prompt.system=be brief"]) and prompt_given(["prompt.template=Q"])
    assert not prompt_given(["eval.checkpoint=x", "data.prompt_key=q", "prompts=1"])
