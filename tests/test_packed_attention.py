"""Attention on packed rows: per segment (kimi_rl/attention.py, `packed_attention`), equal to
each sequence run alone, values and gradients, and never an [L, L] tensor."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kimi_rl import attention
from kimi_rl.attention import Segments, packed_attention
from kimi_rl.config import AlgoConfig, BackendConfig
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.packing import dense_mask, pack

FIRST_REAL = 4


def random_groups(vocab: int, rng: random.Random, n_groups: int):
    """Groups sharing a prompt: some with prompts longer than their responses (shared when
    share_prompts), some shorter, some of one sample, empty responses among them."""
    prompts, responses = [], []
    for _ in range(n_groups):
        p = [rng.randrange(FIRST_REAL, vocab) for _ in range(rng.randint(1, 24))]
        longest = rng.choice([len(p), 2 * len(p) + 4])
        for _ in range(rng.choice([1, 2, 3, 5])):
            prompts.append(p)
            responses.append([rng.randrange(FIRST_REAL, vocab)
                              for _ in range(rng.randint(0, longest))])
    return prompts, responses


def segments_per_row(batch):
    """Per row: the number of its non-padding segments."""
    rows, length = batch.input_ids.shape
    cu = batch.cu_seqlens.tolist()
    counts = [0] * rows
    for a, b in zip(cu, cu[1:], strict=False):
        if b > a and batch.input_ids.view(-1)[a] != 0:
            counts[a // length] += 1
    return counts


def reference(model, prompts, responses, coefs, autocast):
    """Per sequence alone: the response tokens' logprobs and the gradient of
    -sum(coef x logprob)."""
    params = dict(model.named_parameters())
    lps, total = [], 0.0
    for p, r, c in zip(prompts, responses, coefs, strict=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        logp = torch.log_softmax(logits, -1)[len(p) - 1:len(p) - 1 + len(r)]
        lp = logp.gather(-1, torch.tensor(r, dtype=torch.long)[:, None])[:, 0]
        lps.append(lp.detach())
        total = total - c * lp.sum()
    grads = torch.autograd.grad(total, list(params.values()))
    return lps, dict(zip(params, grads, strict=True))


@pytest.mark.parametrize("path", ["segments", "dense"])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_values_and_gradients_equal_each_sequence_alone(make_model, tokenizer, share,
                                                                autocast, seed, path,
                                                                monkeypatch):
    """Both ways a packed row is attended (attention.by_segments): per segment, and (short
    rows on CPU) one call with the row's mask."""
    monkeypatch.setattr(attention, "DENSE_ROW_MAX", 0 if path == "segments" else 1 << 20)
    rng = random.Random(seed)
    model = make_model(seed=seed, std=0.2, num_heads=4, num_kv_heads=2)  # GQA
    prompts, responses = random_groups(len(tokenizer), rng, 7)
    coefs = [rng.uniform(-1, 1) for _ in prompts]
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    batches = pack(prompts, responses, max_tokens=4 * longest, row_tokens=2 * longest,
                   share_prompts=share)
    counts = [n for b in batches for n in segments_per_row(b)]
    assert max(counts) >= 3 and len(batches) >= 2
    assert (batches[0].segment_prefix is not None) == share
    policy = HFPolicy(model, BackendConfig(logits_chunk=16,
                                           autocast="bfloat16" if autocast else None),
                      AlgoConfig(lr=0.0, grad_clip=1e9, weight_decay=0.0))
    got: dict[int, list[float]] = {i: [] for i in range(len(prompts))}

    def loss_fn(lp, mb):
        for k in range(len(lp)):
            got[mb.seq_ids[int(mb.seq_index[k])]].append(float(lp[k].detach()))
        c = torch.tensor([coefs[i] for i in mb.seq_ids], dtype=lp.dtype)[mb.seq_index]
        return -(c * lp).sum(), {}

    policy.train_step(batches, loss_fn)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    want_lp, want_grads = reference(model, prompts, responses, coefs, autocast)
    tol = dict(atol=3e-2, rtol=0) if autocast else dict(atol=1e-5, rtol=0)
    for i, lp in enumerate(want_lp):
        torch.testing.assert_close(torch.tensor(got[i]), lp, **tol)
    for k, g in want_grads.items():
        if autocast:  # bfloat16 rounding: relative to the gradient's size
            assert (grads[k] - g).norm() <= 3e-2 * g.norm() + 1e-6, k
        else:
            # float32 summation order: relative to the largest entry (sums over many
            # tokens reach ~30 here)
            torch.testing.assert_close(grads[k], g, atol=1e-6 * max(1.0, g.abs().max()),
                                       rtol=1e-4)


def make_segments(rng: random.Random, rows: int, length: int, share: bool) -> Segments:
    cu, prefix = [0], []
    for r in range(rows):
        base, at = r * length, 0
        n = rng.randint(1, 8)
        for end in sorted(rng.sample(range(1, length), n - 1)) + [length]:
            if share and end - at >= 6 and rng.random() < 0.6:  # a prompt and its responses
                parts = sorted(rng.sample(range(at + 1, end), 3))
                prompt = len(prefix)
                cu.append(base + parts[0])
                prefix.append(-1)
                for e in parts[1:] + [end]:
                    cu.append(base + e)
                    prefix.append(prompt)
            else:
                cu.append(base + end)
                prefix.append(-1)
            at = end
    return Segments(torch.tensor(cu, dtype=torch.int32),
                    torch.tensor(prefix) if share else None)


def dense_reference(q, k, v, seg: Segments, scale):
    """The same attention with the whole [R, 1, L, L] mask, in float64."""
    R, H, L, D = q.shape
    cu = seg.cu_seqlens.long()
    ids = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1]).view(R, L)
    pre = (seg.prefix if seg.prefix is not None
           else torch.full((len(cu) - 1,), -1))[ids]
    mask = ((ids[:, :, None] == ids[:, None, :]) | (pre[:, :, None] == ids[:, None, :]))
    mask = (mask & torch.ones(L, L, dtype=torch.bool).tril())[:, None]
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                         scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("mode", ["float32", "float32-chunked", "bf16-buckets",
                                  "bf16-kernel"])
def test_packed_attention_equals_the_dense_mask(monkeypatch, share, mode):
    """Values and gradients of q, k, v against the block mask, on random segmentations:
    torch's kernel per segment (float32; with prefix masks in small query chunks), and
    under bfloat16 autocast the batched matmul attention or, above its limit, the kernel."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    R, H, KV, L, D = 3, 4, 2, 96, 8
    if mode == "float32-chunked":
        monkeypatch.setattr(attention, "PREFIX_MASK_MAX", 50)
    if mode == "bf16-kernel":
        monkeypatch.setattr(attention, "MATMUL_SCORES_MAX", 0)
    for _ in range(3):
        seg = make_segments(rng, R, L, share)
        q = torch.randn(R, H, L, D, generator=gen).requires_grad_()
        k = torch.randn(R, KV, L, D, generator=gen).requires_grad_()
        v = torch.randn(R, KV, L, D, generator=gen).requires_grad_()
        w = torch.randn(R, L, H, D, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            out = packed_attention(q, k, v, seg, 0.3)
        assert out.shape == (R, L, H, D)
        grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
        want = dense_reference(q, k, v, seg, 0.3)
        want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
        if mode.startswith("bf16"):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out.double(), want, atol=5e-2, rtol=5e-2)
            for g, wg in zip(grads, want_grads, strict=True):
                assert (g.double() - wg.double()).norm() <= 3e-2 * wg.double().norm()
        else:
            torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
            for g, wg in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g.double(), wg.double(), atol=1e-5, rtol=1e-5)
    if mode == "bf16-buckets":  # the short segments went to few batched calls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            buckets, single = seg.plan(q)
        assert not single and len(buckets) < len(seg.spans)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_train_step_on_a_long_packed_row_builds_no_square_tensor(make_model, tokenizer,
                                                                     share, autocast):
    """A 4K-token row of several sequences (with share, two groups of three responses
    after a long prompt): no tensor of the forward and backward passes has two dimensions
    of the row's length, and in float32 none is larger than an eighth of [L, L]."""
    rng = random.Random(0)
    L = 4096

    def toks(n):
        return [rng.randrange(FIRST_REAL, len(tokenizer)) for _ in range(n)]

    if share:
        p1, p2 = toks(900), toks(700)
        prompts = [p1] * 3 + [p2] * 3
        responses = [toks(n) for n in (300, 250, 400, 350, 200, 300)]
    else:
        prompts = [toks(n) for n in (40, 100, 20, 60, 10)]
        responses = [toks(n) for n in (1200, 800, 900, 500, 300)]
    (batch,) = pack(prompts, responses, max_tokens=L, row_tokens=L, share_prompts=share)
    assert batch.input_ids.shape == (1, L) and len(batch.seq_ids) == len(prompts)
    policy = HFPolicy(make_model(seed=0), BackendConfig(
        logits_chunk=512, autocast="bfloat16" if autocast else None), AlgoConfig(lr=0.0))
    with _Shapes() as mode:
        policy.train_step([batch], lambda lp, mb: (-lp.sum(), {}))
    square = [s for s in mode.shapes if sum(d >= L for d in s) >= 2]
    assert not square, square[:3]
    if not autocast:
        biggest = max(mode.shapes, key=lambda s: torch.Size(s).numel())
        assert torch.Size(biggest).numel() <= L * L // 8, biggest


def test_eager_attention_takes_the_segments_as_a_dense_mask(make_model, tokenizer):
    """Implementations without segments (eager) get dense_mask: the same logprobs."""
    rng = random.Random(4)
    prompts, responses = random_groups(len(tokenizer), rng, 5)
    batches = pack(prompts, responses, max_tokens=200, row_tokens=60, share_prompts=True)
    mask = dense_mask(batches[0])
    R, L = batches[0].input_ids.shape
    assert mask.shape == (R, 1, L, L) and mask.dtype == torch.bool
    model = make_model(seed=2, std=0.2)
    ours = HFPolicy(model, BackendConfig(), AlgoConfig())
    want = [ours.logprobs(b)[0] for b in batches]
    eager = HFPolicy(model, BackendConfig(attn_implementation="eager"), AlgoConfig())
    for b, w in zip(batches, want, strict=True):
        torch.testing.assert_close(eager.logprobs(b)[0], w, atol=1e-5, rtol=0)
