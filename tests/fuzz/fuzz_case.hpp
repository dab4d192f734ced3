#pragma once
// One fuzz case: a random attention call (shapes, strides, positions, masks, policies and their
// parameters, thread counts, special values), valid or deliberately invalid, run through the
// fused and the reference kernels, forward and backward. The contract it checks:
//   invalid input -> std::invalid_argument from every entry point concerned, nothing else;
//   valid input   -> fused == reference (NaN where the reference is NaN, O and lse exactly so);
//   never a crash or a sanitizer report (run it under ASan + UBSan).
// Shared by the seeded Catch2 driver (test_fuzz.cpp) and the libFuzzer target (libfuzzer.cpp).

#include "kernel_harness.hpp"

#include <relbias/relbias.hpp>

#include <climits>
#include <cstdint>
#include <cstring>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

namespace relbias_fuzz {

using relbias::index_t;
using relbias::masking;

/// Decisions come from the fuzzer's bytes while they last, then from a stream seeded by them.
class source {
 public:
  explicit source(std::uint64_t seed) : rng_(seed) {}
  explicit source(std::span<const std::uint8_t> bytes) : bytes_(bytes), rng_(relbias::detail::fnv1a64(bytes.data(), bytes.size())) {}

  std::uint64_t next() {
    if (used_ + 2 <= bytes_.size()) {  // two bytes per decision: short inputs still steer the shape
      const std::uint64_t v = std::uint64_t(bytes_[used_]) | std::uint64_t(bytes_[used_ + 1]) << 8;
      used_ += 2;
      return v ^ (rng_.next() & ~std::uint64_t(0xffff));
    }
    return rng_.next();
  }
  /// Uniform in [lo, hi].
  index_t pick(index_t lo, index_t hi) { return lo + index_t(next() % std::uint64_t(hi - lo + 1)); }
  bool one_in(int n) { return next() % std::uint64_t(n) == 0; }
  double uniform(double lo, double hi) { return lo + (hi - lo) * double(next() >> 11) * 0x1.0p-53; }

 private:
  std::span<const std::uint8_t> bytes_;
  std::size_t used_ = 0;
  relbias::detail::random_stream rng_;
};

/// What went wrong, or empty.
using verdict = std::string;

/// A [batch, seq, heads, dim] view over its own storage with padded strides, in bshd or bhsd order
/// (or a zero batch stride: every batch the same memory, legal for inputs).
template <class S>
struct strided {
  std::vector<S> storage;
  relbias::tensor_view<S> view;

  strided(source& src, index_t b, index_t l, index_t h, index_t d, bool may_broadcast) {
    const index_t pad1 = src.one_in(3) ? src.pick(1, 3) : 0, pad2 = src.one_in(3) ? src.pick(1, 3) : 0;
    relbias::tensor_view<S> v{nullptr, b, l, h, d, 0, 0, 0};
    if (src.one_in(2)) {  // bshd
      v.head_stride = d + pad1;
      v.seq_stride = h * v.head_stride + pad2;
      v.batch_stride = l * v.seq_stride;
    } else {  // bhsd
      v.seq_stride = d + pad1;
      v.head_stride = l * v.seq_stride + pad2;
      v.batch_stride = h * v.head_stride;
    }
    if (may_broadcast && b > 1 && src.one_in(8)) v.batch_stride = 0;
    storage.resize(std::size_t((b - 1) * v.batch_stride + (l - 1) * v.seq_stride + (h - 1) * v.head_stride + d));
    v.data = storage.data();
    view = v;
  }

  void fill(source& src, double amplitude) {
    for (S& x : storage) x = S(src.uniform(-amplitude, amplitude));
  }
};

/// A user policy without fast paths that hides some keys with -inf (every key of some rows).
template <class S>
struct hiding_bias {
  using scalar_type = S;
  index_t heads;
  std::uint64_t pattern;
  index_t num_heads() const { return heads; }
  S operator()(index_t h, index_t i, index_t j) const {
    // Unsigned: positions reach 2^62, where i * 7 overflows a signed index.
    const std::uint64_t cell = (std::uint64_t(i) * 7 + std::uint64_t(j) * 13 + std::uint64_t(h)) ^ pattern;
    if ((pattern & 3) == 0 && (j % 300) < 260) return -std::numeric_limits<S>::infinity();  // whole key tiles
    if (cell % 5 == 0) return -std::numeric_limits<S>::infinity();
    return S(0.5) * S(int(cell % 17) - 8) / S(8);
  }
};

/// Shift-invariant: ALiBi inside a window, -inf outside (the fused offset-table path).
template <class S>
struct window_bias {
  using scalar_type = S;
  static constexpr bool is_shift_invariant = true;
  index_t heads, window;
  index_t num_heads() const { return heads; }
  S at_offset(index_t h, index_t delta) const {
    return delta < -window || delta > window ? -std::numeric_limits<S>::infinity() : -S(0.25) * S(h + 1) * S(delta < 0 ? -delta : delta);
  }
  S operator()(index_t h, index_t i, index_t j) const { return at_offset(h, i - j); }
};

/// Everything about one call that is not a tensor.
template <class S>
struct call {
  relbias::attention_options<S> options;
  bool invalid_forward = false, invalid_backward = false;  // what the case expects
  bool special_values = false;                             // NaN / inf / huge values injected
  std::string what;                                        // the mutation, for the report
};

template <class Bias, class S = typename Bias::scalar_type>
verdict run_policy(source& src, const Bias& bias, index_t batch, index_t lq, index_t lk, index_t hk, index_t dim, index_t dim_v,
                   call<S> c) {
  const index_t hq = bias.num_heads();
  strided<S> q(src, batch, lq, hq, dim, false), k(src, batch, lk, hk, dim, true), v(src, batch, lk, hk, dim_v, true),
      d_out(src, batch, lq, hq, dim_v, false);
  const double amplitude = src.one_in(4) ? 4.0 : 1.0;
  for (strided<S>* t : {&q, &k, &v, &d_out}) t->fill(src, amplitude);
  if (src.one_in(8)) {  // special values in q or k (the keys' or queries' rows that see them turn NaN or vanish)
    c.special_values = true;
    const S huge = std::is_same_v<S, float> ? S(1e20) : S(1e200);
    const S specials[] = {std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity(),
                          -std::numeric_limits<S>::infinity(), huge, -huge};
    for (int n = int(src.pick(1, 3)); n > 0; --n) {
      strided<S>& t = src.one_in(2) ? q : k;
      t.storage[std::size_t(src.pick(0, index_t(t.storage.size()) - 1))] = specials[src.pick(0, 4)];
    }
  }

  // Invalid mutations that concern every entry point.
  relbias::tensor_view<const S> qv = q.view, kv = k.view, vv = v.view;
  const int mutation = src.one_in(6) ? int(src.pick(1, 7)) : 0;
  constexpr index_t top = index_t(1) << 62;
  switch (mutation) {
    case 1: c.options.q_start = src.one_in(2) ? -src.pick(1, 5) : top - lq + src.pick(1, 5); c.what = "q_start"; break;
    case 2: c.options.k_start = src.one_in(2) ? std::numeric_limits<index_t>::min() : top - lk + src.pick(1, 1000); c.what = "k_start"; break;
    case 3: c.options.scale = src.one_in(2) ? std::numeric_limits<S>::quiet_NaN() : std::numeric_limits<S>::infinity(); c.what = "scale"; break;
    case 4: c.options.num_threads = -int(src.pick(1, 3)); c.what = "num_threads"; break;
    case 5: kv.dim = dim + 1; c.what = "k.dim"; break;
    case 6: vv.seq = lk + 1; c.what = "v.seq"; break;
    case 7: qv.data = nullptr; c.what = "q null"; break;
    default: break;
  }
  if (mutation != 0) c.invalid_forward = c.invalid_backward = true;

  const auto expect_invalid = [&](const char* entry, auto&& run) -> verdict {
    try {
      run();
    } catch (const std::invalid_argument&) {
      return {};
    } catch (const std::exception& e) {
      return std::string(entry) + " (" + c.what + "): threw something other than std::invalid_argument: " + e.what();
    }
    return std::string(entry) + " (" + c.what + "): accepted invalid input";
  };
  if (c.invalid_forward) {
    verdict v1 = expect_invalid("attention", [&] { (void)relbias::attention(qv, kv, vv, bias, c.options); });
    if (v1.empty()) v1 = expect_invalid("reference_attention", [&] { (void)relbias::reference_attention(qv, kv, vv, bias, c.options); });
    return v1;
  }

  try {
    const auto r = relbias_test::run_both<Bias>(qv, kv, vv, d_out.view, bias, c.options);
    // Scores of magnitude |lse| carry an absolute rounding of |lse| eps, which becomes a relative
    // error of the probabilities (ALiBi 2^40 positions back: 2e11, so 3e-5 in double).
    const double largest = relbias_test::finite_scale(std::span<const S>(r.reference.lse));
    const double tolerance = (std::is_same_v<S, float> ? 2e-3 : 1e-9) + 16 * largest * std::numeric_limits<S>::epsilon();
    // The fused backward rebuilds P as exp(s - lse): lse's rounding (|lse| eps) leaves each row's
    // dS summing to about |lse| eps instead of 0, and a bias gradient multiplies dS by db/dtheta,
    // up to the largest distance for ALiBi's slopes (README, "Errors": far windows).
    const double gradient_tolerance = c.special_values ? std::numeric_limits<double>::infinity() : tolerance;
    const double distance = double(std::max(relbias::distance(c.options.q_start, c.options.k_start + lk - 1),
                                            relbias::distance(c.options.q_start + lq - 1, c.options.k_start)));
    // With NaN or inf injected, a policy's chain rule may take 0 * NaN where the reference's skips
    // an inactive unit (FIRE), so NaN reaches other bias-gradient entries: not compared then.
    const double bias_tolerance = c.special_values ? std::numeric_limits<double>::quiet_NaN()
                                                   : tolerance + 16 * largest * std::numeric_limits<S>::epsilon() * distance;
    verdict miss = relbias_test::compare_pair(r, tolerance, gradient_tolerance, bias_tolerance);
    if (!miss.empty()) {
      return "fused differs from the reference: " + miss + " [" + (std::is_same_v<S, float> ? "float" : "double") + " " +
             typeid(Bias).name() + " B=" + std::to_string(batch) + " Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) +
             " Hq=" + std::to_string(hq) + " Hk=" + std::to_string(hk) + " D=" + std::to_string(dim) + " Dv=" +
             std::to_string(dim_v) + " causal=" + std::to_string(c.options.mask == masking::causal) + " q_start=" +
             std::to_string(c.options.q_start) + " k_start=" + std::to_string(c.options.k_start) + " threads=" +
             std::to_string(c.options.num_threads) + " special=" + std::to_string(c.special_values) + "]";
    }

    // Backward-only invalid calls: outputs that alias inputs or themselves, a null bias_grad.
    relbias::tensor<S> dq(batch, lq, hq, dim), dk(batch, lk, hk, dim), dv(batch, lk, hk, dim_v);
    auto dk_view = dk.view();
    std::vector<S> grad(relbias_test::parameter_count(bias));
    std::span<S> grad_span(grad);
    switch (src.pick(0, 5)) {
      case 1: dk_view = relbias::tensor_view<S>{k.view}; c.what = "dk is k"; break;
      case 2: if (lk > 1) { dk_view.seq_stride = 0; c.what = "dk seq_stride 0"; } break;
      case 3: if (!grad.empty()) { grad_span = std::span<S>(static_cast<S*>(nullptr), grad.size()); c.what = "null bias_grad"; } break;
      default: break;
    }
    if (c.what.empty()) return {};
    const auto o = r.reference.out.view();
    const std::span<const S> lse(r.reference.lse);
    verdict v2 = expect_invalid("attention_backward", [&] {
      relbias::attention_backward(qv, kv, vv, o, d_out.view, lse, bias, c.options, dq.view(), dk_view, dv.view(), grad_span);
    });
    if (v2.empty())
      v2 = expect_invalid("reference_attention_backward", [&] {
        relbias::reference_attention_backward(qv, kv, vv, o, d_out.view, lse, bias, c.options, dq.view(), dk_view, dv.view(), grad_span);
      });
    return v2;
  } catch (const std::exception& e) {
    return std::string("valid call threw: ") + e.what();
  }
}

/// Builds one random case and runs it.
template <class S>
verdict run_case(source& src) {
  const index_t batch = src.pick(1, 2), hk = src.pick(1, 2), group = src.pick(1, 3), hq = hk * group;
  const bool long_case = src.one_in(40);  // crosses the key tiles (256 forward, 128 backward) and query tiles (64)
  const index_t lq = long_case ? src.pick(60, 140) : src.pick(1, 20), lk = long_case ? src.pick(250, 530) : src.pick(1, 40);
  const index_t dim = src.pick(1, 8), dim_v = src.pick(1, 8);
  call<S> c;
  c.options.mask = src.one_in(2) ? masking::causal : masking::bidirectional;
  constexpr index_t top = index_t(1) << 62;
  switch (src.pick(0, 4)) {
    case 0: break;
    case 1: c.options.q_start = std::max<index_t>(lk - lq, 0); break;
    case 2: c.options.q_start = src.pick(0, 100); c.options.k_start = src.pick(0, 100); break;
    case 3: c.options.q_start = top - lq - src.pick(0, 3); c.options.k_start = src.one_in(2) ? top - lk : src.pick(0, 1000); break;
    default: c.options.q_start = src.pick(0, index_t(1) << 40); c.options.k_start = src.pick(0, index_t(1) << 40); break;
  }
  const int threads[] = {1, 2, 0, 3, 100000, INT_MAX};
  c.options.num_threads = threads[src.one_in(8) ? src.pick(2, 5) : src.pick(0, 1)];
  if (src.one_in(3)) c.options.scale = S(src.uniform(0.05, 2.0));

  switch (src.pick(0, 9)) {
    case 0: return run_policy(src, relbias::no_bias<S>{hq}, batch, lq, lk, hk, dim, dim_v, c);
    case 1: return run_policy(src, relbias::alibi<S>{hq, src.one_in(2) ? 8.0 : src.uniform(-4, 16)}, batch, lq, lk, hk, dim, dim_v, c);
    case 2: {
      std::vector<S> slopes(static_cast<std::size_t>(hq));
      for (S& m : slopes) m = S(src.uniform(-0.5, 2));
      return run_policy(src, relbias::alibi<S, true>{std::span<const S>(slopes)}, batch, lq, lk, hk, dim, dim_v, c);
    }
    case 3: {
      masking mode = c.options.mask;
      if (src.one_in(10)) {
        mode = mode == masking::causal ? masking::bidirectional : masking::causal;
        c.invalid_forward = c.invalid_backward = true;
        c.what = "t5 mode";
      }
      relbias::t5<S> t{hq, mode, src.pick(4, 40), src.pick(21, 300)};
      t.reset_parameters(src.next(), src.uniform(1, 64));
      return run_policy(src, t, batch, lq, lk, hk, dim, dim_v, c);
    }
    case 4: {
      relbias::per_offset<S> p{hq, c.options.mask, src.pick(0, 50)};
      p.reset_parameters(src.next(), src.uniform(0, 2));
      return run_policy(src, p, batch, lq, lk, hk, dim, dim_v, c);
    }
    case 5: case 6: {
      std::vector<S> r1(static_cast<std::size_t>(hq)), r2(static_cast<std::size_t>(hq));
      for (S& x : r1) x = S(src.one_in(10) ? 1e30 : src.uniform(0.01, 3));
      for (S& x : r2) x = S(src.uniform(0.01, 2));
      if (src.pick(5, 6) == 5) return run_policy(src, relbias::kerple_power<S>{r1, r2}, batch, lq, lk, hk, dim, dim_v, c);
      return run_policy(src, relbias::kerple_log<S>{r1, r2}, batch, lq, lk, hk, dim, dim_v, c);
    }
    case 7: {
      const index_t width = src.pick(1, 12);
      const auto n = static_cast<std::size_t>(width), h = static_cast<std::size_t>(hq);
      std::vector<S> w1(n), b1(n), w2(h * n), b2(h);
      for (auto* w : {&w1, &b1, &w2, &b2})
        for (S& x : *w) x = S(src.uniform(-2, 2));
      const double init_L = src.one_in(2) ? 512.0 : double(src.pick(1, 64));
      const relbias::fire<S> f{w1, b1, w2, b2, S(src.uniform(-1, 1)), S(src.uniform(-2, 2)), {.init_L = init_L}};
      return run_policy(src, f, batch, lq, lk, hk, dim, dim_v, c);
    }
    case 8: return run_policy(src, hiding_bias<S>{hq, src.next()}, batch, lq, lk, hk, dim, dim_v, c);
    default: return run_policy(src, window_bias<S>{hq, src.pick(0, 300)}, batch, lq, lk, hk, dim, dim_v, c);
  }
}

/// One execution: float or double, then the case.
inline verdict run_one(source& src) { return src.one_in(2) ? run_case<float>(src) : run_case<double>(src); }

}  // namespace relbias_fuzz
