"""Policy backend on megatron-core: tensor (TP), pipeline (PP) and data (DP) parallel.

One process per GPU (torchrun). The world splits into TP x PP x DP as megatron's
parallel_state does. Context parallel (CP) and Transformer Engine's layers
(backend.transformer_impl) are refused at start, naming what to install where Transformer
Engine is missing (check_transformer_impl); activation recomputation is megatron's,
selective or full (backend.recompute). The model is megatron's GPTModel with the local
layer spec, whose core attention is replaced by PackedAttention (torch SDPA per packed
sequence: flash kernels on GPU, no [s x s] mask). RoPE is computed from each token's
position id, so packed sequences restart at position 0 as in the hf backend and the
rollout engines.

Interface of the hf backend (kimi_rl/policy/hf.py): logprobs, train_step, export_weights
(full HF-named tensors, gathered over TP and PP), reset_optimizer, set_lr, and
checkpoints through megatron's distributed checkpointing (save_sharded/load_sharded,
resharded on load: a TP=2 checkpoint resumes at TP=1). Every rank calls every method
with the same arguments: the micro-batches are split over DP inside, forward/backward
runs megatron's pipeline schedule, and results reach every rank.

Per-token logprobs use the vocab-parallel output layer in chunks of `logits_chunk`
tokens, each recomputed in backward, so [tokens x vocab] float32 logits never exist.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..config import RECOMPUTE, TRANSFORMER_IMPLS, AlgoConfig, BackendConfig
from . import megatron_convert as mc
from .hf import LossFn
from .packing import PackedBatch

# --- pure pieces -------------------------------------------------------------------------


def rope_freqs(position_ids: Tensor, head_dim: int, theta: float) -> Tensor:
    """RoPE angles [s, b, 1, head_dim] (half-split layout, as transformers) from position
    ids [b, s]; megatron applies cos/sin of them to q and k."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                       device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv
    return torch.cat([freqs, freqs], dim=-1).transpose(0, 1)[:, :, None, :]


def segment_ids(position_ids: Tensor) -> Tensor:
    """[b, s] index of the packed sequence each token belongs to (a sequence starts where
    its position id is 0)."""
    return torch.cumsum((position_ids == 0).long(), dim=1)


def _vocab_parallel_logprobs(h: Tensor, w: Tensor, targets: Tensor, start: int, vocab: int,
                             temperature: float, group) -> tuple[Tensor, Tensor]:
    """log p(target) and entropy of one chunk of tokens, with the output layer's rows
    [start, start + w.shape[0]) on this TP rank. Sums over the vocabulary are all-reduced
    over `group` (identity in backward: each rank's part of the sum gets the gradient).
    Padded vocabulary rows (>= `vocab`, at the end) are left out. Autograd keeps two
    [chunk x vocab/TP] float32 tensors (logits, their exp)."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as reduce

    w = w[:max(0, min(w.shape[0], vocab - start))]  # this rank's real rows
    logits = (h @ w.T).float()
    if temperature != 1.0:
        logits = logits / temperature
    top = (logits.detach().max(dim=-1).values if w.shape[0]
           else logits.new_full((h.shape[0],), float("-inf")))
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    local = (targets >= start) & (targets < start + w.shape[0])
    idx = (targets - start).clamp(0, max(w.shape[0] - 1, 0))
    picked = logits.gather(-1, idx[:, None])[:, 0] if w.shape[0] else top * 0
    target_logit = reduce(torch.where(local, picked, torch.zeros_like(picked)), group)
    exp = (logits - top[:, None]).exp_()
    sumexp = reduce(exp.sum(-1), group)
    logz = top + torch.log(sumexp)
    with torch.no_grad():  # H = log Z - E_p[logit], on logits shifted by their max
        shifted = logits.detach() - top[:, None]
        p_logit = torch.bmm(exp.detach()[:, None, :], shifted[:, :, None])[:, 0, 0]
        del shifted
        dist.all_reduce(p_logit, group=group)
        entropy = torch.log(sumexp) - p_logit / sumexp
    return target_logit - logz, entropy


def vocab_parallel_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                                  vocab_start: int, vocab_size: int, chunk: int,
                                  temperature: float = 1.0, group=None
                                  ) -> tuple[Tensor, Tensor]:
    """Per-row log p(target) and entropy of `hidden` [N, H] under a vocab-parallel output
    layer, `chunk` rows at a time; with grad each chunk is recomputed in backward, so one
    chunk's [chunk x vocab/TP] logits is the most ever held."""
    lps, ents = [], []
    for s in range(0, max(hidden.shape[0], 1), chunk):
        args = (hidden[s:s + chunk], weight, targets[s:s + chunk], vocab_start, vocab_size,
                temperature, group)
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            lp, ent = checkpoint(_vocab_parallel_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _vocab_parallel_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm as a megatron layer-spec norm; with sequence parallel its weight is
    marked so that megatron all-reduces its gradient over the TP group."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


TE_INSTALL = ("pip install --no-build-isolation 'transformer-engine[pytorch]' (on a CUDA machine, "
              "a build matching its torch and CUDA)")


def check_transformer_impl(backend: BackendConfig) -> None:
    """The layer implementation asked for exists here: Transformer Engine fails at start,
    saying what to install where it is missing; where it is installed, that its path is not
    wired into this backend yet. (Context parallelism runs on the local layers.)"""
    if backend.transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(f"backend.transformer_impl={backend.transformer_impl!r}: choose from "
                         f"{list(TRANSFORMER_IMPLS)}")
    if backend.context_parallel < 1:
        raise ValueError(f"backend.context_parallel={backend.context_parallel}: must be >= 1")
    if backend.transformer_impl == "local":
        return
    what = "backend.transformer_impl=transformer_engine"
    if importlib.util.find_spec("transformer_engine") is None:
        raise ValueError(f"{what}: NVIDIA Transformer Engine is not installed: {TE_INSTALL}; "
                         f"or backend.transformer_impl=local")
    raise NotImplementedError(
        f"{what}: the megatron backend's Transformer Engine path (its fused layers on THD "
        f"packed sequences) is not wired yet; use backend.transformer_impl=local")


def recompute_settings(backend: BackendConfig) -> dict:
    """Megatron's activation-recomputation settings for backend.recompute (null |
    selective: each layer's core attention | full: each layer whole, one at a time);
    backend.gradient_checkpointing=true means full."""
    mode = backend.recompute or ("full" if backend.gradient_checkpointing else None)
    if mode not in RECOMPUTE:
        raise ValueError(f"backend.recompute={mode!r}: choose from {list(RECOMPUTE)}")
    if backend.gradient_checkpointing and mode != "full":
        raise ValueError(f"backend.recompute={mode}: backend.gradient_checkpointing=true means "
                         f"full recompute; set one of them")
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1)
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    return {}


class _GatherCP(torch.autograd.Function):
    """All-gather over the context-parallel group along dim 0 (rank order); backward sums
    each rank's slice of the gradients over the group (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
        return out, None


class _SumCP(torch.autograd.Function):
    """Sum over the context-parallel group of tensors that are zero outside each rank's own
    entries; backward is the identity: every rank computes the same loss from the sum, so
    its own entries' gradient is that loss's."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _context_parallel_attention(query: Tensor, key: Tensor, value: Tensor, index: Tensor,
                                scale: float | None) -> Tensor:
    """Causal attention of this CP rank's tokens ([n, 1, heads, d], zigzag chunks of THD
    sequences) over the whole of their sequences: keys and values are all-gathered over the
    CP group (an all-gather CP; the gradients of the gathered keys and values return to
    their ranks by reduce-scatter), put in padded-row order, and each contiguous run of the
    rank's queries attends to its sequence's keys up to itself (kimi_rl.attention's
    causal_attention with the keys before the run as its prefix). `index`: [2, n] each
    token's padded-row position and its sequence's start, then (rows 2-) the order that puts
    the gathered tokens in padded-row order (CPShard.order; _cp_micro)."""
    from megatron.core import parallel_state as ps

    from ..attention import causal_attention

    group = ps.get_context_parallel_group()
    n, _, nq, d = query.shape
    pos, start, order = index[0], index[1], index[2:].reshape(-1)
    keys = _GatherCP.apply(key, group)[order, 0].transpose(0, 1)[None]  # [1, kv, T, d]
    values = _GatherCP.apply(value, group)[order, 0].transpose(0, 1)[None]
    q = query[:, 0].transpose(0, 1)[None]  # [1, heads, n, d]
    cuts = ((pos[1:] != pos[:-1] + 1) | (start[1:] != start[:-1])).nonzero()[:, 0] + 1
    bounds = [0, *cuts.tolist(), n]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):  # a run: one chunk of a sequence
        first, seq_start = int(pos[a]), int(start[a])
        end = first + (b - a)
        out.append(causal_attention(q[:, :, a:b], keys[:, :, seq_start:end],
                                    values[:, :, seq_start:end], scale,
                                    prefix=first - seq_start)[0])
    return torch.cat(out).reshape(n, 1, nq * d)


def _packed_attention_cls():
    from megatron.core.transformer.module import MegatronModule

    class PackedAttention(MegatronModule):
        """Core attention for packed rows: causal attention within each packed sequence,
        one torch SDPA call per sequence (GQA native). `attention_mask` carries the [b, s]
        segment ids (segment_ids), not a mask; under context parallel the index of the
        rank's tokens (_cp_micro) for _context_parallel_attention."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type,
                     attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                     pg_collection=None):
            super().__init__(config=config)
            self.scale = softmax_scale
            self.cp = config.context_parallel_size

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if self.cp > 1:
                return _context_parallel_attention(query, key, value, attention_mask,
                                                   self.scale)
            s, b, nq, d = query.shape
            out = query.new_empty(s, b, nq, d)
            for r in range(b):
                lengths = torch.unique_consecutive(attention_mask[r], return_counts=True)[1]
                at = 0
                for n in lengths.tolist():
                    q, k, v = (t[at:at + n, r].transpose(0, 1)[None] for t in (query, key, value))
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                       enable_gqa=k.shape[1] != nq)
                    out[at:at + n, r] = o[0].transpose(0, 1)
                    at += n
            return out.reshape(s, b, nq * d)

    return PackedAttention


@dataclass
class _Micro:
    """A packed micro-batch shaped for the model (row length a multiple of TP; under
    context parallel one row of the rank's tokens, _cp_micro)."""

    input_ids: Tensor  # [b, s]
    position_ids: Tensor
    segments: Tensor
    rows_index: Tensor  # [N] flat positions (b * s) of the hidden states predicting targets
    targets: Tensor  # [N]
    batch: PackedBatch | None  # None: an empty stand-in (a DP rank with no micro-batch)
    temperature: float = 1.0
    entropy: Tensor | None = None  # [N], set by the last stage's forward
    # context parallel: which of the batch's N targets this rank computes (rows_index and
    # targets are theirs); `segments` is then _cp_micro's index
    slots: Tensor | None = None
    n_targets: int = 0


def _cp_micro(pb: PackedBatch, cp: int, rank: int, tp: int, sequence_parallel: bool,
              device) -> _Micro:
    """This CP rank's part of a packed micro-batch: one row of its zigzag tokens
    (context_parallel.cp_shard)."""
    from .context_parallel import cp_shard

    sh = cp_shard(pb.input_ids, pb.position_ids, pb.sources, pb.targets, cp, rank, tp,
                  sequence_parallel)
    index = torch.cat([sh.index, sh.order.view(cp, -1)])  # what the attention reads
    return _Micro(sh.input_ids[None].to(device), sh.position_ids[None].to(device),
                  index.to(device), sh.sources.to(device), sh.targets.to(device), pb,
                  slots=sh.slots.to(device), n_targets=int(pb.targets.numel()))


def _micro(pb: PackedBatch, multiple: int, device) -> _Micro:
    rows, length = pb.input_ids.shape
    pad = -length % multiple
    ids = F.pad(pb.input_ids, (0, pad))
    pos = torch.cat([pb.position_ids, torch.arange(pad).expand(rows, pad)], dim=1)
    t = pb.target_index
    flat = (t // length) * (length + pad) + t % length
    return _Micro(ids.to(device), pos.to(device), segment_ids(pos).to(device),
                  (flat - 1).to(device), pb.targets.to(device), pb)


# --- the backend ---------------------------------------------------------------------------


class MegatronPolicy:
    """The `megatron` policy backend (see the module docstring). `hf_model` is a Hugging
    Face model of the same architecture (random or pretrained weights): the weights are
    converted from it, and `model` returns it holding the weights last exported (what the
    rollout engine and save_hf see)."""

    def __init__(self, hf_model, backend: BackendConfig, algo: AlgoConfig, seed: int = 0):
        self.cfg, self.algo, self.hf_model = backend, algo, hf_model
        self.shape = mc.model_shape(hf_model.config)
        tp, pp, cp = backend.tensor_parallel, backend.pipeline_parallel, backend.context_parallel
        check_transformer_impl(backend)
        recompute = recompute_settings(backend)
        if backend.sequence_parallel and tp == 1:
            raise ValueError("backend.sequence_parallel needs backend.tensor_parallel > 1")
        mc.check_parallel(self.shape, tp, pp)
        if not torch.cuda.is_available():
            raise RuntimeError("backend=megatron needs a CUDA device per process (megatron-core "
                               "places tensors on CUDA); use backend=hf on a CPU")
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from ..distributed import init_distributed

        logging.getLogger("megatron").setLevel(logging.WARNING)  # it lists every parameter
        init_distributed()
        world = dist.get_world_size()
        if world % (tp * pp * cp):
            raise ValueError(f"backend: tensor_parallel x pipeline_parallel x context_parallel "
                             f"= {tp} x {pp} x {cp} does not divide the {world} processes")
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp,
                                         context_parallel_size=cp)
        have = (ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size(), ps.get_context_parallel_world_size())
        if have != (tp, pp, cp):
            raise ValueError(f"backend: this process's megatron parallel state is already "
                             f"TP x PP x CP = {' x '.join(map(str, have))}, not the {tp} x {pp} "
                             f"x {cp} asked for (megatron.core.parallel_state."
                             f"destroy_model_parallel() first)")
        with torch.random.fork_rng(devices=[]):  # megatron seeds the CUDA RNG, not ours
            tensor_parallel.model_parallel_cuda_manual_seed(seed)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.tp_rank, self.tp = ps.get_tensor_model_parallel_rank(), tp
        self.pp_rank, self.pp = ps.get_pipeline_model_parallel_rank(), pp
        self.dp_rank, self.dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp_rank, self.cp = ps.get_context_parallel_rank(), cp
        self.first, self.last = self.pp_rank == 0, self.pp_rank == pp - 1
        self.vocab = mc.padded_vocab_size(self.shape.vocab_size, tp)
        self.dtype = next(hf_model.parameters()).dtype
        self.config = mc.transformer_config(
            self.shape, tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
            sequence_parallel=backend.sequence_parallel, dtype=self.dtype,
            variable_seq_lengths=True, moe_token_dispatcher_type="alltoall",  # (no MoE)
            calculate_per_token_loss=True,
            # initialised on the device, then overwritten by the HF weights (megatron marks
            # tensor-parallel parameters only while initialising them)
            perform_initialization=True, use_cpu_initialization=False,
            **recompute)
        # an HF embedding's padding_idx row gets no gradient from its lookups; Megatron's
        # embedding has no such row, so _stage_forward reproduces it (same gradients as HF)
        self.padding_idx = getattr(hf_model.get_input_embeddings(), "padding_idx", None)
        self._build(hf_model.state_dict())

    # -- construction ------------------------------------------------------------------
    def _build(self, hf_state: dict[str, Tensor]) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        layer.submodules.self_attention.submodules.core_attention = _packed_attention_cls()
        layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNorm
        spec = TransformerBlockSubmodules(layer_specs=[layer] * (self.shape.num_layers // self.pp),
                                          layer_norm=RMSNorm)
        gpt = GPTModel(config=self.config, transformer_layer_spec=spec, vocab_size=self.vocab,
                       max_sequence_length=self.shape.max_position_embeddings,
                       pre_process=self.first, post_process=self.last,
                       share_embeddings_and_output_weights=self.shape.tie_word_embeddings,
                       position_embedding_type="none")
        gpt.load_state_dict(mc.hf_to_megatron(hf_state, self.shape, self.tp_rank, self.tp,
                                              self.pp_rank, self.pp), strict=True)
        gpt.to(self.device)
        ddp = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.cfg.distributed_optimizer)
        self._ddp = DistributedDataParallel(config=self.config, ddp_config=ddp, module=gpt)
        self.gpt = gpt
        # losses arrive normalised (each micro-batch's share of the mini-batch loss), so
        # gradients are summed over micro-batches and DP ranks, never rescaled
        self.config.finalize_model_grads_func = (
            lambda model, num_tokens, **kw: finalize_model_grads(model, None, **kw))
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self, lr: float | None = None):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        a = self.algo
        cfg = OptimizerConfig(
            optimizer="adam", lr=a.lr if lr is None else lr, weight_decay=a.weight_decay,
            adam_beta1=a.betas[0], adam_beta2=a.betas[1], adam_eps=1e-8, clip_grad=a.grad_clip,
            bf16=self.dtype == torch.bfloat16, fp16=self.dtype == torch.float16,
            params_dtype=self.dtype, use_distributed_optimizer=self.cfg.distributed_optimizer)
        return get_megatron_optimizer(cfg, [self._ddp])

    def reset_optimizer(self, lr: float | None = None, betas=None) -> None:
        """Fresh moments (Adam state cleared), at `lr` and `betas` or the algorithm's."""
        for opt in self._inner_optimizers():
            opt.state.clear()
            for group in opt.param_groups:
                group["betas"] = tuple(self.algo.betas if betas is None else betas)
        self.set_lr(self.algo.lr if lr is None else lr)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- forward -----------------------------------------------------------------------
    def _stage_forward(self, mb: _Micro) -> Tensor:
        """This stage's part of the forward: the next stage's input, or on the last stage
        the logprobs [N] (entropies go to mb.entropy)."""
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        gpt = self.gpt
        decoder_input = None
        if self.first:
            decoder_input = gpt.embedding(input_ids=mb.input_ids, position_ids=None)
            if self.padding_idx is not None:
                decoder_input = self._no_grad_at_padding(decoder_input, mb.input_ids)
        rope = rope_freqs(mb.position_ids, self.shape.head_dim, self.shape.rope_theta)
        hidden = gpt.decoder(hidden_states=decoder_input, attention_mask=mb.segments,
                             rotary_pos_emb=rope.to(self.device))
        if not self.last:
            return hidden
        if self.config.sequence_parallel:  # backward: reduce-scatter of the rows' grads
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=True)
        rows = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])[mb.rows_index]
        if not self.config.sequence_parallel:  # backward: all-reduce (of a contiguous grad)
            rows = tensor_parallel.copy_to_tensor_model_parallel_region(rows)
        weight = (gpt.shared_embedding_or_output_weight() if self.shape.tie_word_embeddings
                  else gpt.output_layer.weight)
        lp, ent = vocab_parallel_token_logprobs(
            rows, weight, mb.targets, vocab_start=self.tp_rank * weight.shape[0],
            vocab_size=self.shape.vocab_size, chunk=self.cfg.logits_chunk,
            temperature=mb.temperature, group=ps.get_tensor_model_parallel_group())
        if mb.slots is not None:  # context parallel: every rank gets all N targets'
            group = ps.get_context_parallel_group()
            lp = _SumCP.apply(lp.new_zeros(mb.n_targets).index_copy(0, mb.slots, lp), group)
            ent = ent.new_zeros(mb.n_targets).index_copy(0, mb.slots, ent)
            dist.all_reduce(ent, group=group)
        mb.entropy = ent.detach()
        return lp

    def _no_grad_at_padding(self, embedded: Tensor, input_ids: Tensor) -> Tensor:
        """`embedded` ([s, b, h], or this rank's chunk of s under sequence parallel) with
        the lookups of `padding_idx` detached: the same values, and as in HF that row's
        gradient comes from the output layer alone (where tied)."""
        pad = (input_ids == self.padding_idx).t().contiguous()
        if embedded.shape[0] != pad.shape[0]:  # sequence parallel: this TP rank's chunk
            n = embedded.shape[0]
            pad = pad[self.tp_rank * n:(self.tp_rank + 1) * n]
        return torch.where(pad.unsqueeze(-1), embedded.detach(), embedded)

    def _micro_batches(self, batches: list[PackedBatch], temperature: float
                       ) -> list[tuple[int, _Micro]]:
        """This DP rank's share of the micro-batches, with their indices; a rank left
        without one gets an empty stand-in (index -1) so that collectives still match."""
        def micro(pb: PackedBatch) -> _Micro:
            if self.cp > 1:
                return _cp_micro(pb, self.cp, self.cp_rank, self.tp,
                                 self.config.sequence_parallel, self.device)
            return _micro(pb, self.tp, self.device)

        mine = [(i, micro(pb)) for i, pb in enumerate(batches) if i % self.dp == self.dp_rank]
        if not mine:
            m = micro(batches[0])
            m.rows_index, m.targets, m.batch = m.rows_index[:0], m.targets[:0], None
            if m.slots is not None:
                m.slots = m.slots[:0]
            mine = [(-1, m)]
        for _, m in mine:
            m.temperature = temperature
        return mine

    def _run(self, micros: list[tuple[int, _Micro]], loss_fn: LossFn | None,
             forward_only: bool) -> dict[int, dict]:
        """Megatron's schedule over `micros`; per micro-batch index (on the last stage):
        logprobs, entropies and loss metrics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        results: dict[int, dict] = {}

        def forward_step(data_iterator, model):
            i, mb = next(data_iterator)
            out = self._stage_forward(mb)

            def loss_func(lp):
                res = results.setdefault(i, {})
                res["logprobs"], res["entropy"] = lp.detach(), mb.entropy
                if loss_fn is None or mb.batch is None:
                    loss, metrics = lp.sum() * 0.0, {}
                else:
                    loss, metrics = loss_fn(lp, mb.batch)
                res["metrics"] = metrics
                return loss, torch.tensor(1, dtype=torch.int), {}

            return out, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micros), model=[self._ddp],
            num_microbatches=len(micros), seq_length=micros[0][1].input_ids.shape[1],
            micro_batch_size=micros[0][1].input_ids.shape[0], forward_only=forward_only)
        return {i: r for i, r in results.items() if i >= 0}

    def _gather(self, results: dict[int, dict]) -> dict[int, dict]:
        """Every rank gets the last stage's results of every DP rank."""
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {i: {k: (v.cpu() if isinstance(v, Tensor) else v)
                                              for k, v in r.items()}
                                          for i, r in results.items()})
        merged: dict[int, dict] = {}
        for part in everyone:
            merged.update(part)
        return merged

    @torch.no_grad()
    def logprobs(self, batch: PackedBatch, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Per-target-token logprobs and entropies, without grad (on every rank)."""
        self._ddp.eval()
        res = self._gather(self._run(self._micro_batches([batch], temperature), None, True))
        return res[0]["logprobs"], res[0]["entropy"]

    def forward_backward(self, micro_batches: list[PackedBatch], loss_fn: LossFn,
                         temperature: float = 1.0) -> dict[str, float]:
        """Gradients of the summed micro-batch losses in the model's grad buffers (summed
        over DP ranks), no optimizer step; the metrics of train_step but grad_norm."""
        self._ddp.train()
        self._ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        res = self._gather(self._run(self._micro_batches(micro_batches, temperature), loss_fn,
                                     False))
        metrics: dict[str, float] = {}
        ent_sum, ent_count = 0.0, 0
        for i in range(len(micro_batches)):  # as the hf backend combines them
            ent = res[i]["entropy"]
            ent_sum, ent_count = ent_sum + float(ent.sum()), ent_count + ent.numel()
            for k, v in res[i]["metrics"].items():
                w = 1.0 if k.startswith("loss/") else 1.0 / len(micro_batches)
                metrics[k] = metrics.get(k, 0.0) + w * v
        metrics["entropy"] = ent_sum / max(ent_count, 1)
        return metrics

    def logprobs_many(self, batches: list[PackedBatch], temperature: float = 1.0
                      ) -> list[tuple[Tensor, Tensor]]:
        """`logprobs` of each batch (collective, as logprobs)."""
        return [self.logprobs(b, temperature) for b in batches]

    def train_step(self, micro_batches: list[PackedBatch], loss_fn: LossFn,
                   temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step over micro-batches (gradient accumulation), clipped to
        algo.grad_clip; `loss_fn` returns each micro-batch's contribution to the loss."""
        metrics = self.forward_backward(micro_batches, loss_fn, temperature)
        ok, norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("megatron optimizer step skipped (inf/nan gradients)")
        metrics["grad_norm"] = float(norm)
        return metrics

    # -- weights -----------------------------------------------------------------------
    def _bucket_prefixes(self, stage: int) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """The export buckets of PP stage `stage`, in order: (Megatron name prefixes, HF
        name prefixes) of its embedding, each of its layers, its final norm and output."""
        out = [(("embedding.",), ("model.embed_tokens.",))] if stage == 0 else []
        out += [((f"decoder.layers.{local}.",), (f"model.layers.{i}.",))
                for local, i in enumerate(mc.stage_layers(self.shape, stage, self.pp))]
        if stage == self.pp - 1:
            out.append((("decoder.final_layernorm.", "output_layer."),
                        ("model.norm.", "lm_head.")))
        return out

    def _hf_buckets(self, local: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        """HF-named full tensors from this rank's Megatron tensors, one bucket (the
        embedding, a layer, the final norm and output layer) at a time, on every rank:
        each bucket is gathered over TP on its stage, converted, and broadcast over PP, so
        no rank holds more than one bucket besides its own shards (collective: every rank
        must consume every bucket)."""
        from megatron.core import parallel_state as ps

        tp_group = ps.get_tensor_model_parallel_group()
        pp_group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(pp_group)
        dtype = next(iter(local.values())).dtype
        for stage in range(self.pp):
            shapes = mc.hf_shapes(self.shape, stage, self.pp)
            for meg, hf in self._bucket_prefixes(stage):
                mine: dict[str, Tensor] = {}
                if stage == self.pp_rank:
                    shards: list[dict[str, Tensor]] = [{} for _ in range(self.tp)]
                    for name, t in local.items():
                        if name.startswith(meg):
                            parts = [torch.empty_like(t) for _ in range(self.tp)]
                            dist.all_gather(parts, t.contiguous(), group=tp_group)
                            for r in range(self.tp):
                                shards[r][name] = parts[r]
                    mine = mc.megatron_to_hf(mc.tp_merge(shards), self.shape, stage, self.pp)
                    del shards
                bucket = {}
                for name in (n for n in shapes if n.startswith(hf)):
                    t = mine[name] if stage == self.pp_rank else torch.empty(
                        shapes[name], dtype=dtype, device=self.device)
                    if self.pp > 1:
                        dist.broadcast(t, src=ranks[stage], group=pp_group)
                    bucket[name] = t
                yield bucket

    @torch.no_grad()
    def export_weights(self) -> Iterator[tuple[str, Tensor]]:
        """Full tensors under their Hugging Face names: the HF model's (`model`) own,
        refreshed bucket by bucket (see _hf_buckets), so the largest extra tensor memory is
        one layer's, not a copy of the model. Collective: every rank calls it, and it is
        done before it returns. The tensors are overwritten by the next export: copy them
        to keep them. `export_peak_bytes`: the largest bucket of this export."""
        local = {k: v for k, v in self.gpt.state_dict().items() if "_extra_state" not in k}
        params = self.hf_model.state_dict()
        names: list[str] = []
        self.export_peak_bytes = 0
        for bucket in self._hf_buckets(local):
            self.export_peak_bytes = max(self.export_peak_bytes, sum(
                t.numel() * t.element_size() for t in bucket.values()))
            for name, t in bucket.items():
                if name not in params:
                    raise RuntimeError(f"export: {name} is not a tensor of the HF model")
                params[name].copy_(t)
                names.append(name)
        missing = set(params) - set(names) - ({"lm_head.weight"}  # tied: the embedding
                                               if self.shape.tie_word_embeddings else set())
        if missing:
            raise RuntimeError(f"export: the HF model's {sorted(missing)} were not exported")
        return iter([(name, params[name]) for name in names])

    def grads_hf(self) -> dict[str, Tensor]:
        """HF-named full gradients of the last forward_backward (collective). With the
        distributed optimizer and DP > 1 each rank's grad buffer holds only its shard."""
        local = {}
        for name, p in self.gpt.named_parameters():
            local[name] = p.main_grad.to(p.dtype)
        return {k: v.cpu() for bucket in self._hf_buckets(local) for k, v in bucket.items()}

    @property
    def model(self):
        return self.hf_model

    def model_state(self) -> dict:
        """A copy of this rank's weights, for load_model_state."""
        return {k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in self.gpt.state_dict().items()}

    def load_model_state(self, state: dict) -> None:
        """Weights from model_state() (same layout), the optimizer's own copies included."""
        self.gpt.load_state_dict(state)
        for opt in self._inner_optimizers():
            if hasattr(opt, "reload_model_params"):
                opt.reload_model_params()

    # -- checkpoints -------------------------------------------------------------------
    def _inner_optimizers(self) -> list:
        return [o.optimizer for o in getattr(self.optimizer, "chained_optimizers",
                                             [self.optimizer])]

    def _materialise_adam_state(self) -> None:
        """Zero Adam moments and step for parameters without state (a fresh or reset
        optimizer; the same as none for Adam): megatron's checkpoint format with torch's
        Adam reads a step from every parameter's state."""
        for opt in self._inner_optimizers():
            for group in opt.param_groups:
                for p in group["params"]:
                    if not opt.state[p]:
                        opt.state[p].update(exp_avg=torch.zeros_like(p), step=torch.zeros(()),
                                            exp_avg_sq=torch.zeros_like(p))

    def _sharded(self, is_loading: bool = False) -> dict:
        self._materialise_adam_state()
        model_sd = self.gpt.sharded_state_dict()
        return {"model": model_sd, "optimizer": self.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})}

    def save_sharded(self, path: str | Path) -> None:
        """Model and optimizer through megatron's distributed checkpointing (collective;
        every rank writes its shards into the directory `path`, which must not exist)."""
        from megatron.core import dist_checkpointing

        path = Path(path)
        if dist.get_rank() == 0:
            path.mkdir(parents=True)
        dist.barrier()
        dist_checkpointing.save(self._sharded(), str(path))
        dist.barrier()

    def load_sharded(self, path: str | Path) -> None:
        """Load a save_sharded directory, whatever TP/PP/DP layout wrote it."""
        from megatron.core import dist_checkpointing

        if not Path(path).is_dir():
            raise FileNotFoundError(f"resume: policy checkpoint directory {path} not found")
        template = self._sharded(is_loading=True)
        for opt in self._inner_optimizers():  # megatron allocates the state it loads
            opt.state.clear()
        state = dist_checkpointing.load(template, str(path))
        self.gpt.load_state_dict(state["model"])
        self._load_optimizer(state["optimizer"])

    def _load_optimizer(self, state: dict) -> None:
        """optimizer.load_state_dict, in two steps for the distributed optimizer: the common
        part (it gives every parameter's state torch Adam's `step`), then the parameter
        state, which has no `step` and which megatron copies key by key into that state;
        each parameter then gets a `step` tensor of its own."""
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt, sd in zip(opts, [state] if len(opts) == 1 else [state[i] for i in
                                                                  range(len(opts))],
                           strict=True):
            param_state = sd.pop("param_state", None)
            kind = sd.pop("param_state_sharding_type", None)
            opt.load_state_dict(sd)
            if param_state is not None:
                inner = opt.optimizer.state
                steps = {p: st.pop("step") for p, st in inner.items() if "step" in st}
                getattr(opt, f"load_parameter_state_from_{kind}")(param_state)
                for p, step in steps.items():  # megatron gives all one shared tensor, which
                    inner[p]["step"] = step.clone()  # torch's Adam would step once per param

    def state_dict(self) -> dict:
        raise NotImplementedError("the megatron backend checkpoints into a directory, through "
                                  "save_sharded (kimi_rl.distributed.save_checkpoint)")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(
            "the megatron backend loads its checkpoint directory through load_sharded "
            "(kimi_rl.distributed.load_policy); to evaluate a megatron run use "
            "`kimi-rl eval model=hf model.path=<run dir>/hf_model`")
