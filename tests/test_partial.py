"""Partial rollouts: budgets, the replay buffer, group gating, segment masks, staleness.

The engine is the real built-in torch engine on tiny random Llamas; references are
uninterrupted generations and single-sequence forward passes.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kimi_rl import checkpoint
from kimi_rl.algorithms import get_algorithm
from kimi_rl.config import AlgoConfig, BackendConfig, TrainConfig, check_config
from kimi_rl.data.problems import Problem
from kimi_rl.loop import loss_masks, optimize
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.packing import pack
from kimi_rl.rollout.engine import Request, SamplingParams
from kimi_rl.rollout.partial import PartialRollouts
from kimi_rl.rollout.samples import Sample, encode_prompt
from kimi_rl.rollout.torch_engine import TorchEngine

PROMPTS = ["k7 q3 b9\n", "a1\n", "z5 y2\n", "m8 n1 o4 p6\n", "c3 d3\n"]
CAP = 30


def problems() -> list[Problem]:
    return [Problem(f"p{i}", text, "0", 1, "modsum") for i, text in enumerate(PROMPTS)]


def engine_for(model, tokenizer, seed: int = 0) -> TorchEngine:
    return TorchEngine(copy.deepcopy(model), tokenizer.eos_token_id, tokenizer.pad_token_id,
                       seed=seed)


def endless_engine(model, tokenizer) -> TorchEngine:
    """An engine whose end-of-sequence id is outside the vocabulary: only limits stop it."""
    return TorchEngine(copy.deepcopy(model), -1, tokenizer.pad_token_id)


def decoder(tokenizer):
    return lambda t: tokenizer.decode(t, skip_special_tokens=True)


def run_until_done(manager, engine, tokenizer, start: int, params, stop: int | None = None,
                   cap: int = CAP) -> tuple[list[Sample], int]:
    """Step the manager (no new groups) until nothing is in flight or iteration `stop`."""
    done, it = [], start
    while manager.groups and (stop is None or it < stop):
        out, _ = manager.step(engine, it, cap, params, decoder(tokenizer))
        done += out
        it += 1
    return done, it


@pytest.fixture
def peaked(make_model):
    """A random model with peaked next-token distributions: varied greedy lengths."""
    return make_model(seed=4, std=0.3)


def test_greedy_split_across_budgets_and_a_resume_equals_uninterrupted(peaked, tokenizer,
                                                                        tmp_path):
    greedy = SamplingParams(greedy=True)
    ps = problems()
    full = engine_for(peaked, tokenizer).generate(
        [Request(encode_prompt(tokenizer, p)) for p in ps], CAP, greedy)
    assert max(len(s.tokens) for s in full) > 12, "some responses must span several budgets"
    assert len({len(s.tokens) for s in full}) >= 3

    engine = engine_for(peaked, tokenizer)
    manager = PartialRollouts(group_size=2, slots=10, budget=4)
    manager.add_groups(ps, tokenizer, iteration=0)
    first, it = run_until_done(manager, engine, tokenizer, 0, greedy, stop=2)
    assert manager.unfinished(), "something must still be in the buffer at the checkpoint"
    checkpoint.save(tmp_path, "mid", {"rollouts": manager.state_dict()})
    state = checkpoint.load(checkpoint.latest(tmp_path))["rollouts"]

    resumed = PartialRollouts(group_size=2, slots=10, budget=4)
    resumed.load_state_dict(state, {p.id: p for p in ps})
    rest, _ = run_until_done(resumed, engine_for(peaked, tokenizer), tokenizer, it, greedy)
    samples = first + rest
    assert sorted(s.group for s in samples) == [g for g in range(len(ps)) for _ in range(2)]
    for s in samples:
        ref = full[s.group]
        assert s.tokens == ref.tokens
        assert s.finish_reason == ref.finish_reason
        torch.testing.assert_close(s.logprobs, ref.logprobs, atol=1e-4, rtol=0)
        assert sum(n for _, n in s.segments) == len(s.tokens)
        assert len(s.segments) == max(1, math.ceil(len(s.tokens) / 4))
        assert [n for _, n in s.segments[:-1]] == [4] * (len(s.segments) - 1)
        assert [i for i, _ in s.segments] == list(range(len(s.segments)))
        assert s.text == tokenizer.decode(s.tokens, skip_special_tokens=True)


def test_no_partial_group_leaves_the_manager(make_model, tokenizer):
    """Sampled lengths vary within groups; a group comes out once, whole and finished."""
    engine = engine_for(make_model(seed=1, std=0.15), tokenizer, seed=5)
    k, ps = 4, problems()
    manager = PartialRollouts(group_size=k, slots=12, budget=3)
    pool, seen, partial_seen, it = list(ps), set(), 0, 0
    while pool or manager.groups:
        n = min(manager.new_groups_wanted(), len(pool))
        manager.add_groups([pool.pop() for _ in range(n)], tokenizer, it)
        assert len(manager.unfinished()) <= 12
        out, stats = manager.step(engine, it, CAP, SamplingParams(), decoder(tokenizer))
        groups = {}
        for s in out:
            groups.setdefault(s.group, []).append(s)
        for g, members in groups.items():
            assert g not in seen
            assert len(members) == k and all(s.finish_reason for s in members)
            seen.add(g)
        for members in manager.groups.values():  # in flight: at least one unfinished
            assert any(s.finish_reason is None for s in members)
            partial_seen += any(s.finish_reason is not None for s in members)
        assert stats.groups_in_flight == len(manager.groups)
        it += 1
    assert len(seen) == len(ps)
    assert partial_seen, "the test should see groups with finished and unfinished members"


def test_problems_in_flight_are_not_added_twice(tokenizer):
    manager = PartialRollouts(group_size=2, slots=8, budget=4)
    manager.add_groups(problems()[:2], tokenizer, 0)
    assert manager.problems_in_flight() == {"p0", "p1"}
    assert manager.new_groups_wanted() == 2
    with pytest.raises(ValueError, match="'p1' is already in flight"):
        manager.add_groups(problems()[1:3], tokenizer, 0)


def test_new_groups_fill_what_the_buffer_leaves(make_model, tokenizer):
    """Nothing stops before its cap, so all 2*3 trajectories stay buffered."""
    engine = endless_engine(make_model(seed=0), tokenizer)
    manager = PartialRollouts(group_size=3, slots=10, budget=2)
    manager.add_groups(problems()[:2], tokenizer, 0)
    _, stats = manager.step(engine, 0, CAP, SamplingParams(),
                            decoder(tokenizer))
    assert stats.buffered == 6 and stats.buffered_tokens == 12
    assert manager.new_groups_wanted() == 1  # (10 - 6) // 3


@pytest.mark.parametrize("action", ["drop", "regenerate"])
def test_stale_trajectories(make_model, tokenizer, action):
    engine = endless_engine(make_model(seed=0), tokenizer)  # every trajectory needs CAP / 2
    manager = PartialRollouts(group_size=2, slots=4, budget=2, max_trajectory_age=3,
                              stale=action)
    manager.add_groups(problems()[:1], tokenizer, 0)
    for it in range(3):
        _, stats = manager.step(engine, it, CAP, SamplingParams(), decoder(tokenizer))
    assert [len(s.tokens) for s in manager.unfinished()] == [6, 6]
    _, stats = manager.step(engine, 3, CAP, SamplingParams(), decoder(tokenizer))
    if action == "drop":
        assert stats.dropped_groups == 1 and not manager.groups
        assert manager.problems_in_flight() == set()
    else:
        assert stats.regenerated == 2
        assert [(len(s.tokens), s.started, s.segments) for s in manager.unfinished()] == [
            (2, 3, [(3, 2)])] * 2


def test_cap_finishes_trajectories_as_truncated(make_model, tokenizer):
    engine = endless_engine(make_model(seed=0), tokenizer)
    manager = PartialRollouts(group_size=1, slots=2, budget=4)
    manager.add_groups(problems()[:1], tokenizer, 0)
    done, _ = run_until_done(manager, engine, tokenizer, 0,
                             SamplingParams(), cap=10)
    assert [(len(s.tokens), s.finish_reason, s.segments) for s in done] == [
        (10, "length", [(0, 4), (1, 4), (2, 2)])]


def sample_with_segments(segments, prompt=(1, 2)) -> Sample:
    n = sum(c for _, c in segments)
    toks = [4 + (i % 7) for i in range(n)]
    return Sample(problems()[0], 0, list(prompt), toks, [-1.0] * n, "stop",
                  segments=list(segments), started=segments[0][0])


@pytest.mark.parametrize(("loss_segments", "age", "expected"), [
    ("recent", 0, [0] * 4 + [0] * 2 + [1] * 3),
    ("recent", 1, [0] * 4 + [1] * 2 + [1] * 3),
    ("recent", 3, [1] * 9),
    ("all", 0, [1] * 9),
])
def test_segment_masks_select_the_configured_tokens(loss_segments, age, expected):
    cfg = TrainConfig()
    cfg.rollout.partial.enabled = True
    cfg.rollout.partial.loss_segments = loss_segments
    cfg.rollout.partial.max_segment_age = age
    s = sample_with_segments([(3, 4), (5, 2), (6, 3)])
    (mask,) = loss_masks(cfg.rollout, [s], it=6)
    assert [int(m) for m in mask] == expected
    (pb,) = pack([s.prompt_ids], [s.tokens], 100, loss_masks=[mask],
                 versions=[s.token_iterations()])
    keep = [i for i, m in enumerate(mask) if m]
    assert pb.targets.tolist() == [s.tokens[i] for i in keep]
    assert pb.target_versions.tolist() == [s.token_iterations()[i] for i in keep]


def test_masks_off_without_partial_rollouts():
    s = sample_with_segments([(3, 4), (5, 2)])
    assert loss_masks(TrainConfig().rollout, [s], it=9) == [[True] * 6]


def test_the_loss_sees_exactly_the_unmasked_tokens(make_model, tokenizer):
    """optimize: the reference pass and the loss hold the unmasked tokens of each sample
    (values from a single-sequence forward pass), every sample of the group counts in the
    normalisation, and a fully masked sample adds no tokens."""
    model = make_model(seed=4, std=0.1)
    cfg = TrainConfig()
    cfg.rollout.partial.enabled = True
    cfg.rollout.partial.max_segment_age = 1
    samples = [sample_with_segments([(3, 4), (5, 2), (6, 3)]),
               sample_with_segments([(6, 4)], prompt=(3,)),
               sample_with_segments([(2, 3), (4, 2)], prompt=(2, 2, 2))]  # all masked at 6
    for j, s in enumerate(samples):
        s.group, s.reward = 0, float(j)
    masks = loss_masks(cfg.rollout, samples, it=6)
    seen = []
    base = get_algorithm("omd")

    class Recording:
        advantages = staticmethod(base.advantages)

        @staticmethod
        def loss(batch, algo_cfg):
            seen.append(batch)
            return base.loss(batch, algo_cfg)

    policy = HFPolicy(model, BackendConfig(micro_batch_tokens=100), AlgoConfig(lr=0.0))
    metrics = optimize(cfg, policy, Recording, samples, masks, 1.0, it=6)
    assert metrics["train/optimizer_steps"] == 1
    with torch.no_grad():
        expected = []
        for s, m in zip(samples[:2], masks, strict=False):
            logits = model(input_ids=torch.tensor([s.prompt_ids + s.tokens])).logits[0]
            lp = torch.log_softmax(logits.double(), -1)[len(s.prompt_ids) - 1:-1]
            lp = lp.gather(-1, torch.tensor(s.tokens)[:, None])[:, 0]
            expected.append(lp[torch.tensor(m)].float())
    (batch,) = seen  # one micro-batch: the longer sequence first (first-fit-decreasing)
    assert batch.num_seqs == 3 and batch.num_tokens == 5 + 4
    assert torch.bincount(batch.seq_index).tolist() == [5, 4]
    torch.testing.assert_close(batch.ref_logprobs, torch.cat(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.logprobs.detach(), torch.cat(expected), atol=1e-4,
                               rtol=0)
    # advantages over the whole group of 3 (rewards 0, 1, 2; mean 1)
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.0, 0.0]))


def test_config_checks_the_trajectory_age_reaches_the_cap():
    cfg = TrainConfig()
    cfg.rollout.partial.enabled = True
    cfg.rollout.partial.budget = 100
    cfg.rollout.max_new_tokens = 300
    cfg.rollout.max_new_tokens_schedule = {10: 1000}
    cfg.rollout.partial.max_trajectory_age = 5
    with pytest.raises(ValueError, match=r"rollout.partial.max_trajectory_age: must be at "
                                         r"least 10 with stale_trajectories=regenerate"):
        check_config(cfg)
    cfg.rollout.partial.stale_trajectories = "drop"  # long responses are dropped: allowed
    check_config(cfg)
    cfg.rollout.partial.stale_trajectories = "regenerate"
    cfg.rollout.partial.max_trajectory_age = 10
    check_config(cfg)
    cfg.rollout.partial.loss_segments = "newest"
    with pytest.raises(ValueError, match="rollout.partial.loss_segments"):
        check_config(cfg)


def test_refill_matches_uninterrupted_generation(peaked, tokenizer):
    """With refill the engine runs `slots` trajectories at a time within a window of
    `budget` steps, starting queued ones as others end; twice the slots are in flight.
    Greedy results still equal uninterrupted generation; a trajectory that has not
    started has no segment."""
    greedy = SamplingParams(greedy=True)
    ps = problems()
    full = engine_for(peaked, tokenizer).generate(
        [Request(encode_prompt(tokenizer, p)) for p in ps], CAP, greedy)
    engine = engine_for(peaked, tokenizer)
    manager = PartialRollouts(group_size=2, slots=4, budget=5, refill=True)
    pool, done, it, pending_seen = list(ps), [], 0, 0
    while pool or manager.groups:
        n = min(manager.new_groups_wanted(), len(pool))
        assert len(manager.unfinished()) + 2 * n <= 8
        manager.add_groups([pool.pop(0) for _ in range(n)], tokenizer, it)
        out, stats = manager.step(engine, it, CAP, greedy, decoder(tokenizer))
        done += out
        started_now = [s for g in manager.groups.values() for s in g
                       if s.segments and s.segments[-1][0] == it]
        started_now += [s for s in out if s.segments[-1][0] == it]
        assert stats.requests == len(started_now)
        pending_seen += sum(1 for s in manager.unfinished() if not s.segments)
        for s in started_now:
            assert s.segments[-1][1] <= 5
        it += 1
    assert pending_seen, "some trajectories should have waited for a free slot"
    for s in done:
        ref = full[int(s.problem.id[1:])]
        assert s.tokens == ref.tokens and s.finish_reason == ref.finish_reason
        assert s.started == s.segments[0][0]
