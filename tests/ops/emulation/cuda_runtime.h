// Host stand-in for <cuda_runtime.h>: just enough for lmtool's kernels and their launchers (kernels/*.cu, *.cuh)
// to compile as C++ and run on the CPU, one std::thread per CUDA thread (emu_runtime.cpp). Compiled with
// -DLMTOOL_FW_HOST_EMULATION, so that kernels/fast_weight_common.cuh leaves launch_kernel to this file.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// The vector types with CUDA's alignment, so that UBSan's alignment check flags a misaligned vector load.
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
// The opt-in to more dynamic shared memory: the emulated block has lmtool_fw::smem (emu_runtime.cpp), which
// run_grid checks every launch against.
template <typename F>
cudaError_t cudaFuncSetAttribute(F*, cudaFuncAttribute, int) {
  return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
const char* cudaGetErrorString(cudaError_t code);

extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
float __shfl_xor_sync(unsigned mask, float value, int lane_mask);
void __syncthreads();
inline void __threadfence() {}  // blocks run one after another: every earlier block's writes are visible
inline float __ldcg(const float* p) { return *p; }
inline int atomicExch(int* p, int value) {
  const int old = *p;
  *p = value;
  return old;
}
using std::isfinite;
using std::min;

namespace lmtool_emu {
// Runs `body` for every thread of every block (blocks one after another, in CUDA's linear order: x fastest);
// returns a CUDA error code: a shuffle or barrier that not every thread reaches fails the launch.
int run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);
// LMTOOL_EMU_FAULT (tests only): "wrong-values" (scale off by 1%), "launch-error" (nothing runs, error 9),
// "out-of-bounds" (one token more than the buffers hold) or "misaligned-vector-loads" (vector loads of q and k
// even where the launcher chose scalar ones); "" otherwise.
const char* fault();
}  // namespace lmtool_emu

namespace lmtool_emu {
template <typename A, typename = void>
struct has_scale : std::false_type {};
template <typename A>
struct has_scale<A, std::void_t<decltype(std::declval<A&>().scale)>> : std::true_type {};

// The "wrong-values" fault: the fast-weight kernels' output scale off by 1%; kernels without a scale (the recurrent
// scans) run one token less, so that the last token's outputs are never written and the final state is one early.
template <typename A>
void make_wrong(A& args) {
  if constexpr (has_scale<A>::value) {
    args.scale *= 1.01f;
  } else {
    args.L -= 1;
  }
}
}  // namespace lmtool_emu

// The emulation's kernel launch: the same signature as the CUDA one in kernels/fast_weight_common.cuh.
template <typename... Params, typename... Args>
int launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t,
                  const Args&... args) {
  std::tuple<Args...> copy(args...);  // the first argument is the kernel's argument struct (ForwardArgs, ...)
  const char* fault = lmtool_emu::fault();
  if (std::strcmp(fault, "launch-error") == 0) return cudaErrorInvalidConfiguration;
  if (std::strcmp(fault, "wrong-values") == 0) lmtool_emu::make_wrong(std::get<0>(copy));
  if (std::strcmp(fault, "out-of-bounds") == 0) std::get<0>(copy).L += 1;
  using Last = std::tuple_element_t<sizeof...(Args) - 1, std::tuple<Args...>>;
  if constexpr (std::is_same_v<Last, bool>) {  // the fast-weight kernels' `vec`
    if (std::strcmp(fault, "misaligned-vector-loads") == 0) std::get<sizeof...(Args) - 1>(copy) = true;
  }
  return lmtool_emu::run_grid(grid, block, shared, [&] { std::apply(kernel, copy); });
}
