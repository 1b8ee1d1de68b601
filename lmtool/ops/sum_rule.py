"""Sum (purely additive, Hebbian-like) fast-weight update rule: linear attention as a fast weight programmer.

Schlag, Irie & Schmidhuber (2021), "Linear Transformers Are Secretly Fast Weight Programmers",
arXiv:2102.11174 (the rule of Katharopoulos et al. 2020 seen as a fast weight update). The math and the
derivation of the chunkwise form are in ``lmtool/ops/README.md``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lmtool.ops.chunking import addmm_, all_finite, chunk_state, from_chunks, mT, to_chunks, tri_matmul
from lmtool.ops.decay import DecayedSumChunk
from lmtool.ops.registry import (
    check_inputs,
    compute_dtype,
    empty_sequence,
    initial_state_or_zeros,
    register_impl,
    resolve_impl,
)

OP = "sum_rule"
DEFAULT_CHUNK_SIZE = 64  # the fastest of 16/32/64/128 in scripts/bench_ops.py (docs/ops_benchmark.md)
DECAY_CHUNK_SIZE = 32  # with a decay: its C x C factors make 64 about 1.2x slower than 32 (docs/ops_benchmark.md)


def sum_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum-rule fast weights (linear attention), Schlag et al. 2021 (arXiv:2102.11174), eq. 1-2.

    Per batch element and head, with state ``S`` of shape ``[Dk, Dv]``::

        S_t = S_{t-1} + k_t v_t^T
        o_t = scale * S_t^T q_t            (step t is included)

    With a log-decay ``g`` the state first decays by ``exp(g_t)``: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``
    (scalar-gated linear attention, as in RetNet, GLA with a scalar gate and Mamba-2).

    Args:
        q, k: ``[B, H, L, Dk]`` queries and keys (feature map already applied).
        v: ``[B, H, L, Dv]`` values.
        g: ``[B, H, L]`` log-decay (values <= 0, float32 or float64), or None (default) for no decay.
        scale: output scale (default 1.0).
        initial_state: ``[B, H, Dk, Dv]`` state before step 1; ``None`` (default) means zeros.
        output_final_state: also return the state after step L (default False).
        impl: ``"recurrent"`` (step loop, the reference), ``"chunk"`` (chunkwise parallel) or
            ``"auto"`` (default: the fastest form registered for the device).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, H, L, Dv]`` in q's dtype; ``final_state`` is
        ``[B, H, Dk, Dv]`` float32 (float64 if an input is float64), or None unless requested.
        Half-precision inputs are computed in float32. Gradients flow to q, k, v, g and initial_state.
    """
    check_inputs(OP, q, k, v, None, initial_state, g)
    fn = resolve_impl(OP, impl, q.device)
    if q.shape[2] == 0:
        return empty_sequence(q, k, v, None, initial_state, output_final_state, g)
    return fn(q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def sum_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference form of :func:`sum_rule`: one step per token, exactly the equations (autograd backward)."""
    if q.shape[2] == 0:
        return empty_sequence(q, k, v, None, initial_state, output_final_state, g)
    dtype = compute_dtype(q, k, v, initial_state, g)
    S = initial_state_or_zeros(q, v, initial_state, dtype)
    outs = []
    steps = zip(*(x.to(dtype).unbind(2) for x in (q, k, v)), strict=True)
    decays = [None] * q.shape[2] if g is None else g.to(dtype).exp().unbind(2)
    for (q_t, k_t, v_t), alpha_t in zip(steps, decays, strict=True):
        if alpha_t is not None:
            S = alpha_t[..., None, None] * S
        S = S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)


def sum_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel form of :func:`sum_rule` with a hand-written backward (same signature).

    ``chunk_size`` tokens per chunk (default None: 64, or 32 with a decay ``g``). The intra-chunk terms of all
    chunks are batched matmuls; the chunk-start states are a running sum of the per-chunk ``K^T V`` (L /
    chunk_size small steps, measured faster on CPU than ``torch.cumsum`` over the chunk dimension).
    """
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE if g is None else DECAY_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be a positive integer, got {chunk_size}")
    if 0 in (q.shape[2], q.shape[3], v.shape[3]):
        # No tokens, or a state without rows or columns (Dk = 0 or Dv = 0): nothing to chunk, and the step loop
        # (the spec) only carries an empty state. B = 0 or H = 0 takes the chunk path, with no sequence to run.
        return sum_rule_recurrent(
            q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    if g is not None:
        o, S = DecayedSumChunk.apply(q, k, v, g, initial_state, float(scale), int(chunk_size), sum_rule_recurrent)
        return o, (S if output_final_state else None)
    o, S = _SumRuleChunk.apply(q, k, v, initial_state, float(scale), int(chunk_size))
    return o, (S if output_final_state else None)


class _SumRuleChunk(torch.autograd.Function):
    """Saves q, k, v (views of the inputs when possible) and the N chunk-start states, nothing per token.

    Finite inputs take the fast path; when the output shows a non-finite value, the isolating one (as in
    ``delta_rule``): every NaN or inf reaches exactly the outputs and gradients that depend on it.
    """

    @staticmethod
    def forward(ctx, q, k, v, s0, scale: float, C: int):
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        dtype = compute_dtype(q, k, v, s0)
        qc, kc, vc = (to_chunks(x, C, dtype) for x in (q, k, v))  # [G, N, C, D]
        G, N = qc.shape[:2]

        # Chunk-start states S_n = S_0 + sum_{m<n} K_m^T V_m: a running sum over chunks, one bmm each
        # (fresh contiguous results take BLAS's batched path; they are copied into the buffer).
        states = qc.new_empty(G, N, Dk, Dv)
        S = chunk_state(qc, Dv, s0)
        for n in range(N):
            states[:, n] = S
            S = torch.baddbmm(S, mT(kc[:, n]), vc[:, n])

        # O = scale * (Q S_n + tril(Q K^T) V), all chunks batched.
        o = torch.matmul(qc, states)
        P = torch.matmul(qc, mT(kc)).tril_()
        addmm_(o, P, vc, beta=scale, alpha=scale)
        # Every input reaches some output, so a finite output means finite inputs: one sum decides. Otherwise
        # redo the product across tokens without multiplying P's zeros by a later token's v (tri_matmul).
        isolate = not all_finite(o)
        if isolate:
            o = torch.matmul(qc, states).add_(tri_matmul(P, vc)).mul_(scale)

        ctx.save_for_backward(qc, kc, vc, states)
        ctx.meta = (B, H, L, scale, q.dtype, k.dtype, v.dtype, None if s0 is None else s0.dtype, isolate)
        ctx.set_materialize_grads(False)
        return from_chunks(o, (B, H, L), q.dtype), S.view(B, H, Dk, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dsN):
        qc, kc, vc, states = ctx.saved_tensors
        B, H, L, scale, q_dt, k_dt, v_dt, s0_dt, isolate = ctx.meta
        G, N, C, Dk = qc.shape
        Dv = vc.shape[-1]
        do_c = qc.new_zeros(G, N, C, Dv) if do is None else to_chunks(do, C, qc.dtype)  # unscaled dO
        args = (qc, kc, vc, states, do_c, dsN, scale, ctx.needs_input_grad[:3])
        dq, dk, dv, dS = _backward(*args, isolate=isolate)
        # A NaN or inf in the incoming gradient: redo with the isolating path (checked after the fast pass, as
        # in delta_rule).
        if not isolate and not (all_finite(do_c) and (dsN is None or all_finite(dsN))):
            dq, dk, dv, dS = _backward(*args, isolate=True)
        grads = [None if g is None else from_chunks(g, (B, H, L), dt) for g, dt in ((dq, q_dt), (dk, k_dt), (dv, v_dt))]
        ds0 = dS.view(B, H, Dk, Dv).to(s0_dt) if ctx.needs_input_grad[3] else None
        return (*grads, ds0, None, None)


def _backward(qc, kc, vc, states, do_c, dsN, scale, needs, *, isolate):
    """``(dq, dk, dv, dS_0)`` in chunks (None where ``needs`` says no); ``isolate``: products across tokens by
    ``tri_matmul`` (see the forward)."""
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    # dS_next[:, n]: gradient w.r.t. the state after chunk n = dS_N + scale sum_{m>n} Q_m^T dO_m.
    dS_next = qc.new_empty(G, N, Dk, Dv)
    dS = chunk_state(qc, Dv, dsN)
    for n in range(N - 1, -1, -1):
        dS_next[:, n] = dS
        dS = torch.baddbmm(dS, mT(qc[:, n]), do_c[:, n], alpha=scale)

    # dQ = scale (dO S_n^T + dP K), dK = scale dP^T Q + V dS_next^T, dV = scale P^T dO + K dS_next,
    # with P = tril(Q K^T) and dP = tril(dO V^T); all chunks batched, one C x C buffer for dP then P.
    dq = dk = dv = None
    buf = torch.matmul(do_c, mT(vc)).tril_()  # dP (unscaled)
    if needs[0]:
        dq = torch.matmul(do_c, mT(states))
        dq = (dq.add_(tri_matmul(buf, kc)) if isolate else addmm_(dq, buf, kc)).mul_(scale)
    if needs[1]:
        if isolate:
            dk = tri_matmul(mT(buf), qc, upper=True).mul_(scale).add_(torch.matmul(vc, mT(dS_next)))
        else:
            dk = addmm_(torch.matmul(mT(buf), qc), vc, mT(dS_next), beta=scale)
    if needs[2]:
        P = torch.matmul(qc, mT(kc), out=buf).tril_()
        if isolate:
            dv = tri_matmul(mT(P), do_c, upper=True).mul_(scale).add_(torch.matmul(kc, dS_next))
        else:
            dv = addmm_(torch.matmul(mT(P), do_c), kc, dS_next, beta=scale)
    return dq, dk, dv, dS


register_impl(OP, "recurrent", sum_rule_recurrent, priority=0)
register_impl(OP, "chunk", sum_rule_chunk, priority=10)
