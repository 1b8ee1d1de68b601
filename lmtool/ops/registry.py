"""Registry of the forms ("impls") of each fast-weight op, input checks and dispatch.

Every form of one op has the same signature, so a new form (e.g. native CUDA kernels) only needs
``register_impl(op, name, fn, devices=..., priority=...)``; ``impl="auto"`` then picks the available
form with the highest priority for the inputs' device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AUTO = "auto"


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    devices: tuple[str, ...] | None  # None: any device type
    priority: int  # "auto" picks the highest available
    is_available: Callable[[torch.device], bool] | None  # e.g. "the extension builds on this machine"
    auto_fn: Callable | None  # what impl="auto" calls, if not fn (a native form that falls back instead of raising)
    reports_use: bool  # the form calls note_use itself with the form that actually ran (native forms fall back)

    def runs_on(self, device: torch.device) -> bool:
        if self.devices is not None and device.type not in self.devices:
            return False
        return self.is_available is None or bool(self.is_available(device))


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_USED: dict[str, dict[str, None]] = {}  # op -> the forms that ran, in order of first use


def note_use(op: str, impl: str) -> None:
    """Record that form ``impl`` of ``op`` ran (see :func:`used_impls`)."""
    _USED.setdefault(op, {})[impl] = None


def used_impls() -> dict[str, list[str]]:
    """The forms each op has actually run in this process, in order of first use: ``{"delta_rule": ["cuda"]}``.
    A native form that fell back (failed build or self-check, float64 inputs) shows as the form that ran."""
    return {op: list(names) for op, names in _USED.items()}


def register_impl(
    op: str,
    name: str,
    fn: Callable,
    *,
    devices: tuple[str, ...] | None = None,
    priority: int = 0,
    is_available: Callable[[torch.device], bool] | None = None,
    auto_fn: Callable | None = None,
    reports_use: bool = False,
) -> None:
    """Register ``fn`` as form ``name`` of ``op`` ("delta_rule", "sum_rule").

    ``fn`` takes the op's exact signature without ``impl``. ``devices`` limits the device types
    (``("cuda",)``) it runs on; ``None`` means any. ``is_available(device)``, if given, is asked at dispatch
    time (e.g. whether native kernels compiled). ``impl="auto"`` picks the available form with the highest
    ``priority``. ``auto_fn``, if given, is what ``impl="auto"`` calls instead of ``fn`` (a native form that
    raises when asked for explicitly but falls back under "auto"). ``reports_use``: the form calls
    :func:`note_use` itself with the form that actually ran. Re-registering a name replaces it.
    """
    if name == AUTO:
        raise ValueError(f"'{AUTO}' is reserved and cannot be registered as an impl")
    _REGISTRY.setdefault(op, {})[name] = _Impl(fn, devices, priority, is_available, auto_fn, reports_use)


def available_impls(op: str, device: torch.device | str | None = None) -> list[str]:
    """Names of the forms of ``op`` that run on ``device`` (all registered ones if None), best first."""
    impls = _REGISTRY.get(op, {})
    names = [n for n, i in impls.items() if device is None or i.runs_on(torch.device(device))]
    return sorted(names, key=lambda n: -impls[n].priority)


def resolve_impl(op: str, impl: str, device: torch.device) -> Callable:
    """The function for ``impl`` (or the best available one for ``"auto"``) on ``device``."""
    impls = _REGISTRY.get(op, {})
    if impl == AUTO:
        names = available_impls(op, device)
        if not names:
            raise ValueError(f"{op}: no impl available for device type '{device.type}'")
        entry = impls[names[0]]
        if not entry.reports_use:
            note_use(op, names[0])
        return entry.auto_fn or entry.fn
    if impl not in impls:
        known = ", ".join([AUTO, *impls])
        raise ValueError(f"{op}: unknown impl '{impl}'; choose one of: {known}")
    entry = impls[impl]
    if entry.devices is not None and device.type not in entry.devices:
        raise ValueError(
            f"{op}: impl '{impl}' runs on {'/'.join(entry.devices)}, not on '{device.type}'; "
            f"use impl='auto' or one of: {', '.join(available_impls(op, device))}"
        )
    if not entry.runs_on(device):
        raise ValueError(
            f"{op}: impl '{impl}' is not available on this machine; "
            f"use impl='auto' or one of: {', '.join(available_impls(op, device))}"
        )
    if not entry.reports_use:
        note_use(op, impl)
    return entry.fn


def check_inputs(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    g: torch.Tensor | None = None,
) -> None:
    """Raise a one-line ValueError unless the shapes, dtypes and devices follow the ops contract."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, H, L, D], got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating point tensor, got {x.dtype}")
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)} [B, H, L, Dk], got {tuple(k.shape)}")
    if v.shape[:3] != (B, H, L):
        raise ValueError(f"{op}: v must have shape [B, H, L, Dv] = [{B}, {H}, {L}, Dv], got {tuple(v.shape)}")
    extra = [("v", v)]
    if op == "delta_rule":
        if not isinstance(beta, torch.Tensor) or tuple(beta.shape) != (B, H, L):
            got = tuple(beta.shape) if isinstance(beta, torch.Tensor) else type(beta).__name__
            raise ValueError(f"{op}: beta must have shape [B, H, L] = [{B}, {H}, {L}], got {got}")
        if not beta.is_floating_point():
            raise ValueError(f"{op}: beta must be a floating point tensor, got {beta.dtype}")
        extra.append(("beta", beta))
    if g is not None:
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != (B, H, L):
            got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{op}: g (log-decay) must have shape [B, H, L] = [{B}, {H}, {L}], got {got}")
        if g.dtype not in (torch.float32, torch.float64):
            # exp of a cumulative sum of half-precision log-decays loses the decay's digits within a chunk
            raise ValueError(f"{op}: g (log-decay) must be float32 or float64, got {g.dtype}")
        extra.append(("g", g))
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != (B, H, Dk, Dv):
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else "non-tensor"
            want = f"[B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}]"
            raise ValueError(f"{op}: initial_state must have shape {want}, got {got}")
        if not initial_state.is_floating_point():
            raise ValueError(f"{op}: initial_state must be floating point, got {initial_state.dtype}")
        extra.append(("initial_state", initial_state))
    for name, x in [("k", k), *extra]:
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}; use one device for all")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the state is never kept in half precision."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def initial_state_or_zeros(
    q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The state before step 1 in `dtype`: `initial_state`, or zeros `[B, H, Dk, Dv]` when it is None."""
    B, H, _, Dk = q.shape
    if initial_state is None:
        return q.new_zeros(B, H, Dk, v.shape[-1], dtype=dtype)
    return initial_state.to(dtype)


def empty_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Result for L = 0: no output tokens and the initial state (zeros if None) as the final state."""
    # o has no elements: adding the inputs into it only puts them in the autograd graph, so that their
    # gradients are tensors (empty, or zeros for the initial state) as for L > 0 rather than missing.
    o = v.to(q.dtype) + q.sum(-1, keepdim=True) + k.to(q.dtype).sum(-1, keepdim=True)
    for per_token in (beta, g):
        if per_token is not None:
            o = o + per_token.to(q.dtype).unsqueeze(-1)
    if initial_state is not None:
        o = o + initial_state.to(q.dtype).sum(-2, keepdim=True)
    if not output_final_state:
        return o, None
    # + 0: a fresh tensor (never the caller's initial_state itself) that still carries the gradient
    return o, initial_state_or_zeros(q, v, initial_state, compute_dtype(q, v, initial_state)) + 0
