"""The hf backend data parallel with FSDP2 under real torchrun (2 processes, gloo, no
patches): against the same backend in one process.

- tests/fsdp/dp_checks.py: logprobs, one train step's gradients (summed over ranks),
  grad norm and updated weights, and the checkpoint state (the same keys and values as one
  process's, so a run resumes at another world size; a one-process state loaded into the
  FSDP policy takes the same next step).
- The loop (the README's command): each rank generates the share of its rollout replica,
  every rank ends the iteration with the same batch (the run checks it), and the first
  iteration's batch is the one-process run's (same tokens; training figures within float
  rounding). Partial rollouts are on; the run is resumed from its iteration-2 checkpoint in
  ONE process, and that resumed iteration draws the same samples as the two-process run's
  (sampling keyed by problem, sample and segment, not by replica or world; the weights
  differ by float rounding only, which flips a sampled token only when its uniform falls
  within ~1e-6 of a boundary: fixed seeds, so the test is deterministic).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    assert_partial_run_matches,
    assert_replica_shares,
    assert_resumed_iteration_matches,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 1e-5
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
        "model.intermediate_size=64", "data.levels=[1,2,3]", "data.train_per_level=30",
        "data.test_per_level=2", "data.demos={1:40,2:0,3:0,4:0,5:0,6:0}", "sft.steps=3",
        "sft.batch_size=8", "rollout.problems_per_iteration=4", "rollout.group_size=4",
        "rollout.max_new_tokens=24", "eval.max_new_tokens=24", "progress=false",
        "num_threads=1", "curriculum=all_levels", "iterations=3", "checkpoint_every=2",
        "sft.control=false", "rollout.partial.enabled=true", "rollout.partial.budget=16",
        "backend.micro_batch_tokens=256",
        # wrong answers of different lengths get different rewards: a gradient from the start
        "reward.length_penalty_weight=0.5", "reward.length_penalty_warmup=0"]


def launch(args: list[str], timeout: int = 300, **extra_env: str) -> str:
    """Run a command in its own process group (all of it killed on timeout); its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", **extra_env)
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{shlex.join(args)} timed out:\n{err[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{shlex.join(args)} failed ({proc.returncode}):\n"
                             f"{out[-3000:]}\n{err[-6000:]}")
    return out


def readme_command() -> list[str]:
    """The README's torchrun line for the hf backend, with this venv's torchrun."""
    line = next(ln for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.startswith("torchrun ")
                and ln.rstrip().endswith("backend=hf rollout.replicas=0"))
    return [str(TORCHRUN), *shlex.split(line)[1:]]


def scalars(run: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for events in sorted((run / "tb").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


def test_data_parallel_step_and_state_match_one_process(tmp):
    out = tmp / "dp.json"
    launch([str(TORCHRUN), "--standalone", "--nproc-per-node", "2",
            str(ROOT / "tests" / "fsdp" / "dp_checks.py"), "--out", str(out)])
    report = json.loads(out.read_text())
    for name, r in report.items():
        assert r["world"] == 2 and r["micro_batches"] == 5, name
        assert r["many_forwards"] == -(-r["many_batches"] // 2) < r["many_batches"], name
        for key in ("logprobs", "entropy", "many", "loss", "entropy_metric", "grad_norm", "grads",
                    "step_weights", "plain_model_refreshed", "state", "load",
                    "step_after_load"):
            assert r[key] <= TOL, (name, key, r[key])
        assert r["grad_names"] == [] and r["state_names"] == [], name
        assert r["state_tensors"] > 50, name


@pytest.fixture(scope="module")
def dp2_run(tmp) -> Path:
    run = tmp / "run_dp2"
    out = launch(readme_command() + TINY + [f"run_dir={run}"])
    (tmp / "run_dp2.stdout").write_text(out)
    return run


def test_loop_data_parallel(dp2_run, tmp):
    assert (dp2_run / "checkpoints" / "latest").read_text() == "iter_000003.pt"
    assert json.loads((dp2_run / "summary.json").read_text())["iterations"] == 3
    assert (dp2_run / "hf_model" / "model.safetensors").is_file()
    assert len(list((dp2_run / "tb").glob("events.*"))) == 1  # rank 0 alone writes
    out = (tmp / "run_dp2.stdout").read_text()
    assert sum(ln.startswith("{") and '"wall_seconds"' in ln for ln in out.splitlines()) == 1
    one = tmp / "run_one"
    launch([sys.executable, "-m", "kimi_rl.cli", "train", *TINY, f"run_dir={one}",
            "iterations=2"])
    dp, ref = scalars(dp2_run), scalars(one)
    assert ref["rollout/replicas"][0] == 1 and dp["rollout/replicas"][0] == 2
    assert_replica_shares(dp, 3)
    assert_partial_run_matches(dp, ref)


def test_resume_in_one_process(dp2_run, tmp):
    """The two-process run's iteration-2 checkpoint resumed in one process: iteration 3
    draws the samples the two-process run drew."""
    run = tmp / "run_resumed"
    shutil.copytree(dp2_run, run)
    ckpts = run / "checkpoints"
    for p in ckpts.glob("iter_000003*"):
        p.unlink()
    (ckpts / "latest").write_text("iter_000002.pt")
    shutil.rmtree(run / "tb")
    launch([sys.executable, "-m", "kimi_rl.cli", "train", *TINY, f"resume={run}"])
    assert_resumed_iteration_matches(scalars(dp2_run), scalars(run))
