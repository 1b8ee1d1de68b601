// Device helpers shared by the forward and backward fast-weight kernels (plain CUDA C++, no torch).
//
// Thread mapping (both passes). Each thread block owns one sequence bh and one tile of columns of the
// fast weight S [Dk, Dv]; the columns of S evolve independently for both rules (u_t's column j only needs
// column j of S), so tiles never talk to each other during the scan. Inside a warp, lanes form 32 / R
// column groups of R lanes; a group owns NC adjacent columns, and lane r of the group holds the NR rows
//
//     i = 4 * (r + m * R) + c,     m < NR / 4,  c < 4
//
// of those columns in registers (NR * NC floats of S). A group therefore covers DkPad = NR * R >= Dk rows;
// rows >= Dk and columns >= Dv are held as zeros, which keeps them zero through both recurrences, so the
// padding needs no branches in the arithmetic, only bounds checks on loads and stores. Rows are taken in
// interleaved groups of four so that the R lanes read one contiguous row segment (vector loads) per m.
// Column sums over rows (S^T k, S^T q, G^T k) are butterfly reductions over the R lanes of a group: warp
// shuffles in uniform control flow, no shared memory and no block barrier.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "fast_weight.h"

namespace lmtool_fw {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kNC = 2;  // columns of S per thread

// (R lanes per column group, NR rows per lane) by key width; DkPad = R * NR.
template <int R_, int NR_>
struct Tile {
  static constexpr int R = R_;
  static constexpr int NR = NR_;
  static constexpr int CG = 32 / R_;  // column groups per warp
  static constexpr int DkPad = R_ * NR_;
  static constexpr int P = NR_ <= 8 ? 4 : 2;  // tokens prefetched ahead into registers
  static_assert(NR_ % 4 == 0 && 32 % R_ == 0, "rows come in groups of four; R divides the warp");
};

// Calls f(Tile<R, NR>{}) for the smallest tile that covers Dk; returns -1 when Dk > kMaxDk.
template <typename F>
inline int dispatch_dk(int Dk, F&& f) {
  if (Dk <= 16) return f(Tile<4, 4>{});
  if (Dk <= 32) return f(Tile<4, 8>{});
  if (Dk <= 64) return f(Tile<8, 8>{});
  if (Dk <= 128) return f(Tile<8, 16>{});
  if (Dk <= 256) return f(Tile<16, 16>{});
  if (Dk <= kMaxDk) return f(Tile<32, 16>{});
  return -1;
}

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

#ifndef LMTOOL_FW_HOST_EMULATION
// Launches kernel<<<grid, block, shared, stream>>>(args...) and returns the launch's error code (0: cudaSuccess).
// The tests' CPU emulation (tests/ops/emulation/) supplies its own launch_kernel, so that it runs the launchers
// in fast_weight_{forward,backward}.cu unchanged.
template <typename... Params, typename... Args>
int launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                  const Args&... args) {
  kernel<<<grid, block, shared, stream>>>(args...);
  return static_cast<int>(cudaGetLastError());
}
#endif

// A thread's register tile T[NR][NC] of a Dk x Dv state: rows 4 (r + m R) + c (m < NR / 4, c < 4), columns
// j0 + n (n < NC). In memory the state is [Dk, Dv] row-major, or [Dv, Dk] with TRANSPOSED (the checkpoints,
// so that a token's column tile is contiguous). Entries outside Dk x Dv are skipped (store) or zero (load),
// and so is the whole tile when p is null.
template <bool TRANSPOSED>
__device__ __forceinline__ int64_t tile_offset(int i, int j, int Dk, int Dv) {
  return TRANSPOSED ? static_cast<int64_t>(j) * Dk + i : static_cast<int64_t>(i) * Dv + j;
}

template <bool TRANSPOSED, int R, int NR, int NC>
__device__ __forceinline__ void load_tile(const float* __restrict__ p, int Dk, int Dv, int r, int j0,
                                          float (&T)[NR][NC]) {
#pragma unroll
  for (int m = 0; m < NR / 4; ++m) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int i = 4 * (r + m * R) + c;
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int j = j0 + n;
        T[4 * m + c][n] = (p != nullptr && i < Dk && j < Dv) ? p[tile_offset<TRANSPOSED>(i, j, Dk, Dv)] : 0.0f;
      }
    }
  }
}

template <bool TRANSPOSED, int R, int NR, int NC>
__device__ __forceinline__ void store_tile(float* __restrict__ p, int Dk, int Dv, int r, int j0,
                                           const float (&T)[NR][NC]) {
#pragma unroll
  for (int m = 0; m < NR / 4; ++m) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int i = 4 * (r + m * R) + c;
#pragma unroll
      for (int n = 0; n < NC; ++n) {
        const int j = j0 + n;
        if (i < Dk && j < Dv) p[tile_offset<TRANSPOSED>(i, j, Dk, Dv)] = T[4 * m + c][n];
      }
    }
  }
}

// Whether any of the values is NaN or inf.
template <int N>
__device__ __forceinline__ bool any_nonfinite(const float (&x)[N]) {
  bool bad = false;
#pragma unroll
  for (int i = 0; i < N; ++i) bad |= !isfinite(x[i]);
  return bad;
}
template <int N, int M>
__device__ __forceinline__ bool any_nonfinite(const float (&x)[N][M]) {
  bool bad = false;
#pragma unroll
  for (int i = 0; i < N; ++i) bad |= any_nonfinite(x[i]);
  return bad;
}

// num_checkpoints() of fast_weight.h, for device code.
__host__ __device__ __forceinline__ int checkpoint_count(int L, int C) { return L > 0 ? (L - 1) / C : 0; }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);  // round to nearest even
}

// Four consecutive elements starting at p (16-byte aligned for float, 8-byte for bf16) as floats.
__device__ __forceinline__ void load4(const float* p, float* out) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  out[0] = x.x;
  out[1] = x.y;
  out[2] = x.z;
  out[3] = x.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* p, float* out) {
  const uint2 w = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w.y));
  out[0] = a.x;
  out[1] = a.y;
  out[2] = b.x;
  out[3] = b.y;
}

// The NR rows (see the mapping above) of a length-D vector at p; zeros past D or when !valid.
// `vec`: D is a multiple of 4 and p is aligned for load4, so a group of four is all in or all out.
template <int R, int NR, typename T>
__device__ __forceinline__ void load_rows(const T* __restrict__ p, int D, int r, bool valid, bool vec,
                                          float (&out)[NR]) {
#pragma unroll
  for (int m = 0; m < NR / 4; ++m) {
    const int i0 = 4 * (r + m * R);
    if (valid && vec && i0 < D) {
      load4(p + i0, &out[4 * m]);
    } else {
#pragma unroll
      for (int c = 0; c < 4; ++c) out[4 * m + c] = (valid && i0 + c < D) ? to_float(p[i0 + c]) : 0.0f;
    }
  }
}

// The NC columns j0 .. j0 + NC - 1 of a length-D vector at p; zeros past D or when !valid.
template <int NC, typename T>
__device__ __forceinline__ void load_cols(const T* __restrict__ p, int D, int j0, bool valid, float (&out)[NC]) {
#pragma unroll
  for (int n = 0; n < NC; ++n) out[n] = (valid && j0 + n < D) ? to_float(p[j0 + n]) : 0.0f;
}

// Sum of x[n] over the R lanes of each column group (lanes differ in their low log2(R) bits); every
// lane of the group receives the sums. Must be called by the whole warp (uniform control flow).
template <int R, int N>
__device__ __forceinline__ void group_sum(float (&x)[N]) {
#pragma unroll
  for (int offset = R / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int n = 0; n < N; ++n) x[n] += __shfl_xor_sync(kFullMask, x[n], offset);
  }
}

// Sum of x over the column groups of the warp (lanes with equal low log2(R) bits); every lane receives it.
template <int R>
__device__ __forceinline__ float across_groups_sum(float x) {
#pragma unroll
  for (int offset = 16; offset >= R; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// One halving step of transpose_reduce: values [0, LEN) -> [0, LEN / 2), trading halves with lane ^ MASK.
template <int LEN, int MASK, int V>
__device__ __forceinline__ int halve(float (&x)[V], int lane) {
  const bool upper = (lane & MASK) != 0;  // keep the upper half, send the lower half
#pragma unroll
  for (int e = 0; e < LEN / 2; ++e) {
    const float keep = upper ? x[e + LEN / 2] : x[e];
    const float send = upper ? x[e] : x[e + LEN / 2];
    x[e] = keep + __shfl_xor_sync(kFullMask, send, MASK);
  }
  return upper ? LEN / 2 : 0;
}

template <int R, int LEN, int S, int V>
__device__ __forceinline__ int transpose_reduce_from(float (&x)[V], int lane) {
  if constexpr (S == 0) {
    return 0;
  } else {
    const int first = halve<LEN, R * S>(x, lane);
    return first + transpose_reduce_from<R, LEN / 2, S / 2>(x, lane);
  }
}

// Sums each of the V values of a lane over the 32 / R column groups (lanes that hold the same rows)
// without every lane receiving every sum: each halving step trades half of the remaining values with
// the partner group, so afterwards the lane holds V / CG sums in x[0 .. V / CG), those of the values
// first .. first + V / CG - 1 (the return value). V * (1 - R / 32) shuffles per lane instead of
// V * log2(32 / R). Must be called by the whole warp (uniform control flow).
template <int R, int V>
__device__ __forceinline__ int transpose_reduce(float (&x)[V], int lane) {
  static_assert(V % (32 / R) == 0, "the values must split evenly over the column groups");
  return transpose_reduce_from<R, V, 32 / R / 2>(x, lane);
}

}  // namespace lmtool_fw
