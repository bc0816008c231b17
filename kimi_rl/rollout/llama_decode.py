"""A decode step of a Llama-family transformers model, written out.

One new token per row against a KV cache: the same computation as the model's own forward
(`LlamaModel` with kimi-rl's attention), with less around it. At the small decode batches
of a CPU rollout, a step's time goes mostly to calling ~60 small operators through
transformers' modules, mask construction and cache bookkeeping, not to arithmetic; here

- q, k and v are one matmul, and so are gate and up: the model's projection weights are
  made views of one fused buffer per layer (`LlamaDecoder`), so the model's own forward
  (prefill) and every in-place weight update read and write the same memory;
- the rotary embedding is applied to queries and keys together, its sine and cosine
  computed once per step for every layer (by the model's own rotary module, so any rope
  scaling it implements applies);
- the attention is kimi-rl's (`kimi_rl/attention.py`), as in the model's forward; with
  `whole` (the torch engine's bfloat16 cache on CPU) it reads each layer's whole, contiguous
  cache buffers, the unfilled positions (zeros) masked, which adds exact zeros.

Values follow the model's forward operation by operation (dtypes, rounding points), so the
logits are the same as its forward up to the summation order of the fused matmuls.
Supported: `LlamaForCausalLM` with no projection biases, SiLU MLP and no tensor-parallel
slicing (the demo model, SmolLM2); `supports` says so and the torch engine falls back to
the model's forward otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from ..attention import matmul_attention, sdpa


def supports(model: PreTrainedModel) -> bool:
    cfg = model.config
    return (getattr(cfg, "model_type", None) == "llama"
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "pretraining_tp", 1) == 1
            and getattr(cfg, "hidden_act", None) == "silu")


def _fuse(mods) -> tuple[Tensor, tuple[int, ...]]:
    """Make the weights of `mods` (linear layers with the same input) consecutive row
    blocks of one new buffer; returns it and the weights' data pointers."""
    fused = torch.cat([m.weight.data for m in mods])
    at = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = fused[at:at + n]
        at += n
    return fused, tuple(m.weight.data_ptr() for m in mods)


class LlamaDecoder:
    """Decode steps of `model`. Each layer's q/k/v projection weights, and its gate/up
    ones, become row blocks (views) of one buffer: the model's own forward (prefill) and
    in-place weight updates then read and write the fused weights. Parameters keep their
    names, shapes and values; one replaced by a new tensor is fused again on the next step."""

    def __init__(self, model: PreTrainedModel):
        if not supports(model):
            raise ValueError(f"llama_decode: unsupported model {type(model).__name__}")
        self.model = model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self._fused: dict[tuple[int, str], tuple[Tensor, tuple[int, ...]]] = {}

    def _weight(self, i: int, name: str, mods) -> Tensor:
        fused = self._fused.get((i, name))
        if fused is None or tuple(m.weight.data_ptr() for m in mods) != fused[1]:
            fused = self._fused[(i, name)] = _fuse(mods)
        return fused[0]

    def hidden(self, tokens: Tensor, positions: Tensor, attention_mask: Tensor | None,
               cache, whole: bool = False) -> Tensor:
        """Final hidden states [B, hidden] of one new token per row: `tokens` and
        `positions` [B], `attention_mask` [B, L] (1 for the cached and new positions a row
        attends, None for all), `cache` a transformers cache whose layer i takes the new
        keys and values (`cache.layers[i].update`) and returns the rows' K and V so far.
        `whole`: attend over the cache layers' whole buffers instead (`layer.whole()`: K
        and V with zeros past the filled positions, which the mask then hides), in the
        cache's dtype (the torch engine's bfloat16 cache on CPU)."""
        base = self.model.model
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x = base.embed_tokens(tokens[:, None])  # [B, 1, hidden]
        B = x.shape[0]
        cos, sin = base.rotary_emb(x, positions[:, None])  # [B, 1, D] each, x's dtype
        cos, sin = cos[:, :, None], sin[:, :, None]  # against [B, 1, heads, D]
        half = D // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1)  # rotate_half's signs
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]
        whole_mask = None  # [B, 1, 1, capacity], for every layer (their buffers grow together)
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            qkv = F.linear(h, self._weight(i, "qkv", (attn.q_proj, attn.k_proj, attn.v_proj)))
            qk = qkv[..., :(H + KV) * D].view(B, 1, H + KV, D)
            # rotary: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]
            qk = qk * cos + qk.view(B, 1, H + KV, 2, half).flip(-2).view(B, 1, H + KV, D) * sin
            q = qk[:, :, :H].transpose(1, 2)  # [B, H, 1, D]
            k = qk[:, :, H:].transpose(1, 2)
            v = qkv[..., (H + KV) * D:].view(B, 1, KV, D).transpose(1, 2)
            keys, values = cache.layers[i].update(k, v)
            if whole:  # the same positions, read through the whole buffers
                keys, values, n = cache.layers[i].whole()
                if whole_mask is None or whole_mask.shape[-1] != keys.shape[2]:
                    whole_mask = torch.zeros((B, 1, 1, keys.shape[2]), dtype=torch.bool)
                    whole_mask[..., :n] = True if mask is None else mask
                out = matmul_attention(q, keys, values, whole_mask, attn.scaling, keys.dtype)
            else:
                out, _ = sdpa(attn, q, keys, values, mask, dropout=0.0, scaling=attn.scaling)
            x = x + attn.o_proj(out.reshape(B, 1, H * D))
            h = layer.post_attention_layernorm(x)
            gate_up = F.linear(h, self._weight(i, "gate_up", (mlp.gate_proj, mlp.up_proj)))
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + mlp.down_proj(F.silu(gate) * up)
        return base.norm(x)[:, 0]

