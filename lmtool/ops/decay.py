"""Chunkwise-parallel sum and delta rules with a per-token decay: ``S_{t-1}`` is scaled by ``exp(g_t)``.

Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025, arXiv:2412.06464) and scalar-gated linear attention.
Inside a chunk the decay from token j to token t is ``exp(G_t - G_j)`` with ``G`` the cumulative log-decay,
so the chunk forms of ``delta_rule.py`` and ``sum_rule.py`` carry over with three kinds of factors, all <= 1
(no division by a decay, so a tiny ``exp(g_t)`` loses nothing):

    a_t     = exp(G_t)                 decay of the chunk-start state up to token t
    D_tj    = exp(G_t - G_j), j <= t   decay between two tokens of the chunk (0 above the diagonal)
    gamma_j = exp(G_C - G_j)           decay from token j to the end of the chunk

The derivation of both passes is in ``lmtool/ops/README.md`` ("Decay"). Inputs with a NaN or inf (or an
incoming gradient with one) are recomputed with the recurrent form, which is the spec of where they spread.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import once_differentiable

from lmtool.ops.chunking import addmm_, all_finite, chunk_state, from_chunks, mT, to_chunks
from lmtool.ops.registry import compute_dtype


def decay_factors(gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a [G, N, C], D [G, N, C, C], gamma [G, N, C])`` of the module docstring from chunked log-decays ``gc``.

    The cumulative sums are taken in float64 and ``G_t - G_j`` is rounded once: in float32 a difference of two
    prefix sums would carry the rounding of the whole chunk's decay (up to C * 20 for strong gates).
    """
    G = gc.to(torch.float64).cumsum(-1)
    D = (G.unsqueeze(-1) - G.unsqueeze(-2)).to(gc.dtype).exp_().tril_()  # above the diagonal: written as 0
    return G.exp().to(gc.dtype), D, D[..., -1, :]


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(-1)`` as a batched matmul: no temporary of x's size, which on CPU would be a fresh buffer
    (page faults) as costly as the product itself inside a backward that holds many such buffers."""
    return torch.matmul(x.unsqueeze(-2), y.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _chunk_inputs(tensors, C: int, dtype: torch.dtype):
    return [None if x is None else to_chunks(x, C, dtype) for x in tensors]



def _log_decay_grad(a, da, dD_net, gamma, dgamma, states, dS_next) -> torch.Tensor:
    """dL/dg from the gradients w.r.t. the factors: ``da`` (of a), ``dD_net`` = rowsum - colsum of ``dD * D``
    (of D: d exp(G_t - G_j) = D_tj (dG_t - dG_j)), ``dgamma`` (of gamma) and the chunk-end decay ``a_C`` of the
    state, through ``G = cumsum(g)``."""
    dG = a * da + dD_net
    gd = gamma * dgamma
    dG.sub_(gd)
    state_dot = rowdot(states.flatten(-2), dS_next.flatten(-2))  # <S_n, dS_{n+1}>
    dG[..., -1] += gd.sum(-1) + a[..., -1] * state_dot
    return dG.flip(-1).cumsum(-1).flip(-1)  # G_t = sum_{i<=t} g_i


class _DecayedChunk(torch.autograd.Function):
    """Shared bookkeeping of both rules: chunking, the non-finite fallback and the gradients' dtypes."""

    @staticmethod
    def _run(ctx, tensors, g, s0, scale, C, reference, forward):
        q, v = tensors[0], tensors[2]
        B, H, L, Dk = q.shape
        dtype = compute_dtype(*tensors, g, s0)
        chunks = _chunk_inputs((*tensors, g), C, dtype)
        o, S, saved = forward(*chunks, s0, scale)
        # Every input reaches some output, so a finite output means finite inputs: one sum decides.
        isolate = not all_finite(o)
        if isolate:
            with torch.no_grad():
                o, S = _call_reference(reference, tensors, g, s0, scale)
        ctx.save_for_backward(*chunks, s0, *saved)
        ctx.meta = (B, H, L, scale, [x.dtype for x in (*tensors, g)], isolate, reference, len(saved))
        ctx.set_materialize_grads(False)
        if not isolate:
            o, S = from_chunks(o, (B, H, L), q.dtype), S.view(B, H, Dk, v.shape[-1])
        return o, S

    @staticmethod
    def _grads(ctx, do, dsN, backward):
        *rest, n_saved = ctx.meta
        B, H, L, scale, dtypes, isolate, reference = rest
        saved = ctx.saved_tensors
        chunks, s0, extra = saved[: len(dtypes)], saved[len(dtypes)], saved[len(dtypes) + 1 :]
        qc, vc = chunks[0], chunks[2]
        G, N, C, Dk = qc.shape
        Dv = vc.shape[-1]
        finite_grad = (do is None or all_finite(do)) and (dsN is None or all_finite(dsN))
        if isolate or not finite_grad:
            inputs = [from_chunks(x, (B, H, L), x.dtype) for x in chunks]
            grads, ds0 = _reference_grads(reference, inputs[:-1], inputs[-1], s0, scale, do, dsN)
        else:
            do_c = qc.new_zeros(G, N, C, Dv) if do is None else to_chunks(do, C, qc.dtype)
            *grads, dS0 = backward(*chunks, *extra, do_c, chunk_state(qc, Dv, dsN), scale)
            grads = [from_chunks(x, (B, H, L), x.dtype) for x in grads]
            ds0 = dS0.view(B, H, Dk, Dv)
        grads = [x.to(dt) for x, dt in zip(grads, dtypes, strict=True)]
        return (*grads, ds0.to(s0.dtype) if s0 is not None else None)


def _call_reference(reference, tensors, g, s0, scale):
    return reference(*tensors, g=g, scale=scale, initial_state=s0, output_final_state=True)


def _reference_grads(reference, tensors, g, s0, scale, do, dsN):
    """Gradients of every input through the recurrent form (autograd), for inputs or gradients with a NaN/inf."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (*tensors, g)]
        s0_leaf = None if s0 is None else s0.detach().requires_grad_()
        o, S = _call_reference(reference, leaves[:-1], leaves[-1], s0_leaf, scale)
        outputs, grads_out = zip(*[(y, dy) for y, dy in ((o, do), (S, dsN)) if dy is not None], strict=True)
        wrt = leaves + ([s0_leaf] if s0_leaf is not None else [])
        grads = torch.autograd.grad(outputs, wrt, grads_out, allow_unused=True, materialize_grads=True)
    grads = list(grads)
    ds0 = grads.pop() if s0_leaf is not None else None
    return grads, ds0


class DecayedDeltaChunk(_DecayedChunk):
    """``apply(q, k, v, beta, g, s0, scale, C, reference) -> (o, S_final)``; saves the chunked inputs, the decay
    factors a and D, X, U' and the chunk-start states, nothing per token of size Dk x Dv."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, scale: float, C: int, reference: Callable):
        return _DecayedChunk._run(ctx, (q, k, v, beta), g, s0, scale, C, reference, _delta_forward)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dsN):
        return (*_DecayedChunk._grads(ctx, do, dsN, _delta_backward), None, None, None)


class DecayedSumChunk(_DecayedChunk):
    """``apply(q, k, v, g, s0, scale, C, reference) -> (o, S_final)``; saves the chunked inputs, the decay factors
    a and D and the chunk-start states."""

    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale: float, C: int, reference: Callable):
        return _DecayedChunk._run(ctx, (q, k, v), g, s0, scale, C, reference, _sum_forward)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dsN):
        return (*_DecayedChunk._grads(ctx, do, dsN, _sum_backward), None, None, None)


def _output_and_write_grads(qc, kc, vals, a, D, gamma, states, dS_next, do_c, scale):
    """The terms both rules share, with ``vals`` = V (sum rule) or U' (delta rule) the written values:
    ``O = scale ((a Q) S_n + (Q K^T * D) vals)`` and the write ``(gamma K)^T vals`` into the next state.

    Returns ``dPD`` (= dO vals^T * D, unscaled: the gradient of ``Q K^T * D`` over scale, times D), dq, the
    output's and the write's part of dk, and the gradients of the factors a (through ``a Q``) and gamma."""
    dPD = torch.matmul(do_c, mT(vals)).mul_(D)
    dOS = torch.matmul(do_c, mT(states))
    da = rowdot(qc, dOS).mul_(scale)
    dq = addmm_(dOS.mul_(a.unsqueeze(-1)), dPD, kc).mul_(scale)
    vdS = torch.matmul(vals, mT(dS_next))
    dgamma = rowdot(kc, vdS)
    dk = addmm_(vdS.mul_(gamma.unsqueeze(-1)), mT(dPD), qc, alpha=scale)
    return dPD, dq, dk, da, dgamma


def _sum_forward(qc, kc, vc, gc, s0, scale):
    """``O = scale ((a Q) S_n + (tril(Q K^T) * D) V)``, ``S_{n+1} = a_C S_n + (gamma K)^T V``."""
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    a, D, gamma = decay_factors(gc)
    kg, aC = kc * gamma.unsqueeze(-1), a[..., -1, None, None]
    states = qc.new_empty(G, N, Dk, Dv)
    S = chunk_state(qc, Dv, s0).clone()  # updated in place below, never the caller's tensor
    for n in range(N):
        states[:, n] = S
        S.mul_(aC[:, n]).baddbmm_(mT(kg[:, n]), vc[:, n])
    o = torch.matmul(qc, states).mul_(a.unsqueeze(-1))  # (a Q) S_n, the row scale applied to the product
    addmm_(o, torch.matmul(qc, mT(kc)).mul_(D), vc, beta=scale, alpha=scale)
    return o, S, (a, D, states)


def _sum_backward(qc, kc, vc, gc, a, D, states, do_c, dS, scale):
    """``(dq, dk, dv, dg, dS_0)`` in chunks (derivation: ``lmtool/ops/README.md``, "Decay")."""
    G, N, C, Dk = qc.shape
    gamma = D[..., -1, :]
    a_, g_ = a.unsqueeze(-1), gamma.unsqueeze(-1)
    qa, aC = qc * a_, a[..., -1, None, None]
    dS_next = torch.empty_like(states)
    dS = dS.clone()  # updated in place below, never the incoming gradient itself
    for n in range(N - 1, -1, -1):
        dS_next[:, n] = dS
        dS.mul_(aC[:, n]).baddbmm_(mT(qa[:, n]), do_c[:, n], alpha=scale)
    del qa

    QK = torch.matmul(qc, mT(kc)).tril_()
    dPD, dq, dk, da, dgamma = _output_and_write_grads(qc, kc, vc, a, D, gamma, states, dS_next, do_c, scale)
    dv = addmm_(torch.matmul(kc, dS_next).mul_(g_), mT(QK * D), do_c, alpha=scale)
    H = dPD.mul_(QK).mul_(scale)
    dg = _log_decay_grad(a, da, H.sum(-1) - H.sum(-2), gamma, dgamma, states, dS_next)
    return dq, dk, dv, dg, dS


def _delta_forward(qc, kc, vc, bc, gc, s0, scale):
    """The UT form with decay: ``(I + A) U' = diag(b) (V - (a K) S_n)``, ``A = diag(b) (K K^T * D)`` strictly
    lower, so ``U' = U - W S_n`` with ``W = X diag(b) (a K)``, ``U = X diag(b) V``; then as the sum rule with U'."""
    G, N, C, Dk = qc.shape
    Dv = vc.shape[-1]
    a, D, gamma = decay_factors(gc)
    b = bc.unsqueeze(-1)
    A = torch.matmul(kc, mT(kc)).mul_(D).mul_(b)  # only the strictly lower part is read
    eye = torch.eye(C, dtype=qc.dtype, device=qc.device).expand_as(A)
    X = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    T = torch.mul(X, bc.unsqueeze(-2), out=A)
    Ud = torch.matmul(T, vc)  # U, turned into U' in place below
    W = torch.matmul(T.mul_(a.unsqueeze(-2)), kc)  # X diag(b) diag(a) K: a on T's columns, not on K's rows
    kg = kc * gamma.unsqueeze(-1)
    aC = a[..., -1, None, None]  # [G, N, 1, 1]
    states = qc.new_empty(G, N, Dk, Dv)
    S = chunk_state(qc, Dv, s0).clone()  # updated in place below, never the caller's tensor
    for n in range(N):
        states[:, n] = S
        u = Ud[:, n].sub_(torch.bmm(W[:, n], S))
        S.mul_(aC[:, n]).baddbmm_(mT(kg[:, n]), u)
    o = torch.matmul(qc, states).mul_(a.unsqueeze(-1))
    addmm_(o, torch.matmul(qc, mT(kc), out=T).mul_(D), Ud, beta=scale, alpha=scale)
    return o, S, (a, D, X, Ud, states)


def _delta_backward(qc, kc, vc, bc, gc, a, D, X, Ud, states, do_c, dS, scale):
    """``(dq, dk, dv, dbeta, dg, dS_0)`` in chunks (derivation: ``lmtool/ops/README.md``, "Decay").

    Reverse pass over chunks, with ``Z = X^T dU'``:
        dU'_n = scale (tril(Q K^T) * D)^T dO_n + (gamma K_n) dS_{n+1}
        dS_n  = a_C dS_{n+1} + scale (a Q_n)^T dO_n - (a K_n)^T diag(b) Z_n
    After the loop the decay factors scale rows in place: on CPU a fresh full-size temporary costs about as
    much as the multiplication itself.
    """
    G, N, C, Dk = qc.shape
    gamma = D[..., -1, :]
    b, a_, g_ = bc.unsqueeze(-1), a.unsqueeze(-1), gamma.unsqueeze(-1)
    QK = torch.matmul(qc, mT(kc)).tril_()
    Z = torch.matmul(mT(QK * D), do_c)  # chunk n becomes Z_n in the loop
    # the loop's row-scaled operands, each formed once for all chunks
    kg, qa, ba, aC = kc * g_, qc * a_, b * a_, a[..., -1, None, None]
    dS_next = torch.empty_like(states)
    dS = dS.clone()  # updated in place below, never the incoming gradient itself
    for n in range(N - 1, -1, -1):
        dS_next[:, n] = dS
        z = torch.bmm(mT(X[:, n]), torch.baddbmm(Z[:, n], kg[:, n], dS, beta=scale))
        Z[:, n] = z
        dS.mul_(aC[:, n]).baddbmm_(mT(qa[:, n]), do_c[:, n], alpha=scale)
        dS.baddbmm_(mT(kc[:, n]), z.mul_(ba[:, n]), alpha=-1)  # z was copied: scale it in place
    del kg, qa

    dPD, dq, dk, da, dgamma = _output_and_write_grads(qc, kc, Ud, a, D, gamma, states, dS_next, do_c, scale)
    # dA = -tril(Z U'^T, -1) for A = diag(b) (K K^T * D); M collects the terms of dK and dbeta that are
    # multiplied by b and K: dK -= diag(b) M + (diag(b) (-dA) * D)^T K, dbeta = rowsum(Z V) - rowsum(K M).
    negdA_D = torch.matmul(Z, mT(Ud)).tril_(-1).mul_(D)
    ZS = torch.matmul(Z, mT(states))
    kZS = rowdot(kc, ZS)
    da.sub_(kZS * bc)
    M = addmm_(ZS.mul_(a_), negdA_D, kc)
    dk.addcmul_(M, b, value=-1)
    NT = torch.matmul(mT(negdA_D.mul_(b)), kc)  # (diag(b) (-dA) * D)^T K
    dk.sub_(NT)
    kM = rowdot(kc, M)
    dbeta = rowdot(Z, vc).sub_(kM)
    # Gradient w.r.t. the decay factors: of a through (a Q) S_n and (a K) S_n, of D through both triangular
    # products (dD * D = scale dPD * Q K^T + dA * A), of gamma through the state's write. The rows and columns
    # of dA * A are sums the terms above already hold: with A = diag(b) (K K^T * D),
    #   rowsum_t(-dA * A) = b_t k_t . ((-dA * D) K)_t = b_t (k_t . M_t - a_t k_t . (Z S^T)_t)
    #   colsum_j(-dA * A) = k_j . ((diag(b) (-dA) * D)^T K)_j
    H = dPD.mul_(QK).mul_(scale)
    negdA_A_net = (kM - a * kZS).mul_(bc) - rowdot(kc, NT)
    dg = _log_decay_grad(a, da, H.sum(-1) - H.sum(-2) - negdA_A_net, gamma, dgamma, states, dS_next)
    return dq, dk, Z.mul_(b), dbeta, dg, dS
