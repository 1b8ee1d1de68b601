// Launcher of the backward kernel (fast_weight_backward.cuh): layout, grid and dispatch over dtype, rule and
// key width.
#include <algorithm>

#include "fast_weight_backward.cuh"

namespace lmtool_fw {
namespace {

template <typename T>
bool rows_vectorizable(const BackwardArgs& a) {
  auto ok = [](const void* p, const Strides& s) {
    return reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0 && s.b % 4 == 0 && s.h % 4 == 0 && s.t % 4 == 0;
  };
  return a.Dk % 4 == 0 && ok(a.q, a.sq) && ok(a.k, a.sk);
}

template <typename T, bool DELTA>
int launch(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    const Layout lay = layout<TL>(a.Dv);
    const dim3 grid(a.B * a.H, lay.tiles);
    const size_t shared = static_cast<size_t>(lay.warps) * lay.flush * (2 * TL::DkPad + 1) * sizeof(float);
    backward_kernel<T, DELTA, TL>
        <<<grid, lay.warps * 32, shared, stream>>>(a, lay.cols_per_block, lay.flush, rows_vectorizable<T>(a));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace

int backward_tiles(int Dk, int Dv) {
  if (Dv < 1) return 1;
  const int tiles = dispatch_dk(Dk, [&](auto tile) -> int { return layout<decltype(tile)>(Dv).tiles; });
  return tiles < 1 ? 1 : tiles;
}

int backward(const BackwardArgs& a, void* stream) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.Dk > kMaxDk || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  if (num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  if (a.dtype == kFloat32) return a.delta ? launch<float, true>(a, s) : launch<float, false>(a, s);
  if (a.dtype == kBFloat16) {
    return a.delta ? launch<__nv_bfloat16, true>(a, s) : launch<__nv_bfloat16, false>(a, s);
  }
  return -1;
}

}  // namespace lmtool_fw
