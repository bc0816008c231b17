"""Atomic checkpoints in a run directory.

A checkpoint is written to a temporary file, flushed to disk, then renamed into place, and
only then does `latest` point at it: a crash mid-save leaves the previous one loadable.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: str | Path, name: str, state: dict[str, Any], keep: int = 2) -> Path:
    """Save `state` as checkpoints/<name>.pt and point `latest` at it; keep the newest `keep`."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"{name}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_write(ckpt_dir / LATEST, lambda f: f.write(path.name.encode()))
    old = sorted(p for p in ckpt_dir.glob("iter_*.pt") if p != path)
    for p in old[: max(0, len(old) - (keep - 1))]:
        p.unlink()
    return path


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
