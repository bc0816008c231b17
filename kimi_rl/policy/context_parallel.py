"""Packed rows in THD layout and their split over context-parallel (CP) ranks: the index
arithmetic of Megatron's Transformer Engine path (pure functions on lengths and indices).

THD ("total tokens, heads, dim") packs a micro-batch's sequences end to end in one row,
described by `cu_seqlens` (cumulative real lengths) and `cu_seqlens_padded` (cumulative
padded lengths): Transformer Engine's attention reads each sequence at its padded offset
and ignores the padding past its real length. With context parallel every sequence is cut
into 2 x CP equal chunks and rank r holds chunks r and 2 x CP - 1 - r ("zigzag"): under a
causal mask early chunks are cheap and late ones dear, so each rank gets one of each and
the ranks' attention work is balanced. So every sequence is padded to a multiple of
2 x CP, and with sequence parallel (the row split over TP ranks too) of 2 x CP x TP
(TP alone without CP: of TP). Padding tokens are masked out of the loss.

    layout = thd_layout([5, 3], cp=2)           # padded to 8 and 4
    layout.cu_seqlens, layout.cu_seqlens_padded  # [0, 5, 8], [0, 8, 12]
    zigzag_positions(layout, cp=2, rank=0)       # [0, 1, 6, 7, 8, 11]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def pad_multiple(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """What every sequence's length is padded to a multiple of."""
    if cp < 1 or tp < 1:
        raise ValueError(f"context_parallel and tensor_parallel must be >= 1, got {cp}, {tp}")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel needs tensor_parallel > 1")
    return (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)


@dataclass(frozen=True)
class ThdLayout:
    lengths: tuple[int, ...]  # real lengths
    padded: tuple[int, ...]  # each a multiple of `multiple`

    @property
    def cu_seqlens(self) -> list[int]:
        return [sum(self.lengths[:i]) for i in range(len(self.lengths) + 1)]

    @property
    def cu_seqlens_padded(self) -> list[int]:
        return [sum(self.padded[:i]) for i in range(len(self.padded) + 1)]

    @property
    def total(self) -> int:
        return sum(self.padded)


def thd_layout(lengths: list[int], cp: int = 1, tp: int = 1,
               sequence_parallel: bool = False) -> ThdLayout:
    """The padded layout of sequences of `lengths` (each >= 1)."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"thd_layout: sequence lengths must be >= 1, got {lengths}")
    m = pad_multiple(cp, tp, sequence_parallel)
    return ThdLayout(tuple(lengths), tuple(-(-n // m) * m for n in lengths))


def pad_row(values: Tensor, layout: ThdLayout, fill: int | float = 0) -> tuple[Tensor, Tensor]:
    """The sequences of `values` [sum(lengths), ...] (end to end, unpadded) at their padded
    offsets, `fill` in the padding; and the bool mask [total] of real tokens (the loss
    mask)."""
    if values.shape[0] != sum(layout.lengths):
        raise ValueError(f"pad_row: {values.shape[0]} values for sequences of "
                         f"{sum(layout.lengths)} tokens")
    out = values.new_full((layout.total, *values.shape[1:]), fill)
    real = torch.zeros(layout.total, dtype=torch.bool, device=values.device)
    for n, a, p in zip(layout.lengths, layout.cu_seqlens, layout.cu_seqlens_padded,
                       strict=False):
        out[p:p + n] = values[a:a + n]
        real[p:p + n] = True
    return out, real


def zigzag_positions(layout: ThdLayout, cp: int, rank: int) -> Tensor:
    """Positions in the padded row held by CP rank `rank`: per sequence, chunks `rank` and
    2 x cp - 1 - rank of its 2 x cp equal chunks, in row order."""
    if not 0 <= rank < cp:
        raise ValueError(f"zigzag_positions: rank {rank} outside the {cp} CP ranks")
    out = []
    for start, n in zip(layout.cu_seqlens_padded, layout.padded, strict=False):
        if cp == 1:
            out.append(torch.arange(start, start + n))
            continue
        if n % (2 * cp):
            raise ValueError(f"zigzag_positions: a padded length {n} is not a multiple of "
                             f"2 x CP = {2 * cp}")
        c = n // (2 * cp)
        for k in (rank, 2 * cp - 1 - rank):
            out.append(torch.arange(start + k * c, start + (k + 1) * c))
    return torch.cat(out)


def gathered_positions(layout: ThdLayout, cp: int) -> Tensor:
    """The padded-row position of each token of the CP ranks' parts gathered in rank order."""
    return torch.cat([zigzag_positions(layout, cp, r) for r in range(cp)])


def unsplit(parts: list[Tensor], layout: ThdLayout) -> Tensor:
    """The padded row from every CP rank's zigzag part (rank order): the inverse of taking
    `row[zigzag_positions(layout, cp, r)]` for each rank r."""
    index = gathered_positions(layout, len(parts))
    values = torch.cat(parts)
    if values.shape[0] != layout.total:
        raise ValueError(f"unsplit: {values.shape[0]} values for a row of {layout.total}")
    out = values.new_empty((layout.total, *values.shape[1:]))
    out[index.to(values.device)] = values
    return out


@dataclass
class CPShard:
    """One CP rank's part of a packed micro-batch (cp_shard): its zigzag tokens of the
    batch's sequences laid out in THD, and the targets whose predicting hidden state it
    holds."""

    input_ids: Tensor  # [n] this rank's tokens, in padded-row order
    position_ids: Tensor  # [n] each token's position within its sequence
    index: Tensor  # [2, n] each token's position in the padded row, and its sequence's start
    # [cp x n] the padded row's order of every rank's tokens gathered in rank order (the
    # same on every rank: keys and values all-gathered over the group, then `[order]`)
    order: Tensor
    sources: Tensor  # [m] local indices of the hidden states that predict this rank's targets
    slots: Tensor  # [m] which of the batch's targets those are (indices into its N targets)
    targets: Tensor  # [m] their token ids
    layout: ThdLayout


def cp_shard(input_ids: Tensor, position_ids: Tensor, sources: Tensor, targets: Tensor,
             cp: int, rank: int, tp: int = 1, sequence_parallel: bool = False,
             pad_id: int = 0) -> CPShard:
    """CP rank `rank`'s share of packed rows `input_ids` [R, L] (a sequence starts where its
    position id is 0, as every row does) whose targets `targets` [N] are predicted by the
    hidden states at flat positions `sources` [N] (in R x L): the sequences end to end,
    each padded as thd_layout says (pad tokens `pad_id`, positions counting on), then the
    rank's zigzag chunks. Every target is this rank's or another's, never two ranks'."""
    flat_ids, flat_pos = input_ids.reshape(-1), position_ids.reshape(-1)
    rows, length = input_ids.shape
    starts = (flat_pos == 0)
    starts[::length] = True  # a row's first token starts a sequence
    seq = torch.cumsum(starts.long(), 0) - 1  # sequence of each flat position
    lengths = torch.bincount(seq).tolist()
    layout = thd_layout(lengths, cp, tp, sequence_parallel)
    flat_start = torch.tensor(layout.cu_seqlens[:-1])
    padded_start = torch.tensor(layout.cu_seqlens_padded[:-1])
    where = padded_start[seq] + torch.arange(flat_ids.numel()) - flat_start[seq]  # flat -> row
    ids = flat_ids.new_full((layout.total,), pad_id)
    ids[where] = flat_ids
    start_of = torch.repeat_interleave(padded_start, torch.tensor(layout.padded))
    pos = torch.arange(layout.total) - start_of
    local = zigzag_positions(layout, cp, rank)
    inv = torch.full((layout.total,), -1, dtype=torch.long)
    inv[local] = torch.arange(local.numel())
    held = inv[where[sources]]
    mine = held >= 0
    order = torch.argsort(gathered_positions(layout, cp))
    return CPShard(ids[local], pos[local], torch.stack([local, start_of[local]]), order,
                   held[mine], torch.nonzero(mine)[:, 0], targets[mine], layout)
