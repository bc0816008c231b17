"""Atomic checkpoints in a run directory.

A checkpoint is written to a temporary file, flushed to disk, then renamed into place, and
only then does `latest` point at it: a crash mid-save leaves the previous one loadable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"
_ITER = re.compile(r"iter_(\d+)\.pt")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def iteration_of(path: Path) -> int | None:
    """n for a checkpoint named iter_<n>.pt, else None (a side checkpoint)."""
    m = _ITER.fullmatch(path.name)
    return int(m.group(1)) if m else None


def save(run_dir: str | Path, name: str, state: dict[str, Any], keep: int = 2,
         latest: bool = True) -> Path:
    """Save `state` as checkpoints/<name>.pt and, if `latest`, point `latest` at it (a side
    checkpoint such as the SFT start is saved with latest=False: resume ignores it).
    Saving an iter_<n> checkpoint prunes the others to the newest `keep` by n, always
    keeping the one saved now and the one `latest` names; side checkpoints (any other
    name) are never pruned, and saving one prunes nothing."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"{name}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    if latest:
        _atomic_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
    if iteration_of(path) is None:
        return path
    pointer = ckpt_dir / LATEST
    protected = {path, ckpt_dir / pointer.read_text().strip()} if pointer.is_file() else {path}
    iters = sorted((p for p in ckpt_dir.glob("iter_*.pt") if iteration_of(p) is not None),
                   key=iteration_of)
    excess = len(iters) - max(keep, 1)
    for p in iters:
        if excess <= 0:
            break
        if p not in protected:
            p.unlink()
            remove_dir(policy_dir(run_dir, p.stem))
            excess -= 1
    return path


def policy_dir(run_dir: str | Path, name: str) -> Path:
    """Where a sharded policy (megatron backend) of checkpoint <name> lives."""
    return Path(run_dir) / "checkpoints" / f"{name}.policy"


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def latest(run_dir: str | Path) -> Path:
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"resume: no checkpoint in {run_dir} (missing {pointer})")
    path = ckpt_dir / pointer.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"resume: {pointer} names {path.name}, which does not exist")
    return path


def load(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
