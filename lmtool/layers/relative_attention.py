"""Relative positional attention with segment-level recurrence (Transformer-XL).

Dai et al. (2019), "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context", arXiv 1901.02860.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.attention import memory_attention_mask, update_memory
from lmtool.layers.dropout import Dropout
from lmtool.layers.mixer import ModelConfig, TokenMixer, check_layer_args


@dataclass
class TransformerXLConfig(ModelConfig):
    """`model=transformer_xl`: relative positions (no absolute ones) and a segment memory."""

    pos_emb: bool = False
    mem_len: int = 0  # memory length (an evaluation-time knob, like same_length and clamp_len)
    same_length: bool = False  # every query attends to the mem_len keys ending at itself (needs mem_len > 0)
    clamp_len: int = 0  # relative distances beyond clamp_len use clamp_len's encoding; 0 = off
    untie_r: bool = False  # a content/position bias pair per layer (default: one pair shared by all layers)


def relative_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL's efficient shift of position scores from distance-major to key-major order.

    x `[..., L, K]` holds, for query i, the score against the relative distance `K - 1 - c` in column c
    (distances K-1 .. 0, the order of the encodings). Query i sits at key position `K - L + i`, so key j is at
    distance `K - L + i - j`. Returns `[..., L, K]` with out[..., i, j] = x[..., i, j + L - 1 - i] for every
    j <= K - L + i (the causal keys); the entries above that diagonal are meaningless and must be masked.
    One zero column, one reshape: no gather.
    """
    *lead, L, K = x.shape
    padded = F.pad(x, (1, 0))  # [..., L, K + 1], a zero column in front of every row
    return padded.view(*lead, K + 1, L)[..., 1:, :].reshape(*lead, L, K)


def sinusoid(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`[N] -> [N, d_model]` sinusoidal encodings, sin on the first half and cos on the second."""
    angles = positions[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class RelativeBiases(nn.Module):
    """The two learned global biases of Transformer-XL, each `[n_head, d_head]`.

    `content` (u, the reference code's r_w_bias) is added to the queries for the content term,
    `position` (v, r_r_bias) for the position term. One instance is shared by all layers unless untie_r.
    """

    def __init__(self, n_head: int, d_head: int) -> None:
        super().__init__()
        self.content = nn.Parameter(torch.zeros(n_head, d_head))
        self.position = nn.Parameter(torch.zeros(n_head, d_head))

    def init_parameters(self, init_std: float, proj_init_std: float) -> None:
        nn.init.normal_(self.content, 0.0, init_std)
        nn.init.normal_(self.position, 0.0, init_std)


class RelativeAttention(TokenMixer):
    """Multi-head attention with relative positions and a segment memory (Transformer-XL; a `TokenMixer`).

    Per head, with keys and values over cat(memory, x) (length K)
    and queries over x:
        score(i, j) = (q_i + u) . k_j  +  (q_i + v) . W_r R_{d(i, j)}        d(i, j) = M + i - j
        y = dropout(W_o concat_h softmax(score / sqrt(d_head) + causal mask) v)
    R_d is the sinusoidal encoding of the distance d (clamped to `clamp_len` when clamp_len > 0), W_r a learned
    projection (bias-free), u and v the `biases` (shared across layers when the same RelativeBiases is passed
    to every layer). Dropout is applied to R as in the reference code. The position term is computed for the K
    distances once and moved into place with `relative_shift`. No absolute positions are used.

    State: the segment memory, this layer's input of the previous segments `[B, M, d_model]`, M <= mem_len
    (None: empty). The new state is the last mem_len positions of cat(memory, x), detached, returned only when
    `return_state` and mem_len > 0. `same_length`: each query attends to the mem_len keys ending at itself.
    """

    relative_positions = True  # the model adds no absolute positions

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        dropout: float,
        dropatt: float,
        *,
        biases: RelativeBiases | None = None,
        mem_len: int = 0,
        same_length: bool = False,
        clamp_len: int = 0,
    ) -> None:
        super().__init__()
        check_layer_args(
            "RelativeAttention", sizes={"d_model": d_model, "n_head": n_head, "d_head": d_head},
            lengths={"mem_len": mem_len, "clamp_len": clamp_len},
            dropouts={"dropout": dropout, "dropatt": dropatt},
        )
        if same_length and mem_len < 1:
            raise ValueError("same_length restricts attention to the last mem_len keys: it needs mem_len > 0")
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.mem_len, self.same_length, self.clamp_len = mem_len, same_length, clamp_len
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.pos = nn.Linear(d_model, n_head * d_head, bias=False)  # W_r
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.biases = biases if biases is not None else RelativeBiases(n_head, d_head)
        self.drop = Dropout(dropout)
        inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"n_head={self.n_head}, d_head={self.d_head}, mem_len={self.mem_len}, "
            f"same_length={self.same_length}, clamp_len={self.clamp_len}"
        )

    def encodings(self, klen: int) -> torch.Tensor:
        """`[klen, d_model]` encodings of the distances klen-1 .. 0 (clamped to clamp_len if > 0)."""
        distances = torch.arange(klen - 1, -1, -1, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.clamp_len > 0:
            distances = distances.clamp(max=self.clamp_len)
        return sinusoid(distances, self.inv_freq)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, L, _ = x.shape
        H, D = self.n_head, self.d_head
        memory = state if self.mem_len > 0 else None
        full = x if memory is None else torch.cat([memory.to(x.dtype), x], dim=1)
        K = full.shape[1]
        w_q, w_kv = self.qkv.weight.split([H * D, 2 * H * D])
        q = F.linear(x, w_q).view(B, L, H, D)
        k, v = F.linear(full, w_kv).view(B, K, 2, H, D).permute(2, 0, 3, 1, 4)  # each [B, H, K, D]
        r = self.pos(self.drop(self.encodings(K).to(x.dtype))).view(K, H, D)
        u, v_bias = self.biases.content.to(q.dtype), self.biases.position.to(q.dtype)
        position = torch.einsum("bihd,jhd->bhij", q + v_bias, r.to(q.dtype))  # column c: distance K - 1 - c
        position = relative_shift(position) * D**-0.5  # column j: key j
        window = self.mem_len if self.same_length else None
        mask = memory_attention_mask(L, K - L, window=window, device=x.device)
        bias = position.masked_fill(~mask, float("-inf"))
        # the content term (q + u) . k / sqrt(D) is SDPA's own score; the position term enters as its mask
        query = (q + u).transpose(1, 2)
        dropatt = self.dropatt if self.training else 0.0
        o = F.scaled_dot_product_attention(query, k, v, attn_mask=bias.to(query.dtype), dropout_p=dropatt)
        o = o.transpose(1, 2).reshape(B, L, H * D)
        y = self.drop(self.out(o))
        if not (return_state and self.mem_len > 0):
            return y, None
        return y, update_memory(memory, x, self.mem_len)


def check_transformer_xl(cfg: Any) -> str | None:
    """Why `cfg` cannot build a Transformer-XL, or None."""
    if cfg.model.pos_emb:
        return "model=transformer_xl uses relative positions: set model.pos_emb=false"
    return None


def build_transformer_xl(cfg: Any) -> Callable[[int], TokenMixer]:
    """`layer index -> RelativeAttention` for `model=transformer_xl`; one bias pair shared unless untie_r."""
    m = cfg.model
    shared = None if m.untie_r else RelativeBiases(m.n_head, m.d_head)  # Transformer-XL's default

    def make(i: int) -> TokenMixer:
        return RelativeAttention(
            m.d_model, m.n_head, m.d_head, m.dropout, m.dropatt,
            biases=shared if shared is not None else RelativeBiases(m.n_head, m.d_head),
            mem_len=m.mem_len, same_length=m.same_length, clamp_len=m.clamp_len,
        )  # fmt: skip

    return make
