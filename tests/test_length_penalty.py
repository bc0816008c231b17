"""Kimi length penalty (SPEC.md section 2)."""

from __future__ import annotations

import pytest

from kimi_rl.rewards.length import length_penalty_weight, length_rewards


def test_equal_lengths_give_zero():
    assert length_rewards([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    assert length_rewards([3], [True]) == [0.0]
    assert length_rewards([], []) == []


def test_correct_responses_get_lambda():
    # lambda = 0.5 - (len - 10) / 20
    assert length_rewards([10, 15, 20, 25, 30], [True] * 5) == pytest.approx(
        [0.5, 0.25, 0.0, -0.25, -0.5]
    )


def test_incorrect_responses_get_min_zero_lambda():
    assert length_rewards([10, 15, 20, 25, 30], [False] * 5) == pytest.approx(
        [0.0, 0.0, 0.0, -0.25, -0.5]
    )


def test_mixed_group_order_independent():
    lengths = [30, 12, 10, 22]
    correct = [False, True, False, True]
    # lambda = 0.5 - (len - 10) / 20 -> [-0.5, 0.4, 0.5, -0.1]
    assert length_rewards(lengths, correct) == pytest.approx([-0.5, 0.4, 0.0, -0.1])


def test_mismatched_inputs():
    with pytest.raises(ValueError):
        length_rewards([1, 2], [True])


def test_warmup_schedule():
    assert length_penalty_weight(0, 0.3, warmup=5) == 0.0
    assert length_penalty_weight(4, 0.3, warmup=5) == 0.0
    assert length_penalty_weight(5, 0.3, warmup=5) == 0.3
    assert length_penalty_weight(100, 0.3, warmup=5) == 0.3
    assert length_penalty_weight(0, 0.3, warmup=0) == 0.3
