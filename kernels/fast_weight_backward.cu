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

// The layout of `a` (layout<TL>() unless a.layout overrides it) and its dynamic shared memory in bytes; warps = 0
// for an override that does not fit (flush not a multiple of the prefetch depth, too much shared memory).
template <class TL>
Layout layout_of(const BackwardArgs& a, size_t* shared) {
  const bool decay = a.g != nullptr;
  Layout lay = layout<TL>(a.Dv, decay);
  if (a.layout.warps > 0) {
    lay.warps = a.layout.warps;
    lay.cols_per_block = lay.warps * TL::CG * kNC;
    lay.tiles = ceil_div(a.Dv, lay.cols_per_block);
  }
  if (a.layout.flush > 0) lay.flush = a.layout.flush;
  const size_t per_token = 2 * TL::DkPad + 1 + (decay ? 1 : 0);
  *shared = static_cast<size_t>(lay.warps) * lay.flush * per_token * sizeof(float);
  if (lay.warps > kBwdMaxWarps || lay.flush % TL::P != 0 || *shared > static_cast<size_t>(kBwdSharedBytes)) {
    lay.warps = 0;
  }
  return lay;
}

template <typename T, bool DELTA, bool DECAY>
int launch(const BackwardArgs& a, cudaStream_t stream) {
  return dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    size_t shared = 0;
    const Layout lay = layout_of<TL>(a, &shared);
    if (lay.warps == 0 || (lay.tiles > 1 && a.tile_done == nullptr)) return -1;
    const dim3 grid(a.B * a.H, lay.tiles);
    const bool vec = a.layout.vectorize && rows_vectorizable<T>(a);
    return launch_kernel(backward_kernel<T, DELTA, DECAY, TL>, grid, dim3(lay.warps * 32), shared, stream, a,
                         lay.cols_per_block, lay.flush, vec);
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

int backward_tiles(const BackwardArgs& a) {
  if (a.Dv < 1) return 1;
  size_t shared = 0;
  const int tiles = dispatch_dk(a.Dk, [&](auto tile) -> int { return layout_of<decltype(tile)>(a, &shared).tiles; });
  return tiles < 1 ? 1 : tiles;
}

int64_t backward_scratch_per_sequence(const BackwardArgs& a) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.ckpt_every < 1) return 0;
  int64_t floats = 0;
  dispatch_dk(a.Dk, [&](auto tile) -> int {
    using TL = decltype(tile);
    size_t shared = 0;
    const Layout lay = layout_of<TL>(a, &shared);
    floats = static_cast<int64_t>(lay.tiles) * lay.cols_per_block * TL::DkPad * std::min(a.ckpt_every, a.L);
    return 0;
  });
  return floats;
}

int backward(const BackwardArgs& a, void* stream) {
  if (a.Dk < 1 || a.Dv < 1 || a.L < 1 || a.Dk > kMaxDk || a.ckpt_every < 1) return -1;
  if (a.B < 1 || a.H < 1) return 0;
  if (static_cast<int64_t>(a.B) * a.H > 0x7fffffff) return -1;
  if (num_checkpoints(a.L, a.ckpt_every) > 0 && a.ckpt == nullptr) return -1;
  if (a.dq == nullptr || a.dk == nullptr || (a.delta && a.dbeta == nullptr)) return -1;
  if (a.g != nullptr && (a.dg == nullptr || a.scratch == nullptr)) return -1;
  auto s = static_cast<cudaStream_t>(stream);
  return a.g != nullptr ? launch_rule<true>(a, s) : launch_rule<false>(a, s);
}

}  // namespace lmtool_fw
