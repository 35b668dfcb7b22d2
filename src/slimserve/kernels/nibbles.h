// The operands of the 4-bit torch operators (w4a8.cpp, w4a16.cpp), in w4a8.py's `pack` layout.
#pragma once

#include <stdint.h>

#include <torch/csrc/stable/tensor.h>

namespace slimserve {

// Checks x (M, K) bf16, w (N / 16, K / 8, 16, 4) uint8, scale (N / 16, G, 16) bf16 and zero
// likewise uint8, with groups of a multiple of `columns` columns, for the operator `op`; returns G.
inline int64_t check_nibble_operands(const char* op, const torch::stable::Tensor& x, const torch::stable::Tensor& w,
                                     const torch::stable::Tensor& scale, const torch::stable::Tensor& zero,
                                     int64_t columns) {
  using torch::headeronly::ScalarType;
  STD_TORCH_CHECK(x.dim() == 2 && x.scalar_type() == ScalarType::BFloat16 && x.is_contiguous(), op,
                  " needs contiguous 2-D bf16 activations");
  STD_TORCH_CHECK(w.dim() == 4 && w.size(2) == 16 && w.size(3) == 4 && w.scalar_type() == ScalarType::Byte &&
                  w.is_contiguous(), op, " needs w4a8.pack's weight");
  const int64_t K = x.size(1);
  STD_TORCH_CHECK(w.size(1) * 8 == K, op, ": the activations have ", K, " columns, the weight ", w.size(1) * 8);
  STD_TORCH_CHECK(scale.dim() == 3 && scale.size(0) == w.size(0) && scale.size(2) == 16 &&
                  scale.scalar_type() == ScalarType::BFloat16 && scale.is_contiguous(),
                  op, " needs bf16 scales (N / 16, groups, 16)");
  const int64_t G = scale.size(1);
  STD_TORCH_CHECK(G > 0 && K % (columns * G) == 0, op, ": groups of K / ", G, " columns must be a multiple of ",
                  columns);
  STD_TORCH_CHECK(zero.sizes().equals(scale.sizes()) && zero.scalar_type() == ScalarType::Byte &&
                  zero.is_contiguous(), op, " needs uint8 zeros shaped as the scales");
  return G;
}

}  // namespace slimserve
