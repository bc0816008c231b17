"""Structured config schema (Hydra ConfigStore).

Every key a run accepts is declared here; OmegaConf's struct mode makes an unknown or
misspelt key fail with an error that names it. YAML files under conf/ only set values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    """The policy. `path` loads a local HF model directory; without it a tiny model is
    built from the fields below (random init) with the task's tokenizer."""

    path: Optional[str] = None
    arch: str = "llama"  # llama | qwen2 (tiny init only)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    dtype: str = "float32"


@dataclass
class AlgoConfig:
    """Policy-optimisation algorithm (SPEC.md section 1) and its optimizer."""

    name: str = "omd"  # omd | grpo | reinforce
    tau: float = 0.05  # OMD KL weight; not given in the report
    log_z: str = "mean"  # mean (tau -> inf limit) | exact (tau * log mean exp(r / tau))
    level: str = "sequence"  # sequence (report) | token (per-token variant)
    logp_reduction: str = "sum"  # sum over response tokens (report) | mean
    ref_logprobs: str = "trainer"  # trainer (forward pass before update) | rollout
    clip_eps: float = 0.2  # grpo
    kl_coef: float = 0.0  # grpo: k3 KL to pi_theta_i
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    minibatches: int = 1  # optimizer steps per epoch over an iteration's rollouts
    epochs: int = 1
    reset_optimizer: bool = True  # "we also reset the optimizer at each iteration"


@dataclass
class BackendConfig:
    """Policy backend (where logprobs and gradients are computed)."""

    name: str = "hf"
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    logits_chunk: int = 2048  # tokens per lm-head chunk (bounds logits memory)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class RolloutConfig:
    """Rollout engine and sampling."""

    engine: str = "torch"
    problems_per_iteration: int = 32
    group_size: int = 8  # k responses per problem
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256  # max response length
    max_batch_size: int = 512  # sequences per engine call


@dataclass
class RewardConfig:
    """Kimi length penalty (SPEC.md section 2)."""

    length_penalty_weight: float = 0.0
    length_penalty_warmup: int = 0  # iterations with weight 0 first


@dataclass
class StageConfig:
    """From iteration `start` on, sample levels with these weights (empty = all, uniform)."""

    start: int = 0
    levels: Dict[int, float] = field(default_factory=dict)


@dataclass
class CurriculumConfig:
    """Curriculum stages x prioritized sampling (SPEC.md section 3)."""

    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])
    prioritized: bool = True
    priority_floor: float = 0.05


@dataclass
class DataConfig:
    """Problems: a built-in task, or a JSONL file (fields prompt, answer, difficulty)."""

    task: str = "modsum"  # built-in task, used when `path` is not set
    path: Optional[str] = None
    levels: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    train_per_level: int = 2000
    test_per_level: int = 100
    # chain-of-thought demonstrations for SFT: level -> how many (capped at the train set)
    demos: Dict[int, int] = field(default_factory=lambda: {1: 2000, 2: 2000, 3: 2000})
    check_prob: float = 0.5  # share of demonstrations with an optional checking pass
    # level -> share of flawed demonstrations that stop one step early (an imperfect teacher)
    stop_early: Dict[int, float] = field(default_factory=dict)
    seed: int = 1234


@dataclass
class SFTConfig:
    """Supervised cold start on chain-of-thought demonstrations, and its control."""

    enabled: bool = False
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 30
    control: bool = False  # after RL: same wall time of further SFT from the SFT start


@dataclass
class EvalConfig:
    """Held-out greedy evaluation per difficulty level."""

    before: bool = True
    after: bool = True
    at_warmup_end: bool = True
    max_new_tokens: int = 256
    every: int = 0  # also every N iterations (0 = off)
    checkpoint: Optional[str] = None  # `kimi-rl eval`: a run directory to evaluate


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterations: int = 100
    seed: int = 0
    run_dir: Optional[str] = None  # default: Hydra's output directory
    resume: Optional[str] = None  # a run directory to continue
    checkpoint_every: int = 10
    num_threads: Optional[int] = None
    log_samples: int = 4  # responses written to TensorBoard as text per iteration
    progress: bool = True


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
