"""Causal softmax multi-head attention (the softmax Transformer), optionally over a segment memory.

Also the pieces shared with relative (Transformer-XL) attention: the attention mask over memory + current
tokens and the memory update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.dropout import Dropout
from lmtool.layers.mixer import ModelConfig, TokenMixer, check_layer_args


@dataclass
class TransformerConfig(ModelConfig):
    """`model=transformer`. The memory keys are evaluation-time knobs (not part of a checkpoint's identity)."""

    # segment memory: each layer attends to its input of the previous segments, the last mem_len positions,
    # detached; carried across training and evaluation segments, reset per epoch
    mem_len: int = 0
    same_length: bool = False  # every query attends to the mem_len keys ending at itself (needs mem_len > 0)


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


class SoftmaxAttention(TokenMixer):
    """Causal multi-head softmax attention through `scaled_dot_product_attention` (a `TokenMixer`).

    y = dropout(W_o concat_h softmax(q_h k_h^T / sqrt(d_head)) v_h); residual and LayerNorm live in the block.

    Key/value cache (`mem_len = 0`): the state is `(k, v)`, each `[B, H, T, d_head]`, the keys and values of
    the T tokens before this segment; the segment's queries attend to them and to its own causal keys, and
    the new state appends the segment's keys and values. `init_state` gives the empty cache. This state
    grows with the context, so training and evaluation never carry it (they pass None); generation does.

    Segment memory (`mem_len > 0`, Transformer-XL's recurrence with absolute positions): the state is the
    layer's input of the previous segments, `[B, M, d_model]` with M <= mem_len (None: no memory). Keys and
    values are computed from cat(memory, x) with the current weights; queries from x only. The new state is
    the last mem_len positions of cat(memory, x), detached (returned only when `return_state`). The model
    adds absolute positions offset by M, so that with enough memory a segment sees exactly what it would see
    in one long pass. `same_length` restricts each query to the mem_len keys ending at itself (needs
    mem_len > 0).
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
        check_layer_args(
            "SoftmaxAttention", sizes={"d_model": d_model, "n_head": n_head, "d_head": d_head},
            lengths={"mem_len": mem_len},
            dropouts={"dropout": dropout, "dropatt": dropatt},
        )
        if same_length and mem_len < 1:
            raise ValueError("same_length restricts attention to the last mem_len keys: it needs mem_len > 0")
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.mem_len, self.same_length = mem_len, same_length
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = Dropout(dropout)

    @property
    def state_grows(self) -> bool:
        return self.mem_len == 0  # a key/value cache

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, d_head={self.d_head}, mem_len={self.mem_len}, same_length={self.same_length}"

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> Any:
        if self.mem_len > 0:
            return None  # an empty memory
        empty = torch.zeros(batch_size, self.n_head, 0, self.d_head, device=device, dtype=dtype)
        return empty, empty.clone()

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> tuple[torch.Tensor, Any]:
        B, L, _ = x.shape
        H, D = self.n_head, self.d_head
        dropatt = self.dropatt if self.training else 0.0
        if self.mem_len > 0:
            full = x if state is None else torch.cat([state.to(x.dtype), x], dim=1)
            w_q, w_kv = self.qkv.weight.split([H * D, 2 * H * D])
            q = F.linear(x, w_q).view(B, L, H, D).transpose(1, 2)
            k, v = F.linear(full, w_kv).view(B, full.shape[1], 2, H, D).permute(2, 0, 3, 1, 4)
            new_state = update_memory(state, x, self.mem_len) if return_state else None
        else:
            q, k, v = self.qkv(x).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
            if state is not None:
                k, v = torch.cat([state[0].to(k.dtype), k], dim=2), torch.cat([state[1].to(v.dtype), v], dim=2)
            new_state = (k, v) if return_state else None
        n_past = k.shape[2] - L
        if n_past == 0 and not self.same_length:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropatt)
        else:
            window = self.mem_len if self.same_length else None
            mask = memory_attention_mask(L, n_past, window=window, device=x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropatt)
        o = o.transpose(1, 2).reshape(B, L, H * D)
        return self.drop(self.out(o)), new_state


def build_transformer(cfg: Any) -> Callable[[int], TokenMixer]:
    """`layer index -> SoftmaxAttention` for `model=transformer`."""
    m = cfg.model
    return lambda i: SoftmaxAttention(
        m.d_model, m.n_head, m.d_head, m.dropout, m.dropatt, mem_len=m.mem_len, same_length=m.same_length
    )
