"""bench/vs_trl.py (kimi-rl against TRL's GRPOTrainer) and the hot-path change it measures:
with one optimizer step per iteration, pi_theta_i's logprobs come from that step's own
forward pass instead of a separate reference pass."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_rl.algorithms import get_algorithm
from kimi_rl.config import ModelConfig, TrainConfig
from kimi_rl.data import modsum
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.loop import optimize
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.model import tiny_model
from kimi_rl.rollout.samples import Sample

ROOT = Path(__file__).resolve().parent.parent


def _samples(tokenizer, n_groups=3, k=2, seed=0):
    rng = random.Random(seed)
    out = []
    train, _ = modsum.generate([1, 2], 5, 0, seed)
    for g in range(n_groups):
        p = train[g]
        prompt = tokenizer(p.prompt).input_ids
        for _ in range(k):
            n = rng.randint(3, 9)
            toks = [rng.randrange(4, len(tokenizer)) for _ in range(n)]
            # sampling logprobs a little off the trainer's (a train/infer mismatch to measure)
            out.append(Sample(p, g, prompt, toks, [-3.0 - 0.01 * t for t in range(n)], "stop",
                              reward=float(rng.random() < 0.5), segments=[(0, n)]))
    return out


class _WithDropoutFlag(HFPolicy):
    """The same policy, reporting dropout: the loop must take the separate reference pass."""

    calls = 0

    @property
    def no_dropout(self) -> bool:
        return False

    def logprobs(self, batch, temperature=1.0):
        type(self).calls += 1
        return super().logprobs(batch, temperature)


@pytest.mark.parametrize("algo", ["grpo", "omd"])
def test_single_step_reference_equals_a_separate_reference_pass(algo):
    tok = char_tokenizer(modsum.vocabulary())
    cfg = TrainConfig()
    cfg.algo.name, cfg.algo.minibatches, cfg.algo.epochs = algo, 1, 1
    cfg.algo.lr = 1e-2
    model = tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                                   intermediate_size=64), tok, seed=0)
    fast = HFPolicy(model, cfg.backend, cfg.algo)
    fast.logprobs = None  # the one optimizer step must not take a separate reference pass
    slow = _WithDropoutFlag(copy.deepcopy(model), cfg.backend, cfg.algo)
    assert fast.no_dropout
    samples = _samples(tok)
    masks = [[True] * len(s.tokens) for s in samples]
    a = get_algorithm(algo)
    m_fast = optimize(cfg, fast, a, samples, masks, 1.0, 0)
    _WithDropoutFlag.calls = 0
    m_slow = optimize(cfg, slow, a, samples, masks, 1.0, 0)
    assert _WithDropoutFlag.calls >= 1  # the reference came from its own pass there
    for k in ("logprob/train_infer_abs_mean", "logprob/train_infer_abs_max", "loss/total"):
        assert m_fast[k] == pytest.approx(m_slow[k], rel=1e-5, abs=1e-6), k
    assert m_fast["logprob/train_infer_abs_mean"] > 0.1  # the mismatch is measured, not 0
    for (n, p), (_, q) in zip(fast.model.named_parameters(), slow.model.named_parameters(),
                              strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_several_steps_still_take_a_reference_pass():
    tok = char_tokenizer(modsum.vocabulary())
    cfg = TrainConfig()
    cfg.algo.minibatches, cfg.algo.epochs = 1, 2  # two optimizer steps: theta moves

    class Counting(HFPolicy):
        calls = 0

        def logprobs(self, batch, temperature=1.0):
            type(self).calls += 1
            return super().logprobs(batch, temperature)

    model = tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                                   intermediate_size=64), tok, seed=0)
    policy = Counting(model, cfg.backend, cfg.algo)
    optimize(cfg, policy, get_algorithm("omd"), _samples(tok),
             [[True] * len(s.tokens) for s in _samples(tok)], 1.0, 0)
    assert Counting.calls >= 1


def test_dropout_is_detected():
    tok = char_tokenizer(modsum.vocabulary())
    cfg = TrainConfig()
    model = tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                                   intermediate_size=64), tok, seed=0)
    model.config.attention_dropout = 0.1
    assert not HFPolicy(model, cfg.backend, cfg.algo).no_dropout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="trl is a bench-only dependency (pip install -e '.[bench]')")
def test_vs_trl_quick():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--size", "tiny",
                          "--quick", "--precision", "bfloat16", "--trl-precision", "both"],
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    w = r["workload"]
    per_step = w["prompts"] * w["k"] * w["tokens"]
    for side in ("kimi", "trl"):  # equal, forced lengths on both sides
        assert r[side]["generated_tokens_per_step"] == per_step, side
        assert r[side]["trained_tokens_per_step"] == per_step, side
        assert r[side]["seconds_per_step"] > 0 and r[side]["peak_rss_mib"] > 0
    assert r["equal_work"] and r["ratio_trl_over_kimi"] > 0
    by = r["trl_seconds_per_step_by_precision"]  # TRL in both precisions, the faster taken
    assert set(by) == {"float32", "bfloat16"}
    assert r["trl"]["seconds_per_step"] == min(by.values()) == by[r["trl_precision"]]


@pytest.mark.parametrize("algo", ["omd", "grpo"])
def test_zero_advantage_samples_skipped_exactly(algo):
    """algo.skip_zero_advantage: a group whose responses are all rewarded alike is not
    computed, and the step's gradient is the one with it (the loss's normalisation kept)."""
    tok = char_tokenizer(modsum.vocabulary())
    samples = _samples(tok, n_groups=4, k=3, seed=1)
    rewards = {0: [1, 1, 1], 1: [1, 0, 1], 2: [0, 0, 0], 3: [0, 1, 0]}  # 0 and 2: advantage 0
    for j, s in enumerate(samples):
        s.reward = float(rewards[s.group][j % 3])
    masks = [[True] * len(s.tokens) for s in samples]
    model = tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                                   intermediate_size=64), tok, seed=0)
    seen: dict[bool, int] = {}
    grads, metrics = {}, {}
    for skip in (False, True):
        cfg = TrainConfig()
        cfg.algo.name, cfg.algo.skip_zero_advantage = algo, skip

        class Counting(HFPolicy):
            def train_step(self, micro_batches, loss_fn, temperature=1.0, skip=skip):
                seen[skip] = sum(len(b.seq_ids) for b in micro_batches)
                return super().train_step(micro_batches, loss_fn, temperature)

        policy = Counting(copy.deepcopy(model), cfg.backend, cfg.algo)
        metrics[skip] = optimize(cfg, policy, get_algorithm(algo), samples, masks, 1.0, 0)
        grads[skip] = {n: p.grad.clone() for n, p in policy.model.named_parameters()}
    assert seen == {False: 12, True: 6}
    assert metrics[True]["train/skipped_samples"] == 6
    assert "train/skipped_samples" not in metrics[False]
    assert metrics[True]["loss/total"] == pytest.approx(metrics[False]["loss/total"], abs=1e-6)
    assert any(g.abs().max() > 0 for g in grads[True].values())
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_zero_advantage_samples_kept_where_skipping_is_not_exact():
    """Two optimizer steps: theta moves after the first, so the penalty term of a
    zero-advantage sample has a gradient in the second; nothing is skipped."""
    tok = char_tokenizer(modsum.vocabulary())
    cfg = TrainConfig()
    cfg.algo.skip_zero_advantage, cfg.algo.epochs = True, 2
    samples = _samples(tok, n_groups=2, k=2, seed=1)
    for s in samples:
        s.reward = 1.0
    model = tiny_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                                   intermediate_size=64), tok, seed=0)
    m = optimize(cfg, HFPolicy(model, cfg.backend, cfg.algo), get_algorithm("omd"), samples,
                 [[True] * len(s.tokens) for s in samples], 1.0, 0)
    assert m["train/optimizer_steps"] == 2 and "train/skipped_samples" not in m
