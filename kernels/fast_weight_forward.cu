// Launcher of the forward kernel (fast_weight_forward.cuh): block size, grid and dispatch over dtype, rule,
// decay (g given or not) and key width.
#include <algorithm>

#include "fast_weight_forward.cuh"

namespace lmtool_fw {
namespace {

int num_sms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return std::max(sms, 1);
}

template <typename T>
bool rows_vectorizable(const ForwardArgs& a) {
  auto ok = [](const void* p, const Strides& s) {
    return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0 && s.b % 4 == 0 && s.h % 4 == 0 && s.t % 4 == 0;
  };
  return a.Dk % 4 == 0 && ok(a.q, a.sq) && ok(a.k, a.sk);
}

template <typename T, bool DELTA, bool DECAY>
int launch(const ForwardArgs& a, cudaStream_t stream) {
  return dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    const int cols_per_warp = TL::CG * kNC;
    int warps = std::min(kFwdMaxWarps, ceil_div(a.Dv, cols_per_warp));
    // Small problems: fewer warps per block, so that the blocks spread over more multiprocessors.
    const int sms = num_sms();
    while (warps > 1 && static_cast<int64_t>(a.B) * a.H * ceil_div(a.Dv, warps * cols_per_warp) < sms) warps /= 2;
    if (a.layout.warps > 0) warps = a.layout.warps;
    if (warps > kFwdMaxWarps) return -1;
    const int cols_per_block = warps * cols_per_warp;
    const dim3 grid(a.B * a.H, ceil_div(a.Dv, cols_per_block));
    const bool vec = a.layout.vectorize && rows_vectorizable<T>(a);
    return launch_kernel(forward_kernel<T, DELTA, DECAY, TL>, grid, dim3(warps * 32), 0, stream, a, cols_per_block, vec);
  });
}

template <bool DECAY>
int launch_rule(const ForwardArgs& a, cudaStream_t s) {
  if (a.dtype == kFloat32) return a.delta ? launch<float, true, DECAY>(a, s) : launch<float, false, DECAY>(a, s);
  if (a.dtype == kBFloat16) {
    return a.delta ? launch<__nv_bfloat16, true, DECAY>(a, s) : launch<__nv_bfloat16, false, DECAY>(a, s);
  }
  return -1;
}

}  // namespace

int forward(const ForwardArgs& a, void* stream) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.Dk > kMaxDk || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  return a.g != nullptr ? launch_rule<true>(a, s) : launch_rule<false>(a, s);
}

const char* error_string(int code) {
  if (code == -1) return "invalid arguments for the fast-weight kernels (sizes, dtype or checkpoint interval)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace lmtool_fw
