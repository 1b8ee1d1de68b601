// Launcher of the backward kernel (fast_weight_backward.cuh): layout, grid and dispatch over dtype, rule, decay
// (g given or not) and key width.
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

template <typename T, bool DELTA, bool DECAY>
int launch(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    const Layout lay = layout<TL>(a.Dv, DECAY);
    const dim3 grid(a.B * a.H, lay.tiles);
    const size_t per_token = 2 * TL::DkPad + 1 + (DECAY ? 1 : 0);
    const size_t shared = static_cast<size_t>(lay.warps) * lay.flush * per_token * sizeof(float);
    backward_kernel<T, DELTA, DECAY, TL>
        <<<grid, lay.warps * 32, shared, stream>>>(a, lay.cols_per_block, lay.flush, rows_vectorizable<T>(a));
    return static_cast<int>(cudaGetLastError());
  });
}

template <bool DECAY>
int launch_rule(const BackwardArgs& a, cudaStream_t s) {
  if (a.dtype == kFloat32) return a.delta ? launch<float, true, DECAY>(a, s) : launch<float, false, DECAY>(a, s);
  if (a.dtype == kBFloat16) {
    return a.delta ? launch<__nv_bfloat16, true, DECAY>(a, s) : launch<__nv_bfloat16, false, DECAY>(a, s);
  }
  return -1;
}

}  // namespace

int backward_tiles(int Dk, int Dv, bool decay) {
  if (Dv < 1) return 1;
  const int tiles = dispatch_dk(Dk, [&](auto tile) -> int { return layout<decltype(tile)>(Dv, decay).tiles; });
  return tiles < 1 ? 1 : tiles;
}

int64_t backward_scratch_per_sequence(int Dk, int Dv, int L, int ckpt_every) {
  if (Dk < 1 || Dv < 1 || L < 1 || ckpt_every < 1) return 0;
  int64_t floats = 0;
  dispatch_dk(Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    const Layout lay = layout<TL>(Dv, true);
    floats = static_cast<int64_t>(lay.tiles) * lay.cols_per_block * TL::DkPad * std::min(ckpt_every, L);
    return 0;
  });
  return floats;
}

int backward(const BackwardArgs& a, void* stream) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.Dk > kMaxDk || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  if (num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr) return -1;
  if (a.g != nullptr && (a.dg_part == nullptr || a.scratch == nullptr)) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  return a.g != nullptr ? launch_rule<true>(a, s) : launch_rule<false>(a, s);
}

}  // namespace lmtool_fw
