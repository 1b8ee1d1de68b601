"""The native CUDA forms (impl="cuda"): device code and binding compile, fallbacks, the kernels' algorithm.

On a machine without a GPU this checks that ``kernels/`` compiles (nvcc for sm_80 and sm_90; the torch
binding against torch's headers, built for the CPU), that every fallback is one warning and never a crash,
that the algorithm the kernels implement (reverse reconstruction between checkpoints, per-column-tile partial
sums; with a log-decay g, each checkpoint segment recomputed forward) gives the reference's outputs and
gradients, and runs the kernels' own source on the CPU under a small SIMT emulation, alone and behind the real
binding and autograd wrapper, against the reference. With a CUDA
device the compiled kernels themselves are compared with the reference (``scripts/gpu_check.py`` does that
more widely).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from lmtool.ops import available_impls, cuda, delta_rule, sum_rule
from lmtool.ops.delta_rule import delta_rule_chunk
from lmtool.ops.sum_rule import sum_rule_chunk

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
DEVICE_SOURCES = sorted(p.name for p in KERNELS.glob("*.cu"))
OPS = ["delta_rule", "sum_rule"]
CUDA_FORMS = {"delta_rule": cuda.delta_rule_cuda, "sum_rule": cuda.sum_rule_cuda}
CHUNK_FORMS = {"delta_rule": delta_rule_chunk, "sum_rule": sum_rule_chunk}

has_nvcc = shutil.which("nvcc") is not None
has_gpu_kernels = torch.cuda.is_available() and cuda.runs_on(torch.device("cuda"))


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not been tried yet and no fallback warnings given yet (restored afterwards)."""
    monkeypatch.setattr(cuda, "_state", {"tried": False, "module": None, "reason": None})
    monkeypatch.setattr(cuda, "_warned", set())
    return cuda


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

    monkeypatch.setattr(fresh_loader, "build_extension", no_toolchain)
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


def strong_log_decay(B, H, L, *, seed) -> torch.Tensor:
    """float32 log-decays in [-3, 0], with every third token (from the second) in [-20, -10]: alpha_t down to 2e-9,
    between tokens whose states still carry history."""
    gen = torch.Generator().manual_seed(seed)
    g = -3 * torch.rand(B, H, L, generator=gen)
    g[..., 1::3] = -10 - 10 * torch.rand(B, H, len(range(1, L, 3)), generator=gen)
    return g


def assert_dg_close_per_decay(dg, expected, g, tol):
    """dg_t = alpha_t <S_{t-1}, G~_t> is as small as alpha_t: compare dg_t / alpha_t, so that the tokens with a
    tiny decay count as much as the others (an S_{t-1} obtained by dividing by alpha_t, or S~_t = alpha_t S_{t-1}
    by a subtraction, is off there by far more than tol)."""
    undo = (-g.double()).exp()
    err = ((dg.double() - expected) * undo).norm() / (expected * undo).norm()
    assert err <= tol, f"dg / alpha: relative error {err:.2e}"


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


# --- the kernels' own source, run on the CPU under a SIMT emulation ---------------------------------------------
#
# The kernel headers (kernels/fast_weight_{forward,backward}.cuh) hold plain CUDA C++ without launch syntax, so
# with stand-ins for <cuda_runtime.h> and <cuda_bf16.h> g++ compiles them as C++. The emulator runs every CUDA
# thread of a block as a std::thread; warp shuffles and __syncthreads are barriers (a divergent one times out
# and fails the run), and every output and the shared memory start as NaN, so an element that a kernel does not
# write, or reads before writing, shows up.

EMU_CUDA_RUNTIME = r"""
// Host stand-in for <cuda_runtime.h>: just enough for lmtool's kernel headers to compile as C++ and run on
// the CPU, one std::thread per CUDA thread (see EMU_DRIVER).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
struct uint2 {
  unsigned x, y;
};

extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);
void __syncthreads();
using std::isfinite;
using std::min;
"""

EMU_CUDA_BF16 = r"""
// Host stand-in for <cuda_bf16.h>: bfloat16 as the upper 16 bits of a float, round to nearest even.
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 lo, hi;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.lo), __bfloat162float(h.hi)}; }
"""

EMU_DRIVER = r"""
// Runs lmtool's fast-weight kernels (kernels/fast_weight_{forward,backward}.cuh) on the CPU: every CUDA thread
// of a block is a std::thread, warp shuffles and __syncthreads are barriers, blocks run one after another.
// A shuffle or barrier that not every thread reaches (divergent control flow) times out and fails the run.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

namespace lmtool_fw {
float smem[16384];  // dynamic shared memory of the one block that runs at a time
}

#include "fast_weight_backward.cuh"
#include "fast_weight_forward.cuh"

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {

std::atomic<bool> failed{false};

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    if (failed) return;
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return gen_ != gen || failed; })) failed = true;
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

std::unique_ptr<Barrier> block_barrier;
std::vector<std::unique_ptr<Barrier>> warp_barriers;
float exchange[1024];

template <class F>
int run_grid(dim3 grid, int threads, F&& body) {
  gridDim = grid;
  blockDim = dim3{static_cast<unsigned>(threads), 1, 1};
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      block_barrier = std::make_unique<Barrier>(threads);
      warp_barriers.clear();
      for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<Barrier>(32));
      std::fill(lmtool_fw::smem, lmtool_fw::smem + 16384, std::nanf(""));
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t, x, y] {
          threadIdx = dim3{static_cast<unsigned>(t), 0, 0};
          blockIdx = dim3{x, y, 0};
          body();
        });
      }
      for (auto& th : pool) th.join();
      if (failed) return 1;
    }
  }
  return 0;
}

}  // namespace

float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  exchange[warp * 32 + lane] = value;
  warp_barriers[warp]->wait();
  const float other = exchange[warp * 32 + (lane ^ lane_mask)];
  warp_barriers[warp]->wait();
  return other;
}

void __syncthreads() { block_barrier->wait(); }

namespace {

using namespace lmtool_fw;

Strides strides_at(const long long* s, int i) {
  Strides out;
  out.b = s[3 * i];
  out.h = s[3 * i + 1];
  out.t = s[3 * i + 2];
  return out;
}

template <typename T>
bool vectorizable(const void* q, const void* k, const Strides& sq, const Strides& sk, int Dk) {
  auto ok = [](const void* p, const Strides& s) {
    return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0 && s.b % 4 == 0 && s.h % 4 == 0 && s.t % 4 == 0;
  };
  return Dk % 4 == 0 && ok(q, sq) && ok(k, sk);
}

template <typename T, bool DELTA, bool DECAY>
int forward_emulated(const ForwardArgs& a, int warps, int vec_mode) {
  return dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    const int cols_per_warp = TL::CG * kNC;
    const int w = warps > 0 ? warps : std::min(kFwdMaxWarps, ceil_div(a.Dv, cols_per_warp));
    const int cols = w * cols_per_warp;
    const bool vec = vec_mode != 0 && vectorizable<T>(a.q, a.k, a.sq, a.sk, a.Dk);
    const dim3 grid{static_cast<unsigned>(a.B * a.H), static_cast<unsigned>(ceil_div(a.Dv, cols)), 1};
    return run_grid(grid, w * 32, [&] { forward_kernel<T, DELTA, DECAY, TL>(a, cols, vec); });
  });
}

// Sizes only, when `sizes` is given: {column tiles, scratch floats per sequence} of this layout.
template <typename T, bool DELTA, bool DECAY>
int backward_emulated(const BackwardArgs& a, int warps, int flush, int vec_mode, int64_t* sizes) {
  return dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    Layout lay = layout<TL>(a.Dv, DECAY);
    if (warps > 0) {
      lay.warps = warps;
      lay.cols_per_block = warps * TL::CG * kNC;
      lay.tiles = ceil_div(a.Dv, lay.cols_per_block);
    }
    if (flush > 0) lay.flush = flush;
    if (sizes != nullptr) {
      sizes[0] = lay.tiles;
      sizes[1] = static_cast<int64_t>(lay.tiles) * lay.cols_per_block * TL::DkPad * std::min(a.ckpt_every, a.L);
      return 0;
    }
    if (lay.flush % TL::P != 0 || lay.warps * lay.flush * (2 * TL::DkPad + 2) > 16384) return 2;
    const bool vec = vec_mode != 0 && vectorizable<T>(a.q, a.k, a.sq, a.sk, a.Dk);
    const dim3 grid{static_cast<unsigned>(a.B * a.H), static_cast<unsigned>(lay.tiles), 1};
    return run_grid(grid, lay.warps * 32,
                    [&] { backward_kernel<T, DELTA, DECAY, TL>(a, lay.cols_per_block, lay.flush, vec); });
  });
}

template <bool DECAY>
int backward_rule(const BackwardArgs& a, int warps, int flush, int vec_mode, int64_t* sizes) {
  if (a.dtype == kFloat32) {
    return a.delta ? backward_emulated<float, true, DECAY>(a, warps, flush, vec_mode, sizes)
                   : backward_emulated<float, false, DECAY>(a, warps, flush, vec_mode, sizes);
  }
  return a.delta ? backward_emulated<__nv_bfloat16, true, DECAY>(a, warps, flush, vec_mode, sizes)
                 : backward_emulated<__nv_bfloat16, false, DECAY>(a, warps, flush, vec_mode, sizes);
}

int backward_dispatch(const BackwardArgs& a, int warps, int flush, int vec_mode, int64_t* sizes = nullptr) {
  failed = false;
  return a.g != nullptr ? backward_rule<true>(a, warps, flush, vec_mode, sizes)
                        : backward_rule<false>(a, warps, flush, vec_mode, sizes);
}

template <bool DECAY>
int forward_rule(const ForwardArgs& a, int warps, int vec_mode) {
  if (a.dtype == kFloat32) {
    return a.delta ? forward_emulated<float, true, DECAY>(a, warps, vec_mode)
                   : forward_emulated<float, false, DECAY>(a, warps, vec_mode);
  }
  return a.delta ? forward_emulated<__nv_bfloat16, true, DECAY>(a, warps, vec_mode)
                 : forward_emulated<__nv_bfloat16, false, DECAY>(a, warps, vec_mode);
}

int forward_dispatch(const ForwardArgs& a, int warps, int vec_mode) {
  failed = false;
  return a.g != nullptr ? forward_rule<true>(a, warps, vec_mode) : forward_rule<false>(a, warps, vec_mode);
}

}  // namespace

// The host API of kernels/fast_weight.h, emulated: what the torch binding calls when it is built for the CPU.
namespace lmtool_fw {

int forward(const ForwardArgs& a, void*) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.Dk > kMaxDk || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  return forward_dispatch(a, 0, 1);
}

int backward(const BackwardArgs& a, void*) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.Dk > kMaxDk || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr) return -1;
  if (a.g != nullptr && (a.dg_part == nullptr || a.scratch == nullptr)) return -1;
  return backward_dispatch(a, 0, 0, 1);
}

int backward_tiles(int Dk, int Dv, bool decay) {
  if (Dv < 1) return 1;
  const int tiles = dispatch_dk(Dk, [&](auto tile) -> int { return layout<decltype(tile)>(Dv, decay).tiles; });
  return tiles < 1 ? 1 : tiles;
}

int64_t backward_scratch_per_sequence(int Dk, int Dv, int L, int ckpt_every) {
  if (Dk < 1 || Dv < 1 || L < 1 || ckpt_every < 1 || Dk > kMaxDk) return 0;
  BackwardArgs a;
  a.Dk = Dk, a.Dv = Dv, a.L = L, a.ckpt_every = ckpt_every;
  a.g = reinterpret_cast<const float*>(&a);  // any non-null pointer: the layout with a decay
  int64_t sizes[2] = {0, 0};
  backward_dispatch(a, 0, 0, 1, sizes);
  return sizes[1];
}

const char* error_string(int code) { return code == -1 ? "invalid arguments" : "emulated kernel failed"; }

}  // namespace lmtool_fw

// Direct entry points for ctypes, with the block layout as parameters (0: the launchers' choice).
extern "C" int emu_forward(int dtype, int delta, int B, int H, int L, int Dk, int Dv, float scale, const void* q,
                           const void* k, const void* v, const float* beta, const float* g, const float* s0,
                           const long long* strides, void* out, float* final_state, float* resid, float* ckpt,
                           int ckpt_every, int warps, int vec_mode) {
  ForwardArgs a;
  a.dtype = dtype;
  a.delta = delta != 0;
  a.B = B, a.H = H, a.L = L, a.Dk = Dk, a.Dv = Dv;
  a.scale = scale;
  a.q = q, a.k = k, a.v = v, a.beta = beta, a.g = g, a.initial_state = s0;
  a.sq = strides_at(strides, 0), a.sk = strides_at(strides, 1), a.sv = strides_at(strides, 2);
  a.sbeta = strides_at(strides, 3), a.sg = strides_at(strides, 4);
  a.out = out, a.final_state = final_state, a.resid = resid, a.ckpt = ckpt, a.ckpt_every = ckpt_every;
  return forward_dispatch(a, warps, vec_mode);
}

// Allocates the per-tile partial sums and the scratch (NaN-filled) itself and returns the sums in dq, dk, dbeta, dg.
extern "C" int emu_backward(int dtype, int delta, int B, int H, int L, int Dk, int Dv, float scale, const void* q,
                            const void* k, const void* v, const float* beta, const float* g, const float* resid,
                            const void* dout, const long long* strides, const float* initial_state,
                            const float* final_state, const float* d_final_state, const float* ckpt, int ckpt_every,
                            float* dq, float* dk, void* dv, float* dbeta, float* dg, float* d_initial_state, int warps,
                            int flush, int vec_mode) {
  BackwardArgs a;
  a.dtype = dtype;
  a.delta = delta != 0;
  a.B = B, a.H = H, a.L = L, a.Dk = Dk, a.Dv = Dv;
  a.scale = scale;
  a.q = q, a.k = k, a.v = v, a.beta = beta, a.g = g, a.resid = resid, a.dout = dout;
  a.sq = strides_at(strides, 0), a.sk = strides_at(strides, 1), a.sv = strides_at(strides, 2);
  a.sbeta = strides_at(strides, 3), a.sdout = strides_at(strides, 4), a.sg = strides_at(strides, 5);
  a.initial_state = initial_state, a.final_state = final_state, a.d_final_state = d_final_state;
  a.ckpt = ckpt, a.ckpt_every = ckpt_every;
  a.dv = dv, a.d_initial_state = d_initial_state;
  int64_t sizes[2] = {0, 0};
  backward_dispatch(a, warps, flush, vec_mode, sizes);
  const int tiles = static_cast<int>(sizes[0]);
  const size_t n = static_cast<size_t>(B) * H * L;
  std::vector<float> q_part(tiles * n * Dk, std::nanf("")), k_part(q_part), b_part(tiles * n, std::nanf(""));
  std::vector<float> g_part(b_part), scratch(g != nullptr ? sizes[1] * B * H : 0, std::nanf(""));
  a.dq_part = q_part.data();
  a.dk_part = k_part.data();
  a.dbeta_part = delta ? b_part.data() : nullptr;
  a.dg_part = g != nullptr ? g_part.data() : nullptr;
  a.scratch = g != nullptr ? scratch.data() : nullptr;
  const int rc = backward_dispatch(a, warps, flush, vec_mode);
  for (size_t i = 0; i < n * Dk; ++i) {
    dq[i] = dk[i] = 0.0f;
    for (int t = 0; t < tiles; ++t) dq[i] += q_part[t * n * Dk + i], dk[i] += k_part[t * n * Dk + i];
  }
  for (size_t i = 0; delta && i < n; ++i) {
    dbeta[i] = 0.0f;
    for (int t = 0; t < tiles; ++t) dbeta[i] += b_part[t * n + i];
  }
  for (size_t i = 0; g != nullptr && i < n; ++i) {
    dg[i] = 0.0f;
    for (int t = 0; t < tiles; ++t) dg[i] += g_part[t * n + i];
  }
  return rc;
}
"""


@pytest.fixture(scope="module")
def emulator_library(tmp_path_factory) -> Path:
    """The kernels compiled for the CPU with g++ and the emulation above: a shared library (built once per module)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    build = tmp_path_factory.mktemp("cuda-emulator")
    for name, text in [("cuda_runtime.h", EMU_CUDA_RUNTIME), ("cuda_bf16.h", EMU_CUDA_BF16), ("emu.cpp", EMU_DRIVER)]:
        (build / name).write_text(text)
    cmd = ["g++", "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas", "-Werror"]
    cmd += [f"-I{build}", f"-I{KERNELS}", "-o", str(build / "emu.so"), str(build / "emu.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return build / "emu.so"


@pytest.fixture(scope="module")
def emulator(emulator_library):
    """The emulated kernels loaded with ctypes (entry points emu_forward and emu_backward)."""
    return ctypes.CDLL(str(emulator_library))


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _strides(*ts: torch.Tensor | None):
    values = [s for t in ts for s in (t.stride()[:3] if t is not None else (0, 0, 0))]
    return (ctypes.c_longlong * len(values))(*values)


def run_emulated(lib, op, q, k, v, beta, s0, do, dS, *, scale, C, g=None, warps=0, flush=0, vec=1):
    """Forward then backward through the emulated kernels: [o, S, dq, dk, dv, (dbeta,) (dg,) ds0].

    ``g`` (float32 [B, H, L] or None) runs the decay kernels. ``warps``/``flush`` override the backward's block
    layout (and the forward's block size); 0 keeps the launchers' choice. ``vec=0`` forces the scalar loads.
    """
    delta = op == "delta_rule"
    B, H, L, Dk = q.shape
    Dv = v.shape[-1]
    code = 0 if q.dtype == torch.float32 else 1
    nan = float("nan")
    o = torch.full((B, H, L, Dv), nan, dtype=q.dtype)
    S = torch.full((B, H, Dk, Dv), nan)
    resid = torch.full((B, H, L, Dv), nan) if delta else None
    n_ckpt = (L - 1) // C
    ckpt = torch.full((B, H, n_ckpt, Dv, Dk), nan) if n_ckpt > 0 else None
    b32 = beta.float() if delta else None
    f = ctypes.c_float(scale)
    rc = lib.emu_forward(
        code, int(delta), B, H, L, Dk, Dv, f, _ptr(q), _ptr(k), _ptr(v), _ptr(b32), _ptr(g), _ptr(s0),
        _strides(q, k, v, b32, g), _ptr(o), _ptr(S), _ptr(resid), _ptr(ckpt), C, warps, vec,
    )  # fmt: skip
    assert rc == 0, f"emulated forward failed ({rc}): a divergent shuffle or barrier, or a bad layout"
    dq, dk = torch.full((B, H, L, Dk), nan), torch.full((B, H, L, Dk), nan)
    dv, dbeta = torch.full((B, H, L, Dv), nan, dtype=q.dtype), torch.full((B, H, L), nan)
    ds0, dg = torch.full((B, H, Dk, Dv), nan), torch.full((B, H, L), nan)
    x = None if delta else v
    rc = lib.emu_backward(
        code, int(delta), B, H, L, Dk, Dv, f, _ptr(q), _ptr(k), _ptr(x), _ptr(b32), _ptr(g), _ptr(resid), _ptr(do),
        _strides(q, k, x, b32, do, g), _ptr(s0), _ptr(S), _ptr(dS), _ptr(ckpt), C, _ptr(dq), _ptr(dk), _ptr(dv),
        _ptr(dbeta), _ptr(dg), _ptr(ds0), warps, flush, vec,
    )  # fmt: skip
    assert rc == 0, f"emulated backward failed ({rc}): a divergent shuffle or barrier, or a bad layout"
    return [o, S, dq, dk, dv, *([dbeta] if delta else []), *([dg] if g is not None else []), ds0]


def emulator_case(op, B, H, L, Dk, Dv, dtype, *, seed, strided=False, with_s0=True, with_dS=True):
    """Inputs (rounded to ``dtype``), possibly strided like the layer's projections, and the upstream gradients.
    (The log-decay g comes from :func:`emulator_log_decay`, so that these inputs stay as they were.)"""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, Dk, generator=g).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, H, L, Dk, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, H, L, Dv, generator=g).to(dtype)
    beta = torch.sigmoid(torch.randn(B, H, L, generator=g))
    do = torch.randn(B, H, L, Dv, generator=g).to(dtype)
    s0 = torch.randn(B, H, Dk, Dv, generator=g) if with_s0 else None
    dS = torch.randn(B, H, Dk, Dv, generator=g) if with_dS else None
    if strided:  # q, k, v views of one [B, L, 3, H, D] buffer; beta and dO transposed views
        buf = torch.zeros(B, L, 3, H, max(Dk, Dv), dtype=dtype)
        for i, x in enumerate((q, k, v)):
            buf[:, :, i, :, : x.shape[-1]] = x.transpose(1, 2)
        q, k, v = (buf[:, :, i].permute(0, 2, 1, 3)[..., : x.shape[-1]] for i, x in enumerate((q, k, v)))
        beta = beta.transpose(1, 2).contiguous().transpose(1, 2)
        do = do.transpose(1, 2).contiguous().transpose(1, 2)
    return q, k, v, beta, s0, do, dS


DECAY_KINDS = ["g0", "moderate", "strong"]


def emulator_log_decay(kind, B, H, L, *, seed, strided=False):
    """float32 log-decays g [B, H, L]: "g0" (zeros), "moderate" (uniform in [-3, 0]), "strong" (down to -20, see
    :func:`strong_log_decay`); ``strided`` gives a transposed view, as for beta."""
    if kind == "g0":
        g = torch.zeros(B, H, L)
    elif kind == "moderate":
        g = -3 * torch.rand(B, H, L, generator=torch.Generator().manual_seed(seed))
    else:
        g = strong_log_decay(B, H, L, seed=seed)
    return g.transpose(1, 2).contiguous().transpose(1, 2) if strided else g


def emulator_reference(op, q, k, v, beta, s0, do, dS, *, scale, g=None):
    """The recurrent form's outputs and gradients (dg after dbeta, with g) in float64 for the same (rounded) inputs."""
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    leaves = [x.double().requires_grad_() for x in ([q, k, v] + ([beta] if op == "delta_rule" else []))]
    log_decay = [] if g is None else [g.double().requires_grad_()]
    state = (torch.zeros(B, H, Dk, Dv) if s0 is None else s0).double().requires_grad_()
    fn = delta_rule if op == "delta_rule" else sum_rule
    kwargs = {"g": log_decay[0]} if log_decay else {}
    o, S = fn(*leaves, initial_state=state, output_final_state=True, scale=scale, impl="recurrent", **kwargs)
    loss = (o * do.double()).sum() + (0 if dS is None else (S * dS.double()).sum())
    return [o.detach(), S.detach(), *torch.autograd.grad(loss, [*leaves, *log_decay, state])]


def names_for_emulated(op: str, decay: bool = False) -> list[str]:
    per_token = ["dbeta"] if op == "delta_rule" else []
    return ["o", "final_state", "dq", "dk", "dv", *per_token, *(["dg"] if decay else []), "d_initial_state"]


EMULATED = [  # (id, Dk, Dv, L, C, extra): every key-width tile, ragged shapes, layouts, strides, no state
    ("tile4x4-Dk3-Dv1", 3, 1, 13, 4, {}),
    ("tile4x4-Dk16-Dv40", 16, 40, 21, 8, {}),
    ("tile4x8-Dk30-Dv7-strided", 30, 7, 21, 8, {"strided": True}),
    ("tile8x8-Dk48-Dv50-3warps-flush8", 48, 50, 13, 4, {"warps": 3, "flush": 8}),
    ("tile8x8-Dk64-Dv32-2warps-flush4", 64, 32, 13, 4, {"warps": 2, "flush": 4}),
    ("tile8x8-Dk64-scalar-loads", 64, 16, 21, 8, {"vec": 0}),
    ("tile8x16-Dk100-Dv9-no-state", 100, 9, 13, 4, {"with_s0": False, "with_dS": False}),
    ("tile16x16-Dk256-Dv36-2tiles", 256, 36, 9, 4, {}),
    ("tile32x16-Dk384-Dv4", 384, 4, 9, 4, {}),
    ("tile32x16-Dk512-Dv3-L-multiple-of-C", 512, 3, 8, 4, {}),
    ("L1", 16, 16, 1, 8, {}),
    ("C1", 16, 16, 9, 1, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, Dk, Dv, L, C, extra", EMULATED, ids=[c[0] for c in EMULATED])
def test_emulated_kernels_match_recurrent(emulator, op, dtype, name, Dk, Dv, L, C, extra):
    """The kernels' own source, emulated on the CPU, gives the reference's outputs, final state and every gradient."""
    extra = dict(extra)
    case_keys = ("strided", "with_s0", "with_dS")
    case_args = {key: extra.pop(key) for key in case_keys if key in extra}
    inputs = emulator_case(op, 1, 2, L, Dk, Dv, dtype, seed=Dk + L, **case_args)
    actual = run_emulated(emulator, op, *inputs, scale=0.7, C=C, **extra)
    expected = emulator_reference(op, *inputs, scale=0.7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e, label in zip(actual, expected, names_for_emulated(op), strict=True):
        assert torch.isfinite(a.float()).all(), f"{label}: unwritten (NaN) elements"
        err = ((a.double() - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{label}: relative error {err:.2e}"


EMULATED_DECAY = [  # (id, Dk, Dv, L, C, log-decay, dtype, extra); L = 21 is not a multiple of C = 8
    ("Dk16-Dv40-L21-C8-3warps-flush8-strong-fp32", 16, 40, 21, 8, "strong", torch.float32, {"flush": 8}),
    ("Dk16-Dv40-L21-C8-3warps-flush8-strong-bf16", 16, 40, 21, 8, "strong", torch.bfloat16, {"flush": 8}),
    ("Dk30-Dv7-strided-scalar-loads-moderate", 30, 7, 21, 8, "moderate", torch.float32, {"strided": True}),
    ("Dk20-Dv24-2tiles-L-multiple-of-C-strong", 20, 24, 12, 4, "strong", torch.float32, {"warps": 1}),
    ("Dk8-Dv8-L13-C4-g0", 8, 8, 13, 4, "g0", torch.float32, {}),
    ("Dk8-Dv8-no-state-moderate", 8, 8, 13, 4, "moderate", torch.float32, {"with_s0": False, "with_dS": False}),
    ("C1-strong", 16, 16, 9, 1, "strong", torch.float32, {}),
    ("L1-strong", 16, 16, 1, 8, "strong", torch.float32, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, Dk, Dv, L, C, decay, dtype, extra", EMULATED_DECAY, ids=[c[0] for c in EMULATED_DECAY])
def test_emulated_kernels_with_decay_match_recurrent(emulator, op, name, Dk, Dv, L, C, decay, dtype, extra):
    """With a log-decay g (zero, in [-3, 0], down to -20) the emulated kernels give the reference's outputs, final
    state and every gradient including dg, dg also relative to each token's decay."""
    extra = dict(extra)
    case_args = {key: extra.pop(key) for key in ("strided", "with_s0", "with_dS") if key in extra}
    inputs = emulator_case(op, 1, 2, L, Dk, Dv, dtype, seed=Dk + L, **case_args)
    g = emulator_log_decay(decay, 1, 2, L, seed=Dk + L + 1, strided=case_args.get("strided", False))
    actual = run_emulated(emulator, op, *inputs, scale=0.7, C=C, g=g, **extra)
    expected = emulator_reference(op, *inputs, scale=0.7, g=g)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e, label in zip(actual, expected, names_for_emulated(op, decay=True), strict=True):
        assert torch.isfinite(a.float()).all(), f"{label}: unwritten (NaN) elements"
        err = ((a.double() - e).norm() / e.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{label}: relative error {err:.2e}"
    assert_dg_close_per_decay(actual[-2], expected[-2], g, tol=1e-5)


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


def poisoned_emulator_case(op, bad, *, L=13, Dk=20, Dv=12, seed=31):
    """emulator_case inputs (float32, two heads) with ``bad`` = [(input, index, value)] written in."""
    q, k, v, beta, s0, do, dS = emulator_case(op, 1, 2, L, Dk, Dv, torch.float32, seed=seed)
    named = {"q": q, "k": k, "v": v, "beta": beta, "s0": s0}
    for where, index, value in bad:
        named[where][index] = value
    return q, k, v, beta, s0, do, dS


@pytest.mark.slow
@pytest.mark.parametrize("op, where", BAD_INPUTS, ids=[f"{op}-{w}" for op, w in BAD_INPUTS])
@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("name, t, C", BAD_TOKEN_PLACES, ids=[c[0] for c in BAD_TOKEN_PLACES])
def test_emulated_kernels_keep_a_bad_token_where_the_recurrent_form_does(emulator, op, where, value, name, t, C):
    """A NaN/inf in one token of one head: the emulated kernels give the recurrent form's finite/non-finite pattern
    in the outputs, final state and every gradient (no later token spoils an earlier one through the backward's
    reverse reconstruction of the state), and its values where finite."""
    index = (0, 1, t) if where == "beta" else (0, 1, t, 3)
    inputs = poisoned_emulator_case(op, [(where, index, value)])
    actual = run_emulated(emulator, op, *inputs, scale=0.7, C=C)
    expected = emulator_reference(op, *inputs, scale=0.7)
    assert_same_pattern(actual, expected, names_for_emulated(op), tol=1e-5)


SEVERAL_BAD = [  # (id, [(input, index, value)], C)
    ("initial-state", [("s0", (0, 1, 2, 5), NAN)], 4),
    ("initial-state-and-a-token", [("s0", (0, 0, 7, 1), INF), ("v", (0, 0, 9, 4), NAN)], 4),
    ("two-tokens-in-one-block", [("v", (0, 1, 5, 2), NAN), ("q", (0, 1, 6, 0), -INF)], 8),
    ("every-token-of-one-head", [("k", (0, 1), NAN)], 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, bad, C", SEVERAL_BAD, ids=[c[0] for c in SEVERAL_BAD])
def test_emulated_kernels_with_a_bad_state_or_several_bad_values(emulator, op, name, bad, C):
    """A NaN/inf in the initial state, or several at once: the emulated kernels match the recurrent pattern."""
    inputs = poisoned_emulator_case(op, bad)
    actual = run_emulated(emulator, op, *inputs, scale=0.7, C=C)
    assert_same_pattern(actual, emulator_reference(op, *inputs, scale=0.7), names_for_emulated(op), tol=1e-5)


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
def test_emulated_kernels_with_decay_keep_a_bad_value_where_the_recurrent_form_does(emulator, op, name, bad):
    """With a log-decay, a NaN/inf in a token, in g or in the initial state (and g = -inf, alpha = 0, which is
    finite): the emulated kernels give the recurrent form's finite/non-finite pattern and its values where finite."""
    g = emulator_log_decay("moderate", 1, 2, 13, seed=32)
    for where, index, value in bad:
        if where == "g":
            g[index] = value
    inputs = poisoned_emulator_case(op, [b for b in bad if b[0] != "g"])
    actual = run_emulated(emulator, op, *inputs, scale=0.7, C=4, g=g)
    expected = emulator_reference(op, *inputs, scale=0.7, g=g)
    assert_same_pattern(actual, expected, names_for_emulated(op, decay=True), tol=1e-5)


@pytest.fixture(scope="module")
def emulated_extension(tmp_path_factory, emulator_library):
    """The real torch binding (kernels/fast_weight_binding.cpp) built for the CPU and linked against the emulated
    launchers (the host API of kernels/fast_weight.h in ``emulator_library``).

    This is also the binding's compile check against torch's headers: it includes no CUDA header, and the only
    difference of this build is that it accepts CPU tensors (LMTOOL_FW_HOST_EMULATION).
    """
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        pytest.skip("ninja not installed")
    build = tmp_path_factory.mktemp("cuda-emulated-extension")
    return cpp_extension.load(
        name="lmtool_fast_weight_emulated",
        sources=[str(KERNELS / "fast_weight_binding.cpp")],
        extra_include_paths=[str(KERNELS)],
        extra_cflags=["-O1", "-DLMTOOL_FW_HOST_EMULATION"],
        extra_ldflags=["-pthread", str(emulator_library), f"-Wl,-rpath,{emulator_library.parent}"],
        build_directory=str(build),
    )


GLUE_CASES = [  # (id, dtypes of q/k/v (and beta), initial state, loss terms, strided, checkpoint_every)
    ("fp32", (torch.float32,) * 4, True, "o+S", False, 8),
    ("bf16", (torch.bfloat16,) * 4, True, "o+S", False, 8),
    ("fp16-as-fp32", (torch.float16,) * 4, False, "o+S", False, 8),
    ("mixed-dtypes", (torch.float32, torch.float32, torch.bfloat16, torch.float16), True, "o+S", False, 16),
    ("strided-like-the-layer", (torch.float32,) * 4, True, "o+S", True, 8),
    ("loss-on-o-only", (torch.float32,) * 4, True, "o", False, 8),
    ("loss-on-state-only", (torch.bfloat16,) * 4, True, "S", False, 64),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name, dtypes, with_s0, terms, strided, C", GLUE_CASES, ids=[c[0] for c in GLUE_CASES])
def test_binding_and_autograd_on_emulated_kernels(
    emulated_extension, monkeypatch, op, name, dtypes, with_s0, terms, strided, C
):
    """The "cuda" form end to end (wrapper, autograd.Function, torch binding, launchers' API) on the emulated kernels:
    outputs, dtypes and every gradient match the float64 reference; kernel outputs are NaN-poisoned first."""
    monkeypatch.setattr(cuda, "load_extension", lambda: emulated_extension)
    monkeypatch.setenv("LMTOOL_CUDA_POISON", "1")
    B, H, L, Dk, Dv = 2, 2, 37, 20, 12
    q, k, v, beta, s0, do, dS = emulator_case(op, B, H, L, Dk, Dv, torch.float32, seed=21, strided=strided)
    inputs = [x.to(dt) for x, dt in zip([q, k, v, beta], dtypes, strict=True)][: 4 if op == "delta_rule" else 3]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    state = s0.clone().requires_grad_() if with_s0 else None
    o, S = CUDA_FORMS[op](*leaves, scale=0.8, initial_state=state, output_final_state=True, checkpoint_every=C)
    assert o.dtype == dtypes[0] and S.dtype == torch.float32
    loss = ((o.double() * do.double()).sum() if "o" in terms else 0) + ((S.double() * dS).sum() if "S" in terms else 0)
    wrt = leaves + ([state] if with_s0 else [])
    grads = torch.autograd.grad(loss, wrt)

    ref_leaves = [x.detach().double().requires_grad_() for x in inputs]
    ref_state = (s0 if with_s0 else torch.zeros(B, H, Dk, Dv)).double().requires_grad_()
    fn = delta_rule if op == "delta_rule" else sum_rule
    o_ref, S_ref = fn(*ref_leaves, scale=0.8, initial_state=ref_state, output_final_state=True, impl="recurrent")
    loss_ref = ((o_ref * do.double()).sum() if "o" in terms else 0) + ((S_ref * dS).sum() if "S" in terms else 0)
    ref_grads = torch.autograd.grad(loss_ref, ref_leaves + [ref_state], allow_unused=True)[: len(wrt)]

    low = any(dt != torch.float32 for dt in dtypes)
    tol = 1e-2 if low else 1e-5
    for x, g in zip(wrt, grads, strict=True):
        assert g.dtype == x.dtype
    labels = ["o", "S", "dq", "dk", "dv", *(["dbeta"] if op == "delta_rule" else []), *(["ds0"] if with_s0 else [])]
    for label, a, e in zip(labels, [o, S, *grads], [o_ref, S_ref, *ref_grads], strict=True):
        e = torch.zeros_like(a, dtype=torch.float64) if e is None else e.detach()
        assert torch.isfinite(a.float()).all(), f"{label}: NaN (an unwritten element)"
        err = ((a.double() - e).norm() / e.norm().clamp_min(1e-12)).item()
        assert err <= tol, f"{label}: relative error {err:.2e}"


GLUE_DECAY_CASES = [  # (id, dtype of q/k/v/beta, log-decay, loss terms, strided, checkpoint_every)
    ("fp32-strong-loss-on-o-only", torch.float32, "strong", "o", False, 64),
    ("bf16-moderate", torch.bfloat16, "moderate", "o+S", False, 8),
    ("strided-like-the-layer-strong", torch.float32, "strong", "o+S", True, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "name, dtype, decay, terms, strided, C", GLUE_DECAY_CASES, ids=[c[0] for c in GLUE_DECAY_CASES]
)
def test_binding_and_autograd_with_decay_on_emulated_kernels(
    emulated_extension, monkeypatch, op, name, dtype, decay, terms, strided, C
):
    """The "cuda" form with g end to end (wrapper, binding, emulated decay kernels, NaN-poisoned outputs and
    scratch): outputs and every gradient, dg included (float32), match the float64 reference."""
    monkeypatch.setattr(cuda, "load_extension", lambda: emulated_extension)
    monkeypatch.setenv("LMTOOL_CUDA_POISON", "1")
    B, H, L, Dk, Dv = 1, 2, 21, 20, 12
    q, k, v, beta, s0, do, dS = emulator_case(op, B, H, L, Dk, Dv, dtype, seed=23, strided=strided)
    inputs = [q, k, v, beta.to(dtype)][: 4 if op == "delta_rule" else 3]
    g = emulator_log_decay(decay, B, H, L, seed=24, strided=strided)
    leaves = [x.detach().clone().requires_grad_() for x in [*inputs, g, s0]]
    *xs, g_leaf, state = leaves
    o, S = CUDA_FORMS[op](*xs, g=g_leaf, scale=0.8, initial_state=state, output_final_state=True, checkpoint_every=C)
    assert o.dtype == dtype and S.dtype == torch.float32
    loss = ((o.double() * do.double()).sum() if "o" in terms else 0) + ((S.double() * dS).sum() if "S" in terms else 0)
    grads = torch.autograd.grad(loss, leaves)
    assert grads[-2].dtype == torch.float32

    ref = [x.detach().double().requires_grad_() for x in leaves]
    fn = delta_rule if op == "delta_rule" else sum_rule
    o_ref, S_ref = fn(*ref[:-2], g=ref[-2], scale=0.8, initial_state=ref[-1], output_final_state=True, impl="recurrent")
    loss_ref = ((o_ref * do.double()).sum() if "o" in terms else 0) + ((S_ref * dS).sum() if "S" in terms else 0)
    ref_grads = torch.autograd.grad(loss_ref, ref)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    labels = names_for_emulated(op, decay=True)
    for label, a, e in zip(labels, [o, S, *grads], [o_ref, S_ref, *ref_grads], strict=True):
        assert torch.isfinite(a.float()).all(), f"{label}: NaN (an unwritten element)"
        err = ((a.double() - e.detach()).norm() / e.norm().clamp_min(1e-12)).item()
        assert err <= tol, f"{label}: relative error {err:.2e}"
    assert_dg_close_per_decay(grads[-2], ref_grads[-2], g, tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_emulated_inference_saves_nothing_and_matches(emulated_extension, monkeypatch, op):
    """Without gradients the forward stores no residuals or checkpoints and gives the same outputs and state."""
    monkeypatch.setattr(cuda, "load_extension", lambda: emulated_extension)
    q, k, v, beta, s0, _, _ = emulator_case(op, 1, 2, 30, 8, 8, torch.float32, seed=22)
    inputs = [q, k, v, beta][: 4 if op == "delta_rule" else 3]
    with torch.no_grad():
        o, S = CUDA_FORMS[op](*inputs, initial_state=s0, output_final_state=True, checkpoint_every=4)
    o_ref, S_ref = CHUNK_FORMS[op](*inputs, initial_state=s0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(S, S_ref, rtol=1e-5, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        CUDA_FORMS[op](*[x.clone().requires_grad_() for x in inputs], checkpoint_every=4)
    # q, k, r or v, beta, the final state and (L-1)//C = 7 checkpoints; nothing of size L x Dk x Dv.
    bound = 2 * (30 * 8 * 2) * 2 + 30 * 8 * 2 + 60 + 2 * 64 + 7 * 2 * 64
    assert 0 < sum(saved) <= bound


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_cuda_form_keeps_a_bad_token_where_the_recurrent_form_does(emulated_extension, monkeypatch, op, dtype):
    """The "cuda" form end to end (wrapper, binding, emulated kernels) with a NaN in k of the first checkpoint
    block: the backward recomputes S from the initial state the wrapper kept, and matches the recurrent pattern."""
    monkeypatch.setattr(cuda, "load_extension", lambda: emulated_extension)
    q, k, v, beta, s0, do, dS = poisoned_emulator_case(op, [("k", (0, 1, 2, 3), NAN)], L=21)
    inputs = [x.to(dtype) for x in (q, k, v, beta)][: 4 if op == "delta_rule" else 3]
    leaves = [x.clone().requires_grad_() for x in inputs]
    state = s0.clone().requires_grad_()
    o, S = CUDA_FORMS[op](*leaves, scale=0.7, initial_state=state, output_final_state=True, checkpoint_every=8)
    grads = torch.autograd.grad((o.double() * do.double()).sum() + (S.double() * dS).sum(), [*leaves, state])
    rounded = [x.to(dtype).float() for x in (q, k, v)] + [beta.to(dtype).float()]
    expected = emulator_reference(op, *rounded, s0, do.to(dtype).float(), dS, scale=0.7)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_pattern([o, S, *grads], expected, names_for_emulated(op), tol=tol)


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
