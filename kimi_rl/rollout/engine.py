"""The rollout-engine interface shared by the built-in torch engine and vLLM."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from ..rewards.repetition import RepeatDetection


@dataclass
class Request:
    """Generate a continuation of `prompt_ids + prefix_ids`; `prefix_ids` are response
    tokens produced earlier (the continuation of a partial rollout). `key` (see
    `sample_key`): the request's own random stream, so that its tokens do not depend on
    which other requests share its batch, replica or world; None: the engine's stream.
    In one generate call either every request has a key or none has."""

    prompt_ids: list[int]
    prefix_ids: list[int] = field(default_factory=list)
    key: int | None = None


def sample_key(seed: int, problem_id: str, index: int, iteration: int, segment: int) -> int:
    """A 64-bit key for the randomness of one generated segment: sample `index` of the
    group of problem `problem_id`, segment `segment` (0: the first) generated at
    `iteration`, in a run seeded with `seed`. A function of these alone, not of the
    replica, batch or world size that generates it."""
    text = f"{seed}\0{problem_id}\0{index}\0{iteration}\0{segment}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


@dataclass
class Segment:
    """Newly generated tokens, their sampling logprobs (log softmax of logits/temperature,
    before top-p), and why generation ended: "stop" (EOS), "repeat" (the response ends in
    a loop, see `SamplingParams.repeat`), "length" (token limit, or the call's max_steps)
    or "pending" (never started: the call ended first). A token that is both the last one
    allowed and the one that closes a loop gives "repeat"."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None  # a fixed seed for this call, apart from the engine's stream
    # stop a response as soon as it ends in a loop (finish_reason "repeat"); the response
    # is the request's prefix_ids plus the new tokens (the prompt is not looked at).
    # None: no repeat detection.
    repeat: RepeatDetection | None = None


class RolloutEngine(Protocol):
    """generate: one Segment per request, in order; `max_new_tokens` is one limit for all
    or one per request. Sampling follows `params` (temperature, top_p, greedy, seed, and
    repeat detection). At most `max_running` sequences decode at once (None: the engine's
    own limit), queued requests starting in order as running ones end; with `max_steps`
    the call ends after that many decode steps, running sequences ending with "length"
    and requests not started coming back empty with finish_reason "pending"."""

    def generate(self, requests: Sequence[Request], max_new_tokens: int | Sequence[int],
                 params: SamplingParams, max_running: int | None = None,
                 max_steps: int | None = None) -> list[Segment]: ...

    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
