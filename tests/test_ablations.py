"""The ablation sweep: its configs (conf/experiment/ablation.yaml, conf/ablation/) compose into
exactly the intended runs, and bench/ablations.py reports hand-made run directories."""

from __future__ import annotations

import itertools
import json
import shutil
import statistics
from importlib import resources
from pathlib import Path

import pytest
from conftest import load_bench
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from kimi_rl.config import check_config, register_configs

ROOT = Path(__file__).resolve().parents[1]
ab = load_bench("ablations")


# --- iterations to the threshold ---------------------------------------------------------

def test_curve_and_iterations_to_threshold_by_hand():
    # hardest trained level 5 (trained_levels unsorted on purpose); level 4 is ignored
    summary = {"trained_levels": [1, 5, 4], "iterations": 20,
               "eval_before": {"4": 1.0, "5": 0.30},
               "eval_it4": {"4": 1.0, "5": 0.60},
               "eval_it8": {"4": 0.2, "5": 0.89},
               "eval_it12": {"4": 0.9, "5": 0.90},
               "eval_it16": {"4": 1.0, "5": 0.95},
               "eval_after": {"4": 1.0, "5": 0.70},
               "eval_warmup_end": {"5": 1.0}}  # not on the curve (a duplicate point)
    points = ab.curve(summary)
    assert points == [(0, 0.30), (4, 0.60), (8, 0.89), (12, 0.90), (16, 0.95), (20, 0.70)]
    assert ab.iterations_to(points, 0.9) == 12  # 0.89 is short; exactly 0.90 reaches it
    assert ab.iterations_to(points, 0.6) == 4
    assert ab.iterations_to(points, 0.3) == 0  # already at the SFT start
    assert ab.iterations_to(points, 0.96) is None  # never
    # the last periodic evaluation and eval_after are the same point: one of them
    summary["eval_it20"] = {"5": 0.70}
    assert ab.curve(summary)[-1] == (20, 0.70) and len(ab.curve(summary)) == 6
    # no periodic evaluation: the curve is the start and the end
    assert ab.curve({"trained_levels": [1, 2], "iterations": 3, "eval_before": {"2": 0.1},
                     "eval_after": {"2": 0.95}}) == [(0, 0.1), (3, 0.95)]


# --- the report on hand-made run directories ----------------------------------------------

def _job(sweep: Path, name: str, overrides: list[str], seed: int, summary: dict | None,
         checkpoint: str | None = None) -> None:
    d = sweep / name
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"seed": seed, "iterations": 8}), d / ".hydra" / "config.yaml")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if checkpoint:
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "latest").write_text(checkpoint)


def _summary(before: float, it4: float, it8: float, length: float, tokens: int,
             l1: float) -> dict:
    return {"trained_levels": [1, 2, 3], "iterations": 8,
            "eval_before": {"1": 1.0, "2": 0.9, "3": before},
            "eval_it4": {"1": 1.0, "2": 0.9, "3": it4},
            "eval_it8": {"1": l1, "2": 1.0, "3": it8},
            "eval_after": {"1": l1, "2": 1.0, "3": it8, "4": 0.0},
            "correct_length_final": length, "generated_tokens": tokens, "wall_seconds": 60.0}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """ablation=default,grpo x seed=0,1: default seed 0 reaches 90% at iteration 8, default
    seed 1 (resumed once) never; grpo seed 0 crashed after a checkpoint; grpo seed 1 never
    started."""
    s = tmp_path / "multirun"
    s.mkdir()
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": [
        "experiment=ablation", "ablation=default,grpo", "seed=0,1"]}}}), s / "multirun.yaml")
    _job(s, "0-default-seed0", ["experiment=ablation", "ablation=default", "seed=0"], 0,
         _summary(0.5, 0.7, 0.92, 40.0, 1000, 1.0))
    _job(s, "1-default-seed1", ["experiment=ablation", "ablation=default", "seed=1",
                                "resume=multirun/1-default-seed1"], 1,  # resumed once
         _summary(0.4, 0.6, 0.85, 50.0, 3000, 0.9))
    _job(s, "2-grpo-seed0", ["experiment=ablation", "ablation=grpo", "seed=0"], 0, None,
         checkpoint="iter_000004.pt")
    return s


def test_report_names_failed_and_missing_runs_and_never(sweep, capsys):
    ab.main([str(sweep)])  # the command line, in process
    stdout = capsys.readouterr().out
    result = json.loads(stdout.strip().splitlines()[-1])
    rows = {r["name"]: r for r in result["configurations"]}
    assert list(rows) == ["default", "grpo"]  # job order; named by the one varying key
    d = rows["default"]
    assert (d["runs"], d["finished"], d["seeds"], d["hardest_level"]) == (2, 2, [0, 1], [3])
    acc3 = d["accuracy_end"]["3"]
    assert acc3["mean"] == pytest.approx((0.92 + 0.85) / 2)
    assert acc3["sd"] == pytest.approx(statistics.stdev([0.92, 0.85]))
    assert d["accuracy_end"]["1"]["mean"] == pytest.approx(0.95)
    assert d["accuracy_end"]["4"]["mean"] == 0.0  # untrained levels are reported too
    assert d["iterations_to_threshold"] == {"values": [8, None], "reached": 1,
                                            "mean_of_reached": 8}
    assert d["correct_length"]["mean"] == pytest.approx(45.0)
    assert d["correct_length"]["sd"] == pytest.approx(statistics.stdev([40.0, 50.0]))
    assert d["generated_tokens"]["mean"] == pytest.approx(2000)
    assert d["curves"][1]["points"] == [[0, 0.4], [4, 0.6], [8, 0.85]]
    g = rows["grpo"]
    assert (g["runs"], g["finished"], g["accuracy_end"]) == (2, 0, {})
    # the crashed run and the run that never started are named, not dropped
    assert [(Path(f["dir"]).name, f["seed"]) for f in result["failed"]] == [("2-grpo-seed0", 0)]
    assert "no summary.json" in result["failed"][0]["problem"]
    assert "iter_000004.pt" in result["failed"][0]["problem"]
    assert result["missing"] == [{"overrides": ["experiment=ablation", "ablation=grpo",
                                                "seed=1"], "seed": 1}]
    text = (sweep / "ablations.md").read_text()
    assert text in stdout
    default_line = next(ln for ln in text.splitlines() if ln.startswith("| default"))
    assert "| 2/2 |" in default_line and "8 / never" in default_line
    assert "88.5 ± 4.9" in default_line  # L3: mean 88.5, sd 4.95 (rounded to 4.9)
    assert "FAILED 2-grpo-seed0 (seed 0)" in text
    assert "MISSING experiment=ablation ablation=grpo seed=1" in text
    png = (sweep / "ablations.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and result["plot"] == str(sweep / "ablations.png")


def test_report_reads_jobs_without_multirun_yaml(sweep):
    (sweep / "multirun.yaml").unlink()
    (sweep / "1-default-seed1" / "summary.json").write_text("{not json")
    runs, note = ab.read_sweep(sweep)
    assert "multirun.yaml: not found" in note  # missing runs cannot be known then
    assert [r.dir.name for r in runs] == ["0-default-seed0", "1-default-seed1", "2-grpo-seed0"]
    assert "unreadable" in runs[1].problem and runs[1].summary is None
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ab.read_sweep(sweep / "nope")


def test_report_of_a_sweep_launched_in_parts(sweep, tmp_path, capsys):
    """The fixture's sweep as two multiruns, one per seed, each from its seed's shared cold
    start (sft.from_run, a key that follows the seed): the same configurations as one
    sweep's; a job found in both parts is an error, named."""
    parts = []
    for seed in (0, 1):
        d = tmp_path / f"part{seed}"
        d.mkdir()
        start = f"sft.from_run=/starts/seed{seed}"
        OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": [
            "experiment=ablation", "ablation=default,grpo", f"seed={seed}", start]}}}),
            d / "multirun.yaml")
        for job in sweep.iterdir():
            if job.is_dir() and job.name.endswith(f"seed{seed}"):
                job.rename(d / job.name)
                own = d / job.name / ".hydra" / "overrides.yaml"
                OmegaConf.save(OmegaConf.create(list(OmegaConf.load(own)) + [start]), own)
        parts.append(d)
    ab.main([str(p) for p in parts])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["name"]: r for r in result["configurations"]}
    assert list(rows) == ["default", "grpo"]
    assert (rows["default"]["finished"], rows["default"]["seeds"]) == (2, [0, 1])
    assert rows["default"]["iterations_to_threshold"]["values"] == [8, None]
    assert [Path(f["dir"]).name for f in result["failed"]] == ["2-grpo-seed0"]
    assert rows["default"]["overrides"] == ["experiment=ablation", "ablation=default"]
    assert [m["overrides"][2:] for m in result["missing"]] == [
        ["seed=1", "sft.from_run=/starts/seed1"]]
    assert result["sweep_dirs"] == [str(p) for p in parts]
    assert (parts[0] / "ablations.md").is_file()  # the first part holds the report
    # the same job in two parts would count its seed twice
    shutil.copytree(parts[0] / "0-default-seed0", parts[1] / "9-default-seed0")
    with pytest.raises(SystemExit):
        ab.main([str(p) for p in parts])
    assert "ablation=default seed=0 sft.from_run=/starts/seed0 is in two sweep directories" \
        in capsys.readouterr().err


# --- the recipe composes into the intended runs -------------------------------------------

@pytest.fixture(scope="module")
def composer():
    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        yield lambda overrides: compose("train", overrides=overrides)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_recipe_composes_to_one_change_per_variant_and_seed(composer):
    def make(overrides: list[str]) -> dict:
        return OmegaConf.to_container(composer(overrides))

    default = make(["experiment=ablation"])
    # the default arm is the full recipe: OMD, curriculum + prioritized sampling, length
    # penalty, partial rollouts; a fixed budget with periodic held-out evaluation
    assert default["algo"]["name"] == "omd" and default["curriculum"]["prioritized"]
    assert len(default["curriculum"]["stages"]) > 1
    assert default["reward"]["length_penalty_weight"] > 0
    assert default["rollout"]["partial"]["enabled"]
    assert 0 < default["eval"]["every"] and default["iterations"] % default["eval"]["every"] == 0
    assert not default["sft"]["control"]
    trained = sorted({int(lv) for st in default["curriculum"]["stages"]
                      for lv, w in st["levels"].items() if w > 0})
    uniform = "{" + ",".join(f"{lv}:1.0" for lv in trained) + "}"
    # each variant: the default with what a user would set to switch that component
    plain = {
        "default": [],
        "grpo": ["algo=grpo"],
        "reinforce": ["algo=reinforce"],
        "curriculum_only": ["curriculum.prioritized=false"],
        "uniform": ["curriculum.prioritized=false", f"curriculum.stages=[{{start:0,levels:"
                                                    f"{uniform}}}]"],
        "no_length_penalty": ["reward.length_penalty_weight=0"],
        "no_partial": ["rollout.partial.enabled=false"],
    }
    files = resources.files("kimi_rl.conf").joinpath("ablation").iterdir()
    assert sorted(f.name[:-5] for f in files if f.name.endswith(".yaml")) == sorted(
        [*plain, "none"])  # every variant file is in the recipe, and only those
    jobs = ab.expand_sweep(ab.RECIPE)
    wanted = {(v, s) for v, s in itertools.product(plain, (0, 1, 2))}
    got = [(o["ablation"], int(o["seed"])) for o in
           (dict(x.split("=", 1) for x in job) for job in jobs)]
    assert len(got) == len(wanted) == 21 and set(got) == wanted
    reference = {v: make(["experiment=ablation", *ov]) for v, ov in plain.items()}  # seed 0
    base = _flat(default)
    for job, (variant, seed) in zip(jobs, got, strict=True):
        composed = composer(job)
        check_config(OmegaConf.to_object(composed))  # values the schema's types cannot check
        cfg = OmegaConf.to_container(composed)
        assert cfg["seed"] == seed
        assert {**cfg, "seed": 0} == reference[variant], job  # the seed is all that differs
        changed = {k for k, v in _flat(cfg).items() if k != "seed" and base.get(k) != v}
        assert bool(changed) == (variant != "default"), (job, changed)  # not a no-op
        assert changed <= {k for k in _flat(cfg) if k.split(".")[0] in (
            "algo", "curriculum", "reward", "rollout")}, (job, changed)
        assert cfg["iterations"] == default["iterations"]
        assert cfg["eval"] == default["eval"] and cfg["sft"] == default["sft"]
