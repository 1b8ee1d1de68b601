"""Native (JIT-built) extensions behind the ops: build with a bounded wait, one warning on failure, and trust
after proof.

One :class:`NativeExtension` per extension (``lmtool.ops.cuda`` has the fast-weight one, ``lmtool.ops.recurrent_cuda``
the recurrent scans' one), each with its own sources and self-check (the launch helpers serve both):

- :meth:`NativeExtension.load` builds on the first call (``torch.utils.cpp_extension.load``, for the visible
  GPU's architecture, cached under ``$LMTOOL_KERNEL_CACHE``) and returns None after ONE warning where that is
  impossible: no CUDA, toolkit or ninja, a compiler error, or a build lock that stays longer than
  ``$LMTOOL_KERNEL_LOCK_TIMEOUT_S`` seconds (default 600). torch's build lock is a file named ``lock`` in the
  build directory; a build that was killed leaves it behind, and torch would wait for it forever.
- :meth:`NativeExtension.trusted` runs a kernel's self-check once per process and kernel key (op, dtype, shape
  class, device): a check that raises (a mismatch against the torch form, or a launch error) disables that
  kernel for the process with ONE warning that names it and the error, and callers run the torch form. A strict
  caller (``impl="cuda"`` asked for explicitly) gets :class:`KernelSelfCheckFailed` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

DEFAULT_LOCK_TIMEOUT_S = 600.0  # a first build takes 1-2 min on 16 cores; another rank may be building meanwhile


class KernelsUnavailable(RuntimeError):
    """The extension cannot be built or loaded here; the message says why and what to do."""


class KernelSelfCheckFailed(RuntimeError):
    """A kernel gave wrong results or failed to launch in its self-check; it is disabled for this process."""


def kernel_cache_dir() -> Path:
    """Where built kernels are cached: ``$LMTOOL_KERNEL_CACHE``, else ``~/.cache/lmtool/kernels``."""
    env = os.environ.get("LMTOOL_KERNEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmtool" / "kernels"


def lock_timeout_s() -> float:
    """How long a build waits for another build's lock: ``$LMTOOL_KERNEL_LOCK_TIMEOUT_S``, default 600 s."""
    return float(os.environ.get("LMTOOL_KERNEL_LOCK_TIMEOUT_S", DEFAULT_LOCK_TIMEOUT_S))


def wait_for_build_lock(build_dir: Path, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once ``build_dir/lock`` (torch's FileBaton) is gone; raise KernelsUnavailable after ``timeout_s``."""
    lock = build_dir / "lock"
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if time.monotonic() >= deadline:
            raise KernelsUnavailable(
                f"the build lock {lock} is still there after {timeout_s:g} s (a killed build leaves it behind); "
                "delete it if no other process is building, or raise LMTOOL_KERNEL_LOCK_TIMEOUT_S"
            )
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


def first_line(err: BaseException) -> str:
    """An exception as one line: its first line, or its type when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def device_arch() -> str:
    """The visible GPU's architecture for nvcc (``"9.0"`` on Hopper), unless ``TORCH_CUDA_ARCH_LIST`` is set."""
    major, minor = torch.cuda.get_device_capability()
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{major}.{minor}"


# -- launching: shared by the extensions' autograd wrappers ----------------------------------------------------


def kernel_dtype(*xs: torch.Tensor) -> torch.dtype:
    """bfloat16 when every input is, else float32 (float16 and mixed inputs are computed in float32)."""
    return torch.bfloat16 if all(x.dtype == torch.bfloat16 for x in xs) else torch.float32


def needs_grad(*xs: torch.Tensor | None) -> bool:
    """Whether autograd will ask for a backward: the forward then saves what the backward reads."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def poison_outputs() -> bool:
    """``LMTOOL_CUDA_POISON=1`` fills every kernel output with NaN before the launch (unwritten elements show)."""
    return os.environ.get("LMTOOL_CUDA_POISON", "0") == "1"


def stream_of(device: torch.device) -> int:
    """The current CUDA stream of ``device`` as an integer for the launchers (0 off CUDA: the tests' emulation)."""
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def on_device(device: torch.device):
    """Make ``device`` current while the kernels launch (a no-op off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class NativeExtension:
    """One JIT-built extension: its sources, the built module (or why there is none) and its kernels' trust."""

    def __init__(self, name: str, sources: Sequence[str], kernel_dir: Path, *, what: str) -> None:
        self.name = name
        self.sources = tuple(sources)
        self.kernel_dir = kernel_dir
        self.what = what  # e.g. "CUDA kernels": used in the messages
        self._lock = threading.RLock()
        self._tried = False
        self._module: ModuleType | None = None
        self.reason: str | None = None  # why load() returned None
        self._verdicts: dict[str, str | None] = {}  # kernel key -> None (trusted) or the self-check's error
        self._warned: set[str] = set()

    # -- build and load ------------------------------------------------------------------------------

    def build_dir(self, arch: str) -> Path:
        tag = f"torch{torch.__version__}-cuda{torch.version.cuda}"
        tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)
        return kernel_cache_dir() / f"{self.name}-{tag}-arch{arch.replace(' ', '_').replace(';', '_')}"

    def build(self, verbose: bool = False) -> ModuleType:
        """Compile (or load from the cache) for the current GPU; raise KernelsUnavailable if impossible."""
        if not torch.cuda.is_available():
            detail = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise KernelsUnavailable(f"torch has no usable CUDA ({detail})")
        missing = [s for s in self.sources if not (self.kernel_dir / s).is_file()]
        if missing:
            raise KernelsUnavailable(f"kernel sources {missing} not found in {self.kernel_dir} (use a source checkout)")
        from torch.utils import cpp_extension  # only where kernels can build: it imports setuptools and more

        if cpp_extension.CUDA_HOME is None:
            raise KernelsUnavailable("no CUDA toolkit (nvcc) found; install one or set CUDA_HOME")
        try:
            cpp_extension.verify_ninja_availability()
        except RuntimeError as err:
            raise KernelsUnavailable("ninja is not installed; `pip install ninja`") from err
        arch = device_arch()
        build_dir = self.build_dir(arch)
        build_dir.mkdir(parents=True, exist_ok=True)
        wait_for_build_lock(build_dir, lock_timeout_s())
        log.info("building the lmtool %s for arch %s in %s (first use only)", self.what, arch, build_dir)
        old = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        try:
            return cpp_extension.load(
                name=self.name,
                sources=[str(self.kernel_dir / s) for s in self.sources],
                extra_include_paths=[str(self.kernel_dir)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                build_directory=str(build_dir),
                verbose=verbose,
            )
        except Exception as err:  # a compiler error: keep its last line, the log is in build_dir
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise KernelsUnavailable(f"building in {build_dir} failed: {last}") from err
        finally:
            if old is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = old

    def load(self) -> ModuleType | None:
        """The module, built on the first call; None after ONE warning where it cannot be built or loaded."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    self._module = self.build()
                except Exception as err:  # any failure means "use the torch forms", never a crash
                    self.reason = first_line(err)
                    warnings.warn(
                        f"lmtool: {self.what} unavailable ({self.reason}); the torch 'chunk' forms run instead",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self._module

    def use(self, module: ModuleType | None, reason: str | None = None) -> None:
        """Install ``module`` as the built extension (a build done elsewhere, e.g. timed by scripts/gpu_check.py,
        or the tests' CPU emulation); None with ``reason`` marks it unavailable. Forgets earlier self-checks."""
        with self._lock:
            self._tried, self._module, self.reason = True, module, reason
            self._verdicts.clear()
            self._warned.clear()

    def reset(self) -> None:
        """Forget the build and every self-check: the next :meth:`load` builds again."""
        with self._lock:
            self._tried, self._module, self.reason = False, None, None
            self._verdicts.clear()
            self._warned.clear()

    def warn_once(self, key: str, message: str) -> None:
        """Warn ONCE per key: a reason why the torch form runs instead of this extension's kernels."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- trust after proof ---------------------------------------------------------------------------

    def trusted(self, kernel: str, self_check: Callable[[], None], *, strict: bool) -> bool:
        """Whether ``kernel`` (a key naming the op, dtype, shape class and device) may run: ``self_check`` runs
        on the first call per key and raises on a mismatch or a launch error. A failed kernel warns ONCE and
        returns False (the caller runs the torch form); with ``strict`` it raises KernelSelfCheckFailed."""
        with self._lock:
            if kernel not in self._verdicts:
                try:
                    self_check()
                    self._verdicts[kernel] = None
                except Exception as err:  # a mismatch, a launch error or anything else: do not trust it
                    self._verdicts[kernel] = first_line(err)
            error = self._verdicts[kernel]
            if error is None:
                return True
            if strict:
                raise KernelSelfCheckFailed(
                    f"lmtool: the {self.what} {kernel} failed its self-check against the torch chunk form "
                    f"({error}); use impl='auto' or impl='chunk'"
                )
            if kernel not in self._warned:
                self._warned.add(kernel)
                warnings.warn(
                    f"lmtool: {self.what} {kernel} failed its self-check against the torch chunk form ({error}); "
                    "it is disabled for this process and the torch 'chunk' form runs instead",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return False

    def verdicts(self) -> dict[str, str | None]:
        """Every kernel checked so far: None where it passed, else the error that disabled it."""
        with self._lock:
            return dict(self._verdicts)
