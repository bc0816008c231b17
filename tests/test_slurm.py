"""launch/kimi_rl.sbatch on a real single-node SLURM (Debian's slurm-wlm), started here:
a signal before the time limit stops the trainer with a checkpoint, the script requeues
the job, and the requeued job resumes and completes the run."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_loop import TINY

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "launch" / "kimi_rl.sbatch"
pytestmark = pytest.mark.slow


def ensure_slurm() -> None:
    """Install Debian's SLURM if it is missing and this user can (root with apt-get)."""
    if shutil.which("slurmctld") and shutil.which("slurmd"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and cannot be installed here (needs root apt-get)")
    res = subprocess.run(["apt-get", "install", "-y", "slurm-wlm"], capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0:
        pytest.skip(f"apt-get install slurm-wlm failed: {res.stderr[-500:]}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd on localhost (own ports and directories); yields the client env."""
    ensure_slurm()
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    host = socket.gethostname()
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=kimitest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmUser={os.environ.get("USER", "root")}
ReturnToService=2
JobRequeue=1
SchedulerParameters=sched_interval=1
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([daemon, "-D"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT) for daemon in ("slurmctld", "slurmd")]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            res = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                 text=True)
            if res.stdout.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"SLURM did not come up:\n{(d / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], env=env,
                       capture_output=True)
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:  # slurmd can take 20 s to stop on SIGTERM; its state is a throwaway
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def job_field(env: dict, job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True,
                         text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get(name, "")


def preempt_and_wait(env: dict, script: Path, run_dir: Path, log: Path, cwd: Path,
                     wait_after: float) -> tuple[str, str]:
    """Submit `script` with a 20-iteration tiny run, send SIGUSR1 to its batch shell (what
    --signal=B:USR1@N sends before the time limit) once RL has started, and wait until the
    job completes; returns (job id, its output)."""
    env = {**env, "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    overrides = TINY + ["iterations=20", "checkpoint_every=10", "eval.at_warmup_end=false"]
    res = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--chdir={cwd}",
                          str(script), *overrides], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 180
        while "held-out (before RL)" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no log"
            time.sleep(0.1)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        while job_field(env, job, "JobState") != "COMPLETED":
            assert job_field(env, job, "JobState") not in ("FAILED", "CANCELLED", "TIMEOUT"), \
                log.read_text()
            assert time.monotonic() < deadline + wait_after, log.read_text()
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)
    return job, log.read_text()


def test_preempted_job_is_requeued_and_resumes(slurm, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, "KIMI_RL": f"{sys.executable} -m kimi_rl.cli"}
    job, text = preempt_and_wait(env, SBATCH, run_dir, log, tmp_path, wait_after=120)
    assert job_field(env, job, "Restarts") == "1", text
    for line in ("kimi-rl.sbatch: forwarding SIGUSR1", "stopped on SIGUSR1 after iteration",
                 "requeueing", f"(restart 1) resumes {run_dir}"):
        assert line in text, text
    stopped = int(text.split("stopped on SIGUSR1 after iteration ")[1].split()[0])
    assert 1 <= stopped < 20
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 20


MULTINODE = ROOT / "launch" / "kimi_rl_multinode.sbatch"


def test_multinode_script_requeues_and_resumes(slurm, tmp_path):
    """launch/kimi_rl_multinode.sbatch on one node: srun starts torchrun (c10d rendezvous),
    torchrun the trainer; SIGUSR1 to the batch shell is forwarded to the job step, where
    torchrun ignores it and the trainer stops with a checkpoint; the script requeues the
    job, which resumes through torchrun and completes the run."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = {**slurm, "NPROC_PER_NODE": "1", "RDZV_PORT": "29517",
           "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    job, text = preempt_and_wait(env, MULTINODE, run_dir, log, tmp_path, wait_after=180)
    assert job_field(env, job, "Restarts") == "1", text
    for line in ("forwarding SIGUSR1 to the job step", "stopped on SIGUSR1 after iteration",
                 "requeueing", f"(restart 1) resumes {run_dir}"):
        assert line in text, text
    stopped = int(text.split("stopped on SIGUSR1 after iteration ")[1].split()[0])
    assert 1 <= stopped < 20
    assert "User defined signal 1" not in text  # torchrun did not die of the signal
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 20


def test_submitit_slurm_sweep(slurm, tmp_path):
    """`kimi-rl train -m ... hydra/launcher=submitit_slurm`: each job of the sweep is a SLURM
    job (sbatch through submitit) and completes its run in its own directory."""
    sweep = tmp_path / "sweep"
    env = {**slurm, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "kimi_rl.cli", "train", "-m", *TINY, "iterations=2",
         "eval.before=false", "eval.at_warmup_end=false", "algo=omd,grpo",
         f"hydra.sweep.dir={sweep}", "hydra/launcher=submitit_slurm",
         "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10",
         "hydra.launcher.cpus_per_task=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for job, algo in ((0, "omd"), (1, "grpo")):
        d = sweep / str(job)
        assert json.loads((d / "summary.json").read_text())["iterations"] == 2
        assert (d / "config.yaml").read_text().count(f"name: {algo}") >= 1
    assert list((sweep / ".submitit").glob("*/*_submission.sh"))  # went through sbatch
