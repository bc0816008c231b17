"""The megatron policy backend: real megatron-core over gloo, real torchrun (2 processes).

megatron-core hard-codes CUDA; this machine has none, so every megatron process here runs
with tests/megatron on PYTHONPATH, whose sitecustomize.py maps its CUDA calls to the CPU
(test-only; the product never imports it). References are independent: the hf backend on
the same weights (a single-process transformers model), transformers' own SmolLM2-135M,
and the weights a run gathered before it was resharded. Each torchrun launch costs
seconds, so each runs several checks (tests/megatron/parallel_checks.py) and fixtures
share the launches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_partial_run_matches,
    assert_replica_shares,
    assert_resumed_iteration_matches,
)
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaConfig, Qwen2Config

from kimi_rl.config import AlgoConfig, BackendConfig
from kimi_rl.policy import megatron_convert as mc

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "megatron"
TORCHRUN = Path(sys.executable).parent / "torchrun"
TOL = 1e-5  # relative, float32
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=2",
        "model.intermediate_size=64", "data.levels=[1,2,3]", "data.train_per_level=30",
        "data.test_per_level=2", "data.demos={1:40,2:0,3:0,4:0,5:0,6:0}", "sft.steps=3",
        "sft.batch_size=8", "rollout.problems_per_iteration=4", "rollout.group_size=4",
        "rollout.max_new_tokens=24", "eval.max_new_tokens=24", "progress=false",
        "num_threads=1", "curriculum=all_levels", "iterations=3", "checkpoint_every=2"]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    e["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), str(ROOT), e.get("PYTHONPATH", "")])
    return e


def launch(args: list[str], timeout: int = 240) -> str:
    """Run a command (in its own process group, all of it killed on timeout); its stdout."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        out, err = proc.communicate()
        raise AssertionError(f"{shlex.join(args)} timed out after {timeout} s:\n"
                             f"{err[-6000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{shlex.join(args)} failed ({proc.returncode}):\n"
                             f"{out[-3000:]}\n{err[-6000:]}")
    return out


def torchrun(args: list[str]) -> str:
    return launch([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args])


def readme_command(flag: str) -> list[str]:
    """The README's one-node torchrun line for `flag`, with this venv's torchrun."""
    text = (ROOT / "README.md").read_text()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("torchrun ") and ln.rstrip().endswith(flag))
    return [str(TORCHRUN), *shlex.split(line)[1:]]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron")


# --- conversion (pure functions, no megatron) ---------------------------------------------

def hf_weights(arch: str, tie: bool, heads: int = 4, kv: int = 2, vocab: int = 44):
    cls = LlamaConfig if arch == "llama" else Qwen2Config
    config = cls(vocab_size=vocab, hidden_size=24, intermediate_size=48, num_hidden_layers=4,
                 num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model.config, {k: v for k, v in model.state_dict().items()
                          if not (tie and k == "lm_head.weight")}


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2), (3, 4)])
def test_conversion_round_trip_exact(arch, tie, tp, pp):
    heads, kv = (6, 3) if tp == 3 else (4, 2)  # tp=3 also pads the vocabulary (44 -> 45)
    config, hf = hf_weights(arch, tie, heads, kv)
    shape = mc.model_shape(config)
    back = {}
    for p in range(pp):
        shards = [mc.hf_to_megatron(hf, shape, t, tp, p, pp) for t in range(tp)]
        if p == 0:
            assert shards[0]["embedding.word_embeddings.weight"].shape[0] == -(-44 // tp)
        stage = mc.megatron_to_hf(mc.tp_merge(shards), shape, p, pp)
        expected = mc.hf_shapes(shape, p, pp)
        assert list(stage) == list(expected)  # names, in export order
        assert {k: tuple(v.shape) for k, v in stage.items()} == expected
        back.update(stage)
    assert set(back) == set(hf)
    for k, v in hf.items():
        assert torch.equal(back[k], v), k


def test_megatron_layout_per_query_group():
    """linear_qkv holds, per key/value group g: its query heads, then k_g, then v_g; fc1 is
    [gate; up] and TP rank r holds the r-th half of each (megatron's layouts)."""
    config, hf = hf_weights("qwen2", False, heads=4, kv=2)
    shape = mc.model_shape(config)
    d = shape.head_dim
    full = mc.hf_to_megatron(hf, shape)
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"].reshape(2, 4 * d, -1)
    q = hf["model.layers.1.self_attn.q_proj.weight"].reshape(4, d, -1)
    k = hf["model.layers.1.self_attn.k_proj.weight"].reshape(2, d, -1)
    v = hf["model.layers.1.self_attn.v_proj.weight"].reshape(2, d, -1)
    for g in range(2):
        assert torch.equal(qkv[g, :2 * d], q[2 * g:2 * g + 2].reshape(2 * d, -1))
        assert torch.equal(qkv[g, 2 * d:3 * d], k[g])
        assert torch.equal(qkv[g, 3 * d:], v[g])
    rank1 = mc.hf_to_megatron(hf, shape, tp_rank=1, tp_size=2)
    fc1 = rank1["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:24], hf["model.layers.0.mlp.gate_proj.weight"][24:])
    assert torch.equal(fc1[24:], hf["model.layers.0.mlp.up_proj.weight"][24:])
    assert torch.equal(rank1["decoder.layers.0.self_attention.linear_qkv.weight"],
                       full["decoder.layers.0.self_attention.linear_qkv.weight"][4 * d:])


def test_bad_settings_are_named():
    config, _ = hf_weights("llama", True, heads=4, kv=2)
    shape = mc.model_shape(config)
    with pytest.raises(ValueError, match="tensor_parallel=4 does not divide the model's "
                                         "key/value heads"):
        mc.check_parallel(shape, 4, 1)
    with pytest.raises(ValueError, match="pipeline_parallel=3 does not divide"):
        mc.check_parallel(shape, 1, 3)
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}
    with pytest.raises(ValueError, match="rope scaling"):
        mc.model_shape(config)
    from kimi_rl.policy.megatron import MegatronPolicy

    class HF:  # enough of an HF model for the checks made before any process group
        config = hf_weights("llama", True)[0]

    if importlib.util.find_spec("transformer_engine") is None:  # what to install is named
        with pytest.raises(ValueError, match=re.escape(
                "backend.transformer_impl=transformer_engine") + ".*Transformer Engine is not "
                "installed: pip install .*transformer-engine"):
            MegatronPolicy(HF, BackendConfig(name="megatron",
                                             transformer_impl="transformer_engine"), AlgoConfig())
    with pytest.raises(ValueError, match="backend.context_parallel=0: must be >= 1"):
        MegatronPolicy(HF, BackendConfig(name="megatron", context_parallel=0), AlgoConfig())
    with pytest.raises(ValueError, match="transformer_impl='fused'"):
        MegatronPolicy(HF, BackendConfig(name="megatron", transformer_impl="fused"), AlgoConfig())
    with pytest.raises(ValueError, match="gradient_checkpointing=true means full"):
        MegatronPolicy(HF, BackendConfig(name="megatron", recompute="selective",
                                         gradient_checkpointing=True), AlgoConfig())
    with pytest.raises(ValueError, match="sequence_parallel needs"):
        MegatronPolicy(HF, BackendConfig(name="megatron", sequence_parallel=True), AlgoConfig())
    if not torch.cuda.is_available():  # this process has no CUDA patch: a clear refusal
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            MegatronPolicy(HF, BackendConfig(name="megatron"), AlgoConfig())


def test_cpu_patch_stays_in_tests():
    for path in (ROOT / "kimi_rl").rglob("*.py"):
        assert "sitecustomize" not in path.read_text(), path


# --- against the hf backend, under torchrun ------------------------------------------------

@pytest.fixture(scope="module")
def layouts(tmp) -> dict:
    """TP=2, PP=2, DP=2 and CP=2 (one launch: each torchrun start costs seconds); the TP=2
    layout also saves a sharded checkpoint."""
    torchrun([str(SCRIPTS / "parallel_checks.py"), "--layouts", "tp2,pp2,dp,cp2",
              "--out", str(tmp / "layouts.json"), "--save", str(tmp / "ckpt_tp2")])
    return json.loads((tmp / "layouts.json").read_text())


def test_a_second_layout_in_one_process_is_refused(layouts):
    """A policy asking for another TP/PP than the process's megatron state has fails at
    start (megatron would otherwise keep the old layout silently)."""
    assert layouts["tp2"]["other_layout_refused"] is None  # the first: nothing to refuse
    assert layouts["pp2"]["other_layout_refused"] is True
    assert layouts["dp"]["other_layout_refused"] is True


@pytest.fixture(scope="module")
def tp2(layouts) -> dict:
    return layouts["tp2"]


@pytest.fixture(scope="module")
def pp2(layouts) -> dict:
    return layouts["pp2"]


@pytest.fixture(scope="module")
def dp2(layouts) -> dict:
    return layouts["dp"]


def check_report(r: dict) -> None:
    assert r["export_exact"]
    # exported a layer at a time: the largest bucket is one layer of two (~43%)
    assert r["export_peak_fraction"] < 0.5, r["export_peak_fraction"]
    assert len(set(r["micro_batches"].split())) > 1  # micro-batches of different shapes
    for key in ("logprobs", "entropy", "loss", "grads", "grad_norm"):
        assert r[key] < TOL, (key, r[key])
    # one Adam step: the first step is ~lr * sign(grad), sensitive where a gradient is
    # near 0; the gradients themselves are checked to TOL above
    assert r["step_weights"] < 0.1 * r["moved"], r


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_sequence_parallel"])
def test_tensor_parallel_matches_hf(tp2, name):
    check_report(tp2[name])


def test_activation_recompute_matches_hf(tp2):
    """backend.recompute at TP=2: selective recomputes each layer's core attention in
    backward (its forward runs twice, the MLP's once), full the whole layer (both twice);
    without it each runs once. Gradients and the step as without recompute."""
    assert tp2["llama"]["calls_per_micro_batch"] == {"core_attention": 1, "mlp": 1}
    assert tp2["llama_recompute_selective"]["calls_per_micro_batch"] == {
        "core_attention": 2, "mlp": 1}
    assert tp2["llama_recompute_full"]["calls_per_micro_batch"] == {"core_attention": 2, "mlp": 2}
    for mode in ("selective", "full"):
        check_report(tp2[f"llama_recompute_{mode}"])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_pipeline_parallel_matches_hf(pp2, name):
    check_report(pp2[name])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_context_parallel_matches_hf(layouts, name):
    """Two processes, CP=2 (local layers, keys and values all-gathered over the CP group):
    each rank's attention runs on its half of the padded THD tokens, and logprobs,
    gradients and the step equal the one-process hf backend's."""
    r = layouts["cp2"][name]
    check_report(r)
    assert r["attention_queries"] == r["cp_share"] < r["batch_tokens"]
    assert layouts["cp2"]["other_layout_refused"] is True


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_data_parallel_matches_hf(dp2, name):
    """Two processes, TP=PP=1: the micro-batches split over the two data-parallel ranks
    (distributed optimizer), gradients summed."""
    check_report(dp2[name])


def test_vocab_parallel_logprobs_padded_vocabulary(tp2):
    """The output-layer path alone over TP=2, vocabulary 45 padded to 46 (garbage in the
    padded row), in chunks: logprobs, entropies and both gradients vs float64."""
    r = tp2["padded_vocab"]
    assert r["rows_per_rank"] == 23
    for key in ("logprobs", "entropy", "grad_h", "grad_w"):
        assert r[key] < TOL, (key, r)


def test_checkpoint_reshards_tp2_to_tp1(tp2, tmp):
    """A TP=2 checkpoint (model and Adam state) loads at TP=1 in one process: the same
    weights, and its next step equals the one the TP=2 run took after saving."""
    launch([sys.executable, str(SCRIPTS / "parallel_checks.py"), "--load",
            str(tmp / "ckpt_tp2"), "--out", str(tmp / "load.json")])
    r = json.loads((tmp / "load.json").read_text())
    assert r["load"] == 0.0 and r["load_names"] == []
    assert r["step_after_load"] < TOL, r
    assert r["step_fresh_adam"] > 100 * max(r["step_after_load"], 1e-9), r  # Adam state used


def test_smollm2_same_logits_as_transformers():
    out = launch([sys.executable, str(SCRIPTS / "smollm2_logits.py")])
    r = json.loads(out.strip().splitlines()[-1])
    assert r["vocab"] == 49152 and r["layers"] == 30
    assert r["logits"] < TOL and r["logprobs"] < TOL, r
    assert r["packed_rows"][0] == 1  # three sequences packed in one row
    assert r["entropy"] < 1e-3, r  # a sum over 49K terms in float32


# --- the loop under torchrun ------------------------------------------------------------

def scalars(run: Path) -> dict[str, dict[int, float]]:
    events = list((run / "tb").glob("events.*"))
    assert len(events) == 1, events  # rank 0 alone writes TensorBoard
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


# wrong answers of different lengths rewarded differently from the start: a gradient at
# the first iteration, where this barely trained model answers nothing right
GRADIENT = ["reward.length_penalty_weight=0.5", "reward.length_penalty_warmup=0"]


@pytest.fixture(scope="module")
def tp2_run(tmp) -> Path:
    run = tmp / "run_tp2"
    torchrun_args = readme_command("backend.tensor_parallel=2")
    # two rollout replicas (one per rank) beside the trainer's TP=2
    out = launch(torchrun_args + TINY + GRADIENT + [f"run_dir={run}", "sft.control=false",
                                         "rollout.replicas=0"])
    (run.parent / "run_tp2.stdout").write_text(out)
    return run


@pytest.fixture(scope="module")
def hf_run(tmp) -> Path:
    """The same first iteration in one process with the hf backend."""
    run = tmp / "run_hf"
    launch([sys.executable, "-m", "kimi_rl.cli", "train", *TINY, *GRADIENT,
            f"run_dir={run}", "sft.control=false", "iterations=1"])
    return run


def test_loop_tensor_parallel(tp2_run, hf_run):
    """The README's TP=2 command: a few iterations; outputs written once; the first
    iteration (same rollouts, same weights) trains like the hf backend."""
    ckpts = tp2_run / "checkpoints"
    assert (ckpts / "latest").read_text() == "iter_000003.pt"
    assert (ckpts / "iter_000003.policy" / "metadata.json").is_file()
    summary = json.loads((tp2_run / "summary.json").read_text())
    assert summary["iterations"] == 3 and "eval_after" in summary
    assert load_file(tp2_run / "hf_model" / "model.safetensors")
    # Hydra's files and the final JSON line come from rank 0 alone
    assert (tp2_run / ".hydra" / "config.yaml").is_file()
    assert [p.name for p in tp2_run.glob("*.log")] == ["cli.log"]
    out = (tp2_run.parent / "run_tp2.stdout").read_text()
    assert sum(line.startswith("{") and '"wall_seconds"' in line
               for line in out.splitlines()) == 1, out
    mega, ref = scalars(tp2_run), scalars(hf_run)
    assert mega["reward/mean"][0] == ref["reward/mean"][0]
    # two rollout replicas generated disjoint shares that make the whole batch (every rank
    # ends the iteration with the same batch: the run checks it, see check_same), and the
    # batch is the one-process run's (same tokens: same lengths, same rewards)
    assert ref["rollout/replicas"][0] == 1 and mega["rollout/replicas"][0] == 2
    assert_replica_shares(mega, 3)
    for tag in ("rollout/generated_tokens", "response_length/mean", "accuracy/train"):
        assert mega[tag][0] == ref[tag][0], tag
    assert mega["train/grad_norm"][0] > 0
    for tag in ("loss/policy", "train/entropy", "train/grad_norm"):
        assert abs(mega[tag][0] - ref[tag][0]) <= 1e-4 * abs(ref[tag][0]) + 1e-7, tag


def test_loop_context_parallel(tmp, hf_run):
    """The README's CP=2 command: every sequence split over the two ranks; the first
    iteration (same rollouts, same weights) trains like the one-process hf backend."""
    run = tmp / "run_cp2"
    launch(readme_command("backend.context_parallel=2") + TINY + GRADIENT
           + [f"run_dir={run}", "sft.control=false", "iterations=2"])
    assert json.loads((run / "summary.json").read_text())["iterations"] == 2
    mega, ref = scalars(run), scalars(hf_run)
    for tag in ("rollout/generated_tokens", "reward/mean", "accuracy/train"):
        assert mega[tag][0] == ref[tag][0], tag
    assert mega["train/grad_norm"][0] > 0
    for tag in ("loss/policy", "train/entropy", "train/grad_norm"):
        assert abs(mega[tag][0] - ref[tag][0]) <= 1e-4 * abs(ref[tag][0]) + 1e-7, tag


def test_resume_at_tp1_has_the_gathered_weights(tp2_run, tmp):
    """The TP=2 run resumed in one process (TP=1, no torchrun): its policy is the one the
    TP=2 run gathered into hf_model/."""
    run = tmp / "run_resumed"
    shutil.copytree(tp2_run, run)
    gathered = load_file(run / "hf_model" / "model.safetensors")
    shutil.rmtree(run / "hf_model")
    launch([sys.executable, "-m", "kimi_rl.cli", "train", *TINY, f"resume={run}",
            "sft.control=false", "backend=megatron"])
    resumed = load_file(run / "hf_model" / "model.safetensors")
    assert set(resumed) == set(gathered)
    for k, v in gathered.items():
        assert torch.equal(resumed[k], v), k


def test_loop_pipeline_parallel(tmp):
    """The README's PP=2 command, with the SFT control (a side checkpoint of the sharded
    policy, loaded back after RL)."""
    run = tmp / "run_pp2"
    launch(readme_command("backend.pipeline_parallel=2") + TINY
           + [f"run_dir={run}", "sft.control=true"])
    summary = json.loads((run / "summary.json").read_text())
    assert {"eval_before", "eval_after", "sft_control"} <= set(summary)
    assert (run / "checkpoints" / "sft_start.policy" / "metadata.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == [
        "iter_000002.policy", "iter_000002.pt", "iter_000003.policy", "iter_000003.pt"]


# partial rollouts on, a gradient at every iteration, micro-batches small enough for both
# ranks to get some
PARTIAL = ["rollout.partial.enabled=true", "rollout.partial.budget=16",
           "backend.micro_batch_tokens=256", *GRADIENT, "sft.control=false"]


@pytest.fixture(scope="module")
def dp2_run(tmp) -> Path:
    run = tmp / "run_dp2"
    out = launch(readme_command("backend=megatron rollout.replicas=0") + TINY + PARTIAL
                 + [f"run_dir={run}"])
    (tmp / "run_dp2.stdout").write_text(out)
    return run


def test_loop_data_parallel(dp2_run, tmp):
    """The README's data-parallel command (TP=1, DP=2, one rollout replica per rank) with
    partial rollouts: each rank generates its replica's share, every rank ends each
    iteration with the same batch (the run checks it), and the batches and the first
    trained iteration are a one-process hf run's (same tokens; training figures within
    float rounding: the distributed optimizer sums the ranks' gradients). This barely
    trained model samples `<pad>`, so the gradient includes the pad row's, which HF's
    padding_idx rule decides (kimi_rl/policy/megatron.py reproduces it)."""
    assert (dp2_run / "checkpoints" / "latest").read_text() == "iter_000003.pt"
    assert (dp2_run / "checkpoints" / "iter_000003.policy" / "metadata.json").is_file()
    assert json.loads((dp2_run / "summary.json").read_text())["iterations"] == 3
    out = (tmp / "run_dp2.stdout").read_text()
    assert sum(ln.startswith("{") and '"wall_seconds"' in ln for ln in out.splitlines()) == 1
    one = tmp / "run_hf_partial"
    launch([sys.executable, "-m", "kimi_rl.cli", "train", *TINY, *PARTIAL, f"run_dir={one}",
            "iterations=2"])
    dp, ref = scalars(dp2_run), scalars(one)
    assert ref["rollout/replicas"][0] == 1 and dp["rollout/replicas"][0] == 2
    assert_replica_shares(dp, 3)
    assert_partial_run_matches(dp, ref)


def test_data_parallel_resumes_in_one_process(dp2_run, tmp):
    """The DP=2 run's iteration-2 checkpoint (Megatron's distributed checkpoint, partial
    rollouts' buffer) resumed in one process: iteration 3 draws the samples the DP=2 run
    drew (sampling keyed by problem, sample and segment, not by replica or world)."""
    run = tmp / "run_dp2_resumed"
    shutil.copytree(dp2_run, run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "iter_000003.policy")
    (ckpts / "iter_000003.pt").unlink()
    (ckpts / "latest").write_text("iter_000002.pt")
    shutil.rmtree(run / "tb")
    launch([sys.executable, "-m", "kimi_rl.cli", "train", *TINY, *PARTIAL, f"resume={run}",
            "backend=megatron"])
    assert_resumed_iteration_matches(scalars(dp2_run), scalars(run))


def test_logprob_memory_bench_quick():
    """bench/logprob_memory.py --quick runs and reports its measurement (the full-size
    figure is in bench/RESULTS.md); the chunked path stays far below the full logits."""
    out = launch([sys.executable, str(ROOT / "bench" / "logprob_memory.py"), "--quick"])
    r = json.loads(out.strip().splitlines()[-1])
    assert r["tokens"] == 2048 and r["vocab"] == 32768 and r["chunk"] == 512
    assert 0 < r["peak_above_model_gib"] < 2.0 and r["under_2_gib"]
    assert -12 < r["mean_logprob"] < -8  # near-uniform predictions over 32K words: ~log(1/32768)
