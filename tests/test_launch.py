"""Launching: the run directory every rank agrees on, Hydra's files written by rank 0 only,
and Hydra multirun sweeps (basic launcher and submitit's local executor) running real jobs.
The SLURM launches are in test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_loop import TINY

from kimi_rl.cli import rank_overrides
from kimi_rl.config import new_run_dir, register_configs

ROOT = Path(__file__).resolve().parent.parent


def test_single_process_run_dir_is_dated():
    d = new_run_dir({})
    assert d.startswith("runs/") and len(Path(d).parts) == 3  # runs/<date>/<time>
    assert new_run_dir({"WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"}).count("/") == 2


def test_ranks_share_the_torchrun_run_id():
    envs = [{"WORLD_SIZE": "4", "RANK": str(r), "TORCHELASTIC_RUN_ID": "7f3a"} for r in range(4)]
    assert {new_run_dir(e) for e in envs} == {"runs/torchrun-7f3a"}


@pytest.mark.parametrize("run_id", [None, "none", ""])
def test_several_ranks_without_run_id_need_run_dir(run_id):
    env = {"WORLD_SIZE": "2", "RANK": "0"}
    if run_id is not None:
        env["TORCHELASTIC_RUN_ID"] = run_id
    with pytest.raises(ValueError, match="run_dir: required"):
        new_run_dir(env)


def test_run_dir_and_resume_take_precedence(monkeypatch):
    register_configs()
    monkeypatch.setenv("WORLD_SIZE", "2")  # no run id: a new directory would be an error
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for given, want in (({"run_dir": "a", "resume": "b"}, "a"), ({"run_dir": None, "resume": "b"},
                                                                 "b")):
        cfg = OmegaConf.create({**given, "d": "${run_dir_of:${run_dir},${resume}}"})
        assert cfg.d == want


def test_only_rank_zero_writes_hydra_files():
    assert rank_overrides({}) == []
    assert rank_overrides({"RANK": "0", "WORLD_SIZE": "8"}) == []
    other = rank_overrides({"RANK": "3", "WORLD_SIZE": "8"})
    assert "hydra.output_subdir=null" in other
    assert any(o.startswith("hydra/job_logging=") for o in other)


SWEEP = TINY + ["iterations=2", "eval.before=false", "eval.at_warmup_end=false"]


def _sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kimi_rl.cli", "train", "-m", *SWEEP, "seed=0,1",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_sweep_runs_each_job(tmp_path, launcher):
    """`kimi-rl train -m seed=0,1`: one job per value, each a complete run in its own
    numbered directory with its own config; submitit_local runs them as separate processes
    through submitit (what the submitit_slurm launcher does on a cluster)."""
    res = _sweep(tmp_path, f"hydra/launcher={launcher}")
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for job, seed in ((0, 0), (1, 1)):
        d = sweep / str(job)
        summary = json.loads((d / "summary.json").read_text())
        assert summary["iterations"] == 2
        assert OmegaConf.load(d / "config.yaml").seed == seed
        assert (d / "checkpoints" / "latest").is_file()
        assert (d / "hf_model" / "config.json").is_file()
    assert (sweep / "multirun.yaml").is_file()
    assert not (tmp_path / "runs").exists()  # nothing outside the sweep directory
    if launcher == "submitit_local":
        assert (sweep / ".submitit").is_dir()
