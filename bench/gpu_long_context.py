"""Long packed rows on a GPU, hf backend: a ~0.5B Llama-shaped model (Qwen2.5-0.5B's
shape without its biases: hidden 896, 24 layers, 14 heads, 2 key/value heads, MLP 4864,
vocabulary 151936, tied embeddings; 0.49B parameters) trained in bfloat16 autocast with
float32 master weights (`backend.autocast=bfloat16`, the product's mixed precision),
gradient checkpointing on (`backend.gradient_checkpointing`).

Per row length L (8K, 16K, 32K): one packed row of five sequences (L/2 and four of L/8,
prompts of 64 tokens, attention per sequence: kimi_rl/attention.py, `packed_attention`,
flash-attn's varlen kernel where it is installed, else torch SDPA per sequence) and the
same row as one sequence of L tokens. Each case: train steps (forward, backward, AdamW)
after a warm-up step; step seconds, tokens/s, peak extra GPU memory (max allocated during
the steps minus what was allocated before them), and model FLOPs utilisation

    MFU = model FLOPs per step / step time / peak FLOP/s
    model FLOPs per step = 6 * N * tokens + 6 * layers * hidden * sum_i s_i^2

(N: the parameters that multiply, i.e. without the embedding lookup but with the output
layer; the second term is causal attention, QK^T and AV, forward and backward, over the
sequences of lengths s_i; recomputation by checkpointing is not counted). The peak is the
best bfloat16 GEMM rate of a few large square matrix products on the device.

Correctness, on the same device and precision:
- `attention`: `packed_attention` on random queries/keys/values of a packed row (GQA,
  shared prompts off and on) against torch SDPA per sequence: outputs and input gradients,
  largest difference relative to the reference's largest magnitude (float32 and bfloat16);
- `logprobs`: the packed row's per-token logprobs through the model against each of its
  sequences run alone (largest absolute difference).

    python bench/gpu_long_context.py [--lengths 8192 16384 32768] [--steps 3]
    python bench/gpu_long_context.py --quick --device cpu   # a smoke run: tiny model, 1K rows

Without a CUDA device (and without --device cpu) it says so and exits with code 2. Prints a
line per case (stderr) and a final JSON line: train (case -> step_seconds, tokens_per_s,
mfu, peak_extra_mib), packed_vs_single_time (L -> packed step / single-sequence step),
attention_max_rel_diff (and attention_within_tolerance: float32 1e-5, bfloat16 2e-2),
logprobs_max_abs_diff, device, measured_peak_tflops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_train_step  # noqa: E402

from kimi_rl.attention import Segments, packed_attention  # noqa: E402
from kimi_rl.config import AlgoConfig, BackendConfig  # noqa: E402
from kimi_rl.policy.hf import HFPolicy  # noqa: E402
from kimi_rl.policy.packing import pack  # noqa: E402

MODEL = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
             tie_word_embeddings=True, max_position_embeddings=32768 + 1, rope_theta=1e6)
QUICK = dict(MODEL, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=256, vocab_size=512)
PROMPT = 64
# packed attention against the float64 per-sequence reference, relative to its largest value
ATTENTION_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_peak(device: torch.device) -> float | None:
    """The device's best bfloat16 GEMM FLOP/s (gpu_train_step.py's measurement; None off
    CUDA)."""
    return gpu_train_step.measured_peak() if device.type == "cuda" else None


def row(lengths: list[int], vocab: int, seed: int):
    """One packed row of random sequences of `lengths` (prompts of PROMPT tokens, at most
    half the sequence)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
    prompts = [s[:min(PROMPT, len(s) // 2)] for s in seqs]
    responses = [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]
    (batch,) = pack(prompts, responses, max_tokens=sum(lengths), row_tokens=sum(lengths))
    return batch, prompts, responses


def attention_check(device: torch.device, dtype: torch.dtype, shared: bool, L: int = 1024,
                    seed: int = 0) -> float:
    """Largest |packed - per-sequence reference| over outputs and q/k/v gradients,
    relative to the reference's largest magnitude. Rows of 1 to 5 segments; with `shared`,
    segments 1-2 of row 0 are responses that also see segment 0 (their prompt)."""
    g = torch.Generator().manual_seed(seed)
    H, KV, D = 8, 2, 64
    rows = [[L], [L // 2, L // 4, L // 8, L // 8], [L // 4, L // 4, L // 2]]
    cu, prefix = [0], []
    for r, lengths in enumerate(rows):
        for i, n in enumerate(lengths):
            cu.append(cu[-1] + n)
            prefix.append(len(cu) - 3 if shared and r == 2 and i > 0 else -1)
    q, k, v = (torch.randn(len(rows), h, L, D, generator=g).to(device, dtype).requires_grad_()
               for h in (H, KV, KV))
    seg = Segments(torch.tensor(cu, dtype=torch.int32),
                   torch.tensor(prefix) if shared else None)
    out = packed_attention(q, k, v, seg, None)
    dout = torch.randn(out.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.zeros(len(rows), L, H, D, dtype=torch.float64, device=device)
    parts = []
    for s, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
        r, a0, b0 = a // L, a % L, (b - 1) % L + 1
        ks, vs = kr[r:r + 1, :, a0:b0], vr[r:r + 1, :, a0:b0]
        mask = None
        if prefix and prefix[s] >= 0:
            pa, pb = cu[prefix[s]] % L, (cu[prefix[s] + 1] - 1) % L + 1
            ks = torch.cat([kr[r:r + 1, :, pa:pb], ks], 2)
            vs = torch.cat([vr[r:r + 1, :, pa:pb], vs], 2)
            n, p = b0 - a0, pb - pa
            mask = torch.arange(p + n, device=device) <= p + torch.arange(n, device=device)[:, None]
        o = F.scaled_dot_product_attention(qr[r:r + 1, :, a0:b0], ks, vs, attn_mask=mask,
                                           is_causal=mask is None, enable_gqa=True)
        parts.append((r, a0, b0, o[0].transpose(0, 1)))
    for r, a0, b0, o in parts:
        ref = ref.index_put((torch.tensor([r], device=device),
                             torch.arange(a0, b0, device=device)), o)
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), dout.double())
    worst = 0.0
    for x, y in zip((out, *grads), (ref, *ref_grads), strict=True):
        worst = max(worst, float((x.detach().double() - y.detach()).abs().max()
                                 / y.detach().abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per case")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="backend.gradient_checkpointing off")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--autocast", default="bfloat16", choices=["bfloat16", "none"],
                    help="backend.autocast of the train steps and logprobs")
    ap.add_argument("--quick", action="store_true",
                    help="a 2-layer model, rows of 256 and 512, one step")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = "bench/gpu_long_context.py needs a CUDA GPU (none is visible); nothing was measured"
        print(msg, file=sys.stderr)
        print(json.dumps({"error": msg}))
        sys.exit(2)
    device = torch.device(args.device)
    shape = QUICK if args.quick else MODEL
    if args.quick:
        args.lengths, args.steps = [256, 512], 1
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kimi_rl.attention import _flash_varlen

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.float32)
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    embedding = model.get_input_embeddings().weight.numel()
    n_mult = sum(p.numel() for p in model.parameters()) - embedding + shape["vocab_size"] * hidden
    autocast = None if args.autocast == "none" else args.autocast
    backend = BackendConfig(autocast=autocast, micro_batch_tokens=max(args.lengths),
                            gradient_checkpointing=not args.no_checkpointing, logits_chunk=4096)
    policy = HFPolicy(model, backend, AlgoConfig(lr=1e-5))
    if not policy.segments:
        raise SystemExit("the model does not use kimi-rl's packed attention")
    kernel = ("flash-attn varlen" if device.type == "cuda" and _flash_varlen() is not None
              else "torch SDPA per sequence")
    peak = measured_peak(device)

    def loss_fn(lp, mb):
        loss = -lp.mean()
        return loss, {"loss/nll": float(loss.detach())}

    train, ratio = {}, {}
    for L in args.lengths:
        for case, lengths in (("packed", [L // 2] + [L // 8] * 4), ("single", [L])):
            batch = row(lengths, shape["vocab_size"], 0)[0]
            policy.train_step([batch], loss_fn)  # warm-up (and the optimizer's state)
            sync(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(args.steps):
                policy.train_step([batch], loss_fn)
            sync(device)
            step = (time.perf_counter() - t) / args.steps
            flops = 6 * n_mult * L + 6 * layers * hidden * sum(s * s for s in lengths)
            r = {"sequences": lengths, "step_seconds": round(step, 4),
                 "tokens_per_s": round(L / step, 1),
                 "mfu": round(flops / step / peak, 4) if peak else None,
                 "peak_extra_mib": (round((torch.cuda.max_memory_allocated() - before) / 2 ** 20)
                                    if device.type == "cuda" else None)}
            train[f"{L}/{case}"] = r
            print(f"train {L} {case}: {r}", file=sys.stderr, flush=True)
        ratio[L] = round(train[f"{L}/packed"]["step_seconds"]
                         / train[f"{L}/single"]["step_seconds"], 3)

    attention = {}
    for dtype in (torch.float32, torch.bfloat16):
        for shared in (False, True):
            key = f"{str(dtype).split('.')[-1]}{'/shared_prompts' if shared else ''}"
            attention[key] = attention_check(device, dtype, shared, 256 if args.quick else 1024)
    print(f"packed attention vs per-sequence SDPA (max rel. diff): {attention}",
          file=sys.stderr, flush=True)

    L = min(args.lengths)  # the model's logprobs: packed row against each sequence alone
    batch, prompts, responses = row([L // 2] + [L // 8] * 4, shape["vocab_size"], 1)
    packed_lp = policy.logprobs(batch)[0].float().cpu()
    logprob_diff = 0.0
    for j, i in enumerate(batch.seq_ids):
        (b,) = pack([prompts[i]], [responses[i]], max_tokens=len(prompts[i]) + len(responses[i]))
        alone = policy.logprobs(b)[0].float().cpu()
        diff = (packed_lp[batch.seq_index == j] - alone).abs().max()
        logprob_diff = max(logprob_diff, float(diff))
    print(f"logprobs, packed row vs sequences alone (max abs diff, autocast {autocast}): "
          f"{logprob_diff:.3g}", file=sys.stderr, flush=True)

    print(json.dumps({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
        "autocast": autocast, "gradient_checkpointing": backend.gradient_checkpointing,
        "attention_kernel": kernel,
        "measured_peak_tflops": round(peak / 1e12, 1) if peak else None,
        "train": train, "packed_vs_single_time": ratio,
        "attention_max_rel_diff": attention, "logprobs_max_abs_diff": logprob_diff,
        "attention_within_tolerance": all(
            v <= ATTENTION_TOLERANCE[k.split("/")[0]] for k, v in attention.items())}))


if __name__ == "__main__":
    main()
