"""The written-out Llama decode step against the model's own forward on the same cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_torch_engine import engine_for, prompts
from transformers import LlamaConfig, LlamaForCausalLM

from kimi_rl.attention import use_sdpa
from kimi_rl.rollout.engine import Request, SamplingParams
from kimi_rl.rollout.llama_decode import LlamaDecoder, supports
from kimi_rl.rollout.torch_engine import TorchEngine

# per dtype: the tolerance on logits and cache (equal bit for bit at these shapes on one
# thread; a fused projection may sum in another order elsewhere, and bfloat16 rounds it)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 0.05}


def decode_both(engine: TorchEngine, ctx: list[list[int]], steps: int):
    """Prefill `ctx`, then `steps` decode steps twice from copies of the same cache: through
    the model's forward and through the engine's decoder, feeding both the forward's argmax.
    Yields (forward logits, decoder logits, forward cache, decoder cache) per step."""
    with torch.no_grad():
        cache, logits, mask = engine._prefill(ctx, steps)
    ref_cache, pos = copy.deepcopy(cache), mask.sum(-1)
    for _ in range(steps):
        tok = logits.argmax(-1)
        mask = torch.cat([mask, torch.ones((len(ctx), 1), dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits = engine._logits(input_ids=tok[:, None], attention_mask=mask,
                                    position_ids=pos[:, None], past_key_values=ref_cache)
            got = engine._head(engine.decoder.hidden(tok, pos, mask, cache,
                                                     whole=engine.whole_kv))
        pos = pos + 1
        yield logits, got, ref_cache, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_steps_equal_the_models_forward(make_model, tokenizer, dtype, kv_heads):
    """Left-padded rows of different lengths, grouped-query attention (4 query heads on 2
    KV heads), float32 and bfloat16 engines: each step's logits and the cache it leaves.
    The bfloat16 engine attends over whole buffers that grow KV_CHUNK positions at a time
    (20 steps: past a growth)."""
    model = make_model(seed=1, std=0.2, num_heads=4, num_kv_heads=kv_heads).to(dtype)
    engine = engine_for(model, tokenizer)
    assert engine.decoder is not None and engine.whole_kv == (dtype == torch.bfloat16)
    ctx = prompts(len(tokenizer), seed=2)
    for ref, got, ref_cache, cache in decode_both(engine, ctx, 20):
        torch.testing.assert_close(got.float(), ref.float(), atol=TOLERANCE[dtype], rtol=0)
        for a, b in zip(ref_cache.layers, cache.layers, strict=True):
            assert a.keys.shape == b.keys.shape
            torch.testing.assert_close(b.keys, a.keys, atol=TOLERANCE[dtype], rtol=0)
            torch.testing.assert_close(b.values, a.values, atol=TOLERANCE[dtype], rtol=0)
    if dtype == torch.float32:  # and the engine generates what the model's forward does
        fallback = engine_for(model, tokenizer)
        fallback.decoder = None
        reqs = [Request(p) for p in ctx]
        params = SamplingParams(temperature=0.9, seed=5)
        a, b = engine.generate(reqs, 12, params), fallback.generate(reqs, 12, params)
        assert [s.tokens for s in a] == [s.tokens for s in b]
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs),
                                       atol=1e-5, rtol=0)


def llama(**kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    use_sdpa(model)
    return model


def test_rope_scaling_comes_from_the_models_rotary_module(tokenizer):
    model = llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})
    engine = TorchEngine(model, -1, tokenizer.pad_token_id)
    assert engine.decoder is not None
    for ref, got, _, _ in decode_both(engine, prompts(48, seed=3), 4):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_unsupported_models_use_the_models_forward(tokenizer):
    """Decode steps through the model's forward (the cache-free greedy tokens); in
    bfloat16 with a float32 cache."""
    model = llama(attention_bias=True)
    assert not supports(model)
    with pytest.raises(ValueError, match="unsupported"):
        LlamaDecoder(model)
    engine = TorchEngine(copy.deepcopy(model), -1, tokenizer.pad_token_id)
    assert engine.decoder is None and engine.kv_dtype is None and not engine.whole_kv
    ps = prompts(48, seed=7)
    segs = engine.generate([Request(p) for p in ps], 5, SamplingParams(greedy=True))
    for p, seg in zip(ps, segs, strict=True):
        ids = list(p)
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert seg.tokens == ids[len(p):]
    low = TorchEngine(copy.deepcopy(model).to(torch.bfloat16), -1, tokenizer.pad_token_id)
    assert low.decoder is None and low.kv_dtype == torch.float32 and not low.whole_kv
    segs = low.generate([Request(p) for p in ps], 5, SamplingParams(greedy=True))
    assert all(len(s.tokens) == 5 and all(math.isfinite(x) for x in s.logprobs) for s in segs)


def test_weights_fused_in_place_and_refused_when_replaced(make_model, tokenizer):
    """The fused projections are the model's parameters (same values, names and shapes; an
    in-place update is seen by both paths); a parameter given a new tensor is fused again."""
    model = make_model(seed=1, std=0.2)
    engine = engine_for(model, tokenizer)
    for name, t in model.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], t), name
    ctx = prompts(len(tokenizer), seed=4)
    next(iter(decode_both(engine, ctx, 1)))  # fuses
    attn = engine.model.model.layers[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight.mul_(-2.0)  # in place: into the fused buffer
    for ref, got, _, _ in decode_both(engine, ctx, 2):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    attn.k_proj.weight.data = torch.randn(attn.k_proj.weight.shape) * 0.3  # replaced
    for ref, got, _, _ in decode_both(engine, ctx, 2):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
