"""End-to-end runs of the RL loop on a tiny model: resume, logging, summary, bad input.

Runs go through `kimi_rl.loop.train` in process, or through the real CLI
(`python -m kimi_rl.cli train ...`) where a process must be killed or its exit code and
output matter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kimi_rl import checkpoint
from kimi_rl.config import register_configs
from kimi_rl.loop import SUMMARY_KEYS, train

pytestmark = pytest.mark.slow

LEVELS = [1, 2, 3, 4, 5]
# A tiny model and a tiny task. The default experiment demonstrates levels 1-6, and a dict
# override merges into that mapping, so every level stays in data.levels (no
# demonstrations above level 1).
TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
    "model.intermediate_size=64",
    f"data.levels=[{','.join(map(str, LEVELS))}]", "data.train_per_level=30",
    "data.test_per_level=2", "data.demos={1:40,2:0,3:0,4:0,5:0,6:0}",
    "sft.steps=5", "sft.batch_size=8", "sft.control=false",
    "rollout.problems_per_iteration=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
    "eval.max_new_tokens=24", "progress=false", "num_threads=1", "curriculum=all_levels",
]
ITERATIONS = 6
# the straight run and the killed-and-resumed one
RESUMABLE = TINY + [f"iterations={ITERATIONS}", "checkpoint_every=3",
                    "reward.length_penalty_weight=0.5", "reward.length_penalty_warmup=3"]
# scalars that depend on the clock, not on the computation
CLOCK = ("time/", "throughput/")


def compose(overrides: list[str]):
    register_configs()
    with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return hydra.compose("train", overrides=overrides)


def run(run_dir: Path, overrides: list[str]) -> dict:
    return train(compose(overrides), run_dir)


def cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    """`python -m kimi_rl.cli train ARGS` in `cwd` (where Hydra puts its own outputs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kimi_rl.cli", "train", *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def cli_run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = cli(args, cwd)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}; a step logged twice (events of a killed process that the
    resumed one did not purge) fails here."""
    acc, out = events(run_dir), {}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: steps logged twice: {sorted(steps)}"
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out


def sft_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run_dir / "tb" / "sft"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def texts(run_dir: Path) -> dict[str, dict[int, bytes]]:
    acc = events(run_dir)
    return {tag: {e.step: e.tensor_proto.string_val[0] for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"]}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir / "checkpoints" / f"iter_{ITERATIONS:06d}.pt"
    return checkpoint.load(path)["policy"]["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict]:
    """The reference run: SFT start, eval before and after, ITERATIONS straight."""
    run_dir = tmp_path_factory.mktemp("straight")
    return run_dir, run(run_dir, RESUMABLE + [f"run_dir={run_dir}"])


def kill_at_iteration(run_dir: Path, cwd: Path, iteration: int, tries: int = 3) -> None:
    """Start a CLI run and SIGKILL it as soon as checkpoints/latest names `iteration` (and
    before it names a later one)."""
    want = f"iter_{iteration:06d}.pt"
    pointer = run_dir / "checkpoints" / "latest"
    for attempt in range(tries):
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = cli(RESUMABLE + [f"run_dir={run_dir}"], cwd)
        deadline = time.monotonic() + 180
        seen = None
        while proc.poll() is None and time.monotonic() < deadline:
            seen = pointer.read_text() if pointer.is_file() else None
            if seen is not None and seen != "sft_start.pt":
                break
            time.sleep(0.002)
        proc.kill()
        out, _ = proc.communicate()
        assert proc.returncode is not None
        if pointer.is_file() and pointer.read_text() == want and proc.returncode < 0:
            assert not (run_dir / "summary.json").exists()
            return
        print(f"attempt {attempt}: latest={seen!r}, rc={proc.returncode}\n{out[-3000:]}")
    pytest.fail(f"could not kill the run while checkpoints/latest named {want}")


def test_resume_equals_straight(straight, tmp_path):
    """A run killed (SIGKILL) right after its iteration-3 checkpoint and resumed ends with
    the same weights and logs the same per-iteration scalars as a run that went straight."""
    a_dir, a_summary = straight
    b_dir = tmp_path / "killed"
    kill_at_iteration(b_dir, tmp_path, 3)
    resumed = cli_run(RESUMABLE + [f"run_dir={b_dir}", f"resume={b_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-5000:]

    a_w, b_w = final_weights(a_dir), final_weights(b_dir)
    assert a_w.keys() == b_w.keys()
    for name in a_w:
        assert torch.equal(a_w[name], b_w[name]), name

    a_s, b_s = scalars(a_dir), scalars(b_dir)
    assert a_s.keys() == b_s.keys()
    for tag in a_s:
        if tag.startswith(CLOCK):
            assert a_s[tag].keys() == b_s[tag].keys(), tag
            continue
        assert a_s[tag] == b_s[tag], tag
    assert set(a_s["reward/mean"]) == set(range(ITERATIONS))
    assert texts(a_dir) == texts(b_dir)
    # the SFT curve (tb/sft, by SFT step) is not purged by the resumed run
    a_sft, b_sft = sft_scalars(a_dir), sft_scalars(b_dir)
    assert set(a_sft["sft/loss"]) == {1, 2, 3, 4, 5}
    assert a_sft == b_sft

    b_summary = json.loads((b_dir / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "sampled_accuracy", "trained_levels",
                "demonstrated_levels", "iterations"):
        assert json.loads(json.dumps(a_summary[key])) == b_summary[key], key


def test_resume_replaces_the_events_after_the_checkpoint(straight, tmp_path):
    """Resuming from iteration 3 of a run that logged 6 iterations re-runs 3..5: their old
    events are purged (each step once), and the re-run computes the same values."""
    a_dir, _ = straight
    b_dir = tmp_path / "rerun"
    shutil.copytree(a_dir, b_dir)
    (b_dir / "checkpoints" / "latest").write_text("iter_000003.pt")
    run(b_dir, RESUMABLE + [f"run_dir={b_dir}", f"resume={b_dir}"])
    a_s, b_s = scalars(a_dir), scalars(b_dir)  # scalars() fails on a step logged twice
    for tag in a_s:
        if not tag.startswith(CLOCK):
            assert a_s[tag] == b_s[tag], tag
    assert len(list((b_dir / "tb").glob("events.out.tfevents.*"))) == 2  # one per process
    assert sft_scalars(b_dir) == sft_scalars(a_dir)  # the SFT curve (tb/sft) untouched
    for name, t in final_weights(a_dir).items():
        assert torch.equal(final_weights(b_dir)[name], t), name


PROMISED = [
    "reward/mean", "accuracy/train", "response_length/mean", "response_length/p90",
    "response_length/max", "length_penalty/weight", "length_penalty/contribution",
    "loss/policy", "loss/penalty", "loss/total", "train/logratio/mean", "train/entropy",
    "train/grad_norm", "throughput/tokens_per_s", "time/rollout", "time/reward", "time/train",
    "time/sync", "sync/bytes", "curriculum/stage", "curriculum/sampling_entropy",
    "rollout/max_new_tokens", "rollout/truncated_fraction", "rollout/repeat_terminated_fraction",
]


def test_tensorboard_holds_the_promised_scalars(straight):
    run_dir, _ = straight
    s = scalars(run_dir)
    missing = [tag for tag in PROMISED if tag not in s]
    assert not missing, f"not logged: {missing} (logged: {sorted(s)})"
    steps = set(range(ITERATIONS))
    for tag in PROMISED:
        assert set(s[tag]) == steps, tag
        assert all(math.isfinite(v) for v in s[tag].values()), tag
    # a sync sends every weight (a tied output layer under both names)
    policy_bytes = sum(t.numel() * t.element_size() for t in final_weights(run_dir).values())
    assert max(s["sync/bytes"].values()) >= policy_bytes
    per_level = {tag for tag in s if re.fullmatch(r"accuracy/train_L\d+", tag)}
    assert per_level and {int(t.rsplit("L", 1)[1]) for t in per_level} <= set(LEVELS)
    for it in steps:
        assert 0 <= s["accuracy/train"][it] <= 1
        assert s["response_length/mean"][it] <= s["response_length/max"][it] <= 24
        assert s["response_length/p90"][it] <= s["response_length/max"][it]
        assert s["train/grad_norm"][it] >= 0
        assert s["rollout/max_new_tokens"][it] == 24
        for tag in ("rollout/truncated_fraction", "rollout/repeat_terminated_fraction"):
            assert 0 <= s[tag][it] <= 1, tag
        assert s["time/rollout"][it] > 0 and s["throughput/tokens_per_s"][it] > 0
        # length penalty: off for the warmup, then the configured weight
        assert s["length_penalty/weight"][it] == (0.0 if it < 3 else 0.5)
        assert math.isclose(s["loss/total"][it], s["loss/policy"][it] + s["loss/penalty"][it],
                            rel_tol=1e-5, abs_tol=1e-6)
    t = texts(run_dir)
    samples = [tag for tag in t if tag.startswith("samples/")]
    assert samples, f"no text samples (tensors: {sorted(t)})"
    assert set(t[samples[0]]) == steps
    assert b"response:" in t[samples[0]][0]


def test_summary(straight):
    run_dir, summary = straight
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary, default=str))
    for key in ("eval_before", "eval_after", "trained_levels", "demonstrated_levels",
                "iterations", "wall_seconds"):
        assert key in on_disk, key
    for key in ("eval_before", "eval_after"):
        assert sorted(int(lv) for lv in on_disk[key]) == LEVELS
        assert all(0 <= a <= 1 for a in on_disk[key].values())
    assert on_disk["trained_levels"] == LEVELS
    assert on_disk["demonstrated_levels"] == [1]
    assert on_disk["iterations"] == ITERATIONS
    assert on_disk["wall_seconds"] > 0
    assert on_disk["sft_control"] is None  # documented keys are there, null when not run
    assert set(SUMMARY_KEYS) <= set(on_disk)
    # 40 demonstrations, a quarter held out; measured once, after the last of 5 steps
    assert on_disk["sft"]["steps"] == 5 and on_disk["sft"]["best_step"] == 5
    assert math.isfinite(on_disk["sft"]["heldout_loss"])
    # the trained policy is saved as a Hugging Face directory
    assert (run_dir / "hf_model" / "config.json").is_file()


def test_summary_with_sft_control(tmp_path):
    first = tmp_path / "first"
    args = TINY + ["iterations=2", "checkpoint_every=2", "sft.control=true"]
    summary = run(first, args)
    assert sorted(int(lv) for lv in summary["sft_control"]) == LEVELS
    on_disk = json.loads((first / "summary.json").read_text())
    assert on_disk["sft_control"] == json.loads(json.dumps(summary["sft_control"]))
    assert (first / "checkpoints" / "sft_start.pt").is_file()
    assert checkpoint.latest(first).name == "iter_000002.pt"

    # a second run from the first one's SFT start: the same start, and its own control
    # time-matched by the first run's cold-start step time (not sft.steps)
    second = run(tmp_path / "second", args + [f"sft.from_run={first}", "sft.steps=500"])
    assert second["eval_before"] == summary["eval_before"]
    assert second["sft"]["from_run"] == str(first)
    assert {k: second["sft"][k] for k in ("steps", "seconds")} == \
        {k: summary["sft"][k] for k in ("steps", "seconds")}
    per_step = summary["sft"]["seconds"] / summary["sft"]["steps"]
    assert second["sft_control_stats"]["steps"] == max(1, round(second["rl_seconds"] / per_step))

    # a source without its summary (still running, crashed) cannot time-match a control
    (first / "summary.json").unlink()
    with pytest.raises(ValueError, match="summary.json has no cold-start figures"):
        run(tmp_path / "third", args + [f"sft.from_run={first}"])


def test_sft_only_run_with_control(tmp_path):
    """iterations=0: the cold start, then its control (one step: RL took no time) loaded
    from the SFT start while the cold start's last gradients are still on the weights and
    the optimizer was reset without a step (torch then found no state to load into)."""
    summary = run(tmp_path, TINY + ["iterations=0", "sft.control=true"])
    assert summary["sft_control_stats"]["steps"] == 1
    assert sorted(int(lv) for lv in summary["sft_control"]) == LEVELS


def test_summary_keys_when_nothing_is_correct(tmp_path):
    """An untrained model answers nothing correctly: every documented key is still written
    (lengths of correct responses null), and the collapse record is there."""
    summary = run(tmp_path, TINY + ["iterations=2", "checkpoint_every=2", "sft.enabled=false",
                                    "reward.length_penalty_weight=0.5",
                                    "reward.length_penalty_warmup=1"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary, default=str))
    assert set(SUMMARY_KEYS) <= set(on_disk)
    assert all(a == 0 for a in on_disk["eval_after"].values())  # the premise
    assert on_disk["correct_length_final"] is None
    assert on_disk["correct_length_at_warmup_end"] is None
    assert set(on_disk["accuracy_change_after_warmup"]) == {str(lv) for lv in LEVELS}
    assert on_disk["sft"] is None and on_disk["sft_control"] is None
    assert set(on_disk["collapse"]) == {"detected", "first_iteration", "rules",
                                        "firing_iterations", "firing_at_end"}


def test_max_new_tokens_schedule_and_truncated_reward(tmp_path):
    """The cap changes at iteration 1 as scheduled; truncated responses score 0."""
    run(tmp_path, TINY + ["iterations=3", "checkpoint_every=3", "sft.enabled=false",
                          "eval.before=false", "eval.after=false",
                          # new keys of a dict need "+" or "++" under struct mode
                          "++rollout.max_new_tokens_schedule={1:6,2:10}",
                          "reward.truncated_reward=zero", "reward.repeat_penalty=0.5"])
    s = scalars(tmp_path)
    assert s["rollout/max_new_tokens"] == {0: 24, 1: 6, 2: 10}
    for it, cap in s["rollout/max_new_tokens"].items():
        assert s["response_length/max"][it] <= cap
    # the untrained model seldom says EOS within 6 tokens: most responses are cut, and
    # score 0 (the reward is never above 1 - truncated_fraction)
    assert s["rollout/truncated_fraction"][1] > 0.5
    for it in s["reward/mean"]:
        assert s["reward/mean"][it] <= 1 - s["rollout/truncated_fraction"][it] + 1e-6


@pytest.mark.parametrize("variant", [
    ["algo=grpo"], ["algo=reinforce"], ["algo.level=token"], ["algo.ref_logprobs=rollout"],
], ids=["grpo", "reinforce", "omd-token", "omd-rollout-ref"])
def test_algorithm_variants_run(tmp_path, variant):
    summary = run(tmp_path, TINY + ["iterations=2", "checkpoint_every=2", "sft.enabled=false",
                                    "eval.before=false", "eval.after=false", *variant])
    assert summary["iterations"] == 2
    s = scalars(tmp_path)
    assert set(s["loss/total"]) == {0, 1}
    assert all(math.isfinite(v) for v in s["loss/total"].values())
    assert set(s["train/grad_norm"]) == {0, 1}
    assert checkpoint.load(checkpoint.latest(tmp_path))["iteration"] == 2


def test_bad_problem_file_names_file_and_row(tmp_path):
    bad = tmp_path / "problems.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    res = cli_run(["data=jsonl", f"data.path={bad}", f"run_dir={tmp_path / 'run'}"], tmp_path)
    assert res.returncode != 0
    assert str(bad) in res.stdout and "row 2" in res.stdout, res.stdout[-3000:]
    assert "answer" in res.stdout


def test_missing_model_path_is_named(tmp_path):
    res = cli_run(TINY + ["model.path=/nonexistent/model", f"run_dir={tmp_path / 'run'}"],
                  tmp_path)
    assert res.returncode != 0
    assert "/nonexistent/model" in res.stdout, res.stdout[-3000:]


@pytest.mark.parametrize("key", ["not_a_key", "rollout.group_sise"])
def test_unknown_key_is_named(tmp_path, key):
    res = cli_run([f"{key}=1"], tmp_path, timeout=60)
    assert res.returncode != 0
    assert key.rsplit(".", 1)[-1] in res.stdout, res.stdout[-3000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


# partial rollouts: 6 new tokens per trajectory per iteration, responses up to 24
PARTIAL = RESUMABLE + ["rollout.partial.enabled=true", "rollout.partial.budget=6",
                       "rollout.partial.max_trajectory_age=4",
                       "rollout.partial.max_segment_age=1", "eval.before=false",
                       "eval.after=false", "eval.at_warmup_end=false"]


@pytest.mark.parametrize("refill", [False, True], ids=["budget", "refill"])
def test_partial_rollouts_train_whole_groups_and_resume(tmp_path, monkeypatch, refill):
    """With partial rollouts the loss only ever sees whole, finished groups (each once);
    the replay buffer is in the checkpoint, and a run resumed from iteration 3 continues
    the same parked trajectories: same scalars and final weights as the straight run."""
    import kimi_rl.loop as loop

    trained: list[list] = []
    original = loop.optimize

    def recording(cfg, policy, algo, samples, masks, temperature, it):
        trained.append([(s.problem.id, s.group, s.finish_reason, len(s.segments))
                        for s in samples])
        return original(cfg, policy, algo, samples, masks, temperature, it)

    monkeypatch.setattr(loop, "optimize", recording)
    a_dir = tmp_path / "straight"
    partial = PARTIAL + [f"rollout.partial.refill={refill}"]
    run(a_dir, partial + [f"run_dir={a_dir}"])
    groups: dict[int, list] = {}
    for batch in trained:
        batch_groups = {g for _, g, _, _ in batch}
        assert not batch_groups & set(groups), "a group was trained twice"
        for pid, g, reason, _ in batch:
            groups.setdefault(g, []).append((pid, reason))
    assert groups
    for members in groups.values():
        assert len(members) == 4 and len({pid for pid, _ in members}) == 1
        assert all(reason in ("stop", "length", "repeat") for _, reason in members)
    assert max(n for batch in trained for *_, n in batch) > 1, "nothing spanned iterations"

    state = checkpoint.load(a_dir / "checkpoints" / "iter_000003.pt")["rollouts"]
    parked = [t for g in state["groups"] for t in g if t["finish_reason"] is None]
    assert parked, "the checkpoint should hold parked trajectories"
    s = scalars(a_dir)
    for tag in ("partial/buffer_size", "partial/carried_tokens", "partial/masked_fraction",
                "partial/segments_per_trajectory", "rollout/idle_fraction",
                "partial/token_age_mean", "throughput/trained_tokens_per_s"):
        assert tag in s, tag
    assert s["partial/buffer_size"][2] == len(parked)
    assert 0 < max(s["partial/masked_fraction"].values()) < 1
    assert "partial/token_age" in events(a_dir).Tags()["histograms"]

    monkeypatch.setattr(loop, "optimize", original)
    # event files are read in name order, and names start with the second they were
    # opened in: the resumed run's file must come after the straight run's
    time.sleep(1.1)
    b_dir = tmp_path / "resumed"
    shutil.copytree(a_dir, b_dir)
    (b_dir / "checkpoints" / "latest").write_text("iter_000003.pt")
    run(b_dir, partial + [f"run_dir={b_dir}", f"resume={b_dir}"])
    a_s, b_s = scalars(a_dir), scalars(b_dir)
    for tag in a_s:
        if not tag.startswith(CLOCK):
            assert a_s[tag] == b_s[tag], tag
    for name, t in final_weights(a_dir).items():
        assert torch.equal(final_weights(b_dir)[name], t), name
