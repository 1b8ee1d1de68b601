"""CUDA forms of the recurrent scans (``impl="cuda"`` of ``lmtool.ops.recurrent_scan``: Delta RNN, Delta LSTM,
Recurrent Delta Net, SRWM): build, self-check, autograd wrappers and registration.

The kernels (``kernels/delta_rnn_scan.cu``, ``rec_delta_scan.cu``, ``srwm_scan.cu``; design in
``docs/cuda_kernels.md``) run one
thread block per (batch element, head) over the whole sequence with the fast matrices in shared memory, forward and
backward, for float32 and bfloat16 inputs with float32 state and accumulation, ``1 <= d_head <= 64``. The backward
rebuilds the matrices in reverse (``R_{t-1} = R_t - k_t u_t^T``) from the final state and from checkpoints the
forward stores every ``checkpoint_every`` tokens (default 64), so it never stores a state per token. They are a
second :class:`lmtool.ops.native.NativeExtension` (built on first use, cached under ``$LMTOOL_KERNEL_CACHE``) with
the same rules as the fast-weight kernels (``lmtool.ops.cuda``):

- trust after proof: the first use per (op, dtype, D, device) runs the kernels once, forward and backward, on a
  small random problem against the torch "recurrent" form in float64; a mismatch or a launch error disables that
  kernel for the process with ONE warning and the torch form runs (``impl="cuda"`` asked for explicitly raises
  :class:`KernelSelfCheckFailed`);
- a failed build, a stale build lock or a torch without CUDA: ONE warning, then the torch form;
- float64 inputs, ``d_head > 64`` (the shared memory of a block) or an empty input: the torch form (one warning
  per reason for the first two). ``LMTOOL_CUDA_KERNELS=0`` withdraws the form. The forms record what ran.

Non-finite inputs are not repaired as in the fast-weight kernels: a NaN or inf in one token may also spoil, through
the reverse rebuilding, the gradients of the earlier tokens of its checkpoint segment (the torch form is the spec
of where they belong).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.autograd.function import once_differentiable

from lmtool.ops.checks import (
    TOLERANCE,
    random_scan_problem,
    relative_errors,
    scan_grad_names,
    scan_outputs_and_grads,
    worst_error,
)
from lmtool.ops.cuda import KERNEL_DIR, PRIORITY, runs_on
from lmtool.ops.native import (
    KernelSelfCheckFailed,
    NativeExtension,
    kernel_dtype,
    needs_grad,
    on_device,
    poison_outputs,
    stream_of,
)
from lmtool.ops.recurrent_scan import TORCH_FORMS
from lmtool.ops.registry import note_use, register_impl

SOURCES = ("recurrent_binding.cpp", "delta_rnn_scan.cu", "rec_delta_scan.cu", "srwm_scan.cu")
EXTENSION = NativeExtension("lmtool_recurrent_scan", SOURCES, KERNEL_DIR, what="recurrent CUDA kernels")
MAX_D = 64  # kernels/recurrent_scan.h: kRecMaxD
DEFAULT_CHECKPOINT_EVERY = 64
SELF_CHECK_SHAPE = (1, 2, 21, 8)  # B, H, L and checkpoint_every of the self-check: L is not a multiple of C




class _RNNScan(torch.autograd.Function):
    """Delta RNN (c0 None) or Delta LSTM. Saves k, beta, r_t, y_t (and the LSTM's a_t, c_t), the final matrices and
    the checkpoints: O(L D) per sequence plus O(L / C D^2), never a matrix per token."""

    @staticmethod
    def forward(ctx, z, k, v, beta, R0, y0, c0, C: int, save: bool, ext):
        poison = poison_outputs()
        y, R, y_last, c_last, resid, pre, cells, ckpt = ext.rnn_forward(
            z, k, v, beta, R0, y0, c0, C, save, poison, stream_of(z.device)
        )
        if save:
            ctx.save_for_backward(k, beta, resid, pre, cells, y, y0, c0, R, ckpt)
        ctx.meta = (C, poison, ext, z.dtype)
        ctx.set_materialize_grads(False)
        return (y, R, y_last, c_last) if c0 is not None else (y, R, y_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dR, dy_last, dc_last=None):
        k, beta, resid, pre, cells, y, y0, c0, R, ckpt = ctx.saved_tensors
        C, poison, ext, dt = ctx.meta
        dy = torch.zeros_like(y) if dy is None else dy
        with on_device(k.device):
            dz, dk, dv, dbeta, dR0, dy0, dc0 = ext.rnn_backward(
                k, beta, resid, pre, cells, y, y0, c0, R, ckpt, dy, dR, dy_last, dc_last, C, poison, stream_of(k.device)
            )
        return dz.to(dt), dk.to(dt), dv.to(dt), dbeta, dR0, dy0, dc0 if c0 is not None else None, None, None, None


class _RecDeltaScan(torch.autograd.Function):
    """Recurrent Delta Net. Saves a_t, r_t, y_t, the final W and the checkpoints; the gradient of ``rec`` is summed
    over the batch by the binding (per-sequence shares, no atomics)."""

    @staticmethod
    def forward(ctx, proj, rec, W0, y0, C: int, save: bool, ext):
        poison = poison_outputs()
        y, W, y_last, pre, resid, ckpt = ext.rec_forward(proj, rec, W0, y0, C, save, poison, stream_of(proj.device))
        if save:
            ctx.save_for_backward(rec, pre, resid, y, y0, W, ckpt)
        ctx.meta = (C, poison, ext, proj.dtype)
        ctx.set_materialize_grads(False)
        return y, W, y_last

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dW, dy_last):
        rec, pre, resid, y, y0, W, ckpt = ctx.saved_tensors
        C, poison, ext, dt = ctx.meta
        dy = torch.zeros_like(y) if dy is None else dy
        with on_device(pre.device):
            dproj, drec, dW0, dy0 = ext.rec_backward(
                rec, pre, resid, y, y0, W, ckpt, dy, dW, dy_last, C, poison, stream_of(pre.device)
            )
        return dproj.to(dt), drec, dW0, dy0, None, None, None


class _SRWMScan(torch.autograd.Function):
    """Self-referential weight matrix. Saves x, the read-outs r_t and vd_t = W_{t-1}^T (q_t - k_t) (O(L D) per
    sequence), the final W and the checkpoints."""

    @staticmethod
    def forward(ctx, x, W0, C: int, save: bool, ext):
        poison = poison_outputs()
        y, W, pre, vd, ckpt = ext.srwm_forward(x, W0, C, save, poison, stream_of(x.device))
        if save:
            ctx.save_for_backward(x, pre, vd, W, ckpt)
        ctx.meta = (C, poison, ext)
        ctx.set_materialize_grads(False)
        return y, W

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dW):
        x, pre, vd, W, ckpt = ctx.saved_tensors
        C, poison, ext = ctx.meta
        dy = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if dy is None else dy
        with on_device(x.device):
            dx, dW0 = ext.srwm_backward(x, pre, vd, W, ckpt, dy, dW, C, poison, stream_of(x.device))
        return dx.to(x.dtype), dW0, None, None, None


ONE_INPUT = ("rec_delta_scan", "srwm_scan")  # ops whose per-token input is the first positional only


def head_width(op: str, x: torch.Tensor) -> int:
    """d_head of the op's first input (``proj``'s last size is 3 D + 1)."""
    return (x.shape[-1] - 1) // 3 if op == "rec_delta_scan" else x.shape[-1]


def _initial_state(op: str, x: torch.Tensor, initial_state) -> tuple[torch.Tensor, ...]:
    """The initial state in float32, zeros where None (the kernels always read one)."""
    if initial_state is not None:
        return tuple(s.float() for s in initial_state)
    B, G, D = x.shape[0], x.shape[1], head_width(op, x)
    H = G // 3 if op == "delta_lstm_scan" else G
    if op == "srwm_scan":
        shapes = [(B, G, D, 3 * D + 4)]
    else:
        shapes = [(B, G, D, D), (B, H, D)] + ([(B, H, D)] if op == "delta_lstm_scan" else [])
    return tuple(x.new_zeros(shape, dtype=torch.float32) for shape in shapes)


def _kernel_inputs_dtype(op: str, inputs: list[torch.Tensor]) -> torch.dtype:
    """bf16 when the per-token inputs (z, k, v, proj or x) all are, else float32."""
    return kernel_dtype(*inputs[: 1 if op in ONE_INPUT else 3])


def _scan(op, inputs, initial_state, output_final_state, C, ext):
    """The kernels on ``inputs`` (the op's positionals): y in the first input's dtype, the final state float32."""
    if C < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {C}")
    state = _initial_state(op, inputs[0], initial_state)
    save = needs_grad(*inputs, *(initial_state or ()))
    with on_device(inputs[0].device):
        if op == "srwm_scan":
            dt = kernel_dtype(inputs[0])
            y, *final = _SRWMScan.apply(inputs[0].to(dt), state[0], int(C), save, ext)
        elif op == "rec_delta_scan":
            proj, rec = inputs
            dt = kernel_dtype(proj)
            y, *final = _RecDeltaScan.apply(proj.to(dt), rec.float(), *state, int(C), save, ext)
        else:
            z, k, v, beta = inputs
            dt = kernel_dtype(z, k, v)
            c0 = state[2] if op == "delta_lstm_scan" else None
            y, *final = _RNNScan.apply(z.to(dt), k.to(dt), v.to(dt), beta.float(), state[0], state[1], c0, int(C),
                                       save, ext)  # fmt: skip
    return y.to(inputs[0].dtype), (tuple(final) if output_final_state else None)


def kernel_key(op: str, inputs: list[torch.Tensor]) -> str:
    """The name of the kernel these inputs run, one self-check each: op, dtype, D and device."""
    dtype = "bf16" if _kernel_inputs_dtype(op, inputs) == torch.bfloat16 else "fp32"
    return f"{op}[{dtype}, D={head_width(op, inputs[0])}, {inputs[0].device}]"


def _self_check(op: str, ext: ModuleType, dtype: torch.dtype, D: int, device) -> None:
    """Run the kernels once on a small random problem (outputs, final state and every gradient) and raise if they
    differ from the torch form in float64 on the same (rounded) inputs, or fail to launch."""
    B, H, L, C = SELF_CHECK_SHAPE

    def kernels(*inputs, initial_state, output_final_state):  # no self-check in here
        return _scan(op, list(inputs), initial_state, output_final_state, C, ext)

    with torch.inference_mode(False), torch.autocast(device_type=torch.device(device).type, enabled=False):
        problem = random_scan_problem(op, B, H, L, D, dtype=dtype, device=device, seed=0)
        actual = scan_outputs_and_grads(kernels, problem)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # a launch or memory error shows here, not in a later op
        expected = scan_outputs_and_grads(TORCH_FORMS[op], problem.to(torch.float64))
    error = worst_error(relative_errors(actual, expected, scan_grad_names(op)), TOLERANCE[dtype])
    if error is not None:
        raise KernelSelfCheckFailed(error)


def _kernels_for(op: str, inputs: list[torch.Tensor], initial_state) -> ModuleType | None:
    """The extension if it handles these inputs, else None (the caller runs the torch form)."""
    x = inputs[0]
    if any(t.numel() == 0 for t in inputs):
        return None
    if any(t.dtype == torch.float64 for t in [*inputs, *(initial_state or ())]):
        EXTENSION.warn_once("float64", "lmtool: the recurrent CUDA kernels compute in float32; float64 uses torch")
        return None
    if head_width(op, x) > MAX_D:
        EXTENSION.warn_once("d", f"lmtool: the recurrent CUDA kernels support d_head <= {MAX_D}; wider heads use torch")
        return None
    return EXTENSION.load()


def _run(op, inputs, initial_state, output_final_state, checkpoint_every, strict):
    """The kernels if they build, take these inputs and passed their self-check; else the torch form."""
    ext = _kernels_for(op, inputs, initial_state)
    if ext is not None:

        def check():
            _self_check(op, ext, _kernel_inputs_dtype(op, inputs), head_width(op, inputs[0]), inputs[0].device)

        if EXTENSION.trusted(kernel_key(op, inputs), check, strict=strict):
            note_use(op, "cuda")
            return _scan(op, inputs, initial_state, output_final_state, checkpoint_every, ext)
    note_use(op, "recurrent")
    return TORCH_FORMS[op](*inputs, initial_state=initial_state, output_final_state=output_final_state)


def _form(op: str):
    """The "cuda" form of ``op``: the op's signature plus ``checkpoint_every`` and ``strict`` (True: a kernel that
    failed its self-check raises; False, what impl="auto" uses: the torch form runs instead)."""

    def form(*inputs, initial_state=None, output_final_state=False, checkpoint_every=DEFAULT_CHECKPOINT_EVERY,
             strict=True):  # fmt: skip
        return _run(op, list(inputs), initial_state, output_final_state, checkpoint_every, strict)

    form.__name__ = f"{op}_cuda"
    return form


CUDA_FORMS = {op: _form(op) for op in TORCH_FORMS}

for _op, _fn in CUDA_FORMS.items():
    register_impl(
        _op, "cuda", _fn, devices=("cuda",), priority=PRIORITY, is_available=runs_on,
        auto_fn=lambda *a, _fn=_fn, **kw: _fn(*a, strict=False, **kw), reports_use=True,
    )  # fmt: skip
