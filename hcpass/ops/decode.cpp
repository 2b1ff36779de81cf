// A hyper-connection site's inference work at a few positions, as one call: the eager
// runtime's decode path (`hcpass.ops.decode`, which falls back to the `hcpass::` ops wherever
// this does not apply). `hcpass.ops.reference` is the math; tests/ops/test_decode_ops.py compares
// the two. Built by `hcpass.native`.
//
// Per position p (a state X is n rows of C channels):
//   merge (optional): X'[i] = sum_j H_res_in[i, j] X[j] + H_post_in[i] y          (post_res)
//   read (optional), of the merged state if there was a merge, else of X:
//     d    = (sum_i X[i] @ phi_i) / sqrt(mean over the n*C values of X^2 + rms_eps)
//            (phi_i: rows i*C .. i*C + C - 1 of phi [n*C, k]; no d for a static mixer)
//     l    = alpha_s * d + b  (alpha_s: alpha[0] on the pre slice, alpha[1] post, alpha[2]
//            res), or l = b for a static mixer
//     H_pre = sigmoid(l_pre), H_post = 2 sigmoid(l_post)                          (coeffs)
//     H_res = Sinkhorn(l_res) with `iters` iterations, or the raw l_res (iters = 0: the
//             caller applies its manifold's map)
//     u    = sum_i H_pre[i] X[i]                                                  (pre)
//
// Sums run in the order of the C++ kernels the ops call on CPU (streams.cpp, sinkhorn.cpp):
// the mixes over j = 0 .. n - 1 then the H_post term, Sinkhorn's normalisations as
// multiplications by the reciprocal of max(sum, eps). The projection and the mean square
// are the only sums the ops leave to ATen (a matmul): they differ by rounding.
//
// Positions run one after another, in one thread: this is for the few positions of a
// decoding step, where the work of a site is a few thousand multiply-adds and any dispatch
// costs more than the arithmetic.

#pragma GCC optimize("tree-loop-vectorize")

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

template <typename T>
constexpr T kEps = T(1e-30);  // Sinkhorn's floor of a sum (sinkhorn.py's _EPS)

template <typename T>
struct State {
  const T* data;
  int64_t stream_stride, position_stride;
  const T* row(int64_t i, int64_t p) const { return data + i * stream_stride + p * position_stride; }
};

// out = sum_j w[j] * rows[j] (rows[j] = state.row(j, p)): streams.cpp's `mix`
template <typename T>
void mix(const T* w, State<T> state, int64_t p, int64_t n, int64_t C, T* out) {
  const T* first = state.row(0, p);
  const T w0 = w[0];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = w0 * first[c];
  for (int64_t j = 1; j < n; ++j) {
    const T* r = state.row(j, p);
    const T wj = w[j];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += wj * r[c];
  }
}

template <typename T>
T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// Sinkhorn-Knopp on one n x n matrix of logits, in place: sinkhorn.cpp's steps.
template <typename T>
void sinkhorn(T* m, int64_t n, int64_t iters, T* inverse) {
  const int64_t nn = n * n;
  T top = m[0];
  for (int64_t k = 1; k < nn; ++k) top = (m[k] > top || std::isnan(m[k])) ? m[k] : top;
  for (int64_t k = 0; k < nn; ++k) m[k] = std::exp(m[k] - top);
  for (int64_t s = 0; s < 2 * iters; ++s) {
    const bool columns = s % 2 == 0;
    std::fill(inverse, inverse + n, T(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) inverse[columns ? j : i] += m[i * n + j];
    for (int64_t i = 0; i < n; ++i) inverse[i] = T(1) / std::max(inverse[i], kEps<T>);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) m[i * n + j] *= inverse[columns ? j : i];
  }
}

template <typename T>
struct Read {
  const T *phi, *alpha, *bias;  // phi and alpha null for a static mixer
  int64_t k, iters;
  T rms_eps;
  T *h_pre, *h_post, *h_res, *u;  // h_res: [P, k - 2n]
};

// Scratch for one position's logits and Sinkhorn's sums: k = 2n + n^2 and n are small (a
// few dozen); the caller checks they fit.
constexpr int64_t kMaxLogits = 1024;

template <typename T>
void read(State<T> x, int64_t p, int64_t n, int64_t C, const Read<T>& r) {
  T logits[kMaxLogits];
  T inverse[kMaxLogits];
  const int64_t k = r.k, res = k - 2 * n;
  if (r.phi != nullptr) {
    std::fill(logits, logits + k, T(0));
    T square = T(0);
    for (int64_t i = 0; i < n; ++i) {
      const T* row = x.row(i, p);
      const T* block = r.phi + i * C * k;
      for (int64_t c = 0; c < C; ++c) {
        const T v = row[c];
        square += v * v;
        const T* w = block + c * k;
#pragma omp simd
        for (int64_t l = 0; l < k; ++l) logits[l] += v * w[l];
      }
    }
    const T rms = std::sqrt(square / T(n * C) + r.rms_eps);
    for (int64_t l = 0; l < k; ++l) {
      const T a = r.alpha[l < n ? 0 : (l < 2 * n ? 1 : 2)];
      logits[l] = a * (logits[l] / rms) + r.bias[l];
    }
  } else {
    std::copy(r.bias, r.bias + k, logits);
  }
  T* pre = r.h_pre + p * n;
  for (int64_t i = 0; i < n; ++i) {
    pre[i] = sigmoid(logits[i]);
    r.h_post[p * n + i] = T(2) * sigmoid(logits[n + i]);
  }
  T* h_res = r.h_res + p * res;
  std::copy(logits + 2 * n, logits + k, h_res);
  if (r.iters > 0) sinkhorn(h_res, n, r.iters, inverse);
  mix(pre, x, p, n, C, r.u + p * C);
}

template <typename T>
void run(int64_t n, int64_t P, int64_t C, State<T> x, const T* y, const T* h_post_in,
         const T* h_res_in, T* merged, const Read<T>& r) {
  State<T> state = x;
  if (merged != nullptr) state = {merged, P * C, C};
  for (int64_t p = 0; p < P; ++p) {
    if (merged != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        T* o = merged + (i * P + p) * C;
        mix(h_res_in + (p * n + i) * n, x, p, n, C, o);
        const T h = h_post_in[p * n + i];
        const T* yp = y + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] += h * yp[c];
      }
    }
    if (r.u != nullptr) read(state, p, n, C, r);
  }
}

}  // namespace

// x: [n, P, C] with C contiguous and the given stream and position strides (in elements).
// Merge when `merged` is not null (y [P, C], h_post_in [P, n], h_res_in [P, n, n], merged
// [n, P, C], all contiguous); read when `u` is not null (phi [n*C, k] or null, alpha [3] or
// null, bias [k]; outputs h_pre, h_post [P, n], h_res [P, k - 2n], u [P, C], contiguous).
// k <= 1024. double_precision: 0 fp32, 1 fp64 (every pointer of that type).
template <typename T>
void run_typed(int64_t n, int64_t P, int64_t C, const void* x, int64_t x_stream,
               int64_t x_position, const void* y, const void* h_post_in, const void* h_res_in,
               void* merged, const void* phi, const void* alpha, const void* bias, int64_t k,
               int64_t iters, double rms_eps, void* h_pre, void* h_post, void* h_res, void* u) {
  Read<T> r{static_cast<const T*>(phi), static_cast<const T*>(alpha),
            static_cast<const T*>(bias),  k, iters, static_cast<T>(rms_eps),
            static_cast<T*>(h_pre),       static_cast<T*>(h_post),
            static_cast<T*>(h_res),       static_cast<T*>(u)};
  run<T>(n, P, C, {static_cast<const T*>(x), x_stream, x_position}, static_cast<const T*>(y),
         static_cast<const T*>(h_post_in), static_cast<const T*>(h_res_in),
         static_cast<T*>(merged), r);
}

extern "C" void kernel(int64_t double_precision, int64_t n, int64_t P, int64_t C, const void* x,
                       int64_t x_stream, int64_t x_position, const void* y,
                       const void* h_post_in, const void* h_res_in, void* merged,
                       const void* phi, const void* alpha, const void* bias, int64_t k,
                       int64_t iters, double rms_eps, void* h_pre, void* h_post, void* h_res,
                       void* u) {
  auto typed = double_precision ? run_typed<double> : run_typed<float>;
  typed(n, P, C, x, x_stream, x_position, y, h_post_in, h_res_in, merged, phi, alpha, bias, k,
        iters, rms_eps, h_pre, h_post, h_res, u);
}
