"""The recurrent scans' CUDA kernels on the CPU: the real launchers (kernels/delta_rnn_scan.cu, rec_delta_scan.cu,
srwm_scan.cu)
under the SIMT emulation of ``cuda_emulation.py``, behind the real binding (kernels/recurrent_binding.cpp).

Run as a script (``python -m tests.ops.recurrent_emulation EXTENSION``) it checks SANITIZED_CASES through the binding
and exits non-zero on a mismatch: what the test built with AddressSanitizer and UBSan runs in a child process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import torch

from lmtool.ops import recurrent_cuda
from lmtool.ops.checks import TOLERANCE, random_scan_problem, relative_errors, scan_grad_names, scan_outputs_and_grads
from lmtool.ops.recurrent_scan import TORCH_FORMS
from tests.ops import cuda_emulation

SOURCES = ("delta_rnn_scan.cu", "rec_delta_scan.cu", "srwm_scan.cu")
LIBRARY = "liblmtool_rec_emu.so"
NAME = "lmtool_recurrent_emulated"
OPS = list(TORCH_FORMS)


def build(out_dir: Path, *, sanitize: bool) -> Path:
    """The library of the recurrent kernels and launchers on the emulated runtime."""
    return cuda_emulation.build_library(out_dir, sanitize=sanitize, sources=SOURCES, name=LIBRARY)


def build_extension(out_dir: Path, library: Path) -> ModuleType:
    return cuda_emulation.build_extension(out_dir, library, binding="recurrent_binding.cpp", name=NAME)


def run_kernels(ext: ModuleType, p, *, C: int, with_state: bool = True) -> list[torch.Tensor]:
    """The "cuda" form's wrapper, autograd.Function, binding and launchers on ``p`` (no self-check), in
    :func:`lmtool.ops.checks.scan_outputs_and_grads`' order."""

    def kernels(*inputs, initial_state, output_final_state):
        return recurrent_cuda._scan(p.op, list(inputs), initial_state, output_final_state, C, ext)

    return scan_outputs_and_grads(kernels, p, with_state=with_state)


def reference(p, *, with_state: bool = True) -> list[torch.Tensor]:
    """The torch form's outputs and gradients in float64 for the same (rounded) inputs."""
    return scan_outputs_and_grads(TORCH_FORMS[p.op], p.to(torch.float64), with_state=with_state)


def worst(actual, expected, op: str, with_state: bool = True) -> tuple[str, float]:
    errors = relative_errors(actual, expected, scan_grad_names(op, with_state=with_state))
    name = max(errors, key=errors.get)
    return name, errors[name]


# (op, dtype, B, H, L, D, C, with_state): every op, both dtypes, odd D, L not a multiple of C, no initial state, D = 64
SANITIZED_CASES = [
    ("delta_rnn_scan", torch.float32, 2, 2, 11, 5, 4, True),
    ("delta_lstm_scan", torch.bfloat16, 1, 2, 9, 8, 4, True),
    ("rec_delta_scan", torch.float32, 2, 1, 10, 6, 3, False),
    ("delta_lstm_scan", torch.float32, 1, 1, 4, 64, 2, True),
    ("rec_delta_scan", torch.bfloat16, 1, 1, 4, 64, 2, True),
    ("srwm_scan", torch.float32, 2, 1, 7, 5, 3, True),
    ("srwm_scan", torch.bfloat16, 1, 1, 3, 64, 2, False),
]


def run_sanitized_cases(ext: ModuleType) -> int:
    """Runs SANITIZED_CASES with NaN-poisoned kernel outputs; prints one line each; returns the failures."""
    failures = 0
    for i, (op, dtype, B, H, L, D, C, with_state) in enumerate(SANITIZED_CASES):
        p = random_scan_problem(op, B, H, L, D, dtype=dtype, seed=i)
        name, err = worst(run_kernels(ext, p, C=C, with_state=with_state), reference(p, with_state=with_state), op,
                          with_state)  # fmt: skip
        ok = err <= (1e-5 if dtype == torch.float32 else TOLERANCE[dtype])
        failures += not ok
        print(f"{'ok' if ok else 'FAIL'} {op} {dtype} B{B} H{H} L{L} D{D} C{C}: {name} {err:.1e}", flush=True)
    return failures


if __name__ == "__main__":
    import os

    os.environ["LMTOOL_CUDA_POISON"] = "1"
    sys.exit(1 if run_sanitized_cases(cuda_emulation.load_extension_file(sys.argv[1], NAME)) else 0)
