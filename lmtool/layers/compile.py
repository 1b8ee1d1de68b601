"""Optional `torch.compile` of small pure functions inside the layers (`trainer.compile=true`).

Eager PyTorch runs a chain of elementwise ops as one pass over memory per op, forward and backward; inductor fuses
such a chain into one loop. Only short functions of tensors are compiled (no module state, no random numbers,
no custom autograd functions), so that dynamo sees one graph without breaks. Compiling the whole block or model
was measured slower on a 2-core AMD EPYC VM (torch 2.13.0 CPU; docs/training_speed.md).

Compilation is never required: it is off unless `set_compile(True)`, and the first failure of any compiled
function (no C++ compiler, an inductor error, ...) gives one warning and turns compilation off for the process,
the failing call then running eagerly. The first call with gradients also runs the compiled backward once on
copies of its inputs, so that a failure of the (lazily compiled) backward is caught here rather than inside the
training loop's `loss.backward()`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

_state = {"enabled": False}


def set_compile(enabled: bool) -> None:
    """Turn compilation of the functions wrapped by `compilable` on or off for this process."""
    _state["enabled"] = enabled


def compile_enabled() -> bool:
    return _state["enabled"]


def compilable(fn: Callable) -> Callable:
    """`fn` as is, or compiled with `torch.compile(dynamic=False)` while compilation is on (module docstring).
    `fn` takes tensors and constants and returns one tensor."""
    compiled = None
    checked_backward = False

    @functools.wraps(fn)
    def wrapper(*args):
        nonlocal compiled, checked_backward
        if not _state["enabled"]:
            return fn(*args)
        try:
            if compiled is None:
                compiled = torch.compile(fn, dynamic=False)
            grads = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            if grads and not checked_backward:
                probe = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                         for a in args]  # fmt: skip
                out = compiled(*probe)
                torch.autograd.backward(out, torch.ones_like(out))
                checked_backward = True
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any failure of the compiler falls back to eager
            _state["enabled"] = False
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {first[:200]}); running "
                          "eagerly from now on", RuntimeWarning, stacklevel=2)  # fmt: skip
            return fn(*args)

    return wrapper
