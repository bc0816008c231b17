"""Run under torchrun: the hf backend data parallel with FSDP2 against the same backend in
one process, on the same weights. Writes a JSON report (rank 0) of the largest relative
differences; tests/test_fsdp.py asserts on it.

    torchrun --nproc-per-node 2 tests/fsdp/dp_checks.py --out r.json

Each rank builds the one-process reference (an HFPolicy that is not data parallel trains
alone), then the FSDP policy from the same weights. Checks, on a tied Llama (GQA), an
untied Qwen2 (q/k/v bias), and the Llama with gradient checkpointing and bfloat16
autocast:
- logprobs and entropies of packed batches, one at a time and several at once
  (`logprobs_many`: each rank runs half the forwards);
- one train step over five micro-batches of different shapes (three on rank 0, two on rank
  1): the loss metric, the whole gradients (summed over ranks), the gradient norm, and
  the exported weights after the Adam step;
- the checkpoint state (state_dict): the same keys and values as the reference's, model
  and optimizer, so a run resumes at another world size; and the reference's state loaded
  into a fresh FSDP policy takes the same next step as the reference.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "megatron"))
from parallel_checks import MODELS, batches, hf_model, loss_fn, rel  # noqa: E402

from kimi_rl.config import AlgoConfig, BackendConfig  # noqa: E402
from kimi_rl.data import modsum  # noqa: E402
from kimi_rl.data.tokenizer import char_tokenizer  # noqa: E402
from kimi_rl.policy.hf import HFPolicy  # noqa: E402


def flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested state dict, by path."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def compare(name: str, ref_policy: HFPolicy, tokenizer) -> dict:
    backend, algo = ref_policy.cfg, ref_policy.algo
    dp = HFPolicy(copy.deepcopy(ref_policy.model), backend, algo, data_parallel=True)
    out = {"world": dp.world}
    lp_err = ent_err = 0.0
    for pb in batches(len(tokenizer), 0, 40):
        a, ea = dp.logprobs(pb, temperature=0.7)
        b, eb = ref_policy.logprobs(pb, temperature=0.7)
        lp_err, ent_err = max(lp_err, rel(a, b)), max(ent_err, rel(ea, eb))
    out["logprobs"], out["entropy"] = lp_err, ent_err
    # several batches at once: each rank computes its share, every rank gets them all
    many = batches(len(tokenizer), 0, 40) + batches(len(tokenizer), 5, 16)
    forwards, inner = [], dp._forward
    dp._forward = lambda *a: forwards.append(1) or inner(*a)
    got = dp.logprobs_many(many, temperature=0.7)
    del dp._forward
    out["many_batches"], out["many_forwards"] = len(many), len(forwards)
    out["many"] = max(max(rel(a, b), rel(ea, eb)) for (a, ea), (b, eb) in zip(
        got, (ref_policy.logprobs(pb, temperature=0.7) for pb in many), strict=True))
    micro = batches(len(tokenizer), 1, 16)
    out["micro_batches"] = len(micro)
    m_dp = dp.train_step(micro, loss_fn)
    m_ref = ref_policy.train_step(micro, loss_fn)
    out["loss"] = abs(m_dp["loss/test"] - m_ref["loss/test"]) / abs(m_ref["loss/test"])
    out["entropy_metric"] = abs(m_dp["entropy"] - m_ref["entropy"]) / m_ref["entropy"]
    out["grad_norm"] = abs(m_dp["grad_norm"] - m_ref["grad_norm"]) / m_ref["grad_norm"]
    grads, ref_grads = dp.grads(), ref_policy.grads()
    out["grad_names"] = sorted(set(grads) ^ set(ref_grads))
    out["grads"] = max(rel(grads[k], ref_grads[k]) for k in ref_grads)
    after = dict(dp.export_weights())
    out["step_weights"] = max(rel(after[k], v) for k, v in ref_policy.model.state_dict().items())
    out["plain_model_refreshed"] = max(rel(dict(dp.model.named_parameters())[k], p)
                                       for k, p in ref_policy.model.named_parameters())
    # checkpoints: the same state whatever the world size
    sd_dp, sd_ref = flat(dp.state_dict()), flat(ref_policy.state_dict())
    if dist.get_rank() == 0:
        out["state_names"] = sorted(set(sd_dp) ^ set(sd_ref))
        out["state"] = max(rel(sd_dp[k], v) if v.is_floating_point() and v.numel() > 1
                           else float((sd_dp[k].float() - v.float()).abs().max())
                           for k, v in sd_ref.items())
        out["state_tensors"] = len(sd_ref)
    # the reference's checkpoint into a fresh FSDP policy: the same next step
    fresh = HFPolicy(hf_model(name, tokenizer), backend, algo,  # other weights until loaded
                     data_parallel=True)
    # (a copy: a checkpoint comes from a file; the reference's state dict holds its tensors)
    fresh.load_state_dict(copy.deepcopy(ref_policy.state_dict()))
    out["load"] = max(rel(t, ref_policy.model.state_dict()[k])
                      for k, t in fresh.export_weights())
    nxt = batches(len(tokenizer), 4, 16)
    fresh.train_step(nxt, loss_fn)
    ref_policy.train_step(nxt, loss_fn)
    loaded = dict(fresh.export_weights())
    out["step_after_load"] = max(rel(loaded[k], v)
                                 for k, v in ref_policy.model.state_dict().items())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizer = char_tokenizer(modsum.vocabulary())
    algo = AlgoConfig(lr=1e-3, grad_clip=1e9)
    backend = BackendConfig(logits_chunk=5)
    dist.init_process_group("gloo")
    # the one-process references (each rank trains its own copy alone); the last with
    # gradient checkpointing and bfloat16 autocast, which FSDP must compose with
    refs = {name: HFPolicy(hf_model(name, tokenizer), backend, algo) for name in MODELS}
    refs["llama_checkpointing_bf16"] = HFPolicy(
        hf_model("llama", tokenizer), dataclasses.replace(
            backend, gradient_checkpointing=True, autocast="bfloat16"), algo)
    report = {name: compare(name.split("_")[0], ref, tokenizer) for name, ref in refs.items()}
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
