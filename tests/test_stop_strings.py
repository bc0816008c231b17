"""Stop strings (kimi_rl/rollout/stops.py): the incremental tracker against the definition
(every prefix decoded whole), on a character, a ChatML-style and SmolLM2's byte-level BPE
tokenizer; the torch engine stops where the definition says, a string begun in an
earlier segment included; the config reaches the engine."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from conftest import build_model
from omegaconf import OmegaConf
from test_prompt_formats import qwen_style_tokenizer, smollm2  # noqa: F401 (a fixture)

from kimi_rl.config import TrainConfig
from kimi_rl.data import modsum
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.prompts import PromptFormat
from kimi_rl.rollout.engine import Request, SamplingParams
from kimi_rl.rollout.stops import StopStrings, stop_position
from kimi_rl.rollout.torch_engine import TorchEngine

FRAGMENTS = ["</answer>", " </answer>", "<answer>", "</", "answer", ">", "\n", " 42", "é",
             "答案", "x", " ", "</think>", "ans"]
STRINGS = ["</answer>", "答案", "\n\n"]


@pytest.fixture(params=["chatml", "smollm2"])
def tokenizer(request):
    if request.param == "chatml":
        return qwen_style_tokenizer()
    return request.getfixturevalue("smollm2")


def first_hit(stops: StopStrings, prefix: list[int], tokens: list[int]) -> int | None:
    tracker = stops.tracker(1, [prefix])
    for n, tok in enumerate(tokens, 1):
        if bool(tracker.push(torch.tensor([0]), torch.tensor([tok]))[0]):
            return n
    return None


def test_tracker_stops_where_the_definition_does(tokenizer):
    strings = [s for s in STRINGS if all(c in tokenizer.decode(tokenizer.encode(
        s, add_special_tokens=False)) for c in s)]
    stops = StopStrings.from_tokenizer(strings, tokenizer)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    rng = random.Random(0)
    hits = spanning = across = 0
    for _ in range(150):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(2, 12)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        first = stop_position(ids, strings, decode)
        k = rng.randint(0, (first - 1) if first else len(ids))  # a prefix without a stop
        prefix, new = ids[:k], ids[k:]
        want = stop_position(new, strings, decode, prefix)
        assert first_hit(stops, prefix, new) == want, (text, k)
        if want is not None:
            hits += 1
            end = k + want
            start = max(j for j in range(end) if any(
                s in decode(ids[j:end]) for s in strings))
            spanning += end - start > 1
            across += start < k
    assert hits > 30 and spanning > 10 and across > 3, (hits, spanning, across)


def test_bad_stop_strings_are_refused():
    with pytest.raises(ValueError, match="prompt.stop_strings"):
        PromptFormat(stop_strings=("</answer>", ""))


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(modsum.vocabulary())


def requests_with_prefixes(tok) -> list[Request]:
    prefixes = ["", "q", "7 ", "ab", "", "zz", "3", "k7 q"]
    return [Request(tok.encode("k7 q3 b9\n"), tok.encode(p)[1:] if p else [], key=1000 + i)
            for i, p in enumerate(prefixes * 2)]


def strings_that_occur(tok, reqs, free) -> list[str]:
    """Stop strings for a run without them (`free`): one inside response 0, one that
    request 1's prefix begins and its response ends."""
    text = [tok.decode(f.tokens) for f in free]
    return [text[0][5:7], tok.decode(reqs[1].prefix_ids) + text[1][:1]]


def assert_stopped_where_defined(tok, reqs, free, got, strings, logprobs: bool = True):
    """`got` is `free` cut where `stop_position` says, finish reason "stop"; some rows
    stop, some do not, and the string begun in request 1's prefix ends it at once."""
    stopped = 0
    for r, f, g in zip(reqs, free, got, strict=True):
        n = stop_position(f.tokens, strings, tok.decode, r.prefix_ids)
        if n is None:
            assert (g.tokens, g.finish_reason) == (f.tokens, f.finish_reason)
        else:
            stopped += 1
            assert (g.tokens, g.finish_reason) == (f.tokens[:n], "stop")
            if logprobs:
                assert g.logprobs == f.logprobs[:n]
    assert got[1].tokens == free[1].tokens[:1], "the string begun in the prefix ends it"
    assert 2 <= stopped < len(reqs), stopped


def test_torch_engine_stops_after_a_stop_string(tok):
    model = build_model(tok, seed=5, std=0.3)
    reqs = requests_with_prefixes(tok)
    params = SamplingParams(temperature=1.0)
    free = TorchEngine(model, -1, tok.pad_token_id).generate(reqs, 40, params)
    strings = strings_that_occur(tok, reqs, free)
    stops = StopStrings.from_tokenizer(strings, tok)
    engine = TorchEngine(model, -1, tok.pad_token_id, stop_strings=stops)
    assert_stopped_where_defined(tok, reqs, free, engine.generate(reqs, 40, params), strings)


def test_config_reaches_the_engine(tok):
    from kimi_rl.build import build_engine

    cfg = OmegaConf.structured(TrainConfig)
    model = build_model(tok, seed=5, std=0.3)
    assert build_engine(cfg, SimpleNamespace(model=model), tok).stop_strings is None
    cfg.prompt.stop_strings = ["q3", "\n\n"]
    engine = build_engine(cfg, SimpleNamespace(model=model), tok)
    assert engine.stop_strings.strings == ("q3", "\n\n")
    # the one-stop-token override (benchmarks: every response to its limit) drops them
    assert build_engine(cfg, SimpleNamespace(model=model), tok,
                        eos_token_id=-1).stop_strings is None
