// A = Q Q^T for a short, wide Q [b, K] (SP's Gram matrices): only the blocks
// on and above the diagonal are computed (about half a GEMM's flops), the
// rest mirrored. csrc/gemm.cpp times it against one GEMM per shape and keeps
// the faster.
//
// Q's rows are taken R at a time (R x R block pairs bi <= bj, R = 4 on
// AVX-512, 3 on AVX2 and below so the R*R accumulators, R row vectors and one
// more fit the vector registers); each block pair keeps R*R vector
// accumulators whose lanes run along K. K is walked in chunks small enough
// that a block's R rows of a chunk stay in L1 while the other blocks stream
// past; between chunks the accumulators live in a per-pair buffer, and after
// the last chunk each one's lanes are summed in double, in lane order.
// Threads split the block pairs (each pair is one thread's, whatever the
// thread count, so the result does not depend on it). Rows past b in the last
// block repeat row b - 1; their sums are dropped.
#include <vector>

#include "common.h"

namespace kdk {
inline namespace CPU_CAPABILITY {
namespace {

#if defined(CPU_CAPABILITY_AVX512)
constexpr int R = 4;
#else
constexpr int R = 3;
#endif

template <typename T>
void gram_t(const T* q, int64_t ld, int64_t b, int64_t K, T* A) {
  using V = Vectorized<T>;
  constexpr int64_t L = V::size();
  const int64_t kc = std::max<int64_t>(L, (int64_t(4096) / static_cast<int64_t>(sizeof(T))) / L * L);  // 16 KiB
  const int64_t nb = (b + R - 1) / R;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t bi = 0; bi < nb; ++bi) {
    for (int64_t bj = bi; bj < nb; ++bj) pairs.emplace_back(bi, bj);
  }
  const int64_t np = static_cast<int64_t>(pairs.size());
  const int64_t nchunks = std::max<int64_t>(1, (K + kc - 1) / kc);
  // accumulators between chunks: R*R vectors per pair
  std::vector<T> saved(nchunks > 1 ? static_cast<size_t>(np) * R * R * L : 0);
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t k0 = c * kc, k1 = std::min(K, k0 + kc);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i0 = pairs[p].first * R, j0 = pairs[p].second * R;
        const T* qi[R];
        const T* qj[R];
        for (int r = 0; r < R; ++r) {
          qi[r] = q + std::min(i0 + r, b - 1) * ld;
          qj[r] = q + std::min(j0 + r, b - 1) * ld;
        }
        T* buf = saved.empty() ? nullptr : saved.data() + static_cast<size_t>(p) * R * R * L;
        V acc[R][R];
        for (int r = 0; r < R; ++r) {
          for (int s = 0; s < R; ++s) acc[r][s] = c == 0 ? V(T(0)) : V::loadu(buf + (r * R + s) * L);
        }
        int64_t k = k0;
        for (; k + L <= k1; k += L) {
          V vi[R];
          for (int r = 0; r < R; ++r) vi[r] = V::loadu(qi[r] + k);
          for (int s = 0; s < R; ++s) {
            const V vj = V::loadu(qj[s] + k);
            for (int r = 0; r < R; ++r) acc[r][s] = at::vec::fmadd(vi[r], vj, acc[r][s]);
          }
        }
        if (k < k1) {  // the last partial vector of K (loadu with a count fills the rest with 0)
          const int64_t n = k1 - k;
          V vi[R];
          for (int r = 0; r < R; ++r) vi[r] = V::loadu(qi[r] + k, n);
          for (int s = 0; s < R; ++s) {
            const V vj = V::loadu(qj[s] + k, n);
            for (int r = 0; r < R; ++r) acc[r][s] = at::vec::fmadd(vi[r], vj, acc[r][s]);
          }
        }
        if (c + 1 < nchunks) {
          for (int r = 0; r < R; ++r) {
            for (int s = 0; s < R; ++s) acc[r][s].store(buf + (r * R + s) * L);
          }
          continue;
        }
        for (int r = 0; r < R && i0 + r < b; ++r) {
          for (int s = 0; s < R && j0 + s < b; ++s) {
            double sum = 0.0;
            add_lanes(sum, acc[r][s]);
            A[(i0 + r) * b + j0 + s] = A[(j0 + s) * b + i0 + r] = static_cast<T>(sum);
          }
        }
      }
    }
  });
}

}  // namespace

void gram(Dtype acc, const void* q, int64_t ld, int64_t b, int64_t K, void* A) {
  with_acc(acc, [&](auto tag) {
    using T = decltype(tag);
    gram_t<T>(static_cast<const T*>(q), ld, b, K, static_cast<T*>(A));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace kdk
