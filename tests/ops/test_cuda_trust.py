"""Trust after proof and bounded builds: a kernel that gives wrong values or fails to launch is disabled with one
warning (impl="auto") or raises (impl="cuda"); a stale build lock falls back within a bounded time; the forms
record what actually ran."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from lmtool.ops import cuda, native, registry
from lmtool.ops.checks import random_problem
from lmtool.ops.registry import resolve_impl

OPS = ["delta_rule", "sum_rule"]


def runtime_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


@pytest.fixture
def fresh_record(monkeypatch):
    """An empty record of the forms used (restored afterwards)."""
    monkeypatch.setattr(registry, "_USED", {})
    return registry


def call_twice(op, **kwargs):
    """Two calls of the "cuda" form; the problem, their outputs, and the warnings they gave."""
    p = random_problem(op, 1, 2, 13, 8, 8, seed=3)
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            o, _ = cuda.CUDA_FORMS[op](*p.inputs(), initial_state=p.s0, output_final_state=True, **kwargs)
            results.append(o)
    return p, results, runtime_warnings(record)


@pytest.mark.slow
@pytest.mark.parametrize("fault, error", [("wrong-values", "relative error"), ("launch-error", "kernel failed")])
@pytest.mark.parametrize("op", OPS)
def test_a_faulty_kernel_is_disabled_with_one_warning(kernels_on_emulation, monkeypatch, fresh_record, op, fault,
                                                      error):  # fmt: skip
    """The emulated kernels returning wrong values (scale off by 1%) or failing to launch: the self-check catches it,
    ONE warning names the kernel and the error, the chunk form's results are returned and recorded."""
    monkeypatch.setenv("LMTOOL_EMU_FAULT", fault)
    p, results, messages = call_twice(op, strict=False)
    assert len(messages) == 1, messages
    assert f"{op}[fp32, Dk=8, Dv=8, cpu]" in messages[0] and error in messages[0] and "disabled" in messages[0]
    expected, _ = cuda.CHUNK_FORMS[op](*p.inputs(), initial_state=p.s0)
    for o in results:
        torch.testing.assert_close(o, expected, rtol=0, atol=0)
    assert fresh_record.used_impls() == {op: ["chunk"]}
    assert error in cuda.EXTENSION.verdicts()[f"{op}[fp32, Dk=8, Dv=8, cpu]"]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_explicit_cuda_raises_for_a_kernel_that_failed_its_self_check(kernels_on_emulation, monkeypatch, op):
    """impl="cuda" (strict) raises KernelSelfCheckFailed naming the kernel and the error, every time."""
    monkeypatch.setenv("LMTOOL_EMU_FAULT", "wrong-values")
    p = random_problem(op, 1, 2, 13, 8, 8, seed=3)
    for _ in range(2):
        with pytest.raises(cuda.KernelSelfCheckFailed, match=rf"{op}\[fp32, Dk=8, Dv=8, cpu\].*relative error"):
            cuda.CUDA_FORMS[op](*p.inputs())


@pytest.mark.slow
def test_the_self_check_runs_once_per_kernel_and_passes_for_correct_kernels(kernels_on_emulation, fresh_record,
                                                                           monkeypatch):  # fmt: skip
    """Correct kernels pass the self-check once per (op, dtype, Dk, Dv, decay, device) and then run without
    warnings; the record says "cuda"."""
    calls = []
    real = cuda._self_check
    monkeypatch.setattr(cuda, "_self_check", lambda *a: calls.append(a[0]) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.float32, torch.bfloat16):
            p = random_problem("delta_rule", 1, 2, 13, 8, 8, seed=3, dtype=dtype)
            cuda.delta_rule_cuda(*p.inputs())
        p = random_problem("delta_rule", 1, 2, 13, 8, 8, seed=3, decay=0.5)
        cuda.delta_rule_cuda(*p.inputs(), g=p.g)
    assert calls == ["delta_rule"] * 3  # fp32, bf16, fp32 with g
    assert all(v is None for v in cuda.EXTENSION.verdicts().values())
    assert fresh_record.used_impls() == {"delta_rule": ["cuda"]}


@pytest.mark.slow
def test_the_self_check_passes_under_inference_mode_and_keeps_the_random_state(kernels_on_emulation):
    """A first use under torch.inference_mode (no autograd there) still checks fwd+bwd and trusts correct kernels;
    torch's global random state is as before (a resumed run stays exact)."""
    p = random_problem("sum_rule", 1, 2, 13, 8, 8, seed=3)
    state = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            o, _ = cuda.sum_rule_cuda(*p.inputs())
    assert torch.equal(torch.get_rng_state(), state)
    assert list(cuda.EXTENSION.verdicts().values()) == [None]
    torch.testing.assert_close(o, cuda.CHUNK_FORMS["sum_rule"](*p.inputs())[0], rtol=1e-5, atol=1e-5)


def test_auto_calls_the_native_form_without_strict(monkeypatch):
    """impl="auto" reaches a native form through its non-strict entry, impl="cuda" through the strict one."""
    seen = []
    monkeypatch.setattr(cuda, "_run", lambda *args: seen.append(args[-1]) or (None, None))
    monkeypatch.setattr(cuda, "runs_on", lambda device: True)
    entry = registry._REGISTRY["delta_rule"]["cuda"]
    monkeypatch.setitem(registry._REGISTRY["delta_rule"], "cuda", entry.__class__(
        entry.fn, None, entry.priority, None, entry.auto_fn, entry.reports_use))  # fmt: skip
    q = torch.zeros(1, 1, 2, 2)
    resolve_impl("delta_rule", "auto", q.device)(q, q, q, q[..., 0])
    resolve_impl("delta_rule", "cuda", q.device)(q, q, q, q[..., 0])
    assert seen == [False, True]


def test_the_record_lists_the_forms_that_ran(fresh_record):
    """used_impls() lists each op's forms in order of first use; chunk and recurrent calls are recorded."""
    from lmtool.ops import delta_rule, sum_rule

    p = random_problem("delta_rule", 1, 1, 4, 2, 2)
    delta_rule(*p.inputs())
    delta_rule(*p.inputs(), impl="recurrent")
    sum_rule(*p.inputs()[:3], impl="chunk")
    assert fresh_record.used_impls() == {"delta_rule": ["chunk", "recurrent"], "sum_rule": ["chunk"]}


# --- the build: a stale lock, a failed build ----------------------------------------------------------------


def test_a_stale_build_lock_falls_back_within_the_bound_with_one_warning(monkeypatch, tmp_path):
    """A `lock` file left in the kernel cache's build directory by a killed build (what torch's FileBaton creates):
    the loader waits at most LMTOOL_KERNEL_LOCK_TIMEOUT_S, never reaches cpp_extension.load (which would wait
    forever), and falls back with ONE warning that names the lock file."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("LMTOOL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("LMTOOL_KERNEL_LOCK_TIMEOUT_S", "1.5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine with nvcc and ninja
    monkeypatch.setattr(native, "device_arch", lambda: "9.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: pytest.fail("cpp_extension.load must not be reached"))
    ext = native.NativeExtension("lmtool_fast_weight", cuda.SOURCES, cuda.KERNEL_DIR, what="CUDA kernels")
    lock = ext.build_dir("9.0") / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    start = time.monotonic()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert ext.load() is None and ext.load() is None
    elapsed = time.monotonic() - start
    messages = runtime_warnings(record)
    assert 1.5 <= elapsed < 5, elapsed
    assert len(messages) == 1, messages
    assert str(lock) in messages[0] and "after 1.5 s" in messages[0] and "'chunk' forms run instead" in messages[0]
    assert "still there" in ext.reason


def test_a_lock_that_goes_away_lets_the_build_go_on(tmp_path):
    """A lock released within the bound (another process finished building) is waited for, not an error."""
    import threading

    (tmp_path / "lock").touch()
    threading.Timer(0.3, (tmp_path / "lock").unlink).start()
    start = time.monotonic()
    native.wait_for_build_lock(tmp_path, timeout_s=5, poll_s=0.05)
    assert 0.25 <= time.monotonic() - start < 2
