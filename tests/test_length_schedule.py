"""Max response length schedule and truncated responses (SPEC.md section 4), and the
checks on the rollout and reward values."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from kimi_rl.config import RolloutConfig, TrainConfig, check_config
from kimi_rl.data import modsum
from kimi_rl.loop import max_new_tokens_at, repeat_detection
from kimi_rl.rewards.repetition import RepeatDetection
from kimi_rl.rollout.samples import score_groups


def test_schedule_picks_the_cap_of_each_iteration():
    ro = RolloutConfig(max_new_tokens=8, max_new_tokens_schedule={3: 16, 10: 32})
    assert [max_new_tokens_at(ro, it) for it in range(12)] == [8] * 3 + [16] * 7 + [32] * 2
    assert max_new_tokens_at(ro, 10_000) == 32
    # empty: constant max_new_tokens; an entry at 0 replaces it from the start
    assert {max_new_tokens_at(RolloutConfig(max_new_tokens=24), it) for it in range(50)} == {24}
    ro = RolloutConfig(max_new_tokens=8, max_new_tokens_schedule={0: 4, 2: 6})
    assert [max_new_tokens_at(ro, it) for it in range(4)] == [4, 4, 6, 6]


def test_schedule_from_a_composed_config():
    """As the loop gets it: a DictConfig (int keys), entries in any order."""
    cfg = OmegaConf.structured(TrainConfig)
    cfg.rollout.max_new_tokens = 128
    cfg.rollout.max_new_tokens_schedule = {20: 512, 5: 256}
    assert [max_new_tokens_at(cfg.rollout, it) for it in (0, 4, 5, 19, 20, 99)] == [
        128, 128, 256, 256, 512, 512]


def test_repeat_detection_from_the_config():
    assert repeat_detection(RolloutConfig()) == RepeatDetection(64, 4, 32)
    assert repeat_detection(RolloutConfig(repeat_max_period=16, repeat_min_repeats=3,
                                          repeat_min_tokens=20)) == RepeatDetection(16, 3, 20)
    assert repeat_detection(RolloutConfig(repeat_detection=False)) is None


def test_truncated_reward_zero_zeroes_exactly_the_truncated_responses(mixed_samples):
    verify_all, zero = mixed_samples(), mixed_samples()
    score_groups(verify_all, modsum.verify, 0.5, repeat_penalty=0.2)
    score_groups(zero, modsum.verify, 0.5, repeat_penalty=0.2, truncated_reward="zero")
    truncated = [s.finish_reason == "length" for s in zero]
    assert any(truncated) and not all(truncated)
    # one truncated response is correct: "verify" scores it as such
    assert any(s.reward > 0 for s in verify_all if s.finish_reason == "length")
    for v, z, cut in zip(verify_all, zero, truncated, strict=True):
        assert z.correct == v.correct
        if cut:
            assert (z.reward, z.length_reward) == (0.0, 0.0)
        else:
            assert (z.reward, z.length_reward) == (v.reward, v.length_reward)
    with pytest.raises(ValueError, match="truncated_reward"):
        score_groups(zero, modsum.verify, 0.5, truncated_reward="drop")


def structured(**values) -> TrainConfig:
    cfg = OmegaConf.structured(TrainConfig)
    for key, value in values.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg


def test_defaults_pass_the_checks():
    check_config(structured())
    check_config(structured(rollout__max_new_tokens_schedule={0: 8, 5: 16},
                            reward__repeat_penalty=0.5, reward__truncated_reward="zero",
                            rollout__repeat_detection=False))


@pytest.mark.parametrize("key,value", [
    ("rollout.max_new_tokens", 0),
    ("rollout.max_new_tokens_schedule", {3: 0}),
    ("rollout.max_new_tokens_schedule", {-1: 64}),
    ("rollout.repeat_max_period", 0),
    ("rollout.repeat_min_repeats", 1),
    ("rollout.repeat_min_tokens", 0),
    ("reward.repeat_penalty", -0.5),
    ("reward.repeat_penalty", float("nan")),
    ("reward.truncated_reward", "drop"),
    ("algo.ref_logprobs", "sampler"),
    ("backend.recompute", "partial"),
    ("backend.recompute", "full"),  # the default backend is hf: gradient_checkpointing
    ("backend.transformer_impl", "fused"),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        check_config(structured(**{key.replace(".", "__"): value}))
