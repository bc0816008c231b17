"""Algorithm losses against hand-assembled references (SPEC.md section 1)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from kimi_rl.algorithms import ALGORITHMS, LossBatch, get_algorithm
from kimi_rl.config import AlgoConfig

DT = torch.float64


@dataclass
class Problem:
    """A packed mini-batch of groups from a tiny linear-softmax "policy" theta."""

    theta: Tensor  # [V, D] requires grad
    theta_ref: Tensor  # [V, D] pi_theta_i, a different value
    feats: Tensor  # [T, D]
    targets: Tensor  # [T]
    seq_index: Tensor  # [T] (tokens shuffled, not contiguous per sequence)
    group_index: Tensor  # [S] non-contiguous group ids
    rewards: Tensor  # [S] in {0, 1}
    k: int

    @property
    def num_seqs(self) -> int:
        return self.rewards.numel()

    @property
    def num_tokens(self) -> int:
        return self.seq_index.numel()

    def logprobs(self, theta: Tensor, mask: Tensor | None = None) -> Tensor:
        feats, targets = self.feats, self.targets
        if mask is not None:
            feats, targets = feats[mask], targets[mask]
        logits = feats @ theta.T
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    def ref_logprobs(self, mask: Tensor | None = None) -> Tensor:
        return self.logprobs(self.theta_ref, mask).detach()


def make_problem(seed: int = 0, groups: int = 3, k: int = 4, vocab: int = 5, dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    s = groups * k
    lengths = torch.randint(1, 6, (s,), generator=g)
    seq_index = torch.repeat_interleave(torch.arange(s), lengths)
    seq_index = seq_index[torch.randperm(seq_index.numel(), generator=g)]
    ids = torch.tensor([7, 2, 9, 4, 11][:groups])
    group_index = ids.repeat_interleave(k)[torch.randperm(s, generator=g)]
    rewards = torch.randint(0, 2, (s,), generator=g).to(DT)
    for gid in ids:  # every group has a right and a wrong answer, so advantages are non-zero
        members = (group_index == gid).nonzero().flatten()
        rewards[members[0]], rewards[members[1]] = 1.0, 0.0
    theta = torch.randn(vocab, dim, generator=g, dtype=DT).requires_grad_()
    theta_ref = (theta + 0.5 * torch.randn(vocab, dim, generator=g, dtype=DT)).detach()
    t = seq_index.numel()
    feats = torch.randn(t, dim, generator=g, dtype=DT)
    targets = torch.randint(0, vocab, (t,), generator=g)
    return Problem(theta, theta_ref, feats, targets, seq_index, group_index, rewards, k)


def model_grad(p: Problem, name: str, cfg: AlgoConfig, on_policy: bool = False):
    """Loss, metrics and d loss / d theta of one whole-batch call of algorithm ``name``."""
    algo = get_algorithm(name)
    lp = p.logprobs(p.theta)
    ref = lp.detach() if on_policy else p.ref_logprobs()
    adv = algo.advantages(p.rewards, p.group_index, cfg)
    batch = LossBatch(lp, ref, p.seq_index, adv, p.num_seqs, p.num_tokens)
    loss, metrics = algo.loss(batch, cfg)
    (grad,) = torch.autograd.grad(loss, p.theta)
    return loss, metrics, grad


def hand_baseline(rewards: list[float], tau: float, log_z: str) -> float:
    if log_z == "mean":
        return sum(rewards) / len(rewards)
    return tau * math.log(sum(math.exp(r / tau) for r in rewards) / len(rewards))


def omd_sequence_grad_by_hand(p: Problem, tau: float, log_z: str, reduction: str) -> Tensor:
    """-(1/P) sum_problems (1/k) sum_j [grad logp_j (r_j - b) - tau/2 grad (logp_j - ref_j)^2]."""
    gids = sorted(set(p.group_index.tolist()))
    ascent = torch.zeros_like(p.theta)
    for gid in gids:
        members = [j for j in range(p.num_seqs) if p.group_index[j].item() == gid]
        b = hand_baseline([p.rewards[j].item() for j in members], tau, log_z)
        for j in members:
            mask = p.seq_index == j
            lp, ref = p.logprobs(p.theta, mask), p.ref_logprobs(mask)
            logp_j = lp.sum() if reduction == "sum" else lp.mean()
            ref_j = ref.sum() if reduction == "sum" else ref.mean()
            (g_logp,) = torch.autograd.grad(logp_j, p.theta, retain_graph=True)
            (g_sq,) = torch.autograd.grad((logp_j - ref_j) ** 2, p.theta)
            ascent += (g_logp * (p.rewards[j].item() - b) - tau / 2 * g_sq) / p.k
    return -ascent / len(gids)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("log_z", ["mean", "exact"])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_omd_sequence_gradient_matches_eq3(tau, log_z, reduction):
    p = make_problem(seed=1)
    cfg = AlgoConfig(tau=tau, log_z=log_z, logp_reduction=reduction)
    _, _, grad = model_grad(p, "omd", cfg)
    expected = omd_sequence_grad_by_hand(p, tau, log_z, reduction)
    torch.testing.assert_close(grad, expected)
    # the penalty term contributes (the reference differs from theta), so the check bites
    no_penalty = omd_sequence_grad_by_hand(p, 0.0, "mean", reduction)
    if log_z == "mean":
        assert (expected - no_penalty).abs().max() > 1e-4


@pytest.mark.parametrize("tau", [0.05, 0.5, 3.0])
def test_omd_exact_log_z_advantages(tau):
    p = make_problem(seed=2)
    cfg = AlgoConfig(tau=tau, log_z="exact")
    adv = get_algorithm("omd").advantages(p.rewards, p.group_index, cfg)
    for j in range(p.num_seqs):
        members = (p.group_index == p.group_index[j]).nonzero().flatten().tolist()
        b = hand_baseline([p.rewards[i].item() for i in members], tau, "exact")
        assert adv[j].item() == pytest.approx(p.rewards[j].item() - b, rel=1e-9, abs=1e-12)
    # b lies between the group mean (tau -> inf) and the group max (tau -> 0)
    mean_adv = get_algorithm("omd").advantages(p.rewards, p.group_index, AlgoConfig())
    assert torch.all(adv <= mean_adv + 1e-12)
    assert not torch.allclose(adv, mean_adv)


def test_omd_exact_log_z_stable_for_small_tau():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = get_algorithm("omd").advantages(
        rewards, torch.zeros(4, dtype=torch.long), AlgoConfig(tau=1e-3, log_z="exact")
    )
    assert torch.isfinite(adv).all()
    # b = 1 + tau * log(3/4)
    torch.testing.assert_close(adv, rewards - (1 + 1e-3 * math.log(0.75)))


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_omd_token_level_gradient(tau):
    p = make_problem(seed=3)
    cfg = AlgoConfig(tau=tau, level="token")
    _, metrics, grad = model_grad(p, "omd", cfg)
    ascent = torch.zeros_like(p.theta)
    for j in range(p.num_seqs):
        members = (p.group_index == p.group_index[j]).nonzero().flatten().tolist()
        a_j = p.rewards[j].item() - hand_baseline(
            [p.rewards[i].item() for i in members], tau, "mean"
        )
        for t in (p.seq_index == j).nonzero().flatten().tolist():
            mask = torch.zeros(p.num_tokens, dtype=torch.bool)
            mask[t] = True
            lp, ref = p.logprobs(p.theta, mask)[0], p.ref_logprobs(mask)[0]
            (g_lp,) = torch.autograd.grad(lp, p.theta, retain_graph=True)
            (g_sq,) = torch.autograd.grad((lp - ref) ** 2, p.theta)
            ascent += a_j * g_lp - tau / 2 * g_sq
    torch.testing.assert_close(grad, -ascent / p.num_tokens)
    logratio = p.logprobs(p.theta).detach() - p.ref_logprobs()
    assert metrics["logratio/abs_max"] == pytest.approx(logratio.abs().max().item())
    assert metrics["logratio/mean"] == pytest.approx(logratio.mean().item())


def test_omd_metrics_sequence_level():
    p = make_problem(seed=4)
    cfg = AlgoConfig(tau=0.3)
    loss, m, _ = model_grad(p, "omd", cfg)
    logp = torch.zeros(p.num_seqs, dtype=DT).index_add(0, p.seq_index, p.logprobs(p.theta).detach())
    ref = torch.zeros(p.num_seqs, dtype=DT).index_add(0, p.seq_index, p.ref_logprobs())
    adv = get_algorithm("omd").advantages(p.rewards, p.group_index, cfg)
    assert m["loss/policy"] == pytest.approx((-(adv * logp).sum() / p.num_seqs).item())
    assert m["loss/penalty"] == pytest.approx(
        (0.15 * ((logp - ref) ** 2).sum() / p.num_seqs).item()
    )
    assert m["loss/total"] == pytest.approx(loss.item())
    assert m["loss/total"] == pytest.approx(m["loss/policy"] + m["loss/penalty"])
    assert m["logratio/abs_max"] == pytest.approx((logp - ref).abs().max().item())
    assert m["advantage/mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["advantage/abs_mean"] == pytest.approx(adv.abs().mean().item())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_omd_on_policy_equals_reinforce(reduction):
    p = make_problem(seed=5)
    cfg = AlgoConfig(tau=0.5, logp_reduction=reduction)
    _, m_omd, g_omd = model_grad(p, "omd", cfg, on_policy=True)
    _, _, g_rf = model_grad(p, "reinforce", cfg, on_policy=True)
    torch.testing.assert_close(g_omd, g_rf)
    assert m_omd["loss/penalty"] == 0.0
    # and off-policy they differ (the penalty acts)
    _, _, g_off = model_grad(p, "omd", cfg)
    assert not torch.allclose(g_off, g_rf)


def test_reinforce_gradient_by_hand():
    p = make_problem(seed=6)
    _, _, grad = model_grad(p, "reinforce", AlgoConfig())
    ascent = torch.zeros_like(p.theta)
    for j in range(p.num_seqs):
        members = (p.group_index == p.group_index[j]).nonzero().flatten().tolist()
        a_j = p.rewards[j].item() - statistics.mean(p.rewards[i].item() for i in members)
        (g,) = torch.autograd.grad(p.logprobs(p.theta, p.seq_index == j).sum(), p.theta)
        ascent += a_j * g
    torch.testing.assert_close(grad, -ascent / p.num_seqs)


def hand_grpo_advantages(p: Problem) -> list[float]:
    out = []
    for j in range(p.num_seqs):
        rs = [
            p.rewards[i].item() for i in range(p.num_seqs) if p.group_index[i] == p.group_index[j]
        ]
        out.append((p.rewards[j].item() - statistics.mean(rs)) / (statistics.pstdev(rs) + 1e-6))
    return out


def test_grpo_advantages():
    p = make_problem(seed=7)
    adv = get_algorithm("grpo").advantages(p.rewards, p.group_index, AlgoConfig())
    torch.testing.assert_close(adv, torch.tensor(hand_grpo_advantages(p), dtype=DT))
    same = get_algorithm("grpo").advantages(
        torch.tensor([1, 1, 1]), torch.zeros(3).long(), AlgoConfig()
    )
    assert torch.equal(same, torch.zeros(3))


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_on_policy_is_normalised_policy_gradient(kl_coef):
    p = make_problem(seed=8)
    _, m, grad = model_grad(p, "grpo", AlgoConfig(kl_coef=kl_coef), on_policy=True)
    adv = hand_grpo_advantages(p)
    ascent = torch.zeros_like(p.theta)
    for j in range(p.num_seqs):
        (g,) = torch.autograd.grad(p.logprobs(p.theta, p.seq_index == j).mean(), p.theta)
        ascent += adv[j] * g
    torch.testing.assert_close(grad, -ascent / p.num_seqs)
    assert m["ratio/mean"] == pytest.approx(1.0)
    assert m["clip_fraction"] == 0.0
    assert m["loss/kl"] == pytest.approx(0.0, abs=1e-12)


def test_grpo_clipping_zeroes_gradient():
    logprobs = torch.tensor([-1.0, -2.0, -1.5, -0.5], dtype=DT, requires_grad=True)
    shift = torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=DT)  # ratio e^0.5 ~ 1.65 on tokens 0, 2
    ref = (logprobs - shift).detach()
    seq_index = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([1.0, -1.0], dtype=DT)
    batch = LossBatch(logprobs, ref, seq_index, adv, num_seqs=2, num_tokens=4)
    loss, m = get_algorithm("grpo").loss(batch, AlgoConfig(clip_eps=0.2))
    loss.backward()
    ratio = math.exp(0.5)
    # token 0: ratio > 1 + eps with A > 0 -> clipped, no gradient
    # token 1: ratio 1 -> d/dlogp of -A * ratio / (2 tokens * 2 seqs)
    # token 2: ratio > 1 + eps with A < 0 -> unclipped branch is the min, gradient flows
    expected = torch.tensor([0.0, -1.0 / 4, ratio / 4, 1.0 / 4], dtype=DT)
    torch.testing.assert_close(logprobs.grad, expected)
    assert m["clip_fraction"] == pytest.approx(0.25)
    assert m["ratio/mean"] == pytest.approx((2 * ratio + 2) / 4)


def test_grpo_loss_value_by_hand():
    p = make_problem(seed=9)
    cfg = AlgoConfig(clip_eps=0.2, kl_coef=0.05)
    loss, m, _ = model_grad(p, "grpo", cfg)
    adv = hand_grpo_advantages(p)
    lp, ref = p.logprobs(p.theta).tolist(), p.ref_logprobs().tolist()
    policy = kl = 0.0
    for j in range(p.num_seqs):
        toks = [t for t in range(p.num_tokens) if p.seq_index[t] == j]
        pol_j = kl_j = 0.0
        for t in toks:
            r = math.exp(lp[t] - ref[t])
            pol_j += -min(r * adv[j], min(max(r, 0.8), 1.2) * adv[j])
            kl_j += math.exp(ref[t] - lp[t]) - (ref[t] - lp[t]) - 1
        policy += pol_j / len(toks)
        kl += cfg.kl_coef * kl_j / len(toks)
    assert m["loss/policy"] == pytest.approx(policy / p.num_seqs)
    assert m["loss/kl"] == pytest.approx(kl / p.num_seqs)
    assert loss.item() == pytest.approx((policy + kl) / p.num_seqs)
    assert m["clip_fraction"] > 0  # the reference is far enough for some clipping


SPLIT_CASES = [
    ("omd", AlgoConfig(tau=0.5)),
    ("omd", AlgoConfig(tau=0.5, log_z="exact", logp_reduction="mean")),
    ("omd", AlgoConfig(tau=0.5, level="token")),
    ("grpo", AlgoConfig(kl_coef=0.1)),
    ("reinforce", AlgoConfig()),
    ("reinforce", AlgoConfig(logp_reduction="mean")),
]


@pytest.mark.parametrize("name,cfg", SPLIT_CASES)
def test_micro_batches_sum_to_mini_batch(name, cfg):
    p = make_problem(seed=10, groups=4)
    algo = get_algorithm(name)
    whole_loss, whole_m, whole_grad = model_grad(p, name, cfg)

    adv = algo.advantages(p.rewards, p.group_index, cfg)  # on whole groups, before splitting
    total_loss = 0.0
    metric_sums: dict[str, float] = {}
    for seqs in (torch.arange(0, 5), torch.arange(5, 6), torch.arange(6, 16)):
        local = torch.full((p.num_seqs,), -1)
        local[seqs] = torch.arange(seqs.numel())
        mask = local[p.seq_index] >= 0
        batch = LossBatch(
            p.logprobs(p.theta, mask),
            p.ref_logprobs(mask),
            local[p.seq_index[mask]],
            adv[seqs],
            p.num_seqs,
            p.num_tokens,
        )
        loss, m = algo.loss(batch, cfg)
        loss.backward()  # gradient accumulation
        total_loss += loss.item()
        for key, v in m.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + v
    grad_sum = p.theta.grad  # accumulated over the micro-batches
    assert total_loss == pytest.approx(whole_loss.item())
    torch.testing.assert_close(grad_sum, whole_grad)
    for key in whole_m:
        if key.startswith("loss/"):
            assert metric_sums[key] == pytest.approx(whole_m[key]), key


@pytest.mark.parametrize(
    "key,value", [("level", "word"), ("log_z", "approx"), ("logp_reduction", "max")]
)
def test_omd_rejects_unknown_options(key, value):
    p = make_problem(seed=11)
    cfg = AlgoConfig(**{key: value})
    with pytest.raises(ValueError, match=f"{key}.*{value}"):
        model_grad(p, "omd", cfg)


def test_registry():
    assert set(ALGORITHMS) == {"omd", "grpo", "reinforce"}
    assert get_algorithm("omd").name == "omd"
    with pytest.raises(ValueError, match="ppo.*grpo.*omd.*reinforce"):
        get_algorithm("ppo")
