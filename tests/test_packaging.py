"""The package works installed from its wheel (configs ship inside it), and a local HF
model directory (Qwen2 family here) trains through the CLI on a JSONL problem file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kimi_rl import checkpoint
from kimi_rl.data import modsum
from kimi_rl.data.tokenizer import char_tokenizer
from kimi_rl.policy.model import load_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_configs_and_composes(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheel_dir), str(ROOT)], check=True)
    (wheel,) = wheel_dir.glob("kimi_rl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for cfg in ("train.yaml", "experiment/demo.yaml", "algo/omd.yaml", "algo/grpo.yaml",
                "long2short.yaml", "method/rl.yaml", "method/dpo.yaml"):
        assert f"kimi_rl/conf/{cfg}" in names
    assert "curriculum/sampler.py" in names
    # install it (not editable) into a directory of its own and compose from there
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True)
    code = ("import kimi_rl, hydra; from kimi_rl.config import register_configs;"
            "register_configs();"
            "hydra.initialize_config_module('kimi_rl.conf', version_base=None);"
            "cfg = hydra.compose('train'); print(kimi_rl.__file__); print(cfg.algo.name)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "omd"


@pytest.mark.slow
def test_local_qwen2_directory_trains_on_a_problem_file(tmp_path):
    tok = char_tokenizer(modsum.vocabulary())
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id))
    model_dir = tmp_path / "qwen2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    problems = tmp_path / "problems.jsonl"
    train, _ = modsum.generate([1, 2], 20, 0, seed=0)
    problems.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer,
                                            "difficulty": p.level}) + "\n" for p in train))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kimi_rl.cli", "train", "model=hf", f"model.path={model_dir}",
           "data=jsonl", f"data.path={problems}", "data.test_per_level=4", "sft.enabled=false",
           "sft.control=false", "iterations=2", "rollout.problems_per_iteration=4",
           "rollout.group_size=2", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
           "curriculum.stages=[{start: 0, levels: {}}]", "progress=false",
           f"run_dir={run}", "num_threads=1",
           # rewards that differ within a group (a random model is never correct): the
           # weights move, so the export can be told apart from the initial model
           "reward.length_penalty_weight=0.5", "reward.length_penalty_warmup=0"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["eval_after"]) == {"1", "2"}
    # the export is the trained policy: transformers loads it directly (AutoModel and
    # AutoTokenizer, nothing of kimi_rl), with the final checkpoint's weights and tokenizer
    reloaded = AutoModelForCausalLM.from_pretrained(run / "hf_model")
    assert isinstance(reloaded, Qwen2ForCausalLM)
    final = checkpoint.load(checkpoint.latest(run))["policy"]["model"]
    exported = reloaded.state_dict()
    assert set(exported) == set(final)
    for name, t in final.items():
        assert torch.equal(exported[name], t), name
    assert any(not torch.equal(final[n], t) for n, t in model.state_dict().items())  # trained
    # transformers' AutoTokenizer rebuilds a qwen2 directory's tokenizer from Qwen2's code
    # (not this character tokenizer); the file itself is exact, and model.path reads it so
    exported_tok = PreTrainedTokenizerFast.from_pretrained(run / "hf_model")
    for prompt in (train[0].prompt, "m6 y0\n"):
        assert exported_tok(prompt).input_ids == tok(prompt).input_ids
        assert load_pretrained(str(run / "hf_model"), "float32")[1](prompt).input_ids == \
            tok(prompt).input_ids
    assert exported_tok.eos_token_id == tok.eos_token_id


def test_default_run_directory_is_made_under_runs(tmp_path):
    """Without run_dir, the run (and Hydra's own files) go to runs/<date>/<time>/."""
    cmd = [sys.executable, "-m", "kimi_rl.cli", "train", "iterations=0", "sft.enabled=false",
           "sft.control=false", "eval.before=false", "eval.after=false", "progress=false",
           "data.train_per_level=20", "data.test_per_level=2"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, text=True)
    (run,) = (tmp_path / "runs").glob("*/*")
    assert (run / "summary.json").is_file() and (run / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_sft_then_eval_commands(tmp_path):
    """`kimi-rl sft` writes an HF model directory that `kimi-rl eval` evaluates; `kimi-rl
    eval eval.checkpoint=<run>` evaluates a training run's latest checkpoint."""
    small = ["data.train_per_level=30", "data.test_per_level=3", "model.hidden_size=32",
             "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
             "model.intermediate_size=64", "num_threads=1", "progress=false",
             "eval.max_new_tokens=16"]
    cli = [sys.executable, "-m", "kimi_rl.cli"]

    def run(*commands):
        """The commands at once (one thread each), each to completion without error."""
        procs = [subprocess.Popen([*cli, *args, *small], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for args in commands]
        for args, proc in zip(commands, procs, strict=True):
            out = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, (args, out[-3000:])

    # sft then its eval, beside RL then its checkpoint's eval
    run(("sft", "sft.steps=3", f"run_dir={tmp_path / 'sft'}"),
        ("train", "iterations=1", "sft.enabled=false", "sft.control=false",
         "rollout.problems_per_iteration=2", "rollout.group_size=2",
         "rollout.max_new_tokens=8", f"run_dir={tmp_path / 'rl'}"))
    run(("eval", "model=hf", f"model.path={tmp_path / 'sft' / 'hf_model'}",
         f"run_dir={tmp_path / 'ev1'}"),
        ("eval", f"eval.checkpoint={tmp_path / 'rl'}", f"run_dir={tmp_path / 'ev2'}"))
    levels = {"1", "2", "3", "4", "5", "6"}
    assert set(json.loads((tmp_path / "ev1" / "eval.json").read_text())["accuracy"]) == levels
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    evaluated = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert evaluated["accuracy"] == summary["eval_after"]  # same weights, greedy
