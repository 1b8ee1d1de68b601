// Self-referential weight matrix: the scan forward and the reverse-scan backward (math in recurrent_scan.h and
// docs/cuda_kernels.md), and the launchers. W [D, P] (P = 3 D + 4) lives in shared memory with rows of P + 1 floats;
// threads loop over its P columns and D rows.
#include "recurrent_common.cuh"

namespace lmtool_fw {

// The learning rate of column j: sigmoid of r_b's entry for j's block (y, q, k: D columns each; b: 4 columns).
__device__ __forceinline__ float srwm_rate(const float* r, int D, int j) { return sigmoidf(r[3 * D + min(j / D, 3)]); }

template <typename T>
__global__ void __launch_bounds__(kRecMaxThreads) srwm_forward_kernel(SRWMArgs a) {
  extern __shared__ float smem[];
  const int D = a.D, L = a.L, P = 3 * D + 4, ld = P + 1, C = a.ckpt_every, n_ckpt = checkpoint_count(L, C);
  const int bh = blockIdx.x;
  float* W = smem;        // [D][ld]
  float* xs = W + D * ld;  // x_t
  float* qk = xs + D;      // q - k
  float* k = qk + D;
  float* r = k + D;        // [P] r_t
  const T* x = static_cast<const T*>(a.x);
  load_matrices(W, a.W0 + static_cast<int64_t>(bh) * D * P, 1, D, P, ld);
  __syncthreads();

  for (int t = 0; t < L; ++t) {
    const int64_t tok = static_cast<int64_t>(bh) * L + t;
    for (int i = threadIdx.x; i < D; i += blockDim.x) xs[i] = to_float(x[tok * D + i]);
    __syncthreads();
    for (int j = threadIdx.x; j < P; j += blockDim.x) {
      r[j] = col_dot(W, ld, j, xs, D);
      if (a.pre != nullptr) a.pre[tok * P + j] = r[j];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      k[i] = softmax_at(r + 2 * D, D, i);
      qk[i] = softmax_at(r + D, D, i) - k[i];
      a.y[tok * D + i] = r[i];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < P; j += blockDim.x) {  // vd = W^T q - W^T k, then the write k (rate vd)^T
      const float vd = col_dot(W, ld, j, qk, D);
      col_axpy(W, ld, j, k, srwm_rate(r, D, j) * vd, D);
      if (a.vd != nullptr) a.vd[tok * P + j] = vd;
      if (a.ckpt != nullptr && is_checkpoint(t, L, C)) {
        store_column(checkpoint_at(a.ckpt, bh, n_ckpt, t, C, D * P), W, ld, j, D, P);
      }
    }
    __syncthreads();
  }
  store_matrices(a.W + static_cast<int64_t>(bh) * D * P, W, 1, D, P, ld);
}

// Reverse step t with W = W_t and G = dLoss/dW_t:
//   W_{t-1} = W_t - k delta^T (delta = rate vd);  ddelta = G^T k;  dvd = rate ddelta;  drate = ddelta vd
//   dq = W_{t-1} dvd;  dk = G delta - W_{t-1} dvd = G delta - dq;  dr = [dy, softmax'(dq), softmax'(dk), sigmoid'(db)]
//   dx = W_{t-1} dr;  G_{t-1} = G + (q - k) dvd^T + x dr^T
template <typename T>
__global__ void __launch_bounds__(kRecMaxThreads) srwm_backward_kernel(SRWMArgs a) {
  extern __shared__ float smem[];
  const int D = a.D, L = a.L, P = 3 * D + 4, ld = P + 1, C = a.ckpt_every, n_ckpt = checkpoint_count(L, C);
  const int bh = blockIdx.x;
  float* W = smem;            // [D][ld] W_t, rebuilt in reverse
  float* Gm = W + D * ld;     // [D][ld] dLoss/dW_t
  float *xs = Gm + D * ld, *q = xs + D, *k = q + D, *dq = k + D, *dk = dq + D;
  float *delta = dk + D, *dvd = delta + P, *drate = dvd + P, *dr = drate + P;  // [P] each
  float* db = dr + P;         // [4]
  const T* x = static_cast<const T*>(a.x);
  load_matrices(W, a.W + static_cast<int64_t>(bh) * D * P, 1, D, P, ld);
  load_matrices(Gm, a.dW != nullptr ? a.dW + static_cast<int64_t>(bh) * D * P : nullptr, 1, D, P, ld);
  __syncthreads();

  for (int t = L - 1; t >= 0; --t) {
    const int64_t tok = static_cast<int64_t>(bh) * L + t;
    const float* r = a.pre + tok * P;
    if (is_checkpoint(t, L, C)) load_matrices(W, checkpoint_at(a.ckpt, bh, n_ckpt, t, C, D * P), 1, D, P, ld);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      xs[i] = to_float(x[tok * D + i]);
      q[i] = softmax_at(r + D, D, i);
      k[i] = softmax_at(r + 2 * D, D, i);
    }
    for (int j = threadIdx.x; j < P; j += blockDim.x) delta[j] = srwm_rate(r, D, j) * a.vd[tok * P + j];
    __syncthreads();
    for (int j = threadIdx.x; j < P; j += blockDim.x) {  // columns: ddelta = G^T k; W_{t-1} = W_t - k delta^T
      const float ddelta = col_dot(Gm, ld, j, k, D);
      dvd[j] = srwm_rate(r, D, j) * ddelta;
      drate[j] = ddelta * a.vd[tok * P + j];
      col_axpy(W, ld, j, k, -delta[j], D);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {  // rows
      dq[i] = row_dot(W, ld, i, dvd, P);
      dk[i] = row_dot(Gm, ld, i, delta, P) - dq[i];
    }
    for (int g = threadIdx.x; g < 4; g += blockDim.x) {  // the rates' gradient, summed over each block's columns
      const int first = g * D, count = g < 3 ? D : 4;
      float s = 0.0f;
      for (int j = first; j < first + count; ++j) s += drate[j];
      const float rate = sigmoidf(r[3 * D + g]);
      db[g] = s * rate * (1.0f - rate);
    }
    __syncthreads();
    const float q_dq = dot(q, dq, D), k_dk = dot(k, dk, D);
    for (int j = threadIdx.x; j < P; j += blockDim.x) {
      if (j < D) dr[j] = a.dy[tok * D + j];
      else if (j < 2 * D) dr[j] = q[j - D] * (dq[j - D] - q_dq);
      else if (j < 3 * D) dr[j] = k[j - 2 * D] * (dk[j - 2 * D] - k_dk);
      else dr[j] = db[j - 3 * D];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < P; j += blockDim.x) {  // columns: G_{t-1} = G + (q - k) dvd^T + x dr^T
      for (int i = 0; i < D; ++i) Gm[i * ld + j] += (q[i] - k[i]) * dvd[j] + xs[i] * dr[j];
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) a.dx[tok * D + i] = row_dot(W, ld, i, dr, P);
    __syncthreads();
  }
  store_matrices(a.dW0 + static_cast<int64_t>(bh) * D * P, Gm, 1, D, P, ld);
}

// The launchers' helpers (the kernels stay outside the anonymous namespace: `extern __shared__ smem` must name
// the one array of the namespace, which the tests' emulation defines).
namespace {

size_t forward_shared_floats(int D) { return static_cast<size_t>(D) * (3 * D + 5) + 3 * D + 3 * D + 4; }  // W; x, q-k, k; r
size_t backward_shared_floats(int D) {  // W, G; x, q, k, dq, dk; delta, dvd, drate, dr; db
  return 2 * static_cast<size_t>(D) * (3 * D + 5) + 5 * D + 4 * (3 * D + 4) + 4;
}

template <typename T>
int launch(const SRWMArgs& a, bool backward, cudaStream_t s) {
  const dim3 grid(a.B * a.H), block(block_threads(3 * a.D + 4));
  if (backward) {
    return launch_with_shared(srwm_backward_kernel<T>, grid, block, backward_shared_floats(a.D) * sizeof(float), s, a);
  }
  return launch_with_shared(srwm_forward_kernel<T>, grid, block, forward_shared_floats(a.D) * sizeof(float), s, a);
}

int dispatch(const SRWMArgs& a, bool backward, void* stream) {
  if (a.D < 1 || a.D > kRecMaxD || a.L < 1 || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.dtype == kFloat32) return launch<float>(a, backward, s);
  if (a.dtype == kBFloat16) return launch<__nv_bfloat16>(a, backward, s);
  return -1;
}

}  // namespace

int srwm_forward(const SRWMArgs& a, void* stream) {
  if (a.x == nullptr || a.W0 == nullptr || a.y == nullptr || a.W == nullptr) return -1;
  return dispatch(a, false, stream);
}

int srwm_backward(const SRWMArgs& a, void* stream) {
  if (a.x == nullptr || a.W == nullptr || a.pre == nullptr || a.vd == nullptr || a.dy == nullptr) return -1;
  if ((num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr) || a.dx == nullptr || a.dW0 == nullptr) return -1;
  return dispatch(a, true, stream);
}

}  // namespace lmtool_fw
