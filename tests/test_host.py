"""Process settings of a run (kimi_rl/host.py)."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from kimi_rl import host


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt only")
def test_glibc_accepts_the_allocator_settings():
    # mallopt returns 0 when it refuses a setting
    assert host.tune_allocator() is True


def test_setup_sets_the_thread_count():
    before = torch.get_num_threads()
    try:
        host.setup(1)
        assert torch.get_num_threads() == 1
        host.setup(None)  # unset: left as it is
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 fma", False),
    ("fpu avx2 avx512f avx512bw", False),  # AVX-512 without its bfloat16 instructions
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_bf16 amx_tile", True),
])
def test_native_bfloat16_reads_the_cpu_flags(tmp_path, monkeypatch, flags, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    assert host.native_bfloat16(str(info)) is native
    assert host.native_bfloat16(str(tmp_path / "absent")) is False
