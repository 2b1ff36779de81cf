// The stream ops on CPU: the kernels of `hcpass::pre`, `hcpass::post_res` and their backward
// for CPU tensors. `hcpass.ops.reference` is the math they compute and `hcpass.ops.batched`
// the PyTorch fallback where this file cannot be built (tests/ops/test_ops.py compares all
// three); built by `hcpass.native`.
//
// Per position p (states X[i] and gradients G[i] are rows of C channels; <a, b> sums over C):
//   pre:                u         = sum_i H_pre[i] X[i]
//   pre_backward:       dX[i]     = H_pre[i] g,              dH_pre[i] = <X[i], g>
//   post_res:           X'[i]     = sum_j H_res[i, j] X[j] + H_post[i] y
//   post_res_backward:  dX[j]     = sum_i H_res[i, j] G[i],  dy = sum_i H_post[i] G[i],
//                       dH_post[i] = <G[i], y>,             dH_res[i, j] = <G[i], X[j]>
//
// One pass over the positions, each read once: a position's n rows (n * C values, a few KB)
// stay in L1 while every output of that position is written, where the PyTorch fallback
// makes one pass over the whole state per product. Positions are split over `threads`
// OpenMP threads; the loops over C are written for the compiler to vectorise. Sums run in
// the reference's order (j = 0 .. n - 1, then the H_post term), in T (fp32 or fp64).
//
// Layout: a state argument is [n, P, C] with C contiguous and the given stream and position
// strides (in elements: a chain's first site reads its input expanded to n streams, stream
// stride 0); y, g, every output and every coefficient are contiguous.

// Inductor builds with -fno-tree-loop-vectorize (its own kernels vectorise explicitly).
#pragma GCC optimize("tree-loop-vectorize")

#include <cstdint>

namespace {

// Rows of a state: row(i, p) is stream i at position p.
template <typename T>
struct State {
  const T* data;
  int64_t stream_stride, position_stride;
  const T* row(int64_t i, int64_t p) const { return data + i * stream_stride + p * position_stride; }
};

template <typename T>
T dot(const T* a, const T* b, int64_t C) {
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += a[c] * b[c];
  return sum;
}

// out = sum_j w[j * step] * rows[j], rows[j] = state.row(j, p)
template <typename T>
void mix(const T* w, int64_t step, State<T> state, int64_t p, int64_t n, int64_t C, T* out) {
  const T* first = state.row(0, p);
  const T w0 = w[0];
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = w0 * first[c];
  for (int64_t j = 1; j < n; ++j) {
    const T* r = state.row(j, p);
    const T wj = w[j * step];
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += wj * r[c];
  }
}

template <typename T>
void pre(State<T> x, const T* h_pre, T* u, int64_t n, int64_t P, int64_t C, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < P; ++p) mix(h_pre + p * n, 1, x, p, n, C, u + p * C);
}

template <typename T>
void pre_backward(const T* g, State<T> x, const T* h_pre, T* dx, T* dh_pre, int64_t n, int64_t P,
                  int64_t C, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    const T* gp = g + p * C;
    for (int64_t i = 0; i < n; ++i) {
      const T h = h_pre[p * n + i];
      T* out = dx + (i * P + p) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) out[c] = h * gp[c];
      dh_pre[p * n + i] = dot(x.row(i, p), gp, C);
    }
  }
}

template <typename T>
void post_res(State<T> x, const T* y, const T* h_post, const T* h_res, T* out, int64_t n,
              int64_t P, int64_t C, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    const T* yp = y + p * C;
    for (int64_t i = 0; i < n; ++i) {
      T* o = out + (i * P + p) * C;
      mix(h_res + (p * n + i) * n, 1, x, p, n, C, o);
      const T h = h_post[p * n + i];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] += h * yp[c];
    }
  }
}

template <typename T>
void post_res_backward(State<T> g, State<T> x, const T* y, const T* h_post, const T* h_res, T* dx,
                       T* dy, T* dh_post, T* dh_res, int64_t n, int64_t P, int64_t C,
                       int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < P; ++p) {
    const T* yp = y + p * C;
    const T* res = h_res + p * n * n;
    for (int64_t j = 0; j < n; ++j) mix(res + j, n, g, p, n, C, dx + (j * P + p) * C);
    mix(h_post + p * n, 1, g, p, n, C, dy + p * C);
    for (int64_t i = 0; i < n; ++i) {
      const T* gi = g.row(i, p);
      dh_post[p * n + i] = dot(gi, yp, C);
      for (int64_t j = 0; j < n; ++j) dh_res[(p * n + i) * n + j] = dot(gi, x.row(j, p), C);
    }
  }
}

template <typename T>
void run(int64_t op, int64_t n, int64_t P, int64_t C, int64_t threads, State<T> a, State<T> b,
         const void* y, const void* h, const void* h_res, void* out0, void* out1, void* out2,
         void* out3) {
  auto ty = static_cast<const T*>(y);
  auto th = static_cast<const T*>(h);
  auto tres = static_cast<const T*>(h_res);
  auto o0 = static_cast<T*>(out0), o1 = static_cast<T*>(out1);
  if (op == 0) pre(a, th, o0, n, P, C, threads);
  else if (op == 1) pre_backward(ty, a, th, o0, o1, n, P, C, threads);
  else if (op == 2) post_res(a, ty, th, tres, o0, n, P, C, threads);
  else post_res_backward(a, b, ty, th, tres, o0, o1, static_cast<T*>(out2), static_cast<T*>(out3),
                         n, P, C, threads);
}

}  // namespace

// op: 0 pre (a = X, h = H_pre), 1 pre_backward (y = g, a = X, h = H_pre), 2 post_res (a = X,
// y, h = H_post, h_res), 3 post_res_backward (a = G, b = X, y, h = H_post, h_res); outputs in
// the order the op returns them. A state is (pointer, stream stride, position stride); an
// argument the op does not read may be null. double_precision: 0 fp32, 1 fp64.
extern "C" void kernel(int64_t op, int64_t double_precision, int64_t n, int64_t P, int64_t C,
                       int64_t threads, const void* a, int64_t a_stream, int64_t a_position,
                       const void* b, int64_t b_stream, int64_t b_position, const void* y,
                       const void* h, const void* h_res, void* out0, void* out1, void* out2,
                       void* out3) {
  if (double_precision)
    run<double>(op, n, P, C, threads, {static_cast<const double*>(a), a_stream, a_position},
                {static_cast<const double*>(b), b_stream, b_position}, y, h, h_res, out0, out1,
                out2, out3);
  else
    run<float>(op, n, P, C, threads, {static_cast<const float*>(a), a_stream, a_position},
               {static_cast<const float*>(b), b_stream, b_position}, y, h, h_res, out0, out1,
               out2, out3);
}
