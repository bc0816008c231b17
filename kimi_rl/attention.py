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

Packed rows (`Segments`, the `packed` keyword of the attention call): the hf policy's
training rows hold several sequences end to end. Each segment of a row (a sequence, or
with shared prompts a prompt or one of its responses) attends causally to itself and,
for a response, to all of its prompt; `packed_attention` computes exactly that, per
segment, so memory is linear in the row length and the work is the sum of the segments'
causal attention (transformers' block-diagonal [rows, 1, L, L] mask is never built):
flash-attn's varlen kernel on GPUs when it is installed, else short low-precision
segments batched into matmul attention and the rest one by one through torch's causal
kernel. Which kernel a (batch, heads, queries, keys) shape takes is `use_matmul`'s rule,
the same for every caller.

Everything else is transformers' own function."""

from __future__ import annotations

from dataclasses import dataclass

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


# packed rows up to this length on CPU take one masked kernel call over the whole row (the
# [rows, 1, L, L] bool mask then holds at most 1M entries a row): at the demo's rows of
# ~100 tokens one call per segment took 1.7x as long per train step (Python overhead of
# many small calls). Longer rows, and rows on GPUs, go segment by segment.
DENSE_ROW_MAX = 1024


def by_segments(row_len: int, device: torch.device) -> bool:
    """The one rule for packed rows: per segment (no [L, L] tensor) or one masked call."""
    return device.type != "cpu" or row_len > DENSE_ROW_MAX


def use_matmul(query: Tensor, batch: int, heads: int, queries: int, keys: int) -> bool:
    """The one rule for matmul attention: on CPU in a low precision (the queries' dtype or
    autocast), for one query (a decode step) or a score matrix of at most
    MATMUL_SCORES_MAX elements (batch x heads x queries x keys); elsewhere torch's kernel."""
    if query.device.type != "cpu":
        return False
    if not (torch.is_autocast_enabled("cpu") or query.dtype in LOW_PRECISION):
        return False
    return queries == 1 or batch * heads * queries * keys <= MATMUL_SCORES_MAX


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
    if kwargs.get("packed") is not None:  # packed rows: the mask is a stand-in (Segments)
        if kwargs.get("dropout"):
            raise ValueError("packed attention: attention dropout is not supported")
        return packed_attention(query, key, value, kwargs["packed"], kwargs.get("scaling")), None
    cpu = query.device.type == "cpu"
    autocast = cpu and torch.is_autocast_enabled("cpu")
    B, H, Lq, _ = query.shape
    if (use_matmul(query, B, H, Lq, key.shape[2]) and not kwargs.get("dropout")
            and (attention_mask is None or (attention_mask.dtype == torch.bool
                                            and attention_mask.shape[-3] == 1))
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


# a segment with a prefix (a shared prompt's response) attends in query chunks whose
# explicit mask [chunk, keys] has at most this many elements
PREFIX_MASK_MAX = 1 << 22
# short segments batched into one matmul-attention call are at least this fraction of the
# longest of their call (padding waste)
BUCKET_RATIO = 0.8


@dataclass
class Segments:
    """The segments of packed rows [R, L], in flat positions (row r, slot t: r x L + t).
    `cu_seqlens` [S+1]: the boundaries, every slot of every row covered in order (a row's
    padding tail is a segment of its own); `prefix` [S] (None: no segment has one): the
    segment whose keys segment s sees in full before its own (its shared prompt), -1 for
    none. Query i of a segment sees its prefix and its own keys 0..i."""

    cu_seqlens: Tensor
    prefix: Tensor | None = None

    def __post_init__(self):
        cu = self.cu_seqlens.tolist()
        pre = [-1] * (len(cu) - 1) if self.prefix is None else self.prefix.tolist()
        # (start, end, prefix start, prefix end) per non-empty segment
        self.spans = [(cu[s], cu[s + 1], *((cu[p], cu[p + 1]) if p >= 0 else (0, 0)))
                      for s, p in enumerate(pre) if cu[s + 1] > cu[s]]
        self._plans: dict = {}

    def plan(self, query: Tensor) -> tuple[list[list[tuple]], list[tuple]]:
        """The spans batched into matmul-attention calls (`use_matmul` for each span's
        shape; similar lengths, at most MATMUL_SCORES_MAX scores a call) and the rest,
        for queries like `query` ([R, H, L, D]); cached per heads and precision."""
        key = (query.shape[1], query.dtype, query.device.type,
               torch.is_autocast_enabled(query.device.type))
        if key not in self._plans:
            H = query.shape[1]
            short = sorted((sp for sp in self.spans
                            if use_matmul(query, 1, H, sp[1] - sp[0],
                                          sp[1] - sp[0] + sp[3] - sp[2])),
                           key=lambda sp: -(sp[1] - sp[0] + sp[3] - sp[2]))
            buckets: list[list[tuple]] = []
            qmax = kmax = 0
            for sp in short:
                n, k = sp[1] - sp[0], sp[1] - sp[0] + sp[3] - sp[2]
                q2 = max(qmax, n)
                if (buckets and k >= BUCKET_RATIO * kmax
                        and (len(buckets[-1]) + 1) * H * q2 * kmax <= MATMUL_SCORES_MAX):
                    buckets[-1].append(sp)
                    qmax = q2
                else:
                    buckets.append([sp])
                    qmax, kmax = n, k
            taken = {sp for b in buckets for sp in b}
            self._plans[key] = (buckets, [sp for sp in self.spans if sp not in taken])
        return self._plans[key]


def _prefix_mask(queries: int, prefix: int, offset: int, device) -> Tensor:
    """bool [queries, prefix + offset + queries]: query i (the segment's query offset + i)
    sees the prefix's keys and the segment's keys 0..offset + i."""
    keys = torch.arange(prefix + offset + queries, device=device)
    return keys <= (prefix + offset + torch.arange(queries, device=device))[:, None]


def causal_attention(query: Tensor, key: Tensor, value: Tensor, scale: float | None,
                     prefix: int = 0) -> Tensor:
    """One segment: [B, H, Lq, D] queries over [B, KV, prefix + Lq, D] keys and values,
    query i seeing the first `prefix` keys and the next i + 1. `use_matmul` shapes take
    matmul attention; otherwise torch's kernel, causal without a mask (no prefix) or in
    query chunks with a [chunk, keys] mask (PREFIX_MASK_MAX); under CPU autocast in
    float32, as `sdpa`. Returns [B, Lq, H, D]."""
    B, H, Lq, _ = query.shape
    autocast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    if use_matmul(query, B, H, Lq, key.shape[2]):
        dtype = torch.get_autocast_dtype("cpu") if autocast else key.dtype
        mask = _prefix_mask(Lq, prefix, 0, query.device)[None, None] if prefix else None
        with torch.autocast("cpu", enabled=False):
            out = matmul_attention(query, key, value, mask, scale, dtype, causal=not prefix)
        return out.to(dtype if autocast else query.dtype)
    if autocast:
        with torch.autocast("cpu", enabled=False):
            out = causal_attention(query.float(), key.float(), value.float(), scale, prefix)
        return out.to(torch.get_autocast_dtype("cpu"))
    gqa = key.shape[1] != H
    if not prefix:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                              enable_gqa=gqa).transpose(1, 2)
    chunk = max(1, PREFIX_MASK_MAX // key.shape[2])
    outs = []
    for a in range(0, Lq, chunk):
        b = min(a + chunk, Lq)
        outs.append(F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, :prefix + b], value[:, :, :prefix + b],
            attn_mask=_prefix_mask(b - a, prefix, a, query.device), scale=scale,
            enable_gqa=gqa))
    return torch.cat(outs, 2).transpose(1, 2)


def _bucket_attention(query: Tensor, key: Tensor, value: Tensor, spans: list[tuple],
                      scale: float | None) -> tuple[Tensor, Tensor]:
    """Spans of similar length in one matmul-attention call, each padded to the longest
    (pad queries repeat the last one; pad keys are masked). Returns the flat positions of
    the spans' queries and their outputs [n, H, D]."""
    L, dev = query.shape[2], query.device
    qpos, kpos, nq, nk = [], [], [], []
    for a, b, pa, pb in spans:
        qpos.append(list(range(a, b)))
        kpos.append(list(range(pa, pb)) + list(range(a, b)))
        nq.append(b - a)
        nk.append(b - a + pb - pa)
    qm, km = max(nq), max(nk)
    qidx = torch.tensor([q + [q[-1]] * (qm - len(q)) for q in qpos], device=dev)
    kidx = torch.tensor([k + [k[-1]] * (km - len(k)) for k in kpos], device=dev)
    nq_t, nk_t = torch.tensor(nq, device=dev), torch.tensor(nk, device=dev)
    rows = qidx[:, :1] // L

    def gather(t, idx):  # [R, heads, L, D] at flat positions [S, n] -> [S, heads, n, D]
        return t[rows, :, idx % L].transpose(1, 2)

    i = torch.arange(qm, device=dev)[:, None]
    j = torch.arange(km, device=dev)
    # query i of span s sees its key j when j <= prefix_s + i, keys past the span's masked
    mask = (j <= (nk_t - nq_t)[:, None, None] + i) & (j < nk_t[:, None, None])
    autocast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else key.dtype
    with torch.autocast("cpu", enabled=False):
        out = matmul_attention(gather(query, qidx), gather(key, kidx), gather(value, kidx),
                               mask[:, None], scale, dtype)
    valid = i[:, 0] < nq_t[:, None]
    return qidx[valid], out[valid].to(dtype if autocast else query.dtype)


def _flash_varlen():
    """flash-attn's varlen kernel, or None where it is not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _flash_attention(fn, query: Tensor, key: Tensor, value: Tensor, segments: Segments,
                     scale: float | None, dtype: torch.dtype) -> Tensor:
    """All segments in one varlen call (flash-attn's causal mask is bottom-right aligned:
    with a segment's keys = its prefix's then its own, query i sees prefix + i + 1 keys)."""
    R, H, L, D = query.shape
    flat = [t.transpose(1, 2).reshape(R * L, t.shape[1], D).to(dtype)
            for t in (query, key, value)]
    spans = segments.spans
    cu_q = torch.tensor([0] + [b - a for a, b, _, _ in spans], device=query.device).cumsum(0)
    qidx = torch.cat([torch.arange(a, b) for a, b, _, _ in spans]).to(query.device)
    kidx = torch.cat([torch.cat([torch.arange(pa, pb), torch.arange(a, b)])
                      for a, b, pa, pb in spans]).to(query.device)
    cu_k = torch.tensor([0] + [b - a + pb - pa for a, b, pa, pb in spans],
                        device=query.device).cumsum(0)
    out = fn(flat[0][qidx], flat[1][kidx], flat[2][kidx], cu_q.int(), cu_k.int(),
             int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max()),
             softmax_scale=scale, causal=True)
    return out.new_zeros(R * L, H, D).index_copy(0, qidx, out).view(R, L, H, D)


def packed_attention(query: Tensor, key: Tensor, value: Tensor, segments: Segments,
                     scale: float | None) -> Tensor:
    """Causal attention within each segment of packed rows (module docstring): [R, H, L,
    D] queries, [R, KV, L, D] keys and values; returns [R, L, H, D]. No [L, L] tensor:
    per span (or batch of short spans) at most its own scores."""
    R, H, L, D = query.shape
    if query.is_cuda and (fn := _flash_varlen()) is not None:
        dtype = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
                 else query.dtype)
        if dtype in LOW_PRECISION:
            return _flash_attention(fn, query, key, value, segments, scale, dtype)
    buckets, single = segments.plan(query)
    idx, outs = [], []
    for spans in buckets:
        i, o = _bucket_attention(query, key, value, spans, scale)
        idx.append(i)
        outs.append(o)
    for a, b, pa, pb in single:  # flat positions; a prefix lies in its segment's row
        r = a // L
        own = slice(a - r * L, b - r * L)
        k, v = key[r:r + 1, :, own], value[r:r + 1, :, own]
        if pb > pa:
            pre = slice(pa - r * L, pb - r * L)
            k = torch.cat([key[r:r + 1, :, pre], k], 2)
            v = torch.cat([value[r:r + 1, :, pre], v], 2)
        outs.append(causal_attention(query[r:r + 1, :, own], k, v, scale, pb - pa)[0])
        idx.append(torch.arange(a, b, device=query.device))
    vals = torch.cat(outs)
    return vals.new_zeros(R * L, H, D).index_copy(0, torch.cat(idx), vals).view(R, L, H, D)


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
