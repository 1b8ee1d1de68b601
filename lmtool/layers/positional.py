"""Sinusoidal absolute position embedding (Vaswani et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn


class SinusoidalPositions(nn.Module):
    """Returns `[L, d_model]` embeddings of positions `0..L-1` (sin on the first half, cos on the second)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + length, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        angles = pos[:, None] * self.inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)
