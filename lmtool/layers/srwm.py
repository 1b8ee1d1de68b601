"""The modern self-referential weight matrix (`model=srwm`).

Irie, Schlag, Csordás & Schmidhuber (2022), "A Modern Self-Referential Weight Matrix That Learns to Modify
Itself", ICML 2022, arXiv 2202.05780 (docs/recurrent_fwp.md). One matrix per head produces its
output, its own query, key and learning rates, and modifies itself with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmtool.layers.mixer import ModelConfig, TokenMixer
from lmtool.layers.recurrent_fwp import FastWeightProgrammer, State, check_recurrent_fwp, read
from lmtool.ops import srwm_scan
from lmtool.ops.recurrent_scan import srwm_rate_index, srwm_split


@dataclass
class SRWMConfig(ModelConfig):
    """`model=srwm`: the initial mean of the learning-rate rows of the self-referential matrix."""

    beta_init: float = -1.0  # mean of W_0's beta rows: sigmoid(-1) = 0.27 initial learning rates


class SelfReferentialWeightMatrix(FastWeightProgrammer):
    """SRWM, a `TokenMixer`: per head one matrix W_t `[D -> 3 D + 4]` that reprograms itself.

    The input of head h is its slice x_t `[D]` of the block input (no slow projection; d_model = H D):
        [y_t, q_t, k_t, b_t] = W_{t-1} x_t                        (D, D, D and 4 rows)
        v_t = W_{t-1} softmax(q_t);   v_bar_t = W_{t-1} softmax(k_t)
        W_t = W_{t-1} + sigmoid(b_t) * (v_t - v_bar_t) softmax(k_t)^T
    where sigmoid(b_t) has one learning rate per block of rows (y, q, k, b). The output y_t (unscaled, as in
    the original) goes through the output projection. W_0 is a parameter `[H, D, 3 D + 4]` (stored transposed,
    lmtool.ops convention: read out as W^T x), initialised N(0, 1/sqrt(D)), with mean `beta_init` for the b rows.

    State: `(W_t - W_0,)`, `[B, H, D, 3 D + 4]`: the change from the initial matrix, as in the original, so
    that a carried state keeps following W_0 as it is trained.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, *, beta_init: float = -1.0) -> None:
        super().__init__("SelfReferentialWeightMatrix", d_model, n_head, d_head, dropout, 0)
        if d_model != n_head * d_head:
            raise ValueError(
                f"SelfReferentialWeightMatrix reads each head's slice of the input: d_model ({d_model}) must be "
                f"n_head * d_head ({n_head} * {d_head})"
            )
        self.beta_init = beta_init
        self.weight = nn.Parameter(torch.empty(n_head, d_head, 3 * d_head + 4))
        # the learning rate of each output row: blocks y, q, k (D rows each) and b (4 rows) use b_0 .. b_3
        self.register_buffer("rate_index", srwm_rate_index(d_head), persistent=False)
        self.init_parameters()

    def init_parameters(self, init_std: float = 0.0, proj_init_std: float = 0.0) -> None:
        """W_0 ~ N(0, 1/sqrt(d_head)), b rows N(beta_init, 1/sqrt(d_head)) (the original's initialisation)."""
        D = self.d_head
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(D))
        with torch.no_grad():
            self.weight[..., 3 * D :] += self.beta_init

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta_init={self.beta_init}"

    def state_shapes(self) -> list[tuple[int, ...]]:
        return [(self.n_head, self.d_head, 3 * self.d_head + 4)]

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        B, L, _ = x.shape
        return x.to(dtype).view(B, L, self.n_head, self.d_head).transpose(1, 2), self.weight.to(dtype)

    def _split(self, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return srwm_split(r, self.rate_index)

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        x, W0 = inputs
        W = W0 + state[0]
        outs = []
        for t in range(x.shape[2]):
            y, q, k, rate = self._split(read(W, x[:, :, t]))
            v, v_bar = read(W, q), read(W, k)
            W = W + k.unsqueeze(-1) * (rate * (v - v_bar)).unsqueeze(-2)
            outs.append(y)
        return torch.stack(outs, 2), (W - W0,)

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        x, W0 = inputs
        y, (W,) = srwm_scan(x, initial_state=(W0 + state[0],), output_final_state=True)
        return y, (W - W0,)


def build_srwm(cfg: Any) -> Callable[[int], TokenMixer]:
    """`layer index -> SelfReferentialWeightMatrix` for `model=srwm`."""
    m = cfg.model
    return lambda i: SelfReferentialWeightMatrix(m.d_model, m.n_head, m.d_head, m.dropout, beta_init=m.beta_init)


def check_srwm(cfg: Any) -> str | None:
    """Why `cfg.model` of `model=srwm` cannot be built, or None."""
    m = cfg.model
    if m.d_model != m.n_head * m.d_head:
        return (
            f"model=srwm reads each head's slice of the block input: set model.d_model ({m.d_model}) = "
            f"model.n_head * model.d_head ({m.n_head} * {m.d_head})"
        )
    return check_recurrent_fwp(cfg)
