// Times lily::cpu::blocked_gemm (csrc/lily/cpu_gemm.h) on one thread.
//   gemm_bench M N K trans_a trans_b repeats  ->  prints "<kernel> <median seconds>"
// Driven by benchmarks/bench_gemm.py, which compares it with torch.mm (MKL) on one thread.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "lily/cpu_gemm.h"

struct Serial {
  template <class F>
  void parallel_for(int64_t n, const F& f) const {
    if (n > 0) f(0, n);
  }
};

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s M N K trans_a trans_b repeats\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[1]), N = std::atoll(argv[2]), K = std::atoll(argv[3]);
  const bool ta = std::atoi(argv[4]), tb = std::atoi(argv[5]);
  const int repeats = std::atoi(argv[6]);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> A(M * K), B(K * N), C(M * N);
  for (auto& x : A) x = dist(rng);
  for (auto& x : B) x = dist(rng);
  std::vector<double> times;
  for (int i = 0; i < repeats + 2; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    lily::cpu::blocked_gemm<float>(Serial{}, ta, tb, M, N, K, 1.f, A.data(), ta ? M : K, B.data(), tb ? K : N, 0.f,
                                   C.data(), N);
    if (i >= 2) times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  std::printf("%s %.9f\n", lily::cpu::gemm_kernel_name(), times[times.size() / 2]);
  return 0;
}
