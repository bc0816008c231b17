"""The benchmark scripts run and end with a JSON line (figures are not asserted: speed is
measured by the scripts, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_partial_rollouts_bench_quick():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "partial_rollouts.py"),
                          "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("measured_speedup", "simulated_speedup_32k", "idle_fraction_sync",
                "idle_fraction_partial", "idle_fraction_measured_sync",
                "idle_fraction_measured_partial"):
        assert result[key] > 0 or key.startswith("idle"), key
    assert result["partial"]["trained_tokens"] > 0 and result["sync"]["trained_tokens"] > 0
    assert result["partial"]["partial_segments_per_trajectory"] > 1


@pytest.mark.slow
@pytest.mark.vllm
def test_rollout_throughput_bench_quick():
    pytest.importorskip("vllm")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_throughput.py"),
                          "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "vllm_vs_hf", "torch_vs_hf", "sync_seconds", "goals",
                "goals_met"):
        assert key in result, key
    assert set(result["tokens_per_s"]) == {"hf", "torch", "vllm"}
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert result["sync_seconds"] > 0
    assert set(result["goals_met"]) == set(result["goals"])
