"""Native CUDA forms of the fast-weight ops (``impl="cuda"``): build, registration and autograd wrappers.

The kernels (``kernels/fast_weight_*.cu``, design in ``docs/cuda_kernels.md``) run one sequential scan per
(sequence, column tile of the state) with the state in registers, forward and backward, for float32 and
bfloat16 inputs with a float32 state, ``Dk <= 512`` and any ``Dv``. They are compiled on first use for the
GPU's architecture with ``torch.utils.cpp_extension.load`` (ninja) and cached under ``$LMTOOL_KERNEL_CACHE``
(default ``~/.cache/lmtool/kernels``).

The backward recomputes the states instead of storing one per token: it runs the recurrence in reverse from
the final state (``S_{t-1} = S_t - k_t u_t^T``) and reloads ``S`` from a checkpoint the forward stored every
``checkpoint_every`` tokens (default 64), which bounds the float32 error of the reconstruction. Where a NaN or
inf spoils that subtraction, it recomputes S forward from the last checkpoint (or the initial state, which the
wrapper saves for it), so a non-finite token affects no gradient that the recurrent form keeps finite. The
forms take ``checkpoint_every`` as an extra keyword. Shapes with nothing to scan (B, H, L, Dk or Dv = 0) run the
chunk form without building anything.

With a per-token log-decay ``g`` ([B, H, L], float32; ``S_{t-1} <- exp(g_t) S_{t-1}`` before step t) the same
kernels run a variant compiled with the decay (``g=None`` runs the kernels without it, unchanged). Its backward
never divides by ``exp(g_t)``, which would lose everything when the decay is strong: on entering a checkpoint
segment it recomputes the segment's states forward from the segment's stored start state into a scratch of
``min(checkpoint_every, L)`` states per sequence (freed after the backward), and reads them back in reverse. That
costs one extra state update and one store and load of the state per token; gradients flow to ``g`` as well.

Trust after proof: the first time a kernel runs in this process for an op, dtype, key and value width (Dk, Dv),
with or without g, and device, it first runs once on a small random problem (fwd+bwd, checkpoints every 8 tokens)
against the torch chunk form in float64 (``_self_check``). A mismatch or a launch error disables that kernel for
the process with ONE warning naming it and the error, and the chunk form runs instead; ``impl="cuda"`` asked for
explicitly raises :class:`KernelSelfCheckFailed` instead (``impl="auto"`` calls the forms with ``strict=False``).

Fallbacks (a missing toolchain or GPU never crashes a run):
- CPU tensors: "cuda" is registered for CUDA devices only, so ``impl="auto"`` picks "chunk" there and
  ``impl="cuda"`` on a CPU tensor raises the registry's one-line ValueError (it names the forms that run).
- no CUDA toolkit, no ninja, a failed build, a build lock older than ``$LMTOOL_KERNEL_LOCK_TIMEOUT_S`` or a torch
  without CUDA: :func:`load_extension` warns ONCE and returns None; the "cuda" form then runs the "chunk" form.
- float64 inputs (``g`` included) or ``Dk > 512``: the "chunk" form, with one warning per reason.
``LMTOOL_CUDA_KERNELS=0`` removes the form from this process (``impl="auto"`` then picks "chunk" on CUDA).
The forms record what actually ran (``lmtool.ops.registry.used_impls``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from lmtool.ops.checks import TOLERANCE, grad_names, outputs_and_grads, random_problem, relative_errors, worst_error
from lmtool.ops.delta_rule import delta_rule_chunk
from lmtool.ops.native import (  # KernelsUnavailable and kernel_cache_dir: part of this module's API
    KernelSelfCheckFailed,
    KernelsUnavailable,  # noqa: F401
    NativeExtension,
    kernel_cache_dir,  # noqa: F401
    kernel_dtype,
    needs_grad,
    on_device,
    poison_outputs,
    stream_of,
)
from lmtool.ops.registry import note_use, register_impl
from lmtool.ops.sum_rule import sum_rule_chunk

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
SOURCES = ("fast_weight_binding.cpp", "fast_weight_forward.cu", "fast_weight_backward.cu")
EXTENSION = NativeExtension("lmtool_fast_weight", SOURCES, KERNEL_DIR, what="CUDA kernels")
MAX_DK = 512  # kernels/fast_weight.h: kMaxDk
DEFAULT_CHECKPOINT_EVERY = 64  # the backward reloads S every C tokens instead of reconstructing it further
PRIORITY = 20  # above "chunk" (10): impl="auto" picks the kernels on CUDA devices
SELF_CHECK_SHAPE = (1, 2, 21, 8)  # B, H, L and checkpoint_every of the self-check: L is not a multiple of C



def build_extension(verbose: bool = False) -> ModuleType:
    """Compile (or load from the cache) the extension for the current GPU; raise KernelsUnavailable if impossible."""
    return EXTENSION.build(verbose)


def load_extension() -> ModuleType | None:
    """The extension, built on the first call; None after ONE warning where it cannot be built or loaded."""
    return EXTENSION.load()


def unavailable_reason() -> str | None:
    """Why :func:`load_extension` returned None (None if it has not been tried or succeeded)."""
    return EXTENSION.reason



def _kernels_for(q: torch.Tensor, tensors: list[torch.Tensor | None]) -> ModuleType | None:
    """The extension if it handles these inputs, else None (the caller runs the chunk form)."""
    if q.numel() == 0 or tensors[2].numel() == 0:  # nothing to scan (B, H, Dk or Dv is 0)
        return None
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        EXTENSION.warn_once("float64", "lmtool: the CUDA kernels compute in float32; float64 inputs use impl='chunk'")
        return None
    if q.shape[-1] > MAX_DK:
        EXTENSION.warn_once("dk", f"lmtool: the CUDA kernels support Dk <= {MAX_DK}; larger keys use impl='chunk'")
        return None
    return load_extension()


class _FastWeightScan(torch.autograd.Function):
    """Forward saves q, k, r (delta) or v (sum), beta, g, the final state and S every C tokens; nothing per token
    of size Dk x Dv. The backward reconstructs S in reverse between checkpoints, or with g recomputes each
    checkpoint segment's states forward."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, s0, scale: float, C: int, save: bool, ext):
        poison = poison_outputs()
        o, S, resid, ckpt = ext.forward(q, k, v, beta, g, s0, scale, C, save, poison, stream_of(q.device))
        if save:  # s0: the backward may recompute S forward from it (after a NaN or inf, and always with g)
            ctx.save_for_backward(q, k, resid if beta is not None else v, beta, g, s0, S, ckpt)
        ctx.meta = (scale, C, poison, ext, None if s0 is None else s0.dtype)
        ctx.set_materialize_grads(False)
        return o, S

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS):
        q, k, x, beta, g, s0, S, ckpt = ctx.saved_tensors
        scale, C, poison, ext, s0_dtype = ctx.meta
        do = q.new_zeros(*q.shape[:3], x.shape[-1]) if do is None else do.to(q.dtype)
        with on_device(q.device):
            dq, dk, dv, dbeta, ds0, dg = ext.backward(
                q, k, x, beta, g, do, s0, S, dS, ckpt, scale, C, poison, stream_of(q.device)
            )
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv,
            dbeta if beta is not None else None,
            dg if g is not None else None,
            ds0.to(s0_dtype) if s0_dtype is not None else None,
            None,
            None,
            None,
            None,
        )


def _scan(q, k, v, beta, g, scale, initial_state, output_final_state, checkpoint_every, ext):
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every}")
    dt = kernel_dtype(q, k, v)
    save = needs_grad(q, k, v, beta, g, initial_state)
    beta32 = None if beta is None else beta.float()
    g32 = None if g is None else g.float()  # the registry allows float32 or float64; float64 ran "chunk" already
    with on_device(q.device):
        o, S = _FastWeightScan.apply(
            q.to(dt), k.to(dt), v.to(dt), beta32, g32, initial_state, float(scale), int(checkpoint_every), save, ext
        )
    return o.to(q.dtype), (S if output_final_state else None)


def kernel_key(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> str:
    """The name of the kernel these inputs run, one self-check each: op, dtype, Dk, Dv, decay and device."""
    dtype = "bf16" if kernel_dtype(q, k, v) == torch.bfloat16 else "fp32"
    decay = ", g" if g is not None else ""
    return f"{op}[{dtype}, Dk={q.shape[-1]}, Dv={v.shape[-1]}{decay}, {q.device}]"


def _self_check(op: str, ext: ModuleType, dtype: torch.dtype, Dk: int, Dv: int, decay: bool, device) -> None:
    """Run the kernels once on a small random problem (outputs, final state and every gradient) and raise if they
    differ from the chunk form in float64 on the same (rounded) inputs, or fail to launch."""
    B, H, L, C = SELF_CHECK_SHAPE

    def kernels(q, k, v, beta=None, *, g, scale, initial_state, output_final_state):  # no self-check in here
        return _scan(q, k, v, beta, g, scale, initial_state, output_final_state, C, ext)

    # Whatever the caller's mode (autocast, no_grad, inference_mode): plain tensors with autograd. The inputs come
    # from their own generator, so the check leaves torch's random state as it was.
    with torch.inference_mode(False), torch.autocast(device_type=torch.device(device).type, enabled=False):
        decay_ = 0.5 if decay else None
        problem = random_problem(op, B, H, L, Dk, Dv, dtype=dtype, device=device, seed=0, decay=decay_)
        actual = outputs_and_grads(kernels, problem, scale=0.5)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # a launch or memory error shows here, not in a later op
        expected = outputs_and_grads(CHUNK_FORMS[op], problem.to(torch.float64), scale=0.5)
    names = grad_names(op, decay=decay)
    error = worst_error(relative_errors(actual, expected, names), TOLERANCE[dtype])
    if error is not None:
        raise KernelSelfCheckFailed(error)


def _run(op, q, k, v, beta, g, scale, initial_state, output_final_state, checkpoint_every, strict):
    """The kernels if they build, take these inputs and passed their self-check; else the chunk form."""
    ext = _kernels_for(q, [q, k, v, beta, initial_state, g])
    if ext is not None:
        key = kernel_key(op, q, k, v, g)
        dt = kernel_dtype(q, k, v)

        def check():
            _self_check(op, ext, dt, q.shape[-1], v.shape[-1], g is not None, q.device)

        if EXTENSION.trusted(key, check, strict=strict):
            note_use(op, "cuda")
            return _scan(q, k, v, beta, g, scale, initial_state, output_final_state, checkpoint_every, ext)
    note_use(op, "chunk")
    rest = {"g": g, "scale": scale, "initial_state": initial_state, "output_final_state": output_final_state}
    return CHUNK_FORMS[op](q, k, v, *([beta] if op == "delta_rule" else []), **rest)


def delta_rule_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    strict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lmtool.ops.delta_rule` as a CUDA scan: same signature, plus ``checkpoint_every`` (module doc) and
    ``strict`` (True: raise KernelSelfCheckFailed for a kernel that failed its self-check; False, what
    ``impl="auto"`` uses: run the chunk form instead)."""
    return _run("delta_rule", q, k, v, beta, g, scale, initial_state, output_final_state, checkpoint_every, strict)


def sum_rule_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    strict: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`lmtool.ops.sum_rule` as a CUDA scan: same signature, plus ``checkpoint_every`` and ``strict`` (see
    :func:`delta_rule_cuda`)."""
    return _run("sum_rule", q, k, v, None, g, scale, initial_state, output_final_state, checkpoint_every, strict)


CHUNK_FORMS = {"delta_rule": delta_rule_chunk, "sum_rule": sum_rule_chunk}
CUDA_FORMS = {"delta_rule": delta_rule_cuda, "sum_rule": sum_rule_cuda}


def runs_on(device: torch.device) -> bool:
    """Whether "cuda" is offered for ``device``: a CUDA device, torch with CUDA, not disabled by the environment.

    Cheap on purpose (it runs at every dispatch): the build happens on the first call, and a failed build
    falls back to the chunk form inside the call.
    """
    return device.type == "cuda" and os.environ.get("LMTOOL_CUDA_KERNELS", "1") != "0" and torch.cuda.is_available()


for _op, _fn in CUDA_FORMS.items():
    register_impl(
        _op, "cuda", _fn, devices=("cuda",), priority=PRIORITY, is_available=runs_on,
        auto_fn=lambda *a, _fn=_fn, **kw: _fn(*a, strict=False, **kw), reports_use=True,
    )  # fmt: skip
