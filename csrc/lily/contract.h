// The routed_mix op contract, shared by the PyTorch op, the ONNX node and the
// ONNX Runtime kernels. Framework-free: plain C++17, no torch, no ORT.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lily {

enum class Mode { kBatch, kSequence, kToken, kStatic, kCausal };

inline bool parse_mode(const std::string& name, Mode* mode) {
  if (name == "batch") {
    *mode = Mode::kBatch;
    return true;
  }
  if (name == "sequence") {
    *mode = Mode::kSequence;
    return true;
  }
  if (name == "token") {
    *mode = Mode::kToken;
    return true;
  }
  if (name == "static") {
    *mode = Mode::kStatic;
    return true;
  }
  if (name == "causal") {
    *mode = Mode::kCausal;
    return true;
  }
  return false;
}

// The contract's message for a mode name that parse_mode rejects.
inline std::string bad_mode_message(const std::string& name) {
  return "mode: expected one of 'batch', 'sequence', 'token', 'static', 'causal', got '" + name + "'";
}

inline const char* mode_name(Mode mode) {
  switch (mode) {
    case Mode::kBatch:
      return "batch";
    case Mode::kSequence:
      return "sequence";
    case Mode::kToken:
      return "token";
    case Mode::kStatic:
      return "static";
    case Mode::kCausal:
      return "causal";
  }
  return "?";
}

// Sizes of one call. Rows are the flattened leading dims of `hidden`; a
// routing group is the set of rows that share one mixing-weight vector.
struct MixShape {
  Mode mode = Mode::kBatch;
  int64_t rows = 0;        // N
  int64_t rank = 0;        // r
  int64_t experts = 0;     // E
  int64_t out = 0;         // output features
  int64_t groups = 0;      // 1 (batch, static), S (sequence, causal), N (token)
  int64_t group_rows = 0;  // N (batch, static), L (sequence, causal), 1 (token)
};

// Modes whose samples are [..., L, r] slices of hidden and that take a mask.
inline bool routes_per_sample(Mode mode) { return mode == Mode::kSequence || mode == Mode::kCausal; }

// Rows whose weights are per-row (token and causal modes, or sequence samples
// of one token) are mixed as (W_n kron h_n) Bk_flat; the others through one
// combined bank Bc_g per group. Causal weights are the running mean of the
// sample's unmasked router probabilities up to the row: one vector per row.
inline bool mixes_per_row(const MixShape& s) {
  return s.mode == Mode::kToken || s.mode == Mode::kCausal || (s.mode == Mode::kSequence && s.group_rows == 1);
}

inline std::string dims_str(const std::vector<int64_t>& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

// Checks the shapes of one call against the contract. Returns "" and fills
// `shape` when they agree, else a message naming the first bad argument.
// `mask` is null when no mask is given.
inline std::string check_shapes(const std::string& mode_str, const std::vector<int64_t>& hidden,
                                const std::vector<int64_t>& router, const std::vector<int64_t>& bank,
                                const std::vector<int64_t>* mask, MixShape* shape) {
  MixShape s;
  if (!parse_mode(mode_str, &s.mode)) return bad_mode_message(mode_str);
  if (bank.size() != 3) return "bank: expected a 3-D tensor [E, r, out], got shape " + dims_str(bank);
  s.experts = bank[0];
  s.rank = bank[1];
  s.out = bank[2];
  if (s.experts < 1 || s.rank < 1 || s.out < 1)
    return "bank: every dim of [E, r, out] must be >= 1, got shape " + dims_str(bank);
  if (hidden.empty()) return "hidden: expected a tensor [..., r] with at least 1 dim, got a 0-dim tensor";
  if (hidden.back() != s.rank)
    return "hidden: last dim must equal bank's r = " + std::to_string(s.rank) + ", got shape " + dims_str(hidden);
  if (s.mode == Mode::kStatic) {
    if (router.size() != 1 || router[0] != s.experts)
      return "router: static mode expects theta of shape [E] = [" + std::to_string(s.experts) + "], got shape " +
             dims_str(router);
  } else {
    if (s.experts < 2)
      return std::string("bank: mode '") + mode_name(s.mode) +
             "' routes between experts and needs num_B = E >= 2, got E = 1";
    if (router.size() != 2 || router[0] != s.experts || router[1] != s.rank)
      return "router: expected shape [E, r] = [" + std::to_string(s.experts) + ", " + std::to_string(s.rank) +
             "], got shape " + dims_str(router);
  }
  s.rows = 1;
  for (size_t i = 0; i + 1 < hidden.size(); ++i) {
    if (hidden[i] < 0) return "hidden: negative dim in shape " + dims_str(hidden);
    s.rows *= hidden[i];
  }
  switch (s.mode) {
    case Mode::kBatch:
    case Mode::kStatic:
      s.groups = 1;
      s.group_rows = s.rows;
      break;
    case Mode::kToken:
      s.groups = s.rows;
      s.group_rows = 1;
      break;
    case Mode::kSequence:
    case Mode::kCausal:
      // [..., L, r]: one sample per leading index, L tokens each; 1-D and 2-D
      // inputs hold one token per sample.
      s.group_rows = hidden.size() >= 3 ? hidden[hidden.size() - 2] : 1;
      s.groups = s.group_rows == 0 ? 0 : s.rows / s.group_rows;
      break;
  }
  if (mask != nullptr) {
    if (!routes_per_sample(s.mode))
      return std::string("mask: only modes 'sequence' and 'causal' take a mask, got mode '") + mode_name(s.mode) + "'";
    const std::vector<int64_t> expected(hidden.begin(), hidden.end() - 1);
    if (*mask != expected)
      return "mask: expected shape " + dims_str(expected) + " (hidden's shape without r), got " + dims_str(*mask);
  }
  *shape = s;
  return "";
}

}  // namespace lily
