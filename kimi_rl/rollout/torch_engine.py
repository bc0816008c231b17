"""Built-in rollout engine: batched sampling with a KV cache on any transformers causal LM."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from ..rewards.repetition import RepeatTracker
from .engine import Request, SamplingParams, Segment

# contexts prefilled in one padded batch are at least this fraction of its longest
PREFILL_BUCKET_RATIO = 0.8


def sample_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator
                  ) -> tuple[Tensor, Tensor]:
    """Next tokens and their logprobs under softmax(logits / temperature); greedy takes
    the argmax and reports its logprob under the same tempered distribution."""
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
    tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return tok, logp.gather(-1, tok[:, None])[:, 0]


class TorchEngine:
    """Generates with its own copy of the policy weights (refreshed by update_weights)."""

    def __init__(self, model: PreTrainedModel, eos_token_id: int, pad_token_id: int,
                 seed: int = 0, max_batch_size: int = 512):
        self.model = model.eval()
        self.eos, self.pad = eos_token_id, pad_token_id
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def generate(self, requests: Sequence[Request], max_new_tokens: int | Sequence[int],
                 params: SamplingParams) -> list[Segment]:
        limits = ([max_new_tokens] * len(requests) if isinstance(max_new_tokens, int)
                  else list(max_new_tokens))
        gen = self.generator
        if params.seed is not None:
            gen = torch.Generator().manual_seed(params.seed)
        out: list[Segment] = []
        for s in range(0, len(requests), self.max_batch_size):
            e = s + self.max_batch_size
            out += self._generate_batch(requests[s:e], limits[s:e], params, gen)
        return out

    @torch.no_grad()
    def _generate_batch(self, requests: Sequence[Request], limits: list[int],
                        params: SamplingParams, generator: torch.Generator) -> list[Segment]:
        B = len(requests)
        limit = torch.tensor(limits, dtype=torch.long)
        T = int(limit.max()) if B else 0
        tokens = torch.full((B, max(T, 1)), self.pad, dtype=torch.long)
        logps = torch.zeros((B, max(T, 1)))
        lengths = torch.zeros(B, dtype=torch.long)
        reason = ["length"] * B
        # original row of each row still in the cache; rows with limit 0 never enter it
        active = (limit > 0).nonzero()[:, 0]
        if not len(active):
            return [Segment([], [], "length") for _ in range(B)]
        ctx = [list(requests[i].prompt_ids) + list(requests[i].prefix_ids)
               for i in active.tolist()]
        tracker = (RepeatTracker(params.repeat, B, [r.prefix_ids for r in requests])
                   if params.repeat is not None else None)
        cache, logits, mask = self._prefill(ctx)
        next_pos = mask.sum(-1)  # each row's next position: its context length
        for step in range(T):
            tok, lp = sample_tokens(logits, params, generator)
            tokens[active, step] = tok
            logps[active, step] = lp
            lengths[active] += 1
            eos = tok == self.eos
            for i in active[eos].tolist():
                reason[i] = "stop"
            done = eos
            if tracker is not None:
                looped = tracker.push(active, tok) & ~eos
                for i in active[looped].tolist():
                    reason[i] = "repeat"
                done = eos | looped
            keep = ~done & (lengths[active] < limit[active])
            if not keep.any():
                break
            if not keep.all():
                cache.batch_select_indices(keep.nonzero()[:, 0])
                active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            logits = self.model(input_ids=tok[:, None], attention_mask=mask,
                                position_ids=next_pos[:, None], past_key_values=cache,
                                use_cache=True).logits[:, -1]
            next_pos = next_pos + 1
        return [
            Segment(tokens[i, :n].tolist(), logps[i, :n].tolist(), reason[i])
            for i, n in enumerate(lengths.tolist())
        ]

    def _prefill(self, ctx: list[list[int]]) -> tuple[DynamicCache, Tensor, Tensor]:
        """KV cache, last-position logits and attention mask of left-padded contexts.

        Contexts of similar length are prefilled together (a bucket holds lengths within
        `PREFILL_BUCKET_RATIO` of its longest), then their caches are left-padded to the
        longest context and stacked: continuations of partial rollouts have very different
        lengths, and one padded batch would spend most of its compute on padding."""
        L = max(len(c) for c in ctx)
        order = sorted(range(len(ctx)), key=lambda i: -len(ctx[i]))
        buckets: list[list[int]] = []
        for i in order:
            if buckets and len(ctx[i]) >= PREFILL_BUCKET_RATIO * len(ctx[buckets[-1][0]]):
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
            logits.append(self.model(input_ids=ids, attention_mask=m,
                                     position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                                     past_key_values=cache, use_cache=True,
                                     logits_to_keep=1).logits[:, -1])
            pad = (0, 0, L - n, 0)  # zeros on the left of the sequence dimension
            keys.append([F.pad(layer.keys, pad) for layer in cache.layers])
            values.append([F.pad(layer.values, pad) for layer in cache.layers])
        back = torch.argsort(torch.tensor([i for rows in buckets for i in rows]))
        merged = DynamicCache()
        for layer in range(len(keys[0])):
            merged.update(torch.cat([k[layer] for k in keys])[back],
                          torch.cat([v[layer] for v in values])[back], layer)
        return merged, torch.cat(logits)[back], mask

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
