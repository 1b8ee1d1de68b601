"""Delta-rule fast-weight update: the fast weight programmer that corrects what it stored.

Schlag, Irie & Schmidhuber (2021), "Linear Transformers Are Secretly Fast Weight Programmers",
arXiv:2102.11174, Sec. 4.2. The chunkwise form is the WY/UT-transform algorithm of Yang, Wang, Zhang,
Shen & Kim (2024), "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
arXiv:2406.06484. The math and the derivation of both passes are in ``lmtool/ops/README.md``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from lmtool.ops.chunking import (
    addmm_,
    all_finite,
    chunk_state,
    from_chunks,
    mT,
    to_chunks,
    tri_matmul,
    unit_lower_inverse,
)
from lmtool.ops.decay import DecayedDeltaChunk
from lmtool.ops.registry import (
    check_inputs,
    compute_dtype,
    empty_sequence,
    initial_state_or_zeros,
    register_impl,
    resolve_impl,
)

OP = "delta_rule"
DEFAULT_CHUNK_SIZE = 32  # the fastest of 16/32/64/128 in scripts/bench_ops.py (docs/ops_benchmark.md)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Delta-rule fast weights, Schlag et al. 2021 (arXiv:2102.11174), eq. 23-26 (without the feature map).

    Per batch element and head, with state ``S`` of shape ``[Dk, Dv]``::

        u_t = beta_t * (v_t - S_{t-1}^T k_t)     (new value minus the value currently stored under k_t)
        S_t = S_{t-1} + k_t u_t^T
        o_t = scale * S_t^T q_t                   (step t is included)

    With a log-decay ``g`` (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2025, arXiv:2412.06464) the state first
    decays by ``alpha_t = exp(g_t)``: ``S_{t-1}`` is replaced by ``alpha_t S_{t-1}`` in both lines above.

    The op applies no feature map, normalisation or sigmoid: pass ``beta`` in (0, 1) and normalised keys
    for a stable recurrence.

    Args:
        q, k: ``[B, H, L, Dk]`` queries and keys.
        v: ``[B, H, L, Dv]`` values.
        beta: ``[B, H, L]`` learning rates (write strengths).
        g: ``[B, H, L]`` log-decay (values <= 0, float32 or float64), or None (default) for no decay.
        scale: output scale (default 1.0).
        initial_state: ``[B, H, Dk, Dv]`` state before step 1; ``None`` (default) means zeros.
        output_final_state: also return the state after step L (default False).
        impl: ``"recurrent"`` (step loop, the reference), ``"chunk"`` (chunkwise parallel, WY/UT form) or
            ``"auto"`` (default: the fastest form registered for the device).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, H, L, Dv]`` in q's dtype; ``final_state`` is
        ``[B, H, Dk, Dv]`` float32 (float64 if an input is float64), or None unless requested.
        Half-precision inputs are computed in float32. Gradients flow to q, k, v, beta, g and initial_state.
    """
    check_inputs(OP, q, k, v, beta, initial_state, g)
    fn = resolve_impl(OP, impl, q.device)
    if q.shape[2] == 0:
        return empty_sequence(q, k, v, beta, initial_state, output_final_state, g)
    return fn(q, k, v, beta, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference form of :func:`delta_rule`: one step per token, exactly the equations (autograd backward)."""
    if q.shape[2] == 0:
        return empty_sequence(q, k, v, beta, initial_state, output_final_state, g)
    dtype = compute_dtype(q, k, v, beta, initial_state, g)
    S = initial_state_or_zeros(q, v, initial_state, dtype)
    steps = zip(*(x.to(dtype).unbind(2) for x in (q, k, v, beta)), strict=True)
    decays = [None] * q.shape[2] if g is None else g.to(dtype).exp().unbind(2)
    outs = []
    for (q_t, k_t, v_t, b_t), alpha_t in zip(steps, decays, strict=True):
        if alpha_t is not None:
            S = alpha_t[..., None, None] * S
        u_t = b_t.unsqueeze(-1) * (v_t - torch.einsum("bhkv,bhk->bhv", S, k_t))
        S = S + k_t.unsqueeze(-1) * u_t.unsqueeze(-2)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(outs, dim=2).to(q.dtype)
    return o, (S if output_final_state else None)


def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel WY/UT form of :func:`delta_rule` (Yang et al. 2024) with a hand-written backward.

    With a decay ``g`` the cumulative decays within a chunk enter the same form (``lmtool/ops/decay.py``).
    ``chunk_size`` (default 32) tokens per chunk. Everything inside a chunk is batched over all chunks;
    only the chunk-to-chunk state update is a loop of L / chunk_size steps.
    """
    if chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be a positive integer, got {chunk_size}")
    if 0 in (q.shape[2], q.shape[3], v.shape[3]):
        # No tokens, or a state without rows or columns (Dk = 0 or Dv = 0): nothing to chunk, and the step loop
        # (the spec) only carries an empty state. B = 0 or H = 0 takes the chunk path, with no sequence to run.
        return delta_rule_recurrent(
            q, k, v, beta, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    if g is not None:
        o, S = DecayedDeltaChunk.apply(q, k, v, beta, g, initial_state, float(scale), int(chunk_size),
                                       delta_rule_recurrent)  # fmt: skip
        return o, (S if output_final_state else None)
    o, S = _DeltaRuleChunk.apply(q, k, v, beta, initial_state, float(scale), int(chunk_size))
    return o, (S if output_final_state else None)


class _DeltaRuleChunk(torch.autograd.Function):
    """Saves q, k, v, beta (views of the inputs when possible), X [L, C], U' [L, Dv] and N chunk-start states.

    Finite inputs take the fast path. When the output shows a non-finite value, forward (and then backward)
    are recomputed by the isolating path, which keeps every NaN or inf in the tokens that depend on it.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, s0, scale: float, C: int):
        B, H, L, Dk = q.shape
        Dv = v.shape[-1]
        dtype = compute_dtype(q, k, v, beta, s0)
        qc, kc, vc = (to_chunks(x, C, dtype) for x in (q, k, v))  # [G, N, C, D]
        bc = to_chunks(beta, C, dtype)  # [G, N, C]

        o, S, X, Ud, states = _forward(qc, kc, vc, bc, s0, scale)
        # Every input reaches some output, so a finite output means finite inputs: one sum decides.
        isolate = not all_finite(o)
        if isolate:
            o, S, X, Ud, states = _forward_isolating(qc, kc, vc, bc, s0, scale, L)

        ctx.save_for_backward(qc, kc, vc, bc, X, Ud, states)
        ctx.meta = (B, H, L, scale, [x.dtype for x in (q, k, v, beta)], None if s0 is None else s0.dtype, isolate)
        ctx.set_materialize_grads(False)
        return from_chunks(o, (B, H, L), q.dtype), S.view(B, H, Dk, Dv)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dsN):
        qc, kc, vc, bc, X, Ud, states = ctx.saved_tensors
        B, H, L, scale, dtypes, s0_dt, isolate = ctx.meta
        G, N, C, Dk = qc.shape
        Dv = vc.shape[-1]
        do_c = qc.new_zeros(G, N, C, Dv) if do is None else to_chunks(do, C, qc.dtype)  # unscaled dO
        args = (qc, kc, vc, bc, X, Ud, states, do_c, dsN, scale, L)
        dq, dk, dv, dbeta, dS = (_backward_isolating if isolate else _backward)(*args)
        # A NaN or inf in the incoming gradient: redo with the isolating path. (Checked after the fast pass:
        # the check's small tensors, allocated among the pass's large buffers, cost more in page faults.)
        if not isolate and not (all_finite(do_c) and (dsN is None or all_finite(dsN))):
            dq, dk, dv, dbeta, dS = _backward_isolating(*args)

        shape = (B, H, L)
        grads = [from_chunks(g, shape, dt) for g, dt in zip((dq, dk, dv, dbeta), dtypes, strict=True)]
        ds0 = dS.view(B, H, Dk, Dv).to(s0_dt) if ctx.needs_input_grad[4] else None
        return (*grads, ds0, None, None)



def _forward(qc, kc, vc, bc, s0, scale):
    """The chunkwise forward for finite inputs: ``(o, S_final, X, U', states)``, o in chunks ``[G, N, C, Dv]``.

    Large temporaries are reused through ``out=`` and in-place ops: on CPU every fresh multi-MB buffer
    costs page faults comparable to the matmuls themselves.
    """
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    # UT transform, all chunks batched: X = (I + A)^-1, T = X diag(beta), W = T K, U = T V.
    # Only the strictly lower triangle of A = diag(beta) K K^T is read by the unit-triangular solve.
    A = torch.matmul(kc, mT(kc)).mul_(bc.unsqueeze(-1))
    eye = torch.eye(C, dtype=qc.dtype, device=qc.device).expand_as(A)
    X = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    T = torch.mul(X, bc.unsqueeze(-2), out=A)
    W = torch.matmul(T, kc)
    Ud = torch.matmul(T, vc)  # U, turned into U' in place below

    # The only sequential part: U'_n = U_n - W_n S_n ;  S_{n+1} = S_n + K_n^T U'_n.
    # Matmul results are fresh contiguous [G, ., .] tensors: strided outputs would leave BLAS's batched path.
    states = qc.new_empty(G, N, Dk, Dv)
    S = chunk_state(qc, Dv, s0)
    for n in range(N):
        states[:, n] = S
        u = Ud[:, n].sub_(torch.bmm(W[:, n], S))
        S = torch.baddbmm(S, mT(kc[:, n]), u)
    del W

    # O = scale * (Q S_n + tril(Q K^T) U'), all chunks batched.
    o = torch.matmul(qc, states)
    addmm_(o, torch.matmul(qc, mT(kc), out=T).tril_(), Ud, beta=scale, alpha=scale)
    return o, S, X, Ud, states


def _forward_isolating(qc, kc, vc, bc, s0, scale, L):
    """:func:`_forward` for inputs with a NaN or inf: no product multiplies a zero of a triangular matrix by a
    non-finite value of another token (``tri_matmul``), so each one reaches exactly the outputs that depend on it.

    The recurrent form is the spec of which those are; ``tests/ops/test_bad_values_and_shapes.py`` checks it.
    """
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    b = bc.unsqueeze(-1)
    X = unit_lower_inverse(torch.matmul(kc, mT(kc)).mul_(b).tril_(-1))
    # W = X diag(beta) K and U = X diag(beta) V, with beta on the rows of K and V rather than the columns of
    # X: the zeros of X above the diagonal would meet a later token's beta.
    W = tri_matmul(X, kc * b)
    Ud = tri_matmul(X, vc * b)
    pad = N * C - L
    states = qc.new_empty(G, N, Dk, Dv)
    S = chunk_state(qc, Dv, s0)
    for n in range(N):
        states[:, n] = S
        u = Ud[:, n].sub_(torch.bmm(W[:, n], S))
        if n == N - 1 and pad:  # padding tokens write k = 0: exactly nothing, also when u is not finite
            u[:, C - pad :] = 0
        S = torch.baddbmm(S, mT(kc[:, n]), u)
    o = torch.matmul(qc, states).add_(tri_matmul(torch.matmul(qc, mT(kc)).tril_(), Ud)).mul_(scale)
    return o, S, X, Ud, states


def _backward(qc, kc, vc, bc, X, Ud, states, do_c, dsN, scale, L):
    """The chunkwise backward for finite values: ``(dq, dk, dv, dbeta, dS_0)``, in chunks."""
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    b = bc.unsqueeze(-1)
    # Per chunk U' = X diag(beta) R with R = V - K S_n. With Z = X^T dU':
    #   dV = diag(beta) Z,  dK gets -diag(beta) Z S_n^T,  dS_n gets -K^T diag(beta) Z,
    #   dbeta gets rowsum(Z * R),  and dA = -tril(Z U'^T, -1) for A = tril(diag(beta) K K^T, -1).
    # Reverse pass over chunks (dS_next[:, n] = gradient w.r.t. the state after chunk n):
    #   dU'_n = scale tril(Q K^T)^T dO_n + K_n dS_{n+1}
    #   dS_n  = dS_{n+1} + scale Q_n^T dO_n - K_n^T diag(beta) Z_n
    P = torch.matmul(qc, mT(kc)).tril_()
    Z = torch.matmul(mT(P), do_c)  # tril(Q K^T)^T dO; chunk n is overwritten by Z_n in the loop
    dS_next = qc.new_empty(G, N, Dk, Dv)
    dS = chunk_state(qc, Dv, dsN)  # the final state's gradient
    for n in range(N - 1, -1, -1):
        dS_next[:, n] = dS
        z = torch.bmm(mT(X[:, n]), torch.baddbmm(Z[:, n], kc[:, n], dS, beta=scale))
        Z[:, n] = z
        dS = torch.baddbmm(dS, mT(qc[:, n]), do_c[:, n], alpha=scale)
        dS.baddbmm_(mT(kc[:, n]), z * bc[:, n].unsqueeze(-1), alpha=-1)

    # Output and state-update terms, all chunks batched (P's buffer is reused for dP, then -dA).
    dP = torch.matmul(do_c, mT(Ud), out=P).tril_()  # unscaled
    dq = addmm_(torch.matmul(do_c, mT(states)), dP, kc).mul_(scale)
    dk = addmm_(torch.matmul(mT(dP), qc), Ud, mT(dS_next), beta=scale)
    negdA = torch.matmul(Z, mT(Ud), out=P).tril_(-1)
    # M = Z S_n^T + (-dA) K collects the terms of dK and dbeta that are multiplied by beta and K:
    #   dK -= diag(beta) M + (diag(beta) (-dA))^T K;   dbeta = rowsum(Z * V) - rowsum(K * M).
    M = addmm_(torch.matmul(Z, mT(states)), negdA, kc)
    dk.addcmul_(M, b, value=-1)
    addmm_(dk, mT(negdA.mul_(b)), kc, alpha=-1)
    if Dk == Dv:  # dbeta = rowsum(Z * V - K * M), formed in M's buffer so that Z can become dV in place
        dbeta = M.mul_(kc).neg_().addcmul_(Z, vc).sum(-1)
        dv = Z.mul_(b)
    else:
        dv = Z * b
        dbeta = Z.mul_(vc).sum(-1).sub_(M.mul_(kc).sum(-1))
    return dq, dk, dv, dbeta, dS


def _backward_isolating(qc, kc, vc, bc, X, Ud, states, do_c, dsN, scale, L):
    """:func:`_backward` with every product across the tokens of a chunk done by ``tri_matmul`` (see
    :func:`_forward_isolating`), also used when the incoming gradient is not finite."""
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    b = bc.unsqueeze(-1)
    pad = N * C - L
    P = torch.matmul(qc, mT(kc)).tril_()
    Z = tri_matmul(mT(P), do_c, upper=True)
    dS_next = qc.new_empty(G, N, Dk, Dv)
    dS = chunk_state(qc, Dv, dsN)
    for n in range(N - 1, -1, -1):
        dS_next[:, n] = dS
        z = tri_matmul(mT(X[:, n]), torch.baddbmm(Z[:, n], kc[:, n], dS, beta=scale), upper=True)
        if n == N - 1 and pad:  # padding tokens have k = beta = 0: they pass no gradient on
            z[:, C - pad :] = 0
        Z[:, n] = z
        dS = torch.baddbmm(dS, mT(qc[:, n]), do_c[:, n], alpha=scale)
        dS.baddbmm_(mT(kc[:, n]), z * bc[:, n].unsqueeze(-1), alpha=-1)

    dP = torch.matmul(do_c, mT(Ud)).tril_()
    dq = torch.matmul(do_c, mT(states)).add_(tri_matmul(dP, kc)).mul_(scale)
    dk = tri_matmul(mT(dP), qc, upper=True).mul_(scale).add_(torch.matmul(Ud, mT(dS_next)))
    negdA = torch.matmul(Z, mT(Ud)).tril_(-1)
    M = torch.matmul(Z, mT(states)).add_(tri_matmul(negdA, kc, strict=True))
    # (diag(beta) (-dA))^T K = (-dA)^T (diag(beta) K): beta on K's rows, as in the forward.
    dk.sub_(M * b).sub_(tri_matmul(mT(negdA), kc * b, upper=True, strict=True))
    dbeta = (Z * vc).sum(-1).sub_((kc * M).sum(-1))
    return dq, dk, Z * b, dbeta, dS


register_impl(OP, "recurrent", delta_rule_recurrent, priority=0)
register_impl(OP, "chunk", delta_rule_chunk, priority=10)
