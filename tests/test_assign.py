"""The rollout replicas' assignment rule (kimi_rl/rollout/assign.py): hand-made plans worked
out on paper, and on random long-tailed costs the bound against max(total / replicas,
largest group) and the comparison with the contiguous split."""

from __future__ import annotations

import numpy as np
import pytest

from kimi_rl.rollout.assign import (
    GroupCost,
    LengthHistory,
    assign,
    contiguous,
    expected_cost,
    loads,
    lower_bound,
)


def test_longest_first_onto_least_loaded_by_hand():
    # 7 -> r0; 5 -> r1; 4 -> r1 (9); 2 -> r0 (9); 2 -> r0 (tie 9 = 9: lower index) = 11
    groups = [GroupCost(10, 2.0), GroupCost(11, 7.0), GroupCost(12, 4.0), GroupCost(13, 5.0),
              GroupCost(14, 2.0)]
    plan = assign(groups, 2)
    assert plan == [[10, 11, 14], [12, 13]]  # each replica's groups in the input order
    assert loads(plan, groups) == [11.0, 9.0]


def test_whole_groups_partition_in_order():
    """Every group lands on exactly one replica (whole: one key, one place), each replica's
    share keeps the input order, and the plan is the same whatever the input order."""
    rng = np.random.default_rng(0)
    groups = [GroupCost(int(k), float(c), None if rng.random() < 0.5 else int(rng.integers(3)))
              for k, c in zip(rng.permutation(40), rng.lognormal(5, 1, 40), strict=True)]
    plan = assign(groups, 3, margin=0.1)
    flat = [k for share in plan for k in share]
    assert sorted(flat) == sorted(g.key for g in groups)
    order = {g.key: i for i, g in enumerate(groups)}
    for share in plan:
        assert [order[k] for k in share] == sorted(order[k] for k in share)
    shuffled = [groups[i] for i in rng.permutation(len(groups))]
    assert [set(s) for s in assign(shuffled, 3, margin=0.1)] == [set(s) for s in plan]


def test_continuations_stay_home_within_the_margin():
    # total 20, balanced load 10. A(6) and B(5) started on replica 1.
    a, b = GroupCost(0, 6.0, home=1), GroupCost(1, 5.0, home=1)
    c, d = GroupCost(2, 5.0), GroupCost(3, 4.0)
    # margin 0.25: cap 12.5; A -> 1 (6), B -> 1 (11 <= 12.5); C -> 0 (5), D -> 0 (9)
    assert assign([a, b, c, d], 2, margin=0.25) == [[2, 3], [0, 1]]
    # margin 0: cap 10; A -> 1 (6), B would make 11 > 10 -> least loaded r0 (5);
    # C -> r0 (5 < 6) = 10; D -> r1 = 10
    plan = assign([a, b, c, d], 2, margin=0.0)
    assert plan == [[1, 2], [0, 3]]
    assert loads(plan, [a, b, c, d]) == [10.0, 10.0]


def test_continuations_follow_their_home_even_when_new_groups_could_swap():
    """Sticky over balanced-by-key: two equal continuations started on replicas 1 and 0
    stay there although the plan without homes would put the first on replica 0."""
    groups = [GroupCost(0, 3.0, home=1), GroupCost(1, 3.0, home=0)]
    assert assign(groups, 2) == [[1], [0]]
    assert assign([GroupCost(0, 3.0), GroupCost(1, 3.0)], 2) == [[0], [1]]


def long_tailed(rng, groups: int, k: int = 8) -> list[GroupCost]:
    """Groups of k responses with lognormal lengths (a long tail, as chain-of-thought
    lengths have), plus a prompt of 50-300 tokens per response."""
    lengths = rng.lognormal(6.0, 1.2, (groups, k))
    prompts = rng.integers(50, 300, groups)
    return [GroupCost(i, float(lengths[i].sum() + k * prompts[i])) for i in range(groups)]


@pytest.mark.parametrize("replicas", [2, 8, 64])
def test_long_tailed_within_four_thirds_and_beats_contiguous(replicas):
    rng = np.random.default_rng(replicas)
    ours, naive = [], []
    for _ in range(50):
        groups = long_tailed(rng, int(rng.integers(replicas, 8 * replicas)))
        lb = lower_bound([g.cost for g in groups], replicas)
        plan = assign(groups, replicas)
        assert max(loads(plan, groups)) <= 4 / 3 * lb + 1e-9
        ours.append(max(loads(plan, groups)) / lb)
        naive.append(max(loads(contiguous(groups, replicas), groups)) / lb)
    assert np.mean(ours) < np.mean(naive)


@pytest.mark.parametrize("context,new,scale", [(300, 0, 2048.0), (300, 1, 2048.0),
                                               (20000, 12000, 2048.0), (7, 5, 3.0)])
def test_expected_cost_is_prefill_plus_each_tokens_reads(context, new, scale):
    """Token j of `new` reads context + j cached tokens: one unit of work per `scale` of
    them, on top of its own unit; the context's prefill is one unit a token."""
    by_token = context + sum(1 + (context + j) / scale for j in range(new))
    assert expected_cost(context, new, scale) == pytest.approx(by_token)
    assert expected_cost(context, new, 0.0) == context + new  # tokens only


def test_costing_cache_reads_separates_long_generations():
    """Two replicas, four groups of 10K tokens each: two generate 9.7K tokens after a 300-token
    prompt, two continue 9K cached tokens by 1K. By tokens every group costs the same and
    the tie-break puts both long generations on replica 0, whose decode steps then read the
    longest caches; costed by reads they go to different replicas."""
    shapes = [(300, 9_700), (9_000, 1_000), (300, 9_700), (9_000, 1_000)]
    by_tokens = [GroupCost(i, expected_cost(c, n, 0.0)) for i, (c, n) in enumerate(shapes)]
    by_reads = [GroupCost(i, expected_cost(c, n, 2048.0)) for i, (c, n) in enumerate(shapes)]
    assert len({g.cost for g in by_tokens}) == 1
    assert assign(by_tokens, 2) == [[0, 2], [1, 3]]
    plan = assign(by_reads, 2)
    assert sorted(map(sorted, plan)) == [[0, 1], [2, 3]]
    # the work each plan leaves on its slowest replica, counted by reads
    assert max(loads(plan, by_reads)) < 0.8 * max(loads([[0, 2], [1, 3]], by_reads))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        assign([GroupCost(0, 1.0)], 0)
    with pytest.raises(ValueError, match="home replica 2"):
        assign([GroupCost(0, 1.0, home=2)], 2)
    with pytest.raises(ValueError, match="keys must be unique"):
        assign([GroupCost(0, 1.0), GroupCost(0, 2.0)], 2)
    with pytest.raises(ValueError, match="margin"):
        assign([GroupCost(0, 1.0)], 2, margin=-0.1)


def test_length_history_problem_then_level_then_default():
    h = LengthHistory()
    h.update([("p1", 1, 10), ("p1", 1, 30), ("p2", 1, 50), ("p3", 2, 7)])
    assert h.expected("p1", 1, 99) == 20.0
    assert h.expected("p9", 1, 99) == 30.0  # level 1: (10 + 30 + 50) / 3
    assert h.expected("p9", 5, 99) == 99.0
    copy = LengthHistory()
    copy.load_state_dict(h.state_dict())
    assert copy.expected("p9", 2, 0) == 7.0 and copy == h
