"""Repeat detection (SPEC.md section 2): the loop condition, its incremental form, the
torch engine stopping a looping generator, and the repeat penalty in scoring."""

from __future__ import annotations

import ast
import copy
import random
import re
from pathlib import Path

import pytest
import torch

import kimi_rl
from kimi_rl.data import modsum
from kimi_rl.rewards.repetition import RepeatDetection, RepeatTracker, find_loop
from kimi_rl.rollout.engine import Request, SamplingParams
from kimi_rl.rollout.samples import score_groups
from kimi_rl.rollout.torch_engine import TorchEngine

DEFAULT = RepeatDetection()


def first_flag(tokens: list[int], spec: RepeatDetection = DEFAULT) -> int | None:
    """Length of the shortest prefix that ends in a loop (by the definition)."""
    for n in range(1, len(tokens) + 1):
        if find_loop(tokens[:n], spec.max_period, spec.min_repeats, spec.min_tokens):
            return n
    return None


def incremental_flags(streams: list[list[int]], spec: RepeatDetection,
                      prefixes: list[list[int]] | None = None) -> list[list[bool]]:
    """RepeatTracker's answer after each token of each stream, streams of unequal length
    pushed together (rows drop out as they end, as in the engine)."""
    tracker = RepeatTracker(spec, len(streams), prefixes)
    flags: list[list[bool]] = [[] for _ in streams]
    for t in range(max(len(s) for s in streams)):
        rows = [i for i, s in enumerate(streams) if t < len(s)]
        out = tracker.push(torch.tensor(rows), torch.tensor([streams[i][t] for i in rows]))
        for i, f in zip(rows, out.tolist(), strict=True):
            flags[i].append(f)
    return flags


# -- the condition ------------------------------------------------------------------------

@pytest.mark.parametrize("period", [1, 2, 3, 5, 7, 8, 9, 13, 32, 63, 64])
def test_loop_is_flagged_at_the_first_token_where_it_holds(period):
    rng = random.Random(period)
    prefix = [rng.randrange(100, 200) for _ in range(23)]  # no token of the block
    block = list(range(period))  # minimal period `period`
    tokens = prefix + block * (DEFAULT.span(period) // period + 3)
    span = period * max(4, -(-32 // period))  # r >= 4 repeats over >= 32 tokens
    assert DEFAULT.span(period) == span
    assert first_flag(tokens) == len(prefix) + span
    assert find_loop(tokens[: len(prefix) + span]) == period
    assert find_loop(tokens[: len(prefix) + span - 1]) is None


def test_spans_of_the_defaults():
    # short periods need 32 tokens (several repeats), periods from 8 on four repeats
    assert [DEFAULT.span(p) for p in (1, 2, 3, 5, 8, 9, 16, 64)] == [
        32, 32, 33, 35, 32, 36, 64, 256]


def test_period_above_max_period_is_not_a_loop():
    block = list(range(65))
    assert first_flag(block * 6) is None
    assert find_loop(list(range(64)) * 4) == 64
    assert find_loop(list(range(10)) * 4, max_period=9) is None


def test_a_passage_repeated_two_or_three_times_is_not_a_loop():
    rng = random.Random(0)
    for n in (8, 10, 20, 40, 64, 100):
        passage = [rng.randrange(40) for _ in range(n)]
        assert first_flag(passage * 3) is None, n
        assert first_flag([5, 6] + passage + [7] + passage + [8] + passage) is None, n
    # ...but a fourth repeat of a block of 8+ tokens is
    assert first_flag(list(range(10)) * 4) == 40


def test_builtin_task_demonstrations_are_not_loops(tokenizer):
    """The default condition leaves the built-in task's responses alone, the
    confirmation line included, at every prefix."""
    rng = random.Random(0)
    spec = DEFAULT
    streams = []
    for level in range(1, 17):
        for n in range(30):
            p = modsum.make_problem(rng, level, f"p{level}-{n}")
            text = modsum.demonstration(p, confirm=n % 2 == 0)
            streams.append(tokenizer(text, add_special_tokens=False).input_ids)
    assert max(len(s) for s in streams) > 2 * spec.max_period
    for s in streams[::10]:
        assert first_flag(s) is None
    assert not any(any(f) for f in incremental_flags(streams, spec))


def test_prose_is_not_a_loop():
    """The package's docstrings, as characters and as words."""
    docs = [ast.get_docstring(node) or "" for f in sorted(Path(kimi_rl.__file__).parent.rglob(
        "*.py")) for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)]
    # runs of spaces (column alignment in docstrings) are layout, not prose: see below
    text = re.sub(r" {2,}", " ", "\n\n".join(docs)).encode()
    assert len(text) > 10000
    text = text[:40000]  # plenty of prose; the detector runs in Python, token by token
    assert not any(incremental_flags([list(text)], DEFAULT)[0])
    words = text.split()
    ids = {w: i for i, w in enumerate(dict.fromkeys(words))}
    assert not any(incremental_flags([[ids[w] for w in words]], DEFAULT)[0])
    # (a run of 32 identical tokens is a loop, e.g. 32 spaces of code indentation under a
    # character tokenizer: raise repeat_min_tokens for such data)
    assert first_flag(list(b"x =" + b" " * 40)) == 3 + 32


def test_random_sequences_are_not_loops():
    rng = random.Random(1)
    streams = [[rng.randrange(vocab) for _ in range(400)] for vocab in (8, 40, 1000)
               for _ in range(20)]
    assert not any(any(f) for f in incremental_flags(streams, DEFAULT))
    for s in streams[::7]:
        assert first_flag(s) is None


def mixed_stream(rng: random.Random, length: int, vocab: int) -> list[int]:
    """Random runs and repeated blocks of random sizes, so that loops start and stop."""
    out: list[int] = []
    while len(out) < length:
        if rng.random() < 0.4:
            out += [rng.randrange(vocab) for _ in range(rng.randrange(1, 20))]
        else:
            block = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
            out += block * rng.randrange(1, 7)
    return out[:length]


@pytest.mark.parametrize("spec", [RepeatDetection(), RepeatDetection(6, 3, 8),
                                  RepeatDetection(12, 2, 5), RepeatDetection(1, 5, 1)],
                         ids=str)
def test_incremental_tracker_equals_the_definition(spec):
    """Property: after every token of every stream, the tracker's answer is find_loop's,
    with streams of different lengths sharing a batch."""
    rng = random.Random(2)
    streams = [mixed_stream(rng, rng.randrange(50, 250), vocab) for vocab in (2, 3, 5)
               for _ in range(6)]
    got = incremental_flags(streams, spec)
    flagged = 0
    for s, flags in zip(streams, got, strict=True):
        want = [find_loop(s[:n], spec.max_period, spec.min_repeats, spec.min_tokens)
                is not None for n in range(1, len(s) + 1)]
        assert flags == want
        flagged += sum(want)
    assert flagged > 20, "the streams should contain loops"


def test_tracker_prefixes_count_towards_a_loop():
    """Seeded with earlier tokens (a partial rollout's prefix), the tracker answers as if
    it had seen the whole stream, and never flags the prefix itself."""
    spec = RepeatDetection(6, 3, 8)
    rng = random.Random(3)
    streams = [mixed_stream(rng, 150, 3) for _ in range(10)]
    cuts = [rng.randrange(0, 140) for _ in streams]
    cuts[0] = 0
    whole = incremental_flags(streams, spec)
    rest = incremental_flags([s[c:] for s, c in zip(streams, cuts, strict=True)], spec,
                             prefixes=[s[:c] for s, c in zip(streams, cuts, strict=True)])
    for w, r, c in zip(whole, rest, cuts, strict=True):
        assert r == w[c:]
    # a long prefix: only its tail matters
    block = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    prefix = [0] * 1000 + block * 3
    assert incremental_flags([block], DEFAULT, [prefix])[0] == [False] * 8 + [True]


def test_bad_parameters_are_named():
    for kwargs, name in (({"max_period": 0}, "max_period"), ({"min_repeats": 1}, "min_repeats"),
                         ({"min_tokens": 0}, "min_tokens"), ({"max_period": 2.5}, "max_period")):
        with pytest.raises(ValueError, match=name):
            RepeatDetection(**kwargs)


# -- the engine ----------------------------------------------------------------------------

CYCLE = [20, 31, 9, 26, 14]  # token ids the looping model goes round


@pytest.fixture
def looping_model(make_model, tokenizer):
    """One layer, attention and MLP outputs zeroed: the final hidden state is the current
    token's (one-hot) embedding, and lm_head maps token v to next(v): round CYCLE, from
    any other token into CYCLE[0]. Greedy decoding then loops with period 5."""
    vocab = len(tokenizer)
    model = make_model(seed=0, hidden_size=64, num_layers=1, intermediate_size=32,
                       tie_word_embeddings=False)
    nxt = {v: CYCLE[0] for v in range(vocab)}
    nxt.update({a: b for a, b in zip(CYCLE, CYCLE[1:] + CYCLE[:1], strict=True)})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, :vocab] = torch.eye(vocab)
        head = model.get_output_embeddings().weight
        head.zero_()
        for v, w in nxt.items():
            head[w, v] = 10.0
    return model


def loop_engine(model, tokenizer, seed=0):
    return TorchEngine(copy.deepcopy(model), tokenizer.eos_token_id, tokenizer.pad_token_id,
                       seed=seed)


def test_engine_stops_a_looping_generator(looping_model, tokenizer):
    engine = loop_engine(looping_model, tokenizer)
    prompts = [[1, 5, 7], [1, CYCLE[2]], [1, 30, 31, 32, 33]]
    reqs = [Request(p) for p in prompts]
    off = engine.generate(reqs, 60, SamplingParams(greedy=True))
    for s in off:  # detection off: round the cycle up to the limit
        assert s.finish_reason == "length" and len(s.tokens) == 60
        assert set(s.tokens) == set(CYCLE)
    on = engine.generate(reqs, 60, SamplingParams(greedy=True, repeat=DEFAULT))
    stop = DEFAULT.span(len(CYCLE))  # 7 repeats of the 5-token cycle: 35 tokens
    assert stop == 35
    for s, full in zip(on, off, strict=True):
        assert s.finish_reason == "repeat"
        assert len(s.tokens) == first_flag(full.tokens) == stop
        assert s.tokens == full.tokens[:stop] and s.logprobs == full.logprobs[:stop]


def test_engine_repeat_with_limits_and_prefixes(looping_model, tokenizer):
    engine = loop_engine(looping_model, tokenizer)
    greedy = SamplingParams(greedy=True, repeat=DEFAULT)
    full = engine.generate([Request([1, 5])], 35, greedy)[0]
    assert full.finish_reason == "repeat" and len(full.tokens) == 35
    reqs = [Request([1, 5]), Request([1, 5]), Request([1, 5], prefix_ids=full.tokens[:20]),
            Request([1, 5], prefix_ids=[7, 8]), Request([1, 5])]
    segs = engine.generate(reqs, [20, 35, 40, 50, 0], greedy)
    assert (segs[0].finish_reason, len(segs[0].tokens)) == ("length", 20)
    # the token that closes the loop is also the last one allowed: "repeat"
    assert (segs[1].finish_reason, len(segs[1].tokens)) == ("repeat", 35)
    # the prefix counts: 15 more tokens close the loop
    assert segs[2].finish_reason == "repeat" and segs[2].tokens == full.tokens[20:]
    # a prefix that is no part of the loop: 35 new tokens
    assert (segs[3].finish_reason, len(segs[3].tokens)) == ("repeat", 35)
    assert segs[4].tokens == [] and segs[4].finish_reason == "length"


def test_detection_that_never_fires_changes_nothing(make_model, tokenizer):
    """Sampling is the same draw for draw when no response loops."""
    model = make_model(seed=1)
    rng = random.Random(0)
    reqs = [Request([1] + [rng.randrange(4, len(tokenizer)) for _ in range(n)])
            for n in (3, 7, 2, 9, 5, 4)]
    a = loop_engine(model, tokenizer, seed=4).generate(reqs, 80, SamplingParams())
    b = loop_engine(model, tokenizer, seed=4).generate(reqs, 80,
                                                       SamplingParams(repeat=DEFAULT))
    assert a == b
    assert {s.finish_reason for s in b} <= {"stop", "length"}
    assert sum(len(s.tokens) for s in b) > 200


# -- scoring -------------------------------------------------------------------------------

def test_repeat_penalty_applies_to_repeat_responses_only(mixed_samples):
    base, pen = mixed_samples(), mixed_samples()
    score_groups(base, modsum.verify, 0.5)
    score_groups(pen, modsum.verify, 0.5, repeat_penalty=0.3)
    assert any(s.finish_reason == "repeat" for s in pen)
    for b, p in zip(base, pen, strict=True):
        assert p.correct == b.correct and p.length_reward == b.length_reward
        assert p.reward == pytest.approx(b.reward - (0.3 if p.finish_reason == "repeat" else 0))
    # a repeat-terminated response is verified like any other (this one has an answer)
    assert pen[4].correct == 1.0
