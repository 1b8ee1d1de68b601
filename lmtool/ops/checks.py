"""Shared pieces for checking and timing the ops' forms: random problems, gradients, errors and FLOP counts.

The native kernels' self-check (``lmtool.ops.cuda``), the tests, ``scripts/bench_ops.py`` and
``scripts/gpu_check.py`` all build their inputs, compare forms and count useful FLOPs with these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

# Useful FLOPs per token, head and state entry (Dk * Dv) of forward+backward; the forward alone is a third.
FLOPS_PER_ENTRY = {"delta_rule": 18, "sum_rule": 12}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # relative Frobenius error against float64


def useful_flops(op: str, B: int, H: int, L: int, Dk: int, Dv: int, *, backward: bool) -> float:
    """The recurrence's own FLOPs, whatever a form executes: 18 (delta) or 12 (sum) x B H L Dk Dv for
    forward+backward, a third of that for the forward only."""
    return FLOPS_PER_ENTRY[op] * B * H * L * Dk * Dv / (1 if backward else 3)


@dataclass
class Problem:
    """One op's inputs (rounded to their dtype), initial state and upstream gradients; ``beta`` and ``g`` are
    None where the op or the case has none."""

    op: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor | None
    g: torch.Tensor | None
    s0: torch.Tensor
    grad_o: torch.Tensor
    grad_s: torch.Tensor

    def inputs(self) -> list[torch.Tensor]:
        """The op's positional inputs: q, k, v (and beta for the delta rule)."""
        return [self.q, self.k, self.v] + ([self.beta] if self.op == "delta_rule" else [])

    def to(self, dtype: torch.dtype) -> Problem:
        """The same problem in ``dtype`` (the float64 reference sees the values the low-precision form saw)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "op"}
        return replace(self, **{n: None if x is None else x.to(dtype) for n, x in moved.items()})


def random_problem(
    op: str,
    B: int,
    H: int,
    L: int,
    Dk: int,
    Dv: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    decay: float | None = None,
    strided: bool = False,
) -> Problem:
    """Fresh random inputs where the rules are stable: unit keys, beta in (0, 1), a state of norm ~ 0.5 per entry.

    ``decay``: a float32 log-decay g with alpha = exp(g) uniform in (1 - decay, 1] (None: no g). ``strided``:
    q, k, v are views of one ``[B, L, 3, H, D]`` buffer permuted to ``[B, H, L, D]``, like the layer's
    projections (unit stride along D only), and beta a transposed view. Drawn on the CPU (the same values on
    every device), then moved to ``device``; q, k, v, beta and grad_o are rounded to ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, Dk, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, H, L, Dk, generator=gen), dim=-1)
    v = torch.randn(B, H, L, Dv, generator=gen)
    beta = torch.sigmoid(torch.randn(B, H, L, generator=gen)) if op == "delta_rule" else None
    s0 = 0.5 * torch.randn(B, H, Dk, Dv, generator=gen)
    grad_o, grad_s = torch.randn(B, H, L, Dv, generator=gen), torch.randn(B, H, Dk, Dv, generator=gen)
    g = None if decay is None else torch.log1p(-decay * torch.rand(B, H, L, generator=gen))
    q, k, v, grad_o = (x.to(device=device, dtype=dtype) for x in (q, k, v, grad_o))
    beta = None if beta is None else beta.to(device=device, dtype=dtype)
    if strided:
        buf = torch.zeros(B, L, 3, H, max(Dk, Dv), device=device, dtype=dtype)
        for i, x in enumerate((q, k, v)):
            buf[:, :, i, :, : x.shape[-1]] = x.transpose(1, 2)
        q, k, v = (buf[:, :, i].permute(0, 2, 1, 3)[..., : x.shape[-1]] for i, x in enumerate((q, k, v)))
        beta = None if beta is None else beta.transpose(1, 2).contiguous().transpose(1, 2)
    g = None if g is None else g.to(device)
    return Problem(op, q, k, v, beta, g, s0.to(device), grad_o, grad_s.to(device))


def grad_names(op: str, *, decay: bool = False, with_state: bool = True) -> list[str]:
    """Names of :func:`outputs_and_grads`' tensors, in order."""
    per_token = ["dbeta"] if op == "delta_rule" else []
    return ["o", "S", "dq", "dk", "dv", *per_token, *(["dg"] if decay else []), *(["ds0"] if with_state else [])]


def outputs_and_grads(
    fn: Callable, p: Problem, *, with_state: bool = True, loss: str = "o+S", **kwargs
) -> list[torch.Tensor]:
    """``[o, S, dq, dk, dv, (dbeta), (dg), (ds0)]`` of ``fn(*inputs, g=..., initial_state=..., **kwargs)`` under the
    loss ``<o, grad_o> + <S, grad_s>`` (``loss="o"`` or ``"S"``: one term). Gradients of unused inputs are zeros."""
    leaves = [x.detach().clone().requires_grad_() for x in p.inputs()]
    g = None if p.g is None else p.g.detach().clone().requires_grad_()
    s0 = p.s0.detach().clone().requires_grad_() if with_state else None
    with torch.enable_grad():
        o, S = fn(*leaves, g=g, initial_state=s0, output_final_state=True, **kwargs)
        value = 0
        if "o" in loss:
            value = value + (o.double() * p.grad_o.double()).sum()
        if "S" in loss:
            value = value + (S.double() * p.grad_s.double()).sum()
        wrt = [*leaves, *([g] if g is not None else []), *([s0] if with_state else [])]
        grads = torch.autograd.grad(value, wrt, allow_unused=True)
    return [o.detach(), S.detach(), *(torch.zeros_like(x) if d is None else d for x, d in zip(wrt, grads, strict=True))]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|a - e| / |e|`` (Frobenius, float64; absolute where ``e`` is zero); inf if ``a`` has a NaN or inf."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    norm = e.norm().item()
    return (a - e).norm().item() / (norm if norm > 0 else 1.0)


def relative_errors(actual: list[torch.Tensor], expected: list[torch.Tensor], names: list[str]) -> dict[str, float]:
    """:func:`relative_error` per named tensor."""
    return {n: relative_error(a, e) for n, a, e in zip(names, actual, expected, strict=True)}


def worst_error(errors: dict[str, float], tol: float) -> str | None:
    """None if every error is within ``tol``, else a one-line description of the worst tensor."""
    name = max(errors, key=errors.get)
    return None if errors[name] <= tol else f"{name}: relative error {errors[name]:.2e} > {tol:.0e}"


# --- the recurrent scans (lmtool.ops.recurrent_scan) ----------------------------------------------------------

SCAN_INPUTS = {"delta_rnn_scan": ("z", "k", "v", "beta"), "delta_lstm_scan": ("z", "k", "v", "beta"),
               "rec_delta_scan": ("proj", "rec"), "srwm_scan": ("x",)}  # fmt: skip
SCAN_STATE = {"delta_rnn_scan": ("R", "y"), "delta_lstm_scan": ("R", "y", "c"), "rec_delta_scan": ("W", "y"),
              "srwm_scan": ("W",)}  # fmt: skip


@dataclass
class ScanProblem:
    """One scan's positional inputs (rounded to their dtype; ``rec`` stays float32 like a parameter), initial state
    (float32) and upstream gradients of the outputs ``y`` and of each final-state entry."""

    op: str
    inputs: list[torch.Tensor]
    state: tuple[torch.Tensor, ...]
    grad_y: torch.Tensor
    grad_state: tuple[torch.Tensor, ...]

    def to(self, dtype: torch.dtype) -> ScanProblem:
        """The same problem in ``dtype`` (the float64 reference sees the values the low-precision form saw)."""

        def cast(xs):
            return [x.to(dtype) for x in xs]

        return replace(self, inputs=cast(self.inputs), state=tuple(cast(self.state)), grad_y=self.grad_y.to(dtype),
                       grad_state=tuple(cast(self.grad_state)))  # fmt: skip


def random_scan_problem(
    op: str, B: int, H: int, L: int, D: int, *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0
) -> ScanProblem:
    """Fresh random inputs where the scans are stable (softmax keys, beta in (0, 1)) and a non-zero initial state;
    drawn on the CPU (the same values on every device), per-token inputs rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return std * torch.randn(*shape, generator=gen)

    if op == "srwm_scan":  # W_0 as the layer initialises it: the learning-rate columns around sigmoid(-1)
        W0 = randn(B, H, D, 3 * D + 4, std=D**-0.5)
        W0[..., 3 * D :] -= 1.0
        inputs, state = [randn(B, H, L, D).to(dtype)], (W0,)
    elif op == "rec_delta_scan":
        P = 3 * D + 1
        inputs = [randn(B, H, L, P).to(dtype), randn(H, D, P, std=D**-0.5)]
        state = (randn(B, H, D, D, std=0.3), randn(B, H, D, std=0.5))
    else:
        G = 3 * H if op == "delta_lstm_scan" else H
        z, k, v, beta = randn(B, G, L, D), torch.softmax(randn(B, G, L, D), -1), randn(B, G, L, D), randn(B, G, L)
        inputs = [x.to(dtype) for x in (z, k, v, torch.sigmoid(beta))]
        state = (randn(B, G, D, D, std=0.3), *(randn(B, H, D, std=0.5) for _ in SCAN_STATE[op][1:]))
    grad_y, grad_state = randn(B, H, L, D).to(dtype), tuple(randn(*s.shape) for s in state)
    on = [[x.to(device) for x in xs] for xs in (inputs, state, [grad_y], grad_state)]
    return ScanProblem(op, on[0], tuple(on[1]), on[2][0], tuple(on[3]))


def scan_grad_names(op: str, *, with_state: bool = True) -> list[str]:
    """Names of :func:`scan_outputs_and_grads`' tensors, in order."""
    final = [f"final_{s}" for s in SCAN_STATE[op]]
    return ["y", *final, *(f"d{x}" for x in SCAN_INPUTS[op]), *(f"d{s}0" for s in SCAN_STATE[op] if with_state)]


def scan_outputs_and_grads(fn: Callable, p: ScanProblem, *, with_state: bool = True, **kwargs) -> list[torch.Tensor]:
    """``[y, *final_state, *d inputs, *d initial_state]`` of ``fn(*inputs, initial_state=..., **kwargs)`` under the loss
    ``<y, grad_y> + sum <final_i, grad_state_i>``. Gradients of unused inputs are zeros."""
    leaves = [x.detach().clone().requires_grad_() for x in p.inputs]
    state = tuple(s.detach().clone().requires_grad_() for s in p.state) if with_state else None
    with torch.enable_grad():
        y, final = fn(*leaves, initial_state=state, output_final_state=True, **kwargs)
        value = (y.double() * p.grad_y.double()).sum()
        for f, g in zip(final, p.grad_state, strict=True):
            value = value + (f.double() * g.double()).sum()
        wrt = [*leaves, *(state or ())]
        grads = torch.autograd.grad(value, wrt, allow_unused=True)
    outs = [y.detach(), *(f.detach() for f in final)]
    return outs + [torch.zeros_like(x) if d is None else d for x, d in zip(wrt, grads, strict=True)]
