// Host API of lmtool's fast-weight kernels: plain C++, no torch and no CUDA headers.
//
// The device code (fast_weight_*.cu) implements these functions with pointers, sizes and a stream;
// the torch glue (fast_weight_binding.cpp) allocates tensors and calls them. Keeping this header free of
// torch and CUDA types lets `nvcc -c` check the device code and a plain C++ compiler check the binding
// on machines without a GPU.
//
// Layouts (per batch element b and head h, G = B * H sequences, index bh = b * H + h):
//   q, k        [B, H, L, Dk]  input dtype, any strides for B, H and L, unit stride along Dk
//   v, dout     [B, H, L, Dv]  input dtype, same rule
//   beta        [B, H, L]      float32, any strides
//   g           [B, H, L]      float32, any strides: log-decay, S_{t-1} <- exp(g_t) S_{t-1} before step t
//   states      [B, H, Dk, Dv] float32, contiguous (initial state, final state, their gradients)
//   out, dv     [B, H, L, Dv]  input dtype, contiguous
//   resid       [B, H, L, Dv]  float32, contiguous: r_t = v_t - S_{t-1}^T k_t (delta rule only)
//   ckpt        [B, H, N, Dv, Dk] float32, contiguous: S after token t for every t + 1 = C, 2C, .. < L,
//               stored column-major (transposed) so that a thread's rows are contiguous
//   dq, dk      [B, H, L, Dk]  float32, contiguous: sums over all columns of S; the column tiles of one sequence
//               add theirs in tile order (tile 0 stores, tile y adds after tile y - 1: deterministic, no buffer
//               per tile); the order is kept through tile_done
//   dbeta       [B, H, L]      float32, contiguous, likewise (delta rule only)
//   dg          [B, H, L]      float32, contiguous, likewise (with g only)
//   tile_done   [B, H, T]      int32, zeros (T = backward_tiles(); nullable when T = 1): per sequence and tile, the
//               number of flush windows whose sums that tile has added
//   scratch     backward_scratch_per_sequence() floats per sequence (with g only): the states of one checkpoint
//               segment, recomputed forward from its checkpoint (the backward never divides by exp(g_t))
#pragma once

#include <cstdint>

namespace lmtool_fw {

enum DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Largest key width the kernels handle (rows of S held per thread are a compile-time count).
constexpr int kMaxDk = 512;

// Block layout overrides (0 / true: the launchers' choice). Tests use them to run several layouts on one shape.
struct LayoutOverride {
  int warps = 0;           // warps per block
  int flush = 0;           // backward: tokens between two flushes of the column sums (a multiple of the prefetch)
  bool vectorize = true;   // false: scalar loads of q and k even where vector loads are possible
};

struct Strides {
  int64_t b = 0, h = 0, t = 0;  // in elements; the feature dimension has stride 1
};

struct ForwardArgs {
  int dtype = kFloat32;  // of q, k, v and out
  bool delta = true;     // delta rule (else sum rule)
  int B = 0, H = 0, L = 0, Dk = 0, Dv = 0;
  float scale = 1.0f;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const float* beta = nullptr;        // delta rule only
  const float* g = nullptr;           // nullable: no decay (the g = None kernels, unchanged)
  const float* initial_state = nullptr;  // nullable: zeros
  Strides sq, sk, sv, sbeta, sg;
  void* out = nullptr;
  float* final_state = nullptr;  // always written
  float* resid = nullptr;        // nullable; delta rule, for the backward
  float* ckpt = nullptr;         // nullable; for the backward
  int ckpt_every = 64;           // C
  LayoutOverride layout;
};

struct BackwardArgs {
  int dtype = kFloat32;
  bool delta = true;
  int B = 0, H = 0, L = 0, Dk = 0, Dv = 0;
  float scale = 1.0f;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;        // sum rule only
  const float* beta = nullptr;    // delta rule only
  const float* resid = nullptr;   // delta rule only
  const float* g = nullptr;       // nullable: no decay (the g = None kernels, unchanged)
  const void* dout = nullptr;
  Strides sq, sk, sv, sbeta, sg, sdout;
  const float* initial_state = nullptr;  // nullable: zeros (the forward's, to recompute S after a NaN or inf)
  const float* final_state = nullptr;    // S after the last token (from the forward)
  const float* d_final_state = nullptr;  // nullable: zeros
  const float* ckpt = nullptr;           // nullable when L <= C
  int ckpt_every = 64;
  float* dq = nullptr;
  float* dk = nullptr;
  void* dv = nullptr;
  float* dbeta = nullptr;       // delta rule only
  float* dg = nullptr;          // with g only
  int* tile_done = nullptr;     // B * H * backward_tiles() zeros; nullable when backward_tiles() == 1
  float* scratch = nullptr;     // with g only: backward_scratch_per_sequence() * B * H floats
  float* d_initial_state = nullptr;
  LayoutOverride layout;
};

// Number of checkpoints the forward stores for the backward: one per multiple of C below L.
inline int num_checkpoints(int L, int ckpt_every) { return L > 0 ? (L - 1) / ckpt_every : 0; }

// Number of column tiles of S the backward splits Dv into (blocks per sequence; the size of tile_done per sequence),
// for the sizes, decay (g non-null) and layout of `args`.
int backward_tiles(const BackwardArgs& args);

// Floats of scratch the backward with a decay needs per sequence: min(C, L) states of its column tiles (rows
// padded to the tile's DkPad), the states of one checkpoint segment recomputed forward. 0 when Dk > kMaxDk.
int64_t backward_scratch_per_sequence(const BackwardArgs& args);

// Launch on `stream` (a cudaStream_t). Return 0 (cudaSuccess) or a CUDA error code; errors that the
// caller should have prevented (bad sizes) return -1.
int forward(const ForwardArgs& args, void* stream);
int backward(const BackwardArgs& args, void* stream);

// Human-readable message for a code returned above.
const char* error_string(int code);

}  // namespace lmtool_fw
