"""Peak memory of the megatron backend's per-token logprobs (forward and backward) at
32K tokens x 152K vocabulary (Qwen2's), computed in chunks of tokens.

The full float32 logits of 32768 tokens x 152064 words would take 18.6 GiB (and their
softmax as much again); the chunked, recomputed path
(`kimi_rl.policy.megatron.vocab_parallel_token_logprobs`, the one the backend runs, here at
TP=1 in a one-process gloo world) holds a few [chunk x vocab] tensors at a time. Measured:
the peak resident memory of this process during one forward + backward, minus what it held
just before (the output layer, the hidden states and their gradients: the model's own
memory). CPU, float32; a GPU would hold the same tensors.

    python bench/logprob_memory.py [--tokens 32768 --vocab 152064 --hidden 128
                                    --chunk 512] [--quick]

Prints one progress line and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import megatron.core.tensor_parallel  # noqa: E402,F401  (imported before measuring)

from kimi_rl.policy.megatron import vocab_parallel_token_logprobs  # noqa: E402

GIB = 2 ** 30


class PeakRSS:
    """Highest resident set size seen while active (sampled every millisecond, and the
    kernel's own high-water mark when it rose during the block)."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.before = self.proc.memory_info().rss
        self.kernel_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak, self.stop = self.before, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if kernel > self.kernel_before:  # the true peak, when it is a new high-water mark
            self.peak = max(self.peak, kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2048 tokens x 32K vocabulary")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.vocab = 2048, 32768
    torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.05).requires_grad_()
    hidden = torch.randn(args.tokens, args.hidden, generator=g).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g)
    weight.grad, hidden.grad = torch.zeros_like(weight), torch.zeros_like(hidden)
    model_bytes = 2 * (weight.numel() + hidden.numel()) * 4
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        lp, ent = vocab_parallel_token_logprobs(
            hidden, weight, targets, vocab_start=0, vocab_size=args.vocab, chunk=args.chunk,
            group=dist.group.WORLD)
        (-lp.mean()).backward()
    seconds = time.perf_counter() - t0
    assert torch.isfinite(lp).all() and torch.isfinite(hidden.grad).all()
    above = (mem.peak - mem.before) / GIB
    result = {
        "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
        "chunk": args.chunk, "dtype": "float32",
        "peak_above_model_gib": round(above, 3),
        "model_and_grads_gib": round(model_bytes / GIB, 3),
        "full_logits_gib": round(args.tokens * args.vocab * 4 / GIB, 2),
        "one_chunk_logits_gib": round(args.chunk * args.vocab * 4 / GIB, 3),
        "under_2_gib": above < 2.0,
        "seconds": round(seconds, 1),
        "mean_logprob": float(lp.detach().mean()), "mean_entropy": float(ent.mean()),
    }
    print(f"{args.tokens} tokens x {args.vocab} vocab, chunk {args.chunk}: peak "
          f"{above:.2f} GiB above the model ({result['full_logits_gib']} GiB of full logits "
          f"avoided), {seconds:.1f} s", file=sys.stderr)
    print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
