// Forward kernel of the sum and delta rules: one sequential scan per (sequence, column tile of S).
//
// Per token t, lane r of a column group holds rows I of columns J of S (fast_weight_common.cuh):
//   delta:  sk = S^T k, sq = S^T q, kq = k . q   (partial sums over I, then one butterfly over the group)
//           r_t = v_t - sk;  u_t = beta_t r_t;  S += k u^T;  o_t = scale (sq + kq u_t)  ( = scale S_t^T q_t)
//   sum:    u_t = v_t;  S += k v^T;  o_t = scale (sq + kq v_t)
// With a log-decay g (DECAY), S is first scaled by alpha_t = exp(g_t) (S <- alpha_t S_{t-1}), the rest is the same.
// The scan has no shared memory and no block barrier: the only cross-lane traffic is the butterfly.
// q, k, v (and beta) of the next P tokens are loaded into registers while the current token computes.
// For the backward it stores r_t (delta rule) and S after every C-th token, column-major.
//
// The launcher is in fast_weight_forward.cu; this header holds only device code (tests/ops/test_cuda.py also
// runs it on the CPU under a small SIMT emulation).
#pragma once

#include "fast_weight_common.cuh"

namespace lmtool_fw {

constexpr int kFwdMaxWarps = 4;

template <int NR>
struct FwdStep {
  float q[NR];
  float k[NR];
  float v[kNC];
  float beta;
  float alpha;  // exp(g_t) (DECAY only)
};

template <typename T, bool DELTA, bool DECAY, class TL>
__global__ void __launch_bounds__(kFwdMaxWarps * 32) forward_kernel(ForwardArgs a, int cols_per_block, bool vec) {
  constexpr int R = TL::R, NR = TL::NR, CG = TL::CG, P = TL::P, NC = kNC;
  const int lane = threadIdx.x & 31;
  const int r = lane % R;
  const int j0 = blockIdx.y * cols_per_block + ((threadIdx.x >> 5) * CG + lane / R) * NC;
  const int bh = blockIdx.x;
  const int b = bh / a.H, h = bh - (bh / a.H) * a.H;
  const int L = a.L, Dk = a.Dk, Dv = a.Dv;

  const T* q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const T* k = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h;
  const T* v = static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h;
  const float* beta = DELTA ? a.beta + b * a.sbeta.b + h * a.sbeta.h : nullptr;
  const float* g = DECAY ? a.g + b * a.sg.b + h * a.sg.h : nullptr;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(bh) * L * Dv;
  float* resid = a.resid ? a.resid + static_cast<int64_t>(bh) * L * Dv : nullptr;
  const int C = a.ckpt_every;
  const int n_ckpt = checkpoint_count(L, C);
  float* ckpt = a.ckpt ? a.ckpt + static_cast<int64_t>(bh) * n_ckpt * Dv * Dk : nullptr;

  float S[NR][NC];
  const float* s0 = a.initial_state ? a.initial_state + static_cast<int64_t>(bh) * Dk * Dv : nullptr;
  load_tile<false, R>(s0, Dk, Dv, r, j0, S);

  auto load = [&](FwdStep<NR>& x, int t) {
    const bool valid = t < L;
    const int64_t tt = valid ? t : 0;
    load_rows<R, NR>(q + tt * a.sq.t, Dk, r, valid, vec, x.q);
    load_rows<R, NR>(k + tt * a.sk.t, Dk, r, valid, vec, x.k);
    load_cols<NC>(v + tt * a.sv.t, Dv, j0, valid, x.v);
    x.beta = (DELTA && valid) ? beta[tt * a.sbeta.t] : 0.0f;
    if constexpr (DECAY) x.alpha = valid ? expf(g[tt * a.sg.t]) : 1.0f;
  };

  FwdStep<NR> buf[P];
#pragma unroll
  for (int p = 0; p < P; ++p) load(buf[p], p);

  for (int t0 = 0; t0 < L; t0 += P) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int t = t0 + p;
      if (t < L) {  // uniform over the block: the butterfly inside is legal
        const FwdStep<NR>& x = buf[p];
        if constexpr (DECAY) {  // S <- alpha_t S_{t-1}; the backward's recomputation repeats exactly this
#pragma unroll
          for (int i = 0; i < NR; ++i) {
#pragma unroll
            for (int n = 0; n < NC; ++n) S[i][n] *= x.alpha;
          }
        }
        constexpr int NV = DELTA ? 2 * NC + 1 : NC + 1;  // [sq (NC), kq, sk (NC, delta only)]
        float red[NV];
#pragma unroll
        for (int e = 0; e < NV; ++e) red[e] = 0.0f;
#pragma unroll
        for (int i = 0; i < NR; ++i) {
          red[NC] = fmaf(x.k[i], x.q[i], red[NC]);
#pragma unroll
          for (int n = 0; n < NC; ++n) {
            red[n] = fmaf(S[i][n], x.q[i], red[n]);
            if constexpr (DELTA) red[NC + 1 + n] = fmaf(S[i][n], x.k[i], red[NC + 1 + n]);
          }
        }
        group_sum<R>(red);

        float u[NC], res[NC];
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          if constexpr (DELTA) {
            res[n] = x.v[n] - red[NC + 1 + n];
            u[n] = x.beta * res[n];
          } else {
            res[n] = u[n] = x.v[n];
          }
        }
#pragma unroll
        for (int i = 0; i < NR; ++i) {
#pragma unroll
          for (int n = 0; n < NC; ++n) S[i][n] = fmaf(x.k[i], u[n], S[i][n]);
        }
#pragma unroll
        for (int n = 0; n < NC; ++n) {
          const int j = j0 + n;
          if (r == n && j < Dv) {  // one lane of the group stores each column
            out[static_cast<int64_t>(t) * Dv + j] = from_float<T>(a.scale * fmaf(red[NC], u[n], red[n]));
            if (resid != nullptr) resid[static_cast<int64_t>(t) * Dv + j] = res[n];
          }
        }
        if (ckpt != nullptr && (t + 1) % C == 0 && t + 1 < L) {
          float* dst = ckpt + static_cast<int64_t>((t + 1) / C - 1) * Dv * Dk;
          store_tile<true, R>(dst, Dk, Dv, r, j0, S);
        }
      }
      load(buf[p], t + P);
    }
  }

  float* sL = a.final_state + static_cast<int64_t>(bh) * Dk * Dv;
  store_tile<false, R>(sL, Dk, Dv, r, j0, S);
}

}  // namespace lmtool_fw
