"""kimi-rl's attention for transformers models (`attn_implementation=SDPA`), used by the
hf policy backend and the torch rollout engine: transformers' sdpa attention with three
changes, each found by profiling on CPUs (figures on 2 AMD EPYC cores with AVX-512 BF16):

- grouped-query keys and values go to torch's kernel as they are (`enable_gqa`) when
  there is a mask: transformers copies them once per query head then, which cost a decode
  step of SmolLM2-135M (3 KV heads for 9) as much as its attention;
- in a low precision on CPU (a bfloat16/float16 model, or under autocast), attention is
  two batched matmuls (`matmul_attention`) wherever its score matrix is small: every
  decode step (torch's CPU kernel takes ~10x longer for one query in bfloat16 than in
  float32) and short sequences, forward and backward (training rows of 86 tokens, the
  demo model's shapes: 16 ms a layer against 26 ms for torch's float32 kernel and 45 ms
  for its bfloat16 one; SmolLM2-135M's shapes at 150 tokens: 15 ms against 31 ms). The
  scores are rounded to bfloat16 before the softmax, as in transformers' eager attention;
- otherwise, under autocast on CPU, attention runs in float32 with torch's kernel (its
  bfloat16 backward is slower), the projections around it in bfloat16.

Everything else is transformers' own function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA = "kimi_rl_sdpa"
LOW_PRECISION = (torch.bfloat16, torch.float16)  # dtypes whose CPU attention takes matmuls
# largest score matrix (batch x heads x queries x keys elements) computed by matmuls; above
# it torch's kernel, which never holds the whole matrix
MATMUL_SCORES_MAX = 1 << 24


def matmul_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                     scale: float | None, dtype: torch.dtype, causal: bool = False) -> Tensor:
    """softmax(q k^T x scale, masked) v for [B, H, Lq, D] queries and [B, KV, Lk, D] keys
    and values (H a multiple of KV: query head h reads KV head h // (H/KV)), as two batched
    matmuls in `dtype` (the softmax accumulates in float32). `mask`: bool [B or 1, 1, Lq,
    Lk] (broadcast over the batch), True where a query sees a key; `causal` (no mask): query i
    sees keys 0..i (torch's is_causal). A query that sees no key averages all values
    (finite, as in transformers' eager attention). Returns [B, Lq, H, D] in `dtype`."""
    B, H, Lq, D = query.shape
    kv, Lk = key.shape[1], key.shape[2]
    q = (query * (scale or D ** -0.5)).to(dtype).reshape(B, kv, H // kv * Lq, D)
    scores = torch.matmul(q, key.to(dtype).transpose(-1, -2)).view(B, kv, H // kv, Lq, Lk)
    if mask is None and causal and Lq > 1:
        mask = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=query.device).tril()
    if mask is not None:  # [B or 1, 1, 1, Lq, Lk] against the scores' [B, KV, H/KV, Lq, Lk]
        scores = scores.masked_fill(~mask[:, :, None], torch.finfo(dtype).min)
    # float32 out, then rounded: a bfloat16 softmax's values (to the last bit, nearly
    # always), which torch's CPU kernel for bfloat16 out computes ~1.5x slower
    probs = (torch.softmax(scores, -1, dtype=torch.float32).to(dtype) if dtype in LOW_PRECISION
             else torch.softmax(scores, -1)).view(B, kv, H // kv * Lq, Lk)
    out = torch.matmul(probs, value.to(dtype)).view(B, kv, H // kv, Lq, D)
    return out.permute(0, 3, 1, 2, 4).reshape(B, Lq, H, D)


def sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
         attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: [B, H, Lq, D] queries, [B, KV, Lk, D]
    keys and values; returns [B, Lq, H, D]."""
    cpu = query.device.type == "cpu"
    autocast = cpu and torch.is_autocast_enabled("cpu")
    B, H, Lq, _ = query.shape
    if (cpu and (autocast or query.dtype in LOW_PRECISION) and not kwargs.get("dropout")
            and (attention_mask is None or (attention_mask.dtype == torch.bool
                                            and attention_mask.shape[-3] == 1))
            and (Lq == 1 or B * H * Lq * key.shape[2] <= MATMUL_SCORES_MAX)
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None):
        # decode steps in the keys' dtype (a low-precision engine keeps a float32 cache:
        # torch_engine.py); under autocast its dtype; the output in the dtype that follows
        dtype = torch.get_autocast_dtype("cpu") if autocast else key.dtype
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        if causal and attention_mask is None and 1 < Lq < key.shape[2]:
            # as transformers' sdpa: the keys past the queries are an empty cache's
            key, value = key[:, :, :Lq], value[:, :, :Lq]
        with torch.autocast("cpu", enabled=False):
            out = matmul_attention(query, key, value, attention_mask, kwargs.get("scaling"),
                                   dtype, causal=causal)
        return out.to(dtype if autocast else query.dtype), None
    if autocast:
        # (queries and keys may arrive in float32 already: rotary embeddings upcast them)
        with torch.autocast("cpu", enabled=False):
            out, _ = sdpa(module, query.float(), key.float(), value.float(), attention_mask,
                          **kwargs)
        return out.to(torch.get_autocast_dtype("cpu")), None
    if (attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=kwargs.get("dropout", 0.0),
                                         scale=kwargs.get("scaling"), enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA, sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA, sdpa_mask)


def use_sdpa(model: torch.nn.Module) -> bool:
    """Switch a transformers model from "sdpa" to this module's attention; True if it now
    uses it (models with another attention implementation are left as they are)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "sdpa":
        model.set_attn_implementation(SDPA)
        return True
    return impl == SDPA
