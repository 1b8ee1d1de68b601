"""The CUDA kernels' own source and launchers on the CPU (tests/ops/cuda_emulation.py), behind the real binding.

Every output, partial sum, scratch and shared memory starts as NaN, so an element a kernel does not write shows.
Parity with the float64 reference for every key-width tile, several block layouts (one column tile or several,
which add their sums in place in tile order), strides and both dtypes, with and without a decay; a NaN or inf keeps
the recurrent form's finite/non-finite pattern; the "cuda" forms end to end (wrapper, autograd, binding); and a
child process runs a set of cases on a build with AddressSanitizer and UBSan, where an injected out-of-bounds
access fails with ASan's report and an injected misaligned vector load with UBSan's.
"""

from __future__ import annotations

import pytest
import torch

from lmtool.ops import cuda
from lmtool.ops.checks import grad_names, outputs_and_grads, random_problem, relative_error
from tests.ops import cuda_emulation
from tests.ops.cuda_emulation import assert_dg_close_per_decay, log_decay, reference, run_kernels

OPS = ["delta_rule", "sum_rule"]

EMULATED = [  # (id, Dk, Dv, L, C, extra): every key-width tile, ragged shapes, layouts, strides, no state
    ("tile4x4-Dk3-Dv1", 3, 1, 13, 4, {}),
    ("tile4x4-Dk16-Dv40", 16, 40, 21, 8, {}),
    ("tile4x8-Dk30-Dv7-strided", 30, 7, 21, 8, {"strided": True}),
    ("tile8x8-Dk48-Dv50-3warps-flush8-3tiles", 48, 50, 13, 4, {"warps": 3, "flush": 8}),
    ("tile8x8-Dk64-Dv32-2warps-flush4-2tiles", 64, 32, 13, 4, {"warps": 2, "flush": 4}),
    ("tile8x8-Dk64-scalar-loads", 64, 16, 21, 8, {"vectorize": False}),
    ("tile8x16-Dk100-Dv9-no-state", 100, 9, 13, 4, {"with_state": False, "loss": "o"}),
    ("tile16x16-Dk256-Dv36-2tiles", 256, 36, 9, 4, {}),
    ("tile32x16-Dk384-Dv4", 384, 4, 9, 4, {}),
    ("tile32x16-Dk512-Dv3-L-multiple-of-C", 512, 3, 8, 4, {}),
    ("L1", 16, 16, 1, 8, {}),
    ("C1", 16, 16, 9, 1, {}),
]
CASE_KEYS = ("strided", "with_state", "loss")


def assert_close(actual, expected, names, tol):
    for a, e, label in zip(actual, expected, names, strict=True):
        assert torch.isfinite(a.float()).all(), f"{label}: unwritten (NaN) elements"
        err = relative_error(a, e)
        assert err <= tol, f"{label}: relative error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, Dk, Dv, L, C, extra", EMULATED, ids=[c[0] for c in EMULATED])
def test_emulated_kernels_match_recurrent(emulated_extension, op, dtype, name, Dk, Dv, L, C, extra):
    """The kernels' own source, emulated on the CPU, gives the reference's outputs, final state and every gradient."""
    layout = {k: v for k, v in extra.items() if k not in CASE_KEYS}
    with_state, loss = extra.get("with_state", True), extra.get("loss", "o+S")
    p = random_problem(op, 1, 2, L, Dk, Dv, dtype=dtype, seed=Dk + L, strided=extra.get("strided", False))
    actual = run_kernels(emulated_extension, p, scale=0.7, C=C, with_state=with_state, loss=loss, **layout)
    expected = reference(p, scale=0.7, with_state=with_state, loss=loss)
    assert_close(actual, expected, grad_names(op, with_state=with_state), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_emulated_forward_with_fewer_warps_for_a_small_problem(emulated_extension, monkeypatch, op):
    """With many multiprocessors (LMTOOL_EMU_SMS=132) the forward launcher gives a small problem fewer warps per
    block (more blocks); the results still match the reference."""
    monkeypatch.setenv("LMTOOL_EMU_SMS", "132")
    p = random_problem(op, 1, 2, 13, 16, 40, seed=5)
    actual = run_kernels(emulated_extension, p, scale=0.7, C=4)
    assert_close(actual, reference(p, scale=0.7), grad_names(op), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("decay", [None, 0.9], ids=["no-g", "g"])
def test_backward_allocates_no_buffer_per_column_tile(emulated_extension, decay):
    """With 3 column tiles the binding's backward allocates exactly its outputs (dq, dk, dv, dbeta, (dg), ds0), the
    tiles' int32 counters and, with g, the scratch of min(C, L) states: the tiles add their sums in place (the
    earlier [tiles, B, H, L, Dk] partial sums would add 2 x 3 x B H L Dk floats)."""
    from torch.profiler import ProfilerActivity, profile

    B, H, L, Dk, Dv, C, warps = 1, 2, 64, 48, 50, 16, 3  # 3 warps of 8 columns: 3 column tiles
    p = random_problem("delta_rule", B, H, L, Dk, Dv, seed=1, decay=decay)
    o, S, resid, ckpt = emulated_extension.forward(p.q, p.k, p.v, p.beta, p.g, p.s0, 1.0, C, True, False, 0, warps)
    args = (p.q, p.k, resid, p.beta, p.g, p.grad_o, p.s0, S, p.grad_s, ckpt, 1.0, C, False, 0, warps)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        grads = emulated_extension.backward(*args)
    # every buffer comes from aten::empty (at::zeros allocates through it: counting both would count it twice)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.name in ("aten::empty", "aten::empty_strided"))
    outputs = sum(x.numel() * x.element_size() for x in grads)
    tiles = 3
    scratch = B * H * tiles * 24 * 64 * min(C, L) * 4 if decay else 0  # tiles x columns per block x DkPad x min(C, L)
    assert allocated == outputs + B * H * tiles * 4 + scratch


EMULATED_DECAY = [  # (id, Dk, Dv, L, C, log-decay, dtype, extra); L = 21 is not a multiple of C = 8
    ("Dk16-Dv40-L21-C8-flush8-strong-fp32", 16, 40, 21, 8, "strong", torch.float32, {"flush": 8}),
    ("Dk16-Dv40-L21-C8-flush8-strong-bf16", 16, 40, 21, 8, "strong", torch.bfloat16, {"flush": 8}),
    ("Dk30-Dv7-strided-moderate", 30, 7, 21, 8, "moderate", torch.float32, {"strided": True}),
    ("Dk20-Dv24-2tiles-L-multiple-of-C-strong", 20, 24, 12, 4, "strong", torch.float32, {"warps": 1}),
    ("Dk8-Dv8-L13-C4-g0", 8, 8, 13, 4, "g0", torch.float32, {}),
    ("Dk8-Dv8-no-state-moderate", 8, 8, 13, 4, "moderate", torch.float32, {"with_state": False, "loss": "o"}),
    ("C1-strong", 16, 16, 9, 1, "strong", torch.float32, {}),
    ("L1-strong", 16, 16, 1, 8, "strong", torch.float32, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, Dk, Dv, L, C, decay, dtype, extra", EMULATED_DECAY, ids=[c[0] for c in EMULATED_DECAY])
def test_emulated_kernels_with_decay_match_recurrent(emulated_extension, op, name, Dk, Dv, L, C, decay, dtype, extra):
    """With a log-decay g (zero, in [-3, 0], down to -20) the emulated kernels give the reference's outputs, final
    state and every gradient including dg, dg also relative to each token's decay."""
    layout = {k: v for k, v in extra.items() if k not in CASE_KEYS}
    with_state, loss, strided = extra.get("with_state", True), extra.get("loss", "o+S"), extra.get("strided", False)
    p = random_problem(op, 1, 2, L, Dk, Dv, dtype=dtype, seed=Dk + L, strided=strided)
    p.g = log_decay(decay, 1, 2, L, seed=Dk + L + 1, strided=strided)
    actual = run_kernels(emulated_extension, p, scale=0.7, C=C, with_state=with_state, loss=loss, **layout)
    expected = reference(p, scale=0.7, with_state=with_state, loss=loss)
    names = grad_names(op, decay=True, with_state=with_state)
    assert_close(actual, expected, names, 1e-5 if dtype == torch.float32 else 1e-2)
    dg = names.index("dg")
    assert_dg_close_per_decay(actual[dg], expected[dg], p.g, tol=1e-5)


def assert_same_pattern(actual, expected, labels, tol):
    """Same finite/non-finite mask as the float64 reference everywhere, and a small relative error where finite."""
    for a, e, label in zip(actual, expected, labels, strict=True):
        a, e = a.detach().double(), e.detach()
        finite = torch.isfinite(e)
        wrong = torch.isfinite(a) != finite
        assert not wrong.any(), (
            f"{label}: {int(wrong.sum())} entries differ in finiteness from the recurrent form, first at "
            f"{wrong.nonzero()[0].tolist()} (recurrent finite: {bool(finite[wrong][0])})"
        )
        err = ((a[finite] - e[finite]).norm() / e[finite].norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{label}: relative error {err:.2e} where finite"


# (id, token of the bad value, checkpoint interval C) for L = 13: where the token sits relative to the stored
# states the backward recomputes from (checkpoints after tokens 3, 7 and 11 for C = 4; none for C = 64).
BAD_TOKEN_PLACES = [
    ("inside-a-block", 5, 4),
    ("first-of-a-block", 4, 4),
    ("last-of-a-block", 7, 4),
    ("first-token", 0, 4),
    ("after-the-last-checkpoint", 12, 4),
    ("no-checkpoints", 6, 64),
]
TOKEN_INPUTS = {"delta_rule": ["q", "k", "v", "beta"], "sum_rule": ["q", "k", "v"]}
BAD_INPUTS = [(op, where) for op in OPS for where in TOKEN_INPUTS[op]]
NAN, INF = float("nan"), float("inf")
BAD_VALUES = [pytest.param(NAN, id="nan"), pytest.param(INF, id="+inf"), pytest.param(-INF, id="-inf")]


def poisoned_problem(op, bad, *, L=13, Dk=20, Dv=12, seed=31):
    """A float32 problem with two heads and ``bad`` = [(input, index, value)] written in ("s0": the state)."""
    p = random_problem(op, 1, 2, L, Dk, Dv, seed=seed)
    for where, index, value in bad:
        getattr(p, where)[index] = value
    return p


@pytest.mark.slow
@pytest.mark.parametrize("op, where", BAD_INPUTS, ids=[f"{op}-{w}" for op, w in BAD_INPUTS])
@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("name, t, C", BAD_TOKEN_PLACES, ids=[c[0] for c in BAD_TOKEN_PLACES])
def test_emulated_kernels_keep_a_bad_token_where_the_recurrent_form_does(
    emulated_extension, op, where, value, name, t, C
):
    """A NaN/inf in one token of one head: the emulated kernels give the recurrent form's finite/non-finite pattern
    in the outputs, final state and every gradient (no later token spoils an earlier one through the backward's
    reverse reconstruction of the state), and its values where finite."""
    p = poisoned_problem(op, [(where, (0, 1, t) if where == "beta" else (0, 1, t, 3), value)])
    actual = run_kernels(emulated_extension, p, scale=0.7, C=C)
    assert_same_pattern(actual, reference(p, scale=0.7), grad_names(op), tol=1e-5)


SEVERAL_BAD = [  # (id, [(input, index, value)], C)
    ("initial-state", [("s0", (0, 1, 2, 5), NAN)], 4),
    ("initial-state-and-a-token", [("s0", (0, 0, 7, 1), INF), ("v", (0, 0, 9, 4), NAN)], 4),
    ("two-tokens-in-one-block", [("v", (0, 1, 5, 2), NAN), ("q", (0, 1, 6, 0), -INF)], 8),
    ("every-token-of-one-head", [("k", (0, 1), NAN)], 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, bad, C", SEVERAL_BAD, ids=[c[0] for c in SEVERAL_BAD])
def test_emulated_kernels_with_a_bad_state_or_several_bad_values(emulated_extension, op, name, bad, C):
    """A NaN/inf in the initial state, or several at once: the emulated kernels match the recurrent pattern."""
    p = poisoned_problem(op, bad)
    actual = run_kernels(emulated_extension, p, scale=0.7, C=C)
    assert_same_pattern(actual, reference(p, scale=0.7), grad_names(op), tol=1e-5)


DECAY_BAD = [  # (id, [(input, index, value)]) for L = 13, C = 4 (checkpoints after tokens 3, 7 and 11)
    ("v-nan-inside-a-block", [("v", (0, 1, 5, 3), NAN)]),
    ("k-inf-after-the-last-checkpoint", [("k", (0, 1, 12, 3), INF)]),
    ("g-nan", [("g", (0, 1, 6), NAN)]),
    ("g-minus-inf", [("g", (0, 0, 5), -INF), ("g", (0, 1, 8), -INF)]),
    ("initial-state-nan", [("s0", (0, 1, 2, 5), NAN)]),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, bad", DECAY_BAD, ids=[c[0] for c in DECAY_BAD])
def test_emulated_kernels_with_decay_keep_a_bad_value_where_the_recurrent_form_does(emulated_extension, op, name, bad):
    """With a log-decay, a NaN/inf in a token, in g or in the initial state (and g = -inf, alpha = 0, which is
    finite): the emulated kernels give the recurrent form's finite/non-finite pattern and its values where finite."""
    p = poisoned_problem(op, [])
    p.g = log_decay("moderate", 1, 2, 13, seed=32)
    for where, index, value in bad:
        getattr(p, where)[index] = value
    actual = run_kernels(emulated_extension, p, scale=0.7, C=4)
    assert_same_pattern(actual, reference(p, scale=0.7), grad_names(op, decay=True), tol=1e-5)


GLUE_CASES = [  # (id, dtype of q/k/v/beta, log-decay, loss terms, strided, checkpoint_every)
    ("fp32", torch.float32, None, "o+S", False, 8),
    ("bf16", torch.bfloat16, None, "o+S", False, 8),
    ("strided-like-the-layer", torch.float32, None, "o+S", True, 8),
    ("loss-on-o-only", torch.float32, None, "o", False, 8),
    ("loss-on-state-only-bf16", torch.bfloat16, None, "S", False, 64),
    ("fp32-strong-decay-loss-on-o-only", torch.float32, "strong", "o", False, 64),
    ("bf16-moderate-decay", torch.bfloat16, "moderate", "o+S", False, 8),
    ("strided-strong-decay", torch.float32, "strong", "o+S", True, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, dtype, decay, loss, strided, C", GLUE_CASES, ids=[c[0] for c in GLUE_CASES])
def test_cuda_forms_end_to_end_on_emulated_kernels(kernels_on_emulation, monkeypatch, op, name, dtype, decay, loss,
                                                   strided, C):  # fmt: skip
    """The "cuda" forms end to end (self-check, wrapper, autograd.Function, binding, launchers) on the emulated
    kernels: outputs, dtypes and every gradient (dg included) match the float64 reference; kernel outputs are
    NaN-poisoned first."""
    monkeypatch.setenv("LMTOOL_CUDA_POISON", "1")
    p = random_problem(op, 2, 2, 37, 20, 12, dtype=dtype, seed=21, strided=strided)
    if decay is not None:
        p.g = log_decay(decay, 2, 2, 37, seed=24, strided=strided)
    actual = outputs_and_grads(cuda.CUDA_FORMS[op], p, loss=loss, scale=0.8, checkpoint_every=C)
    expected = outputs_and_grads(cuda.CHUNK_FORMS[op], p.to(torch.float64), loss=loss, scale=0.8)
    names = grad_names(op, decay=decay is not None)
    assert actual[0].dtype == dtype and actual[1].dtype == torch.float32
    assert_close(actual, expected, names, 1e-2 if dtype == torch.bfloat16 else 1e-5)
    if decay is not None:
        assert_dg_close_per_decay(actual[names.index("dg")], expected[names.index("dg")], p.g, tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_emulated_inference_saves_nothing_and_matches(kernels_on_emulation, op):
    """Without gradients the forward stores no residuals or checkpoints and gives the same outputs and state."""
    p = random_problem(op, 1, 2, 30, 8, 8, seed=22)
    with torch.no_grad():
        o, S = cuda.CUDA_FORMS[op](*p.inputs(), initial_state=p.s0, output_final_state=True, checkpoint_every=4)
    o_ref, S_ref = cuda.CHUNK_FORMS[op](*p.inputs(), initial_state=p.s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        cuda.CUDA_FORMS[op](*[x.clone().requires_grad_() for x in p.inputs()], checkpoint_every=4)
    # q, k, r or v, beta, the final state and (L-1)//C = 7 checkpoints; nothing of size L x Dk x Dv.
    bound = 2 * (30 * 8 * 2) * 2 + 30 * 8 * 2 + 60 + 2 * 64 + 7 * 2 * 64
    assert 0 < sum(saved) <= bound


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_cuda_form_keeps_a_bad_token_where_the_recurrent_form_does(kernels_on_emulation, op, dtype):
    """The "cuda" form end to end with a NaN in k of the first checkpoint block: the backward recomputes S from the
    initial state the wrapper kept, and matches the recurrent pattern."""
    p = poisoned_problem(op, [("k", (0, 1, 2, 3), NAN)], L=21).to(dtype)
    p.s0, p.grad_s = p.s0.float(), p.grad_s.float()
    actual = outputs_and_grads(cuda.CUDA_FORMS[op], p, scale=0.7, checkpoint_every=8)
    assert_same_pattern(actual, reference(p, scale=0.7), grad_names(op), tol=1e-5 if dtype == torch.float32 else 2e-2)


# --- AddressSanitizer and UBSan ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sanitized_library(tmp_path_factory):
    """The emulation library built with -fsanitize=address,undefined (the binding stays the session's build)."""
    if not cuda_emulation.have_toolchain():
        pytest.skip("g++ or ninja not installed")
    return cuda_emulation.build_library(tmp_path_factory.mktemp("cuda-emulation-asan"), sanitize=True)


def run_sanitized_child(emulated_extension, sanitized_library, **env):
    return cuda_emulation.run_sanitized_child("tests.ops.cuda_emulation", emulated_extension, sanitized_library, **env)


@pytest.mark.slow
def test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers(emulated_extension, sanitized_library):
    """The real launchers and kernels, built with ASan and UBSan, run every key-width tile, both dtypes and rules, a
    decay, several column tiles and a forced layout through the binding without a report, and match the reference."""
    result = run_sanitized_child(emulated_extension, sanitized_library)
    report = result.stdout + result.stderr[-6000:]
    assert result.returncode == 0, report
    assert "AddressSanitizer" not in result.stderr and "runtime error" not in result.stderr, report
    assert result.stdout.count("ok ") == len(cuda_emulation.SANITIZED_CASES), report


@pytest.mark.slow
def test_an_out_of_bounds_access_fails_with_a_sanitizer_report(emulated_extension, sanitized_library):
    """A launch that runs one token past the buffers (an injected fault) ends the child with ASan's
    heap-buffer-overflow report in a kernel, not with a segfault or wrong numbers."""
    result = run_sanitized_child(emulated_extension, sanitized_library, LMTOOL_EMU_FAULT="out-of-bounds")
    assert result.returncode == 23, result.stderr[-3000:]  # ASAN_OPTIONS exitcode (a segfault would be -11)
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in result.stderr
    assert "forward_kernel" in result.stderr  # the report points into the kernel


@pytest.mark.slow
def test_a_misaligned_vector_load_fails_with_a_sanitizer_report(emulated_extension, sanitized_library):
    """Vector loads forced onto rows that are one element off a 16-byte boundary (an injected fault; the launcher
    itself picks scalar loads there) end the child with UBSan's misaligned-load report for float4."""
    result = run_sanitized_child(emulated_extension, sanitized_library, LMTOOL_EMU_FAULT="misaligned-vector-loads")
    assert result.returncode == 24, result.stderr[-3000:]  # UBSAN_OPTIONS exitcode
    assert "misaligned address" in result.stderr and "float4" in result.stderr, result.stderr[-3000:]
