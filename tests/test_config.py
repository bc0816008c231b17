"""The Hydra config shipped in the package: composition, typos, and user-facing errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from kimi_rl.config import TrainConfig, register_configs
from kimi_rl.data import TaskData, load_task


@pytest.fixture(scope="module", autouse=True)
def _registered() -> None:
    register_configs()


def make(overrides: list[str] | None = None, root: str = "train"):
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return compose(root, overrides=overrides or [])


def options(group: str) -> list[str]:
    files = resources.files("kimi_rl.conf").joinpath(group).iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def load_yaml(name: str) -> dict:
    text = resources.files("kimi_rl.conf").joinpath(name).read_text()
    return OmegaConf.to_container(OmegaConf.create(text))


def assert_subset(sub, full, where: str) -> None:
    """Every value set in `sub` (a YAML file) is what the composed config holds."""
    if isinstance(sub, dict):
        for k, v in sub.items():
            assert_subset(v, full[k], f"{where}.{k}")
    else:
        assert sub == (OmegaConf.to_container(full) if OmegaConf.is_config(full) else full), where


def test_default_composes_to_the_demo():
    cfg = make()
    demo = load_yaml("experiment/demo.yaml")
    for entry in demo.pop("defaults", []):  # e.g. {"override /curriculum": "easy_to_hard"}
        for key, option in entry.items():
            group = key.split("/")[-1]
            assert_subset(load_yaml(f"{group}/{option}.yaml"), cfg[group], group)
    # every value the demo experiment sets is in the composed config
    assert_subset(demo, cfg, "cfg")
    assert OmegaConf.get_type(cfg) is TrainConfig
    assert cfg.model.path is None and cfg.algo.name == "omd"
    # the schema is complete: no key of the dataclass is missing from the result
    assert set(cfg.keys()) == set(OmegaConf.structured(TrainConfig).keys())


def test_every_group_option_composes():
    groups = [g.name for g in resources.files("kimi_rl.conf").iterdir()
              if g.is_dir() and not g.name.startswith("_")]
    assert {"algo", "model", "backend", "rollout", "curriculum", "data"} <= set(groups)
    assert {"omd", "grpo", "reinforce"} <= set(options("algo"))
    for name in options("algo"):
        cfg = make([f"algo={name}"])
        assert cfg.algo.name == name
        OmegaConf.to_object(cfg)  # every value has its declared type
    for group in groups:
        for name in options(group):
            extra = {"model": ["model.path=/some/dir"], "data": ["data.path=/some/file"]}
            # method: the group of `kimi-rl long2short`'s root config
            root = "long2short" if group == "method" else "train"
            cfg = make([f"{group}={name}", *extra.get(group, [])], root)
            assert OmegaConf.get_type(cfg) is TrainConfig
            if group == "method":
                assert cfg.long2short.method == name
                OmegaConf.to_object(cfg)


def test_long2short_needs_a_method():
    with pytest.raises(ConfigCompositionException, match="You must specify .method."):
        make([], "long2short")


@pytest.mark.parametrize("override, name", [
    ("algo.tua=1", "tua"),
    ("rollout.temprature=0.5", "temprature"),
    ("itrations=3", "itrations"),
])
def test_unknown_key_names_it(override, name):
    with pytest.raises(ConfigCompositionException) as err:
        make([override])
    assert name in str(err.value)
    assert f"Key '{name}' not in" in str(err.value.__cause__)  # the schema rejected it


def test_wrong_value_type_fails():
    with pytest.raises(ConfigCompositionException) as err:
        make(["algo.tau=abc"])
    assert "algo.tau" in str(err.value) + str(err.value.__cause__)


def test_misspelt_group_option_fails():
    with pytest.raises(MissingConfigException) as err:
        make(["algo=omdd"])
    assert "omdd" in str(err.value)
    with pytest.raises(ConfigCompositionException, match="modle"):
        make(["modle=tiny"])


def test_overrides_apply():
    cfg = make(["algo=grpo", "algo.clip_eps=0.3", "rollout.group_size=4", "seed=5"])
    assert (cfg.algo.name, cfg.algo.clip_eps, cfg.rollout.group_size, cfg.seed) == (
        "grpo", 0.3, 4, 5)


def test_one_key_of_an_int_keyed_mapping():
    # the command line's way (kimi-rl train data.flawed.2=0.5): hydra_overrides, then int_keys
    from kimi_rl.cli import hydra_overrides
    from kimi_rl.config import int_key_override, int_keys

    line = ["experiment=smollm2_gym", "data.flawed.2=0.5", "data.flawed.4=0.25",
            "data.rg_levels.chain_sum.2.max_terms=5", "curriculum.stages.0.levels.1=3.0",
            "data.rg_demos.chain_sum.1=50", "data.demos.6=7", "seed=2"]
    overrides = hydra_overrides(line)
    assert overrides == [line[0], *("++" + o for o in line[1:-1]), "seed=2"]
    cfg = make(overrides)
    int_keys(cfg)
    plain = OmegaConf.to_container(cfg)
    data = plain["data"]
    base = OmegaConf.to_container(make(["experiment=smollm2_gym"]))  # the experiment's own
    was = base["data"]
    assert (was["flawed"][2], was["rg_levels"]["chain_sum"][2]["max_terms"],
            was["rg_demos"]["chain_sum"][1]) != (0.5, 5, 50) and 4 not in was["flawed"]
    assert data["flawed"] == {**was["flawed"], 2: 0.5, 4: 0.25}
    assert data["rg_levels"]["chain_sum"][2] == {  # the other settings of level 2 kept
        **was["rg_levels"]["chain_sum"][2], "max_terms": 5}
    assert data["rg_levels"]["chain_sum"][1] == was["rg_levels"]["chain_sum"][1]
    assert data["rg_demos"] == {"chain_sum": {**was["rg_demos"]["chain_sum"], 1: 50}}
    assert data["demos"] == {**TrainConfig().data.demos, 6: 7}
    assert plain["curriculum"]["stages"][0]["levels"] == {
        **base["curriculum"]["stages"][0]["levels"], 1: 3.0}
    assert plain["seed"] == 2
    for mapping in (data["flawed"], data["demos"], data["rg_levels"]["chain_sum"]):
        assert all(type(k) is int for k in mapping)
    # whole mappings and other keys pass unchanged
    assert not int_key_override("data.flawed={2: 0.5}") and not int_key_override("seed=2")
    assert not int_key_override("data.flaw=slip")
    bad = make(["experiment=smollm2_gym", "+data.flawed.two=0.5"])
    with pytest.raises(ValueError, match="data.flawed.two: must be an integer key"):
        int_keys(bad)


@pytest.mark.parametrize("overrides", [["model.path=/nonexistent/dir"],
                                       ["model=hf", "model.path=/nonexistent/dir"]])
def test_build_policy_missing_model_dir(overrides):
    from kimi_rl.build import build_policy

    cfg = make(overrides)
    task = TaskData(train=[], test=[], vocabulary=["a"])
    with pytest.raises(FileNotFoundError, match="/nonexistent/dir"):
        build_policy(cfg, task)


def test_build_policy_tiny_from_config():
    from kimi_rl.build import build_engine, build_policy

    cfg = make(["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
                "model.num_kv_heads=2", "model.intermediate_size=64",
                "data.levels=[1,2,3,4,5]", "data.demos={6:0}", "data.train_per_level=5",
                "data.test_per_level=2"])
    task = load_task(cfg.data)
    policy, tokenizer = build_policy(cfg, task)
    assert policy.model.config.hidden_size == 32
    assert policy.model.config.vocab_size == len(tokenizer)
    engine = build_engine(cfg, policy, tokenizer)
    assert engine.model is not policy.model


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kimi_rl.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_unknown_key_exits_nonzero(tmp_path):
    proc = run_cli("train", "algo.tua=1", cwd=tmp_path)
    assert proc.returncode != 0
    assert "tua" in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists(), "nothing ran"


def test_cli_usage(tmp_path):
    proc = run_cli("bogus", cwd=tmp_path)
    assert proc.returncode != 0
    assert "usage" in proc.stderr


@pytest.mark.parametrize(("name", "caps"), [
    ("long_cot_32k", [8192, 16384, 32768]),
    ("long_cot_128k", [16384, 32768, 65536, 131072]),
])
def test_long_cot_experiments(name, caps):
    """The production recipes: a growing max response length, partial rollouts with a
    budget below it, and values check_config accepts."""
    from kimi_rl.config import check_config

    cfg = make([f"experiment={name}", "model.path=/some/dir", "data.path=/some/file"])
    check_config(cfg)
    ro = cfg.rollout
    assert [ro.max_new_tokens, *ro.max_new_tokens_schedule.values()] == caps
    assert ro.partial.enabled and ro.partial.refill and ro.partial.budget == caps[0]
    assert ro.partial.budget * ro.partial.max_trajectory_age >= caps[-1]
    assert cfg.model.path == "/some/dir" and cfg.data.path == "/some/file"


def test_demo_uses_partial_rollouts():
    from kimi_rl.config import check_config

    cfg = make()
    check_config(cfg)
    assert cfg.rollout.partial.enabled
    assert cfg.rollout.partial.budget < cfg.rollout.max_new_tokens


@pytest.mark.parametrize("native", [True, False])
def test_smollm2_gym_recipe(monkeypatch, tmp_path, native):
    """The pretrained-model recipe: SmolLM2's directory from ${smollm2:}, bfloat16 only
    where it is native, the chat format on reasoning-gym with vLLM, values check_config
    accepts, and RL trained on the levels the cold start's flawed teacher demonstrated."""
    import kimi_rl.policy.model as model
    from kimi_rl import host
    from kimi_rl.config import check_config

    monkeypatch.setattr(model, "smollm2_dir", lambda: tmp_path / "smollm2")
    monkeypatch.setattr(host, "native_bfloat16", lambda: native)
    cfg = make(["experiment=smollm2_gym"])
    check_config(cfg)
    assert cfg.model.path == str(tmp_path / "smollm2")
    assert (cfg.backend.autocast, cfg.rollout.dtype) == (
        ("bfloat16", "bfloat16") if native else (None, "float32"))
    assert (cfg.prompt.format, cfg.rollout.engine, cfg.data.task) == (
        "chat", "vllm", "reasoning_gym")
    assert cfg.sft.enabled and cfg.sft.control
    demonstrated = {int(lv) for lv in cfg.data.rg_demos.chain_sum}
    trained = {int(lv) for st in cfg.curriculum.stages for lv, w in st.levels.items() if w > 0}
    assert trained == demonstrated
    assert {int(lv) for lv, share in cfg.data.flawed.items() if share > 0} == trained
    assert cfg.data.flaw == "stop_early"
