"""Layout helpers shared by the chunkwise forms.

The chunk forms see a sequence ``[B, H, L, D]`` as ``[G, N, C, D]`` (G = B*H sequences, N chunks of C
tokens). For a contiguous input whose length is a multiple of C in the compute dtype this is a free view;
otherwise the sequence is copied once and zero-padded at the end. Zero q, k, v (and beta) leave the state
unchanged and their outputs are dropped, so padding is exact. Chunk ``n`` of all sequences is the
strided batch ``x[:, n]``, which BLAS reads without a copy.
"""

from __future__ import annotations

import torch


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, H, L, *D]`` -> ``[B*H, N, C, *D]`` in ``dtype``, zero-padded to N*C tokens."""
    B, H, L = x.shape[:3]
    feat = x.shape[3:]
    N = -(-L // chunk_size)
    if L == N * chunk_size:
        return x.to(dtype).reshape(B * H, N, chunk_size, *feat)
    out = x.new_zeros((B * H, N * chunk_size, *feat), dtype=dtype)
    out[:, :L] = x.reshape(B * H, L, *feat)
    return out.view(B * H, N, chunk_size, *feat)


def from_chunks(x: torch.Tensor, shape: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_chunks`: ``[B*H, N, C, *D]`` -> contiguous ``[B, H, L, *D]`` in ``dtype``."""
    B, H, L = shape
    G, N, C = x.shape[:3]
    feat = x.shape[3:]
    x = x.reshape(G, N * C, *feat)
    if L != N * C:
        x = x[:, :L]
    return x.to(dtype).contiguous().view(B, H, L, *feat)


def mT(x: torch.Tensor) -> torch.Tensor:
    """Transpose of the last two dims (a view; BLAS reads it without a copy)."""
    return x.transpose(-1, -2)


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1.0, alpha: float = 1.0):
    """In place ``out = beta * out + alpha * a @ b`` over any number of batch dims, without temporaries.

    ``out`` must be contiguous; a and b are folded to 3-D (a view whenever their batch dims allow).
    """
    m, n = out.shape[-2:]
    a3, b3 = a.reshape(-1, m, a.shape[-1]), b.reshape(-1, b.shape[-2], n)
    out.view(-1, m, n).baddbmm_(a3, b3, beta=beta, alpha=alpha)
    return out
