"""The recurrent scans' CUDA kernels (Delta RNN, Delta LSTM, Recurrent Delta Net) on the CPU emulation, behind the real
binding and the "cuda" forms' wrapper (tests/ops/recurrent_emulation.py).

Every kernel output starts as NaN (LMTOOL_CUDA_POISON=1), so an element a kernel does not write shows. Parity with the
float64 torch form for outputs, final states and every gradient (initial state and ``rec`` included); two carried
half-segments equal one pass; the self-check disables a faulty kernel (impl="auto") or raises (impl="cuda"); and a
child process runs a set of cases on a build with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from lmtool.ops import recurrent_cuda, registry
from lmtool.ops.checks import random_scan_problem, relative_error, scan_grad_names
from lmtool.ops.recurrent_scan import SCANS, TORCH_FORMS
from tests.ops import cuda_emulation, recurrent_emulation
from tests.ops.recurrent_emulation import reference, run_kernels

OPS = list(TORCH_FORMS)
KERNELS = Path(__file__).resolve().parents[2] / "kernels"

CASES = [  # (id, B, H, L, D, C, with_state)
    ("B2-H2-L21-D8-C8", 2, 2, 21, 8, 8, True),  # L not a multiple of C
    ("B1-H2-L16-D16-C4", 1, 2, 16, 16, 4, True),  # L a multiple of C: no checkpoint after the last token
    ("B1-H1-L9-D5-C64-no-state", 1, 1, 9, 5, 64, False),  # odd D, no checkpoints, zeros as the initial state
    ("B1-H1-L7-D3-C1", 1, 1, 7, 3, 1, True),  # a checkpoint after every token
    ("B1-H1-L1-D4", 1, 1, 1, 4, 8, True),
]


def assert_close(actual, expected, names, tol):
    for a, e, label in zip(actual, expected, names, strict=True):
        assert torch.isfinite(a.float()).all(), f"{label}: unwritten (NaN) elements"
        err = relative_error(a, e)
        assert err <= tol, f"{label}: relative error {err:.2e}"


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setenv("LMTOOL_CUDA_POISON", "1")


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, B, H, L, D, C, with_state", CASES, ids=[c[0] for c in CASES])
def test_emulated_scans_match_the_torch_form(recurrent_emulated_extension, poisoned, op, dtype, name, B, H, L, D, C,
                                             with_state):  # fmt: skip
    """The kernels' own source, emulated, gives the float64 torch form's outputs, final state and every gradient (the
    initial state's and rec's included), for fp32 and bf16 inputs."""
    p = random_scan_problem(op, B, H, L, D, dtype=dtype, seed=D + L)
    actual = run_kernels(recurrent_emulated_extension, p, C=C, with_state=with_state)
    expected = reference(p, with_state=with_state)
    assert actual[0].dtype == dtype and all(s.dtype == torch.float32 for s in actual[1 : len(p.state) + 1])
    assert_close(actual, expected, scan_grad_names(op, with_state=with_state), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_two_carried_halves_equal_one_pass(recurrent_kernels_on_emulation, op):
    """Through the "cuda" form (self-check included): the state carried from a first half gives the outputs and final
    state of one pass."""
    p = random_scan_problem(op, 2, 2, 19, 8, seed=3)
    form = recurrent_cuda.CUDA_FORMS[op]
    n = 1 if op == "rec_delta_scan" else 4  # the inputs with a token axis (dim 2); rec is the same for both halves
    per_token, fixed = p.inputs[:n], p.inputs[n:]

    def half(s: slice, state):
        return form(*(x[:, :, s] for x in per_token), *fixed, initial_state=state, output_final_state=True,
                    checkpoint_every=4)  # fmt: skip

    with torch.no_grad():
        y, final = form(*p.inputs, initial_state=p.state, output_final_state=True, checkpoint_every=4)
        y1, mid = half(slice(0, 8), p.state)
        y2, end = half(slice(8, None), mid)
    torch.testing.assert_close(torch.cat([y1, y2], 2), y, rtol=1e-5, atol=1e-5)
    for a, b in zip(end, final, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, TORCH_FORMS[op](*p.inputs, initial_state=p.state)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inference_saves_nothing_and_training_saves_no_state_per_token(recurrent_kernels_on_emulation):
    """Without gradients nothing is saved; with them, the saved tensors are O(L D) plus L/C checkpoints, never one
    D x D state per token (Delta LSTM, L = 40, C = 8: 4 checkpoints of 3 matrices)."""
    B, H, L, D, C = 1, 1, 40, 16, 8
    p = random_scan_problem("delta_lstm_scan", B, H, L, D, seed=4)
    form = recurrent_cuda.CUDA_FORMS["delta_lstm_scan"]
    form(*p.inputs)  # the self-check (forward and backward) runs here, outside the hooks
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        with torch.no_grad():
            form(*p.inputs, initial_state=p.state, checkpoint_every=C)
        assert saved == []
        form(*(x.clone().requires_grad_() for x in p.inputs), initial_state=p.state, checkpoint_every=C)
    per_token = (3 * 3 + 1 + 1) * L * D + 3 * L  # k, r, a (3 gates each), y, c; beta
    states = 3 * D * D + 2 * D + 4 * 3 * D * D  # R, y0, c0 and the checkpoints
    assert 0 < sum(saved) <= per_token + states
    assert sum(saved) < 3 * L * D * D / 2  # less than half of the three gates' states per token


def call_twice(op, **kwargs):
    p = random_scan_problem(op, 1, 2, 13, 8, seed=3)
    results = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            results.append(recurrent_cuda.CUDA_FORMS[op](*p.inputs, initial_state=p.state, **kwargs)[0])
    return p, results, [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


@pytest.mark.slow
@pytest.mark.parametrize("fault, error", [("wrong-values", "relative error"), ("launch-error", "kernel failed")])
@pytest.mark.parametrize("op", OPS)
def test_a_faulty_kernel_is_disabled_with_one_warning(recurrent_kernels_on_emulation, monkeypatch, op, fault, error):
    """Emulated kernels that skip the last token or fail to launch: the self-check catches it, ONE warning names the
    kernel and the error, the torch form's results are returned and "recurrent" is recorded."""
    monkeypatch.setenv("LMTOOL_EMU_FAULT", fault)
    monkeypatch.setattr(registry, "_USED", {})
    p, results, messages = call_twice(op, strict=False)
    key = f"{op}[fp32, D=8, cpu]"
    assert len(messages) == 1 and key in messages[0] and error in messages[0] and "disabled" in messages[0], messages
    expected = TORCH_FORMS[op](*p.inputs, initial_state=p.state)[0]
    for y in results:
        torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert registry.used_impls() == {op: ["recurrent"]}


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_explicit_cuda_raises_for_a_kernel_that_failed_its_self_check(recurrent_kernels_on_emulation, monkeypatch, op):
    """impl="cuda" (strict) raises KernelSelfCheckFailed naming the kernel and the error, every time."""
    monkeypatch.setenv("LMTOOL_EMU_FAULT", "wrong-values")
    p = random_scan_problem(op, 1, 2, 13, 8, seed=3)
    for _ in range(2):
        with pytest.raises(recurrent_cuda.KernelSelfCheckFailed, match=rf"{op}\[fp32, D=8, cpu\].*relative error"):
            recurrent_cuda.CUDA_FORMS[op](*p.inputs)


@pytest.mark.slow
def test_correct_kernels_pass_the_self_check_once_and_are_recorded(recurrent_kernels_on_emulation, monkeypatch):
    """Correct kernels pass once per (op, dtype, D, device), run without warnings, and the record says "cuda"."""
    monkeypatch.setattr(registry, "_USED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (torch.float32, torch.float32, torch.bfloat16):
            p = random_scan_problem("delta_rnn_scan", 1, 2, 13, 8, seed=3, dtype=dtype)
            recurrent_cuda.CUDA_FORMS["delta_rnn_scan"](*p.inputs)
    assert list(recurrent_cuda.EXTENSION.verdicts()) == ["delta_rnn_scan[fp32, D=8, cpu]",
                                                         "delta_rnn_scan[bf16, D=8, cpu]"]  # fmt: skip
    assert all(v is None for v in recurrent_cuda.EXTENSION.verdicts().values())
    assert registry.used_impls() == {"delta_rnn_scan": ["cuda"]}


@pytest.mark.parametrize("op", OPS)
def test_float64_and_wide_heads_use_the_torch_form(monkeypatch, op):
    """float64 inputs and d_head > 64 run the torch form with one warning each, without building anything."""
    monkeypatch.setattr(recurrent_cuda.EXTENSION, "_warned", set())
    monkeypatch.setattr(recurrent_cuda.EXTENSION, "load", lambda: pytest.fail("must not build for these inputs"))
    for p in (random_scan_problem(op, 1, 1, 3, 4).to(torch.float64), random_scan_problem(op, 1, 1, 2, 65)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(2):
                y, _ = recurrent_cuda.CUDA_FORMS[op](*p.inputs, initial_state=p.state)
        assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
        torch.testing.assert_close(y, TORCH_FORMS[op](*p.inputs, initial_state=p.state)[0], rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_runs_the_torch_form_and_cuda_is_refused(op):
    """On CPU tensors impl="auto" is the torch form; impl="cuda" raises the registry's one-line error."""
    p = random_scan_problem(op, 1, 1, 3, 4)
    y, _ = SCANS[op](*p.inputs, initial_state=p.state)
    torch.testing.assert_close(y, TORCH_FORMS[op](*p.inputs, initial_state=p.state)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'cuda' runs on cuda, not on 'cpu'.*recurrent"):
        SCANS[op](*p.inputs, impl="cuda")


def test_host_api_header_has_no_torch_or_cuda():
    """kernels/recurrent_scan.h, the launchers' API, includes neither torch nor CUDA (the nvcc check of the .cu files
    in tests/ops/test_cuda.py covers delta_rnn_scan.cu and rec_delta_scan.cu)."""
    text = (KERNELS / "recurrent_scan.h").read_text()
    assert [line for line in text.splitlines() if line.startswith("#include")] == ["#include <cstdint>"]
    for source in recurrent_cuda.SOURCES:
        assert (KERNELS / source).is_file(), source


# --- AddressSanitizer and UBSan ------------------------------------------------------------------------------


CHILD = "tests.ops.recurrent_emulation"  # the module the sanitized child runs


@pytest.fixture(scope="module")
def sanitized_recurrent_library(recurrent_emulated_extension, tmp_path_factory):
    """The scans' library built with -fsanitize=address,undefined (the toolchain is there: the extension built)."""
    return recurrent_emulation.build(tmp_path_factory.mktemp("recurrent-emulation-asan"), sanitize=True)


@pytest.mark.slow
def test_scans_run_clean_under_address_and_undefined_behaviour_sanitizers(recurrent_emulated_extension,
                                                                           sanitized_recurrent_library):  # fmt: skip
    """The real launchers and kernels built with ASan and UBSan (shared memory past what the launch asked for is
    poisoned) run every op, both dtypes, D = 64 and no initial state without a report, and match the reference."""
    result = cuda_emulation.run_sanitized_child(CHILD, recurrent_emulated_extension, sanitized_recurrent_library)
    report = result.stdout + result.stderr[-6000:]
    assert result.returncode == 0, report
    assert "AddressSanitizer" not in result.stderr and "runtime error" not in result.stderr, report
    assert result.stdout.count("ok ") == len(recurrent_emulation.SANITIZED_CASES), report


@pytest.mark.slow
def test_an_out_of_bounds_access_in_a_scan_fails_with_a_sanitizer_report(recurrent_emulated_extension,
                                                                          sanitized_recurrent_library):  # fmt: skip
    """A launch that runs one token past the buffers ends the child with ASan's heap-buffer-overflow report in a scan
    kernel, not with a segfault or wrong numbers."""
    result = cuda_emulation.run_sanitized_child(CHILD, recurrent_emulated_extension, sanitized_recurrent_library,
                                                LMTOOL_EMU_FAULT="out-of-bounds")  # fmt: skip
    assert result.returncode == 23, result.stderr[-3000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "delta_rnn_forward_kernel" in result.stderr


LAYERS = {  # the layers whose fast form runs a scan op: (factory, op)
    "delta_rnn": ("DeltaRNN", "delta_rnn_scan"),
    "delta_lstm": ("DeltaLSTM", "delta_lstm_scan"),
    "rec_delta": ("RecurrentDeltaNet", "rec_delta_scan"),
    "srwm": ("SelfReferentialWeightMatrix", "srwm_scan"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYERS)
def test_layers_pick_the_kernels_through_auto(recurrent_kernels_on_emulation, monkeypatch, name):
    """With "cuda" offered for CPU tensors (the emulated kernels), a layer's fast form reaches the kernels through
    impl="auto" after their self-check, records "cuda", and matches its step-loop reference in float32 (outputs, final
    state, input and parameter gradients) from a non-zero state."""
    from lmtool.layers import recurrent_fwp, srwm

    cls, op = LAYERS[name]
    entry = registry._REGISTRY[op]["cuda"]
    monkeypatch.setitem(registry._REGISTRY[op], "cuda", entry.__class__(
        entry.fn, None, entry.priority, None, entry.auto_fn, entry.reports_use))  # fmt: skip
    monkeypatch.setattr(registry, "_USED", {})
    torch.manual_seed(0)
    layer = getattr(recurrent_fwp if name != "srwm" else srwm, cls)(16, 2, 8, 0.0)
    x = torch.randn(2, 19, 16)
    state = tuple(0.3 * torch.randn_like(s) for s in layer.init_state(2, device=x.device, dtype=x.dtype))
    results = []
    for forward in (layer.forward, layer.forward_reference):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y, new_state = forward(xi, state, True)
        (y.square().sum() + sum(s.square().sum() for s in new_state)).backward()
        results.append([y, *new_state, xi.grad, *(p.grad for p in layer.parameters())])
    for a, e in zip(*results, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
    assert registry.used_impls()[op] == ["cuda"]
