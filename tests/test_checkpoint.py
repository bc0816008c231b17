"""Atomic checkpoints: round trip, pruning, crash safety, RNG state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kimi_rl import checkpoint


def state(i: int) -> dict:
    gen = torch.Generator().manual_seed(i)
    return {"iteration": i, "weights": {"w": torch.randn(4, 3, generator=gen)},
            "summary": {"accuracy": [0.5, i / 10]}, "rng": checkpoint.rng_state()}


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    else:
        assert a == b


def names(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_save_latest_load_round_trip(tmp_path):
    s1, s2 = state(1), state(2)
    p1 = checkpoint.save(tmp_path, "iter_000001", s1)
    assert checkpoint.latest(tmp_path) == p1 == tmp_path / "checkpoints" / "iter_000001.pt"
    assert_same(checkpoint.load(checkpoint.latest(tmp_path)), s1)
    p2 = checkpoint.save(tmp_path, "iter_000002", s2)
    assert checkpoint.latest(tmp_path) == p2
    assert_same(checkpoint.load(checkpoint.latest(tmp_path)), s2)
    assert_same(checkpoint.load(p1), s1)
    assert not any(n.endswith(".tmp") for n in names(tmp_path))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_last_n(tmp_path, keep):
    for i in range(1, 7):
        checkpoint.save(tmp_path, f"iter_{i:06d}", state(i), keep=keep)
        kept = [f"iter_{j:06d}.pt" for j in range(max(1, i - keep + 1), i + 1)]
        assert names(tmp_path) == sorted(kept + ["latest"])
        assert checkpoint.load(checkpoint.latest(tmp_path))["iteration"] == i


def test_pruning_leaves_other_checkpoints_alone(tmp_path):
    checkpoint.save(tmp_path, "sft_start", {"policy": 1})
    for i in range(1, 5):
        checkpoint.save(tmp_path, f"iter_{i:06d}", state(i), keep=2)
    assert names(tmp_path) == ["iter_000003.pt", "iter_000004.pt", "latest", "sft_start.pt"]


def test_keep_newest_with_unpadded_names(tmp_path):
    for i in (8, 9, 10, 11):
        checkpoint.save(tmp_path, f"iter_{i}", state(i), keep=2)
    assert names(tmp_path) == ["iter_10.pt", "iter_11.pt", "latest"]
    # mixed widths (a run resumed with a different padding) compare by number too
    checkpoint.save(tmp_path, "iter_000012", state(12), keep=2)
    assert names(tmp_path) == ["iter_000012.pt", "iter_11.pt", "latest"]


def test_side_checkpoint_leaves_latest_alone(tmp_path):
    checkpoint.save(tmp_path, "sft_start", {"policy": 0}, latest=False)
    assert names(tmp_path) == ["sft_start.pt"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.latest(tmp_path)  # resume finds nothing to continue yet
    checkpoint.save(tmp_path, "iter_000001", state(1))
    checkpoint.save(tmp_path, "iter_000002", state(2))
    checkpoint.save(tmp_path, "sft_start", {"policy": 1}, keep=1, latest=False)
    # no iter checkpoint is pruned to make room for it, and latest still names iteration 2
    assert names(tmp_path) == ["iter_000001.pt", "iter_000002.pt", "latest", "sft_start.pt"]
    assert checkpoint.latest(tmp_path).name == "iter_000002.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path))["iteration"] == 2
    assert checkpoint.load(tmp_path / "checkpoints" / "sft_start.pt") == {"policy": 1}


def test_the_checkpoint_latest_names_is_never_pruned(tmp_path):
    """An iter checkpoint saved off the pointer (latest=False) does not evict the one
    `latest` names, even when it is the oldest."""
    checkpoint.save(tmp_path, "iter_000001", state(1), keep=1)
    checkpoint.save(tmp_path, "iter_000002", state(2), keep=1, latest=False)
    assert names(tmp_path) == ["iter_000001.pt", "iter_000002.pt", "latest"]
    assert checkpoint.latest(tmp_path).name == "iter_000001.pt"
    checkpoint.save(tmp_path, "iter_000003", state(3), keep=1)
    assert names(tmp_path) == ["iter_000003.pt", "latest"]


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = state(1)
    checkpoint.save(tmp_path, "iter_000001", good)
    pointer = (tmp_path / "checkpoints" / "latest").read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # bytes reach the file, then the process dies
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError("disk on fire")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk on fire"):
        checkpoint.save(tmp_path, "iter_000002", state(2), keep=1)
    monkeypatch.undo()

    assert (tmp_path / "checkpoints" / "latest").read_bytes() == pointer
    assert checkpoint.latest(tmp_path).name == "iter_000001.pt"
    assert_same(checkpoint.load(checkpoint.latest(tmp_path)), good)
    # the half-written file does not carry a checkpoint's name
    assert "iter_000002.pt" not in names(tmp_path)
    # and the next save works, and is the one `latest` names
    checkpoint.save(tmp_path, "iter_000002", state(2), keep=1)
    assert checkpoint.load(checkpoint.latest(tmp_path))["iteration"] == 2
    assert [n for n in names(tmp_path) if n.endswith(".pt")] == ["iter_000002.pt"]


def test_crash_while_updating_pointer_keeps_previous(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, "iter_000001", state(1))
    real = checkpoint.os.replace

    def replace(src, dst):
        if str(dst).endswith("latest"):
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, "iter_000002", state(2))
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path).name == "iter_000001.pt"
    assert checkpoint.load(checkpoint.latest(tmp_path))["iteration"] == 1


def test_latest_without_checkpoints_names_the_path(tmp_path):
    run = tmp_path / "some_run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="some_run"):
        checkpoint.latest(run)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.latest(tmp_path / "nowhere")
    # a pointer naming a file that is gone
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("iter_000009.pt")
    with pytest.raises(FileNotFoundError, match="iter_000009.pt"):
        checkpoint.latest(run)


def draws() -> tuple:
    return (torch.rand(5), random.random(), np.random.rand(3))


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    draws()
    saved = checkpoint.rng_state()
    expected = draws()
    checkpoint.save(tmp_path, "iter_000001", {"rng": saved})
    draws()  # move every stream on
    checkpoint.set_rng_state(checkpoint.load(checkpoint.latest(tmp_path))["rng"])
    got = draws()
    assert torch.equal(got[0], expected[0])
    assert got[1] == expected[1]
    assert np.array_equal(got[2], expected[2])
    assert not torch.equal(draws()[0], expected[0])
