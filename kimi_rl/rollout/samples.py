"""Trajectories: generating groups of k responses per problem, and scoring them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from ..config import TRUNCATED_REWARDS
from ..data.problems import Problem
from ..prompts import RAW, PromptFormat
from ..rewards.length import length_rewards
from .engine import Request, RolloutEngine, SamplingParams


@dataclass
class Sample:
    """One trajectory: a response to a problem, in group `group` (k per problem).

    A trajectory generated across iterations (partial rollouts) has several segments:
    `segments` lists (iteration that generated it, number of tokens) in order; `tokens`
    and `logprobs` are all segments end to end. finish_reason is None while unfinished.
    """

    problem: Problem
    group: int
    prompt_ids: list[int]
    tokens: list[int]
    logprobs: list[float]  # sampling logprobs from the rollout engine
    finish_reason: str | None
    text: str = ""
    correct: float = 0.0
    length_reward: float = 0.0
    format_reward: float = 0.0  # 1.0 if the response follows the prompt format
    reward: float = 0.0
    segments: list[tuple[int, int]] = field(default_factory=list)
    started: int = 0  # iteration of the first segment
    replica: int | None = None  # rollout replica that generated its latest segment

    def token_iterations(self) -> list[int]:
        """The iteration (policy version) that generated each token."""
        out = [iteration for iteration, n in self.segments for _ in range(n)]
        if len(out) != len(self.tokens):
            raise ValueError(f"sample of problem {self.problem.id!r}: segments cover "
                             f"{len(out)} tokens, it has {len(self.tokens)}")
        return out


def encode_prompt(tokenizer: PreTrainedTokenizerBase, problem: Problem,
                  fmt: PromptFormat | None = None, response_prefix: str = "") -> list[int]:
    """The prompt's token ids in the run's prompt format (default raw: the problem's text),
    followed by `response_prefix`. Rollouts, SFT, evaluation and difficulty all encode here."""
    return (fmt or RAW).encode(tokenizer, problem.prompt, response_prefix)


def generate_groups(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase,
                    problems: Sequence[Problem], k: int, max_new_tokens: int,
                    params: SamplingParams, fmt: PromptFormat | None = None,
                    prefix: Callable[[Problem], str] | None = None) -> list[Sample]:
    """k responses per problem; samples of problem i carry group index i. `prefix(problem)`:
    text each response is made to start with (part of the prompt, not of the response)."""
    prompts = [encode_prompt(tokenizer, p, fmt, prefix(p) if prefix else "") for p in problems]
    requests = [Request(prompts[i]) for i in range(len(problems)) for _ in range(k)]
    segments = engine.generate(requests, max_new_tokens, params)
    samples = []
    for n, seg in enumerate(segments):
        i = n // k
        samples.append(Sample(problems[i], i, prompts[i], seg.tokens, seg.logprobs,
                              seg.finish_reason,
                              tokenizer.decode(seg.tokens, skip_special_tokens=True)))
    return samples


def score_groups(samples: Sequence[Sample], verify: Callable[[Problem, str], float],
                 length_weight: float, repeat_penalty: float = 0.0,
                 truncated_reward: str = "verify", only_solved: bool = False,
                 fmt: PromptFormat | None = None, format_weight: float = 0.0) -> None:
    """Correctness from the verifier plus the weighted Kimi length reward, per group
    (SPEC.md section 2), plus `format_weight` times R1's format reward (1 if the response
    follows `fmt`, see PromptFormat.format_ok). Fills correct, length_reward, format_reward
    and reward in place.

    Every response is verified, a repeat-terminated one too (it seldom has a final
    answer). A verifier with a `batch` method (the code verifier: parallel sandboxes)
    scores all responses in one call; others are called one response at a time. A
    "repeat" response loses `repeat_penalty` besides (>= 0). A truncated one ("length")
    is scored like any other with truncated_reward="verify"; with "zero" its
    reward and length reward are 0 (`correct` still holds the verifier's result, and its
    length still counts for the group's min and max lengths). `only_solved`: no length
    reward in a group without a correct response (reward.length_penalty_groups=solved).
    """
    if truncated_reward not in TRUNCATED_REWARDS:
        raise ValueError(f"truncated_reward: unknown value {truncated_reward!r} "
                         f"(choose from {list(TRUNCATED_REWARDS)})")
    batch = getattr(verify, "batch", None)
    scores = (batch([s.problem for s in samples], [s.text for s in samples]) if batch
              else [verify(s.problem, s.text) for s in samples])
    groups: dict[int, list[Sample]] = {}
    for s, score in zip(samples, scores, strict=True):
        s.correct = score
        s.format_reward = float((fmt or RAW).format_ok(s.text))
        groups.setdefault(s.group, []).append(s)
    for members in groups.values():
        lens = length_rewards([len(s.tokens) for s in members],
                              [s.correct == 1.0 for s in members], only_solved)
        for s, lr in zip(members, lens, strict=True):
            if truncated_reward == "zero" and s.finish_reason == "length":
                s.length_reward = s.reward = 0.0
                continue
            s.length_reward = lr
            s.reward = s.correct + length_weight * lr + format_weight * s.format_reward
            if s.finish_reason == "repeat":
                s.reward -= repeat_penalty
