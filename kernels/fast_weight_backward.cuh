// Backward kernel of the sum and delta rules: one reverse scan per (sequence, column tile of S).
//
// With G = dLoss/dS_t (the gradient arriving at the state after token t), going from t = L-1 down to 0:
//   G   += scale q_t dO_t^T
//   dq_t = scale S_t dO_t                                        (sum over columns)
//   du   = G^T k_t                                               (sum over rows: butterfly in the group)
//   S_{t-1} = S_t - k_t u_t^T                                    (reverse reconstruction, see below)
//   delta:  dr = beta_t du;  dv_t = dr;  dbeta_t = r_t . du;  dk_t = G u_t - S_{t-1} dr;  G -= k_t dr^T
//   sum:    dv_t = du;  dk_t = G v_t                             (G is unchanged)
// and dS_0 = G at the end. u_t = beta_t r_t is rebuilt from the stored residual r_t (delta) or is v_t (sum),
// so no per-token state is ever stored. Reverse reconstruction alone would accumulate float32 rounding over
// the whole sequence; instead S is reloaded from the forward's checkpoint after every C-th token, so it runs
// over at most C - 1 tokens.
//
// A NaN or inf breaks the reverse reconstruction: if token t brought one, S_t - k_t u_t^T is not finite where
// the forward's S_{t-1} was. So a thread whose S, k_t or u_t holds a non-finite value checks its S_{t-1}: an
// entry that is not finite now but was finite at the last state the forward stored before token t (checkpoint
// or initial state) makes the thread recompute S_{t-1} forward from that state, exactly as the forward did.
// Entries that were already non-finite there stay non-finite through the block, so they need nothing. This
// keeps a later token's NaN or inf out of the gradients of earlier tokens; finite inputs never take the branch.
//
// With a log-decay g (DECAY): the forward's step is S_t = S~_t + k_t u_t^T with S~_t = alpha_t S_{t-1} and
// alpha_t = exp(g_t). With G = dLoss/dS_t and G~ its part arriving at S~_t (G~ = G - k_t dr^T for the delta rule,
// G for the sum rule), the reverse step is the one above with S~_t in place of S_{t-1} in dk_t, plus
//   dg_t = alpha_t <S_{t-1}, G~>   (sum over all entries: the whole warp, then as dbeta)      G_{t-1} = alpha_t G~
// Getting S_{t-1} from S_t would divide by alpha_t, which loses everything when alpha_t is tiny. So the states
// are never reconstructed in reverse: when the scan enters a checkpoint segment (at its last token), each thread
// recomputes the segment's states forward from the segment's stored start state (checkpoint or initial state),
// exactly as the forward did, and writes its own entries of S_{t-1} for every token t of the segment to a global
// scratch (min(C, L) states per sequence, thread-private: no barrier); the reverse steps read them back. That is
// one extra forward state update per token (no reductions: r_t is stored) and one store and one load of the
// thread's state entries per token. The states are the forward's own, so the NaN/inf repair below is not needed.
//
// dq_t, dk_t and dbeta_t are sums over all columns: first over the column groups of a warp (a transposing
// shuffle reduction), then over the block's warps through shared memory, flushed every `flush` tokens between
// two barriers at the top level of the loop (never inside a branch), and finally over the column tiles in place:
// tile 0 stores its sums of a flush window, tile y waits until tile y - 1 has added its sums of that window
// (tile_done, one counter per sequence and tile) and adds its own. The order is fixed, so the result is
// deterministic, and no buffer per tile is needed. Blocks are dispatched in increasing linear index (tile-major),
// so a block only ever waits for a block that is already running or done (as in CUB's decoupled look-back).
//
// The launcher is in fast_weight_backward.cu; this header holds the device code and the block layout
// (tests/ops/test_cuda.py also runs it on the CPU under a small SIMT emulation).
#pragma once

#include <algorithm>

#include "fast_weight_common.cuh"

namespace lmtool_fw {

constexpr int kBwdMaxWarps = 8;
constexpr int kBwdSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit: no opt-in needed
constexpr int kBwdMaxFlush = 32;            // tokens between two flushes of the partial sums

template <int NR>
struct BwdStep {
  float q[NR];
  float k[NR];
  float dout[kNC];
  float x[kNC];  // r_t (delta rule) or v_t (sum rule)
  float beta;
  float alpha;  // exp(g_t) (DECAY only)
};

struct Layout {
  int warps, cols_per_block, tiles, flush;
};

template <class TL>
Layout layout(int Dv, bool decay) {
  const int cols_per_warp = TL::CG * kNC;
  // shared bytes per warp and token: dq and dk rows, dbeta, and dg with a decay
  const int per_token = (2 * TL::DkPad + 1 + (decay ? 1 : 0)) * static_cast<int>(sizeof(float));
  int warps = std::min(kBwdMaxWarps, ceil_div(Dv, cols_per_warp));
  warps = std::max(1, std::min(warps, kBwdSharedBytes / (TL::P * per_token)));
  int flush = std::min(kBwdMaxFlush, kBwdSharedBytes / (warps * per_token));
  flush = std::max(TL::P, flush / TL::P * TL::P);  // a multiple of the prefetch depth
  const int cols_per_block = warps * cols_per_warp;
  return {warps, cols_per_block, ceil_div(Dv, cols_per_block), flush};
}

template <typename T, bool DELTA, bool DECAY, class TL>
__global__ void __launch_bounds__(kBwdMaxWarps * 32)
    backward_kernel(BackwardArgs a, int cols_per_block, int flush, bool vec) {
  constexpr int R = TL::R, NR = TL::NR, CG = TL::CG, P = TL::P, NC = kNC, DkPad = TL::DkPad;
  constexpr int V = 2 * NR;  // dq and dk values of a lane per token, before the column reduction
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int r = lane % R;
  const int j0 = blockIdx.y * cols_per_block + (warp * CG + lane / R) * NC;
  const int bh = blockIdx.x;
  const int BH = gridDim.x;
  const int b = bh / a.H, h = bh - (bh / a.H) * a.H;
  const int L = a.L, Dk = a.Dk, Dv = a.Dv;
  const int C = a.ckpt_every;
  const int n_ckpt = checkpoint_count(L, C);

  const T* q = static_cast<const T*>(a.q) + b * a.sq.b + h * a.sq.h;
  const T* k = static_cast<const T*>(a.k) + b * a.sk.b + h * a.sk.h;
  const T* dout = static_cast<const T*>(a.dout) + b * a.sdout.b + h * a.sdout.h;
  const T* v = DELTA ? nullptr : static_cast<const T*>(a.v) + b * a.sv.b + h * a.sv.h;
  const float* beta = DELTA ? a.beta + b * a.sbeta.b + h * a.sbeta.h : nullptr;
  const float* resid = DELTA ? a.resid + static_cast<int64_t>(bh) * L * Dv : nullptr;
  const float* g = DECAY ? a.g + b * a.sg.b + h * a.sg.h : nullptr;
  const float* ckpt = a.ckpt ? a.ckpt + static_cast<int64_t>(bh) * n_ckpt * Dv * Dk : nullptr;
  T* dv = static_cast<T*>(a.dv) + static_cast<int64_t>(bh) * L * Dv;
  const int tile = blockIdx.y, tiles = gridDim.y;
  float* dq_out = a.dq + static_cast<int64_t>(bh) * L * Dk;
  float* dk_out = a.dk + static_cast<int64_t>(bh) * L * Dk;
  float* dbeta_out = DELTA ? a.dbeta + static_cast<int64_t>(bh) * L : nullptr;
  float* dg_out = DECAY ? a.dg + static_cast<int64_t>(bh) * L : nullptr;
  int* tile_done = tiles > 1 ? a.tile_done + static_cast<int64_t>(bh) * tiles : nullptr;
  // Adds this tile's column sum to an output: tile 0 stores, later tiles add to what the tiles before stored (read
  // through L2: another multiprocessor wrote it).
  auto accumulate = [&](float* dst, float sum) { *dst = tile == 0 ? sum : __ldcg(dst) + sum; };
  // DECAY: this thread's entries of the recomputed states S_{t-1} of the current segment, [slot][NR * NC][thread]
  const int64_t part = static_cast<int64_t>(blockIdx.y) * BH + bh;  // this block's slice of the scratch
  const int segment = min(C, L);
  float* scratch = DECAY ? a.scratch + part * segment * blockDim.x * NR * NC + threadIdx.x : nullptr;

  float* red = smem;                                         // [warps][flush][2][DkPad]: dq, dk
  float* red_beta = smem + warps * flush * 2 * DkPad;        // [warps][flush]
  float* red_g = red_beta + warps * flush;                   // [warps][flush], DECAY only

  // S = S_{L-1} (the forward's final state), G = gradient of the final state.
  float S[NR][NC], G[NR][NC];
  const float* sL = a.final_state + static_cast<int64_t>(bh) * Dk * Dv;
  const float* gL = a.d_final_state ? a.d_final_state + static_cast<int64_t>(bh) * Dk * Dv : nullptr;
  load_tile<false, R>(sL, Dk, Dv, r, j0, S);
  load_tile<false, R>(gL, Dk, Dv, r, j0, G);
  bool s_bad = any_nonfinite(S);  // S may hold a NaN or inf: check the reverse steps (see the top)

  // The forward's step of token tt on S: S = alpha_tt S (DECAY) + k_tt u_tt^T, u = beta r (delta) or v (sum).
  auto forward_step = [&](int tt) {
    float uu[NC];
    if constexpr (DELTA) {
      load_cols<NC>(resid + static_cast<int64_t>(tt) * Dv, Dv, j0, true, uu);
      const float b = beta[tt * a.sbeta.t];
#pragma unroll
      for (int n = 0; n < NC; ++n) uu[n] = b * uu[n];
    } else {
      load_cols<NC>(v + tt * a.sv.t, Dv, j0, true, uu);
    }
    const T* kt = k + tt * a.sk.t;
    if constexpr (DECAY) {  // the same rounding as the forward: alpha S first, then the write
      const float alpha = expf(g[tt * a.sg.t]);
#pragma unroll
      for (int i = 0; i < NR; ++i) {
#pragma unroll
        for (int n = 0; n < NC; ++n) S[i][n] *= alpha;
      }
    }
#pragma unroll
    for (int mm = 0; mm < NR / 4; ++mm) {  // four rows at a time keeps few values in registers
      const int i0 = 4 * (r + mm * R);
      float kk[4];
      if (DECAY && vec && i0 < Dk) {  // the recomputation is on the DECAY path for every token: vector loads
        load4(kt + i0, kk);
      } else {
#pragma unroll
        for (int c = 0; c < 4; ++c) kk[c] = i0 + c < Dk ? to_float(kt[i0 + c]) : 0.0f;
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
#pragma unroll
        for (int n = 0; n < NC; ++n) S[4 * mm + c][n] = fmaf(kk[c], uu[n], S[4 * mm + c][n]);
      }
    }
  };

  // DECAY, at the last token t of a checkpoint segment: recomputes the segment's states forward from the state the
  // forward stored before it (checkpoint t / C - 1, or the initial state), writing S_{tt-1} to scratch slot
  // tt - (t / C) C for every token tt of the segment; S ends as S_t. Per thread, no shuffles or barriers.
  auto recompute_segment = [&](int t) {
    const int m = t / C;
    if (m > 0) {
      load_tile<true, R>(ckpt + static_cast<int64_t>(m - 1) * Dv * Dk, Dk, Dv, r, j0, S);
    } else {
      const float* s0 = a.initial_state ? a.initial_state + static_cast<int64_t>(bh) * Dk * Dv : nullptr;
      load_tile<false, R>(s0, Dk, Dv, r, j0, S);
    }
    for (int tt = m * C; tt <= t; ++tt) {
      float* dst = scratch + static_cast<int64_t>(tt - m * C) * NR * NC * blockDim.x;
#pragma unroll
      for (int i = 0; i < NR; ++i) {
#pragma unroll
        for (int n = 0; n < NC; ++n) dst[(i * NC + n) * blockDim.x] = S[i][n];
      }
      forward_step(tt);
    }
  };

  // Called after the reverse step of token t (S = S_t - k_t u_t^T) when S_t, k_t or u_t held a non-finite value:
  // makes S the forward's S_{t-1} where that subtraction spoiled it, and returns whether S_{t-1} holds a
  // non-finite value. Per thread, without shuffles or barriers, so it may diverge. (Token t's own dk and dbeta
  // do not need the repaired S: wherever token t brought the NaN or inf, they are not finite anyway.)
  auto repair = [&](int t) -> bool {
    const int m = t / C;  // the forward stored S_{mC-1}: checkpoint m - 1, or the initial state for m = 0
    const float* base = m > 0 ? ckpt + static_cast<int64_t>(m - 1) * Dv * Dk
                              : (a.initial_state ? a.initial_state + static_cast<int64_t>(bh) * Dk * Dv : nullptr);
    // Which entries are not finite (a bit each), then the base's value of those only: a loop that is not
    // unrolled, so that this rarely taken branch adds little code and few registers to the scan.
    static_assert(NR * NC <= 32, "one bit per entry of the tile");
    unsigned nonfinite = 0;
#pragma unroll
    for (int i = 0; i < NR; ++i) {
#pragma unroll
      for (int n = 0; n < NC; ++n) nonfinite |= static_cast<unsigned>(!isfinite(S[i][n])) << (i * NC + n);
    }
    bool redo = false;  // some entry is not finite now but was at the base: the forward's S_{t-1} may be finite
#pragma unroll 1
    for (int e = 0; e < NR * NC && !redo; ++e) {
      if ((nonfinite >> e & 1u) == 0) continue;
      const int i = e / NC, col = j0 + e % NC, row = 4 * (r + (i / 4) * R) + i % 4;
      const int64_t at = m > 0 ? static_cast<int64_t>(col) * Dk + row : static_cast<int64_t>(row) * Dv + col;
      redo = base == nullptr || row >= Dk || col >= Dv || isfinite(base[at]);
    }
    if (!redo) return nonfinite != 0;  // all were non-finite at the base already, and stay so through the block
    if (m > 0) {
      load_tile<true, R>(base, Dk, Dv, r, j0, S);
    } else {
      load_tile<false, R>(base, Dk, Dv, r, j0, S);
    }
    for (int tt = m * C; tt < t; ++tt) forward_step(tt);
    return any_nonfinite(S);
  };

  // Step s processes token t = L - 1 - s.
  auto load = [&](BwdStep<NR>& x, int s) {
    const bool valid = s < L;
    const int64_t t = valid ? L - 1 - s : 0;
    load_rows<R, NR>(q + t * a.sq.t, Dk, r, valid, vec, x.q);
    load_rows<R, NR>(k + t * a.sk.t, Dk, r, valid, vec, x.k);
    load_cols<NC>(dout + t * a.sdout.t, Dv, j0, valid, x.dout);
    if constexpr (DECAY) x.alpha = valid ? expf(g[t * a.sg.t]) : 1.0f;
    if constexpr (DELTA) {
      load_cols<NC>(resid + t * Dv, Dv, j0, valid, x.x);
      x.beta = valid ? beta[t * a.sbeta.t] : 0.0f;
    } else {
      load_cols<NC>(v + t * a.sv.t, Dv, j0, valid, x.x);
      x.beta = 0.0f;
    }
  };

  BwdStep<NR> buf[P];
#pragma unroll
  for (int p = 0; p < P; ++p) load(buf[p], p);

  for (int s0 = 0; s0 < L; s0 += flush) {
    for (int s1 = 0; s1 < flush; s1 += P) {
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int slot = s1 + p;
        const int s = s0 + slot;
        if (s < L) {  // uniform over the block: the shuffles inside are legal, no barrier is inside
          const int t = L - 1 - s;
          const BwdStep<NR>& x = buf[p];
          if constexpr (DECAY) {
            if (t == L - 1 || (t + 1) % C == 0) recompute_segment(t);  // S = S_t, scratch = the segment's S_{tt-1}
          } else if (ckpt != nullptr && (t + 1) % C == 0 && t + 1 < L) {  // S_t exactly as the forward had it
            const float* src = ckpt + static_cast<int64_t>((t + 1) / C - 1) * Dv * Dk;
            load_tile<true, R>(src, Dk, Dv, r, j0, S);
            s_bad = any_nonfinite(S);
          }
          // DECAY: this token's S_{t-1}, recomputed by recompute_segment
          const float* prev = DECAY ? scratch + static_cast<int64_t>(t % C) * NR * NC * blockDim.x : nullptr;

          float sdo[NC], u[NC], du[NC];
#pragma unroll
          for (int n = 0; n < NC; ++n) {
            sdo[n] = a.scale * x.dout[n];
            u[n] = DELTA ? x.beta * x.x[n] : x.x[n];
            du[n] = 0.0f;
          }
          const bool recheck = !DECAY && (s_bad || any_nonfinite(x.k) || any_nonfinite(u));
          float vals[V];  // [dq rows (NR), dk rows (NR)] of this lane, summed over its NC columns
#pragma unroll
          for (int i = 0; i < NR; ++i) {
            float dq = 0.0f;
#pragma unroll
            for (int n = 0; n < NC; ++n) {
              G[i][n] = fmaf(x.q[i], sdo[n], G[i][n]);
              dq = fmaf(S[i][n], sdo[n], dq);
              du[n] = fmaf(G[i][n], x.k[i], du[n]);
              if constexpr (DECAY) {
                S[i][n] = prev[(i * NC + n) * blockDim.x];  // S_{t-1}, recomputed forward
              } else {
                S[i][n] = fmaf(-x.k[i], u[n], S[i][n]);  // S_{t-1}
              }
            }
            vals[i] = dq;
          }
          group_sum<R>(du);

          float dbeta = 0.0f, dg = 0.0f;
#pragma unroll
          for (int i = 0; i < NR; ++i) {
            float dk = 0.0f;
#pragma unroll
            for (int n = 0; n < NC; ++n) {
              if constexpr (DELTA) {
                const float dr = x.beta * du[n];
                dk = fmaf(G[i][n], u[n], dk);
                if constexpr (DECAY) {
                  dk = fmaf(-S[i][n], x.alpha * dr, dk);  // S~_t = alpha_t S_{t-1}
                } else {
                  dk = fmaf(-S[i][n], dr, dk);
                }
                G[i][n] = fmaf(-x.k[i], dr, G[i][n]);
              } else {
                dk = fmaf(G[i][n], u[n], dk);
              }
              if constexpr (DECAY) {  // G is G~ now: dg_t = alpha_t <S_{t-1}, G~>, G_{t-1} = alpha_t G~
                dg = fmaf(S[i][n], G[i][n], dg);
                G[i][n] *= x.alpha;
              }
            }
            vals[NR + i] = dk;
          }
#pragma unroll
          for (int n = 0; n < NC; ++n) {
            const float g = DELTA ? x.beta * du[n] : du[n];
            if (DELTA) dbeta = fmaf(x.x[n], du[n], dbeta);
            if (r == n && j0 + n < Dv) dv[static_cast<int64_t>(t) * Dv + j0 + n] = from_float<T>(g);
          }

          // Column sums: over the warp's column groups by shuffles, then into this warp's shared slot.
          const int first = transpose_reduce<R, V>(vals, lane);
          float* slot_red = red + (static_cast<int64_t>(warp) * flush + slot) * 2 * DkPad;
#pragma unroll
          for (int e = 0; e < V / CG; ++e) {
            const int idx = first + e;  // value index: kind (dq, dk) and row within the lane's NR rows
            const int kind = idx / NR, w = idx % NR;
            slot_red[kind * DkPad + 4 * (r + (w / 4) * R) + (w % 4)] = vals[e];
          }
          if constexpr (DELTA) {
            dbeta = across_groups_sum<R>(dbeta);
            if (lane == 0) red_beta[warp * flush + slot] = dbeta;
          }
          if constexpr (DECAY) {
            dg = x.alpha * across_groups_sum<1>(dg);  // over every lane: all rows and columns of the warp
            if (lane == 0) red_g[warp * flush + slot] = dg;
          }
          if (recheck) s_bad = repair(t);
        }
        load(buf[p], s + P);
      }
    }

    __syncthreads();  // every warp's slots for tokens s0 .. s0 + flush - 1 are written
    const int window = s0 / flush;
    if (tile > 0) {  // wait until the tile before has added its sums for these tokens
      if (threadIdx.x == 0) {
        const volatile int* before = tile_done + tile - 1;
        while (*before <= window) {
        }
        __threadfence();
      }
      __syncthreads();
    }
    const int steps = min(flush, L - s0);
    for (int idx = threadIdx.x; idx < steps * 2 * DkPad; idx += blockDim.x) {
      const int slot = idx / (2 * DkPad);
      const int rem = idx - slot * 2 * DkPad;
      const int kind = rem / DkPad, row = rem - kind * DkPad;
      if (row < Dk) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += red[(static_cast<int64_t>(w) * flush + slot) * 2 * DkPad + rem];
        const int64_t t = L - 1 - (s0 + slot);
        accumulate((kind == 0 ? dq_out : dk_out) + t * Dk + row, sum);
      }
    }
    if constexpr (DELTA) {
      for (int slot = threadIdx.x; slot < steps; slot += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += red_beta[w * flush + slot];
        accumulate(dbeta_out + L - 1 - (s0 + slot), sum);
      }
    }
    if constexpr (DECAY) {
      for (int slot = threadIdx.x; slot < steps; slot += blockDim.x) {
        float sum = 0.0f;
        for (int w = 0; w < warps; ++w) sum += red_g[w * flush + slot];
        accumulate(dg_out + L - 1 - (s0 + slot), sum);
      }
    }
    if (tiles > 1) __threadfence();  // this block's sums are visible before tile_done says so
    __syncthreads();  // the slots are free for the next tokens, and every thread's sums are written
    if (tiles > 1 && threadIdx.x == 0) atomicExch(tile_done + tile, window + 1);
  }

  float* g0 = a.d_initial_state + static_cast<int64_t>(bh) * Dk * Dv;
  store_tile<false, R>(g0, Dk, Dv, r, j0, G);
}

}  // namespace lmtool_fw
