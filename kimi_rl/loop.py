"""The RL loop (SPEC.md section 5), one iteration after another, top to bottom.

Choices, and why:
- Online mirror descent (Kimi k1.5, section 2.3.2) by default: squared-loss surrogate with
  the group-mean reward as tau*log Z and a log-ratio penalty to pi_theta_i, the policy that
  generated the iteration's rollouts; GRPO and REINFORCE are there for ablations.
- pi_theta_i is refreshed every iteration and the optimizer is reset with it (report).
- Rewards are verifier results plus Kimi's length reward, off for a warmup; responses that
  end in a loop are stopped early ("repeat", optionally penalised), and the max response
  length can grow by a schedule (truncated responses: verified, or reward 0).
- Problems come from the curriculum sampler (easy -> hard) with prioritized re-sampling.
- Partial rollouts (SPEC.md section 4), when on: each trajectory generates at most a token
  budget per iteration, unfinished ones wait in a replay buffer and continue next
  iteration, and a group trains only once its k responses are finished; tokens from
  older iterations can be masked out of the loss by age.
- Optional SFT cold start on chain-of-thought demonstrations, and an SFT control that
  spends RL's wall time on more supervised training, so the demo shows what RL adds.
- Under torchrun every rank runs this loop; sampling, rollouts and rewards are the same
  on every rank (checked each iteration), the policy backend splits the training, and
  rank 0 alone writes outputs (kimi_rl/distributed.py says why).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from curriculum.schedules import piecewise

from . import checkpoint, distributed, host
from .algorithms import LossBatch, get_algorithm
from .build import build_engine, build_policy, build_sampler, save_hf
from .collapse import CollapseDetector
from .config import RolloutConfig, TrainConfig, check_config
from .data import load_task
from .evaluate import evaluate, format_accuracy, task_lines, task_name
from .logging import RunLogger
from .policy.packing import pack
from .preemption import Preempted, Preemption
from .prompts import prompt_format
from .rewards.length import length_penalty_weight
from .rewards.repetition import RepeatDetection
from .rewards.verify import get_verifier
from .rollout.engine import SamplingParams
from .rollout.partial import PartialRollouts, StepStats
from .rollout.replicas import Replicas
from .rollout.samples import Sample, score_groups
from .sft import encode_demos, progress_callbacks, run_sft, split_heldout

# summary.json always holds these keys (null where a phase did not run or nothing was
# correct), besides run_dir, rl_seconds, the eval_it<N> results and the per-phase details
SUMMARY_KEYS = ("eval_before", "eval_warmup_end", "eval_after", "sft_control",
                "trained_levels", "demonstrated_levels", "demonstrations",
                "correct_length_at_warmup_end", "correct_length_final",
                "accuracy_change_after_warmup", "sft", "sft_control_stats", "collapse",
                "generated_tokens", "trained_tokens", "iterations", "wall_seconds")


def train(cfg: TrainConfig, run_dir: str | Path, preempt: Preemption | None = None) -> dict:
    """Run (or resume) RL training in `run_dir`; returns the summary written to summary.json.

    With `preempt` (signal handlers installed by the command), a requested stop ends the
    run at the next safe point with a checkpoint, raising `Preempted`."""
    t_start = time.perf_counter()
    check_config(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    host.setup(cfg.num_threads)
    torch.manual_seed(cfg.seed)

    task = load_task(cfg.data)
    policy, tokenizer = build_policy(cfg, task)
    engine = build_engine(cfg, policy, tokenizer)
    sampler = build_sampler(cfg, task)
    algo = get_algorithm(cfg.algo.name)
    by_id = {p.id: p for p in task.train}
    rollouts = build_rollouts(cfg)
    detector = CollapseDetector(cfg.collapse)
    params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p,
                            repeat=repeat_detection(cfg.rollout))
    demo_pairs = task.demonstrations(cfg.data.confirm_prob, cfg.seed)
    fmt = prompt_format(cfg)  # how problems are prompted: rollouts, SFT, evaluation
    demos, heldout = split_heldout(encode_demos(tokenizer, demo_pairs, fmt), cfg.sft.heldout,
                                   cfg.seed)
    demo_counts = dict(Counter(p.level for p, _ in demo_pairs))

    def run_eval(title: str, key: str) -> dict:
        """Greedy held-out accuracy per level (and per task), and (sampled) lengths of
        correct responses; returns the greedy evaluation."""
        greedy = evaluate(engine, tokenizer, task.test, cfg.eval.max_new_tokens, fmt=fmt)
        sampled = evaluate(engine, tokenizer, task.test, cfg.eval.max_new_tokens,
                           SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p,
                                          seed=cfg.seed), fmt)
        summary[key] = greedy["accuracy"]
        summary.setdefault("accuracy_by_task", {})[key] = greedy["by_task"]
        summary.setdefault("sampled_accuracy", {})[key] = sampled["accuracy"]
        summary.setdefault("correct_length", {})[key] = sampled["correct_length"]
        log.print(format_accuracy(f"held-out ({title})", greedy["accuracy"]))
        for line in task_lines(greedy["by_task"]):
            log.print(line)
        return greedy

    summary: dict = {**{key: None for key in SUMMARY_KEYS},
                     "run_dir": str(run_dir), "rl_seconds": 0.0, "wall_seconds": 0.0}
    start = 0
    if cfg.resume:
        path = checkpoint.latest(cfg.resume)
        state = checkpoint.load(path)
        distributed.load_policy(policy, path, state)
        engine.update_weights(policy.export_weights())
        engine.load_state_dict(state["engine"])
        sampler.load_state_dict(state["sampler"])
        rollouts.load_state_dict(state["rollouts"], by_id)
        if "collapse" in state:
            detector.load_state_dict(state["collapse"])
        checkpoint.set_rng_state(state["rng"])
        summary, start = state["summary"], state["iteration"]
    wall0 = summary["wall_seconds"]  # time spent by earlier processes of this run
    log = RunLogger(run_dir, start, cfg.progress) if distributed.is_main() \
        else distributed.NullLogger()  # rank 0 alone writes run outputs
    log.print(f"run directory: {run_dir}")

    def stop_if_requested(where: str) -> None:
        if distributed.agree_stop(preempt):
            stop(where)

    def stop(where: str) -> None:
        preempt.done()
        log.close()
        resume = (f"resume={run_dir} continues it"
                  if (run_dir / "checkpoints" / checkpoint.LATEST).is_file()
                  else "no checkpoint yet: a new run starts from scratch")
        raise Preempted(f"stopped on {preempt.received} {where}; {resume}", preempt.exit_code)

    if not cfg.resume:
        if distributed.is_main():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        if cfg.sft.enabled:
            if cfg.sft.from_run:  # another run's SFT start (arms of a comparison share it)
                source = Path(cfg.sft.from_run)
                path = source / "checkpoints" / "sft_start.pt"
                if not path.is_file():
                    raise ValueError(f"sft.from_run: {path} does not exist (the run must "
                                     f"have had sft.control=true)")
                distributed.load_policy(policy, path, checkpoint.load(path))
                # the source's cold-start figures come along: an SFT control of this run
                # is time-matched by the source's step time
                stats = source_sft_stats(source)
                if cfg.sft.control and not stats.get("seconds"):
                    raise ValueError(
                        f"sft.from_run: {source / 'summary.json'} has no cold-start figures "
                        "(`sft`) to time-match the SFT control with; use a finished run, or "
                        "sft.control=false")
                summary["sft"] = {**stats, "from_run": str(source)}
                log.print(f"sft cold start: loaded from {path}")
            else:
                def on_step(step, loss, lr):
                    log.phase_scalars("sft", {"sft/loss": loss, "sft/lr": lr}, step)
                    stop_if_requested("during the SFT cold start")

                def on_eval(step, loss):
                    log.phase_scalars("sft", {"sft/heldout_loss": loss}, step)

                # at most sft.steps; a target loss can end it early
                on_step, on_eval = progress_callbacks(log.start_bar("sft", cfg.sft.steps),
                                                      on_step, on_eval)
                summary["sft"] = run_sft(
                    policy, demos, cfg.sft, cfg.seed, cfg.sft.steps, heldout, on_step,
                    on_eval=on_eval)
                log.print(sft_report("sft cold start", summary["sft"], len(demos),
                                     len(heldout)))
            engine.update_weights(policy.export_weights())
            if cfg.sft.control:
                distributed.save_checkpoint(run_dir, "sft_start", {}, policy, latest=False)
        # RL starts with its own optimizer (algo.lr, no moments), also when it keeps one
        # across iterations (algo.reset_optimizer=false): not the cold start's, whose
        # learning rate and moments belong to another loss
        policy.reset_optimizer()
        if cfg.eval.before:
            run_eval("before RL", "eval_before")

    warmup = cfg.reward.length_penalty_warmup
    log.start_bar("rl", cfg.iterations, start)
    for it in range(start, cfg.iterations):
        if cfg.eval.at_warmup_end and it == warmup and 0 < warmup:
            run_eval(f"warmup end, it {it}", "eval_warmup_end")
        t0 = time.perf_counter()
        metrics = rl_iteration(it, cfg, policy, engine, sampler, algo, tokenizer, by_id, params,
                               rollouts, log)
        summary["rl_seconds"] += time.perf_counter() - t0
        for key, metric in (("generated_tokens", "rollout/generated_tokens"),
                            ("trained_tokens", "partial/trained_tokens")):
            summary[key] = (summary.get(key) or 0) + int(metrics[metric])
        if cfg.eval.every and (it + 1) % cfg.eval.every == 0:
            ev = run_eval(f"it {it + 1}", f"eval_it{it + 1}")
            metrics.update({f"eval/accuracy_L{lv}": a for lv, a in ev["accuracy"].items()})
            if len(ev["by_task"]) > 1:
                metrics.update({f"eval/{name}/accuracy_L{lv}": a
                                for name, acc in ev["by_task"].items() for lv, a in acc.items()})
        if cfg.collapse.enabled:
            metrics.update(detector.update(it, metrics))
            if detector.fired:
                log.print(f"WARNING: policy collapse? iteration {it}: "
                          f"{', '.join(collapse_reason(r, metrics) for r in detector.fired)}")
            summary["collapse"] = detector.summary()
        log.scalars(metrics, it)
        log.step({k: metrics[m] for k, m in (("reward", "reward/mean"),
                                             ("acc", "accuracy/train"),
                                             ("len", "response_length/mean")) if m in metrics})
        stopping = distributed.agree_stop(preempt)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations or stopping:
            summary["wall_seconds"] = wall0 + time.perf_counter() - t_start
            distributed.save_checkpoint(run_dir, f"iter_{it + 1:06d}", {
                "iteration": it + 1, "engine": engine.state_dict(),
                "sampler": sampler.state_dict(), "rollouts": rollouts.state_dict(),
                "collapse": detector.state_dict(),
                "rng": checkpoint.rng_state(),
                "summary": summary, "config": OmegaConf.to_container(cfg)}, policy)
        if stopping:  # decided once, above: a signal arriving after the save waits an iteration
            stop(f"after iteration {it + 1} (checkpoint iter_{it + 1:06d}.pt)")

    stop_if_requested(f"after iteration {cfg.iterations}, before the final evaluation")
    if cfg.eval.after:
        run_eval("after RL", "eval_after")
    if distributed.is_main():
        save_hf(policy, tokenizer, run_dir / "hf_model")
    if cfg.sft.enabled and cfg.sft.control:
        summary["sft_control_stats"] = sft_control(cfg, run_dir, policy, engine, demos, heldout,
                                                   summary, run_eval, log)
    summary.update(demo_summary(cfg, task, summary, demo_counts))
    summary["iterations"] = cfg.iterations
    summary["wall_seconds"] = wall0 + time.perf_counter() - t_start
    if distributed.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.close()
    return summary


def rl_iteration(it, cfg, policy, engine, sampler, algo, tokenizer, by_id, params, rollouts,
                 log) -> dict:
    """One iteration: sample problems, roll out, score the finished groups, update stats,
    optimize, sync. With partial rollouts an iteration may finish no group: then it only
    generates."""
    t0 = time.perf_counter()
    cap = max_new_tokens_at(cfg.rollout, it)
    ids = sampler.sample(rollouts.new_groups_wanted(), it, exclude=rollouts.problems_in_flight())
    rollouts.add_groups([by_id[i] for i in ids], tokenizer, it)
    samples, step = rollouts.step(engine, it, cap, params,
                                  lambda t: tokenizer.decode(t, skip_special_tokens=True),
                                  build_replicas(cfg))
    t1 = time.perf_counter()
    weight = length_penalty_weight(it, cfg.reward.length_penalty_weight,
                                   cfg.reward.length_penalty_warmup)
    fmt = prompt_format(cfg)
    for task in {s.problem.task for s in samples}:  # code: in parallel sandboxes
        score_groups([s for s in samples if s.problem.task == task],
                     get_verifier(task, cfg.reward, fmt.answer_location), weight,
                     cfg.reward.repeat_penalty, cfg.reward.truncated_reward,
                     only_solved=cfg.reward.length_penalty_groups == "solved",
                     fmt=fmt, format_weight=cfg.reward.format_weight)
    sampler.update((s.problem.id, s.correct) for s in samples)
    t2 = time.perf_counter()
    masks = loss_masks(cfg.rollout, samples, it)
    train_metrics = optimize(cfg, policy, algo, samples, masks, params.temperature, it)
    t3 = time.perf_counter()
    synced = 0
    if train_metrics.get("train/optimizer_steps"):
        weights = list(policy.export_weights())  # whole tensors (gathered from shards)
        synced = sum(t.numel() * t.element_size() for _, t in weights)
        engine.update_weights(weights)
    t4 = time.perf_counter()

    ages = [it - v for s in samples for v in s.token_iterations()]  # per response token
    m = rollout_metrics(samples, weight) if samples else {}
    m["rollout/max_new_tokens"] = cap
    m.update(partial_metrics(step, samples, masks, ages))
    m.update(step.replicas.metrics())
    m.update(train_metrics)
    if hasattr(engine, "metrics"):  # engine-side rollout figures (vLLM: tokens/s, sync)
        m.update(engine.metrics())
    m.update({
        "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/train": t3 - t2,
        "time/sync": t4 - t3, "sync/bytes": synced, "time/iteration": t4 - t0,
        "throughput/rollout_tokens_per_s": step.generated_tokens / max(t1 - t0, 1e-9),
        "throughput/tokens_per_s": step.generated_tokens / max(t4 - t0, 1e-9),
        "throughput/trained_tokens_per_s": m["partial/trained_tokens"] / max(t4 - t0, 1e-9),
        "curriculum/stage": sampler.stage_index(it),
        "curriculum/sampling_entropy": sampler.sampling_entropy(it),
    })
    if ages:
        log.histogram("partial/token_age", ages, it)
    k = cfg.rollout.group_size
    for j, s in enumerate(samples[: cfg.log_samples * k: k]):  # one per problem
        log.text(f"samples/{j}", f"prompt: {s.problem.prompt!r}\n\nresponse: {s.text!r}\n\n"
                 f"reward {s.reward:.3f} (correct {s.correct:.0f})", it)
    return m


def collapse_reason(rule: str, metrics: dict[str, float]) -> str:
    """A fired collapse rule in words, with its figure."""
    if rule.startswith("accuracy_"):
        lv = rule.split("_", 1)[1]
        return (f"training accuracy of {lv} {metrics[f'collapse/accuracy_drop_{lv}']:.2f} "
                f"below its best")
    if rule == "repeat":
        return (f"repeat-stopped responses {metrics['collapse/repeat_rise']:.2f} above their "
                f"lowest share")
    what = {"entropy": "token entropy", "length": "mean response length"}[rule]
    return f"{what} at {metrics[f'collapse/{rule}_ratio']:.2f}x its highest"


def build_rollouts(cfg: TrainConfig) -> PartialRollouts:
    """The trajectories in flight: with rollout.partial off, none outlive their iteration."""
    pr = cfg.rollout.partial
    return PartialRollouts(
        cfg.rollout.group_size, cfg.rollout.problems_per_iteration * cfg.rollout.group_size,
        budget=pr.budget if pr.enabled else None,
        max_trajectory_age=pr.max_trajectory_age if pr.enabled else None,
        stale=pr.stale_trajectories, refill=pr.refill, prompt=prompt_format(cfg),
        seed=cfg.seed)


def build_replicas(cfg: TrainConfig) -> Replicas:
    """This rank's rollout replica (rollout.replicas: 0 is one per engine: per rank with
    the torch engine, per tensor-parallel group of ranks with vLLM)."""
    world = distributed.world_size()
    tp = cfg.rollout.vllm.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    count = cfg.rollout.replicas or max(world // tp, 1)
    if world > 1 and (world // count) % tp:
        raise ValueError(f"rollout.replicas={cfg.rollout.replicas}: a replica of "
                         f"{world // count} ranks cannot hold whole vLLM engines of "
                         f"rollout.vllm.tensor_parallel_size={tp} ranks")
    return Replicas(count, distributed.rank(), world, cfg.rollout.replica_margin,
                    distributed.all_gather, cfg.rollout.replica_context_scale)


def loss_masks(rollout: RolloutConfig, samples: list[Sample], it: int) -> list[list[bool]]:
    """Per response token: does it count in the loss at iteration `it`? With partial
    rollouts and loss_segments="recent", only tokens generated at most max_segment_age
    iterations ago do (SPEC.md section 4); otherwise all."""
    pr = rollout.partial
    if not (pr.enabled and pr.loss_segments == "recent"):
        return [[True] * len(s.tokens) for s in samples]
    return [[it - v <= pr.max_segment_age for v in s.token_iterations()] for s in samples]


def partial_metrics(step: StepStats, samples: list[Sample], masks: list[list[bool]],
                    ages: list[int]) -> dict[str, float]:
    """Replay buffer, carried-over work, segments, token ages (iterations between a
    token's generation and this update) and the masked share."""
    tokens = sum(len(m) for m in masks)
    trained = sum(sum(m) for m in masks)
    m = {
        "partial/buffer_size": step.buffered,
        "partial/buffer_tokens": step.buffered_tokens,
        "partial/waiting_for_group": step.waiting,
        "partial/groups_in_flight": step.groups_in_flight,
        "partial/continued": step.continued,
        "partial/carried_tokens": step.carried_tokens,
        "partial/groups_finished": step.groups_finished,
        "partial/dropped_groups": step.dropped_groups,
        "partial/regenerated": step.regenerated,
        "partial/trained_tokens": trained,
        "rollout/requests": step.requests, "rollout/generated_tokens": step.generated_tokens,
        "rollout/idle_fraction": step.idle_fraction,
    }
    if ages:
        m.update({
            "partial/segments_per_trajectory": float(np.mean([len(s.segments)
                                                              for s in samples])),
            "partial/masked_fraction": 1.0 - trained / tokens if tokens else 0.0,
            "partial/token_age_mean": float(np.mean(ages)),
            "partial/token_age_max": float(np.max(ages)),
        })
    return m


def max_new_tokens_at(rollout: RolloutConfig, iteration: int) -> int:
    """The max response length of `iteration` (SPEC.md section 4): the value of the last
    rollout.max_new_tokens_schedule entry that starts at or before it, else
    rollout.max_new_tokens."""
    return int(piecewise({0: rollout.max_new_tokens, **rollout.max_new_tokens_schedule},
                         iteration))


def repeat_detection(rollout: RolloutConfig) -> RepeatDetection | None:
    """The rollout's loop condition, or None when rollout.repeat_detection is off."""
    if not rollout.repeat_detection:
        return None
    return RepeatDetection(rollout.repeat_max_period, rollout.repeat_min_repeats,
                           rollout.repeat_min_tokens)


def optimize(cfg: TrainConfig, policy, algo, samples: list[Sample], masks: list[list[bool]],
             temperature: float, it: int) -> dict:
    """Reference logprobs of pi_theta_i, then the configured optimizer steps on the loss
    (SPEC.md section 1): `minibatches` steps per epoch over the iteration's groups.

    Only tokens whose `masks` entry is True enter the loss (and the reference pass); every
    sample still counts in its group's baseline and in the per-sequence normalisation.
    """
    metrics: dict[str, float] = {}
    distributed.check_same("rollouts", [(s.prompt_ids, s.tokens, s.reward) for s in samples])
    counted = [i for i, m in enumerate(masks) if any(m)]
    if not counted:
        return metrics
    mb_tokens = cfg.backend.micro_batch_tokens
    prompts = [s.prompt_ids for s in samples]
    responses = [s.tokens for s in samples]
    versions = [s.token_iterations() for s in samples]
    rewards = torch.tensor([s.reward for s in samples])
    adv = algo.advantages(rewards, torch.tensor([s.group for s in samples]), cfg.algo)
    rollout_lp = [torch.tensor(s.logprobs)[torch.tensor(m, dtype=torch.bool)]
                  for s, m in zip(samples, masks, strict=True)]

    def packed(idx: list[int]):
        return pack([prompts[i] for i in idx], [responses[i] for i in idx], mb_tokens,
                    loss_masks=[masks[i] for i in idx], versions=[versions[i] for i in idx],
                    share_prompts=cfg.backend.share_prompts)

    groups = sorted({s.group for s in samples})
    chunks = np.array_split(np.array(groups), max(1, min(cfg.algo.minibatches, len(groups))))
    # one optimizer step: its forward passes run at theta_i, so (without dropout) their
    # detached logprobs are pi_theta_i's and a separate reference pass would repeat them
    ref_in_step = (cfg.algo.ref_logprobs == "trainer" and cfg.algo.epochs * len(chunks) == 1
                   and getattr(policy, "no_dropout", False))
    # samples of advantage 0 have zero gradient in that one step (AlgoConfig)
    skip_zero = cfg.algo.skip_zero_advantage and ref_in_step
    ref = list(rollout_lp)  # "rollout" (check_config allows no other value): what sampled
    fresh, older = [], []  # |logp_ref - sampling logp| per token, by who sampled it

    def set_ref(lp: torch.Tensor, pb, idx: list[int]) -> None:
        counts = torch.bincount(pb.seq_index, minlength=len(idx)).tolist()
        for i, part, vers in zip(idx, lp.split(counts), pb.target_versions.split(counts),
                                 strict=True):  # targets in order
            ref[i] = part
            diff = (part - rollout_lp[i]).abs()
            fresh.append(diff[vers == it])  # sampled by pi_theta_i itself
            older.append(diff[vers != it])  # sampled by earlier policies

    if cfg.algo.ref_logprobs == "trainer" and not ref_in_step:
        batches = list(packed(counted))  # data parallel: each rank computes its share
        for pb, (lp, _) in zip(batches, policy.logprobs_many(batches, temperature),
                               strict=True):
            set_ref(lp, pb, [counted[j] for j in pb.seq_ids])
    if cfg.algo.reset_optimizer:
        policy.reset_optimizer()
    if cfg.algo.lr_warmup_iterations or cfg.algo.lr_decay_iterations:
        metrics["train/lr"] = rl_lr(cfg.algo, it, cfg.iterations)
        policy.set_lr(metrics["train/lr"])
    steps, skipped = [], 0
    for _ in range(cfg.algo.epochs):
        for chunk in chunks:
            in_chunk = set(chunk.tolist())
            members = [i for i, s in enumerate(samples) if s.group in in_chunk]
            trained = [i for i in members if any(masks[i])]
            if not trained:
                continue
            n_seqs, n_tokens = len(members), sum(sum(masks[i]) for i in trained)
            if skip_zero:
                skipped += sum(int(adv[i] == 0) for i in trained)
                trained = [i for i in trained if adv[i] != 0]
                if not trained:  # a zero gradient: no step
                    continue

            def loss_fn(lp, pb, trained=trained, n_seqs=n_seqs, n_tokens=n_tokens):
                idx = [trained[j] for j in pb.seq_ids]
                if ref_in_step:
                    set_ref(lp.detach(), pb, idx)
                batch = LossBatch(lp, torch.cat([ref[i] for i in idx]), pb.seq_index, adv[idx],
                                  n_seqs, n_tokens)
                return algo.loss(batch, cfg.algo)

            steps.append(policy.train_step(packed(trained), loss_fn, temperature))
    fresh_t, older_t = torch.cat(fresh or [torch.zeros(0)]), torch.cat(older or [torch.zeros(0)])
    if fresh_t.numel():
        metrics["logprob/train_infer_abs_mean"] = float(fresh_t.mean())
        metrics["logprob/train_infer_abs_max"] = float(fresh_t.max())
    if older_t.numel():  # policy drift since those tokens were sampled
        metrics["logprob/stale_abs_mean"] = float(older_t.mean())
    for k in steps[0] if steps else ():
        metrics[f"train/{k}" if not k.startswith("loss/") else k] = float(
            np.mean([s[k] for s in steps]))
    metrics["train/optimizer_steps"] = len(steps)
    if skip_zero:
        metrics["train/skipped_samples"] = skipped
    return metrics


def rl_lr(algo, iteration: int, iterations: int) -> float:
    """algo.lr, rising linearly over the first algo.lr_warmup_iterations iterations (a
    fresh Adam's first steps move every weight by about the learning rate, whatever its
    gradient: sign descent) and falling linearly over the last algo.lr_decay_iterations
    of `iterations`, to lr / lr_decay_iterations in the last one (AlgoConfig)."""
    warm = min(1.0, (iteration + 1) / max(algo.lr_warmup_iterations, 1))
    decay = min(1.0, (iterations - iteration) / max(algo.lr_decay_iterations, 1))
    return algo.lr * min(warm, decay)


def rollout_metrics(samples: list[Sample], weight: float) -> dict[str, float]:
    lengths = np.array([len(s.tokens) for s in samples])
    m = {
        "reward/mean": float(np.mean([s.reward for s in samples])),
        "accuracy/train": float(np.mean([s.correct for s in samples])),
        "response_length/mean": float(lengths.mean()),
        "response_length/p90": float(np.percentile(lengths, 90)),
        "response_length/max": float(lengths.max()),
        "rollout/truncated": sum(s.finish_reason == "length" for s in samples),
        "rollout/repeat_terminated": sum(s.finish_reason == "repeat" for s in samples),
        "rollout/truncated_fraction": float(
            np.mean([s.finish_reason == "length" for s in samples])),
        "rollout/repeat_terminated_fraction": float(
            np.mean([s.finish_reason == "repeat" for s in samples])),
        "length_penalty/weight": weight,
        "length_penalty/contribution": float(np.mean([weight * s.length_reward for s in samples])),
        # R1's format reward: the share of responses that follow the prompt format
        "reward/format": float(np.mean([s.format_reward for s in samples])),
    }
    correct = [len(s.tokens) for s in samples if s.correct == 1.0]
    if correct:
        m["response_length/correct_mean"] = float(np.mean(correct))
    m["rollout/samples"] = len(samples)
    for lv in sorted({s.problem.level for s in samples}):
        of_level = [s.correct for s in samples if s.problem.level == lv]
        m[f"accuracy/train_L{lv}"] = float(np.mean(of_level))
        m[f"rollout/samples_L{lv}"] = len(of_level)
    names = [task_name(s.problem) for s in samples]
    if len(set(names)) > 1:  # several tasks (reasoning-gym datasets): accuracy of each
        for name in sorted(set(names)):
            m[f"accuracy/train_task/{name}"] = float(
                np.mean([s.correct for s, n in zip(samples, names, strict=True) if n == name]))
    return m


def sft_report(what: str, stats: dict, n_demos: int, n_heldout: int) -> str:
    held = (f", held-out loss {stats['heldout_loss']:.4f} (weights of step "
            f"{stats['best_step']})" if "heldout_loss" in stats else "")
    decay = (f" (decay from step {stats['lr_decay_start']})"
             if stats.get("lr_decay_start") is not None else "")
    return (f"{what}: {stats['steps']} steps{decay}, last batch loss {stats['loss']:.4f}{held}, "
            f"{stats['seconds']:.1f} s on {n_demos} demonstrations ({n_heldout} held out)")


def source_sft_stats(run_dir: Path) -> dict:
    """The cold-start figures (`summary.json`'s `sft`: steps, seconds, losses) of the run
    an `sft.from_run` start comes from (a run that itself started from another carries
    that one's); {} where it has none."""
    try:
        sft = json.loads((run_dir / "summary.json").read_text()).get("sft") or {}
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in sft.items() if k != "from_run"}


def sft_control(cfg, run_dir, policy, engine, demos, heldout, summary, run_eval, log) -> dict:
    """The SFT start trained further on the same demonstrations, evaluated: as many steps
    as the cold start's mean step time fits in RL's wall time (rank 0's figures under
    torchrun), with the cold start's schedule."""
    path = Path(run_dir) / "checkpoints" / "sft_start.pt"
    distributed.load_policy(policy, path, checkpoint.load(path))
    sft = summary.get("sft") or {}
    per_step = sft.get("seconds", 0.0) / max(sft.get("steps", 0), 1)
    if per_step <= 0:
        raise ValueError("sft.control: no cold-start step time to match RL's wall time with")
    steps = distributed.broadcast_int(
        max(1, round(summary["rl_seconds"] / per_step)))
    stats = run_sft(policy, demos, cfg.sft, cfg.seed + 7, steps, heldout, until_target=False)
    log.print(sft_report("sft control", stats, len(demos), len(heldout)))
    engine.update_weights(policy.export_weights())
    run_eval("SFT control", "sft_control")
    return stats


def demo_summary(cfg: TrainConfig, task, summary: dict, demo_counts: dict[int, int]) -> dict:
    """Which levels RL trained on and had demonstrations for, and lengths of correct
    responses (held-out, sampled) at the end of the length-penalty warmup and at the end."""
    trained = sorted({int(lv) for st in cfg.curriculum.stages for lv, w in st.levels.items()
                      if w > 0} or set(task.levels))
    out = {"trained_levels": trained,
           "demonstrated_levels": sorted(demo_counts) if cfg.sft.enabled else [],
           "demonstrations": demo_counts}

    lengths = summary.get("correct_length", {})
    for key, name in (("eval_warmup_end", "correct_length_at_warmup_end"),
                      ("eval_after", "correct_length_final")):
        vals = [v for lv, v in lengths.get(key, {}).items() if int(lv) in trained]
        out[name] = float(np.mean(vals)) if vals else None  # None: no correct response
    out["accuracy_change_after_warmup"] = None
    if summary.get("eval_warmup_end") and summary.get("eval_after"):  # did the penalty cost?
        out["accuracy_change_after_warmup"] = {
            lv: summary["eval_after"][lv] - acc for lv, acc in summary["eval_warmup_end"].items()
            if int(lv) in trained}
    return out
