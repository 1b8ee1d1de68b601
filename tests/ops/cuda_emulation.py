"""The CUDA kernels on the CPU: their real launchers and device code under a small SIMT emulation, behind the real
torch binding.

``kernels/fast_weight_{forward,backward}.cu`` compile with g++ as C++ against the stand-ins in ``emulation/``
(``cuda_runtime.h``: qualifiers as no-ops, ``dim3``, the launch; ``cuda_bf16.h``; ``emu_runtime.cpp``: one
std::thread per CUDA thread, shuffles and barriers as barriers) into ``liblmtool_fw_emu.so``, the host API of
``kernels/fast_weight.h``. ``kernels/fast_weight_binding.cpp``, built for CPU tensors
(``-DLMTOOL_FW_HOST_EMULATION``), links against it. The library also comes built with AddressSanitizer and UBSan;
a process that preloads libasan and that library (:func:`sanitizer_env`) runs the same binding on it, so that an
out-of-bounds access or undefined behaviour ends the run with a report instead of a segfault or a silent error.

Run as a script (``python -m tests.ops.cuda_emulation EXTENSION``) it checks a set of cases through the binding and
exits non-zero on a mismatch: what the sanitized test runs in a child process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from lmtool.ops import delta_rule, sum_rule
from lmtool.ops.checks import Problem, grad_names, outputs_and_grads, random_problem, relative_errors

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
STAND_INS = Path(__file__).resolve().parent / "emulation"
LIBRARY = "liblmtool_fw_emu.so"
SANITIZE = ["-O0", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
OPS = {"delta_rule": delta_rule, "sum_rule": sum_rule}


FAST_WEIGHT_SOURCES = ("fast_weight_forward.cu", "fast_weight_backward.cu")


def build_library(out_dir: Path, *, sanitize: bool, sources=FAST_WEIGHT_SOURCES, name: str = LIBRARY) -> Path:
    """The real launchers and kernels of ``sources`` (in kernels/) plus the emulated runtime as ``out_dir/name``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["g++", "-std=c++17", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror"]
    cmd += SANITIZE if sanitize else ["-O1"]
    cmd += ["-DLMTOOL_FW_HOST_EMULATION", f"-I{STAND_INS}", f"-I{KERNELS}", f"-Wl,-soname,{name}"]
    cmd += ["-x", "c++", *(str(KERNELS / source) for source in sources)]
    cmd += ["-x", "none", str(STAND_INS / "emu_runtime.cpp"), "-o", str(out_dir / name)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the emulation failed:\n{result.stderr[-4000:]}")
    return out_dir / name


def build_extension(
    out_dir: Path, library: Path, *, binding: str = "fast_weight_binding.cpp", name: str = "lmtool_fast_weight_emulated"
) -> ModuleType:
    """A binding in kernels/ for CPU tensors, linked against ``library`` (also its compile check against torch's
    headers: it includes no CUDA header)."""
    from torch.utils import cpp_extension

    out_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=[str(KERNELS / binding)],
        extra_include_paths=[str(KERNELS)],
        extra_cflags=["-O1", "-DLMTOOL_FW_HOST_EMULATION"],
        extra_ldflags=["-pthread", str(library), f"-Wl,-rpath,{library.parent}"],
        build_directory=str(out_dir),
    )


def load_extension_file(path: str | Path, name: str = "lmtool_fast_weight_emulated") -> ModuleType:
    """A built extension module from its .so file (in a child process, without rebuilding)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def sanitizer_env(sanitized_library: Path, **extra: str) -> dict[str, str]:
    """Environment of a child process whose binding runs on the sanitized library: libasan first, then that
    library (same soname, so the binding's own link resolves to it); leaks are not checked (Python's own)."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, **extra}
    env["LD_PRELOAD"] = f"{libasan} {sanitized_library}"
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=23"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=24"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def run_sanitized_child(module: str, extension: ModuleType, library: Path, **env: str) -> subprocess.CompletedProcess:
    """``python -m module EXTENSION_FILE`` in a child whose binding runs on the sanitized ``library``."""
    cmd = [sys.executable, "-m", module, extension.__file__]
    return subprocess.run(cmd, env=sanitizer_env(library, **env), capture_output=True, text=True, cwd=ROOT,
                          timeout=600)  # fmt: skip


def have_toolchain() -> bool:
    return shutil.which("g++") is not None and shutil.which("ninja") is not None


def run_kernels(
    ext: ModuleType, p: Problem, *, scale: float, C: int, with_state: bool = True, loss: str = "o+S",
    warps: int = 0, flush: int = 0, vectorize: bool = True,
) -> list[torch.Tensor]:  # fmt: skip
    """The binding's forward then backward on ``p`` with every kernel output NaN-poisoned first, in
    :func:`lmtool.ops.checks.outputs_and_grads`' order. ``warps``/``flush``/``vectorize`` override the block layout
    (0 / True: the launchers' choice); ``loss`` without "S" passes no final-state gradient."""
    delta = p.op == "delta_rule"
    dtype = torch.bfloat16 if p.q.dtype == torch.bfloat16 else torch.float32
    q, k, v = (x.to(dtype) for x in (p.q, p.k, p.v))
    beta = p.beta.float() if delta else None
    s0 = p.s0.float() if with_state else None
    o, S, resid, ckpt = ext.forward(q, k, v, beta, p.g, s0, scale, C, True, True, 0, warps, vectorize)
    dS = p.grad_s.float() if "S" in loss else None
    do = p.grad_o.to(dtype) if "o" in loss else torch.zeros_like(o)
    x = resid if delta else v
    dq, dk, dv, dbeta, ds0, dg = ext.backward(
        q, k, x, beta, p.g, do, s0, S, dS, ckpt, scale, C, True, 0, warps, flush, vectorize
    )
    per_token = [dbeta] if delta else []
    return [o, S, dq, dk, dv, *per_token, *([dg] if p.g is not None else []), *([ds0] if with_state else [])]


def reference(p: Problem, *, scale: float, with_state: bool = True, loss: str = "o+S") -> list[torch.Tensor]:
    """The recurrent form's outputs and gradients in float64 for the same (rounded) inputs."""
    return outputs_and_grads(
        OPS[p.op], p.to(torch.float64), scale=scale, with_state=with_state, loss=loss, impl="recurrent"
    )


def max_error(actual: list[torch.Tensor], expected: list[torch.Tensor], p: Problem, with_state: bool = True) -> tuple:
    """(worst tensor name, its relative error) of :func:`run_kernels` against :func:`reference`."""
    names = grad_names(p.op, decay=p.g is not None, with_state=with_state)
    errors = relative_errors(actual, expected, names)
    worst = max(errors, key=errors.get)
    return worst, errors[worst]


def strong_log_decay(B: int, H: int, L: int, *, seed: int) -> torch.Tensor:
    """float32 log-decays in [-3, 0], with every third token (from the second) in [-20, -10]: alpha_t down to 2e-9,
    between tokens whose states still carry history."""
    gen = torch.Generator().manual_seed(seed)
    g = -3 * torch.rand(B, H, L, generator=gen)
    g[..., 1::3] = -10 - 10 * torch.rand(B, H, len(range(1, L, 3)), generator=gen)
    return g


def log_decay(kind: str, B: int, H: int, L: int, *, seed: int, strided: bool = False) -> torch.Tensor:
    """float32 log-decays g [B, H, L]: "g0" (zeros), "moderate" (uniform in [-3, 0]), "strong" (down to -20, see
    :func:`strong_log_decay`); ``strided`` gives a transposed view, as for beta."""
    if kind == "g0":
        g = torch.zeros(B, H, L)
    elif kind == "moderate":
        g = -3 * torch.rand(B, H, L, generator=torch.Generator().manual_seed(seed))
    else:
        g = strong_log_decay(B, H, L, seed=seed)
    return g.transpose(1, 2).contiguous().transpose(1, 2) if strided else g


def assert_dg_close_per_decay(dg: torch.Tensor, expected: torch.Tensor, g: torch.Tensor, tol: float) -> None:
    """dg_t = alpha_t <S_{t-1}, G~_t> is as small as alpha_t: compare dg_t / alpha_t, so that the tokens with a
    tiny decay count as much as the others (an S_{t-1} obtained by dividing by alpha_t, or S~_t = alpha_t S_{t-1}
    by a subtraction, is off there by far more than tol)."""
    undo = (-g.double()).exp()
    err = ((dg.double() - expected) * undo).norm() / (expected * undo).norm()
    assert err <= tol, f"dg / alpha: relative error {err:.2e}"


# Cases the sanitized child runs: every key-width tile once, both dtypes and rules, a decay, several column tiles
# (in-place accumulation in tile order), a forced layout, strided inputs and no initial state.
SANITIZED_CASES = [  # (op, dtype, B, H, L, Dk, Dv, C, decay, extra)
    ("delta_rule", torch.float32, 1, 2, 13, 3, 1, 4, None, {}),
    ("sum_rule", torch.bfloat16, 1, 2, 21, 30, 7, 8, None, {"strided": True}),
    ("delta_rule", torch.float32, 1, 2, 13, 48, 50, 4, 0.9, {"warps": 3, "flush": 8}),
    ("sum_rule", torch.float32, 1, 1, 9, 100, 9, 4, None, {"with_state": False}),
    ("delta_rule", torch.bfloat16, 1, 1, 9, 256, 36, 4, 0.5, {}),
    ("sum_rule", torch.float32, 1, 1, 8, 384, 4, 4, None, {}),
    ("delta_rule", torch.float32, 1, 1, 9, 20, 24, 4, 0.9, {"warps": 1}),
]


# With LMTOOL_EMU_FAULT=misaligned-vector-loads: q and k one element off a 16-byte boundary, Dk a multiple of 4.
MISALIGNED_CASES = [("sum_rule", torch.float32, 1, 1, 5, 16, 8, 4, None, {"misaligned": True})]


def misaligned(p: Problem) -> Problem:
    """``p`` with q and k as views one element into a larger buffer (their rows not 16-byte aligned)."""
    for name in ("q", "k"):
        x = getattr(p, name)
        buf = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
        buf[..., 1:] = x
        setattr(p, name, buf[..., 1:])
    return p


def run_sanitized_cases(ext: ModuleType) -> int:
    """Runs SANITIZED_CASES (MISALIGNED_CASES under that fault); prints one line each; returns the failures."""
    failures = 0
    fault = os.environ.get("LMTOOL_EMU_FAULT") == "misaligned-vector-loads"
    for i, (op, dtype, B, H, L, Dk, Dv, C, decay, extra) in enumerate(MISALIGNED_CASES if fault else SANITIZED_CASES):
        extra = dict(extra)
        with_state, off = extra.pop("with_state", True), extra.pop("misaligned", False)
        p = random_problem(op, B, H, L, Dk, Dv, dtype=dtype, seed=i, decay=decay, strided=extra.pop("strided", False))
        p = misaligned(p) if off else p
        actual = run_kernels(ext, p, scale=0.7, C=C, with_state=with_state, **extra)
        worst, err = max_error(actual, reference(p, scale=0.7, with_state=with_state), p, with_state)
        ok = err <= (1e-5 if dtype == torch.float32 else 1e-2)
        failures += not ok
        print(f"{'ok' if ok else 'FAIL'} {op} {dtype} L{L} Dk{Dk} Dv{Dv} {extra}: {worst} {err:.1e}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if run_sanitized_cases(load_extension_file(sys.argv[1])) else 0)
