"""Recurrent fast weight programmers: Delta RNN, Delta LSTM and the Recurrent Delta Net (`model=delta_rnn`,
`delta_lstm`, `rec_delta`), and the base class shared with the deeper fast nets and the SRWM.

Irie, Schlag, Csordás & Schmidhuber (2021), "Going Beyond Linear Transformers with Recurrent Fast Weight
Programmers", NeurIPS 2021, arXiv 2106.06295 (docs/recurrent_fwp.md has the equations, the
options and what differs from the paper's code). Per head, a slow projection of the block input x_t gives
the fast nets' inputs; every fast matrix is written with the delta rule
    S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T,   read out as S_t^T q_t
(lmtool.ops convention: S is `[d_key, d_value]`, the paper's W_t is S_t^T).

Each layer has two forms of the same computation: `forward_reference`, a step loop written from the
equations (the executable spec), and `forward`, the fast form used in training: one matmul for every slow
projection of the segment, the feed-forward fast matrices through the chunked `lmtool.ops.delta_rule`, and
what depends on the previous output through the scan ops of `lmtool.ops.recurrent_scan` (`delta_rnn_scan`,
`delta_lstm_scan`, `rec_delta_scan`: a fused torch step per token, or one CUDA kernel for the whole scan on a
GPU, picked by impl="auto"). Tests check that both forms agree in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtool.layers.dropout import Dropout
from lmtool.layers.fast_weight import normalize_features
from lmtool.layers.mixer import ModelConfig, TokenMixer, check_layer_args
from lmtool.ops import delta_lstm_scan, delta_rnn_scan, delta_rule, rec_delta_scan
from lmtool.ops.recurrent_scan import rec_delta_inputs

State = tuple[torch.Tensor, ...]


@dataclass
class RecurrentFWPConfig(ModelConfig):
    """`model=delta_rnn | delta_lstm | rec_delta | delta_delta`: the Delta Network's sizes plus `eps`."""

    eps: float = 1e-5  # floor of the sum-normalisation denominator of ELU+1 keys and queries


def elu_sum_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """phi(x) = (elu(x) + 1) / sum(elu(x) + 1) over the last axis (the Delta Network's keys and queries)."""
    return normalize_features(F.elu(x) + 1.0, "sum", eps)


def delta_write(S: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """One delta-rule step on `S [..., Dk, Dv]` with k `[..., Dk]`, v `[..., Dv]`, beta `[...]` (reference form)."""
    v_old = torch.einsum("...kv,...k->...v", S, k)
    return S + k.unsqueeze(-1) * (beta.unsqueeze(-1) * (v - v_old)).unsqueeze(-2)


def read(S: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """S^T q for `S [..., Dk, Dv]`, q `[..., Dk]` (reference form)."""
    return torch.einsum("...kv,...k->...v", S, q)


class FastWeightProgrammer(TokenMixer):
    """Base of the fast weight programmers of this family: slow projection -> fast nets -> output projection.

    `forward(x [B, L, d_model], state, return_state)` runs the fast form, `forward_reference` the step loop;
    both share the projections and return `(y [B, L, d_model], state or None)`. Subclasses give the per-head
    width of the slow projection (`per_head`), the state's shapes (`state_shapes`), how the projection splits
    into the fast nets' inputs (`_inputs`) and the two forms of the recurrence (`_reference`, `_fast`), which
    map `(inputs, state)` to the per-head read-out `[B, H, L, d_head]` and the new state. The read-out is
    scaled by `out_scale`, concatenated over heads, projected back to d_model and dropped out.

    The state holds every fast matrix (and the recurrent output and cell where there is one), float32
    (float64 for float64 inputs); `state=None` is all zeros. The fast-weight math runs in float32 even under
    bf16/fp16 autocast.
    """

    out_scale: float = 1.0

    def __init__(self, name: str, d_model: int, n_head: int, d_head: int, dropout: float, per_head: int,
                 eps: float = 1e-5) -> None:  # fmt: skip
        super().__init__()
        check_layer_args(name, sizes={"d_model": d_model, "n_head": n_head, "d_head": d_head},
                         dropouts={"dropout": dropout})  # fmt: skip
        if eps <= 0:
            raise ValueError(f"{name}: eps must be positive (it floors the sum normalisation), got {eps}")
        self.n_head, self.d_head, self.eps = n_head, d_head, eps
        self.slow = nn.Linear(d_model, n_head * per_head, bias=False) if per_head > 0 else None
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.drop = Dropout(dropout)

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, d_head={self.d_head}"

    def state_shapes(self) -> list[tuple[int, ...]]:  # pragma: no cover - every subclass defines it
        """The shape of each state entry without the batch dimension."""
        raise NotImplementedError

    def init_state(self, batch_size: int, *, device: torch.device, dtype: torch.dtype) -> State:
        dtype = torch.promote_types(dtype, torch.float32)
        return tuple(torch.zeros(batch_size, *shape, device=device, dtype=dtype) for shape in self.state_shapes())

    def _initial_state(self, state: Any, B: int, dtype: torch.dtype, device: torch.device) -> State:
        if state is None:
            return self.init_state(B, device=device, dtype=dtype)
        shapes = self.state_shapes()
        got = [tuple(s.shape[1:]) for s in state]
        if got != [tuple(shape) for shape in shapes]:
            raise ValueError(
                f"{type(self).__name__}: the carried state has shapes {[tuple(s.shape) for s in state]}, expected "
                f"[B, *shape] for {shapes}; pass a state produced by a layer with the same sizes"
            )
        return tuple(s.to(dtype) for s in state)

    def _project(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The slow projection of the whole segment in one matmul, per head: `[B, H, L, per_head]`."""
        B, L, _ = x.shape
        return self.slow(x).to(dtype).view(B, L, self.n_head, -1).transpose(1, 2)

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:  # pragma: no cover
        raise NotImplementedError

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:  # pragma: no cover
        raise NotImplementedError

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor, state: Any = None, return_state: bool = False) -> tuple[torch.Tensor, Any]:
        return self._run(x, state, return_state, self._fast)

    def forward_reference(
        self, x: torch.Tensor, state: Any = None, return_state: bool = False
    ) -> tuple[torch.Tensor, Any]:
        """The executable spec: the same layer with the step loop written from the paper's equations."""
        return self._run(x, state, return_state, self._reference)

    def _run(self, x: torch.Tensor, state: Any, return_state: bool, recurrence: Callable) -> tuple[torch.Tensor, Any]:
        B, L, _ = x.shape
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            inputs = self._inputs(x, dtype)
            o, new_state = recurrence(inputs, self._initial_state(state, B, dtype, x.device))
        o = (o * self.out_scale).transpose(1, 2).reshape(B, L, self.n_head * self.d_head).to(x.dtype)
        y = self.drop(self.out(o))
        return y, (new_state if return_state else None)


def delta_op(q, k, v, beta, S0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`lmtool.ops.delta_rule` with its final state; one token runs the recurrent step (no chunk set-up)."""
    impl = "recurrent" if q.shape[2] == 1 else "auto"
    return delta_rule(q, k, v, beta, initial_state=S0, output_final_state=True, impl=impl)


class DeltaRNN(FastWeightProgrammer):
    """Delta RNN (the paper's Table 2 row; the original toolkit's attn_type 134), a `TokenMixer`.

    Per head, from one slow projection of x_t:
        q, k = phi(W_q x), phi(W_k x)   (phi: ELU+1, sum-normalised);  v = W_v x;  beta = sigmoid(w_b x)
        k_r = softmax(W_kr x);  v_r = W_vr x;  beta_r = sigmoid(w_br x)
        W_t = delta update of W_{t-1} with (k, v, beta);     R_t = delta update of R_{t-1} with (k_r, v_r, beta_r)
        y_t = W_t q_t + R_t softmax(y_{t-1})
        out_t = y_t / sqrt(d_head)
    State: `(W [B, H, D, D], R [B, H, D, D], y [B, H, D])` (y unscaled, as the recurrence uses it).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, *, eps: float = 1e-5) -> None:
        super().__init__("DeltaRNN", d_model, n_head, d_head, dropout, 5 * d_head + 2, eps)
        self.out_scale = d_head**-0.5

    def state_shapes(self) -> list[tuple[int, ...]]:
        H, D = self.n_head, self.d_head
        return [(H, D, D), (H, D, D), (H, D)]

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        D = self.d_head
        q, k, v, kr, vr, b, br = self._project(x, dtype).split([D] * 5 + [1, 1], dim=-1)
        return (elu_sum_norm(q, self.eps), elu_sum_norm(k, self.eps), v, torch.sigmoid(b).squeeze(-1),
                torch.softmax(kr, -1), vr, torch.sigmoid(br).squeeze(-1))  # fmt: skip

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, b, kr, vr, br = inputs
        W, R, y = state
        outs = []
        for t in range(q.shape[2]):
            W = delta_write(W, k[:, :, t], v[:, :, t], b[:, :, t])
            R = delta_write(R, kr[:, :, t], vr[:, :, t], br[:, :, t])
            y = read(W, q[:, :, t]) + read(R, torch.softmax(y, -1))
            outs.append(y)
        return torch.stack(outs, 2), (W, R, y)

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, b, kr, vr, br = inputs
        W, R, y = state
        z, W = delta_op(q, k, v, b, W)  # the feed-forward part W_t q_t, chunked
        out, (R, y) = delta_rnn_scan(z, kr, vr, br, initial_state=(R, y), output_final_state=True)
        return out, (W, R, y)


class DeltaLSTM(FastWeightProgrammer):
    """Delta LSTM (the paper's Table 2 row; the original toolkit's attn_type 254), a `TokenMixer`.

    Three gates g in (i, u, o), each with a feed-forward fast matrix W^g and a recurrent one R^g, per head:
        q^g, k^g = phi(W_q^g x), phi(W_k^g x);  v^g = W_v^g x;  beta^g = sigmoid(w_b^g x)      (phi: ELU+1, sum-norm)
        k_r^g = softmax(W_kr^g x);  v_r^g = W_vr^g x;  beta_r^g = sigmoid(w_br^g x)
        W^g_t, R^g_t = delta updates with (k^g, v^g, beta^g), (k_r^g, v_r^g, beta_r^g)
        a^g_t = W^g_t q^g_t + R^g_t softmax(y_{t-1})
        i_t = sigmoid(a^i_t);  u_t = a^u_t;  o_t = sigmoid(a^o_t)       (no squashing of the update: attn_type 254)
        c_t = i_t * u_t + (1 - i_t) * c_{t-1};   y_t = o_t * c_t;   out_t = y_t / sqrt(d_head)
    State: `(W [B, 3 H, D, D], R [B, 3 H, D, D], y [B, H, D], c [B, H, D])`, the gates' matrices stacked
    gate-major (index g H + h, g = i, u, o).
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, *, eps: float = 1e-5) -> None:
        super().__init__("DeltaLSTM", d_model, n_head, d_head, dropout, 15 * d_head + 6, eps)
        self.out_scale = d_head**-0.5

    def state_shapes(self) -> list[tuple[int, ...]]:
        H, D = self.n_head, self.d_head
        return [(3 * H, D, D), (3 * H, D, D), (H, D), (H, D)]

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        D = self.d_head
        proj = self._project(x, dtype)
        B, H, L, _ = proj.shape
        q, k, v, kr, vr, b, br = proj.split([3 * D] * 5 + [3, 3], dim=-1)

        def gates(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, 3 d] -> [B, 3 H, L, d], gate-major
            return t.view(B, H, L, 3, -1).permute(0, 3, 1, 2, 4).reshape(B, 3 * H, L, -1)

        return (elu_sum_norm(gates(q), self.eps), elu_sum_norm(gates(k), self.eps), gates(v),
                torch.sigmoid(gates(b)).squeeze(-1), torch.softmax(gates(kr), -1), gates(vr),
                torch.sigmoid(gates(br)).squeeze(-1))  # fmt: skip

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, b, kr, vr, br = inputs
        W, R, y, c = state
        H = self.n_head
        outs = []
        for t in range(q.shape[2]):
            W = delta_write(W, k[:, :, t], v[:, :, t], b[:, :, t])
            R = delta_write(R, kr[:, :, t], vr[:, :, t], br[:, :, t])
            p = torch.softmax(y, -1).repeat(1, 3, 1)  # the same recurrent query for the three gates
            a = read(W, q[:, :, t]) + read(R, p)
            i, u, o = torch.sigmoid(a[:, :H]), a[:, H : 2 * H], torch.sigmoid(a[:, 2 * H :])
            c = i * u + (1 - i) * c
            y = o * c
            outs.append(y)
        return torch.stack(outs, 2), (W, R, y, c)

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, b, kr, vr, br = inputs
        W, R, y, c = state
        z, W = delta_op(q, k, v, b, W)  # the three feed-forward parts in one chunked call
        out, (R, y, c) = delta_lstm_scan(z, kr, vr, br, initial_state=(R, y, c), output_final_state=True)
        return out, (W, R, y, c)


class RecurrentDeltaNet(FastWeightProgrammer):
    """Recurrent Delta Net (the paper's Table 2 row; the original toolkit's attn_type 934), a `TokenMixer`.

    The slow net sees the previous output through slow recurrent matrices R (per head):
        h = tanh(y_{t-1})
        q = softmax(W_q x + R_q h);  k = softmax(W_k x + R_k h);  v = W_v x + R_v h;  beta = sigmoid(w_b x + r_b . h)
        W_t = delta update of W_{t-1} with (k, v, beta);   y_t = W_t q_t;   out_t = y_t / sqrt(d_head)
    R_q, R_k, R_v, r_b are one parameter `rec [H, D, 3 D + 1]` (h @ rec gives the recurrent parts of q, k, v,
    beta), initialised N(0, 1/sqrt(d_head)) as in the original. State: `(W [B, H, D, D], y [B, H, D])`.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, *, eps: float = 1e-5) -> None:
        super().__init__("RecurrentDeltaNet", d_model, n_head, d_head, dropout, 3 * d_head + 1, eps)
        self.out_scale = d_head**-0.5
        self.rec = nn.Parameter(torch.empty(n_head, d_head, 3 * d_head + 1))
        self.init_parameters()

    def init_parameters(self, init_std: float = 0.0, proj_init_std: float = 0.0) -> None:
        """N(0, 1/sqrt(d_head)) recurrent slow weights (the LM's own init_std is for the projections)."""
        nn.init.normal_(self.rec, 0.0, 1.0 / math.sqrt(self.d_head))

    def state_shapes(self) -> list[tuple[int, ...]]:
        H, D = self.n_head, self.d_head
        return [(H, D, D), (H, D)]

    def _inputs(self, x: torch.Tensor, dtype: torch.dtype) -> tuple:
        return self._project(x, dtype), self.rec.to(dtype)

    def _reference(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        proj, rec = inputs
        W, y = state
        outs = []
        for t in range(proj.shape[2]):
            a = proj[:, :, t] + torch.einsum("bhd,hde->bhe", torch.tanh(y), rec)
            q, k, v, b = rec_delta_inputs(a)
            W = delta_write(W, k, v, b)
            y = read(W, q)
            outs.append(y)
        return torch.stack(outs, 2), (W, y)

    def _fast(self, inputs: tuple, state: State) -> tuple[torch.Tensor, State]:
        proj, rec = inputs
        return rec_delta_scan(proj, rec, initial_state=state, output_final_state=True)


def check_recurrent_fwp(cfg: Any) -> str | None:
    """Why `cfg.model` of a fast weight programmer family cannot be built, or None."""
    m = cfg.model
    if m.get("eps", 1.0) <= 0:
        return f"model.eps floors the sum normalisation and must be positive, got {m.eps}"
    if m.get("fast_net_depth", 1) < 1:
        return f"model.fast_net_depth is the number of fast MLP layers and must be at least 1, got {m.fast_net_depth}"
    if m.get("fast_net_inner", 0) < 0:
        return f"model.fast_net_inner is a width (0 = 4 d_head), got {m.fast_net_inner}"
    if m.carry_over and m.pos_emb:
        return (
            "model.carry_over=true needs model.pos_emb=false: absolute positions would grow without bound "
            "while the model was trained on short segments"
        )
    return None


def builder(layer: type[FastWeightProgrammer]) -> Callable[[Any], Callable[[int], TokenMixer]]:
    """`cfg -> layer index -> layer(d_model, n_head, d_head, dropout, eps=...)` for a family of this file."""

    def build(cfg: Any) -> Callable[[int], TokenMixer]:
        m = cfg.model
        return lambda i: layer(m.d_model, m.n_head, m.d_head, m.dropout, eps=m.eps)

    return build
