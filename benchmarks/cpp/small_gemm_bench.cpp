// Times the two small-M products of csrc/lily/cpu_primitives.h on one thread:
// gemm_small (register-tiled column blocks, 32 columns at a time) and
// gemm_stream (B read row by row), over the same C = A @ B in pieces of 256 columns.
//   small_gemm_bench M K N copies repeats  ->  prints "<gemm_small us> <gemm_stream us> <max |diff|>"
// `copies` distinct B matrices are used in turn: 1 keeps B in cache, enough copies to
// exceed the last-level cache make every call read B from memory (decode's bank).
// Driven by benchmarks/bench_small_gemm.py.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "lily/cpu_primitives.h"

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s M K N copies repeats\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atoll(argv[1]), K = std::atoll(argv[2]), N = std::atoll(argv[3]);
  const int64_t copies = std::atoll(argv[4]), repeats = std::atoll(argv[5]);
  constexpr int64_t kPiece = 256, kBlock = lily::cpu::kColBlock<float>;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> dist(-1.f, 1.f);
  std::vector<float> A(M * K), B(copies * K * N), C_small(M * N), C_stream(M * N);
  for (auto& x : A) x = dist(rng);
  for (auto& x : B) x = dist(rng);
  std::vector<double> times[2];
  for (int64_t rep = 0; rep < repeats + 1; ++rep) {
    for (int kernel = 0; kernel < 2; ++kernel) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < copies; ++i) {
        const float* b = B.data() + i * K * N;
        for (int64_t c0 = 0; c0 < N; c0 += kPiece) {
          const int64_t width = std::min(kPiece, N - c0);
          if (kernel == 0) {
            for (int64_t c = 0; c < width; c += kBlock)
              lily::cpu::gemm_small(M, K, std::min(kBlock, width - c), 1.f, A.data(), K, 1, b + c0 + c, N,
                                    C_small.data() + c0 + c, N);
          } else {
            lily::cpu::gemm_stream(M, K, width, 1.f, A.data(), K, 1, b + c0, N, C_stream.data() + c0, N);
          }
        }
      }
      const double us = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() * 1e6;
      if (rep > 0) times[kernel].push_back(us / double(copies));  // the first round warms up
    }
  }
  double diff = 0;
  for (size_t i = 0; i < C_small.size(); ++i) diff = std::max(diff, double(std::fabs(C_small[i] - C_stream[i])));
  for (auto& t : times) std::sort(t.begin(), t.end());
  std::printf("%.2f %.2f %g\n", times[0][times[0].size() / 2], times[1][times[1].size() / 2], diff);
  return 0;
}
