"""The SFT cold start: its learning-rate schedule, the held-out split and the kept weights."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from kimi_rl.build import build_policy
from kimi_rl.config import SFTConfig, TrainConfig
from kimi_rl.data import load_task
from kimi_rl.sft import encode_demos, heldout_loss, lr_at, run_sft, split_heldout


def test_cosine_schedule_against_its_formula():
    cfg = SFTConfig(lr=2e-3, warmup_steps=10, schedule="cosine", final_lr_ratio=0.1)
    total = 111  # the cosine spans steps 10..110
    lrs = [lr_at(cfg, s, total) for s in range(total)]
    # warmup: linear from lr/10 to lr
    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(2e-3)
    # cosine from lr (step 10) to lr * 0.1 (the last step), half-way at the middle
    assert lrs[10] == pytest.approx(2e-3)
    assert lrs[60] == pytest.approx((2e-3 + 2e-4) / 2)
    assert lrs[-1] == pytest.approx(2e-4)
    assert lrs[35] == pytest.approx(2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_constant_schedule_keeps_the_peak():
    cfg = SFTConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    assert [lr_at(cfg, s, 6) for s in range(6)] == pytest.approx(
        [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_heldout_split_is_disjoint_and_seeded():
    data = [([i], [i, 99]) for i in range(100)]
    train, held = split_heldout(data, 10, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == sorted(data)
    assert split_heldout(data, 10, seed=3) == (train, held)
    assert split_heldout(data, 10, seed=4)[1] != held
    assert len(split_heldout(data, 1000, seed=0)[1]) == 25  # at most a quarter
    assert split_heldout(data[:5], 10, seed=0) == (data[:5], [])


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(TrainConfig)
    cfg.model.hidden_size, cfg.model.num_layers, cfg.model.num_heads = 32, 1, 2
    cfg.model.num_kv_heads, cfg.model.intermediate_size = 2, 64
    cfg.data.levels, cfg.data.train_per_level, cfg.data.test_per_level = [1, 2], 200, 2
    cfg.data.demos = {1: 200, 2: 200}
    torch.manual_seed(0)
    task = load_task(cfg.data)
    policy, tokenizer = build_policy(cfg, task)
    demos = encode_demos(tokenizer, task.demonstrations(0.5, 0))
    return policy, split_heldout(demos, 64, 0)


def test_run_sft_follows_the_schedule_and_keeps_the_best_weights(tiny):
    policy, (train, held) = tiny
    cfg = SFTConfig(lr=3e-2, warmup_steps=3, batch_size=8, eval_every=4, final_lr_ratio=0.0,
                    select="best")
    seen_lr, evals = [], {}

    def on_step(step, loss):
        seen_lr.append(policy.optimizer.param_groups[0]["lr"])

    stats = run_sft(policy, train, cfg, seed=0, steps=20, heldout=held, on_step=on_step,
                    on_eval=lambda step, loss: evals.__setitem__(step, loss))
    assert seen_lr == pytest.approx([lr_at(cfg, s, 20) for s in range(20)])
    assert sorted(evals) == [4, 8, 12, 16, 20]
    best_step = min(evals, key=evals.get)
    assert stats["best_step"] == best_step
    assert stats["heldout_loss"] == pytest.approx(evals[best_step])
    # the policy holds the weights that were measured best
    assert heldout_loss(policy, held) == pytest.approx(evals[best_step], rel=1e-5)
    assert evals[20] < evals[4]  # it learned


def test_run_sft_final_keeps_the_last_weights(tiny):
    policy, (train, held) = tiny
    cfg = SFTConfig(lr=1e-1, warmup_steps=0, batch_size=8, eval_every=2, schedule="constant",
                    select="final")
    evals = {}
    stats = run_sft(policy, train, cfg, seed=1, steps=6, heldout=held,
                    on_eval=lambda step, loss: evals.__setitem__(step, loss))
    assert stats["best_step"] == 6
    assert heldout_loss(policy, held) == pytest.approx(evals[6], rel=1e-5)


def test_rl_learning_rate_warmup():
    from kimi_rl.config import AlgoConfig
    from kimi_rl.loop import rl_lr

    algo = AlgoConfig(lr=3e-4, lr_warmup_iterations=5)
    assert [rl_lr(algo, i) for i in range(7)] == pytest.approx(
        [6e-5, 1.2e-4, 1.8e-4, 2.4e-4, 3e-4, 3e-4, 3e-4])
    assert rl_lr(AlgoConfig(lr=1e-4, lr_warmup_iterations=0), 0) == pytest.approx(1e-4)
