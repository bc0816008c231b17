"""Hugging Face <-> Megatron-core weights for the Llama and Qwen2 families.

Both families are pre-norm decoders with RMSNorm, SwiGLU, RoPE (half-split layout in
both libraries, so no permutation), grouped-query attention, tied or untied embeddings;
Qwen2 adds a bias to q, k and v. Megatron's names (local layer spec), per layer i, and
how tensor parallelism (TP) splits them:

    embedding.word_embeddings.weight             [V', H]    rows (vocab) split
    decoder.layers.i.input_layernorm.weight      [H]        replicated
    decoder.layers.i.self_attention.linear_qkv.weight/.bias
                                                 [(q + 2 kv) d, H] per query group
                                                 [q heads of the group, k, v]; groups split
    decoder.layers.i.self_attention.linear_proj.weight  [H, q d]  columns split
    decoder.layers.i.pre_mlp_layernorm.weight    [H]        replicated
    decoder.layers.i.mlp.linear_fc1.weight       [2 F, H]   [gate; up], each half split
    decoder.layers.i.mlp.linear_fc2.weight       [H, F]     columns split
    decoder.final_layernorm.weight               [H]        replicated
    output_layer.weight                          [V', H]    rows split (untied, or the
                                                            last stage's copy when tied)

V' is the vocabulary padded to a multiple of TP (padded rows are zero and are masked
out of the softmax by the policy). Pipeline parallelism (PP) gives stage p the layers
[p L / PP, (p + 1) L / PP), numbered from 0 within the stage; the first stage holds the
embedding, the last the final norm and output layer. These are pure functions on
tensors: the policy does the collectives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED = ("llama", "qwen2")


@dataclass(frozen=True)
class ModelShape:
    """What the conversion needs to know about a model, read from its HF config."""

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int


def model_shape(hf_config) -> ModelShape:
    """ModelShape of a transformers Llama/Qwen2 config; a ValueError names what is not
    supported (rope scaling, another activation, biases Llama does not have, ...)."""
    arch = hf_config.model_type
    if arch not in SUPPORTED:
        raise ValueError(f"megatron backend: model type {arch!r} is not supported "
                         f"(choose from {SUPPORTED})")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"megatron backend: rope scaling {rope} is not supported")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"megatron backend: hidden_act {hf_config.hidden_act!r} is not "
                         f"supported (SwiGLU with silu only)")
    if arch == "llama" and (hf_config.attention_bias or hf_config.mlp_bias):
        raise ValueError("megatron backend: Llama attention_bias/mlp_bias are not supported")
    if arch == "qwen2" and getattr(hf_config, "use_sliding_window", False):
        raise ValueError("megatron backend: Qwen2 sliding-window attention is not supported")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    return ModelShape(
        arch=arch, vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers, num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads, head_dim=head_dim,
        ffn_hidden_size=hf_config.intermediate_size, norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=float(theta), tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        qkv_bias=arch == "qwen2", max_position_embeddings=hf_config.max_position_embeddings)


def check_parallel(shape: ModelShape, tp: int, pp: int) -> None:
    """The splits the model allows; a ValueError names the size that does not divide."""
    for what, n in (("attention heads", shape.num_heads), ("key/value heads",
                                                           shape.num_kv_heads),
                    ("intermediate size", shape.ffn_hidden_size)):
        if n % tp:
            raise ValueError(f"backend.tensor_parallel={tp} does not divide the model's "
                             f"{what} ({n})")
    if shape.num_layers % pp:
        raise ValueError(f"backend.pipeline_parallel={pp} does not divide the model's "
                         f"{shape.num_layers} layers")


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    return -(-vocab_size // tp) * tp


def stage_layers(shape: ModelShape, pp_rank: int, pp_size: int) -> range:
    """Global indices of the layers that pipeline stage `pp_rank` holds."""
    n = shape.num_layers // pp_size
    return range(pp_rank * n, (pp_rank + 1) * n)


def transformer_config(shape: ModelShape, *, tensor_parallel: int = 1,
                       pipeline_parallel: int = 1, context_parallel: int = 1,
                       sequence_parallel: bool = False, dtype: torch.dtype = torch.float32,
                       **overrides):
    """A megatron TransformerConfig for the model: RMSNorm, SwiGLU, no dropout, no biases
    except Qwen2's q/k/v, no fusions (kernels that need CUDA extensions)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    check_parallel(shape, tensor_parallel, pipeline_parallel)
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim, ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel, sequence_parallel=sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, **overrides)


# --- HF -> Megatron -------------------------------------------------------------------

def _qkv(shape: ModelShape, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """HF q, k, v ([heads * d, ...]) -> Megatron's per-group [q..., k, v] layout."""
    g, d = shape.num_kv_heads, shape.head_dim
    per = shape.num_heads // g
    rest = q.shape[1:]
    return torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest),
                      v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)


def _split_qkv(shape: ModelShape, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    g, d = shape.num_kv_heads, shape.head_dim
    per = shape.num_heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return (q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest))


def _pad_rows(w: Tensor, rows: int) -> Tensor:
    return torch.cat([w, w.new_zeros(rows - w.shape[0], *w.shape[1:])]) if rows > w.shape[0] else w


def hf_to_megatron_full(hf: Mapping[str, Tensor], shape: ModelShape, pp_rank: int = 0,
                        pp_size: int = 1, tp: int = 1) -> dict[str, Tensor]:
    """Megatron state dict of pipeline stage `pp_rank`, before the TP split (vocabulary
    padded for `tp`)."""
    out: dict[str, Tensor] = {}
    vocab = padded_vocab_size(shape.vocab_size, tp)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    embed = hf["model.embed_tokens.weight"]
    if first:
        out["embedding.word_embeddings.weight"] = _pad_rows(embed, vocab)
    for local, i in enumerate(stage_layers(shape, pp_rank, pp_size)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[m + "self_attention.linear_qkv.weight"] = _qkv(
            shape, *(hf[f"{h}self_attn.{p}_proj.weight"] for p in "qkv"))
        if shape.qkv_bias:
            out[m + "self_attention.linear_qkv.bias"] = _qkv(
                shape, *(hf[f"{h}self_attn.{p}_proj.bias"] for p in "qkv"))
        out[m + "self_attention.linear_proj.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"],
                                                      hf[h + "mlp.up_proj.weight"]])
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        if not shape.tie_word_embeddings:
            out["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], vocab)
        elif not first:  # tied, and the last stage is another process: its copy
            out["output_layer.weight"] = _pad_rows(embed, vocab)
    return out


def _tp_dim(name: str) -> int | None:
    """The dimension TP splits (None: replicated)."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
                      "linear_qkv.bias", "linear_fc1.weight")):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


def tp_shard(full: Mapping[str, Tensor], shape: ModelShape, tp_rank: int, tp_size: int
             ) -> dict[str, Tensor]:
    """This TP rank's part of a stage's full Megatron state dict."""
    out = {}
    for name, t in full.items():
        dim = _tp_dim(name)
        if dim is None or tp_size == 1:
            out[name] = t
        elif name.endswith("linear_fc1.weight"):  # gate and up split separately
            gate, up = t.chunk(2)
            out[name] = torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
        else:
            out[name] = t.chunk(tp_size, dim=dim)[tp_rank]
    return {k: v.clone() for k, v in out.items()}


def tp_merge(shards: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of tp_shard: one stage's full Megatron state dict from all TP ranks' parts."""
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        dim = _tp_dim(name)
        if dim is None or len(parts) == 1:
            out[name] = parts[0]
        elif name.endswith("linear_fc1.weight"):
            halves = [p.chunk(2) for p in parts]
            out[name] = torch.cat([torch.cat([g for g, _ in halves]),
                                   torch.cat([u for _, u in halves])])
        else:
            out[name] = torch.cat(parts, dim=dim)
    return out


def hf_to_megatron(hf: Mapping[str, Tensor], shape: ModelShape, tp_rank: int = 0,
                   tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1) -> dict[str, Tensor]:
    """The Megatron state dict of one (TP rank, PP stage)."""
    check_parallel(shape, tp_size, pp_size)
    return tp_shard(hf_to_megatron_full(hf, shape, pp_rank, pp_size, tp_size), shape,
                    tp_rank, tp_size)


# --- Megatron -> HF -------------------------------------------------------------------

def megatron_to_hf(full: Mapping[str, Tensor], shape: ModelShape, pp_rank: int = 0,
                   pp_size: int = 1) -> dict[str, Tensor]:
    """HF tensors held by stage `pp_rank`, from its TP-merged Megatron state dict, or any
    part of it made of whole layers (an export bucket). The tied output layer's last-stage
    copy is not exported (the embedding is the weight)."""
    out: dict[str, Tensor] = {}
    v = shape.vocab_size
    if "embedding.word_embeddings.weight" in full:
        out["model.embed_tokens.weight"] = full["embedding.word_embeddings.weight"][:v]
    for local, i in enumerate(stage_layers(shape, pp_rank, pp_size)):
        h, m = f"model.layers.{i}.", f"decoder.layers.{local}."
        if m + "input_layernorm.weight" not in full:
            continue
        out[h + "input_layernorm.weight"] = full[m + "input_layernorm.weight"]
        for p, t in zip("qkv", _split_qkv(shape, full[m + "self_attention.linear_qkv.weight"]),
                        strict=True):
            out[f"{h}self_attn.{p}_proj.weight"] = t
        if shape.qkv_bias:
            for p, t in zip("qkv", _split_qkv(shape, full[m + "self_attention.linear_qkv.bias"]),
                            strict=True):
                out[f"{h}self_attn.{p}_proj.bias"] = t
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        out[h + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
    if "decoder.final_layernorm.weight" in full:
        out["model.norm.weight"] = full["decoder.final_layernorm.weight"]
        if not shape.tie_word_embeddings:
            out["lm_head.weight"] = full["output_layer.weight"][:v]
    return {k: t.contiguous() for k, t in out.items()}


def hf_shapes(shape: ModelShape, pp_rank: int = 0, pp_size: int = 1) -> dict[str, tuple]:
    """Names and shapes of the HF tensors stage `pp_rank` exports, in export order (what
    the other stages allocate to receive them)."""
    h, d = shape.hidden_size, shape.head_dim
    out: dict[str, tuple] = {}
    if pp_rank == 0:
        out["model.embed_tokens.weight"] = (shape.vocab_size, h)
    for i in stage_layers(shape, pp_rank, pp_size):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (shape.num_heads * d, h)
        out[p + "self_attn.k_proj.weight"] = (shape.num_kv_heads * d, h)
        out[p + "self_attn.v_proj.weight"] = (shape.num_kv_heads * d, h)
        if shape.qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (shape.num_heads * d,)
            out[p + "self_attn.k_proj.bias"] = (shape.num_kv_heads * d,)
            out[p + "self_attn.v_proj.bias"] = (shape.num_kv_heads * d,)
        out[p + "self_attn.o_proj.weight"] = (h, shape.num_heads * d)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "mlp.gate_proj.weight"] = (shape.ffn_hidden_size, h)
        out[p + "mlp.up_proj.weight"] = (shape.ffn_hidden_size, h)
        out[p + "mlp.down_proj.weight"] = (h, shape.ffn_hidden_size)
    if pp_rank == pp_size - 1:
        out["model.norm.weight"] = (h,)
        if not shape.tie_word_embeddings:
            out["lm_head.weight"] = (shape.vocab_size, h)
    return out
