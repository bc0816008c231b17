"""Packed batches: sequences placed end to end in rows, no padding per sequence.

Rows have a common length (the longest sequence, or `row_tokens` if larger) and are
filled first-fit-decreasing, so only each row's tail is padding. Position ids restart at 0
for each sequence, and transformers restricts attention to each sequence from them (the
block-diagonal mask), so a row costs row_len^2 attention, not (all tokens)^2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PackedBatch:
    input_ids: Tensor  # [R, L] rows of packed sequences
    position_ids: Tensor  # [R, L]
    target_index: Tensor  # [N] flat positions (in R*L) of the tokens whose logprob is needed
    seq_index: Tensor  # [N] local sequence index (0..S-1) of each of those tokens
    seq_ids: list[int]  # the caller's indices of the S sequences in this batch
    num_tokens: int  # real (non-padding) tokens
    # [N] per target token, the iteration (policy version) that generated it, when known
    target_versions: Tensor | None = None

    @property
    def targets(self) -> Tensor:
        return self.input_ids.reshape(-1)[self.target_index]


def _rows(lengths: list[int], row_len: int) -> list[list[int]]:
    """First-fit-decreasing: sequence indices per row."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, f in enumerate(free):
            if lengths[i] <= f:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    max_tokens: int,
    loss_masks: Sequence[Sequence[bool]] | None = None,
    row_tokens: int = 0,
    pad_id: int = 0,
    versions: Sequence[Sequence[int]] | None = None,
) -> list[PackedBatch]:
    """Pack prompt+response sequences into micro-batches of at most `max_tokens` row
    tokens (at least one row each). Targets are the response tokens, or those whose
    `loss_masks` entry is True. Sequences must have a non-empty prompt. `versions` (one
    per response token: the iteration that generated it) travel with the targets."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    if not lengths:
        return []
    row_len = max(max(lengths), row_tokens)
    rows = _rows(lengths, row_len)
    per_batch = max(1, max_tokens // row_len)
    batches = []
    for b in range(0, len(rows), per_batch):
        batch_rows = rows[b:b + per_batch]
        ids = torch.full((len(batch_rows), row_len), pad_id, dtype=torch.long)
        pos = torch.zeros((len(batch_rows), row_len), dtype=torch.long)
        tgt: list[int] = []
        seq: list[int] = []
        vers: list[int] = []
        seq_ids: list[int] = []
        for r, members in enumerate(batch_rows):
            at = 0
            for i in members:
                p, resp = prompts[i], responses[i]
                if not p:
                    raise ValueError(f"sequence {i} has an empty prompt")
                mask = loss_masks[i] if loss_masks is not None else [True] * len(resp)
                if len(mask) != len(resp):
                    raise ValueError(f"loss mask of sequence {i} has {len(mask)} entries "
                                     f"for {len(resp)} tokens")
                if versions is not None:
                    if len(versions[i]) != len(resp):
                        raise ValueError(f"versions of sequence {i} have {len(versions[i])} "
                                         f"entries for {len(resp)} tokens")
                    vers += [v for v, m in zip(versions[i], mask, strict=True) if m]
                n = len(p) + len(resp)
                ids[r, at:at + n] = torch.tensor(list(p) + list(resp))
                pos[r, at:at + n] = torch.arange(n)
                start = r * row_len + at + len(p)
                tgt += [start + t for t in range(len(resp)) if mask[t]]
                seq += [len(seq_ids)] * sum(bool(m) for m in mask)
                seq_ids.append(i)
                at += n
            pos[r, at:] = torch.arange(row_len - at)  # the tail pads form a block of their own
        batches.append(PackedBatch(
            input_ids=ids, position_ids=pos,
            target_index=torch.tensor(tgt, dtype=torch.long),
            seq_index=torch.tensor(seq, dtype=torch.long),
            seq_ids=seq_ids, num_tokens=sum(lengths[i] for row in batch_rows for i in row),
            target_versions=(torch.tensor(vers, dtype=torch.long) if versions is not None
                             else None),
        ))
    return batches
