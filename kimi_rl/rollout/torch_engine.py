"""Built-in rollout engine: batched sampling with a KV cache on any transformers causal LM."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ..attention import LOW_PRECISION, use_sdpa
from ..rewards.repetition import RepeatTracker
from .engine import Request, SamplingParams, Segment
from .llama_decode import LlamaDecoder, supports
from .stops import StopStrings

# contexts prefilled in one padded batch are at least this fraction of its longest, or
# at most this many tokens shorter (a forward pass per bucket costs more than that padding)
PREFILL_BUCKET_RATIO = 0.8
PREFILL_BUCKET_SLACK = 16
# queued requests start once this share of the running rows (at least one) has ended
REFILL_FRACTION = 0.125
# positions a whole-buffer cache (TorchEngine.whole_kv) grows by at a time
KV_CHUNK = 16
# rows wider than this many entries are drawn from in two levels (inverse_cdf)
CDF_BLOCK = 256


def _first_above(cdf: Tensor, target: Tensor) -> Tensor:
    """Per row of the non-decreasing `cdf`, the first index whose value exceeds `target`
    (one per row); for a target at or past the row's end (a block's float32 sum above its
    float64 one), the index where the row last rises (an entry of positive weight)."""
    i = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    return torch.minimum(i, (cdf < cdf[:, -1:]).sum(-1))


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One draw per row of `probs` (non-negative weights, any row total): the first index
    whose cumulative sum exceeds u x the row's total, for `u` (one per row) in [0, 1). An
    entry of weight 0 is never drawn.

    Rows of up to CDF_BLOCK entries: float64 cumulative sums. Wider rows in two levels:
    the block of CDF_BLOCK entries in which u x total falls (block sums in float32, their
    running sums in float64), then the entry within that block (float64 running sums).
    Each entry's chance is then its weight / total to within float32 rounding of a block
    sum (~1e-7 of the block's mass); the cost is one float32 read of `probs`, where float64
    running sums over a 128 x 49K batch take ~10x longer."""
    rows, width = probs.shape
    target = u.reshape(-1).double()
    if width <= CDF_BLOCK:
        cdf = probs.double().cumsum(-1)
        return _first_above(cdf, target * cdf[:, -1])
    n = -(-width // CDF_BLOCK)
    if n * CDF_BLOCK > width:
        probs = F.pad(probs, (0, n * CDF_BLOCK - width))
    blocks = probs.reshape(rows, n, CDF_BLOCK)
    outer = blocks.sum(-1).double().cumsum(-1)
    target = target * outer[:, -1]
    b = _first_above(outer, target)
    before = outer.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0].masked_fill(b == 0, 0.0)
    inner = blocks[torch.arange(rows), b].double().cumsum(-1)
    return b * CDF_BLOCK + _first_above(inner, target - before)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def keyed_uniforms(keys: np.ndarray, counters: np.ndarray) -> Tensor:
    """Uniforms in [0, 1) (float64), one per row: draw number `counters[i]` (0, 1, ...) of
    the SplitMix64 stream seeded with `keys[i]` (uint64). A counter-based generator: a
    row's draw depends on its key and counter alone, not on the other rows."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53)


def sample_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator,
                  u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next tokens and their logprobs under softmax(logits / temperature); greedy takes
    the argmax and reports its logprob under the same tempered distribution. `u`: the
    rows' uniforms (float64 in [0, 1)); None: drawn from `generator`."""
    if not params.temperature > 0:
        raise ValueError(f"sampling: temperature must be > 0, got {params.temperature} "
                         "(use greedy=True for argmax decoding)")
    logp = torch.log_softmax(logits.float() / params.temperature, dim=-1)
    if params.greedy:
        tok = logp.argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]
    probs = logp.exp()
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > params.top_p  # keep the smallest nucleus
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    # torch.multinomial draws an exponential per vocabulary entry: ~10x slower at a 49K
    # vocabulary than one uniform per row
    if u is None:
        u = torch.rand(len(probs), generator=generator, dtype=torch.float64)
    tok = inverse_cdf(probs, u)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


class _BufferedLayer(DynamicLayer):
    """A KV-cache layer whose keys and values live in buffers with room for `reserve` more
    positions: a decode step writes its token in place, where transformers' DynamicLayer
    concatenates (copies the whole cache of every layer at every step). `keys` and `values`
    read as views of the filled part; assigning one (prefill, admitting rows, dropping
    rows) copies it into a fresh buffer with the same headroom, zero-filled. `dtype`: the
    buffers' dtype (None: the model's).

    torch's bfloat16 batched matmul on CPU copies a view of a longer buffer into a
    contiguous tensor first (the whole cache of a layer at every decode step, 3x the
    attention's own cost); its float32 one reads the view in place. A bfloat16 engine
    therefore either keeps float32 buffers (attention through the model's forward), or
    attends over the whole bfloat16 buffer (`whole`), its unfilled positions masked: with a
    few positions of headroom at a time (KV_CHUNK) that reads about half the bytes."""

    def __init__(self, reserve: int, dtype: torch.dtype | None = None):
        self.reserve = max(int(reserve), 1)
        self.store_dtype = dtype
        self._buf: dict[str, Tensor | None] = {"keys": None, "values": None}
        self._len = {"keys": 0, "values": 0}
        super().__init__()  # sets keys and values to None

    def _get(self, name: str) -> Tensor | None:
        buf = self._buf[name]
        return None if buf is None else buf[:, :, :self._len[name]]

    def _set(self, name: str, t: Tensor | None) -> None:
        if t is None:
            self._buf[name], self._len[name] = None, 0
            return
        buf = t.new_empty((*t.shape[:2], t.shape[2] + self.reserve, *t.shape[3:]),
                          dtype=self.store_dtype or t.dtype)
        buf[:, :, :t.shape[2]] = t
        buf[:, :, t.shape[2]:] = 0  # a masked position's weight 0 times its value: 0, not NaN
        self._buf[name], self._len[name] = buf, t.shape[2]

    keys = property(lambda self: self._get("keys"), lambda self, t: self._set("keys", t))
    values = property(lambda self: self._get("values"),
                      lambda self, t: self._set("values", t))

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        for name, new in (("keys", key_states), ("values", value_states)):
            buf, n = self._buf[name], self._len[name]
            if buf is None:
                self._set(name, new)
                continue
            end = n + new.shape[2]
            if end > buf.shape[2]:  # out of room: a new buffer, `reserve` more
                self.reserve = max(self.reserve, new.shape[2])
                self._set(name, buf[:, :, :n])
                buf = self._buf[name]
            buf[:, :, n:end] = new
            self._len[name] = end
        return self.keys, self.values

    def whole(self) -> tuple[Tensor, Tensor, int]:
        """The key and value buffers, [B, KV, capacity, D] (contiguous), and the number of
        filled positions; the rest are zeros."""
        return self._buf["keys"], self._buf["values"], self._len["keys"]


class TorchEngine:
    """Generates with its own copy of the policy weights (refreshed by update_weights)."""

    def __init__(self, model: PreTrainedModel, eos_token_id: int | Sequence[int],
                 pad_token_id: int, seed: int = 0, max_batch_size: int = 512,
                 stop_strings: StopStrings | None = None):
        """`eos_token_id`: the token, or tokens, that end a response (finish reason "stop";
        -1: none); `stop_strings`: text that also ends one (stops.py)."""
        self.model = model.eval()
        # decode steps of Llama-family models written out (llama_decode.py); prefill and
        # other models go through the model's forward
        self.decoder = LlamaDecoder(model) if supports(model) else None
        # a low-precision model on CPU (_BufferedLayer): the written-out decode step attends
        # over whole buffers in the model's dtype; the model's forward reads a float32 cache
        # (our attention, matmul_attention, takes the mixed dtypes)
        low = use_sdpa(model) and model.dtype in LOW_PRECISION and model.device.type == "cpu"
        self.whole_kv = low and self.decoder is not None
        self.kv_dtype = torch.float32 if low and not self.whole_kv else None
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.stop_ids = [t for t in stops if t is not None and t >= 0]
        self.eos = self.stop_ids[0] if self.stop_ids else -1
        self._stops = torch.tensor(self.stop_ids, dtype=torch.long)
        self.stop_strings = stop_strings
        self.pad = pad_token_id
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def generate(self, requests: Sequence[Request], max_new_tokens: int | Sequence[int],
                 params: SamplingParams, max_running: int | None = None,
                 max_steps: int | None = None) -> list[Segment]:
        """At most `max_running` sequences (default and cap: max_batch_size) decode at once;
        a queued request starts when running ones end (continuous batching, in order). With
        `max_steps` the call ends after that many decode steps: running sequences end with
        "length", requests not yet started get an empty Segment with "pending". Requests
        with keys draw token j of their segment from keyed_uniforms(key, j): the same
        whatever else is in the call (params.seed and the engine's stream are not used)."""
        limits = ([max_new_tokens] * len(requests) if isinstance(max_new_tokens, int)
                  else list(max_new_tokens))
        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        running = min(max_running or self.max_batch_size, self.max_batch_size)
        return self._run(requests, limits, params, gen, running, max_steps)

    @torch.no_grad()
    def _run(self, requests: Sequence[Request], limits: list[int], params: SamplingParams,
             generator: torch.Generator, max_running: int, max_steps: int | None
             ) -> list[Segment]:
        B = len(requests)
        limit = torch.tensor(limits, dtype=torch.long)
        T = int(limit.max()) if B else 0
        tokens = torch.full((B, max(T, 1)), self.pad, dtype=torch.long)
        logps = torch.zeros((B, max(T, 1)))
        lengths = torch.zeros(B, dtype=torch.long)
        reason = ["length" if n <= 0 else "pending" for n in limits]  # requests with limit 0
        queue = deque(i for i in range(B) if limits[i] > 0)  # never start
        ctx = [list(r.prompt_ids) + list(r.prefix_ids) for r in requests]
        keyed = [r.key is not None for r in requests]
        if any(keyed) and not all(keyed):
            raise ValueError("generate: either every request has a key or none has")
        keys = np.array([r.key for r in requests], dtype=np.uint64) if any(keyed) else None
        tracker = (RepeatTracker(params.repeat, B, [r.prefix_ids for r in requests])
                   if params.repeat is not None else None)
        texts = (self.stop_strings.tracker(B, [r.prefix_ids for r in requests])
                 if self.stop_strings is not None else None)

        def start(n: int) -> list[int]:
            rows = [queue.popleft() for _ in range(min(n, len(queue)))]
            for i in rows:
                reason[i] = "length"
            return rows

        # active: the request of each cache row; next_pos: each row's next position
        active = torch.tensor(start(max_running), dtype=torch.long)
        if not len(active):
            return [Segment([], [], reason[i]) for i in range(B)]
        cache, logits, mask = self._prefill([ctx[i] for i in active.tolist()], T)
        next_pos = mask.sum(-1)
        step = 0
        while True:
            col = lengths[active]
            u = (None if keys is None or params.greedy
                 else keyed_uniforms(keys[active.numpy()], col.numpy()))
            tok, lp = sample_tokens(logits, params, generator, u)
            tokens[active, col] = tok
            logps[active, col] = lp
            lengths[active] += 1
            step += 1
            eos = torch.isin(tok, self._stops.to(tok.device))
            if texts is not None:
                eos = eos | texts.push(active, tok).to(eos.device)
            for i in active[eos].tolist():
                reason[i] = "stop"
            done = eos
            if tracker is not None:
                looped = tracker.push(active, tok) & ~eos
                for i in active[looped].tolist():
                    reason[i] = "repeat"
                done = eos | looped
            keep = ~done & (lengths[active] < limit[active])
            if max_steps is not None and step >= max_steps:
                break
            free = max_running - int(keep.sum())
            new = start(free) if queue and (free >= self._refill_at(max_running)
                                            or not keep.any()) else []
            if not keep.any():
                if not new:
                    break
                active = torch.tensor(new, dtype=torch.long)
                cache, logits, mask = self._prefill([ctx[i] for i in new], T)
                next_pos = mask.sum(-1)
                continue
            if not keep.all():
                cache.batch_select_indices(keep.nonzero()[:, 0])
                active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            logits = self._decode(tok, next_pos, mask, cache)
            next_pos = next_pos + 1
            if new:  # join the running rows, aligned on the right like them
                mask, new_logits, new_mask = self._admit(cache, mask, [ctx[i] for i in new])
                logits = torch.cat([logits, new_logits])
                active = torch.cat([active, torch.tensor(new, dtype=torch.long)])
                next_pos = torch.cat([next_pos, new_mask.sum(-1)])
        return [
            Segment(tokens[i, :n].tolist(), logps[i, :n].tolist(), reason[i])
            for i, n in enumerate(lengths.tolist())
        ]

    def _logits(self, **inputs) -> Tensor:
        """Logits at each row's last position, through the model's forward."""
        return self._head(self.model.base_model(**inputs, use_cache=True)
                          .last_hidden_state[:, -1])

    def _decode(self, tok: Tensor, pos: Tensor, mask: Tensor, cache: DynamicCache) -> Tensor:
        """Logits of one new token per row (`tok` at positions `pos`, `mask` the rows'
        attention masks including it), appended to `cache`."""
        if self.decoder is None:
            return self._logits(input_ids=tok[:, None], attention_mask=mask,
                                position_ids=pos[:, None], past_key_values=cache)
        return self._head(self.decoder.hidden(tok, pos, None if bool(mask.all()) else mask,
                                              cache, whole=self.whole_kv))

    def _head(self, hidden: Tensor) -> Tensor:
        """The output layer as the policy backends apply it (hidden @ weight.T, no bias),
        computed as (weight @ hidden.T).T: the same product, but with the vocabulary as the
        long side MKL runs it ~2x faster at decode batch sizes (a 49K x 576 float32 head:
        ~40 ms a step otherwise)."""
        return (self.model.get_output_embeddings().weight @ hidden.T).T

    @staticmethod
    def _refill_at(max_running: int) -> int:
        """Free rows that make it worth a prefill call for queued requests."""
        return max(1, int(max_running * REFILL_FRACTION))

    def _admit(self, cache: DynamicCache, mask: Tensor, ctx: list[list[int]]
               ) -> tuple[Tensor, Tensor, Tensor]:
        """Prefill `ctx` and append the rows to `cache` (in place), left-padding whichever
        side is shorter; returns the joint attention mask, the new rows' logits and their
        own mask."""
        keys, values, logits, new_mask = self._prefill_kv(ctx)
        C, N = mask.shape[1], new_mask.shape[1]
        if N > C:  # the new contexts are longer than the running rows so far
            for layer in cache.layers:
                layer.keys = F.pad(layer.keys, (0, 0, N - C, 0))
                layer.values = F.pad(layer.values, (0, 0, N - C, 0))
            mask = F.pad(mask, (N - C, 0))
        pad = (0, 0, max(C - N, 0), 0)
        for layer, k, v in zip(cache.layers, keys, values, strict=True):
            layer.keys = torch.cat([layer.keys, F.pad(k, pad)])
            layer.values = torch.cat([layer.values, F.pad(v, pad)])
        return torch.cat([mask, F.pad(new_mask, (max(C - N, 0), 0))]), logits, new_mask

    def _prefill(self, ctx: list[list[int]], reserve: int
                 ) -> tuple[DynamicCache, Tensor, Tensor]:
        """KV cache (with room for `reserve` decode steps), last-position logits and
        attention mask of left-padded contexts."""
        keys, values, logits, mask = self._prefill_kv(ctx)
        cache = DynamicCache()
        reserve = min(reserve, KV_CHUNK) if self.whole_kv else reserve
        cache.layers = [_BufferedLayer(reserve, self.kv_dtype) for _ in keys]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, layer)
        return cache, logits, mask

    def _prefill_kv(self, ctx: list[list[int]]
                    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Per-layer keys and values, last-position logits and attention mask of
        left-padded contexts.

        Equal contexts (the samples of a group) are computed once. Contexts of similar
        length are prefilled together (a bucket holds lengths within `PREFILL_BUCKET_RATIO`
        of its longest or `PREFILL_BUCKET_SLACK` tokens of it), then their caches are
        left-padded to the longest context and stacked: continuations of partial rollouts
        have very different lengths, and one padded batch would spend most of its compute
        on padding."""
        first: dict[tuple[int, ...], int] = {}
        which = [first.setdefault(tuple(c), len(first)) for c in ctx]
        if len(first) < len(ctx):
            keys, values, logits, mask = self._prefill_kv([list(c) for c in first])
            at = torch.tensor(which)
            return [k[at] for k in keys], [v[at] for v in values], logits[at], mask[at]
        L = max(len(c) for c in ctx)
        order = sorted(range(len(ctx)), key=lambda i: -len(ctx[i]))
        buckets: list[list[int]] = []
        for i in order:
            longest = len(ctx[buckets[-1][0]]) if buckets else 0
            if buckets and (len(ctx[i]) >= PREFILL_BUCKET_RATIO * longest
                            or len(ctx[i]) >= longest - PREFILL_BUCKET_SLACK):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        mask = torch.zeros((len(ctx), L), dtype=torch.long)
        for i, c in enumerate(ctx):
            mask[i, L - len(c):] = 1
        keys: list[list[Tensor]] = []
        values: list[list[Tensor]] = []
        logits = []
        for rows in buckets:
            n = len(ctx[rows[0]])
            ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
            for r, i in enumerate(rows):  # left padding within the bucket
                ids[r, n - len(ctx[i]):] = torch.tensor(ctx[i])
            m = mask[rows, L - n:]
            cache = DynamicCache()
            logits.append(self._logits(input_ids=ids, attention_mask=m,
                                       position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                                       past_key_values=cache))
            pad = (0, 0, L - n, 0)  # zeros on the left of the sequence dimension
            keys.append([F.pad(layer.keys, pad) for layer in cache.layers])
            values.append([F.pad(layer.values, pad) for layer in cache.layers])
        back = torch.argsort(torch.tensor([i for rows in buckets for i in rows]))
        return ([torch.cat([k[j] for k in keys])[back] for j in range(len(keys[0]))],
                [torch.cat([v[j] for v in values])[back] for j in range(len(values[0]))],
                torch.cat(logits)[back], mask)

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy full HF-named tensors in place; every parameter must be covered. The whole
        update is checked (names, coverage, shapes) before anything is copied, so a
        rejected update leaves the engine's weights as they were."""
        targets = self.model.state_dict(keep_vars=True)
        update: dict[str, Tensor] = {}
        for name, t in weights:
            if name not in targets:
                raise KeyError(f"update_weights: unknown weight {name!r}")
            if tuple(t.shape) != tuple(targets[name].shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(targets[name].shape)}")
            update[name] = t
        missing = {n for n, _ in self.model.named_parameters()} - set(update)
        if missing:
            raise ValueError(f"update_weights: partial update, missing {sorted(missing)[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
        for name, t in update.items():
            targets[name].data.copy_(t)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
