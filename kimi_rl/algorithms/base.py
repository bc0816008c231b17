"""Shared pieces of the policy-optimisation losses (SPEC.md section 1).

Group and sequence statistics use index ops (``index_add_`` / ``scatter_reduce``) so no
Python loop runs over groups or sequences.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LossBatch:
    """One micro-batch of loss tokens.

    S = ``advantages.numel()`` sequences, T loss tokens. ``num_seqs`` / ``num_tokens`` count
    the whole optimizer-step mini-batch, so a micro-batch's loss is its contribution and
    the micro-batch losses sum (by gradient accumulation) to the mini-batch loss.
    """

    logprobs: Tensor  # [T] current-policy logprobs of loss tokens (requires grad)
    ref_logprobs: Tensor  # [T] logprobs under pi_theta_i (the sampling policy), no grad
    seq_index: Tensor  # [T] long in [0, S)
    advantages: Tensor  # [S] from Algorithm.advantages, computed on whole groups
    num_seqs: int  # sequences in the whole mini-batch
    num_tokens: int  # loss tokens in the whole mini-batch

    @property
    def num_local_seqs(self) -> int:
        return self.advantages.numel()


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """Raise ValueError naming ``key`` and ``value`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {key}={value!r}; expected one of {', '.join(choices)}")


def as_float(x: Tensor) -> Tensor:
    """``x`` unchanged if floating point, else converted to the default float dtype."""
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Sum ``values`` [N] into ``num_segments`` bins given by ``index`` [N] -> [num_segments]."""
    out = values.new_zeros(num_segments)
    return out.index_add(0, index, values)


def segment_count(index: Tensor, num_segments: int) -> Tensor:
    """Number of elements per segment, as float -> [num_segments]."""
    ones = torch.ones(index.shape, dtype=torch.get_default_dtype(), device=index.device)
    return segment_sum(ones, index, num_segments)


def _dense_groups(group_index: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..G-1; returns (dense ids [S], G)."""
    uniq, dense = torch.unique(group_index, return_inverse=True)
    return dense, uniq.numel()


def group_mean(values: Tensor, group_index: Tensor) -> Tensor:
    """Mean of ``values`` over each element's group, broadcast back -> [S]."""
    dense, g = _dense_groups(group_index)
    sums = segment_sum(values, dense, g)
    counts = segment_count(dense, g).to(values.dtype)
    return (sums / counts)[dense]


def group_std(values: Tensor, group_index: Tensor) -> Tensor:
    """Population standard deviation (divide by k, not k - 1) per group, broadcast -> [S]."""
    centred = values - group_mean(values, group_index)
    return group_mean(centred.square(), group_index).sqrt()


def group_log_mean_exp(values: Tensor, group_index: Tensor) -> Tensor:
    """log(mean_j exp(v_j)) per group, broadcast -> [S]; max-shifted for stability."""
    dense, g = _dense_groups(group_index)
    gmax = values.new_full((g,), float("-inf")).scatter_reduce(0, dense, values, "amax")
    shifted = (values - gmax[dense]).exp()
    counts = segment_count(dense, g).to(values.dtype)
    return ((segment_sum(shifted, dense, g) / counts).log() + gmax)[dense]


def sequence_logprobs(
    logprobs: Tensor, seq_index: Tensor, num_seqs: int, reduction: str = "sum"
) -> Tensor:
    """Per-sequence log-probability: sum (SPEC.md section 1) or mean of token logprobs."""
    check_choice("logp_reduction", reduction, ("sum", "mean"))
    total = segment_sum(logprobs, seq_index, num_seqs)
    if reduction == "mean":
        total = total / segment_count(seq_index, num_seqs).to(total.dtype).clamp(min=1)
    return total


def mean_of(x: Tensor) -> float:
    """Mean of a tensor as a python float (0.0 when empty)."""
    return float(x.detach().mean()) if x.numel() else 0.0


def abs_max_of(x: Tensor) -> float:
    """Largest absolute value of a tensor as a python float (0.0 when empty)."""
    return float(x.detach().abs().max()) if x.numel() else 0.0
