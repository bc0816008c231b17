"""Built-in rollout engine: batched sampling with a KV cache on any transformers causal LM."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from .engine import Request, SamplingParams, Segment


def sample_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator
                  ) -> tuple[Tensor, Tensor]:
    """Next tokens and their logprobs under softmax(logits / temperature)."""
    logits = logits.float()
    if params.greedy:
        logp = torch.log_softmax(logits, dim=-1)
        tok = logp.argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / params.temperature, dim=-1)
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
        ctx = [list(r.prompt_ids) + list(r.prefix_ids) for r in requests]
        L = max(len(c) for c in ctx)
        ids = torch.full((B, L), self.pad, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for i, c in enumerate(ctx):  # left padding
            ids[i, L - len(c):] = torch.tensor(c)
            mask[i, L - len(c):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        limit = torch.tensor(limits)
        T = int(limit.max()) if B else 0
        tokens = torch.full((B, max(T, 1)), self.pad, dtype=torch.long)
        logps = torch.zeros((B, max(T, 1)))
        lengths = torch.zeros(B, dtype=torch.long)
        reason = ["length"] * B
        active = torch.arange(B)  # original row of each row still in the cache
        cache = DynamicCache()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        next_pos = pos[:, -1] + 1
        for step in range(T):
            tok, lp = sample_tokens(logits, params, generator)
            tokens[active, step] = tok
            logps[active, step] = lp
            lengths[active] += 1
            eos = tok == self.eos
            for i in active[eos].tolist():
                reason[i] = "stop"
            keep = ~eos & (lengths[active] < limit[active])
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

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy full HF-named tensors in place; every parameter must be covered."""
        targets = self.model.state_dict(keep_vars=True)
        seen = set()
        for name, t in weights:
            if name not in targets:
                raise KeyError(f"update_weights: unknown weight {name!r}")
            targets[name].data.copy_(t)
            seen.add(name)
        missing = {n for n, _ in self.model.named_parameters()} - seen
        if missing:
            raise ValueError(f"update_weights: partial update, missing {sorted(missing)[:5]}")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
