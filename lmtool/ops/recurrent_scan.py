"""The sequential scans of the recurrent fast weight programmers as pure tensor ops, one signature each.

Irie, Schlag, Csordás & Schmidhuber (2021), "Going Beyond Linear Transformers with Recurrent Fast Weight
Programmers", arXiv 2106.06295. The layers (``lmtool/layers/recurrent_fwp.py``) compute the slow projections and,
where there is one, the feed-forward fast part ``z_t = W_t q_t`` (the chunked ``delta_rule``); what depends on the
previous output is a scan over the tokens, here::

    y, state = delta_rnn_scan(z, k, v, beta, *, initial_state=None, output_final_state=False, impl="auto")
    y, state = delta_lstm_scan(z, k, v, beta, *, initial_state=None, output_final_state=False, impl="auto")
    y, state = rec_delta_scan(proj, rec, *, initial_state=None, output_final_state=False, impl="auto")

Shapes (D = d_head): Delta RNN ``z, k, v [B, H, L, D]``, ``beta [B, H, L]``, state ``(R [B, H, D, D], y [B, H, D])``:

    p_t = softmax(y_{t-1});  R_t = R_{t-1} + k_t (beta_t (v_t - R_{t-1}^T k_t))^T;  y_t = z_t + R_t^T p_t

Delta LSTM: the three gates (i, u, o) stacked gate-major, ``z, k, v [B, 3 H, L, D]``, ``beta [B, 3 H, L]``, state
``(R [B, 3 H, D, D], y [B, H, D], c [B, H, D])``; each gate's a_t = z_t + R_t^T p_t as above, with one p_t, then
``c_t = c_{t-1} + sigmoid(a^i_t) (a^u_t - c_{t-1})``, ``y_t = sigmoid(a^o_t) c_t``.

Recurrent Delta Net: ``proj [B, H, L, 3 D + 1]`` (the slow projection of the input), ``rec [H, D, 3 D + 1]`` (the slow
recurrent weights), state ``(W [B, H, D, D], y [B, H, D])``: ``a_t = proj_t + rec^T tanh(y_{t-1})``, q, k = softmax
of its first two D-blocks, v the third, beta = sigmoid(last entry), then the delta rule on W and ``y_t = W_t^T q_t``.

Self-referential weight matrix (Irie, Schlag, Csordás & Schmidhuber 2022, arXiv 2202.05780): ``x [B, H, L, D]``, state
``(W [B, H, D, 3 D + 4],)`` (the whole matrix, read out as ``W^T x``): ``[y_t, r_q, r_k, r_b] = W_{t-1}^T x_t``,
``q, k = softmax(r_q), softmax(r_k)``, ``W_t = W_{t-1} + k_t (rate * W_{t-1}^T (q_t - k_t))^T`` with one learning rate
``sigmoid(r_b)`` per block of columns (y, q, k, b); the output is ``y_t``::

    y, state = srwm_scan(x, *, initial_state=None, output_final_state=False, impl="auto")

Every op returns ``y [B, H, L, D]`` in the dtype of its first input and the final state in float32 (float64 when
an input is float64), or None without ``output_final_state``; ``initial_state=None`` is zeros. Gradients flow to
every input and to the initial state. ``impl``: "recurrent" (the torch scan below: one fused step per token,
batched matmuls), "cuda" (``lmtool.ops.recurrent_cuda``: one kernel for the whole scan), "auto" (the kernels on
CUDA devices after their self-check, else "recurrent").
"""

from __future__ import annotations

import torch

from lmtool.ops.registry import register_impl, resolve_impl

State = tuple[torch.Tensor, ...]


def steps(*xs: torch.Tensor) -> zip:
    """The per-step slices `[B G, D]` of tensors `[B, G, L, D]`, from one unbind each.

    Indexing `x[:, :, t]` at every step (or writing outputs into a preallocated buffer) would make autograd
    allocate and add a full-size gradient per step; one unbind (and one stack of the outputs) costs one op.
    """
    return zip(*(x.permute(2, 0, 1, 3).reshape(x.shape[2], -1, x.shape[3]).unbind(0) for x in xs), strict=True)


def rec_delta_inputs(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The Recurrent Delta Net's q, k, v, beta from the pre-activations `[..., 3 D + 1]`."""
    D = (a.shape[-1] - 1) // 3
    q, k, v, b = a.split([D, D, D, 1], dim=-1)
    return torch.softmax(q, -1), torch.softmax(k, -1), v, torch.sigmoid(b).squeeze(-1)


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _state(initial_state: State | None, shapes: list[tuple[int, ...]], like: torch.Tensor, dtype) -> State:
    if initial_state is None:
        return tuple(like.new_zeros(shape, dtype=dtype) for shape in shapes)
    return tuple(s.to(dtype) for s in initial_state)


def delta_rnn_recurrent(z, k, v, beta, *, initial_state=None, output_final_state=False):
    """:func:`delta_rnn_scan` as a torch loop; the read of the old value and the new read share one batched matmul
    (R_t^T p = R_{t-1}^T p + u_t (k_t . p))."""
    B, H, L, D = z.shape
    dt = _compute_dtype(z, k, v, beta, *(initial_state or ()))
    R, y = _state(initial_state, [(B, H, D, D), (B, H, D)], z, dt)
    R, y = R.reshape(B * H, D, D), y.reshape(B * H, D)
    outs = []
    for z_t, k_t, v_t, b_t in steps(*(x.to(dt) for x in (z, k, v, beta.unsqueeze(-1)))):
        p = torch.softmax(y, -1)
        old, r = torch.bmm(torch.stack([k_t, p], 1), R).unbind(1)  # R_{t-1}^T k, R_{t-1}^T p
        u = b_t * (v_t - old)
        y = z_t + r + u * (k_t * p).sum(-1, keepdim=True)
        R = torch.baddbmm(R, k_t.unsqueeze(2), u.unsqueeze(1))
        outs.append(y)
    out = torch.stack(outs).view(L, B, H, D).permute(1, 2, 0, 3).to(z.dtype)
    return out, ((R.view(B, H, D, D), y.view(B, H, D)) if output_final_state else None)


def delta_lstm_recurrent(z, k, v, beta, *, initial_state=None, output_final_state=False):
    """:func:`delta_lstm_scan` as a torch loop (the three gates' reads in one batched matmul)."""
    B, G, L, D = z.shape
    H = G // 3
    dt = _compute_dtype(z, k, v, beta, *(initial_state or ()))
    R, y, c = _state(initial_state, [(B, G, D, D), (B, H, D), (B, H, D)], z, dt)
    R, y, c = R.reshape(B * G, D, D), y.reshape(B, 1, H, D), c.reshape(B, H, D)
    outs = []
    for z_t, k_t, v_t, b_t in steps(*(x.to(dt) for x in (z, k, v, beta.unsqueeze(-1)))):
        p = torch.softmax(y, -1).expand(B, 3, H, D)  # the same recurrent query for the three gates
        old, r = torch.bmm(torch.stack([k_t.view(B, 3, H, D), p], 3).view(B * G, 2, D), R).unbind(1)
        u_w = b_t * (v_t - old)
        a = (z_t + r + u_w * (k_t * p.reshape(B * G, D)).sum(-1, keepdim=True)).view(B, 3, H, D)
        i, u, o = a.unbind(1)
        c = c + torch.sigmoid(i) * (u - c)
        y = torch.sigmoid(o) * c
        R = torch.baddbmm(R, k_t.unsqueeze(2), u_w.unsqueeze(1))
        outs.append(y)
        y = y.unsqueeze(1)
    out = torch.stack(outs, 2).to(z.dtype)
    return out, ((R.view(B, G, D, D), y.view(B, H, D), c) if output_final_state else None)


def rec_delta_recurrent(proj, rec, *, initial_state=None, output_final_state=False):
    """:func:`rec_delta_scan` as a torch loop, head-major inside so that the recurrent matmul is one baddbmm."""
    B, H, L, P = proj.shape
    D = (P - 1) // 3
    dt = _compute_dtype(proj, rec, *(initial_state or ()))
    W, y = _state(initial_state, [(B, H, D, D), (B, H, D)], proj, dt)
    rec = rec.to(dt)
    W = W.transpose(0, 1).reshape(H * B, D, D)
    y = y.transpose(0, 1).contiguous()  # [H, B, D]
    outs = []
    for proj_t in proj.to(dt).permute(2, 1, 0, 3).unbind(0):  # [H, B, P] per step
        q, k, v, b = rec_delta_inputs(torch.baddbmm(proj_t, torch.tanh(y), rec))
        old, s_q = torch.bmm(torch.stack([k, q], 2).view(H * B, 2, D), W).unbind(1)
        k, q = k.reshape(H * B, D), q.reshape(H * B, D)
        u = b.reshape(H * B, 1) * (v.reshape(H * B, D) - old)
        y = (s_q + u * (k * q).sum(-1, keepdim=True)).view(H, B, D)
        W = torch.baddbmm(W, k.unsqueeze(2), u.unsqueeze(1))
        outs.append(y)
    out = torch.stack(outs).permute(2, 1, 0, 3).to(proj.dtype)
    W = W.view(H, B, D, D).transpose(0, 1).contiguous()
    return out, ((W, y.transpose(0, 1).contiguous()) if output_final_state else None)


def srwm_rate_index(D: int, device=None) -> torch.Tensor:
    """Which of the 4 learning rates each of the 3 D + 4 columns of an SRWM uses: blocks y, q, k (D each) and b (4)."""
    return torch.tensor([0] * D + [1] * D + [2] * D + [3] * 4, device=device)


def srwm_split(r: torch.Tensor, rate_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """y, q = softmax, k = softmax and the per-column learning rates from an SRWM's read-out ``[..., 3 D + 4]``."""
    D = (r.shape[-1] - 4) // 3
    y, q, k, b = r.split([D, D, D, 4], dim=-1)
    return y, torch.softmax(q, -1), torch.softmax(k, -1), torch.sigmoid(b)[..., rate_index]


def srwm_recurrent(x, *, initial_state=None, output_final_state=False):
    """:func:`srwm_scan` as a torch loop: one batched matmul per token reads v, v_bar and the next token's
    projection with W_{t-1} (W_t^T x_{t+1} = W_{t-1}^T x_{t+1} + delta (k . x_{t+1}))."""
    B, H, L, D = x.shape
    P = 3 * D + 4
    dt = _compute_dtype(x, *(initial_state or ()))
    (W,) = _state(initial_state, [(B, H, D, P)], x, dt)
    W, index = W.reshape(B * H, D, P), srwm_rate_index(D, x.device)
    (xs,) = zip(*steps(x.to(dt)), strict=True)
    r = torch.bmm(xs[0].unsqueeze(1), W).squeeze(1)  # W_0^T x_0; later steps get it from the previous bmm
    outs = []
    for t in range(L):
        y, q, k, rate = srwm_split(r, index)
        nxt = xs[min(t + 1, L - 1)]
        v, v_bar, r_next = torch.bmm(torch.stack([q, k, nxt], 1), W).unbind(1)
        delta = rate * (v - v_bar)
        W = torch.baddbmm(W, k.unsqueeze(2), delta.unsqueeze(1))
        r = r_next + delta * (k * nxt).sum(-1, keepdim=True)
        outs.append(y)
    out = torch.stack(outs).view(L, B, H, D).permute(1, 2, 0, 3).to(x.dtype)
    return out, ((W.view(B, H, D, P),) if output_final_state else None)


def check_scan_inputs(op: str, x: torch.Tensor, state: State | None, state_shapes: list[tuple[int, ...]]) -> None:
    """Raise a one-line ValueError unless the first input is `[B, G, L, D]` floating point and the initial state
    (if any) has the shapes the op expects."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{op}: the first input must be a floating point [B, H, L, D] tensor")
    if state is not None and [tuple(s.shape) for s in state] != state_shapes:
        raise ValueError(f"{op}: initial_state must have shapes {state_shapes}, got {[tuple(s.shape) for s in state]}")


def delta_rnn_scan(z, k, v, beta, *, initial_state=None, output_final_state=False, impl="auto"):
    """The Delta RNN's recurrent scan (module docstring): ``y [B, H, L, D]`` and the final ``(R, y)``."""
    B, H, L, D = z.shape
    check_scan_inputs("delta_rnn_scan", z, initial_state, [(B, H, D, D), (B, H, D)])
    fn = resolve_impl("delta_rnn_scan", impl, z.device)
    return fn(z, k, v, beta, initial_state=initial_state, output_final_state=output_final_state)


def delta_lstm_scan(z, k, v, beta, *, initial_state=None, output_final_state=False, impl="auto"):
    """The Delta LSTM's scan over its three gates (module docstring): ``y [B, H, L, D]`` and the final ``(R, y, c)``."""
    B, G, L, D = z.shape
    if G % 3:
        raise ValueError(f"delta_lstm_scan: z must stack 3 gates x H heads along dim 1, got {G}")
    check_scan_inputs("delta_lstm_scan", z, initial_state, [(B, G, D, D), (B, G // 3, D), (B, G // 3, D)])
    fn = resolve_impl("delta_lstm_scan", impl, z.device)
    return fn(z, k, v, beta, initial_state=initial_state, output_final_state=output_final_state)


def rec_delta_scan(proj, rec, *, initial_state=None, output_final_state=False, impl="auto"):
    """The Recurrent Delta Net's scan (module docstring): ``y [B, H, L, D]`` and the final ``(W, y)``."""
    B, H, L, P = proj.shape
    D = (P - 1) // 3
    if P != 3 * D + 1 or tuple(rec.shape) != (H, D, P):
        raise ValueError(f"rec_delta_scan: proj must be [B, H, L, 3 D + 1] and rec [H, D, 3 D + 1], got "
                         f"{tuple(proj.shape)} and {tuple(rec.shape)}")  # fmt: skip
    check_scan_inputs("rec_delta_scan", proj, initial_state, [(B, H, D, D), (B, H, D)])
    fn = resolve_impl("rec_delta_scan", impl, proj.device)
    return fn(proj, rec, initial_state=initial_state, output_final_state=output_final_state)


def srwm_scan(x, *, initial_state=None, output_final_state=False, impl="auto"):
    """The self-referential weight matrix's scan (module docstring): ``y [B, H, L, D]`` and the final ``(W,)``."""
    B, H, L, D = x.shape
    check_scan_inputs("srwm_scan", x, initial_state, [(B, H, D, 3 * D + 4)])
    fn = resolve_impl("srwm_scan", impl, x.device)
    return fn(x, initial_state=initial_state, output_final_state=output_final_state)


TORCH_FORMS = {"delta_rnn_scan": delta_rnn_recurrent, "delta_lstm_scan": delta_lstm_recurrent,
               "rec_delta_scan": rec_delta_recurrent, "srwm_scan": srwm_recurrent}  # fmt: skip
SCANS = {"delta_rnn_scan": delta_rnn_scan, "delta_lstm_scan": delta_lstm_scan, "rec_delta_scan": rec_delta_scan,
         "srwm_scan": srwm_scan}  # fmt: skip

for _op, _fn in TORCH_FORMS.items():
    register_impl(_op, "recurrent", _fn, priority=0)
