// Delta RNN (GATES = 1) and Delta LSTM (GATES = 3): the recurrent matrices' scan given z_t = W_t q_t, forward and
// reverse-scan backward (math in recurrent_scan.h and docs/cuda_kernels.md), and their launchers.
#include "recurrent_common.cuh"

namespace lmtool_fw {

// Indices of one block's data: sequence b * (GATES H) + g H + h of the per-gate tensors, b H + h of the others.
struct RnnBlock {
  int b, h, bh, G;
  __device__ RnnBlock(const DeltaRNNArgs& a, int gates)
      : b(blockIdx.x / a.H), h(blockIdx.x % a.H), bh(blockIdx.x), G(gates * a.H) {}
  __device__ int64_t seq(int g, int H) const { return static_cast<int64_t>(b) * G + g * H + h; }
};

// The LSTM cell on gate pre-activations a = (a^i, a^u, a^o): updates c and returns y.
__device__ __forceinline__ float lstm_cell(float ai, float au, float ao, float& c) {
  c = fmaf(sigmoidf(ai), au - c, c);
  return sigmoidf(ao) * c;
}

template <typename T, int GATES>
__global__ void __launch_bounds__(kRecMaxThreads) delta_rnn_forward_kernel(DeltaRNNArgs a) {
  extern __shared__ float smem[];
  const int D = a.D, L = a.L, H = a.H, ld = D + 1, C = a.ckpt_every, n_ckpt = checkpoint_count(L, C);
  const RnnBlock blk(a, GATES);
  float* R = smem;                    // [GATES][D][ld]
  float* p = R + GATES * D * ld;      // softmax(y_{t-1})
  float* y = p + D;                   // y_{t-1}, then y_t
  float* key = y + D;                 // [GATES][D] k_t
  float* pre = key + GATES * D;       // [GATES][D] a_t (LSTM)
  float* cell = pre + GATES * D;      // c_{t-1}, then c_t (LSTM)
  const T* z = static_cast<const T*>(a.z);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  for (int g = 0; g < GATES; ++g) load_matrices(R + g * D * ld, a.R0 + blk.seq(g, H) * D * D, 1, D, D, ld);
  load_vector(y, a.y0 + blk.bh * D, D);
  if constexpr (GATES == 3) load_vector(cell, a.c0 + blk.bh * D, D);
  __syncthreads();

  for (int t = 0; t < L; ++t) {
    for (int i = threadIdx.x; i < D; i += blockDim.x) p[i] = softmax_at(y, D, i);
    for (int e = threadIdx.x; e < GATES * D; e += blockDim.x) {
      key[e] = to_float(k[(blk.seq(e / D, H) * L + t) * D + e % D]);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < GATES * D; e += blockDim.x) {  // column j of gate g
      const int g = e / D, j = e % D;
      float* Rg = R + g * D * ld;
      const float* kg = key + g * D;
      const int64_t x = (blk.seq(g, H) * L + t) * D + j;
      const float r = to_float(v[x]) - col_dot(Rg, ld, j, kg, D);
      const float u = a.beta[blk.seq(g, H) * L + t] * r;
      const float read = col_dot(Rg, ld, j, p, D) + u * dot(kg, p, D);  // R_t^T p = R_{t-1}^T p + u (k . p)
      col_axpy(Rg, ld, j, kg, u, D);
      const float out = to_float(z[x]) + read;
      if (a.resid != nullptr) a.resid[x] = r;
      if constexpr (GATES == 1) {  // y_{t-1} is read only by the softmax above, before the barrier
        y[j] = out;
        a.y[(static_cast<int64_t>(blk.bh) * L + t) * D + j] = out;
      } else {
        pre[e] = out;
        if (a.pre != nullptr) a.pre[x] = out;
      }
      if (a.ckpt != nullptr && is_checkpoint(t, L, C)) {
        store_column(checkpoint_at(a.ckpt, blk.bh, n_ckpt, t, C, GATES * D * D) + g * D * D, Rg, ld, j, D, D);
      }
    }
    __syncthreads();
    if constexpr (GATES == 3) {
      for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const int64_t x = (static_cast<int64_t>(blk.bh) * L + t) * D + j;
        y[j] = a.y[x] = lstm_cell(pre[j], pre[D + j], pre[2 * D + j], cell[j]);
        if (a.cells != nullptr) a.cells[x] = cell[j];
      }
      __syncthreads();
    }
  }
  for (int g = 0; g < GATES; ++g) store_matrices(a.R + blk.seq(g, H) * D * D, R + g * D * ld, 1, D, D, ld);
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    a.y_last[blk.bh * D + j] = y[j];
    if constexpr (GATES == 3) a.c_last[blk.bh * D + j] = cell[j];
  }
}

// The gradients at the gates' pre-activations of token t (the LSTM cell backward, or dy for the RNN) into da;
// gy and gc hold the gradients arriving at y_t and c_t from later tokens and the final state; gc becomes dc_{t-1}.
template <int GATES>
__device__ __forceinline__ void cell_backward(const DeltaRNNArgs& a, int bh, int t, const float* gy, float* gc,
                                              float* da) {
  const int D = a.D, L = a.L;
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    const int64_t x = (static_cast<int64_t>(bh) * L + t) * D + j;
    const float dy = a.dy[x] + gy[j];
    if constexpr (GATES == 1) {
      da[j] = dy;
      continue;
    }
    const int64_t xg = (static_cast<int64_t>(bh / a.H) * 3 * a.H * L + (bh % a.H) * L + t) * D + j;  // gate i
    const int64_t gate_stride = static_cast<int64_t>(a.H) * L * D;
    const float ig = sigmoidf(a.pre[xg]), au = a.pre[xg + gate_stride], og = sigmoidf(a.pre[xg + 2 * gate_stride]);
    const float c = a.cells[x];
    const float c_prev = t > 0 ? a.cells[x - D] : a.c0[bh * D + j];
    const float dc = fmaf(dy, og, gc[j]);
    da[j] = dc * (au - c_prev) * ig * (1.0f - ig);
    da[D + j] = dc * ig;
    da[2 * D + j] = dy * c * og * (1.0f - og);
    gc[j] = dc * (1.0f - ig);
  }
}

template <typename T, int GATES>
__global__ void __launch_bounds__(kRecMaxThreads) delta_rnn_backward_kernel(DeltaRNNArgs a) {
  extern __shared__ float smem[];
  const int D = a.D, L = a.L, H = a.H, ld = D + 1, C = a.ckpt_every, n_ckpt = checkpoint_count(L, C);
  const int GD = GATES * D;
  const RnnBlock blk(a, GATES);
  float* R = smem;               // [GATES][D][ld]: R_t, rebuilt in reverse
  float* Gm = R + GD * ld;       // [GATES][D][ld]: dLoss/dR_t
  float* p = Gm + GD * ld;       // softmax(y_{t-1})
  float* key = p + D;            // [GATES][D] k_t
  float* r = key + GD;           // [GATES][D] r_t
  float* da = r + GD;            // [GATES][D] dLoss/da_t
  float* du = da + GD;           // [GATES][D] dLoss/du_t
  float* dr = du + GD;           // [GATES][D] beta_t du_t = -dLoss/d(R_{t-1}^T k_t)
  float* dp = dr + GD;           // dLoss/dp_t
  float* gy = dp + D;            // dLoss/dy_t from later tokens, then dLoss/dy_{t-1}
  float* gc = gy + D;            // dLoss/dc_t likewise (LSTM)
  const T* k = static_cast<const T*>(a.k);
  for (int g = 0; g < GATES; ++g) {
    load_matrices(R + g * D * ld, a.R + blk.seq(g, H) * D * D, 1, D, D, ld);
    load_matrices(Gm + g * D * ld, a.dR != nullptr ? a.dR + blk.seq(g, H) * D * D : nullptr, 1, D, D, ld);
  }
  load_vector(gy, a.dy_last != nullptr ? a.dy_last + blk.bh * D : nullptr, D);
  if constexpr (GATES == 3) load_vector(gc, a.dc_last != nullptr ? a.dc_last + blk.bh * D : nullptr, D);
  __syncthreads();

  for (int t = L - 1; t >= 0; --t) {
    if (is_checkpoint(t, L, C)) {  // R_t as the forward had it: the rebuilding below runs over < C tokens
      load_matrices(R, checkpoint_at(a.ckpt, blk.bh, n_ckpt, t, C, GATES * D * D), GATES, D, D, ld);
    }
    const float* y_prev = t > 0 ? a.y + (static_cast<int64_t>(blk.bh) * L + t - 1) * D : a.y0 + blk.bh * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) p[i] = softmax_at(y_prev, D, i);
    for (int e = threadIdx.x; e < GD; e += blockDim.x) {
      const int64_t x = (blk.seq(e / D, H) * L + t) * D + e % D;
      key[e] = to_float(k[x]);
      r[e] = a.resid[x];
    }
    cell_backward<GATES>(a, blk.bh, t, gy, gc, da);
    __syncthreads();
    for (int e = threadIdx.x; e < GD; e += blockDim.x) {  // columns: G += p da^T, du = G^T k
      const int g = e / D, j = e % D;
      float* Gg = Gm + g * D * ld;
      const int64_t x = (blk.seq(g, H) * L + t) * D + j;
      col_axpy(Gg, ld, j, p, da[e], D);
      du[e] = col_dot(Gg, ld, j, key + g * D, D);
      dr[e] = a.beta[blk.seq(g, H) * L + t] * du[e];
      a.dz[x] = da[e];
      a.dv[x] = dr[e];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < GD; e += blockDim.x) {  // rows: dk = G u - R_{t-1} dr, with R_{t-1} = R_t - k u^T
      const int g = e / D, i = e % D;
      const float* Gg = Gm + g * D * ld;
      const float* Rg = R + g * D * ld;
      const float beta = a.beta[blk.seq(g, H) * L + t];
      float s = 0.0f;
      for (int j = 0; j < D; ++j) s += Gg[i * ld + j] * beta * r[g * D + j] - Rg[i * ld + j] * dr[g * D + j];
      a.dk[(blk.seq(g, H) * L + t) * D + i] = s + key[e] * beta * dot(r + g * D, dr + g * D, D);
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) {  // dp = sum over gates of R_t da
      float s = 0.0f;
      for (int g = 0; g < GATES; ++g) s += row_dot(R + g * D * ld, ld, i, da + g * D, D);
      dp[i] = s;
    }
    for (int g = threadIdx.x; g < GATES; g += blockDim.x) {
      a.dbeta[blk.seq(g, H) * L + t] = dot(du + g * D, r + g * D, D);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < GD; e += blockDim.x) {  // columns: G_{t-1} = G - k dr^T, R_{t-1} = R_t - k u^T
      const int g = e / D, j = e % D;
      const float beta = a.beta[blk.seq(g, H) * L + t];
      col_axpy(Gm + g * D * ld, ld, j, key + g * D, -dr[e], D);
      col_axpy(R + g * D * ld, ld, j, key + g * D, -beta * r[e], D);
    }
    const float p_dp = dot(p, dp, D);
    for (int i = threadIdx.x; i < D; i += blockDim.x) gy[i] = p[i] * (dp[i] - p_dp);  // through the softmax
    __syncthreads();
  }
  for (int g = 0; g < GATES; ++g) store_matrices(a.dR0 + blk.seq(g, H) * D * D, Gm + g * D * ld, 1, D, D, ld);
  for (int j = threadIdx.x; j < D; j += blockDim.x) {
    a.dy0[blk.bh * D + j] = gy[j];
    if constexpr (GATES == 3) a.dc0[blk.bh * D + j] = gc[j];
  }
}

// The launchers' helpers (the kernels stay outside the anonymous namespace: `extern __shared__ smem` must name
// the one array of the namespace, which the tests' emulation defines).
namespace {

// Floats of dynamic shared memory, in the order the kernels above lay them out.
size_t forward_shared_floats(int gates, int D) {
  return static_cast<size_t>(gates) * D * (D + 1) + 2 * gates * D + 3 * D;  // R; key, pre; p, y, cell
}
size_t backward_shared_floats(int gates, int D) {
  return 2 * static_cast<size_t>(gates) * D * (D + 1) + 5 * gates * D + 4 * D;  // R, G; key, r, da, du, dr; p, dp, gy, gc
}

template <typename T, int GATES>
int launch(const DeltaRNNArgs& a, bool backward, cudaStream_t stream) {
  const dim3 grid(a.B * a.H), block(block_threads(GATES * a.D));
  if (backward) {
    const size_t shared = backward_shared_floats(GATES, a.D) * sizeof(float);
    return launch_with_shared(delta_rnn_backward_kernel<T, GATES>, grid, block, shared, stream, a);
  }
  const size_t shared = forward_shared_floats(GATES, a.D) * sizeof(float);
  return launch_with_shared(delta_rnn_forward_kernel<T, GATES>, grid, block, shared, stream, a);
}

int dispatch(const DeltaRNNArgs& a, bool backward, void* stream) {
  if (a.D < 1 || a.D > kRecMaxD || a.L < 1 || a.ckpt_every < 1 || (a.gates != 1 && a.gates != 3)) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  const bool lstm = a.gates == 3;
  if (a.dtype == kFloat32) return lstm ? launch<float, 3>(a, backward, s) : launch<float, 1>(a, backward, s);
  if (a.dtype == kBFloat16) {
    return lstm ? launch<__nv_bfloat16, 3>(a, backward, s) : launch<__nv_bfloat16, 1>(a, backward, s);
  }
  return -1;
}

}  // namespace

int delta_rnn_forward(const DeltaRNNArgs& a, void* stream) {
  const bool lstm = a.gates == 3;
  if (a.R0 == nullptr || a.y0 == nullptr || a.y == nullptr || a.R == nullptr || a.y_last == nullptr) return -1;
  if (lstm && (a.c0 == nullptr || a.c_last == nullptr)) return -1;
  return dispatch(a, false, stream);
}

int delta_rnn_backward(const DeltaRNNArgs& a, void* stream) {
  const bool lstm = a.gates == 3;
  if (a.resid == nullptr || a.y == nullptr || a.R == nullptr || a.dy == nullptr || a.y0 == nullptr) return -1;
  if (num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr) return -1;
  if (a.dz == nullptr || a.dk == nullptr || a.dv == nullptr || a.dbeta == nullptr) return -1;
  if (a.dR0 == nullptr || a.dy0 == nullptr) return -1;
  if (lstm && (a.pre == nullptr || a.cells == nullptr || a.c0 == nullptr || a.dc0 == nullptr)) return -1;
  return dispatch(a, true, stream);
}

const char* recurrent_error_string(int code) {
  if (code == -1) return "invalid arguments for the recurrent kernels (D outside 1..64, sizes, dtype or a missing buffer)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace lmtool_fw
