"""Packed batches: sequences placed end to end in rows, no padding per sequence.

Rows have a common length (the longest unit, or `row_tokens` if larger) and are filled
first-fit-decreasing, so only each row's tail is padding. Position ids restart at 0 for
each sequence, and the batch carries its segments' boundaries (`cu_seqlens`): attention
runs per segment (kimi_rl/attention.py, `packed_attention`), so a row costs the sum of
its sequences' causal attention and memory linear in its length; no [L, L] mask is built.

Shared prompts (`share_prompts`): the samples of a group have the same prompt, and its
forward pass is the same for each of them. A unit [prompt, response 1, ..., response n]
computes it once: response j's positions continue from the prompt's, and its segment
names the prompt's as its prefix (`segment_prefix`): its tokens see the prompt and
response j's own earlier tokens only, so every logprob is the one of the sequence
[prompt, response j] alone (the gradient too: the prompt's activations receive the sum
over the responses). A group is shared when its prompt is at least as long as its
responses on average (the prompt tokens saved then outweigh the prompt keys each response
reads again), in units of at most SHARE_ROW_FACTOR times the
longest sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SHARE_ROW_FACTOR = 4


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
    # [N] flat positions of the hidden states that predict the targets (with shared
    # prompts, a response's first token follows the prompt, not the slot before it);
    # None: target_index - 1
    source_index: Tensor | None = None
    # [S+1] int32 boundaries of the segments in the flattened rows (R*L): every slot
    # covered in order, a row's padding tail a segment of its own. A segment is a
    # sequence, or in a shared-prompt unit its prompt or one of its non-empty responses
    cu_seqlens: Tensor | None = None
    # [S] per segment, the segment it also sees in full (a response's shared prompt), -1
    # for none; None when no prompt is shared (position ids alone then give the segments)
    segment_prefix: Tensor | None = None

    @property
    def targets(self) -> Tensor:
        return self.input_ids.reshape(-1)[self.target_index]

    @property
    def sources(self) -> Tensor:
        return self.target_index - 1 if self.source_index is None else self.source_index


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


def _units(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
           share: bool) -> list[list[int]]:
    """Sequence indices per unit: one each, or with `share` the members of a group (equal
    prompts) whose prompt is at least their mean response length, in runs of at most
    SHARE_ROW_FACTOR x the longest sequence's tokens."""
    if not share:
        return [[i] for i in range(len(prompts))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    cap = SHARE_ROW_FACTOR * max(len(p) + len(r) for p, r in zip(prompts, responses,
                                                                  strict=True))
    units: list[list[int]] = []
    for prompt, members in groups.items():
        mean_response = sum(len(responses[i]) for i in members) / len(members)
        if len(members) == 1 or len(prompt) < mean_response:
            units += [[i] for i in members]
            continue
        unit, size = [], len(prompt)
        for i in members:
            if unit and size + len(responses[i]) > cap:
                units.append(unit)
                unit, size = [], len(prompt)
            unit.append(i)
            size += len(responses[i])
        units.append(unit)
    return units


def pack(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    max_tokens: int,
    loss_masks: Sequence[Sequence[bool]] | None = None,
    row_tokens: int = 0,
    pad_id: int = 0,
    versions: Sequence[Sequence[int]] | None = None,
    share_prompts: bool = False,
) -> list[PackedBatch]:
    """Pack prompt+response sequences into micro-batches of at most `max_tokens` row
    tokens (at least one row each). Targets are the response tokens, or those whose
    `loss_masks` entry is True. Sequences must have a non-empty prompt. `versions` (one
    per response token: the iteration that generated it) travel with the targets.
    `share_prompts`: equal prompts computed once per unit (module docstring)."""
    n_seq = len(prompts)
    if len(responses) != n_seq:
        raise ValueError(f"{n_seq} prompts for {len(responses)} responses")
    for i in range(n_seq):
        if not prompts[i]:
            raise ValueError(f"sequence {i} has an empty prompt")
        mask = loss_masks[i] if loss_masks is not None else None
        if mask is not None and len(mask) != len(responses[i]):
            raise ValueError(f"loss mask of sequence {i} has {len(mask)} entries "
                             f"for {len(responses[i])} tokens")
        if versions is not None and len(versions[i]) != len(responses[i]):
            raise ValueError(f"versions of sequence {i} have {len(versions[i])} "
                             f"entries for {len(responses[i])} tokens")
    if not n_seq:
        return []
    units = _units(prompts, responses, share_prompts)
    lengths = [len(prompts[u[0]]) + sum(len(responses[i]) for i in u) for u in units]
    shared = any(len(u) > 1 for u in units)
    row_len = max(max(lengths), row_tokens)
    rows = _rows(lengths, row_len)
    per_batch = max(1, max_tokens // row_len)
    batches = []
    for b in range(0, len(rows), per_batch):
        batch_rows = rows[b:b + per_batch]
        ids = torch.full((len(batch_rows), row_len), pad_id, dtype=torch.long)
        pos = torch.zeros((len(batch_rows), row_len), dtype=torch.long)
        cu = [0]  # segment boundaries (flat) and each segment's prefix segment
        prefix: list[int] = []
        tgt: list[int] = []
        src: list[int] = []
        seq: list[int] = []
        vers: list[int] = []
        seq_ids: list[int] = []
        for r, members in enumerate(batch_rows):
            at = 0
            for u in members:
                p = prompts[units[u][0]]
                ids[r, at:at + len(p)] = torch.tensor(list(p))
                pos[r, at:at + len(p)] = torch.arange(len(p))
                last_prompt = r * row_len + at + len(p) - 1
                at += len(p)
                one = len(units[u]) == 1  # a whole sequence: one segment
                if not one:
                    prompt_segment = len(prefix)
                    cu.append(r * row_len + at)
                    prefix.append(-1)
                for i in units[u]:
                    resp = responses[i]
                    mask = loss_masks[i] if loss_masks is not None else [True] * len(resp)
                    ids[r, at:at + len(resp)] = torch.tensor(list(resp), dtype=torch.long)
                    pos[r, at:at + len(resp)] = torch.arange(len(p), len(p) + len(resp))
                    start = r * row_len + at
                    for t in range(len(resp)):
                        if mask[t]:
                            tgt.append(start + t)
                            src.append(start + t - 1 if t else last_prompt)
                    if versions is not None:
                        vers += [v for v, m in zip(versions[i], mask, strict=True) if m]
                    seq += [len(seq_ids)] * sum(bool(m) for m in mask)
                    seq_ids.append(i)
                    at += len(resp)
                    if not one and resp:
                        cu.append(r * row_len + at)
                        prefix.append(prompt_segment)
                if one:
                    cu.append(r * row_len + at)
                    prefix.append(-1)
            pos[r, at:] = torch.arange(row_len - at)  # the tail pads form a block of their own
            if at < row_len:
                cu.append((r + 1) * row_len)
                prefix.append(-1)
        batches.append(PackedBatch(
            input_ids=ids, position_ids=pos,
            target_index=torch.tensor(tgt, dtype=torch.long),
            seq_index=torch.tensor(seq, dtype=torch.long),
            seq_ids=seq_ids, num_tokens=sum(lengths[u] for row in batch_rows for u in row),
            target_versions=(torch.tensor(vers, dtype=torch.long) if versions is not None
                             else None),
            source_index=torch.tensor(src, dtype=torch.long) if shared else None,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            segment_prefix=torch.tensor(prefix, dtype=torch.long) if shared else None,
        ))
    return batches


def dense_mask(batch: PackedBatch) -> Tensor:
    """[R, 1, L, L] bool, True where a query may attend a key: the segments as one mask,
    for attention implementations that take no segments (eager, which builds [L, L]
    scores anyway). kimi-rl's attention never builds it."""
    rows, length = batch.input_ids.shape
    cu = batch.cu_seqlens.long()
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1]).view(rows, length)
    pre = (batch.segment_prefix if batch.segment_prefix is not None
           else torch.full((len(cu) - 1,), -1, dtype=torch.long))[seg]
    sees = (seg[:, :, None] == seg[:, None, :]) | (pre[:, :, None] == seg[:, None, :])
    return (sees & torch.ones(length, length, dtype=torch.bool).tril())[:, None]
