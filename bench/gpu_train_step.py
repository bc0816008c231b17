"""Train-step throughput of the megatron backend on a GPU: a ~1.1B-parameter Llama-style
model (TinyLlama's shape: hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP 5632,
vocabulary 32000, untied), bf16, packed batches of 8K and 32K tokens, attention by torch
SDPA per packed sequence (flash kernels), the logprob path in chunks of tokens.

Per batch size: tokens/s of full train steps (forward, backward, Adam) after warm-up, and
model FLOPs utilisation

    MFU = model FLOPs per step / step time / peak FLOP/s
    model FLOPs per step = 6 * N * tokens + 6 * layers * hidden * sum_i s_i^2

(N: parameters, the output layer included; the second term is causal attention, QK^T and
AV, forward and backward, over the packed sequences of lengths s_i). The peak is measured
on the device (the best bf16 GEMM rate of a few large square matrix products); the
datasheet peak is reported beside it where the device is known.

Runs as one process (TP=1) or under torchrun with --tp/--pp/--cp. Needs a CUDA GPU and
megatron-core; without a GPU it says so and exits with code 2.

    python bench/gpu_train_step.py [--tokens 8192 32768] [--steps 5] [--quick]
    torchrun --nproc-per-node 2 bench/gpu_train_step.py --tp 2
    torchrun --nproc-per-node 2 bench/gpu_train_step.py --cp 2 --tokens 32768 65536

Prints a line per batch size and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimi_rl.config import AlgoConfig, BackendConfig  # noqa: E402
from kimi_rl.policy.packing import pack  # noqa: E402

MODEL = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
             tie_word_embeddings=False, max_position_embeddings=32768)
QUICK = dict(MODEL, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408)
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def measured_peak(dtype=torch.bfloat16, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def batch(tokens: int, seq_len: int, vocab: int, seed: int):
    """Sequences of `seq_len` tokens (prompt of 64) packed into rows of `tokens`."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, tokens // seq_len)
    prompts = [torch.randint(0, vocab, (64,), generator=g).tolist() for _ in range(n)]
    resps = [torch.randint(0, vocab, (seq_len - 64,), generator=g).tolist() for _ in range(n)]
    return pack(prompts, resps, tokens, row_tokens=tokens), [seq_len] * n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per packed sequence")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1, help="backend.context_parallel")
    ap.add_argument("--chunk", type=int, default=1024, help="backend.logits_chunk")
    ap.add_argument("--quick", action="store_true", help="a 4-layer model, 2 steps")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        msg = "bench/gpu_train_step.py needs a CUDA GPU (none is visible); nothing was measured"
        print(msg, file=sys.stderr)
        print(json.dumps({"error": msg}))
        sys.exit(2)
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kimi_rl.policy.megatron import MegatronPolicy

    shape = QUICK if args.quick else MODEL
    steps = 2 if args.quick else args.steps
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in hf.parameters())
    backend = BackendConfig(name="megatron", tensor_parallel=args.tp,
                            pipeline_parallel=args.pp, context_parallel=args.cp,
                            logits_chunk=args.chunk,
                            sequence_parallel=args.tp > 1, micro_batch_tokens=max(args.tokens))
    policy = MegatronPolicy(hf, backend, AlgoConfig(lr=1e-5), seed=0)
    peak = measured_peak()
    name = torch.cuda.get_device_name()
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)

    def loss_fn(lp, pb):
        loss = -lp.mean()
        return loss, {"loss/nll": float(loss)}

    results = []
    for tokens in args.tokens:
        micro, lengths = batch(tokens, min(args.seq_len, tokens), shape["vocab_size"], 0)
        flops = (6 * n_params * sum(lengths)
                 + 6 * shape["num_hidden_layers"] * shape["hidden_size"]
                 * sum(s * s for s in lengths))
        policy.train_step(micro, loss_fn)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        for _ in range(steps):
            policy.train_step(micro, loss_fn)
        torch.cuda.synchronize()
        step = (time.perf_counter() - t) / steps
        world = torch.distributed.get_world_size()
        r = {"tokens": tokens, "sequences": len(lengths), "seq_len": lengths[0],
             "step_seconds": round(step, 4), "tokens_per_s": round(sum(lengths) / step, 1),
             "tokens_per_s_per_gpu": round(sum(lengths) / step / world, 1),
             "mfu_vs_measured_peak": round(flops / step / world / peak, 4),
             "mfu_vs_datasheet": round(flops / step / world / sheet, 4) if sheet else None,
             "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}
        results.append(r)
        print(f"{tokens} tokens: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu_vs_measured_peak']:.3f}"
              f" (of measured peak {peak / 1e12:.0f} TFLOP/s)", file=sys.stderr)
    out = {"device": name, "params": n_params, "dtype": "bfloat16", "tp": args.tp,
           "pp": args.pp, "cp": args.cp, "attention": "torch SDPA per packed sequence",
           "measured_peak_tflops": round(peak / 1e12, 1),
           "datasheet_peak_tflops": sheet / 1e12 if sheet else None, "results": results}
    if torch.distributed.get_rank() == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
