"""Causal softmax multi-head attention (the seed's attn_type 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention through `scaled_dot_product_attention`.

    Token mixer interface shared by every attention layer: `forward(x [B, L, d_model], state, return_state)`
    returns `(y [B, L, d_model], new_state)`. Softmax attention carries no state, so it is always None.
    y = dropout(W_o concat_h softmax(q_h k_h^T / sqrt(d_head)) v_h); residual and LayerNorm live in the block.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float) -> None:
        super().__init__()
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, state: None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, None]:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropatt if self.training else 0.0
        )
        o = o.transpose(1, 2).reshape(B, L, self.n_head * self.d_head)
        return self.drop(self.out(o)), None
