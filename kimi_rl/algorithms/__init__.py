"""Policy-optimisation algorithms by name (SPEC.md section 1): omd, grpo, reinforce."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from kimi_rl.algorithms.base import LossBatch
from kimi_rl.algorithms.grpo import grpo_advantages, grpo_loss
from kimi_rl.algorithms.omd import omd_advantages, omd_loss
from kimi_rl.algorithms.reinforce import reinforce_advantages, reinforce_loss
from kimi_rl.config import AlgoConfig

__all__ = ["ALGORITHMS", "Algorithm", "LossBatch", "get_algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """An advantage function (rewards [S], group_index [S] -> [S]) and a micro-batch loss."""

    name: str
    advantages: Callable[[Tensor, Tensor, AlgoConfig], Tensor]
    loss: Callable[[LossBatch, AlgoConfig], tuple[Tensor, dict[str, float]]]


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("omd", omd_advantages, omd_loss),
        Algorithm("grpo", grpo_advantages, grpo_loss),
        Algorithm("reinforce", reinforce_advantages, reinforce_loss),
    )
}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered as ``name``; ValueError listing the choices otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {name!r}; choices: {', '.join(sorted(ALGORITHMS))}"
        ) from None
