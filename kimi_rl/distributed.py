"""The loop under torchrun: process world, rank-0 outputs, checkpoints with a sharded policy.

Every rank runs the whole loop. Sampling, rewards and the replay buffer are computed
identically on every rank (same seeds, same weights, same code). Rollouts are generated
by rollout replicas (rollout.replicas, kimi_rl/rollout/replicas.py): with one, every rank
generates every request and no samples travel between ranks; with more, each replica
generates the share a plan computed identically on every rank gives it, and one
all-gather (`all_gather`) gives every rank the whole batch in the same order.
`check_same` verifies each iteration that the ranks hold the same batch and stops the run
if they diverge. Only the policy backend splits work (TP/PP/DP). Decisions
that depend on a clock or a signal are made once for all ranks (`agree_stop`, `broadcast_int`).
Rank 0 alone writes run outputs (config, TensorBoard, summary, HF model, the non-policy
part of checkpoints); the megatron policy writes its shards from every rank.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint


def init_distributed() -> None:
    """Join the torchrun world (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), or
    make a world of one process; NCCL with CUDA builds of torch, else gloo."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.version.cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(minutes=30)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)


def rank() -> int:
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


_GLOO: list = []


def _cpu_group():
    """A gloo group over the world, for small CPU tensors (the default group may be NCCL);
    created on first use, which every rank reaches at the same point."""
    if dist.get_backend() == "gloo":
        return None
    if not _GLOO:
        _GLOO.append(dist.new_group(backend="gloo"))
    return _GLOO[0]


def check_same(what: str, value) -> None:
    """Raise on every rank if `value` (anything picklable) differs between ranks."""
    if world_size() == 1:
        return
    digest = hashlib.sha256(pickle.dumps(value)).hexdigest()
    digests: list = [None] * world_size()
    dist.all_gather_object(digests, digest, group=_cpu_group())
    if len(set(digests)) > 1:
        raise RuntimeError(f"{what} differ between ranks (digests {digests}): the rollouts "
                           f"must be identical on every rank")


def all_gather(value) -> list:
    """Every rank's `value` (anything picklable), in rank order: a collective."""
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value, group=_cpu_group())
    return out


class NullLogger:
    """The RunLogger interface, writing nothing: what ranks other than 0 log to."""

    def start_bar(self, desc: str, total: int, initial: int = 0) -> tqdm:
        return tqdm(total=total, initial=initial, disable=True)

    def scalars(self, metrics, step) -> None:
        pass

    def phase_scalars(self, phase, metrics, step) -> None:
        pass

    def histogram(self, tag, values, step) -> None:
        pass

    def text(self, tag, text, step) -> None:
        pass

    def step(self, postfix) -> None:
        pass

    def print(self, msg: str) -> None:
        pass

    def close(self) -> None:
        pass


def sharded(policy) -> bool:
    """Does the policy checkpoint through its own sharded files (the megatron backend)?"""
    return hasattr(policy, "save_sharded")


def save_checkpoint(run_dir: str | Path, name: str, state: dict, policy,
                    latest: bool = True) -> None:
    """Collective: `state` plus the policy as checkpoints/<name>.pt. A sharded policy is
    written first by every rank into checkpoints/<name>.policy/ (the .pt names it); the
    .pt and the `latest` pointer follow, written by rank 0, so a crash mid-save leaves
    the previous checkpoint whole."""
    if sharded(policy):
        pdir = checkpoint.policy_dir(run_dir, name)
        tmp = pdir.with_name(pdir.name + ".tmp")
        if is_main():
            checkpoint.remove_dir(tmp)
        barrier()
        policy.save_sharded(tmp)
        if is_main():
            checkpoint.remove_dir(pdir)
            tmp.rename(pdir)
        state = {**state, "policy": {"sharded": pdir.name}}
    else:
        state = {**state, "policy": policy.state_dict()}
    if is_main():
        checkpoint.save(run_dir, name, state, latest=latest)
    barrier()


def load_policy(policy, path: str | Path, state: dict) -> None:
    """The policy part of checkpoint `path` (loaded as `state`) into `policy`."""
    saved = state["policy"]
    is_dir = isinstance(saved, dict) and set(saved) == {"sharded"}
    if sharded(policy) != is_dir:
        raise ValueError(f"resume: {path} holds a {'sharded (megatron)' if is_dir else 'hf'} "
                         f"policy checkpoint; backend.name must match it")
    if is_dir:
        policy.load_sharded(Path(path).parent / saved["sharded"])
    else:
        policy.load_state_dict(saved)


def agree_stop(preempt) -> bool:
    """Has any rank been asked to stop (preemption signal)? Then every rank stops at the
    same safe point: a rank that has not seen the signal itself acts as if it had."""
    local = preempt is not None and preempt.requested
    if world_size() == 1 or preempt is None:
        return local
    flag = torch.tensor([int(local)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group())
    if flag.item() and not local:
        preempt._handle(int(signal.SIGTERM), None)
    return bool(flag.item())


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank (the value itself in a single process)."""
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)])
    dist.broadcast(t, src=0, group=_cpu_group())
    return int(t.item())
