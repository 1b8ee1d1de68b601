// Torch-side helpers shared by the kernels' bindings (fast_weight_binding.cpp, recurrent_binding.cpp).
// Includes no CUDA header: the bindings also compile against a CPU-only torch for the tests' emulation, where
// LMTOOL_FW_HOST_EMULATION lets CPU tensors through.
#pragma once

#include <torch/extension.h>

#include <limits>
#include <vector>

#include "fast_weight.h"

namespace lmtool_binding {

inline int dtype_code(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat) return lmtool_fw::kFloat32;
  if (x.scalar_type() == at::kBFloat16) return lmtool_fw::kBFloat16;
  TORCH_CHECK(false, "lmtool kernels take float32 or bfloat16 inputs, got ", x.scalar_type());
  return -1;
}

inline void check_cuda(const at::Tensor& x, const char* name, const at::Tensor& like) {
#ifndef LMTOOL_FW_HOST_EMULATION  // defined only by the tests' CPU emulation (tests/ops/cuda_emulation.py)
  TORCH_CHECK(x.is_cuda(), "lmtool kernels: ", name, " must be a CUDA tensor");
#endif
  TORCH_CHECK(x.device() == like.device(), "lmtool kernels: ", name, " is on another device than the first input");
}

// Fills every output with NaN before a launch (debugging and tests: an element a kernel does not write shows).
inline void poison(const std::vector<at::Tensor>& outs, bool on) {
  if (!on) return;
  for (const auto& t : outs) {
    if (t.defined() && t.numel() > 0) t.fill_(std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace lmtool_binding
