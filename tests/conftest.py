"""Shared fixtures: the built-in character tokenizer and tiny random Llama models."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from kimi_rl.config import ModelConfig
from kimi_rl.data import modsum
from kimi_rl.data.problems import Problem
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.policy.model import tiny_model
from kimi_rl.rollout.samples import Sample

# Tiny matrices: one thread avoids OpenMP spin-waits that make each matmul cost
# milliseconds on a shared 2-core machine. Results do not depend on it.
torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """A script of bench/ as a module (registered under its name, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


TINY = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer(modsum.vocabulary())


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, std: float | None = None,
                **overrides) -> PreTrainedModel:
    """A tiny Llama in eval mode. `std` re-draws every matrix from N(0, std^2) (seeded):
    the default init gives nearly uniform next-token distributions, a larger std gives
    peaked, varied ones (useful where argmax decisions are compared)."""
    model = tiny_model(ModelConfig(**{**TINY, **overrides}), tokenizer, seed=seed)
    if std is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


@pytest.fixture
def make_model(tokenizer) -> Callable[..., PreTrainedModel]:
    """Factory: make_model(seed=0, std=None, **ModelConfig overrides)."""
    torch.manual_seed(0)
    return lambda seed=0, std=None, **kw: build_model(tokenizer, seed, std, **kw)


@pytest.fixture
def model(make_model) -> PreTrainedModel:
    return make_model(seed=0)


@pytest.fixture
def mixed_samples() -> Callable[[], list[Sample]]:
    """Factory: two groups of four modsum responses ending in every way ("stop", "repeat",
    "length"), correct and not, of various lengths; each call gives fresh, unscored ones."""
    reasons = ["stop", "repeat", "length", "stop", "repeat", "repeat", "stop", "length"]
    lengths = [10, 35, 60, 20, 40, 35, 12, 60]
    correct = [1, 0, 0, 1, 1, 0, 0, 1]

    def make() -> list[Sample]:
        out = []
        for j, (reason, n, ok) in enumerate(zip(reasons, lengths, correct, strict=True)):
            problem = Problem(f"p{j // 4}", "a1\n", "1" if ok else "0", 1, "modsum")
            out.append(Sample(problem, j // 4, [1], [4] * n, [0.0] * n, reason,
                              text="a1=1\nanswer 1"))
        return out

    return make


def chi_square_bound(df: int, z: float = 4.5) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard-normal z."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --- multi-process loop runs (tests/test_fsdp.py, tests/test_megatron.py) -----------------
# `run`, `ref`: TensorBoard scalars, tag -> {iteration: value}

def assert_replica_shares(run: dict, iterations: int, replicas: int = 2) -> None:
    """Each replica generated a share of every iteration; the shares make the batch."""
    for it in range(iterations):
        shares = [run[f"replica/{r}/requests"][it] for r in range(replicas)]
        assert min(shares) > 0 and sum(shares) == run["rollout/requests"][it]
        assert sum(run[f"replica/{r}/tokens"][it] for r in range(replicas)) == \
            run["rollout/generated_tokens"][it]


def assert_partial_run_matches(run: dict, ref: dict) -> None:
    """A multi-process run with partial rollouts against a one-process run: iteration 0
    finishes no group (all carried over), iterations 0-1 generate the same tokens and
    buffer, and iteration 1 trains on the same batch (figures within float rounding)."""
    assert run["partial/buffer_size"][0] > 0 and 0 not in run["loss/policy"]
    for it in (0, 1):
        assert run["rollout/generated_tokens"][it] == ref["rollout/generated_tokens"][it]
        assert run["partial/buffer_tokens"][it] == ref["partial/buffer_tokens"][it]
    for tag in ("response_length/mean", "accuracy/train", "reward/mean"):
        assert run[tag][1] == ref[tag][1], tag
    assert run["train/grad_norm"][1] > 0
    for tag in ("loss/policy", "train/entropy", "train/grad_norm"):
        assert abs(run[tag][1] - ref[tag][1]) <= 1e-4 * abs(ref[tag][1]) + 1e-7, tag


def assert_resumed_iteration_matches(run: dict, resumed: dict, it: int = 2) -> None:
    """Iteration `it` resumed in one process draws the samples the run drew and trains
    within float rounding."""
    assert set(resumed["rollout/replicas"]) == {it} and resumed["rollout/replicas"][it] == 1
    for tag in ("rollout/generated_tokens", "response_length/mean", "accuracy/train",
                "reward/mean", "partial/buffer_size"):
        assert resumed[tag][it] == run[tag][it], tag
    for tag in ("loss/policy", "train/grad_norm"):
        assert abs(resumed[tag][it] - run[tag][it]) <= 1e-3 * abs(run[tag][it]) + 1e-6, tag
