// Sinkhorn-Knopp on CPU: the kernels of `hcpass::sinkhorn` and `hcpass::sinkhorn_backward`
// for CPU tensors. `sinkhorn` and `sinkhorn_vjp` in sinkhorn.py are the PyTorch reference
// (tests/manifolds/test_sinkhorn_cpu.py compares the two); built by `hcpass.manifolds._cpp`.
//
// Per position, the n x n logits L:
//   m_0 = exp(L - max L)
//   step s = 0 .. 2 iters - 1, along axis a = s % 2 (0: column sums, 1: row sums):
//     t_s = sums of m_s along a;  m_{s+1} = m_s / max(t_s, eps), broadcast along a
//   H = m_{2 iters}
// Backward in the log domain, given G = dLoss/dH: U = dLoss/d(log m) starts at G * H and,
// for s from the last step down,
//     share = sums of U along a, taken as 0 where t_s < eps (the clamp is active)
//     U = U - m_{s+1} * share, broadcast along a
//   dLoss/dL = U (the max subtracted gets no gradient: the map is shift invariant).
// No division: U stays bounded however small the sums (dLoss/dm = U / m would overflow).
//
// Positions go in blocks of kBlock, each block's matrices entry-major ([n * n][kBlock]), so
// every inner loop runs over positions, in SIMD lanes. The backward keeps every step's
// matrix of its block (2 iters + 1 of them, a few hundred KB at most for n = 4) rather than
// recompute them. Each division by max(t, eps) is a multiplication by its reciprocal (n
// divisions per position and step, not n^2): within an ulp of the reference's division.

// Inductor builds with -fno-tree-loop-vectorize (its own kernels vectorise explicitly);
// these loops are written for the compiler to vectorise.
#pragma GCC optimize("tree-loop-vectorize")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;
template <typename T>
constexpr T kEps = T(1e-30);  // the reference's floor of a sum (_EPS)

// Block `m` = exp(logits - max) of positions p0 .. p0 + len; the max propagates NaN as
// torch.amax does. Positions past the end read 1 (never stored).
template <typename T>
void load_exp(const T* logits, int64_t p0, int64_t len, int64_t nn, T* m) {
  for (int64_t b = 0; b < kBlock; ++b) {
    if (b >= len) {
      for (int64_t k = 0; k < nn; ++k) m[k * kBlock + b] = T(1);
      continue;
    }
    const T* l = logits + (p0 + b) * nn;
    T top = l[0];
    for (int64_t k = 1; k < nn; ++k) top = (l[k] > top || std::isnan(l[k])) ? l[k] : top;
    for (int64_t k = 0; k < nn; ++k) m[k * kBlock + b] = std::exp(l[k] - top);
  }
}

template <typename T>
void load(const T* x, int64_t p0, int64_t len, int64_t nn, T* block) {
  for (int64_t b = 0; b < kBlock; ++b)
    for (int64_t k = 0; k < nn; ++k) block[k * kBlock + b] = b < len ? x[(p0 + b) * nn + k] : T(0);
}

template <typename T>
void store(const T* block, int64_t p0, int64_t len, int64_t nn, T* out) {
  for (int64_t b = 0; b < len; ++b)
    for (int64_t k = 0; k < nn; ++k) out[(p0 + b) * nn + k] = block[k * kBlock + b];
}

// Entry (i, j) reduces into, and is scaled by, sum (axis == 0 ? j : i).
inline int64_t sum_index(int64_t i, int64_t j, int axis) { return axis == 0 ? j : i; }

// total = sums of m along axis; out = m / max(total, eps) (out may be m)
template <typename T>
void normalise(const T* m, int64_t n, int axis, T* total, T* inverse, T* out) {
  std::fill(total, total + n * kBlock, T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T* t = total + sum_index(i, j, axis) * kBlock;
      const T* e = m + (i * n + j) * kBlock;
#pragma omp simd
      for (int64_t b = 0; b < kBlock; ++b) t[b] += e[b];
    }
#pragma omp simd
  for (int64_t k = 0; k < n * kBlock; ++k) inverse[k] = T(1) / std::max(total[k], kEps<T>);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T* r = inverse + sum_index(i, j, axis) * kBlock;
      const T* e = m + (i * n + j) * kBlock;
      T* o = out + (i * n + j) * kBlock;
#pragma omp simd
      for (int64_t b = 0; b < kBlock; ++b) o[b] = e[b] * r[b];
    }
}

template <typename T>
void forward(const T* logits, T* out, int64_t positions, int64_t n, int64_t iters, int64_t threads) {
  const int64_t nn = n * n, blocks = (positions + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> m(nn * kBlock), total(n * kBlock), inverse(n * kBlock);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t p0 = block * kBlock, len = std::min(kBlock, positions - p0);
      load_exp(logits, p0, len, nn, m.data());
      for (int64_t s = 0; s < 2 * iters; ++s)
        normalise(m.data(), n, s % 2, total.data(), inverse.data(), m.data());
      store(m.data(), p0, len, nn, out);
    }
  }
}

template <typename T>
void backward(const T* logits, const T* grad, T* out, int64_t positions, int64_t n, int64_t iters,
              int64_t threads) {
  const int64_t nn = n * n, steps = 2 * iters, blocks = (positions + kBlock - 1) / kBlock;
  const int64_t matrix = nn * kBlock, sums = n * kBlock;
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> m((steps + 1) * matrix), total(steps * sums), inverse(sums), u(matrix),
        share(sums);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t p0 = block * kBlock, len = std::min(kBlock, positions - p0);
      load_exp(logits, p0, len, nn, m.data());
      for (int64_t s = 0; s < steps; ++s)
        normalise(m.data() + s * matrix, n, s % 2, total.data() + s * sums, inverse.data(),
                  m.data() + (s + 1) * matrix);
      load(grad, p0, len, nn, u.data());
      const T* h = m.data() + steps * matrix;
#pragma omp simd
      for (int64_t k = 0; k < matrix; ++k) u[k] *= h[k];
      for (int64_t s = steps - 1; s >= 0; --s) {
        const int axis = s % 2;
        const T* o = m.data() + (s + 1) * matrix;
        const T* t = total.data() + s * sums;
        std::fill(share.begin(), share.end(), T(0));
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) {
            T* sh = share.data() + sum_index(i, j, axis) * kBlock;
            const T* ue = u.data() + (i * n + j) * kBlock;
#pragma omp simd
            for (int64_t b = 0; b < kBlock; ++b) sh[b] += ue[b];
          }
#pragma omp simd
        for (int64_t k = 0; k < sums; ++k) share[k] = t[k] >= kEps<T> ? share[k] : T(0);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) {
            const T* sh = share.data() + sum_index(i, j, axis) * kBlock;
            const T* oe = o + (i * n + j) * kBlock;
            T* ue = u.data() + (i * n + j) * kBlock;
#pragma omp simd
            for (int64_t b = 0; b < kBlock; ++b) ue[b] -= oe[b] * sh[b];
          }
      }
      store(u.data(), p0, len, nn, out);
    }
  }
}

template <typename T>
void run(const void* logits, const void* grad, void* out, int64_t positions, int64_t n,
         int64_t iters, int64_t threads, int64_t kind) {
  auto l = static_cast<const T*>(logits);
  auto o = static_cast<T*>(out);
  if (kind == 0) forward(l, o, positions, n, iters, threads);
  else backward(l, static_cast<const T*>(grad), o, positions, n, iters, threads);
}

}  // namespace

// `logits` and `grad` are [positions, n, n] and contiguous, `out` likewise; `grad` is read
// only by the backward. kind: 0 forward, 1 backward; double_precision: 0 fp32, 1 fp64.
extern "C" void kernel(const void* logits, const void* grad, void* out, int64_t positions, int64_t n,
            int64_t iters, int64_t threads, int64_t kind, int64_t double_precision) {
  if (double_precision) run<double>(logits, grad, out, positions, n, iters, threads, kind);
  else run<float>(logits, grad, out, positions, n, iters, threads, kind);
}
