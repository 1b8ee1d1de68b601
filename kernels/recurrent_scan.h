// Host API of lmtool's kernels for the recurrent fast weight programmers: plain C++, no torch and no CUDA headers
// (like fast_weight.h, so that `nvcc -c` checks the device code and a plain C++ compiler the binding).
//
// One thread block per (batch element b, head h) scans the whole sequence with the fast matrices of that head in
// shared memory (rows padded to D + 1 floats). The backward is a reverse scan that rebuilds each matrix as
// R_{t-1} = R_t - k_t u_t^T and reloads it from a checkpoint the forward stored every C tokens; nothing of size
// L x D x D is ever stored. All tensors are contiguous; "dtype" tensors are float32 or bfloat16 (args.dtype), every
// other one float32. Sequences of the per-gate tensors are indexed b * (gates * H) + g * H + h (gate-major, as
// the layers stack them); per-head tensors b * H + h.
#pragma once

#include <cstdint>

namespace lmtool_fw {

// Largest head width: the Delta LSTM's backward holds 2 x 3 matrices of D x (D + 1) floats (105 KB at D = 64).
constexpr int kRecMaxD = 64;

// Delta RNN (gates = 1) and Delta LSTM (gates = 3): the recurrent matrices' scan given z_t = W_t q_t.
//   p_t = softmax(y_{t-1});  r_t = v_t - R_{t-1}^T k_t;  u_t = beta_t r_t;  R_t = R_{t-1} + k_t u_t^T
//   a_t = z_t + R_t^T p_t   (per gate);   RNN: y_t = a_t
//   LSTM: c_t = c_{t-1} + sigmoid(a^i_t) (a^u_t - c_{t-1});  y_t = sigmoid(a^o_t) c_t
struct DeltaRNNArgs {
  int dtype = 0;  // kFloat32 or kBFloat16 (fast_weight.h) of z, k and v
  int gates = 1;
  int B = 0, H = 0, L = 0, D = 0;
  int ckpt_every = 64;  // C
  // inputs (both passes read what they need)
  const void* z = nullptr;       // [B, gates H, L, D] dtype (forward only)
  const void* k = nullptr;       // [B, gates H, L, D] dtype
  const void* v = nullptr;       // [B, gates H, L, D] dtype (forward only)
  const float* beta = nullptr;   // [B, gates H, L]
  const float* R0 = nullptr;     // [B, gates H, D, D] initial recurrent matrices (forward)
  const float* y0 = nullptr;     // [B, H, D]
  const float* c0 = nullptr;     // [B, H, D], LSTM only
  // forward outputs, read again by the backward
  float* y = nullptr;            // [B, H, L, D] every y_t
  float* R = nullptr;            // [B, gates H, D, D] final matrices
  float* y_last = nullptr;       // [B, H, D]
  float* c_last = nullptr;       // [B, H, D], LSTM only
  float* resid = nullptr;        // [B, gates H, L, D] r_t; nullable in the forward (inference)
  float* pre = nullptr;          // [B, 3 H, L, D] a_t, LSTM only; nullable in the forward
  float* cells = nullptr;        // [B, H, L, D] c_t, LSTM only; nullable in the forward
  float* ckpt = nullptr;         // [B, H, N, gates, D, D] R after tokens C, 2C, .. < L; nullable in the forward
  // backward: incoming gradients (the final-state ones nullable: zeros) and outputs
  const float* dy = nullptr;     // [B, H, L, D]
  const float* dR = nullptr;     // [B, gates H, D, D]
  const float* dy_last = nullptr;
  const float* dc_last = nullptr;
  float* dz = nullptr;           // [B, gates H, L, D]
  float* dk = nullptr;
  float* dv = nullptr;
  float* dbeta = nullptr;        // [B, gates H, L]
  float* dR0 = nullptr;          // [B, gates H, D, D]
  float* dy0 = nullptr;          // [B, H, D]
  float* dc0 = nullptr;          // [B, H, D], LSTM only
};

// Recurrent Delta Net: the whole scan, with P = 3 D + 1 and rec [H, D, P] the slow recurrent weights.
//   a_t = proj_t + rec^T tanh(y_{t-1});  q, k = softmax(a[0:D]), softmax(a[D:2D]);  v = a[2D:3D];  beta = sigmoid(a[3D])
//   r_t = v_t - W_{t-1}^T k_t;  W_t = W_{t-1} + k_t (beta_t r_t)^T;  y_t = W_t^T q_t
struct RecDeltaArgs {
  int dtype = 0;  // of proj
  int B = 0, H = 0, L = 0, D = 0;
  int ckpt_every = 64;
  const void* proj = nullptr;    // [B, H, L, P] dtype (forward only)
  const float* rec = nullptr;    // [H, D, P]
  const float* W0 = nullptr;     // [B, H, D, D]
  const float* y0 = nullptr;     // [B, H, D]
  float* y = nullptr;            // [B, H, L, D] every y_t
  float* W = nullptr;            // [B, H, D, D] final
  float* y_last = nullptr;       // [B, H, D]
  float* pre = nullptr;          // [B, H, L, P] a_t; nullable in the forward
  float* resid = nullptr;        // [B, H, L, D] r_t; nullable in the forward
  float* ckpt = nullptr;         // [B, H, N, D, D]; nullable in the forward
  const float* dy = nullptr;     // [B, H, L, D]
  const float* dW = nullptr;     // nullable
  const float* dy_last = nullptr;  // nullable
  float* dproj = nullptr;        // [B, H, L, P]
  float* drec = nullptr;         // [B, H, D, P]: per sequence; the caller sums over B (deterministic, no atomics)
  float* dW0 = nullptr;          // [B, H, D, D]
  float* dy0 = nullptr;          // [B, H, D]
};

// Self-referential weight matrix (SRWM), P = 3 D + 4: one matrix W [D, P] per head reads and rewrites itself.
//   r_t = W_{t-1}^T x_t = [y_t, r_q, r_k, r_b];  q, k = softmax(r_q), softmax(r_k);  rate_j = sigmoid(r_b[block(j)])
//   (block(j) = 0, 1, 2 for the D columns of y, q, k and 3 for the 4 columns of b)
//   vd_t = W_{t-1}^T (q - k);  W_t = W_{t-1} + k (rate * vd_t)^T;  the output is y_t
struct SRWMArgs {
  int dtype = 0;  // of x
  int B = 0, H = 0, L = 0, D = 0;
  int ckpt_every = 64;
  const void* x = nullptr;       // [B, H, L, D] dtype
  const float* W0 = nullptr;     // [B, H, D, P] (forward)
  float* y = nullptr;            // [B, H, L, D]
  float* W = nullptr;            // [B, H, D, P] final
  float* pre = nullptr;          // [B, H, L, P] r_t; nullable in the forward
  float* vd = nullptr;           // [B, H, L, P] vd_t; nullable in the forward
  float* ckpt = nullptr;         // [B, H, N, D, P]; nullable in the forward
  const float* dy = nullptr;     // [B, H, L, D]
  const float* dW = nullptr;     // nullable
  float* dx = nullptr;           // [B, H, L, D]
  float* dW0 = nullptr;          // [B, H, D, P]
};

// Launch on `stream` (a cudaStream_t). 0 (cudaSuccess), a CUDA error code, or -1 for arguments the caller should
// have refused (D outside 1..kRecMaxD, a missing buffer, a bad dtype); recurrent_error_string() explains it.
int delta_rnn_forward(const DeltaRNNArgs& args, void* stream);
int delta_rnn_backward(const DeltaRNNArgs& args, void* stream);
int rec_delta_forward(const RecDeltaArgs& args, void* stream);
int rec_delta_backward(const RecDeltaArgs& args, void* stream);
int srwm_forward(const SRWMArgs& args, void* stream);
int srwm_backward(const SRWMArgs& args, void* stream);
const char* recurrent_error_string(int code);

}  // namespace lmtool_fw
