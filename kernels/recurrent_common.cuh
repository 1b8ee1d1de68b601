// Device helpers of the recurrent scans (delta_rnn_scan.cu, rec_delta_scan.cu): plain CUDA C++, no torch.
//
// A block owns one (batch element, head) and keeps its D x W fast matrices in shared memory as rows of W + 1
// floats. Threads loop over columns (j = tid, tid + blockDim, ...) for the column sums M^T x and the rank-one
// writes, and over rows for the row sums M x of the backward: with the padded rows, both a warp reading one
// column (consecutive threads, consecutive rows: stride W + 1) and one reading a row (consecutive columns) hit
// 32 different banks. Every phase of a token ends with __syncthreads at the top level of the token loop (uniform
// control flow), and no thread writes what another thread reads within the same phase.
#pragma once

#include <algorithm>

#include "fast_weight_common.cuh"
#include "recurrent_scan.h"

namespace lmtool_fw {

constexpr int kRecMaxThreads = 256;
constexpr size_t kDefaultSharedBytes = 48 * 1024;  // above this a kernel must opt in (sm_80: 163 KB, sm_90: 227 KB)

// Threads of a block whose loops cover `work` items: a multiple of 32, at most kRecMaxThreads.
inline int block_threads(int work) { return std::min(kRecMaxThreads, std::max(32, ceil_div(work, 32) * 32)); }

// Launches with `shared` bytes of dynamic shared memory, opting in to more than the default where needed.
template <typename... Params, typename... Args>
int launch_with_shared(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
                       const Args&... args) {
  if (shared > kDefaultSharedBytes) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return launch_kernel(kernel, grid, block, shared, stream, args...);
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// softmax(x[0 .. D))[i]. Every thread recomputes the maximum and the sum (D <= 64): no reduction, no barrier.
__device__ __forceinline__ float softmax_at(const float* x, int D, int i) {
  float m = x[0];
  for (int j = 1; j < D; ++j) m = fmaxf(m, x[j]);
  float s = 0.0f;
  for (int j = 0; j < D; ++j) s += expf(x[j] - m);
  return expf(x[i] - m) / s;
}

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s = fmaf(a[i], b[i], s);
  return s;
}

// sum_i M[i][j] x[i] over the D rows of a matrix with row stride ld (a column sum: M^T x).
__device__ __forceinline__ float col_dot(const float* M, int ld, int j, const float* x, int D) {
  float s = 0.0f;
  for (int i = 0; i < D; ++i) s = fmaf(M[i * ld + j], x[i], s);
  return s;
}

// sum_j M[i][j] x[j] over W columns (a row sum: M x).
__device__ __forceinline__ float row_dot(const float* M, int ld, int i, const float* x, int W) {
  float s = 0.0f;
  for (int j = 0; j < W; ++j) s = fmaf(M[i * ld + j], x[j], s);
  return s;
}

// M[:, j] += x a: column j's share of the rank-one write x a^T.
__device__ __forceinline__ void col_axpy(float* M, int ld, int j, const float* x, float a, int D) {
  for (int i = 0; i < D; ++i) M[i * ld + j] = fmaf(x[i], a, M[i * ld + j]);
}

// Copies `count` rows x cols matrices between global memory (dense) and shared memory (rows of ld floats); a null
// source gives zeros. The whole block takes part.
__device__ __forceinline__ void load_matrices(float* dst, const float* src, int count, int rows, int cols, int ld) {
  for (int e = threadIdx.x; e < count * rows * cols; e += blockDim.x) {
    const int m = e / (rows * cols), i = (e / cols) % rows, j = e % cols;
    dst[(m * rows + i) * ld + j] = src != nullptr ? src[e] : 0.0f;
  }
}
__device__ __forceinline__ void store_matrices(float* dst, const float* src, int count, int rows, int cols, int ld) {
  for (int e = threadIdx.x; e < count * rows * cols; e += blockDim.x) {
    const int m = e / (rows * cols), i = (e / cols) % rows, j = e % cols;
    dst[e] = src[(m * rows + i) * ld + j];
  }
}

// A per-head vector [D] from global memory (zeros for a null pointer) into shared memory.
__device__ __forceinline__ void load_vector(float* dst, const float* src, int D) {
  for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = src != nullptr ? src[i] : 0.0f;
}

// Whether the forward stored the state after token t (tokens C - 1, 2C - 1, .. before the last).
__device__ __forceinline__ bool is_checkpoint(int t, int L, int C) { return (t + 1) % C == 0 && t + 1 < L; }

// Where sequence bh's checkpoint after token t starts: `n` checkpoints of `size` floats per sequence.
__device__ __forceinline__ float* checkpoint_at(float* ckpt, int bh, int n, int t, int C, int64_t size) {
  return ckpt + (static_cast<int64_t>(bh) * n + (t + 1) / C - 1) * size;
}

// Column j of a rows x cols shared-memory matrix (rows of ld floats) into a dense global one.
__device__ __forceinline__ void store_column(float* dst, const float* M, int ld, int j, int rows, int cols) {
  for (int i = 0; i < rows; ++i) dst[static_cast<int64_t>(i) * cols + j] = M[i * ld + j];
}

}  // namespace lmtool_fw
