"""Rollout replicas: samples that do not depend on the layout, and replicas generating
their shares of partial rollouts (kimi_rl/rollout/replicas.py).

The engines are the real built-in torch engine on tiny random Llamas. Two replicas run
here as two threads of one process, each with its own engine and its own copy of the
replay buffer, meeting in a gather that a barrier implements (what torch.distributed's
all-gather does across processes; the torchrun path itself is covered in
tests/test_megatron.py). What is compared with the one-replica run: sampled tokens and
finish reasons exactly, logprobs within 1e-5. A different batch composition changes the
padding and bucketing of the forward passes and so the float32 rounding of the logits
(~1e-6); a sampled token changes only if its uniform falls within that distance of a
boundary of the cumulative distribution, which for these few hundred draws has a chance
of about 1e-4 (the seeds here are fixed, so the test is deterministic).
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from kimi_rl.data.problems import Problem
from kimi_rl.rollout.engine import Request, SamplingParams, sample_key
from kimi_rl.rollout.partial import PartialRollouts
from kimi_rl.rollout.replicas import Replicas, ReplicaStats
from kimi_rl.rollout.torch_engine import TorchEngine, keyed_uniforms

MASK = 2**64 - 1


def splitmix64(seed: int, n: int) -> float:
    """Draw n (0-based) of the SplitMix64 stream seeded with `seed`, written in Python
    integers from the published algorithm (Steele, Lea, Flood 2014), as a double in [0, 1)."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return (z >> 11) / 2.0**53


def test_keyed_uniforms_are_splitmix64():
    keys = [0, 1, 12345, MASK, sample_key(7, "p3", 2, 5, 1)]
    counters = [0, 1, 2, 99, 12]
    u = keyed_uniforms(np.array(keys, dtype=np.uint64), np.array(counters))
    assert u.dtype == torch.float64
    assert u.tolist() == [splitmix64(k, n) for k, n in zip(keys, counters, strict=True)]


def test_sample_key_depends_on_every_part():
    base = (0, "p1", 0, 3, 0)
    keys = {sample_key(*base)}
    for i in range(5):
        changed = list(base)
        changed[i] = changed[i] + 1 if isinstance(changed[i], int) else "p2"
        keys.add(sample_key(*changed))
    assert len(keys) == 6 and sample_key(*base) == sample_key(*base)
    assert all(0 <= k < 2**64 for k in keys)


def make_requests(vocab: int, keyed: bool) -> list[Request]:
    rng = np.random.default_rng(0)
    out = []
    prompts = [rng.integers(4, vocab, int(rng.integers(2, 9))).tolist() for _ in range(3)]
    for i in range(6):  # 3 groups of 2 samples: a group's samples share the prompt
        prompt = prompts[i // 2]
        prefix = rng.integers(4, vocab, 5).tolist() if i == 4 else []  # a continuation
        out.append(Request(prompt, prefix, sample_key(0, f"p{i // 2}", i % 2, 3, 0)
                           if keyed else None))
    return out


def test_split_batches_draw_the_same_tokens(make_model, tokenizer):
    """The same keyed requests generated as one batch, and as two batches by an engine
    whose own stream is seeded otherwise, give the same tokens; unkeyed ones do not."""
    model = make_model(std=0.3)
    params = SamplingParams(temperature=1.0)

    def run(requests, seed, split):
        engine = TorchEngine(copy.deepcopy(model), -1, tokenizer.pad_token_id, seed=seed)
        if not split:
            return engine.generate(requests, 12, params)
        odd = engine.generate(requests[1::2], 12, params)
        even = engine.generate(requests[0::2], 12, params)
        return [s for pair in zip(even, odd, strict=True) for s in pair]

    keyed = make_requests(len(tokenizer), True)
    whole, parts = run(keyed, 0, False), run(keyed, 1, True)
    assert [s.tokens for s in whole] == [s.tokens for s in parts]
    for a, b in zip(whole, parts, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    # the samples of a group share the prompt, not the key: they differ
    assert len({tuple(s.tokens) for s in whole}) == len(whole)
    plain = make_requests(len(tokenizer), False)
    assert [s.tokens for s in run(plain, 0, False)] != [s.tokens for s in run(plain, 1, True)]


def problems(n: int) -> list[Problem]:
    rng = np.random.default_rng(1)
    return [Problem(f"p{i}", " ".join(f"a{d}" for d in rng.integers(0, 10, 1 + i % 4)) + "\n",
                    "0", 1 + i % 2, "modsum") for i in range(n)]


class CountingEngine(TorchEngine):
    """The torch engine, recording how many requests each generate call got."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: list[int] = []

    def generate(self, requests, *args, **kw):
        self.calls.append(len(requests))
        return super().generate(requests, *args, **kw)


def test_two_replicas_equal_one(make_model, tokenizer):
    """Partial rollouts (budget 6 tokens, cap 20) over 4 iterations, new groups each time:
    two replicas (threads) generate disjoint shares, both end every iteration with the
    same finished groups as the one-replica run, the per-replica figures add up, and the
    replay buffer saved after iteration 1 resumes in a world of one replica."""
    model, probs = make_model(std=0.3), problems(12)
    params = SamplingParams(temperature=1.0)

    def decode(t):
        return tokenizer.decode(t, skip_special_tokens=True)

    def manager():
        return PartialRollouts(group_size=2, slots=6, budget=6, seed=0)

    def engine():
        return CountingEngine(copy.deepcopy(model), tokenizer.eos_token_id,
                              tokenizer.pad_token_id, seed=0)

    pending = list(probs)

    def feed(m, it):  # up to 3 new problems an iteration, as many as the slots allow
        m.add_groups(pending[it * 3:it * 3 + min(3, m.new_groups_wanted())], tokenizer, it)

    ref, ref_engine, ref_out = manager(), engine(), []
    for it in range(4):
        feed(ref, it)
        done, stats = ref.step(ref_engine, it, 20, params, decode)
        ref_out.append(([(s.problem.id, s.tokens, s.finish_reason) for s in done], stats))

    slots, barrier = [None, None], threading.Barrier(2)

    def gather_for(r):
        def gather(x):
            slots[r] = x
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return gather

    results: list = [None, None]
    engines = [engine(), engine()]
    saved: list = []

    def replica(r):
        m, out = manager(), []
        reps = Replicas(2, r, 2, 0.25, gather_for(r))
        for it in range(4):
            feed(m, it)
            done, stats = m.step(engines[r], it, 20, params, decode, reps)
            out.append(([(s.problem.id, s.tokens, s.finish_reason) for s in done], stats))
            if it == 1 and r == 0:  # the checkpoint's rollout state after iteration 1
                saved.append(copy.deepcopy(m.state_dict()))
        results[r] = out

    threads = [threading.Thread(target=replica, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] is not None and results[1] is not None
    for it, (want, ref_stats) in enumerate(ref_out):
        for r in range(2):
            got, stats = results[r][it]
            assert got == want, (it, r)
            assert stats.generated_tokens == ref_stats.generated_tokens
            assert stats.requests == ref_stats.requests
            rs = stats.replicas
            assert sum(rs.requests) == stats.requests and sum(rs.tokens) == stats.generated_tokens
        assert results[0][it][1].replicas.requests == results[1][it][1].replicas.requests
    # each replica's engine saw only its share: the two engines' requests add up to the
    # one-replica engine's, and both worked
    # resumed from iteration 2 in a world of one: the buffered continuations of both
    # replicas go on there, and iterations 2 and 3 finish the same groups
    assert any(t["replica"] == 1 and t["finish_reason"] is None
               for g in saved[0]["groups"] for t in g), "nothing parked on replica 1"
    resumed = manager()
    resumed.load_state_dict(saved[0], {p.id: p for p in probs})
    for it in (2, 3):
        feed(resumed, it)
        done, _ = resumed.step(engine(), it, 20, params, decode)
        assert [(s.problem.id, s.tokens, s.finish_reason) for s in done] == ref_out[it][0]
    seen = [sum(engines[r].calls) for r in range(2)]
    assert sum(seen) == sum(ref_engine.calls) and min(seen) > 0
    shares = [[results[r][it][1].replicas.requests[r] for it in range(4)] for r in range(2)]
    assert [sum(s) for s in shares] == seen


def test_bad_replica_settings_are_named():
    from kimi_rl.config import TrainConfig, check_config
    for key, value, match in (("replicas", -1, "rollout.replicas"),
                              ("replica_margin", -0.5, "rollout.replica_margin"),
                              ("replica_context_scale", float("nan"),
                               "rollout.replica_context_scale")):
        cfg = TrainConfig()
        setattr(cfg.rollout, key, value)
        with pytest.raises(ValueError, match=match):
            check_config(cfg)
    cfg = TrainConfig()
    cfg.rollout.engine, cfg.rollout.replicas = "vllm", 2
    with pytest.raises(ValueError, match="rollout.replicas.*vllm"):
        check_config(cfg)
    cfg.rollout.vllm.external_launcher = True  # replicas are vLLM's data-parallel engines
    check_config(cfg)
    with pytest.raises(ValueError, match="rollout.replicas=3 must be >= 1 and divide the "
                                         "world size 4"):
        Replicas(3, 0, 4, 0.25, lambda x: [x])


def test_replica_metrics():
    stats = ReplicaStats(requests=[3, 5], tokens=[30, 10], seconds=[2.0, 1.0],
                         idle_fraction=[0.1, 0.5])
    m = stats.metrics()
    assert m["rollout/replicas"] == 2
    assert m["time/rollout_imbalance"] == pytest.approx(2.0 / 1.5)
    assert m["replica/1/requests"] == 5 and m["replica/0/tokens"] == 30
    assert m["time/rollout_replica_1"] == 1.0 and m["replica/0/idle_fraction"] == 0.1
