// Checks the small-N products of csrc/lily/cpu_primitives.h: gemm_stream against a
// float64 triple loop (ragged columns, K not a multiple of 4, A transposed, strided
// B and C, padding left untouched) and bitwise against gemm_small, which sums each
// element over k in the same order (so the two may be swapped without changing a
// result); gemm_small_nt against float64 and bitwise between a row alone and the same
// row in a block of M (the 8-row, 4-row and single-row tiles sum every element in one
// order). Built and run by tests/test_cpu_gemm.py; prints "ok" or the failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check_helpers.h"
#include "lily/cpu_primitives.h"

namespace {

template <typename T>
bool check(int64_t M, int64_t K, int64_t cols, bool trans_a, std::mt19937& rng) {
  const int64_t pad = 3, ldb = cols + pad, ldc = cols + pad;
  const int64_t a_row = trans_a ? 1 : K, a_col = trans_a ? M : 1;
  std::vector<T> A(M * K), B(K * ldb), C_stream(M * ldc, T(NAN)), C_small(M * ldc, T(NAN));
  lily_check::fill_random(A, rng);
  lily_check::fill_random(B, rng);
  const T alpha = T(0.75);
  lily::cpu::gemm_stream(M, K, cols, alpha, A.data(), a_row, a_col, B.data(), ldb, C_stream.data(), ldc);
  constexpr int64_t kBlock = lily::cpu::kColBlock<T>;
  for (int64_t c = 0; c < cols; c += kBlock)
    lily::cpu::gemm_small(M, K, std::min(kBlock, cols - c), alpha, A.data(), a_row, a_col, B.data() + c, ldb,
                          C_small.data() + c, ldc);
  const double tol = lily_check::tolerance<T>(K);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < ldc; ++j) {
      const T got = C_stream[i * ldc + j];
      if (j >= cols) {  // padding between rows must be untouched
        if (!std::isnan(got)) {
          std::printf("FAIL: padding written at (%ld, %ld)\n", long(i), long(j));
          return false;
        }
        continue;
      }
      double want = 0;
      for (int64_t k = 0; k < K; ++k) want += double(A[i * a_row + k * a_col]) * double(B[k * ldb + j]);
      want *= double(alpha);
      if (!(std::fabs(double(got) - want) <= tol)) {
        std::printf("FAIL: %s M=%ld K=%ld cols=%ld trans_a=%d at (%ld, %ld): %g vs %g\n", lily_check::type_name<T>(),
                    long(M), long(K), long(cols), int(trans_a), long(i), long(j), double(got), want);
        return false;
      }
      if (got != C_small[i * ldc + j]) {
        std::printf("FAIL: %s M=%ld K=%ld cols=%ld trans_a=%d at (%ld, %ld): gemm_stream %.17g, gemm_small %.17g\n",
                    lily_check::type_name<T>(), long(M), long(K), long(cols), int(trans_a), long(i), long(j),
                    double(got), double(C_small[i * ldc + j]));
        return false;
      }
    }
  return true;
}

// C[M, N] = alpha * A[M, K] @ B[N, K]^T with padded rows (lda, ldb, ldc > their extents).
template <typename T>
bool check_nt(int64_t M, int64_t N, int64_t K, std::mt19937& rng) {
  const int64_t lda = K + 1, ldb = K + 2, ldc = N + 3;
  std::vector<T> A(M * lda), B(N * ldb), C(M * ldc, T(NAN)), row(ldc, T(NAN));
  lily_check::fill_random(A, rng);
  lily_check::fill_random(B, rng);
  const T alpha = T(-0.5);
  lily::cpu::gemm_small_nt(M, N, K, alpha, A.data(), lda, B.data(), ldb, C.data(), ldc);
  const double tol = lily_check::tolerance<T>(K);
  for (int64_t i = 0; i < M; ++i) {
    lily::cpu::gemm_small_nt(1, N, K, alpha, A.data() + i * lda, lda, B.data(), ldb, row.data(), ldc);
    for (int64_t j = 0; j < ldc; ++j) {
      const T got = C[i * ldc + j];
      if (j >= N) {
        if (!std::isnan(got)) {
          std::printf("FAIL: gemm_small_nt wrote padding at (%ld, %ld)\n", long(i), long(j));
          return false;
        }
        continue;
      }
      double want = 0;
      for (int64_t k = 0; k < K; ++k) want += double(A[i * lda + k]) * double(B[j * ldb + k]);
      want *= double(alpha);
      if (!(std::fabs(double(got) - want) <= tol) || got != row[j]) {
        std::printf("FAIL: gemm_small_nt %s M=%ld N=%ld K=%ld at (%ld, %ld): %.17g, alone %.17g, float64 %.17g\n",
                    lily_check::type_name<T>(), long(M), long(N), long(K), long(i), long(j), double(got),
                    double(row[j]), want);
        return false;
      }
    }
  }
  return true;
}

template <typename T>
bool check_all(std::mt19937& rng) {
  for (int64_t M : {1, 2, 3, 4, 5, 8, 9})
    for (int64_t K : {0, 1, 3, 4, 7, 48, 129})
      for (int64_t cols : {1, 5, 16, 17, 33, 100, 260})
        for (bool trans_a : {false, true})
          if (!check<T>(M, K, cols, trans_a, rng)) return false;
  for (int64_t M : {1, 2, 3, 4, 6, 7, 8, 9, 12, 16, 17})
    for (int64_t N : {1, 2, 3, 5, 8})
      for (int64_t K : {0, 1, 15, 16, 17, 64, 129})
        if (!check_nt<T>(M, N, K, rng)) return false;
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  return lily_check::report(check_all<float>(rng) && check_all<double>(rng));
}
