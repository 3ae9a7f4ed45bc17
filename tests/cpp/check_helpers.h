// Shared by the C++ checks (tests/cpp/*_check.cpp): inputs drawn uniformly from [-1, 1), the
// tolerance against a float64 reference, and the "ok" line tests/test_cpu_gemm.py looks for.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace lily_check {

template <typename T>
const char* type_name() {
  return sizeof(T) == 4 ? "float" : "double";
}

// A float32 / float64 sum of `terms` products against its float64 value.
template <typename T>
double tolerance(int64_t terms) {
  return (sizeof(T) == 4 ? 1e-5 : 1e-13) * (1.0 + std::sqrt(double(terms)));
}

template <typename T>
void fill_random(std::vector<T>& v, std::mt19937& rng) {
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  for (auto& x : v) x = T(dist(rng));
}

template <typename T>
std::vector<T> random_vector(int64_t n, std::mt19937& rng) {
  std::vector<T> v(n);
  fill_random(v, rng);
  return v;
}

// The program's exit: prints "ok" (and `detail`) when every check passed.
inline int report(bool passed, const char* detail = nullptr) {
  if (!passed) return 1;
  std::printf(detail ? "ok %s\n" : "ok\n", detail);
  return 0;
}

}  // namespace lily_check
