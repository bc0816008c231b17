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


def test_wsd_schedule_holds_the_peak_then_decays_over_the_last_steps():
    cfg = SFTConfig(lr=1e-3, warmup_steps=2, schedule="wsd", decay_steps=5,
                    final_lr_ratio=0.0)
    lrs = [lr_at(cfg, s, 12) for s in range(12)]
    assert lrs[:7] == pytest.approx([5e-4] + [1e-3] * 6)  # warmup, then stable to step 6
    # cosine over steps 7..11: lr * (1 + cos(pi * k / 4)) / 2 for k = 0..4
    assert lrs[7:] == pytest.approx([1e-3 * (1 + math.cos(math.pi * k / 4)) / 2
                                     for k in range(5)])
    # an earlier decay start (the held-out target reached at step 4), run ending at 9
    early = [lr_at(cfg, s, 9, decay_start=4) for s in range(9)]
    assert early[:4] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])
    assert early[4] == pytest.approx(1e-3) and early[-1] == pytest.approx(0.0)


def test_sft_config_checks_name_the_key():
    from kimi_rl.config import check_config
    cfg = OmegaConf.structured(TrainConfig)
    cfg.sft.target_loss = 0.1  # with the cosine schedule: nothing can end early
    with pytest.raises(ValueError, match="sft.target_loss"):
        check_config(cfg)
    cfg.sft.schedule, cfg.sft.heldout = "wsd", 0
    with pytest.raises(ValueError, match="sft.target_loss"):
        check_config(cfg)
    cfg.sft.heldout, cfg.sft.betas = 64, [0.9, 1.5]
    with pytest.raises(ValueError, match="sft.betas"):
        check_config(cfg)
    cfg.sft.betas = [0.9, 0.95]
    check_config(cfg)


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

    def on_step(step, loss, lr):
        seen_lr.append(policy.optimizer.param_groups[0]["lr"])
        assert lr == seen_lr[-1]

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


def test_rl_learning_rate_warmup_and_decay():
    from kimi_rl.config import AlgoConfig
    from kimi_rl.loop import rl_lr

    algo = AlgoConfig(lr=3e-4, lr_warmup_iterations=5)
    assert [rl_lr(algo, i, 7) for i in range(7)] == pytest.approx(
        [6e-5, 1.2e-4, 1.8e-4, 2.4e-4, 3e-4, 3e-4, 3e-4])
    assert rl_lr(AlgoConfig(lr=1e-4), 0, 1) == pytest.approx(1e-4)
    # constant, then down by lr/4 an iteration over the last 4 of 7, to lr/4 in the last
    algo = AlgoConfig(lr=4e-4, lr_decay_iterations=4)
    assert [rl_lr(algo, i, 7) for i in range(7)] == pytest.approx(
        [4e-4, 4e-4, 4e-4, 4e-4, 3e-4, 2e-4, 1e-4])
    # both: the smaller factor wins where they overlap
    algo = AlgoConfig(lr=1.0, lr_warmup_iterations=2, lr_decay_iterations=2)
    assert [rl_lr(algo, i, 3) for i in range(3)] == pytest.approx([0.5, 1.0, 0.5])


def test_held_out_target_starts_the_decay_and_ends_the_run_early(tiny):
    policy, (train, held) = tiny
    cfg = SFTConfig(lr=3e-2, warmup_steps=2, batch_size=8, eval_every=3, schedule="wsd",
                    decay_steps=4, final_lr_ratio=0.0, select="final", betas=[0.9, 0.95])
    # a reference run without a target: the held-out loss at each measurement
    ref_evals: dict[int, float] = {}
    start = {k: v.clone() for k, v in policy.model.state_dict().items()}
    run_sft(policy, train, cfg, seed=2, steps=30, heldout=held,
            on_eval=lambda step, loss: ref_evals.__setitem__(step, loss), until_target=False)
    assert sorted(ref_evals) == list(range(3, 30, 3)) + [30]
    # a target the third measurement (step 9) is the first to reach
    cfg.target_loss = ref_evals[9] * 1.0001
    assert all(ref_evals[s] > cfg.target_loss for s in (3, 6))
    assert policy.optimizer.param_groups[0]["betas"] == (0.9, 0.95)

    policy.model.load_state_dict(start)
    seen, evals = [], {}
    stats = run_sft(policy, train, cfg, seed=2, steps=30, heldout=held,
                    on_step=lambda step, loss, lr: seen.append(lr),
                    on_eval=lambda step, loss: evals.__setitem__(step, loss))
    # same steps as the reference up to the target, then 4 decay steps: 13 in all
    assert stats["steps"] == 13 and len(seen) == 13 and stats["lr_decay_start"] == 9
    assert evals[9] == pytest.approx(ref_evals[9], rel=1e-5)
    assert seen == pytest.approx([lr_at(cfg, s, 13, decay_start=9) for s in range(13)])
    assert seen[:9] == pytest.approx([1.5e-2] + [3e-2] * 8) and seen[-1] == pytest.approx(0)
    assert sorted(evals) == [3, 6, 9, 12, 13]
    # the control's call ignores the target: it runs its steps, decaying at the end
    policy.model.load_state_dict(start)
    stats = run_sft(policy, train, cfg, seed=2, steps=30, heldout=held, until_target=False)
    assert stats["steps"] == 30 and stats["lr_decay_start"] == 26
    # fewer steps than the decay: it starts at the warmup's end
    stats = run_sft(policy, train, cfg, seed=2, steps=5, heldout=held, until_target=False)
    assert stats["lr_decay_start"] == 2
