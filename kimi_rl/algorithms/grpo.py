"""GRPO baseline for ablations (SPEC.md section 1, "Baselines").

Group-normalised advantage, PPO clipped ratio to the sampling policy pi_theta_i, optional k3
KL penalty to it; per-sequence token mean, then sum over sequences / num_seqs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kimi_rl.algorithms.base import (
    LossBatch,
    as_float,
    group_mean,
    group_std,
    mean_of,
    segment_count,
    segment_sum,
)
from kimi_rl.config import AlgoConfig

STD_EPS = 1e-6


def grpo_advantages(rewards: Tensor, group_index: Tensor, cfg: AlgoConfig) -> Tensor:
    """(r - mean_group) / (std_group + 1e-6) -> [S].

    The std is the population one (divide by k): a property of the observed group rather
    than an estimate, and well defined for k = 1 (advantage 0).
    """
    del cfg
    rewards = as_float(rewards)
    return (rewards - group_mean(rewards, group_index)) / (
        group_std(rewards, group_index) + STD_EPS
    )


def grpo_loss(batch: LossBatch, cfg: AlgoConfig) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's contribution to the GRPO mini-batch loss, and its metrics."""
    s = batch.num_local_seqs
    logp, ref = batch.logprobs, batch.ref_logprobs.detach()
    adv = batch.advantages.detach()[batch.seq_index]
    ratio = (logp - ref).exp()
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv
    policy_tok = -torch.minimum(unclipped, clipped)
    kl_tok = (ref - logp).exp() - (ref - logp) - 1

    def seq_mean_sum(tok: Tensor) -> Tensor:
        counts = segment_count(batch.seq_index, s).to(tok.dtype).clamp(min=1)
        return (segment_sum(tok, batch.seq_index, s) / counts).sum() / batch.num_seqs

    policy = seq_mean_sum(policy_tok)
    kl = cfg.kl_coef * seq_mean_sum(kl_tok) if cfg.kl_coef else policy.new_zeros(())
    loss = policy + kl
    metrics = {
        "loss/policy": policy.item(),
        "loss/kl": kl.item(),
        "loss/total": loss.item(),
        "clip_fraction": mean_of((clipped < unclipped).float()),
        "ratio/mean": mean_of(ratio),
    }
    return loss, metrics
