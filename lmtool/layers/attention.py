"""Causal softmax multi-head attention (the seed's attn_type 2), optionally over a segment memory.

Also the pieces shared with relative (Transformer-XL) attention: the attention mask over memory + current
tokens and the memory update.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def memory_attention_mask(
    qlen: int, mlen: int, *, window: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean `[qlen, mlen + qlen]` mask, True where query i may attend to key j.

    Keys are the `mlen` memory positions followed by the `qlen` current ones, so query i sits at key
    position `mlen + i` and attends to every key j <= mlen + i (causal). With `window` (Transformer-XL's
    same_length, window = mem_len) it attends only to the `window` keys ending at itself,
    mlen + i - window < j <= mlen + i, so every query sees the same number of keys once enough context exists.
    """
    q = torch.arange(qlen, device=device)[:, None] + mlen
    k = torch.arange(mlen + qlen, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask


def update_memory(memory: torch.Tensor | None, x: torch.Tensor, mem_len: int) -> torch.Tensor:
    """Transformer-XL's memory update: the last `mem_len` positions of cat(memory, x), detached.

    memory `[B, M, d_model]` or None, x `[B, L, d_model]` -> `[B, min(M + L, mem_len), d_model]`.
    """
    full = x if memory is None else torch.cat([memory.to(x.dtype), x], dim=1)
    return full[:, -mem_len:].detach()


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention through `scaled_dot_product_attention`.

    Token mixer interface shared by every attention layer: `forward(x [B, L, d_model], state, return_state)`
    returns `(y [B, L, d_model], new_state)`.
    y = dropout(W_o concat_h softmax(q_h k_h^T / sqrt(d_head)) v_h); residual and LayerNorm live in the block.

    Segment memory (`mem_len > 0`, Transformer-XL's recurrence with absolute positions): the state is the
    layer's input of the previous segments, `[B, M, d_model]` with M <= mem_len (None: no memory). Keys and
    values are computed from cat(memory, x) with the current weights; queries from x only. The new state is
    the last mem_len positions of cat(memory, x), detached (returned only when `return_state`). The model
    adds absolute positions offset by M, so that with enough memory a segment sees exactly what it would see
    in one long pass. With `mem_len = 0` the state is always None. `same_length` restricts each query to the
    mem_len keys ending at itself (needs mem_len > 0).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        dropout: float,
        dropatt: float,
        *,
        mem_len: int = 0,
        same_length: bool = False,
    ) -> None:
        super().__init__()
        if same_length and mem_len < 1:
            raise ValueError("same_length restricts attention to the last mem_len keys: it needs mem_len > 0")
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.mem_len, self.same_length = mem_len, same_length
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, d_head={self.d_head}, mem_len={self.mem_len}, same_length={self.same_length}"

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, _ = x.shape
        H, D = self.n_head, self.d_head
        memory = state if self.mem_len > 0 else None
        dropatt = self.dropatt if self.training else 0.0
        if memory is None and not self.same_length:
            q, k, v = self.qkv(x).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropatt)
        else:
            full = x if memory is None else torch.cat([memory.to(x.dtype), x], dim=1)
            w_q, w_kv = self.qkv.weight.split([H * D, 2 * H * D])
            q = F.linear(x, w_q).view(B, L, H, D).transpose(1, 2)
            k, v = F.linear(full, w_kv).view(B, full.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
            window = self.mem_len if self.same_length else None
            mask = memory_attention_mask(L, full.shape[1] - L, window=window, device=x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropatt)
        o = o.transpose(1, 2).reshape(B, L, H * D)
        y = self.drop(self.out(o))
        if not (return_state and self.mem_len > 0):
            return y, None
        return y, update_memory(memory, x, self.mem_len)
