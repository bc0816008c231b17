"""Packed batches and the hf policy backend against plain per-sequence forward passes."""

from __future__ import annotations

import random

import pytest
import torch

import kimi_rl.policy.hf as hf
from kimi_rl.config import AlgoConfig, BackendConfig
from kimi_rl.policy.hf import HFPolicy, token_logprobs
from kimi_rl.policy.packing import pack

PAD = 0
FIRST_REAL = 4  # ids 0-3 are the char tokenizer's special tokens


def make_sequences(vocab: int, n: int = 11, seed: int = 0):
    """Prompts of 1-7 tokens, responses of 0-9 tokens (one empty), no pad ids. Lengths
    come from their own stream, so the layout does not depend on the vocabulary size."""
    lens, toks = random.Random(seed), random.Random(seed + 1000)
    shape = [(lens.randint(1, 7), lens.randint(1, 9)) for _ in range(n)]
    shape[3] = (shape[3][0], 0)
    prompts = [[toks.randrange(FIRST_REAL, vocab) for _ in range(a)] for a, _ in shape]
    responses = [[toks.randrange(FIRST_REAL, vocab) for _ in range(b)] for _, b in shape]
    return prompts, responses


def reference(model, prompt, response, temperature=1.0):
    """Per-response-token logprobs and entropies from one unpacked forward pass."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    rows = logp[len(prompt) - 1: len(prompt) - 1 + len(response)]
    lp = rows.gather(-1, torch.tensor(response, dtype=torch.long)[:, None])[:, 0]
    ent = -(rows.exp() * rows).sum(-1)
    return lp, ent


def per_sequence(batches, outputs, n):
    """Regroup flat per-target outputs by the caller's sequence index, in token order."""
    got = {i: ([], []) for i in range(n)}
    for b, (lp, ent) in zip(batches, outputs, strict=True):
        assert lp.shape == ent.shape == b.target_index.shape
        for k in range(len(lp)):
            i = b.seq_ids[int(b.seq_index[k])]
            got[i][0].append(float(lp[k]))
            got[i][1].append(float(ent[k]))
    return {i: (torch.tensor(a, dtype=torch.float64), torch.tensor(e, dtype=torch.float64))
            for i, (a, e) in got.items()}


def rows_of(batch):
    """Per row: the number of sequences in it (position ids restart at 0 per sequence)."""
    return [int((batch.position_ids[r] == 0).sum()) for r in range(batch.input_ids.shape[0])]


def ffd_reference(lengths, cap):
    """First-fit-decreasing bins (stable for equal lengths), written out independently."""
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for b in bins:
            if sum(lengths[j] for j in b) + lengths[i] <= cap:
                b.append(i)
                break
        else:
            bins.append([i])
    return bins


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("masked", [False, True])
def test_packed_logprobs_equal_unpacked(model, tokenizer, temperature, masked):
    prompts, responses = make_sequences(len(tokenizer))
    masks = None
    if masked:
        rng = random.Random(1)
        masks = [[rng.random() < 0.5 for _ in r] for r in responses]
        # a sequence with no target at all, next to others that have some
        layout = pack(prompts, responses, max_tokens=40, row_tokens=20)
        shared = next(b for b in layout if len(b.seq_ids) >= 3)
        masks[shared.seq_ids[0]] = [False] * len(responses[shared.seq_ids[0]])
    batches = pack(prompts, responses, max_tokens=40, loss_masks=masks, row_tokens=20)
    # the case under test: several micro-batches, several sequences in some rows
    assert len(batches) >= 2
    assert max(n for b in batches for n in rows_of(b)) >= 2
    assert all(b.target_index.numel() > 0 for b in batches)  # see the test below for none
    policy = HFPolicy(model, BackendConfig(logits_chunk=5), AlgoConfig())
    outputs = [policy.logprobs(b, temperature=temperature) for b in batches]
    got = per_sequence(batches, outputs, len(prompts))
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        lp, ent = reference(model, p, r, temperature)
        keep = torch.tensor(masks[i] if masks else [True] * len(r), dtype=torch.bool)
        torch.testing.assert_close(got[i][0], lp[keep], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[i][1], ent[keep], atol=1e-5, rtol=0)


def test_logprobs_of_a_micro_batch_without_targets(model):
    (batch,) = pack([[5, 6], [7]], [[8, 9], []], max_tokens=100, loss_masks=[[False] * 2, []])
    assert batch.target_index.numel() == 0
    policy = HFPolicy(model, BackendConfig(logits_chunk=4), AlgoConfig())
    lp, ent = policy.logprobs(batch)
    assert lp.shape == ent.shape == (0,)


def test_token_logprobs_without_rows_stay_in_the_graph(model):
    """No target rows: empty results that still carry grad, so a zero loss back-propagates."""
    weight = model.get_output_embeddings().weight
    hidden = torch.randn(3, weight.shape[1], requires_grad=True)
    for chunk in (1, 4):
        lp, ent = token_logprobs(hidden[:0], weight, torch.zeros(0, dtype=torch.long), chunk)
        assert lp.shape == ent.shape == (0,)
        assert lp.requires_grad
        loss = -lp.sum()
        loss.backward()
        assert loss.item() == 0.0
        assert torch.count_nonzero(hidden.grad) == 0


def test_train_step_with_a_micro_batch_without_targets(model):
    """A micro-batch that contributes nothing leaves the step equal to the step without it."""
    prompts, responses = [[5, 6], [7, 8]], [[9, 10, 11], [12]]
    full = pack(prompts, responses, max_tokens=100)
    (empty,) = pack(prompts, responses, max_tokens=100, loss_masks=[[False] * 3, [False]])
    policy = HFPolicy(model, BackendConfig(logits_chunk=4), AlgoConfig(lr=0.0, grad_clip=1e9))
    loss_fn = lambda lp, mb: (-lp.sum(), {"loss/pg": -lp.sum().item()})
    policy.train_step(full, loss_fn)
    expected = [p.grad.clone() for p in model.parameters()]
    policy.train_step([*full, empty], loss_fn)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g)


def test_pack_layout(tokenizer):
    prompts, responses = make_sequences(len(tokenizer), n=13, seed=5)
    rng = random.Random(2)
    masks = [[rng.random() < 0.7 for _ in r] for r in responses]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    row_tokens, max_tokens = 21, 50
    batches = pack(prompts, responses, max_tokens=max_tokens, loss_masks=masks,
                   row_tokens=row_tokens, pad_id=PAD)
    row_len = max(max(lengths), row_tokens)
    per_batch = max_tokens // row_len

    rows, seen = [], []
    for bi, b in enumerate(batches):
        assert b.input_ids.shape[1] == row_len
        assert b.input_ids.shape == b.position_ids.shape
        n_rows = b.input_ids.shape[0]
        assert n_rows == per_batch or (bi == len(batches) - 1 and 1 <= n_rows <= per_batch)
        order = iter(b.seq_ids)
        real = 0
        for r in range(n_rows):
            at, members = 0, []
            while at < row_len and int(b.input_ids[r, at]) != PAD:
                i = next(order)
                n = lengths[i]
                assert b.input_ids[r, at:at + n].tolist() == prompts[i] + responses[i]
                assert b.position_ids[r, at:at + n].tolist() == list(range(n))
                members.append(i)
                at += n
            assert b.input_ids[r, at:].eq(PAD).all(), "padding only at the row's tail"
            rows.append(members)
            real += at
        assert next(order, None) is None
        assert b.num_tokens == real == sum(lengths[i] for i in b.seq_ids)
        seen += b.seq_ids
        expected = [t for i in b.seq_ids for t, m in zip(responses[i], masks[i], strict=True) if m]
        assert b.targets.tolist() == expected
        # each target's local sequence index, in placement order
        assert b.seq_index.tolist() == [k for k, i in enumerate(b.seq_ids) for m in masks[i] if m]
    assert sorted(seen) == list(range(len(prompts))), "every sequence exactly once"
    assert sorted(map(sorted, rows)) == sorted(map(sorted, ffd_reference(lengths, row_len)))
    assert len(rows) == len(ffd_reference(lengths, row_len))


def test_pack_rejects_bad_input():
    assert pack([], [], max_tokens=10) == []
    with pytest.raises(ValueError, match="empty prompt"):
        pack([[5], []], [[6], [7]], max_tokens=10)
    with pytest.raises(ValueError, match="loss mask"):
        pack([[5]], [[6, 7]], max_tokens=10, loss_masks=[[True]])


def _reference_token_logprobs(hidden, weight, targets, temperature):
    logits = hidden.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None])[:, 0], ent


def test_token_logprobs_chunked_values_and_gradients(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    n, h, v, chunk, temperature = 37, 8, 11, 5, 0.8
    hidden0 = torch.randn(n, h, generator=gen)
    weight0 = torch.randn(v, h, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    coef = torch.randn(n, generator=gen, dtype=torch.float64)

    calls = []
    real = hf._chunk_logprobs
    monkeypatch.setattr(hf, "_chunk_logprobs", lambda *a: calls.append(1) or real(*a))

    hidden = hidden0.clone().requires_grad_()
    weight = weight0.clone().requires_grad_()
    lp, ent = token_logprobs(hidden, weight, targets, chunk, temperature)
    n_chunks = -(-n // chunk)
    assert len(calls) == n_chunks
    (coef * lp.double()).sum().backward()
    # checkpointed: every chunk's logits are recomputed in backward instead of kept
    assert len(calls) == 2 * n_chunks

    ref_h = hidden0.double().requires_grad_()
    ref_w = weight0.double().requires_grad_()
    ref_lp, ref_ent = _reference_token_logprobs(ref_h, ref_w, targets, temperature)
    (coef * ref_lp).sum().backward()
    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), ref_h.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), ref_w.grad, atol=1e-5, rtol=1e-5)

    # one unchunked computation through the same function gives the same numbers
    hidden1 = hidden0.clone().requires_grad_()
    weight1 = weight0.clone().requires_grad_()
    lp1, _ = token_logprobs(hidden1, weight1, targets, n, temperature)
    (coef * lp1.double()).sum().backward()
    torch.testing.assert_close(lp, lp1, atol=1e-6, rtol=0)
    torch.testing.assert_close(hidden.grad, hidden1.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weight.grad, weight1.grad, atol=1e-6, rtol=1e-5)

    with torch.no_grad():
        calls.clear()
        lp2, _ = token_logprobs(hidden0, weight0, targets, chunk, temperature)
    assert len(calls) == n_chunks
    torch.testing.assert_close(lp2, lp.detach(), atol=1e-6, rtol=0)


def _setup_train(model, tokenizer, grad_clip=1e9):
    """Plain-gradient check: lr 0 leaves the weights where they are, and train_step zeroes
    grads only at its start, so p.grad after the step holds exactly the accumulated (and
    here unclipped) gradient of that step, which can be compared with autograd on
    per-sequence forward passes."""
    prompts, responses = make_sequences(len(tokenizer), n=9, seed=3)
    rng = random.Random(4)
    masks = [[rng.random() < 0.8 for _ in r] for r in responses]
    coefs = [rng.uniform(-1, 1) for _ in prompts]
    n_tokens = sum(map(sum, masks))
    policy = HFPolicy(model, BackendConfig(logits_chunk=6),
                      AlgoConfig(lr=0.0, grad_clip=grad_clip, weight_decay=0.0))
    return policy, prompts, responses, masks, coefs, n_tokens


def _loss_fn(coefs, n_tokens):
    def loss_fn(lp, mb):
        c = torch.tensor([coefs[i] for i in mb.seq_ids], dtype=lp.dtype)[mb.seq_index]
        loss = -(c * lp).sum() / n_tokens
        return loss, {"loss/pg": loss.item(), "stat/mean_lp": lp.mean().item()}
    return loss_fn


def _reference_grads(model, prompts, responses, masks, coefs, n_tokens, temperature):
    params = dict(model.named_parameters())
    total = 0.0
    for p, r, m, c in zip(prompts, responses, masks, coefs, strict=True):
        if not any(m):
            continue
        ids = torch.tensor([p + r])
        logits = model(input_ids=ids).logits[0].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)[len(p) - 1: len(p) - 1 + len(r)]
        lp = logp.gather(-1, torch.tensor(r)[:, None])[:, 0][torch.tensor(m, dtype=torch.bool)]
        total = total - c * lp.sum() / n_tokens
    grads = torch.autograd.grad(total, list(params.values()))
    return float(total.detach()), dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_train_step_accumulation_equals_whole_batch(model, tokenizer, temperature):
    policy, prompts, responses, masks, coefs, n_tokens = _setup_train(model, tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = _loss_fn(coefs, n_tokens)

    whole = pack(prompts, responses, max_tokens=10**6, loss_masks=masks)
    assert len(whole) == 1
    micro = pack(prompts, responses, max_tokens=50, loss_masks=masks, row_tokens=25)
    assert len(micro) == 2

    m_whole = policy.train_step(whole, loss_fn, temperature=temperature)
    g_whole = {k: p.grad.clone() for k, p in model.named_parameters()}
    m_micro = policy.train_step(micro, loss_fn, temperature=temperature)
    g_micro = {k: p.grad.clone() for k, p in model.named_parameters()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} moved at lr 0"

    ref_loss, ref = _reference_grads(model, prompts, responses, masks, coefs, n_tokens,
                                     temperature)
    ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())))
    assert ref_norm > 1e-3
    for k in ref:
        torch.testing.assert_close(g_micro[k], g_whole[k], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(g_micro[k], ref[k], atol=1e-6, rtol=1e-4)
    for m in (m_whole, m_micro):
        assert m["loss/pg"] == pytest.approx(ref_loss, abs=1e-6)  # loss terms add up
        assert m["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    # statistics average over micro-batches (here: each micro-batch's mean target logprob)
    means = []
    for mb in micro:
        lps = [reference(model, prompts[i], responses[i], temperature)[0][
            torch.tensor(masks[i], dtype=torch.bool)] for i in mb.seq_ids]
        means.append(float(torch.cat(lps).mean()))
    assert m_micro["stat/mean_lp"] == pytest.approx(sum(means) / len(means), abs=1e-5)


def test_train_step_clips_to_grad_clip(model, tokenizer):
    policy, prompts, responses, masks, coefs, n_tokens = _setup_train(model, tokenizer,
                                                                     grad_clip=1e-3)
    micro = pack(prompts, responses, max_tokens=50, loss_masks=masks, row_tokens=25)
    metrics = policy.train_step(micro, _loss_fn(coefs, n_tokens))
    _, ref = _reference_grads(model, prompts, responses, masks, coefs, n_tokens, 1.0)
    ref_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in ref.values())))
    got_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)  # reported before clip
    assert got_norm == pytest.approx(1e-3, rel=1e-3)


def test_train_step_moves_weights_against_the_gradient(model, tokenizer):
    """With a positive lr the first AdamW step moves each weight by about lr against the
    sign of its gradient (fresh moments: m/sqrt(v) = sign(g))."""
    policy, prompts, responses, masks, coefs, n_tokens = _setup_train(model, tokenizer)
    batches = pack(prompts, responses, max_tokens=40, loss_masks=masks, row_tokens=20)
    _, ref = _reference_grads(model, prompts, responses, masks, coefs, n_tokens, 1.0)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    lr = 1e-3
    policy.reset_optimizer(lr=lr)
    policy.train_step(batches, _loss_fn(coefs, n_tokens))
    for k, p in model.named_parameters():
        g = ref[k]
        big = g.abs() > 1e-6  # where the sign of g is unambiguous
        step = (p.detach() - before[k])[big]
        torch.testing.assert_close(step, -lr * g[big].sign(), atol=lr * 0.02, rtol=0)


def test_train_step_entropy_is_the_mean_over_target_tokens(model, tokenizer):
    """Micro-batches of different sizes (and an empty one) weigh by their target tokens."""
    prompts, responses = make_sequences(len(tokenizer))
    batches = pack(prompts, responses, max_tokens=40, row_tokens=20)
    (empty,) = pack([[5, 6]], [[7]], max_tokens=100, loss_masks=[[False]])
    assert len({b.target_index.numel() for b in batches}) > 1
    policy = HFPolicy(model, BackendConfig(logits_chunk=5), AlgoConfig(lr=0.0))
    expected = torch.cat([policy.logprobs(b)[1] for b in batches]).mean()
    metrics = policy.train_step([*batches, empty], lambda lp, mb: (-lp.sum(), {}))
    assert metrics["entropy"] == pytest.approx(float(expected), abs=1e-5)


def grouped_sequences(vocab: int, seed: int = 5):
    """Groups of samples with one prompt each: long prompts (shared), one group whose
    responses are longer than its prompt (not shared), a group of one, masks with holes."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(FIRST_REAL, vocab) for _ in range(n)]

    prompts, responses = [], []
    for prompt_len, n, resp_lens in ((9, 4, (1, 6)), (12, 3, (0, 5)), (3, 3, (6, 9)),
                                     (7, 1, (2, 4)), (5, 14, (5, 5))):
        p = toks(prompt_len)
        for _ in range(n):
            prompts.append(p)
            responses.append(toks(rng.randint(*resp_lens)))
    masks = [[rng.random() < 0.8 for _ in r] for r in responses]
    return prompts, responses, masks


def test_shared_prompts_layout_and_logprobs(model, tokenizer):
    prompts, responses, masks = grouped_sequences(len(tokenizer))
    plain = pack(prompts, responses, max_tokens=10**6, loss_masks=masks)
    shared = pack(prompts, responses, max_tokens=10**6, loss_masks=masks, share_prompts=True)
    assert shared[0].segment_prefix is not None and plain[0].segment_prefix is None
    assert shared[0].num_tokens < plain[0].num_tokens  # the prompts counted once per unit
    # the 14-sample group needs two units (at most 4 x the longest sequence, 17 tokens,
    # each); the group with longer responses than its prompt and the single sample are
    # not shared: 1 + 1 + 3 + 1 + 2 units, each starting at position 0
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    b = shared[0]
    assert longest == 17 and b.input_ids.shape[1] <= 4 * longest
    assert int(((b.position_ids == 0) & (b.input_ids != PAD)).sum()) == 8
    policy = HFPolicy(model, BackendConfig(logits_chunk=7), AlgoConfig())
    for batches in (shared, pack(prompts, responses, max_tokens=60, loss_masks=masks,
                                 share_prompts=True)):
        outputs = [policy.logprobs(b, temperature=0.8) for b in batches]
        got = per_sequence(batches, outputs, len(prompts))
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            lp, ent = reference(model, p, r, 0.8)
            keep = torch.tensor(masks[i], dtype=torch.bool)
            torch.testing.assert_close(got[i][0], lp[keep], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[i][1], ent[keep], atol=1e-5, rtol=0)


def test_shared_prompts_gradients_equal_per_sequence(model, tokenizer):
    prompts, responses, masks = grouped_sequences(len(tokenizer), seed=6)
    rng = random.Random(7)
    coefs = [rng.uniform(-1, 1) for _ in prompts]
    n_tokens = sum(map(sum, masks))
    policy = HFPolicy(model, BackendConfig(logits_chunk=6),
                      AlgoConfig(lr=0.0, grad_clip=1e9, weight_decay=0.0))
    batches = pack(prompts, responses, max_tokens=80, loss_masks=masks, share_prompts=True)
    assert len(batches) >= 2 and all(b.segment_prefix is not None for b in batches)
    policy.train_step(batches, _loss_fn(coefs, n_tokens))
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    _, ref = _reference_grads(model, prompts, responses, masks, coefs, n_tokens, 1.0)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4)
