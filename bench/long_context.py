"""Long rows on the demo-size model (hidden 128, 4 layers, 4 heads; conf/model/tiny.yaml):
train-step peak extra memory and time of the hf backend for rows of 8K, 16K and 32K
tokens, and decode speed of the torch rollout engine at contexts of 1K to 32K.

Train cases, per row length L, each one optimizer step in a fresh subprocess (float32, one
thread): `single` (one sequence of L tokens), `packed` (one row of five sequences: L/2 and
four of L/8, attention per sequence: kimi_rl/attention.py) and `half`/`eighth` (one of
those sequences alone; "alone" is half + 4 x eighth, the time the packed row's sequences
take trained one by one). Peak extra memory: the process's peak resident memory during
the step minus what it held just before (model, optimizer state not yet allocated, the
batch). Decode: a batch of 2 prompts of the context's length, prefilled, then a few
greedy decode steps; tokens/s counts the decode steps only (each step timed), and the
peak resident memory after generation shows the KV cache's growth.

    python bench/long_context.py [--lengths 8192 16384 32768] [--contexts 1024 ... 32768]
                                 [--decode-steps 8] [--quick]

Prints a progress line per case (stderr) and a final JSON line: train_peak_extra_mib (row length ->
MiB, packed case), train_peak_extra_mib_by_case, train_seconds (per case),
packed_vs_alone_time (row length -> packed time / its sequences alone, timed interleaved in
one process: `ratio_case`), packed_vs_alone_time_separate_processes (the same from the
per-case processes' single steps),
decode_tokens_per_s (context -> tokens/s), decode_rss_mib (context -> MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2 ** 20


def _model(max_len: int):
    import torch

    from kimi_rl.config import ModelConfig
    from kimi_rl.data import modsum
    from kimi_rl.data.tokenizer import char_tokenizer
    from kimi_rl.policy.model import tiny_model

    torch.set_num_threads(1)
    tok = char_tokenizer(modsum.vocabulary())
    model = tiny_model(ModelConfig(max_position_embeddings=max_len), tok, seed=0)
    return model, tok


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _row(tok, lengths: list[int], gen):
    """One packed row of random sequences of `lengths` (prompt: the first 64 tokens of
    each); (batch, prompts, responses)."""
    import torch

    from kimi_rl.policy.packing import pack

    seqs = [torch.randint(4, len(tok), (n,), generator=gen).tolist() for n in lengths]
    prompts, responses = [s[:64] for s in seqs], [s[64:] for s in seqs]
    (batch,) = pack(prompts, responses, max_tokens=sum(lengths), row_tokens=sum(lengths))
    return batch, prompts, responses


def train_case(lengths: list[int]) -> dict:
    """One train step on one row holding sequences of `lengths` (prompt 64 tokens each)."""
    import torch

    from kimi_rl.config import AlgoConfig, BackendConfig
    from kimi_rl.policy.hf import HFPolicy
    from kimi_rl.policy.packing import pack

    model, tok = _model(max(lengths) + 1)
    gen = torch.Generator().manual_seed(0)
    batch, prompts, responses = _row(tok, lengths, gen)
    policy = HFPolicy(model, BackendConfig(), AlgoConfig(lr=1e-4))
    n = batch.target_index.numel()
    loss = lambda lp, mb: (-lp.sum() / n, {})  # noqa: E731
    # warm up kernels and allocate the optimizer state on a short row first
    (small,) = pack([prompts[0][:8]], [responses[0][:56]], max_tokens=64)
    policy.train_step([small], loss)
    before = _peak_mib()
    t = time.perf_counter()
    policy.train_step([batch], loss)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_extra_mib": _peak_mib() - before, "rss_mib": _peak_mib()}


def ratio_case(length: int, rounds: int) -> dict:
    """Packed row against its sequences alone, timed in one process, interleaved: per round
    one step of the packed row (L/2 + 4 x L/8), one of the L/2 sequence alone and one of an
    L/8 sequence alone; the fastest round of each. (The per-case processes above time each
    step once, at whatever load the machine has then.)"""
    import torch

    from kimi_rl.config import AlgoConfig, BackendConfig
    from kimi_rl.policy.hf import HFPolicy

    model, tok = _model(length + 1)
    gen = torch.Generator().manual_seed(0)
    policy = HFPolicy(model, BackendConfig(), AlgoConfig(lr=1e-4))

    rows = {k: _row(tok, lengths, gen)[0] for k, lengths in (
        ("packed", [length // 2] + [length // 8] * 4), ("half", [length // 2]),
        ("eighth", [length // 8]))}

    def step(b):
        n = b.target_index.numel()
        t = time.perf_counter()
        policy.train_step([b], lambda lp, mb: (-lp.sum() / n, {}))
        return time.perf_counter() - t

    step(rows["eighth"])  # warm-up, optimizer state
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(rounds):
        for k, b in rows.items():
            best[k] = min(best[k], step(b))
    alone = best["half"] + 4 * best["eighth"]
    return {"seconds": best, "alone_seconds": alone, "packed_vs_alone": best["packed"] / alone}


def decode_case(context: int, batch: int, steps: int) -> dict:
    """Prefill `batch` prompts of `context` tokens, then `steps` greedy decode steps."""
    import torch

    from kimi_rl.rollout.engine import Request, SamplingParams
    from kimi_rl.rollout.torch_engine import TorchEngine

    model, tok = _model(context + steps + 8)
    gen = torch.Generator().manual_seed(0)
    reqs = [Request(torch.randint(4, len(tok), (context,), generator=gen).tolist())
            for _ in range(batch)]
    engine = TorchEngine(model, eos_token_id=-1, pad_token_id=tok.pad_token_id)
    params = SamplingParams(greedy=True)
    engine.generate(reqs[:1], 2, params)  # warm-up
    decode, times = engine._decode, []

    def timed(*a, **kw):  # each decode step's own time
        t = time.perf_counter()
        out = decode(*a, **kw)
        times.append(time.perf_counter() - t)
        return out

    engine._decode = timed
    t = time.perf_counter()
    engine.generate(reqs, 1 + steps, params)
    total = time.perf_counter() - t
    return {"tokens_per_s": batch * len(times) / sum(times), "decode_steps": len(times),
            "prefill_seconds": total - sum(times), "rss_mib": _peak_mib()}


def _sub(kind: str, arg) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", kind, json.dumps(arg)],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed",
                "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--contexts", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--decode-batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of the packed-vs-alone timing (fastest kept)")
    ap.add_argument("--quick", action="store_true", help="rows of 1K and 2K, contexts 256, 512")
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        kind, arg = args.case[0], json.loads(args.case[1])
        res = (train_case(arg) if kind == "train" else ratio_case(*arg) if kind == "ratio"
               else decode_case(*arg))
        print(json.dumps(res))
        return
    if args.quick:
        args.lengths, args.contexts, args.decode_steps, args.rounds = [1024, 2048], [256, 512], 4, 1
    train: dict[str, dict] = {}
    cases = {"packed": lambda L: [L // 2] + [L // 8] * 4, "half": lambda L: [L // 2],
             "eighth": lambda L: [L // 8], "single": lambda L: [L]}
    for name, of in cases.items():  # the packed rows first: the memory figures
        for L in args.lengths:
            lengths = of(L)
            res = _sub("train", lengths)
            train[f"{L}/{name}"] = res
            print(f"train {L} {name} {lengths}: {res}", file=sys.stderr, flush=True)
    ratio = {}
    for L in args.lengths:
        res = _sub("ratio", [L, args.rounds])
        ratio[L] = res
        print(f"packed vs alone {L}, interleaved: {res}", file=sys.stderr, flush=True)
    decode = {}
    for c in args.contexts:
        res = _sub("decode", [c, args.decode_batch, args.decode_steps])
        decode[c] = res
        print(f"decode context {c}: {res}", file=sys.stderr, flush=True)

    def get(key, field):
        return train.get(key, {}).get(field)

    alone = {}
    for L in args.lengths:
        h, e, p = get(f"{L}/half", "seconds"), get(f"{L}/eighth", "seconds"), \
            get(f"{L}/packed", "seconds")
        alone[L] = round(p / (h + 4 * e), 3) if None not in (h, e, p) else None
    print(json.dumps({
        "train_peak_extra_mib": {L: get(f"{L}/packed", "peak_extra_mib") for L in args.lengths},
        "train_peak_extra_mib_by_case": {k: v.get("peak_extra_mib") for k, v in train.items()},
        "train_seconds": {k: v.get("seconds") for k, v in train.items()},
        "packed_vs_alone_time": {L: ratio[L].get("packed_vs_alone") for L in args.lengths},
        "packed_vs_alone_time_separate_processes": alone,
        "decode_tokens_per_s": {c: v.get("tokens_per_s") for c, v in decode.items()},
        "decode_prefill_seconds": {c: v.get("prefill_seconds") for c, v in decode.items()},
        "decode_rss_mib": {c: v.get("rss_mib") for c, v in decode.items()},
    }))


if __name__ == "__main__":
    main()
