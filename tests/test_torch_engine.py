"""The built-in KV-cache rollout engine against cache-free references and the policy."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from conftest import chi_square, chi_square_bound

from kimi_rl.config import AlgoConfig, BackendConfig
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.packing import pack
from kimi_rl.rollout.engine import Request, SamplingParams, Segment
from kimi_rl.rollout.torch_engine import CDF_BLOCK, TorchEngine, inverse_cdf, sample_tokens

FIRST_REAL = 4
PROMPT_LENGTHS = (3, 7, 1, 5, 9, 2, 6, 4)


def prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_REAL, vocab) for _ in range(n)] for n in lengths]


def engine_for(model, tokenizer, seed: int = 0, **kw) -> TorchEngine:
    return TorchEngine(copy.deepcopy(model), tokenizer.eos_token_id, tokenizer.pad_token_id,
                       seed=seed, **kw)


@torch.no_grad()
def greedy_reference(model, prompt, n, eos):
    """Argmax decoding with a full forward pass per step (no cache, no padding)."""
    ids, out, lps = list(prompt), [], []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
        tok = int(logits.argmax())
        out.append(tok)
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        ids.append(tok)
        if tok == eos:
            return out, lps, "stop"
    return out, lps, "length"


@torch.no_grad()
def sequence_logprobs(model, prompt, tokens, temperature):
    logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def check_segments(segs: list[Segment], limits: list[int], eos: int) -> None:
    for seg, limit in zip(segs, limits, strict=True):
        assert len(seg.tokens) == len(seg.logprobs) <= limit
        assert eos not in seg.tokens[:-1]
        if seg.finish_reason == "stop":
            assert seg.tokens[-1] == eos
        else:
            assert seg.finish_reason == "length"
            assert len(seg.tokens) == limit and eos not in seg.tokens


def test_sampling_logprobs_equal_policy_logprobs(make_model, tokenizer):
    model = make_model(seed=1)
    eos, temperature = tokenizer.eos_token_id, 0.7
    # EOS has probability ~1/vocab per step: 16 x 24 draws give both outcomes
    ps = prompts(len(tokenizer), lengths=PROMPT_LENGTHS * 2)
    engine = engine_for(model, tokenizer, seed=3)
    segs = engine.generate([Request(p) for p in ps], 24, SamplingParams(temperature=temperature))
    check_segments(segs, [24] * len(ps), eos)
    reasons = {s.finish_reason for s in segs}
    assert reasons == {"stop", "length"}, "want sequences that stopped on EOS and that did not"

    policy = HFPolicy(model, BackendConfig(logits_chunk=7), AlgoConfig())
    batches = pack(ps, [s.tokens for s in segs], max_tokens=100)
    got: dict[int, list[float]] = {i: [] for i in range(len(ps))}
    for b in batches:
        lp, _ = policy.logprobs(b, temperature=temperature)
        for k in range(len(lp)):
            got[b.seq_ids[int(b.seq_index[k])]].append(float(lp[k]))
    for i, (p, seg) in enumerate(zip(ps, segs, strict=True)):
        torch.testing.assert_close(torch.tensor(seg.logprobs), torch.tensor(got[i]),
                                   atol=1e-4, rtol=0)
        ref = sequence_logprobs(model, p, seg.tokens, temperature)
        torch.testing.assert_close(torch.tensor(seg.logprobs, dtype=torch.float64), ref,
                                   atol=1e-4, rtol=0)


def test_greedy_equals_cache_free_argmax(make_model, tokenizer):
    model = make_model(seed=2, std=0.3)
    eos, n = tokenizer.eos_token_id, 14
    ps = prompts(len(tokenizer), seed=1)
    engine = engine_for(model, tokenizer, max_batch_size=3)  # several engine batches
    segs = engine.generate([Request(p) for p in ps], n, SamplingParams(greedy=True))
    distinct = set()
    for p, seg in zip(ps, segs, strict=True):
        tokens, lps, reason = greedy_reference(model, p, n, eos)
        assert seg.tokens == tokens
        assert seg.finish_reason == reason
        torch.testing.assert_close(torch.tensor(seg.logprobs, dtype=torch.float64),
                                   torch.tensor(lps, dtype=torch.float64), atol=1e-4, rtol=0)
        distinct |= set(tokens)
    assert len(distinct) >= 5, "the model should not be degenerate"


@pytest.mark.parametrize("k", [1, 4, 9])
def test_continuation_equals_uninterrupted_generation(make_model, tokenizer, k):
    model = make_model(seed=2, std=0.3)
    n = 12
    ps = prompts(len(tokenizer), seed=2)
    engine = engine_for(model, tokenizer)
    greedy = SamplingParams(greedy=True)
    full = engine.generate([Request(p) for p in ps], n, greedy)
    cut = [i for i, s in enumerate(full) if len(s.tokens) > k]
    assert len(cut) >= 3
    first = engine.generate([Request(ps[i]) for i in cut], k, greedy)
    assert [s.tokens for s in first] == [full[i].tokens[:k] for i in cut]
    assert all(s.finish_reason == "length" for s in first)
    # continue the cut ones, next to fresh requests of other lengths
    others = prompts(len(tokenizer), lengths=(2, 8, 5), seed=9)
    requests = [Request(ps[i], prefix_ids=first[j].tokens) for j, i in enumerate(cut)]
    requests += [Request(p) for p in others]
    limits = [n - k] * len(cut) + [n] * len(others)
    rest = engine.generate(requests, limits, greedy)
    for j, i in enumerate(cut):
        assert first[j].tokens + rest[j].tokens == full[i].tokens
        assert rest[j].finish_reason == full[i].finish_reason
        torch.testing.assert_close(first[j].logprobs + rest[j].logprobs, full[i].logprobs,
                                   atol=1e-4, rtol=0)
    alone = engine.generate([Request(p) for p in others], n, greedy)
    assert [s.tokens for s in rest[len(cut):]] == [s.tokens for s in alone]


def test_seeded_reproducibility(model, tokenizer):
    ps = prompts(len(tokenizer))
    reqs = [Request(p) for p in ps]
    params = SamplingParams(temperature=1.0)
    a, b = engine_for(model, tokenizer, seed=5), engine_for(model, tokenizer, seed=5)
    assert a.generate(reqs, 10, params) == b.generate(reqs, 10, params)
    other = engine_for(model, tokenizer, seed=6).generate(reqs, 10, params)
    assert other != engine_for(model, tokenizer, seed=5).generate(reqs, 10, params)

    # state_dict resumes the stream: a fresh engine loaded with a's state continues like a
    state = copy.deepcopy(a.state_dict())
    next_a = a.generate(reqs, 10, params)
    c = engine_for(model, tokenizer, seed=99)
    c.load_state_dict(state)
    assert c.generate(reqs, 10, params) == next_a
    assert b.generate(reqs, 10, params) == next_a  # b took the same path as a

    # a per-call seed ignores (and leaves alone) the engine's stream
    fixed = SamplingParams(temperature=1.0, seed=123)
    before = a.state_dict()["generator"].clone()
    out1 = a.generate(reqs, 10, fixed)
    assert torch.equal(a.state_dict()["generator"], before)
    out2 = engine_for(model, tokenizer, seed=77).generate(reqs, 10, fixed)
    assert out1 == out2
    assert out1 != a.generate(reqs, 10, params)


def test_stop_and_length_with_per_request_limits(make_model, tokenizer):
    model = make_model(seed=1)
    eos = tokenizer.eos_token_id
    ps = prompts(len(tokenizer), lengths=(3, 7, 1, 5, 9, 2, 6, 4) * 8, seed=4)
    limits = [1 + (i * 7) % 13 for i in range(len(ps))]
    engine = engine_for(model, tokenizer, seed=1)
    segs = engine.generate([Request(p) for p in ps], limits, SamplingParams(temperature=1.5))
    check_segments(segs, limits, eos)
    assert {s.finish_reason for s in segs} == {"stop", "length"}
    assert any(s.finish_reason == "stop" and len(s.tokens) < lim
               for s, lim in zip(segs, limits, strict=True))


def test_zero_token_limit_next_to_others(model, tokenizer):
    ps = prompts(len(tokenizer), lengths=(3, 5))
    engine = engine_for(model, tokenizer)
    assert engine.generate([Request(ps[0])], 0, SamplingParams())[0].tokens == []
    segs = engine.generate([Request(p) for p in ps], [0, 4], SamplingParams())
    assert segs[0] == Segment([], [], "length")
    assert len(segs[1].tokens) >= 1
    # greedy: the other rows decode exactly as they would alone
    greedy = SamplingParams(greedy=True)
    ps = prompts(len(tokenizer), lengths=(3, 5, 2, 4), seed=3)
    mixed = engine.generate([Request(p) for p in ps], [6, 0, 6, 0], greedy)
    alone = engine.generate([Request(ps[0]), Request(ps[2])], 6, greedy)
    assert mixed[1] == mixed[3] == Segment([], [], "length")
    assert [mixed[0], mixed[2]] == alone


def test_tiny_top_p_samples_the_argmax(make_model, tokenizer):
    model = make_model(seed=2, std=0.3)
    ps = prompts(len(tokenizer), seed=5)
    engine = engine_for(model, tokenizer, seed=8)
    reqs = [Request(p) for p in ps]
    greedy = engine.generate(reqs, 12, SamplingParams(greedy=True))
    for seed in range(3):
        nucleus = engine.generate(reqs, 12, SamplingParams(temperature=1.0, top_p=1e-6,
                                                           seed=seed))
        assert [s.tokens for s in nucleus] == [s.tokens for s in greedy]
    # at T = 1 the sampling logprob is the greedy one (top-p does not renormalise it)
    for a, b in zip(nucleus, greedy, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
    hot = engine.generate(reqs, 12, SamplingParams(temperature=1.0, seed=0))
    assert [s.tokens for s in hot] != [s.tokens for s in greedy]


@pytest.mark.parametrize("width", [50, 256, 1000])
def test_inverse_cdf_against_a_running_sum(width):
    """Each row's draw is the first index whose exact running sum (math.fsum) exceeds u x
    the row total; zero weights are never drawn, u = 0 gives the first positive weight,
    u just below 1 the last positive one. Rows wider than CDF_BLOCK (two levels, block
    sums rounded in float32) are compared where u x total is not within 1e-6 of a block
    boundary; within the float32 rounding of a block's sum, that block's last positive
    entry is drawn."""
    gen = torch.Generator().manual_seed(width)
    probs = torch.rand(60, width, generator=gen) ** 4
    probs[probs < 0.05] = 0.0  # many zeros, some at the ends of rows
    probs[0, :7], probs[0, 7] = 0.0, 0.5
    probs[1, -9:], probs[1, -10] = 0.0, 0.5
    if width > 300:
        probs[2:, 256:512] = 0.0  # a block of zeros
        probs[3, 250:270] = 0.0  # zeros across a block boundary
    u = torch.rand(60, generator=gen, dtype=torch.float64)
    u[0], u[1] = 0.0, 1.0 - 2.0**-53
    if width > 300:
        # row 4: its first block's float32 sum (1 + 2^-23) exceeds the exact one (1 + 0.75 x
        # 2^-23) and u x total falls in between: the last positive entry of that block
        probs[4] = 0.0
        probs[4, [0, 1, 600]] = torch.tensor([1.0, 0.75 * 2.0**-23, 1.0])
        u[4] = (1 + 2.0**-23 - 2.0**-30) / (2 + 2.0**-23)
    tok = inverse_cdf(probs, u)
    compared = 0
    for i in range(60):
        w = probs[i].double().tolist()
        total = math.fsum(w)
        target = float(u[i]) * total
        if any(abs(math.fsum(w[:k]) - target) < 1e-6 * total
               for k in range(CDF_BLOCK, width, CDF_BLOCK)):
            continue
        ref = next(j for j in range(width) if math.fsum(w[:j + 1]) > target)
        assert tok[i] == ref and w[ref] > 0
        compared += 1
    assert compared >= 57
    assert all(probs[i, tok[i]] > 0 for i in range(60))
    assert tok[0] == 7 and tok[1] == width - 10
    if width > 300:
        assert tok[4] == 1


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sample_tokens_frequencies_follow_softmax(temperature):
    draws = 40000
    logits = LOGITS.expand(draws, -1)
    gen = torch.Generator().manual_seed(0)
    tok, lp = sample_tokens(logits, SamplingParams(temperature=temperature), gen)
    probs = torch.softmax(LOGITS.double() / temperature, -1)
    counts = torch.bincount(tok, minlength=len(LOGITS)).double()
    assert chi_square(counts, probs) < chi_square_bound(len(LOGITS) - 1)
    # the wrong temperature is rejected by the same statistic
    wrong = torch.softmax(LOGITS.double() / (temperature * 1.3), -1)
    assert chi_square(counts, wrong) > chi_square_bound(len(LOGITS) - 1)
    torch.testing.assert_close(lp.double(), probs.log()[tok], atol=1e-6, rtol=0)


def test_sample_tokens_top_p_keeps_the_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = probs.log().expand(30000, -1)
    gen = torch.Generator().manual_seed(1)
    tok, lp = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.65), gen)
    # smallest set of most likely tokens whose mass reaches 0.65: {1, 3}
    counts = torch.bincount(tok, minlength=5).double()
    assert counts[[0, 2, 4]].sum() == 0
    nucleus = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.0]) / 0.7
    assert chi_square(counts[[1, 3]], nucleus[[1, 3]].double()) < chi_square_bound(1)
    torch.testing.assert_close(lp, probs.log()[tok], atol=1e-6, rtol=0)  # before top-p


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sample_tokens_greedy(temperature):
    """The argmax, with its logprob under softmax(logits / temperature) like sampling."""
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    params = SamplingParams(temperature=temperature, greedy=True)
    tok, lp = sample_tokens(logits, params, torch.Generator())
    assert tok.tolist() == [0, len(LOGITS) - 1]
    torch.testing.assert_close(lp, torch.log_softmax(LOGITS / temperature, -1)[0].expand(2))


@pytest.mark.parametrize("greedy", [False, True])
def test_sample_tokens_rejects_non_positive_temperature(greedy):
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(LOGITS[None], SamplingParams(temperature=0.0, greedy=greedy),
                      torch.Generator())


def test_greedy_generation_reports_tempered_logprobs(make_model, tokenizer):
    model = make_model(seed=2, std=0.3)
    ps = prompts(len(tokenizer), seed=7)
    engine = engine_for(model, tokenizer)
    reqs = [Request(p) for p in ps]
    plain = engine.generate(reqs, 8, SamplingParams(greedy=True))
    cool = engine.generate(reqs, 8, SamplingParams(temperature=0.5, greedy=True))
    assert [s.tokens for s in cool] == [s.tokens for s in plain]
    for p, seg in zip(ps, cool, strict=True):
        torch.testing.assert_close(torch.tensor(seg.logprobs, dtype=torch.float64),
                                   sequence_logprobs(model, p, seg.tokens, 0.5), atol=1e-4, rtol=0)


def test_update_weights(make_model, tokenizer):
    old, new = make_model(seed=1, std=0.2), make_model(seed=2, std=0.2)
    engine = engine_for(old, tokenizer)
    ps = prompts(len(tokenizer), seed=6)
    reqs = [Request(p) for p in ps]
    before = engine.generate(reqs, 8, SamplingParams(greedy=True))

    engine.update_weights(HFPolicy(copy.deepcopy(new), BackendConfig(), AlgoConfig())
                          .export_weights())
    for name, t in new.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], t), name
    segs = engine.generate(reqs, 8, SamplingParams(temperature=0.8))
    for p, seg in zip(ps, segs, strict=True):
        torch.testing.assert_close(torch.tensor(seg.logprobs, dtype=torch.float64),
                                   sequence_logprobs(new, p, seg.tokens, 0.8), atol=1e-4, rtol=0)
    after = engine.generate(reqs, 8, SamplingParams(greedy=True))
    eos = tokenizer.eos_token_id
    assert [s.tokens for s in after] == [greedy_reference(new, p, 8, eos)[0] for p in ps]
    assert after != before

    weights = dict(old.state_dict())
    missing = next(n for n, _ in old.named_parameters() if "layers.1" in n)
    del weights[missing]
    with pytest.raises(ValueError, match="partial"):
        engine.update_weights(weights.items())
    with pytest.raises(KeyError, match="not_a_weight"):
        engine.update_weights([*old.state_dict().items(), ("model.not_a_weight", weights[
            "model.norm.weight"])])


def test_rejected_update_leaves_the_engine_unchanged(make_model, tokenizer):
    """Every check runs before the first copy: a bad tensor late in the update (unknown
    name, wrong shape, missing parameter) must not leave earlier tensors half-applied."""
    old, new = make_model(seed=1, std=0.2), make_model(seed=2, std=0.2)
    engine = engine_for(old, tokenizer)
    reqs = [Request(p) for p in prompts(len(tokenizer), seed=6)]
    before = {n: t.clone() for n, t in engine.model.state_dict().items()}
    outputs = engine.generate(reqs, 8, SamplingParams(greedy=True))
    good = list(new.state_dict().items())
    last_param = [n for n, _ in new.named_parameters()][-1]
    bad_updates = {
        "unknown": (KeyError, good + [("model.not_a_weight", good[0][1])]),
        "shape": (ValueError, good[:-1] + [(good[-1][0], good[-1][1][:-1])]),
        "missing": (ValueError, [(n, t) for n, t in good if n != last_param]),
    }
    for what, (error, update) in bad_updates.items():
        with pytest.raises(error, match="not_a_weight|shape|partial"):
            engine.update_weights(iter(update))
        for name, t in engine.model.state_dict().items():
            assert torch.equal(t, before[name]), (what, name)
    assert engine.generate(reqs, 8, SamplingParams(greedy=True)) == outputs
    engine.update_weights(iter(good))  # a good update still applies in full
    for name, t in new.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], t), name


def test_contexts_of_very_different_lengths_generate_as_if_alone(make_model, tokenizer):
    """Contexts far apart in length are prefilled in separate buckets and stacked into one
    cache; every row generates what it generates on its own."""
    model = make_model(seed=2, std=0.3)
    engine = engine_for(model, tokenizer)
    ps = prompts(len(tokenizer), lengths=(3, 40, 12, 25, 4, 33, 13), seed=4)
    greedy = SamplingParams(greedy=True)
    together = engine.generate([Request(p) for p in ps], 10, greedy)
    for p, seg in zip(ps, together, strict=True):
        (alone,) = engine.generate([Request(p)], 10, greedy)
        assert seg.tokens == alone.tokens
        assert seg.finish_reason == alone.finish_reason
        torch.testing.assert_close(seg.logprobs, alone.logprobs, atol=1e-4, rtol=0)
        ref, _, _ = greedy_reference(model, p, len(seg.tokens), tokenizer.eos_token_id)
        assert seg.tokens == ref[:len(seg.tokens)]


def test_repeated_contexts_generate_as_if_alone(make_model, tokenizer):
    """The samples of a group (equal contexts, prefilled once) each generate what the
    context generates alone, greedy; sampled rows still differ."""
    model = make_model(seed=2, std=0.3)
    engine = engine_for(model, tokenizer)
    a, b = prompts(len(tokenizer), lengths=(6, 9), seed=5)
    ps = [a, b, a, a, b]
    together = engine.generate([Request(p) for p in ps], 8, SamplingParams(greedy=True))
    for p, seg in zip(ps, together, strict=True):
        ref, lps, _ = greedy_reference(model, p, len(seg.tokens), tokenizer.eos_token_id)
        assert seg.tokens == ref
        torch.testing.assert_close(seg.logprobs, lps, atol=1e-4, rtol=0)
    sampled = engine.generate([Request(a)] * 4, 8, SamplingParams(temperature=1.0))
    assert len({tuple(s.tokens) for s in sampled}) > 1


@pytest.mark.parametrize("max_running", [1, 2, 3])
def test_queued_requests_start_as_rows_end(make_model, tokenizer, max_running):
    """Continuous batching: with fewer running rows than requests, each request still
    generates exactly what it generates alone (queued ones join rows of other lengths)."""
    model = make_model(seed=4, std=0.3)
    engine = engine_for(model, tokenizer)
    # the last context is longer than the running rows' cache: those get left-padded
    ps = prompts(len(tokenizer), lengths=(3, 30, 5, 12, 2, 21, 8, 70), seed=5)
    limits = [12, 3, 9, 15, 1, 6, 12, 8]
    greedy = SamplingParams(greedy=True)
    queued = engine.generate([Request(p) for p in ps], limits, greedy, max_running=max_running)
    for p, n, seg in zip(ps, limits, queued, strict=True):
        (alone,) = engine.generate([Request(p)], n, greedy)
        assert seg.tokens == alone.tokens and seg.finish_reason == alone.finish_reason
        torch.testing.assert_close(seg.logprobs, alone.logprobs, atol=1e-4, rtol=0)


def test_max_steps_ends_the_call(make_model, tokenizer):
    """With max_steps, running rows stop (finish "length") after that many decode steps
    of the call, and requests that never started come back empty as "pending"."""
    engine = TorchEngine(copy.deepcopy(make_model(seed=0)), -1, tokenizer.pad_token_id)
    ps = prompts(len(tokenizer), lengths=(3, 4, 5, 6, 7), seed=1)
    # 0 and 1 start; 0 ends at step 2 and 2 takes its row (tokens at steps 3-5); 2 ends
    # at step 5 and 3 takes the row (one token, at step 6); 4 never starts
    limits = [2, 10, 3, 10, 10]
    segs = engine.generate([Request(p) for p in ps], limits, SamplingParams(greedy=True),
                           max_running=2, max_steps=6)
    assert [len(s.tokens) for s in segs] == [2, 6, 3, 1, 0]
    assert [s.finish_reason for s in segs] == ["length"] * 4 + ["pending"]
    alone = engine.generate([Request(p) for p in ps], 10, SamplingParams(greedy=True))
    for s, a in zip(segs, alone, strict=True):
        assert s.tokens == a.tokens[:len(s.tokens)]


def test_buffered_cache_layer_matches_transformers_dynamic_layer():
    """The engine's in-place KV layer reads like transformers' DynamicLayer through
    appends past its headroom, row selection and reassignment."""
    from transformers.cache_utils import DynamicLayer

    from kimi_rl.rollout.torch_engine import _BufferedLayer

    gen = torch.Generator().manual_seed(0)

    def kv(b, n):
        return (torch.randn(b, 2, n, 4, generator=gen), torch.randn(b, 2, n, 4, generator=gen))

    ours, ref = _BufferedLayer(reserve=3), DynamicLayer()
    steps = [kv(5, 6)] + [kv(5, 1) for _ in range(4)] + [kv(5, 7)]  # 4 + 7 > reserve
    for k, v in steps:
        got, want = ours.update(k, v), ref.update(k, v)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    keep = torch.tensor([4, 0, 2])
    ours.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    ours.keys, ref.keys = (torch.cat([x.keys, x.keys[:1]]) for x in (ours, ref))
    ours.values, ref.values = (torch.cat([x.values, x.values[:1]]) for x in (ours, ref))
    k, v = kv(4, 2)
    got, want = ours.update(k, v), ref.update(k, v)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert ours.get_seq_length() == ref.get_seq_length() == 6 + 4 + 7 + 2
