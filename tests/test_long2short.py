"""Long2short: merging, shortest-correct selection, DPO pairs and loss (against formulas
computed another way), the packed DPO step's gradient, and the command on a tiny setup."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.functional import log_softmax

from kimi_rl.config import AlgoConfig, BackendConfig, DPOConfig
from kimi_rl.data.problems import Problem
from kimi_rl.long2short import (
    dpo_loss,
    dpo_pairs,
    dpo_step,
    merge_state_dicts,
    sequence_logprobs,
    shortest_correct,
)
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.sft import load_demos, write_demos

# --- merging ------------------------------------------------------------------------------


def test_merge_is_the_exact_weighted_average(make_model):
    a, b, c = (make_model(seed=s).state_dict() for s in (0, 1, 2))
    merged = merge_state_dicts([a, b], [0.3, 0.7])
    assert merged.keys() == a.keys()
    for key, t in merged.items():
        want = (0.3 * a[key].double() + 0.7 * b[key].double()).float()
        assert t.dtype == a[key].dtype
        assert torch.equal(t, want), key
    # element by element on one entry, by hand
    key = "model.layers.0.mlp.up_proj.weight"
    x, y = float(a[key][3, 5]), float(b[key][3, 5])
    assert float(merged[key][3, 5]) == pytest.approx(0.3 * x + 0.7 * y, rel=1e-6)
    three = merge_state_dicts([a, b, c], [0.5, 0.25, 0.25])
    assert torch.allclose(three[key], 0.5 * a[key] + 0.25 * b[key] + 0.25 * c[key])
    # the weight 1 on a model returns it; the inputs are left alone
    assert all(torch.equal(merge_state_dicts([a, b], [0.0, 1.0])[k], b[k]) for k in b)
    assert not torch.equal(a[key], b[key])


def test_merge_names_the_first_mismatch(make_model):
    a = make_model(seed=0).state_dict()
    wide = make_model(seed=1, intermediate_size=96).state_dict()
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has "
                       r"shape \[64, 32\] in long but \[96, 32\] in short"):
        merge_state_dicts([a, wide], [0.5, 0.5], ["long", "short"])
    deep = make_model(seed=1, num_layers=3).state_dict()
    with pytest.raises(ValueError, match=r"'model\.layers\.2\..*' of short is missing in long"):
        merge_state_dicts([a, deep], [0.5, 0.5], ["long", "short"])
    with pytest.raises(ValueError, match="sum to 1"):
        merge_state_dicts([a, a], [0.5, 0.6])


# --- shortest correct and DPO pairs -------------------------------------------------------


def test_shortest_correct_on_hand_made_groups():
    assert shortest_correct([30, 12, 40, 12], [True, True, True, True]) == 1  # tie: first
    assert shortest_correct([30, 12, 40, 12], [True, False, True, True]) == 3
    assert shortest_correct([5, 9, 7], [False, True, True]) == 2  # a shorter wrong one
    assert shortest_correct([5, 9, 7], [False, False, False]) is None
    assert shortest_correct([], []) is None
    with pytest.raises(ValueError):
        shortest_correct([1, 2], [True])


def test_dpo_pairs_on_hand_made_groups():
    lengths = [20, 10, 14, 15, 30, 8]
    correct = [True, True, True, True, False, False]
    # chosen 1 (10 tokens); rejected: the wrong 4 and 5, the correct 0 (20 >= 15) and
    # 3 (15 >= 15, the bound counts); 2 (14 < 15) is not; longest first
    assert dpo_pairs(lengths, correct) == [(1, 4), (1, 0), (1, 3), (1, 5)]
    assert dpo_pairs(lengths, correct, ratio=2.0) == [(1, 4), (1, 0), (1, 5)]
    assert dpo_pairs(lengths, correct, max_pairs=2) == [(1, 4), (1, 0)]
    # ties in length: the lower index first; a tie for chosen: the first
    assert dpo_pairs([10, 30, 10, 30], [True, False, True, False]) == [(0, 1), (0, 3)]
    assert dpo_pairs([10, 30], [False, False]) == []  # no correct response: nothing
    assert dpo_pairs([10, 10, 9], [True, True, False], ratio=1.0) == [(0, 1), (0, 2)]
    assert dpo_pairs([10, 12], [True, True]) == []  # nothing long or wrong enough
    with pytest.raises(ValueError, match="ratio"):
        dpo_pairs([1], [True], ratio=0.5)


# --- the DPO loss -------------------------------------------------------------------------


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_dpo_loss_and_gradient_against_the_formula(sft_weight):
    """Per-token logprobs of 3 pairs; the loss and its gradient with respect to every token
    logprob, by hand: with z_p = beta * margin_p, dL/dlp = -beta sigmoid(-z_p) / P for a
    chosen token (minus sft_weight / N_chosen), +beta sigmoid(-z_p) / P for a rejected one."""
    gen = torch.Generator().manual_seed(0)
    beta, n_pairs = 0.3, 3
    lens_c, lens_r = [3, 5, 2], [4, 2, 6]
    tok_c = [(-torch.rand(n, generator=gen, dtype=torch.float64) * 2).requires_grad_()
             for n in lens_c]
    tok_r = [(-torch.rand(n, generator=gen, dtype=torch.float64) * 2).requires_grad_()
             for n in lens_r]
    ref_c = [float(-torch.rand(1, generator=gen) * 6) for _ in range(n_pairs)]
    ref_r = [float(-torch.rand(1, generator=gen) * 6) for _ in range(n_pairs)]
    loss = dpo_loss(torch.stack([t.sum() for t in tok_c]), torch.stack([t.sum() for t in tok_r]),
                    torch.tensor(ref_c, dtype=torch.float64),
                    torch.tensor(ref_r, dtype=torch.float64), beta, sft_weight,
                    torch.tensor(lens_c, dtype=torch.float64))
    loss.backward()

    n_chosen = sum(lens_c)
    want, sig_neg = 0.0, []
    for p in range(n_pairs):
        sc = sum(tok_c[p].tolist())
        sr = sum(tok_r[p].tolist())
        z = beta * ((sc - ref_c[p]) - (sr - ref_r[p]))
        want += math.log(1.0 + math.exp(-z)) / n_pairs
        want += sft_weight * -sc / n_chosen
        sig_neg.append(1.0 / (1.0 + math.exp(z)))
    assert float(loss.detach()) == pytest.approx(want, rel=1e-12)
    for p in range(n_pairs):
        g_c = -beta * sig_neg[p] / n_pairs - sft_weight / n_chosen
        g_r = beta * sig_neg[p] / n_pairs
        assert tok_c[p].grad.tolist() == pytest.approx([g_c] * lens_c[p], rel=1e-12)
        assert tok_r[p].grad.tolist() == pytest.approx([g_r] * lens_r[p], rel=1e-12)


def test_dpo_loss_at_the_reference_is_log_2():
    s = torch.tensor([-3.0, -7.0])
    assert float(dpo_loss(s, s + 1, s, s + 1, beta=0.5)) == pytest.approx(math.log(2))


def test_packed_dpo_step_gradient_is_the_loss_gradient(make_model):
    """The step's gradient (pairs split over micro-batches) against autograd through plain
    per-sequence forward passes of the same model and `dpo_loss`."""
    model = make_model(seed=3, std=0.3).float()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 20, (n,), generator=gen).tolist() for n in (4, 4, 4, 5, 5, 6)]
    prompts[1] = prompts[0]  # a shared prompt, as in a group
    responses = [torch.randint(1, 20, (n,), generator=gen).tolist() for n in (6, 9, 3, 7, 5, 8)]
    pairs = [(0, 1), (2, 3), (4, 5), (0, 3)]  # sequence 0 and 3 in two pairs each
    cfg = DPOConfig(beta=0.2, sft_weight=0.3)
    ref = torch.tensor([-40.0, -60.0, -20.0, -55.0, -30.0, -70.0], dtype=torch.float64)

    def seq_lp(i):
        ids = torch.tensor([prompts[i] + responses[i]])
        logp = log_softmax(model(input_ids=ids).logits[0].float(), -1)
        pos = torch.arange(len(prompts[i]) - 1, ids.shape[1] - 1)
        return logp[pos, ids[0, pos + 1]].sum()

    model.eval()
    s = [seq_lp(i) for i in range(6)]
    c, r = [a for a, _ in pairs], [b for _, b in pairs]
    loss = dpo_loss(torch.stack([s[i] for i in c]), torch.stack([s[i] for i in r]),
                    ref[c].float(), ref[r].float(), cfg.beta, cfg.sft_weight,
                    torch.tensor([float(len(responses[i])) for i in c]))
    params = [p for p in model.parameters()]
    want = torch.autograd.grad(loss, params)
    # lr 0 and no clipping: the step leaves the weights and their gradients in .grad
    policy = HFPolicy(model, BackendConfig(micro_batch_tokens=16),
                      AlgoConfig(lr=0.0, grad_clip=1e9))
    before = sequence_logprobs(policy, prompts, responses, 16, True)
    assert before.tolist() == pytest.approx([float(x) for x in s], abs=1e-4)
    metrics = dpo_step(policy, prompts, responses, pairs, ref, cfg, 16, share_prompts=True)
    assert metrics["loss/dpo"] == pytest.approx(float(loss), rel=1e-5)
    for p, g in zip(params, want, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
    assert max(float(g.abs().max()) for g in want) > 1e-3  # a gradient worth comparing


# --- demonstrations files -----------------------------------------------------------------


def test_demos_file_round_trip_and_bad_rows(tmp_path):
    demos = [(Problem("p1", "a1 b2\n", "3", 1, "modsum"), "0+a1=1\nanswer 3"),
             (Problem("p2", "c4\n", "4", 2, "modsum"), "answer 4")]
    path = write_demos(tmp_path / "d.jsonl", demos)
    assert load_demos(path) == demos
    rows = [json.dumps({"prompt": "a1\n", "response": "answer 1"}),
            json.dumps({"prompt": "a1\n", "response": ""})]
    (tmp_path / "bad.jsonl").write_text("\n".join(rows))
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 2: 'response' must be"):
        load_demos(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"prompt": "x", "response": "y", "difficulty": "h"}')
    with pytest.raises(ValueError, match=r"bad2\.jsonl, row 1: 'difficulty'"):
        load_demos(tmp_path / "bad2.jsonl")
    with pytest.raises(FileNotFoundError, match="sft.demos_file"):
        load_demos(tmp_path / "none.jsonl")


# --- the command on a tiny setup ----------------------------------------------------------

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.num_kv_heads=2", "model.intermediate_size=64", "data.levels=[1,2]",
        "data.train_per_level=40", "data.test_per_level=3", "data.demos={1:0,2:0,3:0,4:0,5:0,6:0}",
        "rollout.problems_per_iteration=2", "rollout.group_size=2",
        "rollout.max_new_tokens=24", "rollout.partial.budget=12",
        "eval.max_new_tokens=16", "num_threads=1", "progress=false", "collapse.enabled=false"]


def compose_l2s(overrides: list[str]):
    import hydra

    from kimi_rl.config import register_configs

    register_configs()
    with hydra.initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return hydra.compose("long2short", overrides=TINY + overrides)


def save_tiny(cfg, out, seed: int):
    from kimi_rl.build import build_policy, save_hf
    from kimi_rl.data import load_task

    cfg = cfg.copy()
    cfg.seed = seed
    policy, tokenizer = build_policy(cfg, load_task(cfg.data))
    return save_hf(policy, tokenizer, out), policy.model.state_dict()


def test_merge_command_writes_the_average_and_its_evaluation(tmp_path):
    from kimi_rl.long2short import run_long2short

    cfg = compose_l2s(["method=merge"])
    long_dir, long_sd = save_tiny(cfg, tmp_path / "long", seed=1)
    short_dir, short_sd = save_tiny(cfg, tmp_path / "short", seed=2)
    cfg = compose_l2s(["method=merge", f"long2short.start={long_dir}",
                       f"long2short.merge.short_model={short_dir}",
                       "long2short.merge.short_weight=0.25"])
    summary = run_long2short(cfg, tmp_path / "out")
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "out" / "hf_model" / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(merged[key], 0.75 * long_sd[key] + 0.25 * short_sd[key], atol=1e-7)
    ev = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(ev["accuracy"]) == {"1", "2"} and ev == json.loads(json.dumps(summary["eval"]))
    with pytest.raises(ValueError, match="long2short.merge.short_model: required"):
        run_long2short(compose_l2s(["method=merge", f"long2short.start={long_dir}"]),
                       tmp_path / "bad")


def test_long2short_rl_composes_and_runs_two_iterations(tmp_path):
    from kimi_rl.long2short import run_long2short

    cfg = compose_l2s(["method=rl"])
    # the method's settings over the demo experiment's (warmup 8 there)
    assert cfg.reward.length_penalty_warmup == 0 and cfg.reward.length_penalty_weight > 0
    assert cfg.reward.truncated_reward == "zero" and cfg.long2short.rl_length_ratio == 0.5
    start, _ = save_tiny(cfg, tmp_path / "start", seed=1)
    cfg = compose_l2s(["method=rl", f"long2short.start={start}", "iterations=2",
                       "checkpoint_every=2", "long2short.levels=[2]"])
    summary = run_long2short(cfg, tmp_path / "out")
    assert summary["details"]["iterations"] == 2
    assert summary["details"]["max_new_tokens"] == 12  # 24 x 0.5
    ran = json.loads((tmp_path / "out" / "summary.json").read_text())  # the RL run's own
    assert ran["iterations"] == 2 and ran["eval_before"] is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "tb"))
    acc.Reload()
    weight = {e.step: e.value for e in acc.Scalars("length_penalty/weight")}
    assert weight == {0: 0.5, 1: 0.5}  # on from iteration 0
    cap = {e.step: e.value for e in acc.Scalars("rollout/max_new_tokens")}
    assert cap == {0: 12, 1: 12}
    assert {e.value for e in acc.Scalars("rollout/samples_L2")} == {4.0}  # long2short.levels
    assert (tmp_path / "out" / "hf_model" / "config.json").is_file()
    assert set(json.loads((tmp_path / "out" / "eval.json").read_text())["accuracy"]) == {"1", "2"}


@pytest.mark.parametrize("override, message", [
    ("long2short.dpo.beta=0", "long2short.dpo.beta: must be a number > 0"),
    ("long2short.dpo.ratio=0.9", "long2short.dpo.ratio: must be a number >= 1"),
    ("long2short.rl_length_ratio=1.5", "long2short.rl_length_ratio: must be"),
    ("long2short.samples=0", "long2short.samples: must be an integer >= 1"),
    ("long2short.merge.short_weight=2", "long2short.merge.short_weight: must be"),
])
def test_bad_values_are_named(override, message):
    from kimi_rl.config import check_config

    with pytest.raises(ValueError, match=message):
        check_config(compose_l2s(["method=dpo", override]))
    check_config(compose_l2s(["method=dpo"]))  # the defaults pass


def test_dpo_training_moves_the_margin(make_model):
    """A few DPO steps on fixed pairs: the chosen responses gain logprob against the
    rejected ones relative to the reference (the margin, 0 at the start, grows)."""
    from kimi_rl.long2short import run_dpo

    model = make_model(seed=4)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 20, (4,), generator=gen).tolist() for _ in range(8)]
    responses = [torch.randint(1, 20, (n,), generator=gen).tolist() for n in (3, 9) * 4]
    pairs = [(2 * i, 2 * i + 1) for i in range(4)]
    policy = HFPolicy(model, BackendConfig(micro_batch_tokens=64), AlgoConfig())
    cfg = DPOConfig(steps=6, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant")
    stats = run_dpo(policy, prompts, responses, pairs, cfg, 64, True, seed=0)
    assert stats["first"]["dpo/margin"] == pytest.approx(0.0, abs=1e-4)
    assert stats["first"]["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert stats["last"]["dpo/margin"] > 0.5 and stats["last"]["loss/dpo"] < math.log(2)
    with pytest.raises(ValueError, match="no pairs"):
        run_dpo(policy, prompts, responses, [], cfg, 64, True, seed=0)
