// Checks the routing and bank primitives of csrc/lily/cpu_primitives.h, whose loops
// are compiled once per x86-64 level at that level's vector width, against float64:
// router_softmax (and that a row has the same bits alone as in a block of four: token
// routing's "same result alone or in a batch"), combine_bank over a block of rows and
// columns, bank_grad over a split range and accumulating (more experts than its register
// group too), kron_rows_backward. Built and run by tests/test_cpu_gemm.py once
// dispatched and once generic; prints "ok" or the failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check_helpers.h"
#include "lily/cpu_primitives.h"

namespace {

template <typename T>
bool close(const char* what, T got, double want, int64_t terms, int64_t a, int64_t b, int64_t c) {
  if (std::fabs(double(got) - want) <= lily_check::tolerance<T>(terms) * (1.0 + std::fabs(want))) return true;
  std::printf("FAIL: %s %s (%ld, %ld, %ld): %.17g vs %.17g\n", lily_check::type_name<T>(), what, long(a), long(b),
              long(c), double(got), want);
  return false;
}

template <typename T>
bool check_router(int64_t rows, int64_t rank, int64_t experts, std::mt19937& rng) {
  const auto hidden = lily_check::random_vector<T>(rows * rank, rng),
             router = lily_check::random_vector<T>(experts * rank, rng);
  std::vector<T> probs(rows * experts), alone(experts);
  lily::cpu::router_softmax(hidden.data(), rows, rank, router.data(), experts, probs.data());
  for (int64_t n = 0; n < rows; ++n) {
    std::vector<double> logit(experts);
    double top = -INFINITY, total = 0;
    for (int64_t e = 0; e < experts; ++e) {
      for (int64_t i = 0; i < rank; ++i) logit[e] += double(hidden[n * rank + i]) * double(router[e * rank + i]);
      top = std::max(top, logit[e]);
    }
    for (int64_t e = 0; e < experts; ++e) total += std::exp(logit[e] - top);
    lily::cpu::router_softmax(hidden.data() + n * rank, 1, rank, router.data(), experts, alone.data());
    for (int64_t e = 0; e < experts; ++e) {
      if (!close("router_softmax", probs[n * experts + e], std::exp(logit[e] - top) / total, rank, rows, n, e))
        return false;
      if (alone[e] != probs[n * experts + e]) {
        std::printf("FAIL: router_softmax rows=%ld rank=%ld: row %ld alone %.17g, in the block %.17g\n", long(rows),
                    long(rank), long(n), double(alone[e]), double(probs[n * experts + e]));
        return false;
      }
    }
  }
  return true;
}

template <typename T>
bool check_bank_grad(int64_t experts, int64_t plane, std::mt19937& rng) {
  const auto weights = lily_check::random_vector<T>(experts, rng), dcomb = lily_check::random_vector<T>(plane, rng);
  const auto bank = lily_check::random_vector<T>(experts * plane, rng),
             start = lily_check::random_vector<T>(experts * plane, rng);
  for (bool accumulate : {false, true}) {
    std::vector<T> dbank = start, comb(plane), dweights(2 * experts);
    const int64_t split = plane / 3;  // two pieces, as parallel callers split the plane
    lily::cpu::bank_grad(weights.data(), dcomb.data(), bank.data(), experts, plane, 0, split, accumulate, dbank.data(),
                         dweights.data(), comb.data());
    lily::cpu::bank_grad(weights.data(), dcomb.data(), bank.data(), experts, plane, split, plane, accumulate,
                         dbank.data(), dweights.data() + experts, comb.data());
    for (int64_t e = 0; e < experts; ++e) {
      double dw = 0;
      for (int64_t j = 0; j < plane; ++j) {
        dw += double(bank[e * plane + j]) * double(dcomb[j]);
        const double db = (accumulate ? double(start[e * plane + j]) : 0.0) + double(weights[e]) * double(dcomb[j]);
        if (!close("bank_grad dbank", dbank[e * plane + j], db, 1, plane, e, j)) return false;
      }
      if (!close("bank_grad dweights", T(dweights[e] + dweights[experts + e]), dw, plane, plane, e, 0)) return false;
    }
    for (int64_t j = 0; j < plane; ++j) {
      double c = 0;
      for (int64_t e = 0; e < experts; ++e) c += double(weights[e]) * double(bank[e * plane + j]);
      if (!close("bank_grad comb", comb[j], c, experts, plane, j, 0)) return false;
    }
  }
  return true;
}

template <typename T>
bool check_combine(int64_t experts, int64_t rank, int64_t out, std::mt19937& rng) {
  const auto weights = lily_check::random_vector<T>(experts, rng),
             bank = lily_check::random_vector<T>(experts * rank * out, rng);
  // rows [i0, rank) and columns [c0, out) into a destination with a wider stride; the padding stays
  const int64_t i0 = rank / 3, c0 = out / 3, cols = out - c0, ld = cols + 3;
  std::vector<T> dst((rank - i0) * ld, T(-7));
  lily::cpu::combine_bank(weights.data(), bank.data(), experts, rank, out, i0, rank, c0, cols, dst.data(), ld);
  for (int64_t i = i0; i < rank; ++i)
    for (int64_t j = 0; j < ld; ++j) {
      const T got = dst[(i - i0) * ld + j];
      if (j >= cols) {
        if (got != T(-7)) return close("combine_bank padding", got, -7.0, 1, rank, i, j);
        continue;
      }
      double c = 0;
      for (int64_t e = 0; e < experts; ++e) c += double(weights[e]) * double(bank[(e * rank + i) * out + c0 + j]);
      if (!close("combine_bank", got, c, experts, rank, i, j)) return false;
    }
  return true;
}

template <typename T>
bool check_kron_backward(int64_t rows, int64_t experts, int64_t rank, std::mt19937& rng) {
  const auto W = lily_check::random_vector<T>(rows * experts, rng),
             hidden = lily_check::random_vector<T>(rows * rank, rng);
  const auto dZ = lily_check::random_vector<T>(rows * experts * rank, rng);
  std::vector<T> dW(rows * experts), dhidden(rows * rank);
  lily::cpu::kron_rows_backward(W.data(), hidden.data(), dZ.data(), rows, experts, rank, dW.data(), dhidden.data());
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t e = 0; e < experts; ++e) {
      double dw = 0;
      for (int64_t i = 0; i < rank; ++i) dw += double(dZ[(n * experts + e) * rank + i]) * double(hidden[n * rank + i]);
      if (!close("kron_rows_backward dW", dW[n * experts + e], dw, rank, rows, n, e)) return false;
    }
    for (int64_t i = 0; i < rank; ++i) {
      double dh = 0;
      for (int64_t e = 0; e < experts; ++e) dh += double(W[n * experts + e]) * double(dZ[(n * experts + e) * rank + i]);
      if (!close("kron_rows_backward dhidden", dhidden[n * rank + i], dh, experts, rows, n, i)) return false;
    }
  }
  return true;
}

template <typename T>
bool check_all(std::mt19937& rng) {
  for (int64_t rows : {1, 3, 4, 5, 9})
    for (int64_t rank : {1, 7, 16, 33, 129})
      for (int64_t experts : {1, 2, 5}) {
        if (!check_router<T>(rows, rank, experts, rng)) return false;
        if (!check_kron_backward<T>(rows, experts, rank, rng)) return false;
      }
  for (int64_t experts : {1, 4, 5, 9, 17})
    for (int64_t plane : {1, 7, 64, 1023, 3000})
      if (!check_bank_grad<T>(experts, plane, rng)) return false;
  for (int64_t experts : {1, 3, 9})
    for (int64_t rank : {1, 4})
      for (int64_t out : {1, 17, 40, 130})
        if (!check_combine<T>(experts, rank, out, rng)) return false;
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  return lily_check::report(check_all<float>(rng) && check_all<double>(rng));
}
