"""kimi-rl's attention for transformers models (`attn_implementation=SDPA`), used by the
hf policy backend and the torch rollout engine: transformers' sdpa attention with three
changes, each found by profiling on CPUs (figures on 2 AMD EPYC cores with AVX-512 BF16):

- grouped-query keys and values go to torch's kernel as they are (`enable_gqa`) when
  there is a mask: transformers copies them once per query head then, which cost a decode
  step of SmolLM2-135M (3 KV heads for 9) as much as its attention;
- a decode step (one query per row) in a low precision on CPU is two batched matmuls
  (`decode_attention`): torch's CPU kernel takes ~10x longer for this shape in bfloat16
  than in float32;
- under autocast on CPU, attention runs in float32: the bfloat16 kernel's backward pass is
  2x slower than the float32 one at the demo model's shapes (and no faster at
  SmolLM2-135M's). The projections around it stay in bfloat16.

Everything else is transformers' own function."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA = "kimi_rl_sdpa"
LOW_PRECISION = (torch.bfloat16, torch.float16)  # dtypes whose CPU decode takes the matmuls


def decode_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                     scale: float | None) -> Tensor:
    """One query position per row ([B, H, 1, D] against [B, KV, L, D] keys and values,
    H a multiple of KV; `mask` [B, 1, 1, L] bool or None) as two batched matmuls in the
    keys' dtype, the softmax in float32; returns [B, 1, H, D] in the query's dtype."""
    B, H, _, D = query.shape
    kv = key.shape[1]
    q = query.reshape(B, kv, H // kv, D).to(key.dtype)  # head h reads kv head h // (H/KV)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scale or D ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, -1).to(value.dtype), value)  # [B, KV, H/KV, D]
    return out.reshape(B, 1, H, D).to(query.dtype)


def sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
         attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: [B, H, Lq, D] queries, [B, KV, Lk, D]
    keys and values; returns [B, Lq, H, D]."""
    cpu_low = query.device.type == "cpu" and query.dtype in LOW_PRECISION
    if cpu_low and query.shape[2] == 1 and (attention_mask is None
                                            or attention_mask.dtype == torch.bool):
        return decode_attention(query, key, value, attention_mask, kwargs.get("scaling")), None
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
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
