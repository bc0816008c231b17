"""Preemption: real signals, a checkpoint at the next safe point, the requeue exit code,
and a resume that ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_loop import (  # noqa: F401 (fixture below)
    RESUMABLE,
    cli,
    cli_run,
    compose,
    final_weights,
    straight,  # noqa: F401
)

from kimi_rl import checkpoint, distributed, loop
from kimi_rl.preemption import Preempted, Preemption


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> str:
    """Read the process's output until a line contains `text`; returns what was read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    pytest.fail(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


def test_handlers_record_the_signal_and_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(["SIGUSR1", "term"], grace_seconds=30, exit_code=75) as p:
        assert not p.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert p.requested and p.received == "SIGUSR1"
        p.done()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_unknown_signal_is_named():
    with pytest.raises(ValueError, match="preemption.signals: unknown signal 'SIGNOPE'"):
        Preemption(["SIGNOPE"], 1, 75)


def test_grace_period_ends_a_step_that_does_not_finish():
    """A signal during a step longer than the grace period: exit with the requeue code."""
    code = textwrap.dedent("""
        import os, signal, time
        from kimi_rl.preemption import Preemption
        with Preemption(["SIGTERM"], grace_seconds=0.3, exit_code=75):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # a step that would take far longer than the grace period
    """)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 75, res.stderr
    assert time.monotonic() - t0 < 20
    assert "grace period" in res.stderr


@pytest.mark.slow
def test_signal_during_rl_checkpoints_and_resumes(straight, tmp_path):  # noqa: F811
    """SLURM's signal (SIGUSR1; SIGTERM takes the same path: the SFT test below sends it)
    stops the run after the current iteration with a checkpoint and exit code 75; the
    resumed run ends with the weights of the uninterrupted one."""
    sig = signal.SIGUSR1
    a_dir, _ = straight
    run_dir = tmp_path / "run"
    proc = cli(RESUMABLE + [f"run_dir={run_dir}"], tmp_path)
    wait_for(proc, "held-out (before RL)")
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out[-3000:]
    assert f"stopped on {sig.name} after iteration" in out, out[-3000:]
    assert f"resume={run_dir} continues it" in out
    state = checkpoint.load(checkpoint.latest(run_dir))
    assert 1 <= state["iteration"] <= 6
    assert not (run_dir / "summary.json").exists()
    resumed = cli_run(RESUMABLE + [f"run_dir={run_dir}", f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    for name, t in final_weights(a_dir).items():
        assert torch.equal(final_weights(run_dir)[name], t), name


@pytest.mark.slow
def test_signal_during_sft_exits_without_a_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(RESUMABLE + [f"run_dir={run_dir}", "sft.steps=100000"], tmp_path)
    wait_for(proc, "run directory")
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    assert "stopped on SIGTERM during the SFT cold start" in out
    assert "no checkpoint yet" in out
    assert not (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_a_signal_just_after_the_stop_decision_waits_for_the_next_checkpoint(
        tmp_path, monkeypatch):
    """The signal lands right after an iteration has decided not to stop (and so not to
    checkpoint): the run goes on to the next iteration and stops there with its checkpoint,
    never "after iteration n" without iter_n saved."""
    state = {"in_rl": False, "sent": False}
    rl_iteration, agree_stop = loop.rl_iteration, distributed.agree_stop

    def iteration(*args, **kwargs):
        out = rl_iteration(*args, **kwargs)
        state["in_rl"] = True
        return out

    def agree(preempt):
        decided = agree_stop(preempt)
        if state["in_rl"] and not state["sent"]:
            state["sent"] = True
            os.kill(os.getpid(), signal.SIGUSR1)  # handled before this returns
            assert preempt.requested
        return decided

    monkeypatch.setattr(loop, "rl_iteration", iteration)
    monkeypatch.setattr(distributed, "agree_stop", agree)
    run_dir = tmp_path / "run"
    cfg = compose(RESUMABLE + [f"run_dir={run_dir}", "eval.after=false"])
    with pytest.raises(Preempted) as stopped:
        with Preemption(["SIGUSR1"], grace_seconds=120, exit_code=75) as preempt:
            loop.train(cfg, run_dir, preempt)
    assert state["sent"]
    message = str(stopped.value)
    assert "after iteration 2 (checkpoint iter_000002.pt)" in message, message
    assert f"resume={run_dir} continues it" in message
    assert checkpoint.latest(run_dir).name == "iter_000002.pt"
    assert checkpoint.load(checkpoint.latest(run_dir))["iteration"] == 2
