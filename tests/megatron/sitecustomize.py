"""Test-only: run megatron-core on CPU (gloo) by redirecting its hard-coded CUDA calls.

megatron-core places tensors with device="cuda", seeds and forks the CUDA RNG, opens
CUDA streams and checks `tensor.type()` for torch.cuda.*Tensor names. This machine has
no GPU, so the tests put this directory on PYTHONPATH: Python imports this file at
start-up in every process (torchrun workers included) and

- torch.cuda's device, RNG, stream, event, memory and synchronisation calls become
  CPU no-ops or CPU equivalents;
- a TorchFunctionMode maps device="cuda" (and .cuda(), .to("cuda")) to the CPU;
- Tensor.type() reports CPU tensors under their torch.cuda.* names.

The product never imports it; with it, results are those of CPU float32 arithmetic.
Set KIMI_RL_NO_CPU_CUDA=1 to switch it off in a process.
"""

from __future__ import annotations

import contextlib
import os


def _install() -> None:
    import torch
    from torch.overrides import TorchFunctionMode

    cpu = torch.device("cpu")

    def is_cuda(d) -> bool:
        return (isinstance(d, torch.device) and d.type == "cuda") or (
            isinstance(d, str) and d.startswith("cuda"))

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            device = kwargs.get("device")
            if is_cuda(device) or (isinstance(device, int) and not isinstance(device, bool)):
                kwargs["device"] = cpu
            if func is torch.Tensor.to:
                args = tuple(cpu if is_cuda(a) else a for a in args)
            return func(*args, **kwargs)

    cuda = torch.cuda

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, *a, **k):
            pass

        def synchronize(self):
            pass

        def record_event(self, *a, **k):
            return Event()

    class Event:
        def __init__(self, *a, **k):
            pass

        def record(self, *a, **k):
            pass

        def synchronize(self):
            pass

        def wait(self, *a, **k):
            pass

        def elapsed_time(self, other):
            return 0.0

    def const(value):  # a new function per name (torch.compile's rules reject duplicates)
        return lambda *a, **k: value

    def seed(s, *a, **k):  # the "CUDA" generator is the CPU one
        torch.default_generator.manual_seed(int(s))

    def seed_all(s, *a, **k):  # torch.manual_seed calls it after seeding the CPU
        pass

    def set_state(state, *a, **k):
        torch.set_rng_state(state)

    fake = {
        "is_available": const(True), "device_count": const(1), "current_device": const(0),
        "set_device": const(None), "synchronize": const(None), "empty_cache": const(None),
        "manual_seed": seed, "manual_seed_all": seed_all,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(), "set_rng_state": set_state,
        "Stream": Stream, "Event": Event, "current_stream": lambda *a, **k: Stream(),
        "default_stream": lambda *a, **k: Stream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "device": lambda *a, **k: contextlib.nullcontext(),
        "memory_allocated": const(0), "max_memory_allocated": const(0),
        "reset_peak_memory_stats": const(None), "get_device_capability": const((9, 0)),
        "get_device_name": const("cpu (tests/megatron/sitecustomize.py)"),
        "is_initialized": const(True),
    }
    for name, value in fake.items():
        setattr(cuda, name, value)
    cuda.default_generators = (torch.default_generator,)
    cuda.random.get_rng_state = fake["get_rng_state"]
    cuda.random.set_rng_state = set_state
    cuda._lazy_call = lambda fn, **k: fn()

    type_names = {"torch.FloatTensor": "torch.cuda.FloatTensor",
                  "torch.HalfTensor": "torch.cuda.HalfTensor",
                  "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor"}
    tensor_type = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = tensor_type(self)
            return type_names.get(name, name)
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    torch.Tensor.cuda = lambda self, *a, **k: self
    CudaToCpu().__enter__()  # stays on for the life of the process

    # the autograd engine runs custom backward functions without the mode stack: re-enter it
    backward = torch.autograd.function.BackwardCFunction.apply

    def apply(self, *args):
        with CudaToCpu():
            return backward(self, *args)

    torch.autograd.function.BackwardCFunction.apply = apply


if os.environ.get("KIMI_RL_NO_CPU_CUDA") != "1":
    _install()
