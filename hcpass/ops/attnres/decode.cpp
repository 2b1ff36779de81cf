// An Attention Residuals site's inference work at a few positions, as one call: the eager
// runtime's decode path of `hcpass::attnres` (`hcpass.ops.decode`, which falls back to the
// op wherever this does not apply). `hcpass.ops.attnres.reference.attnres` is the math;
// tests/ops/test_decode_ops.py compares the two. Built by `hcpass.native`.
//
// Per position, over the k values v_i (rows of C channels) and the query w:
//   s_i = (mean_c v_i^2 + eps)^(-1/2) <w, v_i>,  alpha = softmax_i(s),  h = sum_i alpha_i v_i
// in the reference's order: the logits value by value, softmax as exp(s - max) / sum, then h
// accumulated from i = 0. k >= 2 (the caller copies a single value).
//
// Positions run one after another, in one thread: for the few positions of a decoding step.

#pragma GCC optimize("tree-loop-vectorize")

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kMaxValues = 4096;

template <typename T>
void run(int64_t k, int64_t P, int64_t C, const void* const* values, const T* w, T eps, T* h) {
  T alpha[kMaxValues];
  for (int64_t p = 0; p < P; ++p) {
    T top = -INFINITY;
    for (int64_t i = 0; i < k; ++i) {
      const T* v = static_cast<const T*>(values[i]) + p * C;
      T square = T(0), dot = T(0);
#pragma omp simd reduction(+ : square, dot)
      for (int64_t c = 0; c < C; ++c) {
        square += v[c] * v[c];
        dot += v[c] * w[c];
      }
      alpha[i] = T(1) / std::sqrt(square / T(C) + eps) * dot;
      top = (alpha[i] > top || std::isnan(alpha[i])) ? alpha[i] : top;
    }
    T total = T(0);
    for (int64_t i = 0; i < k; ++i) total += (alpha[i] = std::exp(alpha[i] - top));
    for (int64_t i = 0; i < k; ++i) alpha[i] /= total;
    T* out = h + p * C;
    const T* first = static_cast<const T*>(values[0]) + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] = alpha[0] * first[c];
    for (int64_t i = 1; i < k; ++i) {
      const T* v = static_cast<const T*>(values[i]) + p * C;
      const T a = alpha[i];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] += a * v[c];
    }
  }
}

}  // namespace

// values: k pointers to contiguous [P, C] values; w [C]; h [P, C] contiguous. 2 <= k <=
// 4096. double_precision: 0 fp32, 1 fp64.
extern "C" void kernel(int64_t double_precision, int64_t k, int64_t P, int64_t C,
                       const void* const* values, const void* w, double eps, void* h) {
  if (double_precision)
    run<double>(k, P, C, values, static_cast<const double*>(w), eps, static_cast<double*>(h));
  else
    run<float>(k, P, C, values, static_cast<const float*>(w), static_cast<float>(eps),
               static_cast<float*>(h));
}
