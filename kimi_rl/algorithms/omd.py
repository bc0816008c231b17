"""Kimi k1.5 online mirror descent (SPEC.md section 1, report section 2.3.2).

Per problem with k responses the loss minimised is (SPEC eq. 3, sign flipped)

    (1/k) * sum_j [ -(r_j - b) * logp_j + (tau/2) * (logp_j - logp_ref_j)^2 ]

with b = tau*log Z estimated by the group mean reward (``log_z="mean"``) or computed exactly
as tau * log(mean_j exp(r_j / tau)) (``log_z="exact"``). Over a mini-batch of groups of k
this is (1/num_seqs) * sum_j [...], the mean over problems.
"""

from __future__ import annotations

from torch import Tensor

from kimi_rl.algorithms.base import (
    LossBatch,
    abs_max_of,
    as_float,
    check_choice,
    group_log_mean_exp,
    group_mean,
    mean_of,
    sequence_logprobs,
)
from kimi_rl.config import AlgoConfig


def omd_advantages(rewards: Tensor, group_index: Tensor, cfg: AlgoConfig) -> Tensor:
    """r_j - tau*log Z per group (SPEC.md section 1) -> [S]."""
    check_choice("log_z", cfg.log_z, ("mean", "exact"))
    rewards = as_float(rewards)
    if cfg.log_z == "mean":
        return rewards - group_mean(rewards, group_index)
    if cfg.tau <= 0:
        raise ValueError(f"log_z='exact' needs tau > 0, got tau={cfg.tau}")
    return rewards - cfg.tau * group_log_mean_exp(rewards / cfg.tau, group_index)


def omd_loss(batch: LossBatch, cfg: AlgoConfig) -> tuple[Tensor, dict[str, float]]:
    """This micro-batch's contribution to the OMD mini-batch loss, and its metrics.

    ``level="sequence"`` (report): per-sequence logp (``logp_reduction`` sum or mean),
    normalised by ``num_seqs``. ``level="token"``: per-token advantage and squared
    log-ratio, normalised by ``num_tokens`` (``logp_reduction`` does not apply).
    """
    check_choice("level", cfg.level, ("sequence", "token"))
    adv = batch.advantages.detach()
    ref = batch.ref_logprobs.detach()
    if cfg.level == "sequence":
        s = batch.num_local_seqs
        logp = sequence_logprobs(batch.logprobs, batch.seq_index, s, cfg.logp_reduction)
        ref_lp = sequence_logprobs(ref, batch.seq_index, s, cfg.logp_reduction)
        norm = batch.num_seqs
    else:
        logp, ref_lp, adv = batch.logprobs, ref, adv[batch.seq_index]
        norm = batch.num_tokens
    logratio = logp - ref_lp
    policy = -(adv * logp).sum() / norm
    penalty = 0.5 * cfg.tau * logratio.square().sum() / norm
    loss = policy + penalty
    metrics = {
        "loss/policy": policy.item(),
        "loss/penalty": penalty.item(),
        "loss/total": loss.item(),
        "logratio/mean": mean_of(logratio),
        "logratio/abs_max": abs_max_of(logratio),
        "advantage/mean": mean_of(batch.advantages),
        "advantage/abs_mean": mean_of(batch.advantages.abs()),
    }
    return loss, metrics
