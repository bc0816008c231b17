"""REINFORCE with a group-mean baseline, for ablations (SPEC.md section 1, "Baselines").

It equals OMD's gradient at theta = theta_i (where the squared penalty has zero gradient).
"""

from __future__ import annotations

from torch import Tensor

from kimi_rl.algorithms.base import LossBatch, as_float, group_mean, sequence_logprobs
from kimi_rl.config import AlgoConfig


def reinforce_advantages(rewards: Tensor, group_index: Tensor, cfg: AlgoConfig) -> Tensor:
    """r - group mean -> [S]."""
    del cfg
    rewards = as_float(rewards)
    return rewards - group_mean(rewards, group_index)


def reinforce_loss(batch: LossBatch, cfg: AlgoConfig) -> tuple[Tensor, dict[str, float]]:
    """(1/num_seqs) * sum_j -A_j * logp_j (logp_j: sum or mean per ``cfg.logp_reduction``)."""
    logp = sequence_logprobs(
        batch.logprobs, batch.seq_index, batch.num_local_seqs, cfg.logp_reduction
    )
    loss = -(batch.advantages.detach() * logp).sum() / batch.num_seqs
    return loss, {"loss/policy": loss.item(), "loss/total": loss.item()}
