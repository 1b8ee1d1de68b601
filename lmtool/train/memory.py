"""Keep freed host memory in the process, so that a training step's large tensors reuse pages already mapped.

glibc's malloc serves every block above its mmap threshold (at most 32 MB, usually far less) with a fresh `mmap`
and returns it to the kernel on free. A CPU training step allocates and frees the same large tensors every step
(the `[tokens, vocabulary]` softmax buffer, 82 MB at the default size; activations of a few MB each), so each
step touches millions of fresh pages again, and every first touch is a page fault that zeroes the page. On a
2-core AMD EPYC VM (torch 2.13.0 CPU) an 82 MB `torch.empty(...).fill_(1)` took about 50 ms fresh and 4-9 ms in
pages already mapped (docs/training_speed.md). Raising the mmap and trim thresholds makes malloc serve those
blocks from its heap and keep them there after free: the process keeps its peak memory, which a training
process reaches every step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("lmtool")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h
THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap; up to 1 GiB of free heap top is kept


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to serve blocks below 1 GiB from its heap and not to return freed memory to the
    kernel. Returns whether it applied; elsewhere (not glibc: macOS, musl) it does nothing and returns False."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    if not applied:
        log.debug("mallopt refused the thresholds; freed memory goes back to the kernel as usual")
    return applied
