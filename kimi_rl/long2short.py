"""Long2short (SPEC.md section 6; Kimi k1.5 section 2.4): a long chain-of-thought model made
to reach the same answers in fewer tokens, by one of four methods.

- merge: the weighted average of the long-CoT model's weights and a short-CoT model's
  (same architecture).
- shortest: rejection sampling; n responses per problem from the long-CoT model, the
  shortest correct one kept, written as an SFT dataset (JSONL) and fine-tuned on with the
  SFT of `kimi-rl sft` (sft.* settings).
- dpo: pairs from the same samples, chosen = the shortest correct response, rejected = a
  wrong one or a correct one at least `ratio` times longer; the DPO loss against the
  long-CoT model as the reference (its logprobs computed once, before training), with an
  optional SFT term on the chosen responses; packed batches on the policy backend.
- rl: a second RL phase from the long-CoT model with the length penalty on from the first
  iteration and a smaller max response length (truncated responses as the config says).

Each writes <run dir>/hf_model and its held-out evaluation <run dir>/eval.json. The maths
(merging, selection, pairs, the loss) are pure functions below; `run_long2short` wires them.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor
from torch.nn.functional import logsigmoid

from . import host
from .build import build_engine, build_policy, save_hf
from .config import DPOConfig, StageConfig, TrainConfig, check_config
from .data import load_task
from .data.problems import Problem
from .evaluate import evaluate, format_accuracy
from .loop import repeat_detection, train
from .policy.model import load_pretrained
from .policy.packing import pack
from .prompts import prompt_format
from .rewards.verify import get_verifier
from .rollout.engine import SamplingParams
from .rollout.samples import Sample, generate_groups
from .sft import encode_demos, lr_at, run_sft, split_heldout, write_demos

METHODS = ("merge", "shortest", "dpo", "rl")


# --- the maths ----------------------------------------------------------------------------

def merge_state_dicts(states: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                      names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """sum_i weights[i] * states[i], tensor by tensor (computed in float64, returned in the
    first model's dtypes). The models must have the same tensors and shapes: the first
    difference is named (tensor, shapes, model). Weights sum to 1; integer tensors (buffers)
    must be equal."""
    names = list(names or [f"model {i}" for i in range(len(states))])
    if len(states) < 1 or len(states) != len(weights) or len(names) != len(states):
        raise ValueError(f"merge: {len(states)} models for {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"merge: the weights must be finite and sum to 1, got {list(weights)}")
    first = states[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        for key in first:
            if key not in state:
                raise ValueError(f"merge: tensor {key!r} of {names[0]} is missing in {name}")
            if state[key].shape != first[key].shape:
                raise ValueError(
                    f"merge: tensor {key!r} has shape {list(first[key].shape)} in {names[0]} "
                    f"but {list(state[key].shape)} in {name} (not the same architecture)")
        for key in state:
            if key not in first:
                raise ValueError(f"merge: tensor {key!r} of {name} is missing in {names[0]}")
    out = {}
    for key, ref in first.items():
        if not ref.is_floating_point():
            for state, name in zip(states[1:], names[1:], strict=True):
                if not torch.equal(state[key], ref):
                    raise ValueError(f"merge: integer tensor {key!r} differs between "
                                     f"{names[0]} and {name}")
            out[key] = ref.clone()
            continue
        total = sum(w * s[key].to(torch.float64) for s, w in zip(states, weights, strict=True))
        out[key] = total.to(ref.dtype)
    return out


def shortest_correct(lengths: Sequence[int], correct: Sequence[bool]) -> int | None:
    """The index of the shortest correct response of a group; a tie goes to the first of
    them (the lowest index). None when no response is correct."""
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths for {len(correct)} correctness flags")
    ok = [i for i, c in enumerate(correct) if c]
    return min(ok, key=lambda i: (lengths[i], i)) if ok else None


def dpo_pairs(lengths: Sequence[int], correct: Sequence[bool], ratio: float = 1.5,
              max_pairs: int = 0) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of a group: chosen = its shortest correct response
    (`shortest_correct`); rejected = each wrong response, and each correct one at least
    `ratio` times as long as the chosen; longest first (ties: lower index first), at most
    `max_pairs` (0: all). No pairs without a correct response."""
    if not ratio >= 1.0:
        raise ValueError(f"long2short.dpo.ratio: must be >= 1, got {ratio!r}")
    chosen = shortest_correct(lengths, correct)
    if chosen is None:
        return []
    rejected = [i for i, (n, c) in enumerate(zip(lengths, correct, strict=True))
                if i != chosen and (not c or n >= ratio * lengths[chosen])]
    rejected.sort(key=lambda i: (-lengths[i], i))
    if max_pairs > 0:
        rejected = rejected[:max_pairs]
    return [(chosen, r) for r in rejected]


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float, sft_weight: float = 0.0, chosen_tokens: Tensor | None = None
             ) -> Tensor:
    """The DPO loss of a batch of pairs, from sequence logprobs (sums over response tokens)
    of the policy and of the reference:

        mean_p -log sigmoid(beta * ((chosen_p - ref_chosen_p) - (rejected_p - ref_rejected_p)))
        + sft_weight * (-sum_p chosen_p / sum_p chosen_tokens_p)

    the second term the token NLL of the chosen responses (`chosen_tokens`: their lengths)."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    loss = -logsigmoid(beta * margin).mean()
    if sft_weight:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: sft_weight needs chosen_tokens")
        loss = loss + sft_weight * (-chosen.sum() / chosen_tokens.sum())
    return loss


# --- sampling and the training sets -------------------------------------------------------

def sample_groups(cfg: TrainConfig, policy, tokenizer, problems: Sequence[Problem]
                  ) -> list[list[Sample]]:
    """long2short.samples responses per problem from the policy, at rollout.temperature and
    top_p up to rollout.max_new_tokens; each sample's `correct` is 1.0 when the verifier
    accepts it and it ended by itself (a truncated response is never kept)."""
    fmt = prompt_format(cfg)
    n = cfg.long2short.samples
    engine = build_engine(cfg, policy, tokenizer)
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, seed=cfg.seed,
                            repeat=repeat_detection(cfg.rollout))
    samples = generate_groups(engine, tokenizer, problems, n, cfg.rollout.max_new_tokens,
                              params, fmt)
    for s in samples:
        ok = get_verifier(s.problem.task, answer=fmt.answer_location)(s.problem, s.text)
        s.correct = float(ok == 1.0 and s.finish_reason == "stop")
    return [samples[i * n:(i + 1) * n] for i in range(len(problems))]


def pick_problems(cfg: TrainConfig, train: Sequence[Problem]) -> list[Problem]:
    """long2short.problems training problems at random (seed), of long2short.levels."""
    levels = set(cfg.long2short.levels)
    pool = [p for p in train if not levels or p.level in levels]
    if not pool:
        raise ValueError(f"long2short.levels: no training problem of levels {sorted(levels)}")
    return random.Random(cfg.seed).sample(pool, min(cfg.long2short.problems, len(pool)))


def shortest_demos(groups: Sequence[Sequence[Sample]]) -> list[tuple[Problem, str]]:
    """(problem, response text) of the shortest correct response of each group that has one."""
    out = []
    for g in groups:
        i = shortest_correct([len(s.tokens) for s in g], [s.correct == 1.0 for s in g])
        if i is not None:
            out.append((g[i].problem, g[i].text))
    return out


# --- DPO training -------------------------------------------------------------------------

def sequence_logprobs(policy, prompts, responses, micro_batch_tokens: int,
                      share_prompts: bool) -> Tensor:
    """Per sequence, the sum of its response tokens' logprobs (no gradient)."""
    out = torch.zeros(len(prompts), dtype=torch.float64)
    batches = pack(prompts, responses, micro_batch_tokens, share_prompts=share_prompts)
    for pb, (lp, _) in zip(batches, policy.logprobs_many(batches), strict=True):
        ids = torch.tensor(pb.seq_ids)[pb.seq_index]
        out.index_add_(0, ids, lp.double())
    return out


def dpo_step(policy, prompts, responses, pairs: Sequence[tuple[int, int]], ref: Tensor,
             cfg: DPOConfig, micro_batch_tokens: int, share_prompts: bool) -> dict[str, float]:
    """One optimizer step of the DPO loss on `pairs` (indices into prompts/responses), with
    `ref` the reference's sequence logprobs. The loss couples a pair's two sequences, which
    packing may put in different micro-batches: a forward pass without gradient gives
    every sequence's logprob S_i, the gradient of `dpo_loss` with respect to them gives
    g_i = dL/dS_i, and the micro-batches back-propagate sum_i g_i * S_i, whose gradient is
    the loss's, exactly (no dropout in the policy: the forward passes agree)."""
    seqs = sorted({i for p in pairs for i in p})
    local = {s: j for j, s in enumerate(seqs)}
    sp = [prompts[i] for i in seqs]
    sr = [responses[i] for i in seqs]
    now = sequence_logprobs(policy, sp, sr, micro_batch_tokens, share_prompts)
    leaf = now.clone().requires_grad_(True)
    c = torch.tensor([local[a] for a, _ in pairs])
    r = torch.tensor([local[b] for _, b in pairs])
    ref_local = ref[seqs].double()
    n_tokens = torch.tensor([float(len(responses[a])) for a, _ in pairs], dtype=torch.float64)
    loss = dpo_loss(leaf[c], leaf[r], ref_local[c], ref_local[r], cfg.beta, cfg.sft_weight,
                    n_tokens)
    loss.backward()
    coef = leaf.grad.float()
    margin = ((now[c] - ref_local[c]) - (now[r] - ref_local[r]))

    def surrogate(lp, pb):
        w = coef[torch.tensor(pb.seq_ids)][pb.seq_index]
        return (w * lp).sum(), {}

    metrics = policy.train_step(pack(sp, sr, micro_batch_tokens, share_prompts=share_prompts),
                                surrogate)
    metrics.update({"loss/dpo": float(loss), "dpo/margin": float(margin.mean()),
                    "dpo/accuracy": float((margin > 0).double().mean())})
    return metrics


def run_dpo(policy, prompts, responses, pairs: Sequence[tuple[int, int]], cfg: DPOConfig,
            micro_batch_tokens: int, share_prompts: bool, seed: int) -> dict:
    """cfg.steps optimizer steps, each on cfg.batch_size pairs drawn at random, with a fresh
    optimizer and the SFT schedule (`lr_at`) on cfg.lr; the reference logprobs are the
    policy's as it starts, computed once."""
    if not pairs:
        raise ValueError("long2short.dpo: no pairs (no sampled group has a correct response "
                         "and a rejected one)")
    t0 = time.perf_counter()
    used = sorted({i for p in pairs for i in p})
    ref = torch.zeros(len(prompts), dtype=torch.float64)
    ref[used] = sequence_logprobs(policy, [prompts[i] for i in used],
                                  [responses[i] for i in used], micro_batch_tokens,
                                  share_prompts)
    rng = random.Random(seed)
    policy.reset_optimizer(cfg.lr)
    first = last = {}
    for step in range(cfg.steps):
        policy.set_lr(lr_at(cfg, step, cfg.steps))
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(cfg.batch_size)]
        last = dpo_step(policy, prompts, responses, batch, ref, cfg, micro_batch_tokens,
                        share_prompts)
        first = first or last
        if step % 10 == 0 or step + 1 == cfg.steps:
            print(f"dpo step {step + 1}/{cfg.steps}: loss {last['loss/dpo']:.4f}, "
                  f"margin {last['dpo/margin']:.3f}, accuracy {last['dpo/accuracy']:.2f}",
                  flush=True)
    return {"steps": cfg.steps, "pairs": len(pairs), "first": first, "last": last,
            "seconds": time.perf_counter() - t0}


# --- the command --------------------------------------------------------------------------

def resolve_start(cfg: TrainConfig) -> TrainConfig:
    """long2short.start -> model.path; from a run directory also its task and prompt format
    (data.*, prompt.* of its config.yaml)."""
    start = cfg.long2short.start
    if not start:
        raise ValueError("long2short.start: required (a run directory or an HF model "
                         "directory: the long-CoT model)")
    path = Path(start)
    if not path.is_dir():
        raise FileNotFoundError(f"long2short.start: directory not found: {path}")
    cfg = OmegaConf.merge(cfg, {})  # a copy
    if (path / "config.yaml").is_file():
        if not (path / "hf_model").is_dir():
            raise FileNotFoundError(f"long2short.start: run directory {path} has no hf_model/ "
                                    "(the run did not finish)")
        run = OmegaConf.load(path / "config.yaml")
        for key in ("data", "prompt"):
            if key in run:
                cfg[key] = OmegaConf.merge(cfg[key], run[key])
        cfg.model.path = str(path / "hf_model")
    else:
        cfg.model.path = str(path)
    return cfg


def held_out(cfg: TrainConfig, model_path: str | Path) -> dict:
    """Greedy held-out accuracy and mean correct-response length per level of a model."""
    task = load_task(cfg.data)
    c = OmegaConf.merge(cfg, {"model": {"path": str(model_path)}})
    policy, tokenizer = build_policy(c, task)
    engine = build_engine(c, policy, tokenizer)
    result = evaluate(engine, tokenizer, task.test or task.train, cfg.eval.max_new_tokens,
                      fmt=prompt_format(c))
    return {"accuracy": result["accuracy"], "correct_length": result["correct_length"]}


def run_long2short(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """`kimi-rl long2short`: the method's model in <run_dir>/hf_model, its held-out
    evaluation in <run_dir>/eval.json, and a summary (method, details, evaluation) in
    <run_dir>/long2short.json, which is returned. The rl method's run files (config,
    checkpoints, TensorBoard, summary.json) are those of `kimi-rl train`."""
    method = cfg.long2short.method
    if method not in METHODS:
        raise ValueError(f"long2short.method: one of {list(METHODS)} (method=<name>), "
                         f"got {method!r}")
    check_config(cfg)
    cfg = resolve_start(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    host.setup(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    t0 = time.perf_counter()
    details = {"merge": _merge, "shortest": _shortest, "dpo": _dpo, "rl": _rl}[method](
        cfg, run_dir)
    summary = {"method": method, "start": cfg.model.path, "details": details,
               "train_seconds": time.perf_counter() - t0}
    ev = held_out(cfg, run_dir / "hf_model")
    print(format_accuracy(f"held-out ({method})", ev["accuracy"]))
    (run_dir / "eval.json").write_text(json.dumps(ev, indent=2))
    summary["eval"] = ev
    (run_dir / "long2short.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _merge(cfg: TrainConfig, run_dir: Path) -> dict:
    mc = cfg.long2short.merge
    if not mc.short_model:
        raise ValueError("long2short.merge.short_model: required (an HF model directory of "
                         "the same architecture as the start)")
    long_model, tokenizer = load_pretrained(cfg.model.path, cfg.model.dtype)
    short_model, _ = load_pretrained(mc.short_model, cfg.model.dtype)
    if long_model.config.model_type != short_model.config.model_type:
        raise ValueError(f"long2short.merge.short_model: a {short_model.config.model_type!r} "
                         f"model, the start is {long_model.config.model_type!r}")
    merged = merge_state_dicts(
        [long_model.state_dict(), short_model.state_dict()],
        [1.0 - mc.short_weight, mc.short_weight],
        [f"the start ({cfg.model.path})", f"the short model ({mc.short_model})"])
    long_model.load_state_dict(merged)
    long_model.save_pretrained(run_dir / "hf_model")
    tokenizer.save_pretrained(run_dir / "hf_model")
    return {"short_model": mc.short_model, "short_weight": mc.short_weight}


def _sampled(cfg: TrainConfig):
    task = load_task(cfg.data)
    policy, tokenizer = build_policy(cfg, task)
    problems = pick_problems(cfg, task.train)
    t0 = time.perf_counter()
    groups = sample_groups(cfg, policy, tokenizer, problems)
    flat = [s for g in groups for s in g]
    stats = {"problems": len(problems), "samples_per_problem": cfg.long2short.samples,
             "sampled_correct": sum(s.correct for s in flat) / max(len(flat), 1),
             "solved_problems": sum(any(s.correct for s in g) for g in groups),
             "sampling_seconds": time.perf_counter() - t0}
    print(f"sampled {len(flat)} responses to {len(problems)} problems: "
          f"{100 * stats['sampled_correct']:.1f}% correct, {stats['solved_problems']} "
          f"problems solved", flush=True)
    return policy, tokenizer, groups, stats


def _shortest(cfg: TrainConfig, run_dir: Path) -> dict:
    policy, tokenizer, groups, stats = _sampled(cfg)
    demos = shortest_demos(groups)
    if not demos:
        raise ValueError("long2short shortest: no sampled response is correct")
    path = write_demos(run_dir / "shortest.jsonl", demos)
    data, heldout = split_heldout(encode_demos(tokenizer, demos, prompt_format(cfg)),
                                  cfg.sft.heldout, cfg.seed)
    sft = run_sft(policy, data, cfg.sft, cfg.seed, cfg.sft.steps, heldout)
    save_hf(policy, tokenizer, run_dir / "hf_model")
    lengths = [len(tokenizer(t, add_special_tokens=False).input_ids) for _, t in demos]
    return {**stats, "dataset": str(path), "demonstrations": len(demos),
            "mean_demo_tokens": sum(lengths) / len(lengths), "sft": sft}


def _dpo(cfg: TrainConfig, run_dir: Path) -> dict:
    policy, tokenizer, groups, stats = _sampled(cfg)
    dc = cfg.long2short.dpo
    prompts, responses, pairs = [], [], []
    for g in groups:
        base = len(prompts)
        for a, b in dpo_pairs([len(s.tokens) for s in g], [s.correct == 1.0 for s in g],
                              dc.ratio, dc.max_pairs_per_group):
            pairs.append((base + a, base + b))
        prompts += [s.prompt_ids for s in g]
        responses += [s.tokens for s in g]
    print(f"dpo: {len(pairs)} pairs", flush=True)
    dpo = run_dpo(policy, prompts, responses, pairs, dc, cfg.backend.micro_batch_tokens,
                  cfg.backend.share_prompts, cfg.seed)
    save_hf(policy, tokenizer, run_dir / "hf_model")
    return {**stats, **dpo}


def _rl(cfg: TrainConfig, run_dir: Path) -> dict:
    """loop.train from the start: the length penalty from iteration 0, the max response
    length scaled by long2short.rl_length_ratio, the levels of long2short.levels; no cold
    start, no evaluation of its own (eval.json is written after it)."""
    ratio = cfg.long2short.rl_length_ratio
    ro = cfg.rollout
    short = {"max_new_tokens": max(1, round(ro.max_new_tokens * ratio)),
             "max_new_tokens_schedule": {k: max(1, round(v * ratio))
                                         for k, v in ro.max_new_tokens_schedule.items()}}
    rl_cfg = OmegaConf.merge(cfg, {
        "rollout": short, "reward": {"length_penalty_warmup": 0},
        "sft": {"enabled": False, "control": False},
        "eval": {"before": False, "after": False, "at_warmup_end": False, "every": 0}})
    if cfg.long2short.levels:
        rl_cfg.curriculum.stages = [StageConfig(0, {lv: 1.0 for lv in cfg.long2short.levels})]
    summary = train(rl_cfg, run_dir)
    return {"iterations": rl_cfg.iterations, "max_new_tokens": short["max_new_tokens"],
            "length_penalty_weight": rl_cfg.reward.length_penalty_weight,
            "rl_seconds": summary["rl_seconds"], "collapse": summary["collapse"]}
