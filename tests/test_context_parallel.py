"""THD layout and the zigzag context-parallel split (kimi_rl/policy/context_parallel.py):
hand-computed cases, and causal attention computed as CP ranks would (each rank's queries
over the sequence's gathered keys) against per-sequence attention on the unpadded row."""

from __future__ import annotations

import pytest
import torch

from kimi_rl.policy.context_parallel import (
    cp_shard,
    pad_multiple,
    pad_row,
    thd_layout,
    unsplit,
    zigzag_positions,
)


def test_hand_computed_layouts():
    lay = thd_layout([5, 3], cp=2)
    assert lay.padded == (8, 4)
    assert lay.cu_seqlens == [0, 5, 8] and lay.cu_seqlens_padded == [0, 8, 12]
    assert zigzag_positions(lay, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert zigzag_positions(lay, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    assert thd_layout([5, 3], cp=2, tp=2, sequence_parallel=True).padded == (8, 8)
    assert thd_layout([5, 3], cp=1, tp=2, sequence_parallel=True).padded == (6, 4)
    assert thd_layout([5, 3]).padded == (5, 3)  # no CP, no SP: no padding
    assert thd_layout([13], cp=3).padded == (18,)
    assert zigzag_positions(thd_layout([13], cp=3), 3, 1).tolist() == [3, 4, 5, 12, 13, 14]
    assert [pad_multiple(1), pad_multiple(4), pad_multiple(4, 8, True)] == [1, 8, 64]


def test_pad_row_and_its_loss_mask():
    row, real = pad_row(torch.arange(8), thd_layout([5, 3], cp=2), fill=-1)
    assert row.tolist() == [0, 1, 2, 3, 4, -1, -1, -1, 5, 6, 7, -1]
    assert real.tolist() == [True] * 5 + [False] * 3 + [True] * 3 + [False]


@pytest.mark.parametrize("cp", [2, 3])
def test_unsplit_inverts_the_split(cp):
    lay = thd_layout([7, 1, 12], cp=cp)
    row = torch.randn(lay.total, 3)
    parts = [row[zigzag_positions(lay, cp, r)] for r in range(cp)]
    assert sorted(torch.cat([zigzag_positions(lay, cp, r) for r in range(cp)]).tolist()) \
        == list(range(lay.total))  # the ranks' parts cover the row once
    assert torch.equal(unsplit(parts, lay), row)


def causal_reference(q, k, v, lengths):
    """Per sequence, causal softmax attention on the unpadded row (float64)."""
    out, at = [], 0
    for n in lengths:
        s = q[at:at + n] @ k[at:at + n].T
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(s, -1) @ v[at:at + n])
        at += n
    return torch.cat(out)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_cp_ranks_attention_equals_the_unsplit_row(cp):
    """Each CP rank holds its zigzag queries and attends over its sequences' gathered keys
    (same sequence, key position <= query position, real keys only); the ranks' outputs put
    back in row order equal unsplit attention on every real token. The causal work (query,
    key pairs) is the same on every rank."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 12, 1]
    lay = thd_layout(lengths, cp=cp)
    q, k, v = (torch.randn(sum(lengths), 4, generator=g, dtype=torch.float64) for _ in "qkv")
    ref = causal_reference(q, k, v, lengths)
    (qp, real), (kp, _), (vp, _) = (pad_row(t, lay) for t in (q, k, v))
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lay.padded))
    start = torch.tensor(lay.cu_seqlens_padded[:-1])[seq]
    parts, work = [], []
    for r in range(cp):
        pos = zigzag_positions(lay, cp, r)
        visible = ((seq[None, :] == seq[pos][:, None]) & real[None, :]
                   & (torch.arange(lay.total)[None, :] <= pos[:, None]))
        scores = (qp[pos] @ kp.T).masked_fill(~visible, float("-inf"))
        parts.append(torch.nan_to_num(torch.softmax(scores, -1)) @ vp)
        work.append(int(((torch.arange(lay.total)[None, :] <= pos[:, None])
                         & (seq[None, :] == seq[pos][:, None])
                         & (torch.arange(lay.total)[None, :] >= start[pos][:, None])).sum()))
    out = unsplit(parts, lay)
    torch.testing.assert_close(out[real], ref, rtol=1e-12, atol=1e-12)
    assert len(set(work)) == 1, work  # zigzag: balanced causal work


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="sequence lengths must be >= 1"):
        thd_layout([4, 0], cp=2)
    with pytest.raises(ValueError, match="sequence_parallel needs tensor_parallel > 1"):
        pad_multiple(2, 1, True)
    with pytest.raises(ValueError, match="rank 2 outside the 2 CP ranks"):
        zigzag_positions(thd_layout([4], cp=2), 2, 2)
    with pytest.raises(ValueError, match="3 values for sequences of 4 tokens"):
        pad_row(torch.zeros(3), thd_layout([4], cp=2))


def test_cp_shard_hand_computed():
    """Two rows: [p p p r r r r r . .] and [p p p p r r r q q s]: sequences of 8, 2 (the
    first row's padding tail), 7 and 3; at CP=2 padded to 8, 4, 8, 4 and cut in chunks of
    2, 1, 2, 1; rank 0 holds chunks 0 and 3 of each."""
    from kimi_rl.policy.packing import pack

    (b,) = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[10, 11, 12, 13, 14], [15], [16, 17, 18]],
                max_tokens=20, row_tokens=10)
    s0 = cp_shard(b.input_ids, b.position_ids, b.sources, b.targets, cp=2, rank=0)
    assert s0.layout.lengths == (8, 2, 7, 3) and s0.layout.padded == (8, 4, 8, 4)
    assert s0.index[0].tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19, 20, 23]
    assert s0.index[1].tolist() == [0, 0, 0, 0, 8, 8, 12, 12, 12, 12, 20, 20]
    assert s0.input_ids.tolist() == [1, 2, 13, 14, 0, 0, 6, 7, 18, 0, 4, 0]
    assert s0.position_ids.tolist() == [0, 1, 6, 7, 0, 3, 0, 1, 6, 7, 0, 3]
    # the target 14 is predicted by 13 (local index 2); the others by rank 1's tokens
    assert (s0.sources.tolist(), s0.slots.tolist(), s0.targets.tolist()) == ([2], [4], [14])
    s1 = cp_shard(b.input_ids, b.position_ids, b.sources, b.targets, cp=2, rank=1)
    assert s1.slots.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    assert s1.targets.tolist() == [10, 11, 12, 13, 16, 17, 18, 15]
    assert s1.input_ids[s1.sources].tolist() == [3, 10, 11, 12, 9, 16, 17, 5]


@pytest.mark.parametrize("cp,tp,sp", [(2, 1, False), (3, 1, False), (2, 2, True), (4, 1, False)])
def test_cp_shard_covers_every_target_once(cp, tp, sp):
    """Random packings: every target is one rank's, predicted there by the token that
    precedes it in its sequence; each rank holds the same number of tokens (a multiple of
    TP with sequence parallel), and the ranks' tokens are the padded row's."""
    from kimi_rl.policy.packing import pack

    g = torch.Generator().manual_seed(cp * 10 + tp)
    for trial in range(5):
        n = int(torch.randint(1, 9, (1,), generator=g))
        prompts = [torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(n)]
        resps = [torch.randint(1, 50, (int(torch.randint(1, 12, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(n)]
        for b in pack(prompts, resps, max_tokens=40):
            flat = b.input_ids.reshape(-1)
            shards = [cp_shard(b.input_ids, b.position_ids, b.sources, b.targets, cp, r, tp, sp)
                      for r in range(cp)]
            slots = torch.cat([s.slots for s in shards])
            assert sorted(slots.tolist()) == list(range(b.targets.numel())), trial
            for s in shards:
                assert s.input_ids.numel() == s.layout.total // cp
                assert s.input_ids.numel() % (tp if sp else 1) == 0
                assert torch.equal(s.targets, b.targets[s.slots])
                assert torch.equal(s.input_ids[s.sources], flat[b.sources[s.slots]])
            row = unsplit([s.input_ids for s in shards], shards[0].layout)
            real = row[torch.cat([torch.arange(p, p + m) for p, m in zip(
                shards[0].layout.cu_seqlens_padded, shards[0].layout.lengths, strict=False)])]
            assert torch.equal(real, flat)  # the sequences end to end, rows in order
