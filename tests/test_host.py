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
