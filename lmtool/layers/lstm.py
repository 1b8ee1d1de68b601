"""The LSTM baseline (`model=lstm`): one LSTM per block in place of the attention-like mixer.

The original toolkit's attn_type 90 (recurrent-fwp `LSTMLayer`), the baseline of Irie et al. (2021),
arXiv 2106.06295: a one-layer LSTM with d_model units, dropout, a bias-free output projection and dropout;
the block's residual, LayerNorm and feed-forward are the LM's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmtool.layers.dropout import Dropout
from lmtool.layers.mixer import ModelConfig, TokenMixer, check_layer_args


@dataclass
class LSTMConfig(ModelConfig):
    """`model=lstm`: sizes only (n_head and d_head are unused)."""


class LSTMMixer(TokenMixer):
    """`y = dropout(W_o dropout(LSTM(x)))`, a `TokenMixer` with state `(h [B, d_model], c [B, d_model])`.

    `forward` runs `nn.LSTM` (cuDNN / MKL fused); `forward_reference` is the step loop of the LSTM equations
    with the same weights (PyTorch's gate order i, f, g, o):
        [i, f, g, o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
        c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g);   h_t = sigmoid(o) tanh(c_t)
    """

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        check_layer_args("LSTMMixer", sizes={"d_model": d_model}, dropouts={"dropout": dropout})
        self.d_model = d_model
        self.lstm = nn.LSTM(d_model, d_model, batch_first=True)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.drop = Dropout(dropout)

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        zeros = torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)
        return zeros, zeros.clone()

    def _initial_state(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            return self.init_state(x.shape[0], device=x.device, dtype=x.dtype)
        h, c = state
        if h.shape != (x.shape[0], self.d_model) or c.shape != h.shape:
            raise ValueError(f"LSTMMixer: the carried state must be (h, c), each [B, {self.d_model}]")
        return h.to(x.dtype), c.to(x.dtype)

    def _output(self, h_all: torch.Tensor, state: tuple, return_state: bool) -> tuple[torch.Tensor, Any]:
        y = self.drop(self.out(self.drop(h_all)))
        if not return_state:
            return y, None
        # a bf16 autocast LSTM returns bf16 (h, c): carry them in float32 like the fast weights
        return y, tuple(s.to(torch.promote_types(s.dtype, torch.float32)) for s in state)

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> tuple[torch.Tensor, Any]:
        h0, c0 = self._initial_state(x, state)
        h_all, (h, c) = self.lstm(x, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        return self._output(h_all, (h[0], c[0]), return_state)

    def forward_reference(
        self, x: torch.Tensor, state: Any = None, return_state: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """The executable spec: the LSTM equations step by step with the weights of `self.lstm`."""
        h, c = self._initial_state(x, state)
        lstm = self.lstm
        outs = []
        for t in range(x.shape[1]):
            gates = x[:, t] @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return self._output(torch.stack(outs, 1), (h, c), return_state)


def build_lstm(cfg: Any) -> Callable[[int], TokenMixer]:
    """`layer index -> LSTMMixer` for `model=lstm`."""
    m = cfg.model
    return lambda i: LSTMMixer(m.d_model, m.dropout)


def check_lstm(cfg: Any) -> str | None:
    """Why `cfg.model` of `model=lstm` cannot be built, or None."""
    if cfg.model.carry_over and cfg.model.pos_emb:
        return (
            "model.carry_over=true needs model.pos_emb=false: absolute positions would grow without bound "
            "while the model was trained on short segments"
        )
    return None
