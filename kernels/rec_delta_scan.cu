// Recurrent Delta Net: the whole scan (slow recurrent projection, softmax/sigmoid, delta rule, read-out) forward and
// reverse-scan backward (math in recurrent_scan.h and docs/cuda_kernels.md), and the launchers.
#include "recurrent_common.cuh"

namespace lmtool_fw {

template <typename T>
__global__ void __launch_bounds__(kRecMaxThreads) rec_delta_forward_kernel(RecDeltaArgs a) {
  extern __shared__ float smem[];
  const int D = a.D, L = a.L, P = 3 * D + 1, ld = D + 1, C = a.ckpt_every, n_ckpt = checkpoint_count(L, C);
  const int bh = blockIdx.x, h = bh % a.H;
  float* W = smem;           // [D][ld]
  float* y = W + D * ld;     // y_{t-1}, then y_t
  float* hid = y + D;        // tanh(y_{t-1})
  float* q = hid + D;
  float* k = q + D;
  float* act = k + D;        // [P] a_t
  const T* proj = static_cast<const T*>(a.proj);
  const float* rec = a.rec + static_cast<int64_t>(h) * D * P;
  load_matrices(W, a.W0 + static_cast<int64_t>(bh) * D * D, 1, D, D, ld);
  load_vector(y, a.y0 + bh * D, D);
  __syncthreads();

  for (int t = 0; t < L; ++t) {
    const int64_t tok = static_cast<int64_t>(bh) * L + t;
    for (int i = threadIdx.x; i < D; i += blockDim.x) hid[i] = tanhf(y[i]);
    __syncthreads();
    for (int j = threadIdx.x; j < P; j += blockDim.x) {  // a = proj + rec^T h: column j of rec
      float s = to_float(proj[tok * P + j]);
      for (int i = 0; i < D; ++i) s = fmaf(hid[i], rec[i * P + j], s);
      act[j] = s;
      if (a.pre != nullptr) a.pre[tok * P + j] = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      q[i] = softmax_at(act, D, i);
      k[i] = softmax_at(act + D, D, i);
    }
    __syncthreads();
    const float beta = sigmoidf(act[3 * D]);
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
      const float r = act[2 * D + j] - col_dot(W, ld, j, k, D);
      const float u = beta * r;
      const float out = col_dot(W, ld, j, q, D) + u * dot(k, q, D);  // W_t^T q = W_{t-1}^T q + u (k . q)
      col_axpy(W, ld, j, k, u, D);
      y[j] = a.y[tok * D + j] = out;
      if (a.resid != nullptr) a.resid[tok * D + j] = r;
      if (a.ckpt != nullptr && is_checkpoint(t, L, C)) {
        store_column(checkpoint_at(a.ckpt, bh, n_ckpt, t, C, D * D), W, ld, j, D, D);
      }
    }
    __syncthreads();
  }
  store_matrices(a.W + static_cast<int64_t>(bh) * D * D, W, 1, D, D, ld);
  for (int j = threadIdx.x; j < D; j += blockDim.x) a.y_last[bh * D + j] = y[j];
}

// The gradient at a_t = [a_q, a_k, a_v, a_b] from those at q, k, v = r + W^T k and beta (softmax and sigmoid).
__device__ __forceinline__ float pre_activation_grad(int j, int D, const float* q, const float* k, const float* dq,
                                                     const float* dk, const float* dr, float dbeta, float beta) {
  if (j < D) return q[j] * (dq[j] - dot(q, dq, D));
  if (j < 2 * D) return k[j - D] * (dk[j - D] - dot(k, dk, D));
  if (j < 3 * D) return dr[j - 2 * D];
  return dbeta * beta * (1.0f - beta);
}

__global__ void __launch_bounds__(kRecMaxThreads) rec_delta_backward_kernel(RecDeltaArgs a) {
  extern __shared__ float smem[];
  const int D = a.D, L = a.L, P = 3 * D + 1, ld = D + 1, C = a.ckpt_every, n_ckpt = checkpoint_count(L, C);
  const int bh = blockIdx.x, h = bh % a.H;
  float* W = smem;             // [D][ld] W_t, rebuilt in reverse
  float* Gm = W + D * ld;      // [D][ld] dLoss/dW_t
  float* drec = Gm + D * ld;   // [D][P + 1] this sequence's share of dLoss/drec
  float* vec = drec + D * (P + 1);
  float *q = vec, *k = q + D, *r = k + D, *dyt = r + D, *du = dyt + D, *dr = du + D, *dq = dr + D, *dk = dq + D;
  float* hid = dk + D;         // tanh(y_{t-1})
  float* gy = hid + D;         // dLoss/dy_t from later tokens, then dLoss/dy_{t-1}
  float* da = gy + D;          // [P] dLoss/da_t
  const float* rec = a.rec + static_cast<int64_t>(h) * D * P;
  load_matrices(W, a.W + static_cast<int64_t>(bh) * D * D, 1, D, D, ld);
  load_matrices(Gm, a.dW != nullptr ? a.dW + static_cast<int64_t>(bh) * D * D : nullptr, 1, D, D, ld);
  load_vector(gy, a.dy_last != nullptr ? a.dy_last + bh * D : nullptr, D);
  for (int e = threadIdx.x; e < D * (P + 1); e += blockDim.x) drec[e] = 0.0f;
  __syncthreads();

  for (int t = L - 1; t >= 0; --t) {
    const int64_t tok = static_cast<int64_t>(bh) * L + t;
    const float* act = a.pre + tok * P;
    const float beta = sigmoidf(act[3 * D]);
    if (is_checkpoint(t, L, C)) load_matrices(W, checkpoint_at(a.ckpt, bh, n_ckpt, t, C, D * D), 1, D, D, ld);
    const float* y_prev = t > 0 ? a.y + (tok - 1) * D : a.y0 + bh * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
      q[i] = softmax_at(act, D, i);
      k[i] = softmax_at(act + D, D, i);
      r[i] = a.resid[tok * D + i];
      dyt[i] = a.dy[tok * D + i] + gy[i];
      hid[i] = tanhf(y_prev[i]);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) {  // columns: G += q dy^T (y = W_t^T q), du = G^T k
      col_axpy(Gm, ld, j, q, dyt[j], D);
      du[j] = col_dot(Gm, ld, j, k, D);
      dr[j] = beta * du[j];
    }
    __syncthreads();
    const float u_dr = beta * dot(r, dr, D);
    for (int i = threadIdx.x; i < D; i += blockDim.x) {  // rows: dq = W_t dy, dk = G u - W_{t-1} dr
      dq[i] = row_dot(W, ld, i, dyt, D);
      float s = 0.0f;
      for (int j = 0; j < D; ++j) s += Gm[i * ld + j] * beta * r[j] - W[i * ld + j] * dr[j];
      dk[i] = s + k[i] * u_dr;
    }
    __syncthreads();
    const float dbeta = dot(du, r, D);
    for (int j = threadIdx.x; j < P; j += blockDim.x) {
      da[j] = pre_activation_grad(j, D, q, k, dq, dk, dr, dbeta, beta);
      a.dproj[tok * P + j] = da[j];
    }
    for (int j = threadIdx.x; j < D; j += blockDim.x) {  // columns: G_{t-1} = G - k dr^T, W_{t-1} = W_t - k u^T
      col_axpy(Gm, ld, j, k, -dr[j], D);
      col_axpy(W, ld, j, k, -beta * r[j], D);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < P; j += blockDim.x) col_axpy(drec, P + 1, j, hid, da[j], D);  // drec += h da^T
    for (int i = threadIdx.x; i < D; i += blockDim.x) {  // dy_{t-1} = (1 - h^2) rec da
      float s = 0.0f;
      for (int j = 0; j < P; ++j) s = fmaf(rec[i * P + j], da[j], s);
      gy[i] = s * (1.0f - hid[i] * hid[i]);
    }
    __syncthreads();
  }
  store_matrices(a.dW0 + static_cast<int64_t>(bh) * D * D, Gm, 1, D, D, ld);
  store_matrices(a.drec + static_cast<int64_t>(bh) * D * P, drec, 1, D, P, P + 1);
  for (int j = threadIdx.x; j < D; j += blockDim.x) a.dy0[bh * D + j] = gy[j];
}

// The launchers' helpers (the kernels stay outside the anonymous namespace: `extern __shared__ smem` must name
// the one array of the namespace, which the tests' emulation defines).
namespace {

size_t forward_shared_floats(int D) { return static_cast<size_t>(D) * (D + 1) + 4 * D + 3 * D + 1; }  // W; y, h, q, k; a
size_t backward_shared_floats(int D) {  // W, G; drec; 10 vectors; da
  return 2 * static_cast<size_t>(D) * (D + 1) + static_cast<size_t>(D) * (3 * D + 2) + 10 * D + 3 * D + 1;
}

int dispatch(const RecDeltaArgs& a, bool backward, void* stream) {
  if (a.D < 1 || a.D > kRecMaxD || a.L < 1 || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  const dim3 grid(a.B * a.H), block(block_threads(3 * a.D + 1));
  if (backward) {  // the backward reads a_t (float32) instead of proj: one instantiation for both dtypes
    const size_t shared = backward_shared_floats(a.D) * sizeof(float);
    return launch_with_shared(rec_delta_backward_kernel, grid, block, shared, s, a);
  }
  const size_t shared = forward_shared_floats(a.D) * sizeof(float);
  if (a.dtype == kFloat32) return launch_with_shared(rec_delta_forward_kernel<float>, grid, block, shared, s, a);
  if (a.dtype == kBFloat16) return launch_with_shared(rec_delta_forward_kernel<__nv_bfloat16>, grid, block, shared, s, a);
  return -1;
}

}  // namespace

int rec_delta_forward(const RecDeltaArgs& a, void* stream) {
  if (a.proj == nullptr || a.rec == nullptr || a.W0 == nullptr || a.y0 == nullptr) return -1;
  if (a.y == nullptr || a.W == nullptr || a.y_last == nullptr) return -1;
  return dispatch(a, false, stream);
}

int rec_delta_backward(const RecDeltaArgs& a, void* stream) {
  if (a.rec == nullptr || a.y0 == nullptr || a.y == nullptr || a.W == nullptr || a.pre == nullptr) return -1;
  if (a.resid == nullptr || a.dy == nullptr || (num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr)) return -1;
  if (a.dproj == nullptr || a.drec == nullptr || a.dW0 == nullptr || a.dy0 == nullptr) return -1;
  return dispatch(a, true, stream);
}

}  // namespace lmtool_fw
