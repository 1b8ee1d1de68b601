"""Deeper feed-forward fast nets: Delta MLP and Delta-Delta Net (`model=delta_mlp`, `delta_delta`).

Irie, Schlag, Csordás & Schmidhuber (2021), arXiv 2106.06295 (docs/recurrent_fwp.md). Neither
fast net looks at its previous output, so every fast matrix is a delta-rule op over the whole segment: the
fast form is `lmtool.ops.delta_rule` (chunked) once per fast matrix; the reference is the step loop of the
equations. Both keep the base class and the state conventions of `lmtool.layers.recurrent_fwp`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.mixer import TokenMixer
from lmtool.layers.recurrent_fwp import (
    FastWeightProgrammer,
    RecurrentFWPConfig,
    State,
    delta_op,
    delta_write,
    elu_sum_norm,
    read,
)


@dataclass
class DeltaMLPConfig(RecurrentFWPConfig):
    """`model=delta_mlp`: the depth and width of the fast MLP."""

    fast_net_depth: int = 1  # residual fast MLP layers, two fast matrices each
    fast_net_inner: int = 0  # per-head hidden width of each layer; 0 = 4 d_head (the original's 4 d_model / n_head)


class DeltaMLP(FastWeightProgrammer):
    """Delta MLP (the original toolkit's attn_type 54), a `TokenMixer`: a residual MLP of fast matrices.

    Per head, F = `fast_net_inner` (default 4 d_head), phi = ELU+1 with sum normalisation:
        h^0_t = W_q x_t                                  (the fast net's input, no feature map)
        for each layer l = 1 .. `fast_net_depth`, with its own slow projections of x_t:
            k1, k2 = phi(W_k1 x), phi(W_k2 x);  v1 = W_v1 x [F];  v2 = W_v2 x [D]
            b1, b2 = sigmoid(w_b1 x), sigmoid(w_b2 x)
            A_t = delta update of A_{t-1} [D -> F] with (k1, v1, b1)
            B_t = delta update of B_{t-1} [F -> D] with (k2, v2, b2)
            h^l_t = h^{l-1}_t + B_t phi(A_t phi(LayerNorm_l(h^{l-1}_t)))
        out_t = h^depth_t                                (unscaled, as in the original)
    LayerNorm_l is over d_head, shared by the heads. State: `(A_1, B_1, ..., A_depth, B_depth)`,
    A_l `[B, H, D, F]`, B_l `[B, H, F, D]`.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, *, fast_net_depth: int = 1,
                 fast_net_inner: int = 0, eps: float = 1e-5) -> None:  # fmt: skip
        if fast_net_depth < 1 or fast_net_inner < 0:
            raise ValueError(
                f"DeltaMLP: fast_net_depth must be at least 1 and fast_net_inner at least 0 (0 = 4 d_head), got "
                f"{fast_net_depth} and {fast_net_inner}"
            )
        inner = fast_net_inner or 4 * d_head
        per_head = d_head + fast_net_depth * (2 * d_head + 2 * inner + 2)  # q, then k1 v1 b1 k2 v2 b2 per layer
        super().__init__("DeltaMLP", d_model, n_head, d_head, dropout, per_head, eps)
        self.depth, self.inner = fast_net_depth, inner
        self.norms = nn.ModuleList(nn.LayerNorm(d_head) for _ in range(fast_net_depth))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fast_net_depth={self.depth}, fast_net_inner={self.inner}"

    def state_shapes(self) -> list[tuple[int, ...]]:
        H, D, F_ = self.n_head, self.d_head, self.inner
        return [(H, D, F_), (H, F_, D)] * self.depth

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        D, F_ = self.d_head, self.inner
        q, *layers = self._project(x, dtype).split([D] + [D, F_, 1, F_, D, 1] * self.depth, dim=-1)
        per_layer = []
        for l in range(self.depth):
            k1, v1, b1, k2, v2, b2 = layers[6 * l : 6 * l + 6]
            per_layer.append((elu_sum_norm(k1, self.eps), v1, torch.sigmoid(b1).squeeze(-1),
                              elu_sum_norm(k2, self.eps), v2, torch.sigmoid(b2).squeeze(-1)))  # fmt: skip
        return q, per_layer

    def _norm(self, l: int, h: torch.Tensor) -> torch.Tensor:
        norm = self.norms[l]
        return F.layer_norm(h, norm.normalized_shape, norm.weight.to(h.dtype), norm.bias.to(h.dtype), norm.eps)

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, per_layer = inputs
        S = list(state)
        outs = []
        for t in range(q.shape[2]):
            h = q[:, :, t]
            for l, (k1, v1, b1, k2, v2, b2) in enumerate(per_layer):
                S[2 * l] = delta_write(S[2 * l], k1[:, :, t], v1[:, :, t], b1[:, :, t])
                S[2 * l + 1] = delta_write(S[2 * l + 1], k2[:, :, t], v2[:, :, t], b2[:, :, t])
                hidden = elu_sum_norm(read(S[2 * l], elu_sum_norm(self._norm(l, h), self.eps)), self.eps)
                h = h + read(S[2 * l + 1], hidden)
            outs.append(h)
        return torch.stack(outs, 2), tuple(S)

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        h, per_layer = inputs
        S = []
        for l, (k1, v1, b1, k2, v2, b2) in enumerate(per_layer):
            hidden, A = delta_op(elu_sum_norm(self._norm(l, h), self.eps), k1, v1, b1, state[2 * l])
            r, Bm = delta_op(elu_sum_norm(hidden, self.eps), k2, v2, b2, state[2 * l + 1])
            h = h + r
            S += [A, Bm]
        return h, tuple(S)


class DeltaDelta(FastWeightProgrammer):
    """Delta-Delta Net (the original toolkit's attn_type 64), a `TokenMixer`: a fast net that programs another.

    Per head, phi = ELU+1 with sum normalisation:
        q, k = phi(W_q x), phi(W_k x);  v = W_v x  [3 D + 1];  beta = sigmoid(w_b x)         (the slow net)
        A_t = delta update of A_{t-1} [D -> 3 D + 1] with (k, v, beta)
        [q', k', v', b'] = A_t q_t                                                              (the first fast net)
        B_t = delta update of B_{t-1} [D -> D] with (phi(k'), v', sigmoid(b'))
        out_t = B_t phi(q')                                                      (unscaled, as in the original)
    State: `(A [B, H, D, 3 D + 1], B [B, H, D, D])`.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, *, eps: float = 1e-5) -> None:
        super().__init__("DeltaDelta", d_model, n_head, d_head, dropout, 5 * d_head + 2, eps)

    def state_shapes(self) -> list[tuple[int, ...]]:
        H, D = self.n_head, self.d_head
        return [(H, D, 3 * D + 1), (H, D, D)]

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        D = self.d_head
        q, k, v, b = self._project(x, dtype).split([D, D, 3 * D + 1, 1], dim=-1)
        return elu_sum_norm(q, self.eps), elu_sum_norm(k, self.eps), v, torch.sigmoid(b).squeeze(-1)

    def _second(self, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The second fast net's query, key, value and beta from the first one's read-out `[..., 3 D + 1]`."""
        D = self.d_head
        q, k, v, b = r.split([D, D, D, 1], dim=-1)
        return elu_sum_norm(q, self.eps), elu_sum_norm(k, self.eps), v, torch.sigmoid(b).squeeze(-1)

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, b = inputs
        A, Bm = state
        outs = []
        for t in range(q.shape[2]):
            A = delta_write(A, k[:, :, t], v[:, :, t], b[:, :, t])
            q2, k2, v2, b2 = self._second(read(A, q[:, :, t]))
            Bm = delta_write(Bm, k2, v2, b2)
            outs.append(read(Bm, q2))
        return torch.stack(outs, 2), (A, Bm)

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, b = inputs
        r, A = delta_op(q, k, v, b, state[0])
        q2, k2, v2, b2 = self._second(r)
        o, Bm = delta_op(q2, k2, v2, b2, state[1])
        return o, (A, Bm)


def build_delta_mlp(cfg: Any) -> Callable[[int], TokenMixer]:
    """`layer index -> DeltaMLP` for `model=delta_mlp`."""
    m = cfg.model
    return lambda i: DeltaMLP(m.d_model, m.n_head, m.d_head, m.dropout, fast_net_depth=m.fast_net_depth,
                              fast_net_inner=m.fast_net_inner, eps=m.eps)  # fmt: skip
