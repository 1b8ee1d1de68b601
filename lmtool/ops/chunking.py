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


def chunk_state(qc: torch.Tensor, Dv: int, s: torch.Tensor | None) -> torch.Tensor:
    """``s`` ``[B, H, Dk, Dv]`` (a state or its gradient) as ``[G, Dk, Dv]`` in the chunks' dtype, zeros if None.

    It may be ``s`` itself (a view): callers that update it in place clone it first.
    """
    G, Dk = qc.shape[0], qc.shape[-1]
    return qc.new_zeros(G, Dk, Dv) if s is None else s.reshape(G, Dk, Dv).to(qc.dtype)


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


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, from one sum (a pass over ``x`` without a mask tensor).

    A NaN or inf element makes the sum non-finite. A sum that overflows although every element is finite
    answers False too; callers only use the answer to choose their slower path that isolates non-finite
    tokens, which is exact for finite inputs as well.
    """
    return bool(torch.isfinite(x.sum()))


def tri_matmul(a: torch.Tensor, y: torch.Tensor, *, upper: bool = False, strict: bool = False) -> torch.Tensor:
    """``a @ y`` over the token dimension for a triangular ``a`` without letting ``y``'s non-finite rows leak.

    ``a`` is ``[..., C, C]`` and zero (written, not multiplied) outside its lower triangle (``upper=False``)
    or upper triangle, diagonal included unless ``strict``; ``y`` is ``[..., C, D]``. A plain matmul
    multiplies those zeros by every row of ``y``, and ``0 * nan = nan`` would carry one non-finite token to
    rows that do not depend on it. Here the non-finite entries of ``y`` are multiplied as zeros, and then
    every entry that does depend on one (same column, a row inside the triangle) is set to NaN. Non-finite
    entries of ``a`` inside its triangle propagate through the product as usual.
    """
    bad = ~torch.isfinite(y)
    if not bad.any():
        return torch.matmul(a, y)
    out = torch.matmul(a, y.masked_fill(bad, 0))
    # reach[r, j]: some bad y[s, j] with s <= r (lower) or s >= r (upper), s != r when strict.
    reach = bad.flip(-2).cumsum(-2).flip(-2) if upper else bad.cumsum(-2)
    if strict:
        shifted = torch.zeros_like(reach)
        if upper:
            shifted[..., :-1, :] = reach[..., 1:, :]
        else:
            shifted[..., 1:, :] = reach[..., :-1, :]
        reach = shifted
    return out.masked_fill_(reach > 0, float("nan"))


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + a)^-1`` for a strictly lower triangular ``a`` ``[..., C, C]`` whose non-finite entries stay put.

    Entry ``(r, c)`` of the inverse depends exactly on the entries ``a[r', c']`` with ``c <= c' < r' <= r``.
    The triangular solve runs on ``a`` with its non-finite entries zeroed (a solver may multiply them by the
    zeros above the diagonal), and the entries that depend on one are set to NaN afterwards.
    """
    C = a.shape[-1]
    eye = torch.eye(C, dtype=a.dtype, device=a.device).expand_as(a)
    bad = ~torch.isfinite(a)
    if not bad.any():
        return torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
    x = torch.linalg.solve_triangular(a.masked_fill(bad, 0), eye, upper=False, unitriangular=True)
    # A bad a[r', c'] reaches every (r, c) with r >= r' and c <= c': a suffix count over columns, then a
    # prefix count over rows.
    reach = bad.flip(-1).cumsum(-1).flip(-1).cumsum(-2)
    return x.masked_fill_(reach > 0, float("nan"))
