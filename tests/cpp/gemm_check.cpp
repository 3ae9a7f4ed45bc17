// Checks lily::cpu::blocked_gemm (csrc/lily/cpu_gemm.h) against a float64 triple
// loop: every transpose, alpha/beta (beta == 0 must not read C, which holds NaN),
// ragged edges, strided leading dims, batched calls, and tiles run out of order.
// Built and run by tests/test_cpu_gemm.py; prints "ok <kernel>" or the failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check_helpers.h"
#include "lily/cpu_gemm.h"

namespace {

// Runs the pieces one index at a time, last first: results must not depend on the order.
struct Reversed {
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    for (int64_t i = n - 1; i >= 0; --i) f(i, i + 1);
  }
};

template <typename T>
bool check(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, T beta, int64_t pad, std::mt19937& rng) {
  const int64_t rows_a = ta ? K : M, cols_a = ta ? M : K, rows_b = tb ? N : K, cols_b = tb ? K : N;
  const int64_t lda = cols_a + pad, ldb = cols_b + pad, ldc = N + pad;
  std::vector<T> A(rows_a * lda + 1), B(rows_b * ldb + 1), C(M * ldc + 1);
  lily_check::fill_random(A, rng);
  lily_check::fill_random(B, rng);
  if (beta == T(0))
    std::fill(C.begin(), C.end(), T(NAN));  // beta == 0 must not read C
  else
    lily_check::fill_random(C, rng);
  std::vector<T> C0 = C;
  lily::cpu::blocked_gemm<T>(Reversed{}, ta, tb, M, N, K, alpha, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
  const double tol = lily_check::tolerance<T>(K);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < ldc; ++j) {
      const T got = C[i * ldc + j];
      if (j >= N) {  // padding between rows must be untouched
        if (!(std::isnan(got) && std::isnan(C0[i * ldc + j])) && got != C0[i * ldc + j]) {
          std::printf("FAIL: padding written at (%ld, %ld)\n", long(i), long(j));
          return false;
        }
        continue;
      }
      double want = 0;
      for (int64_t k = 0; k < K; ++k)
        want += double(ta ? A[k * lda + i] : A[i * lda + k]) * double(tb ? B[j * ldb + k] : B[k * ldb + j]);
      want = double(alpha) * want + (beta == T(0) ? 0.0 : double(beta) * double(C0[i * ldc + j]));
      if (!(std::fabs(double(got) - want) <= tol)) {
        std::printf("FAIL: %s ta=%d tb=%d M=%ld N=%ld K=%ld beta=%g at (%ld, %ld): %g vs %g\n",
                    lily_check::type_name<T>(), ta, tb, long(M), long(N), long(K), double(beta), long(i), long(j),
                    double(got), want);
        return false;
      }
    }
  }
  return true;
}

template <typename T>
bool check_batched(std::mt19937& rng) {
  const int64_t batch = 3, M = 70, N = 45, K = 19;
  std::vector<T> A(batch * M * K), B(batch * K * N), C(batch * M * N, T(NAN));
  lily_check::fill_random(A, rng);
  lily_check::fill_random(B, rng);
  lily::cpu::blocked_gemm_batched<T>(Reversed{}, false, false, batch, M, N, K, T(2), A.data(), K, M * K, B.data(), N,
                                     K * N, C.data(), N, M * N);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double want = 0;
        for (int64_t k = 0; k < K; ++k) want += double(A[b * M * K + i * K + k]) * double(B[b * K * N + k * N + j]);
        if (!(std::fabs(2 * want - double(C[b * M * N + i * N + j])) <= 1e-4)) {
          std::printf("FAIL: batched %ld (%ld, %ld)\n", long(b), long(i), long(j));
          return false;
        }
      }
  return true;
}

// Mid-sized products are cut into smaller tiles (gemm_tiling) so that threads get work; each
// element's sum must not depend on its tile: the result is bit-identical to one 192 x 512 grid.
template <typename T>
bool check_tiling(bool ta, bool tb, int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  std::vector<T> A(M * K), B(K * N), C1(M * N), C2(M * N);
  lily_check::fill_random(A, rng);
  lily_check::fill_random(B, rng);
  const int64_t lda = ta ? M : K, ldb = tb ? K : N;
  const lily::cpu::GemmTiling split = lily::cpu::gemm_tiling(M, N, K), coarse;
  const bool smallest = split.rows == lily::cpu::kGemmMinTileRows && split.cols == lily::cpu::kGemmMinTileCols;
  if ((split.count(M, N) < lily::cpu::kGemmMinTiles && !smallest) || split.rows % 12 != 0 || split.cols % 32 != 0) {
    std::printf("FAIL: tiling of %ld x %ld x %ld: %ld tiles of %ld x %ld\n", long(M), long(N), long(K),
                long(split.count(M, N)), long(split.rows), long(split.cols));
    return false;
  }
  lily::cpu::blocked_gemm<T>(Reversed{}, ta, tb, M, N, K, T(0.5), A.data(), lda, B.data(), ldb, T(0), C1.data(), N);
  for (int64_t t = 0; t < coarse.count(M, N); ++t)
    lily::cpu::gemm_tile(t, coarse, ta, tb, M, N, K, T(0.5), A.data(), lda, B.data(), ldb, T(0), C2.data(), N);
  if (std::memcmp(C1.data(), C2.data(), sizeof(T) * C1.size()) != 0) {
    std::printf("FAIL: %ld x %ld x %ld ta=%d tb=%d: split tiles differ in bits from one coarse grid\n", long(M),
                long(N), long(K), ta, tb);
    return false;
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  // (M, N, K): scalars, sub-micro-tile, ragged tiles, more than one K slice, exact tiles.
  const int64_t shapes[][3] = {{1, 1, 1},       {1, 1, 300},    {5, 7, 3},        {13, 33, 17}, {12, 32, 256},
                               {193, 513, 257}, {200, 40, 600}, {384, 1024, 128}, {37, 1030, 9}};
  bool ok = true;
  for (const auto& s : shapes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (double beta : {0.0, 1.0, -0.5}) {
          const int64_t pad = (s[0] + s[1]) % 3;
          ok = ok && check<float>(ta, tb, s[0], s[1], s[2], 0.75f, float(beta), pad, rng);
          ok = ok && check<double>(ta, tb, s[0], s[1], s[2], 0.75, beta, pad, rng);
        }
  // K == 0 and alpha == 0 only scale C.
  ok = ok && check<float>(false, false, 9, 11, 0, 1.0f, 0.5f, 0, rng) &&
       check<float>(false, true, 9, 11, 4, 0.0f, 0.0f, 1, rng);
  ok = ok && check_batched<float>(rng) && check_batched<double>(rng);
  // The adapter's training products (x A^T, dh^T x, ...) and a ragged one, every transpose.
  const int64_t split_shapes[][3] = {{512, 128, 512}, {128, 512, 512}, {100, 70, 400}};
  for (const auto& s : split_shapes)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        ok = ok && check_tiling<float>(ta, tb, s[0], s[1], s[2], rng) &&
             check_tiling<double>(ta, tb, s[0], s[1], s[2], rng);
  return lily_check::report(ok, lily::cpu::gemm_kernel_name());
}
