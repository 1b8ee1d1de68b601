"""The native CUDA forms (impl="cuda"): device code compiles, fallbacks, the kernels' algorithm, GPU parity.

On a machine without a GPU this checks that ``kernels/`` compiles (nvcc for sm_80 and sm_90), that every fallback
is one warning and never a crash, and that the algorithm the kernels implement (reverse reconstruction between
checkpoints, column sums over tiles; with a log-decay g, each checkpoint segment recomputed forward) gives the
reference's outputs and gradients. The kernels' own source and launchers run on the CPU in
``test_cuda_emulated.py``; the self-check and the bounded build in ``test_cuda_trust.py``. With a CUDA device the
compiled kernels themselves are compared with the reference (``scripts/gpu_check.py`` does that more widely).
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from lmtool.ops import available_impls, cuda, delta_rule, sum_rule
from lmtool.ops.delta_rule import delta_rule_chunk
from lmtool.ops.sum_rule import sum_rule_chunk
from tests.ops.cuda_emulation import assert_dg_close_per_decay, strong_log_decay

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
DEVICE_SOURCES = sorted(p.name for p in KERNELS.glob("*.cu"))
OPS = ["delta_rule", "sum_rule"]
CUDA_FORMS = {"delta_rule": cuda.delta_rule_cuda, "sum_rule": cuda.sum_rule_cuda}
CHUNK_FORMS = {"delta_rule": delta_rule_chunk, "sum_rule": sum_rule_chunk}

has_nvcc = shutil.which("nvcc") is not None
has_gpu_kernels = torch.cuda.is_available() and cuda.runs_on(torch.device("cuda"))


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not been tried yet and no fallback warnings given yet (forgotten afterwards)."""
    cuda.EXTENSION.reset()
    monkeypatch.setattr(cuda.EXTENSION, "_warned", set())
    yield cuda
    cuda.EXTENSION.reset()


def _runtime_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


# --- the device code and the binding compile -------------------------------------------------------------


def test_kernel_sources_exist():
    """The loader's sources are all in kernels/, and the device code includes no torch header."""
    for name in cuda.SOURCES:
        assert (KERNELS / name).is_file(), name
    for path in [*KERNELS.glob("*.cu"), *KERNELS.glob("*.cuh"), KERNELS / "fast_weight.h"]:
        text = path.read_text()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, path.name


@pytest.mark.slow
@pytest.mark.skipif(not has_nvcc, reason="nvcc not installed")
@pytest.mark.parametrize("source", DEVICE_SOURCES)
def test_device_code_compiles_for_ampere_and_hopper(source, tmp_path):
    """Each .cu compiles with nvcc -c for sm_80 and sm_90 without a warning (no GPU or torch needed)."""
    cmd = [
        "nvcc", "-c", "-std=c++17", "-O3", "--threads", "2", f"-I{KERNELS}",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "--Werror", "all-warnings", "-o", str(tmp_path / "out.o"), str(KERNELS / source),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0


# --- registration and fallbacks ------------------------------------------------------------------------


def _inputs(op, B=1, H=2, L=9, Dk=4, Dv=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, H, L, Dk, generator=g), torch.randn(B, H, L, Dk, generator=g)]
    xs.append(torch.randn(B, H, L, Dv, generator=g))
    if op == "delta_rule":
        xs.append(torch.rand(B, H, L, generator=g))
    return [x.to(dtype) for x in xs]


def test_cuda_is_registered_for_cuda_devices_only():
    """'cuda' is a registered form of both ops, but never offered for CPU tensors: 'auto' picks 'chunk' there."""
    for op in OPS:
        assert "cuda" in available_impls(op)
        assert available_impls(op, "cpu")[0] == "chunk"
        assert "cuda" not in available_impls(op, "cpu")


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_runs_the_chunk_form(op):
    """impl='auto' on CPU gives exactly the chunk form's result and never tries to build kernels."""
    fn = delta_rule if op == "delta_rule" else sum_rule
    xs = _inputs(op)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o_auto, _ = fn(*xs)
    o_chunk, _ = fn(*xs, impl="chunk")
    torch.testing.assert_close(o_auto, o_chunk, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_cuda_impl_on_cpu_tensor_is_a_clear_error(op):
    """impl='cuda' on CPU tensors raises a one-line ValueError that names the forms that do run."""
    fn = delta_rule if op == "delta_rule" else sum_rule
    with pytest.raises(ValueError, match=r"'cuda' runs on cuda, not on 'cpu'.*chunk") as info:
        fn(*_inputs(op), impl="cuda")
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without usable CUDA")
def test_loading_without_cuda_warns_once(fresh_loader):
    """load_extension() on a torch without CUDA returns None with ONE warning, however often it is called."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert fresh_loader.load_extension() is None
        assert fresh_loader.load_extension() is None
    messages = _runtime_warnings(record)
    assert len(messages) == 1 and "CUDA kernels unavailable" in messages[0] and "chunk" in messages[0]
    assert "torch has no usable CUDA" in fresh_loader.unavailable_reason()


@pytest.mark.parametrize("op", OPS)
def test_failed_build_falls_back_to_chunk_with_one_warning(fresh_loader, monkeypatch, op):
    """When the kernels cannot be built (no nvcc, no ninja, compiler error) the form runs 'chunk', warning once."""

    def no_toolchain(verbose=False):
        raise cuda.KernelsUnavailable("no CUDA toolkit (nvcc) found; install one or set CUDA_HOME")

    monkeypatch.setattr(fresh_loader.EXTENSION, "build", no_toolchain)
    xs = _inputs(op)
    s0 = torch.randn(1, 2, 4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        results = [CUDA_FORMS[op](*xs, initial_state=s0, output_final_state=True, scale=0.5) for _ in range(2)]
    messages = _runtime_warnings(record)
    assert len(messages) == 1 and "nvcc" in messages[0]
    expected = CHUNK_FORMS[op](*xs, initial_state=s0, output_final_state=True, scale=0.5)
    for o, S in results:
        torch.testing.assert_close(o, expected[0], rtol=0, atol=0)
        torch.testing.assert_close(S, expected[1], rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS)
def test_float64_and_wide_keys_use_the_chunk_form(fresh_loader, monkeypatch, op):
    """float64 inputs and Dk above the kernels' limit run the chunk form (one warning each), without a build."""
    monkeypatch.setattr(fresh_loader, "load_extension", lambda: pytest.fail("must not build for these inputs"))
    cases = {"float64": _inputs(op, dtype=torch.float64), "Dk": _inputs(op, L=3, Dk=cuda.MAX_DK + 4)}
    for reason, xs in cases.items():
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(2):
                o, _ = CUDA_FORMS[op](*xs)
        assert len(_runtime_warnings(record)) == 1, reason
        torch.testing.assert_close(o, CHUNK_FORMS[op](*xs)[0], rtol=0, atol=0)


def test_kernel_cache_dir(monkeypatch, tmp_path):
    """Built kernels go to $LMTOOL_KERNEL_CACHE, by default ~/.cache/lmtool/kernels."""
    monkeypatch.setenv("LMTOOL_KERNEL_CACHE", str(tmp_path / "k"))
    assert cuda.kernel_cache_dir() == tmp_path / "k"
    monkeypatch.delenv("LMTOOL_KERNEL_CACHE")
    assert cuda.kernel_cache_dir() == Path.home() / ".cache" / "lmtool" / "kernels"


def test_environment_can_disable_the_kernels(monkeypatch):
    """LMTOOL_CUDA_KERNELS=0 withdraws the form on every device; it is never offered for CPU devices."""
    assert not cuda.runs_on(torch.device("cpu"))
    monkeypatch.setenv("LMTOOL_CUDA_KERNELS", "0")
    assert not cuda.runs_on(torch.device("cuda"))


# --- the algorithm the kernels implement -------------------------------------------------------------------


def kernel_algorithm(op, q, k, v, beta, s0, do, dS, *, scale, C, tile, g=None):
    """The kernels' computation step by step in torch (same order of operations, any dtype).

    Forward: the scan, storing r_t = v_t - S_{t-1}^T k_t and S after every C-th token. Backward: for each
    column tile of width ``tile`` separately, a reverse scan from the final state that reloads S from the
    checkpoints and reconstructs S_{t-1} = S_t - k_t u_t^T in between; dq, dk, dbeta are per-tile partial
    sums added up at the end. For finite inputs: the kernels' repair after a NaN or inf (recomputing S forward
    from the last stored state) is checked on the emulated kernels below. With a log-decay ``g`` the forward
    scales S by alpha_t = exp(g_t) before each step, and the backward never reconstructs in reverse: at the last
    token of each checkpoint segment it recomputes the segment's states forward from the stored start state
    (what the kernels write to their scratch) and takes S_{t-1} from there; dg_t = alpha_t <S_{t-1}, G~_t>.
    """
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    delta = op == "delta_rule"
    alpha = None if g is None else g.to(q.dtype).exp()
    S = torch.zeros(B, H, Dk, Dv, dtype=q.dtype) if s0 is None else s0.clone()
    outs, resid, ckpt = [], [], {}
    for t in range(L):
        q_t, k_t = q[:, :, t], k[:, :, t]
        if alpha is not None:
            S = alpha[:, :, t, None, None] * S
        r = v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, k_t) if delta else v[:, :, t]
        u = beta[:, :, t, None] * r if delta else r
        sq = torch.einsum("bhkv,bhk->bhv", S, q_t)
        S = S + k_t[..., None] * u[..., None, :]
        outs.append(scale * (sq + (k_t * q_t).sum(-1, keepdim=True) * u))
        resid.append(r)
        if (t + 1) % C == 0 and t + 1 < L:
            ckpt[t] = S.clone()
    o, S_final = torch.stack(outs, dim=2), S

    def u_of(t, cols):
        return beta[:, :, t, None] * resid[t][..., cols] if delta else resid[t][..., cols]

    def segment_states(t, cols):  # S_{tt-1} for the tokens tt of t's checkpoint segment up to t, and S_t
        m = t // C
        base = ckpt[m * C - 1] if m > 0 else (torch.zeros_like(S_final) if s0 is None else s0)
        S, states = base[..., cols].clone(), []
        for tt in range(m * C, t + 1):
            states.append(S)
            S = alpha[:, :, tt, None, None] * S + k[:, :, tt, :, None] * u_of(tt, cols)[..., None, :]
        return states, S

    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dv, dbeta, ds0 = torch.zeros_like(v), torch.zeros(B, H, L, dtype=q.dtype), torch.zeros_like(S_final)
    dg = torch.zeros(B, H, L, dtype=q.dtype)
    for j0 in range(0, Dv, tile):
        cols = slice(j0, j0 + tile)
        S = S_final[..., cols].clone()
        G = torch.zeros_like(S) if dS is None else dS[..., cols].clone()
        part_q, part_k, part_b = torch.zeros_like(dq), torch.zeros_like(dk), torch.zeros_like(dbeta)
        part_g = torch.zeros_like(dg)
        for t in reversed(range(L)):
            if alpha is not None and (t == L - 1 or (t + 1) % C == 0):
                states, S = segment_states(t, cols)
            elif alpha is None and t in ckpt:
                S = ckpt[t][..., cols].clone()
            q_t, k_t, x = q[:, :, t], k[:, :, t], resid[t][..., cols]
            u = beta[:, :, t, None] * x if delta else x
            sdo = scale * do[:, :, t, cols]
            G = G + q_t[..., None] * sdo[..., None, :]
            part_q[:, :, t] = torch.einsum("bhkv,bhv->bhk", S, sdo)
            du = torch.einsum("bhkv,bhk->bhv", G, k_t)
            a_t = 1.0 if alpha is None else alpha[:, :, t, None]
            S = S - k_t[..., None] * u[..., None, :] if alpha is None else states[t % C]  # S_{t-1}
            if delta:
                dr = beta[:, :, t, None] * du
                part_k[:, :, t] = torch.einsum("bhkv,bhv->bhk", G, u) - torch.einsum("bhkv,bhv->bhk", S, a_t * dr)
                G = G - k_t[..., None] * dr[..., None, :]
                part_b[:, :, t] = (x * du).sum(-1)
                dv[:, :, t, cols] = dr
            else:
                part_k[:, :, t] = torch.einsum("bhkv,bhv->bhk", G, u)
                dv[:, :, t, cols] = du
            if alpha is not None:  # G is G~ here, the gradient at alpha_t S_{t-1}
                part_g[:, :, t] = alpha[:, :, t] * (S * G).sum((-2, -1))
                G = alpha[:, :, t, None, None] * G
        dq, dk, dbeta, dg = dq + part_q, dk + part_k, dbeta + part_b, dg + part_g
        ds0[..., cols] = G
    grads = [dq, dk, dv, *([dbeta] if delta else []), *([dg] if g is not None else [])]
    return [o, S_final, *grads, ds0]


ALGORITHM_SHAPES = [
    pytest.param(2, 2, 37, 6, 5, 8, 2, id="L37-C8-Dk6-Dv5-tile2"),  # L not a multiple of C, ragged last tile
    pytest.param(1, 2, 32, 4, 7, 8, 3, id="L32-C8-Dk4-Dv7-tile3"),  # L a multiple of C: no checkpoint at L
    pytest.param(1, 1, 5, 3, 4, 8, 4, id="L5-C8-Dk3-Dv4-tile4"),  # shorter than one checkpoint interval
    pytest.param(1, 1, 1, 2, 2, 1, 1, id="L1-C1"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("decay", [None, 0, 3, 20], ids=["no-g", "g0", "g-in-3..0", "g-in-20..0"])
@pytest.mark.parametrize("B, H, L, Dk, Dv, C, tile", ALGORITHM_SHAPES)
def test_kernel_algorithm_matches_recurrent(make_case, op, decay, B, H, L, Dk, Dv, C, tile):
    """The kernels' forward/backward algorithm, with and without a log-decay g, gives the reference's outputs and
    all gradients, dg included (float64)."""
    case = make_case(op, B, H, L, Dk, Dv, seed=11, decay=decay)
    expected = case.outputs_and_grads(impl="recurrent", scale=0.7)
    beta = case.beta if op == "delta_rule" else None
    actual = kernel_algorithm(
        op, case.q, case.k, case.v, beta, case.s0, case.grad_o, case.grad_s, scale=0.7, C=C, tile=tile, g=case.g
    )
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_kernel_algorithm_float32_error_is_small_over_long_sequences(make_case, op):
    """In float32 with checkpoints every 64 tokens, the reconstructed states keep the gradients within 1e-4."""
    case = make_case(op, 1, 1, 600, 8, 8, seed=12)
    expected = case.outputs_and_grads(impl="recurrent")
    beta = case.beta.float() if op == "delta_rule" else None
    f32 = [x.float() for x in (case.q, case.k, case.v, case.s0, case.grad_o, case.grad_s)]
    q, k, v, s0, do, dS = f32
    actual = kernel_algorithm(op, q, k, v, beta, s0, do, dS, scale=1.0, C=64, tile=4)
    for a, e in zip(actual, expected, strict=True):
        assert (a.double() - e).norm() <= 1e-4 * e.norm()


@pytest.mark.parametrize("op", OPS)
def test_kernel_algorithm_float32_keeps_strong_decay_accurate(make_case, op):
    """In float32 with g down to -20 (alpha_t ~ 2e-9) over 200 tokens, the recomputed states keep every gradient
    within 1e-4 of the float64 reference, dg also token by token relative to alpha_t."""
    case = make_case(op, 1, 2, 200, 8, 8, seed=14)
    case.g = strong_log_decay(1, 2, 200, seed=15).double()
    expected = case.outputs_and_grads(impl="recurrent")
    beta = case.beta.float() if op == "delta_rule" else None
    q, k, v, s0, do, dS = (x.float() for x in (case.q, case.k, case.v, case.s0, case.grad_o, case.grad_s))
    actual = kernel_algorithm(op, q, k, v, beta, s0, do, dS, scale=1.0, C=64, tile=4, g=case.g.float())
    for a, e in zip(actual, expected, strict=True):
        assert (a.double() - e).norm() <= 1e-4 * e.norm()
    assert_dg_close_per_decay(actual[-2], expected[-2], case.g, tol=1e-4)


# --- the kernels themselves (CUDA machines only) -------------------------------------------------------------


GPU_SHAPES = [(2, 3, 70, 16, 16), (1, 2, 130, 48, 40), (1, 1, 33, 256, 72), (1, 2, 20, 384, 64)]


@pytest.mark.skipif(not has_gpu_kernels, reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decay", [None, 3, 20], ids=["no-g", "g-in-3..0", "g-in-20..0"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-H{}-L{}-Dk{}-Dv{}".format(*s))
def test_cuda_kernels_match_recurrent(make_case, monkeypatch, op, dtype, decay, shape):
    """On a GPU the kernels give the float64 reference's outputs, final state and gradients (dg included, with a
    log-decay g), with NaN-poisoned outputs."""
    if cuda.load_extension() is None:
        pytest.skip(f"kernels unavailable: {cuda.unavailable_reason()}")
    monkeypatch.setenv("LMTOOL_CUDA_POISON", "1")
    case = make_case(op, *shape, seed=13, decay=decay)
    for name in ("q", "k", "v", "beta"):  # the reference sees the inputs the kernels see
        setattr(case, name, getattr(case, name).to(dtype).double())
    case.s0 = case.s0.float().double()
    if case.g is not None:
        case.g = case.g.float().double()
    expected = case.outputs_and_grads(impl="recurrent", scale=0.6)

    leaves = [x.to("cuda", dtype).requires_grad_() for x in case.inputs()]
    log_decay = [] if case.g is None else [case.g.to("cuda", torch.float32).requires_grad_()]
    s0 = case.s0.to("cuda", torch.float32).requires_grad_()
    kwargs = {"g": log_decay[0]} if log_decay else {}
    o, S = case.call(inputs=leaves, impl="cuda", initial_state=s0, output_final_state=True, scale=0.6, **kwargs)
    assert o.dtype == dtype and S.dtype == torch.float32
    loss = (o.double() * case.grad_o.cuda()).sum() + (S.double() * case.grad_s.cuda()).sum()
    actual = [o, S, *torch.autograd.grad(loss, [*leaves, *log_decay, s0])]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype in (dtype, torch.float32)
        err = ((a.double().cpu() - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"relative error {err:.2e}"
