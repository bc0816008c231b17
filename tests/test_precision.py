"""Lower precision: the hf backend under bfloat16 autocast and a bfloat16 torch engine,
against the float32 computation of the same model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from test_torch_engine import prompts, sequence_logprobs

from kimi_rl.attention import matmul_attention
from kimi_rl.config import AlgoConfig, BackendConfig, check_config, register_configs
from kimi_rl.policy.hf import HFPolicy
from kimi_rl.policy.packing import pack
from kimi_rl.rollout.engine import Request, SamplingParams
from kimi_rl.rollout.torch_engine import TorchEngine


def _padded_mask(B: int, Lq: int, L: int) -> torch.Tensor:
    """[B, 1, Lq, L] bool: causal (the queries are the last Lq positions), row b with b
    left pads."""
    mask = torch.ones(Lq, L, dtype=torch.bool).tril(L - Lq)[None, None].repeat(B, 1, 1, 1)
    for b in range(B):
        mask[b, ..., :b] = False
    return mask


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("queries", [1, 7])
def test_matmul_attention_equals_sdpa(heads, kv_heads, queries):
    """Decode steps (one query) and several queries, keys read through a view of a longer
    buffer, padding and causal masks, grouped-query heads: values and gradients equal
    torch's kernel in float64."""
    gen = torch.Generator().manual_seed(0)
    B, L, D = 5, 11, 8
    q = torch.randn(B, heads, queries, D, generator=gen, dtype=torch.float64)
    buf_k = torch.randn(B, kv_heads, L + 4, D, generator=gen, dtype=torch.float64)
    buf_v = torch.randn(B, kv_heads, L + 4, D, generator=gen, dtype=torch.float64)
    for t in (q, buf_k, buf_v):
        t.requires_grad_()
    k, v = buf_k[:, :, :L], buf_v[:, :, :L]
    mask = _padded_mask(B, queries, L)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                         enable_gqa=True).transpose(1, 2)
    got = matmul_attention(q, k, v, mask, 0.3, torch.float64)
    assert got.shape == (B, queries, heads, D) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(ref, (q, buf_k, buf_v), grad)
    for g, w in zip(torch.autograd.grad(got, (q, buf_k, buf_v), grad), want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    # no mask: every key; causal: torch's is_causal
    with torch.no_grad():
        torch.testing.assert_close(
            matmul_attention(q, k, v, None, None, torch.float64),
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2))
        if queries > 1:
            torch.testing.assert_close(
                matmul_attention(q, k[:, :, :queries], v[:, :, :queries], None, None,
                                 torch.float64, causal=True),
                F.scaled_dot_product_attention(q, k[:, :, :queries], v[:, :, :queries],
                                               is_causal=True, enable_gqa=True
                                               ).transpose(1, 2))


def test_matmul_attention_in_bfloat16():
    """In bfloat16: within bfloat16 rounding of the float64 result (scores and output
    rounded); a query that sees no key gives a finite row."""
    gen = torch.Generator().manual_seed(1)
    B, H, KV, Lq, L, D = 4, 6, 2, 9, 9, 16
    q, k, v = (torch.randn(B, h, n, D, generator=gen)
               for h, n in ((H, Lq), (KV, L), (KV, L)))
    mask = _padded_mask(B, Lq, L)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                         enable_gqa=True).transpose(1, 2)
    got = matmul_attention(q, k, v.bfloat16(), mask, None, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    live = mask[:, 0].any(-1)[:, :, None, None].expand_as(ref)  # rows with a visible key
    err = (got.double() - ref)[live].abs()
    assert err.max() < 0.05 and err.mean() < 0.01, (err.max(), err.mean())
    assert torch.isfinite(got).all() and not live.all()  # row 3's first 3 queries see none


def test_bfloat16_engine_samples_like_the_float32_model(make_model, tokenizer):
    """A bfloat16 engine (float32 KV cache) gives the tokens' logprobs of the float32 model
    within bfloat16 rounding, through prefill, decode and rows of different lengths; after
    a weight update it holds the policy's weights rounded to bfloat16."""
    model = make_model(seed=1, std=0.1, num_heads=4, num_kv_heads=2, hidden_size=64)
    engine = TorchEngine(copy.deepcopy(model).to(torch.bfloat16), -1,
                         tokenizer.pad_token_id, seed=3)
    ps = prompts(len(tokenizer))
    segs = engine.generate([Request(p) for p in ps], 20, SamplingParams(temperature=0.8))
    assert all(len(s.tokens) == 20 for s in segs)
    assert engine.model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16

    got = torch.tensor([lp for s in segs for lp in s.logprobs], dtype=torch.float64)
    want = torch.cat([sequence_logprobs(model, p, s.tokens, 0.8) for p, s in zip(ps, segs,
                                                                            strict=True)])
    diff = (got - want).abs()
    # measured: max 0.034, mean 0.0085 (against the bfloat16-rounded weights in float64:
    # 0.027, 0.0069, so most of it is the weights' rounding)
    assert diff.max() < 0.1 and diff.mean() < 0.025, (diff.max(), diff.mean())
    assert diff.max() > 0  # it did compute in bfloat16

    with torch.no_grad():  # move the policy; the engine follows, rounded to bfloat16
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    engine.update_weights(HFPolicy(model, BackendConfig(), AlgoConfig()).export_weights())
    for (name, mine), theirs in zip(engine.model.state_dict().items(),
                                    model.state_dict().values(), strict=True):
        assert mine.dtype == torch.bfloat16, name
        assert torch.equal(mine, theirs.bfloat16()), name


def _policy(model, autocast):
    return HFPolicy(model, BackendConfig(logits_chunk=16, autocast=autocast),
                    AlgoConfig(lr=1e-3, grad_clip=1e9))


def test_autocast_train_step_follows_float32(make_model, tokenizer):
    """Under bfloat16 autocast: logprobs and gradients close to float32's, while the
    parameters, gradients and Adam moments stay float32 and the step moves the same way."""
    model = make_model(seed=2, std=0.1, num_heads=4, num_kv_heads=2, hidden_size=64)
    ps = prompts(len(tokenizer))
    responses = prompts(len(tokenizer), lengths=[12] * len(ps), seed=5)
    batches = pack(ps, responses, max_tokens=40)  # several micro-batches
    assert len(batches) > 1
    weights = torch.linspace(-1, 1, sum(len(r) for r in responses))

    def loss_fn(lp, b):
        w = weights[:len(lp)]
        return (w * lp).sum() / len(weights), {}

    steps = {}
    for ac in (None, "bfloat16"):
        m = copy.deepcopy(model)
        policy = _policy(m, ac)
        rotary = []  # under autocast, queries and keys rotate in bfloat16
        m.model.rotary_emb.register_forward_hook(lambda mod, a, out, r=rotary: r.append(out))
        lp = torch.cat([policy.logprobs(b)[0] for b in batches])
        want = torch.bfloat16 if ac else torch.float32
        assert rotary and all(t.dtype == want for out in rotary for t in out)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        policy.train_step(batches, loss_fn)
        grads = torch.cat([p.grad.flatten() for p in m.parameters()])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in m.parameters())
        assert all(s.dtype == torch.float32 for st in policy.optimizer.state.values()
                   for s in st.values() if s.is_floating_point() and s.dim() > 0)
        delta = torch.cat([(p.detach() - before[n]).flatten() for n, p in m.named_parameters()])
        steps[ac] = lp, grads, delta
    lp32, g32, d32 = steps[None]
    lp16, g16, d16 = steps["bfloat16"]
    # measured: 0.016, gradient cosine 0.9999, step cosine 0.992
    assert 0 < (lp16 - lp32).abs().max() < 0.05
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99
    assert not torch.equal(g16, g32)
    # Adam's first step is lr * sign(g) where |g| >> eps: the same signs almost everywhere
    assert F.cosine_similarity(d16, d32, dim=0) > 0.95


def _compose(overrides):
    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("overrides,key", [
    (["rollout.dtype=bf16"], "rollout.dtype"),
    (["backend.autocast=float32"], "backend.autocast"),
    (["backend=megatron", "backend.autocast=bfloat16"], "backend.autocast"),
])
def test_bad_precision_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        check_config(_compose(overrides))


def test_build_engine_casts_only_the_engine_copy(tokenizer):
    from kimi_rl.build import build_engine, build_policy
    from kimi_rl.data import load_task

    cfg = _compose(["rollout.dtype=bfloat16", "backend.autocast=bfloat16",
                    "model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=2",
                    "model.num_layers=1", "model.intermediate_size=64"])
    check_config(cfg)
    policy, tok = build_policy(cfg, load_task(cfg.data))
    engine = build_engine(cfg, policy, tok)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.model.parameters()} == {torch.float32}
    seg = engine.generate([Request([5, 6, 7])], 4, SamplingParams(greedy=True))[0]
    assert len(seg.tokens) >= 1


def test_attention_under_autocast(monkeypatch):
    """On CPU under autocast: a small score matrix is matmul_attention in bfloat16; above
    MATMUL_SCORES_MAX, torch's kernel in float32 (values rounded once to bfloat16). Both
    return bfloat16 and pass gradients to their inputs."""
    from kimi_rl import attention

    gen = torch.Generator().manual_seed(0)
    # queries and keys come out of the rotary embedding in float32, values in bfloat16
    q = torch.randn(3, 4, 6, 8, generator=gen).requires_grad_()
    k = torch.randn(3, 2, 6, 8, generator=gen).requires_grad_()
    v = torch.randn(3, 2, 6, 8, generator=gen).bfloat16().requires_grad_()
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(3, 1, 6, 6)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.sdpa(module, q, k, v, mask, scaling=0.5)
        causal, _ = attention.sdpa(module, q, k, v, None, scaling=0.5)  # no mask: causal
    want = matmul_attention(q, k, v, mask, 0.5, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 6, 4, 8)
    assert torch.equal(out, want) and torch.equal(causal, want)
    out.float().sum().backward()
    assert v.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0
    monkeypatch.setattr(attention, "MATMUL_SCORES_MAX", 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.sdpa(module, q, k, v, mask, scaling=0.5)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          scale=0.5, enable_gqa=True).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what torch's kernel would do here
        native = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5,
                                                enable_gqa=True).transpose(1, 2)
    assert native.dtype == torch.bfloat16 and not torch.equal(native, out)


def test_engine_dtypes_keep_their_cache(make_model, tokenizer):
    """float64 and float32 engines keep their own dtype and decode the same greedy tokens;
    a bfloat16 engine attends over its whole bfloat16 buffers (the written-out Llama
    decode step; with the model's forward, a float32 cache: tests/test_llama_decode.py)."""
    model = make_model(seed=1, std=0.1, num_heads=4, num_kv_heads=2, hidden_size=64)
    ps = prompts(len(tokenizer))
    out = {}
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        engine = TorchEngine(copy.deepcopy(model).to(dt), -1, tokenizer.pad_token_id)
        assert engine.kv_dtype is None and engine.whole_kv == (dt == torch.bfloat16)
        out[dt] = [s.tokens for s in engine.generate([Request(p) for p in ps], 6,
                                                     SamplingParams(greedy=True))]
    assert out[torch.float64] == out[torch.float32]
