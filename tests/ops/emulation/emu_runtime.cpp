// The SIMT runtime under lmtool's kernels on the CPU: every CUDA thread of a block is a std::thread, warp shuffles
// and __syncthreads are barriers, blocks run one after another. A shuffle or barrier that not every thread reaches
// (divergent control flow) times out and fails the launch. Dynamic shared memory starts as NaN, so a read before a
// write shows. Linked with the real launchers (kernels/fast_weight_{forward,backward}.cu compiled as C++).
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda_runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

namespace lmtool_fw {
constexpr size_t kSharedFloats = 58112;  // 227 KiB, the most a block may opt in to on sm_90
float smem[kSharedFloats];  // the kernels' `extern __shared__ float smem[]`: one block runs at a time
}  // namespace lmtool_fw

thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace {

std::atomic<bool> failed{false};

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(m_);
    if (failed) return;
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(20), [&] { return gen_ != gen || failed; })) failed = true;
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

std::unique_ptr<Barrier> block_barrier;
std::vector<std::unique_ptr<Barrier>> warp_barriers;
float exchange[1024];

}  // namespace

float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  exchange[warp * 32 + lane] = value;
  warp_barriers[warp]->wait();
  const float other = exchange[warp * 32 + (lane ^ lane_mask)];
  warp_barriers[warp]->wait();
  return other;
}

void __syncthreads() { block_barrier->wait(); }

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  const char* sms = std::getenv("LMTOOL_EMU_SMS");  // the forward's block size depends on it
  *value = sms != nullptr ? std::atoi(sms) : 1;
  return cudaSuccess;
}

const char* cudaGetErrorString(cudaError_t code) {
  return code == cudaSuccess ? "no error" : "emulated launch failure (invalid configuration or divergent barrier)";
}

namespace lmtool_emu {

const char* fault() {
  const char* f = std::getenv("LMTOOL_EMU_FAULT");
  return f != nullptr ? f : "";
}

int run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x);
  if (threads < 32 || threads % 32 != 0 || threads > 1024 || shared_bytes > sizeof(lmtool_fw::smem)) {
    return cudaErrorInvalidConfiguration;
  }
  failed = false;
  gridDim = grid;
  blockDim = block;
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      block_barrier = std::make_unique<Barrier>(threads);
      warp_barriers.clear();
      for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<Barrier>(32));
      // Only the bytes the launch asked for exist: NaN until written; past them ASan (when built with it) reports
      // any access, as the GPU would fault or read another block's memory.
#if defined(__SANITIZE_ADDRESS__)
      ASAN_UNPOISON_MEMORY_REGION(lmtool_fw::smem, sizeof(lmtool_fw::smem));
      ASAN_POISON_MEMORY_REGION(reinterpret_cast<char*>(lmtool_fw::smem) + shared_bytes,
                                sizeof(lmtool_fw::smem) - shared_bytes);
#endif
      std::fill(lmtool_fw::smem, lmtool_fw::smem + shared_bytes / sizeof(float), std::nanf(""));
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t, x, y] {
          threadIdx = dim3(static_cast<unsigned>(t), 0, 0);
          blockIdx = dim3(x, y, 0);
          body();
        });
      }
      for (auto& th : pool) th.join();
      if (failed) return cudaErrorLaunchFailure;
    }
  }
  return cudaSuccess;
}

}  // namespace lmtool_emu
