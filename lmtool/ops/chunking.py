"""Layout helpers shared by the chunkwise forms.

The chunk forms work on a chunk-major layout ``[N, G, C, D]`` (N chunks, G = B*H sequences, C tokens per
chunk): every chunk slice ``x[n]`` is then a contiguous ``[G, C, D]`` batch for the sequential state pass,
and ``x.flatten(0, 1)`` batches all chunks at once for the parallel parts. A sequence whose length is not a
multiple of C is zero-padded at the end; zero q, k, v (and beta) leave the state unchanged, so padding is exact.
"""

from __future__ import annotations

import torch


def num_chunks(length: int, chunk_size: int) -> int:
    return -(-length // chunk_size)


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, L, *D]`` -> ``[N, B*H, C, *D]`` in ``dtype``, zero-padded to N*C tokens (one copy)."""
    B, H, L = x.shape[:3]
    feat = x.shape[3:]
    G, C = B * H, chunk_size
    N = num_chunks(L, C)
    full, rem = divmod(L, C)
    out = x.new_empty((N, G, C, *feat), dtype=dtype)
    src = x.reshape(G, L, *feat)
    if full:
        out[:full].transpose(0, 1).copy_(src[:, : full * C].reshape(G, full, C, *feat))
    if rem:
        out[full, :, :rem].copy_(src[:, full * C :])
        out[full, :, rem:].zero_()
    return out


def from_chunks(x: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: ``[N, B*H, C, *D]`` -> ``[B, H, L, *D]`` in ``dtype`` (one copy)."""
    B, H, L = shape
    _, G, C = x.shape[:3]
    feat = x.shape[3:]
    full, rem = divmod(L, C)
    out = x.new_empty((G, L, *feat), dtype=dtype)
    if full:
        out[:, : full * C].view(G, full, C, *feat).copy_(x[:full].transpose(0, 1))
    if rem:
        out[:, full * C :].copy_(x[full, :, :rem])
    return out.view(B, H, L, *feat)


def mT(x: torch.Tensor) -> torch.Tensor:
    """Transpose of the last two dims (a view; BLAS reads it without a copy)."""
    return x.transpose(-1, -2)
