"""Pieces of the modern delta-rule layers: a short causal convolution with a carried tail, and RMSNorm.

DeltaNet as trained at scale (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", arXiv 2406.06484) and its successors put a short depthwise causal convolution with SiLU on
the query, key and value projections, normalise each head's read-out with RMSNorm and gate it with
SiLU(W_g x). Gated DeltaNet (arXiv 2412.06464) adds a per-token decay of the fast weights (`DecayGate`).
`FastWeightAttention` composes these when `short_conv`, `head_norm`, `output_gate` and `decay` are set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Causal depthwise 1-D convolution over time, then SiLU: `[B, L, C] -> [B, L, C]`.

    y_t = silu(sum_{i=0}^{K-1} w_{c,i} x_{t-K+1+i}) per channel c, with x before the sequence taken from the
    carried `tail` (the last K - 1 inputs of the previous segment; zeros at the start), so that segments
    (and single decoded tokens) with the tail carried equal one pass. Returns (y, new tail `[B, K-1, C]`).
    """

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: kernel_size must be at least 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.init_parameters(0.0, 0.0)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.kernel_size}"

    def init_parameters(self, init_std: float, proj_init_std: float) -> None:
        # torch's Conv1d default (uniform in +-1/sqrt(fan_in)), whatever the LM's normal init is
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def empty_tail(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.kernel_size - 1, self.weight.shape[0], device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, C = x.shape
        if tail is None:
            tail = self.empty_tail(B, device=x.device, dtype=x.dtype)
        full = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, K - 1 + L, C]
        y = F.conv1d(full.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2)
        return F.silu(y), full[:, full.shape[1] - (self.kernel_size - 1) :]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Zhang & Sennrich 2019, arXiv 1910.07467)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class DecayGate(nn.Module):
    """Gated DeltaNet's per-token, per-head log-decay of the fast weights: `[B, L, d_model] -> g [B, H, L]`.

    g_t = -exp(A_log) * softplus(W_a x_t + dt_bias) <= 0, alpha_t = exp(g_t) in (0, 1] ("Gated Delta Networks:
    Improving Mamba2 with Delta Rule", Yang, Kautz & Hatamizadeh, ICLR 2025, arXiv 2412.06464; the Mamba-2
    parametrisation). Initialised as in that paper: A uniform in (0, 16], and softplus(dt_bias) = dt with dt
    log-uniform in [1e-3, 0.1] (floored at 1e-4), so that the initial decays span short and long memories.
    """

    A_RANGE = (0.0, 16.0)
    DT_RANGE = (1e-3, 0.1)
    DT_FLOOR = 1e-4

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, n_head, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_head))
        self.dt_bias = nn.Parameter(torch.empty(n_head))
        self.init_parameters(0.0, 0.0)

    def init_parameters(self, init_std: float, proj_init_std: float) -> None:
        with torch.no_grad():
            low, high = self.A_RANGE
            A = high - (high - low) * torch.rand_like(self.A_log)  # in (0, 16]: 1 - U[0, 1) is never 0
            self.A_log.copy_(A.log())
            log_low, log_high = math.log(self.DT_RANGE[0]), math.log(self.DT_RANGE[1])
            dt = torch.exp(log_low + (log_high - log_low) * torch.rand_like(self.dt_bias)).clamp_min(self.DT_FLOOR)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus at dt

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The log-decays `[B, H, L]` in `dtype` (float32 or wider: their sums within a chunk need the digits)."""
        gate = self.proj(x).to(dtype) + self.dt_bias.to(dtype)
        return (-self.A_log.to(dtype).exp() * F.softplus(gate)).transpose(1, 2)
