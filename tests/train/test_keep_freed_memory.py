"""keep_freed_memory sets glibc's malloc thresholds where glibc is the C library, and is harmless elsewhere."""

from __future__ import annotations

import platform

import torch

from lmtool.train.memory import keep_freed_memory


def test_applies_under_glibc_and_tensors_still_work():
    """On Linux with glibc the thresholds are accepted (True); elsewhere it returns False without raising. Large
    tensors allocated and freed afterwards keep their values."""
    applied = keep_freed_memory()
    assert applied == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    for _ in range(3):
        x = torch.full((1024, 4096), 2.0)
        assert x.sum().item() == 2.0 * 1024 * 4096
        del x
