"""Run under torchrun (or alone): the megatron backend against the hf backend on the same
weights, at the TP/PP given on the command line. Writes a JSON report (rank 0) of the
largest relative differences; tests/test_megatron.py asserts on it.

    torchrun --nproc-per-node 2 tests/megatron/parallel_checks.py --tp 2 --out r.json \
        [--save DIR]   # also a sharded checkpoint and the HF weights it holds (DIR.pt)
        [--load DIR]   # only: load such a checkpoint here, compare with DIR.pt
    torchrun --nproc-per-node 2 tests/megatron/parallel_checks.py --layouts tp2,pp2,dp \
        --out r.json   # several layouts in one launch: {"tp2": report, ...}; --save
                       # applies to the first

Checks, each on a tied Llama (GQA) and an untied Qwen2 (q/k/v bias):
- logprobs and entropies of packed batches (sequences of several lengths, 2 rows);
- gradients of a loss over several micro-batches of different shapes (accumulated), with
  pad tokens among the inputs;
- one optimizer step (Adam), then the exported weights;
- the export before training reproduces the HF weights exactly;
- with --tp > 1 also sequence parallel;
- with neither --tp nor --pp, the two processes are data parallel (DP=2);
- layout cp2: context parallel (CP=2), each rank's attention on half of the padded tokens.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import torch
import torch.distributed as dist

from kimi_rl.config import AlgoConfig, BackendConfig, ModelConfig
from kimi_rl.data import modsum
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.policy.context_parallel import cp_shard
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.megatron import MegatronPolicy
from kimi_rl.policy.model import tiny_model
from kimi_rl.policy.packing import pack

MODELS = {
    "llama": ModelConfig(arch="llama", hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, tie_word_embeddings=True),
    "qwen2": ModelConfig(arch="qwen2", hidden_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=64, tie_word_embeddings=False),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def batches(vocab: int, seed: int, max_tokens: int) -> list:
    """Packed micro-batches of random sequences: two packings of different row lengths, so
    the micro-batches differ in shape."""
    g = torch.Generator().manual_seed(seed)
    lens = [(3, 7), (5, 2), (4, 9), (6, 5), (2, 13), (7, 3), (2, 2)]
    prompts = [torch.randint(1, vocab, (p,), generator=g).tolist() for p, _ in lens]
    resps = [torch.randint(1, vocab, (r,), generator=g).tolist() for _, r in lens]
    # a sampled pad token (id 0, the HF embedding's padding_idx): the input of the next
    # position, whose lookup gives that row no gradient in HF
    resps[2][3] = resps[4][1] = 0
    return (pack(prompts[:4], resps[:4], max_tokens)
            + pack(prompts[4:], resps[4:], 2 * max_tokens))


def hf_model(name: str, tokenizer):
    model = tiny_model(MODELS[name], tokenizer, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # peaked, varied distributions (the default init is near uniform)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def loss_fn(lp, pb):
    w = torch.cos(torch.arange(lp.numel(), dtype=lp.dtype)) + pb.seq_index.to(lp.dtype)
    loss = (w * lp).sum() / 17.0 + 0.1 * (lp ** 2).sum() / 17.0
    return loss, {"loss/test": float(loss)}


def count_calls(policy) -> tuple[dict[str, int], list[int]]:
    """Forward calls of the first layer's core attention and MLP on this rank (a module
    recomputed in backward runs again), and the query tokens of each attention call."""
    layer = policy.gpt.decoder.layers[0]
    calls = {"core_attention": 0, "mlp": 0}
    queries: list[int] = []
    for key, module in (("core_attention", layer.self_attention.core_attention),
                        ("mlp", layer.mlp)):
        module.register_forward_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    layer.self_attention.core_attention.register_forward_hook(
        lambda m, args, out: queries.append(args[0].shape[0] * args[0].shape[1]))
    return calls, queries


def compare(name: str, tp: int, pp: int, sequence_parallel: bool, tokenizer,
            recompute: str | None = None, cp: int = 1) -> dict:
    ref = hf_model(name, tokenizer)
    algo = AlgoConfig(lr=1e-3, grad_clip=1e9)
    backend = BackendConfig(name="megatron", tensor_parallel=tp, pipeline_parallel=pp,
                            context_parallel=cp, sequence_parallel=sequence_parallel,
                            logits_chunk=5, micro_batch_tokens=16, recompute=recompute)
    mp = MegatronPolicy(copy.deepcopy(ref), backend, algo, seed=0)
    hp = HFPolicy(ref, BackendConfig(logits_chunk=5), algo)
    out = {}
    exported = {k: v.clone() for k, v in mp.export_weights()}  # the next export overwrites
    out["export_peak_fraction"] = mp.export_peak_bytes / sum(
        t.numel() * t.element_size() for t in exported.values())
    out["export_exact"] = all(torch.equal(exported[k], v) for k, v in ref.state_dict().items()
                              if k in exported)
    out["export_names"] = sorted(set(ref.state_dict()) - set(exported))
    lp_err = ent_err = 0.0
    for pb in batches(len(tokenizer), 0, 40):
        a, ea = mp.logprobs(pb, temperature=0.7)
        b, eb = hp.logprobs(pb, temperature=0.7)
        lp_err, ent_err = max(lp_err, rel(a, b)), max(ent_err, rel(ea, eb))
    out["logprobs"], out["entropy"] = lp_err, ent_err
    micro = batches(len(tokenizer), 1, 16)  # several micro-batches of different shapes
    out["micro_batches"] = " ".join("x".join(map(str, pb.input_ids.shape)) for pb in micro)
    # with DP (or CP) > 1 the distributed optimizer leaves each rank only its shard of
    # the gradients: they are checked with the plain optimizer, the step with both
    gp = mp if mp.dp * mp.cp == 1 else MegatronPolicy(
        copy.deepcopy(ref), dataclasses.replace(backend, distributed_optimizer=False), algo)
    calls, queries = count_calls(gp)
    metrics = gp.forward_backward(micro, loss_fn)
    # forward calls per micro-batch (this rank's share): 1, or 2 where recomputed
    out["calls_per_micro_batch"] = {k: v / -(-len(micro) // gp.dp) for k, v in calls.items()}
    out["attention_queries"] = sum(queries)  # this rank's, over its micro-batches
    out["batch_tokens"] = sum(pb.input_ids.numel() for pb in micro)
    if cp > 1:  # the padded THD rows' tokens, each rank's expected share
        out["cp_share"] = sum(cp_shard(pb.input_ids, pb.position_ids, pb.sources, pb.targets,
                                       cp, 0).layout.total for pb in micro) / cp
    grads = gp.grads_hf()
    ref.zero_grad()
    ref.train()
    hf_loss = 0.0
    for pb in micro:
        lp, _ = hp._forward(pb, 1.0)
        loss, _ = loss_fn(lp, pb)
        loss.backward()
        hf_loss += float(loss)
    out["loss"] = abs(metrics["loss/test"] - hf_loss) / abs(hf_loss)
    out["grads"] = max(rel(grads[k], p.grad) for k, p in ref.named_parameters())
    m_step = mp.train_step(micro, loss_fn)
    h_step = hp.train_step(micro, loss_fn)
    out["grad_norm"] = abs(m_step["grad_norm"] - h_step["grad_norm"]) / h_step["grad_norm"]
    after = dict(mp.export_weights())
    out["step_weights"] = max(rel(after[k], p.detach()) for k, p in ref.named_parameters())
    out["moved"] = max(rel(after[k], exported[k]) for k in after)
    return out


def padded_vocab() -> dict:
    """vocab_parallel_token_logprobs alone, on a vocabulary of 45 padded to 46 over TP
    ranks (the padded row filled with garbage): against log_softmax in float64."""
    from megatron.core import parallel_state as ps

    from kimi_rl.policy.megatron import vocab_parallel_token_logprobs

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(37, 16, generator=g), torch.randn(45, 16, generator=g) * 0.5
    targets = torch.randint(0, 45, (37,), generator=g)
    padded = torch.cat([w, torch.full((46 - 45 if tp > 1 else 0, 16), 9.0)])
    rows = padded.shape[0] // tp
    hl = h.clone().requires_grad_()
    wl = padded[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    lp, ent = vocab_parallel_token_logprobs(hl, wl, targets, vocab_start=rank * rows,
                                            vocab_size=45, chunk=8, temperature=0.9,
                                            group=ps.get_tensor_model_parallel_group())
    (lp * torch.arange(37.0)).sum().backward()
    dist.all_reduce(hl.grad, group=ps.get_tensor_model_parallel_group())  # ranks' shares
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    full = torch.log_softmax(h64 @ w64.T / 0.9, dim=-1)
    ref = full.gather(-1, targets[:, None])[:, 0]
    (ref * torch.arange(37.0, dtype=torch.float64)).sum().backward()
    wgrad = torch.cat([w64.grad, torch.zeros(46 - 45 if tp > 1 else 0, 16, dtype=torch.float64)])
    return {"rows_per_rank": rows, "logprobs": rel(lp.double(), ref),
            "entropy": rel(ent.double(), -(full.exp() * full).sum(-1)),
            "grad_h": rel(hl.grad.double(), h64.grad),
            "grad_w": rel(wl.grad.double(), wgrad[rank * rows:(rank + 1) * rows])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--save", default=None)
    ap.add_argument("--load", default=None)
    ap.add_argument("--layouts", default=None, help="tpN, ppN or dp, comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = char_tokenizer(modsum.vocabulary())
    report = {}
    if args.load:  # resharding: a checkpoint written at another TP/PP
        backend = BackendConfig(name="megatron", tensor_parallel=args.tp,
                                pipeline_parallel=args.pp, micro_batch_tokens=16)
        mp = MegatronPolicy(tiny_model(MODELS["qwen2"], tokenizer, seed=9), backend,
                            AlgoConfig(lr=1e-2), seed=0)
        mp.load_sharded(args.load)
        saved = torch.load(args.load + ".pt")
        loaded = dict(mp.export_weights())
        report["load"] = max(rel(loaded[k], v) for k, v in saved["weights"].items())
        report["load_names"] = sorted(set(saved["weights"]) ^ set(loaded))
        mp.train_step(batches(len(tokenizer), 3, 16), loss_fn)  # from the loaded Adam state
        after = dict(mp.export_weights())
        report["step_after_load"] = max(rel(t, saved["next"][k]) for k, t in after.items())
        report["step_moved"] = max(rel(t, saved["weights"][k]) for k, t in after.items())
        mp.reset_optimizer()  # the same step from fresh moments lands elsewhere
        mp.load_sharded(args.load)
        for opt in mp._inner_optimizers():
            opt.state.clear()
        mp.train_step(batches(len(tokenizer), 3, 16), loss_fn)
        report["step_fresh_adam"] = max(rel(t, saved["next"][k])
                                        for k, t in mp.export_weights())
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        return
    if args.layouts:
        from megatron.core import parallel_state as ps

        for i, layout in enumerate(args.layouts.split(",")):
            tp = int(layout[2:]) if layout.startswith("tp") else 1
            pp = int(layout[2:]) if layout.startswith("pp") else 1
            cp = int(layout[2:]) if layout.startswith("cp") else 1
            refused = None
            if i:  # a policy of another layout than the live one is refused, by name
                try:
                    MegatronPolicy(hf_model("llama", tokenizer), BackendConfig(
                        name="megatron", tensor_parallel=tp, pipeline_parallel=pp,
                        context_parallel=cp), AlgoConfig(), seed=0)
                    refused = False
                except ValueError as e:
                    refused = "already" in str(e)
            ps.destroy_model_parallel()  # the next policy initialises its own layout
            if cp > 1:
                report[layout] = {name: compare(name, 1, 1, False, tokenizer, cp=cp)
                                  for name in MODELS}
            else:
                report[layout] = layout_report(tp, pp, args.save if i == 0 else None, tokenizer)
            report[layout]["other_layout_refused"] = refused
    else:
        report = layout_report(args.tp, args.pp, args.save, tokenizer)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


def layout_report(tp: int, pp: int, save: str | None, tokenizer) -> dict:
    report = {name: compare(name, tp, pp, False, tokenizer) for name in MODELS}
    report["padded_vocab"] = padded_vocab()
    if tp > 1:
        report["llama_sequence_parallel"] = compare("llama", tp, pp, True, tokenizer)
        for mode in ("selective", "full"):
            report[f"llama_recompute_{mode}"] = compare("llama", tp, pp, False, tokenizer, mode)
    if save:
        ref = hf_model("qwen2", tokenizer)
        backend = BackendConfig(name="megatron", tensor_parallel=tp, pipeline_parallel=pp,
                                micro_batch_tokens=16)
        mp = MegatronPolicy(ref, backend, AlgoConfig(lr=1e-2), seed=0)
        mp.train_step(batches(len(tokenizer), 2, 16), loss_fn)  # weights and Adam state move
        weights = {k: v.clone() for k, v in mp.export_weights()}
        mp.save_sharded(save)
        mp.train_step(batches(len(tokenizer), 3, 16), loss_fn)  # what a resumed run must do
        after = dict(mp.export_weights())
        if dist.get_rank() == 0:
            torch.save({"weights": weights, "next": after}, save + ".pt")
    return report


if __name__ == "__main__":
    main()
