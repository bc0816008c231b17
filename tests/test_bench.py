"""The benchmark scripts run and end with a JSON line (figures are not asserted: speed is
measured by the scripts, not by tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_bench

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


@pytest.mark.slow
def test_gpu_long_context_bench_runs_on_cpu():
    """The prepared GPU check, on the CPU with a tiny model: every case measured, packed
    attention within its tolerances of the float64 per-sequence reference, and the packed
    row's logprobs equal to its sequences' alone. (Its figures need a GPU.)"""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_long_context.py"),
                          "--quick", "--device", "cpu", "--autocast", "none"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["train"]) == {"256/packed", "256/single", "512/packed", "512/single"}
    assert all(r["step_seconds"] > 0 for r in result["train"].values())
    assert result["attention_within_tolerance"] is True
    assert set(result["attention_max_rel_diff"]) == {
        "float32", "float32/shared_prompts", "bfloat16", "bfloat16/shared_prompts"}
    assert result["logprobs_max_abs_diff"] < 1e-5


def test_gpu_long_context_bench_needs_a_gpu():
    """Without a CUDA device the GPU check says so (exit 2, an error line), unless asked
    for the CPU."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_long_context.py")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert "needs a CUDA GPU" in json.loads(out.stdout.strip().splitlines()[-1])["error"]


def _arm(after, length, **extra):
    levels = {"1": 1.0, "2": 1.0, "3": 1.0, "4": 0.2, "5": 0.2}
    return {"trained_levels": [1, 2, 3, 4, 5], "eval_before": levels,
            "sft_control": {**levels, "5": 0.25},
            "eval_after": dict(zip(levels, after, strict=True)),
            "correct_length_final": length, "wall_seconds": 300.0,
            "accuracy_change_after_warmup": {lv: 0.0 for lv in levels}, **extra}


def test_demo_seeds_judges_each_bar():
    """The demo's bars, one broken at a time against a run that meets all of them."""
    judge = load_bench("demo_seeds").judge
    off = _arm([1, 1, 1, 1, 1], 50.0)
    good = _arm([1, 1, 1, 0.98, 0.97], 40.0)
    assert all(judge(good, off).values())
    failing = {  # (on, off)
        # 9 points over the control (and as good as the off arm there)
        "rl_beats_sft": (_arm([1, 1, 1, 1, 0.34], 40.0), _arm([1, 1, 1, 1, 0.34], 50.0)),
        "penalty_shortens": (_arm([1, 1, 1, 1, 1], 40.5), off),  # 0.81x
        "accuracy_vs_off": (_arm([1, 1, 1, 0.96, 1], 40.0), off),  # level 4: 4 points below
        "holds_after_warmup": (_arm([1, 1, 1, 1, 1], 40.0, accuracy_change_after_warmup={
            "1": -0.04, "2": 0.0, "3": 0.0, "4": 0.5, "5": 0.7}), off),
        # 300 s of its own plus a loaded cold start of 301 s
        "within_10_minutes": (_arm([1, 1, 1, 1, 1], 40.0, sft={"from_run": "x",
                                                              "seconds": 301.0}), off),
    }
    for bar, (on, off_arm) in failing.items():
        checks = judge(on, off_arm)
        assert [k for k, ok in checks.items() if not ok] == [bar], bar


def test_recipe_seeds_judges_each_bar():
    """The pretrained-model recipe's bars: RL over its start and over the control, by 10
    points on the mean of the trained levels (not on one level), and 30 minutes of training."""
    judge = load_bench("recipe_seeds").judge

    def run(before, after, control, seconds=(200.0, 600.0, 600.0)):
        return {"trained_levels": [1, 2],
                "eval_before": {"1": before[0], "2": before[1], "3": 0.0},
                "eval_after": {"1": after[0], "2": after[1], "3": 0.0},
                "sft_control": {"1": control[0], "2": control[1], "3": 0.9},
                "sft": {"seconds": seconds[0]}, "rl_seconds": seconds[1],
                "sft_control_stats": {"seconds": seconds[2]}}

    checks, figures = judge(run((0.5, 0.1), (0.8, 0.3), (0.6, 0.2)))
    assert all(checks.values()) and figures["train_seconds"] == 1400.0
    assert abs(figures["after"] - 0.55) < 1e-9  # level 3, not trained, does not count
    assert abs(figures["all_levels_control"] - 1.7 / 3) < 1e-9  # reported beside it
    failing = {
        "rl_beats_start": run((0.6, 0.1), (0.8, 0.09), (0.5, 0.1)),  # +9 on the mean
        "rl_beats_control": run((0.5, 0.1), (0.8, 0.3), (0.7, 0.21)),  # +9.5
        "within_30_minutes": run((0.5, 0.1), (0.8, 0.3), (0.6, 0.2), (200.0, 800.0, 801.0)),
    }
    for bar, summary in failing.items():
        checks, _ = judge(summary)
        assert [k for k, ok in checks.items() if not ok] == [bar], bar
