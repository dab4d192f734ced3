// Issue 9, "never wrong, never a crash": each kind of hostile input, swept over its kind, for the
// fused and the reference kernels, forward and backward, float and double.
#include "catch.hpp"
#include "kernel_harness.hpp"
#include "random_tensors.hpp"

#include <relbias/relbias.hpp>

#include <climits>
#include <functional>
#include <cmath>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using namespace relbias;
using relbias_test::compare_pair;
using relbias_test::random_tensor;
using relbias_test::run_both;

namespace {

template <class S>
constexpr double tolerance() { return std::is_same_v<S, float> ? 1e-4 : 1e-10; }

template <class S>
constexpr S inf = std::numeric_limits<S>::infinity();

// Which keys a policy hides with a -inf bias (the other keys get a small finite bias).
enum class pattern { first_tile, leading, trailing, interleaved, all_but_last, every_key };

const char* pattern_name(pattern p) {
  const char* names[] = {"first tile", "leading", "trailing", "interleaved", "all but the last", "every key"};
  return names[int(p)];
}

// A user policy without fast paths that returns -inf for the keys of a pattern.
template <class S>
struct hiding_bias {
  using scalar_type = S;
  index_t heads, lk;
  pattern hide;
  index_t num_heads() const { return heads; }
  bool hidden(index_t j) const {
    switch (hide) {
      case pattern::first_tile: return j < 256;
      case pattern::leading: return j < lk / 3;
      case pattern::trailing: return j >= lk - lk / 3;
      case pattern::interleaved: return j % 3 != 1;
      case pattern::all_but_last: return j != lk - 1;
      case pattern::every_key: return true;
    }
    return false;
  }
  S operator()(index_t h, index_t i, index_t j) const {
    return hidden(j) ? -inf<S> : S(0.2) * std::sin(S(0.3) * S(i) - S(0.7) * S(j) + S(h));
  }
};

// ALiBi inside a window of w past keys, -inf outside: a shift-invariant policy that hides keys
// through the fused kernels' offset table (FlashAttention's local attention as a bias).
template <class S>
struct windowed_alibi {
  using scalar_type = S;
  static constexpr bool is_shift_invariant = true;
  index_t heads, window;
  index_t num_heads() const { return heads; }
  S at_offset(index_t h, index_t delta) const { return delta < 0 || delta > window ? -inf<S> : -S(0.1 * double(h + 1)) * S(delta); }
  S operator()(index_t h, index_t i, index_t j) const { return at_offset(h, i - j); }
};

// Zero everywhere except `value` at the cell (i0, j0).
template <class S>
struct poisoned_bias {
  using scalar_type = S;
  index_t heads, i0, j0;
  S value, background = S(0);
  index_t num_heads() const { return heads; }
  S operator()(index_t, index_t i, index_t j) const { return i == i0 && j == j0 ? value : background; }
};

// A user policy that throws at one cell, as user code may.
template <class S>
struct throwing_bias {
  using scalar_type = S;
  index_t heads, i0, j0;
  index_t num_heads() const { return heads; }
  S operator()(index_t, index_t i, index_t j) const {
    if (i == i0 && j == j0) throw std::runtime_error("policy failed at (" + std::to_string(i) + ", " + std::to_string(j) + ")");
    return S(0);
  }
};

template <class S>
struct inputs {
  tensor<S> q, k, v, d_out;
  inputs(index_t b, index_t lq, index_t lk, index_t hq, index_t hk, index_t d, std::uint64_t seed)
      : q(random_tensor<S>(b, lq, hq, d, seed)), k(random_tensor<S>(b, lk, hk, d, seed + 1)),
        v(random_tensor<S>(b, lk, hk, d, seed + 2)), d_out(random_tensor<S>(b, lq, hq, d, seed + 3)) {}
  template <class Bias>
  relbias_test::kernel_pair<S> run(const Bias& bias, const attention_options<S>& options, bool backward = true) const {
    return run_both<Bias>(q.view(), k.view(), v.view(), d_out.view(), bias, options, backward);
  }
};

template <class S>
bool row_is_nan(const tensor<S>& t, index_t b, index_t s, index_t h) {
  const auto r = t.view().row(b, s, h);
  return std::all_of(r, r + t.view().dim, [](S v) { return std::isnan(v); });
}

template <class S>
bool row_is_finite(const tensor<S>& t, index_t b, index_t s, index_t h) {
  const auto r = t.view().row(b, s, h);
  return std::all_of(r, r + t.view().dim, [](S v) { return std::isfinite(v); });
}

template <class F>
std::string invalid_argument_message(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "<no std::invalid_argument>";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

// ---- Kind 1: -inf scores. A tile whose row has no finite score yet contributes exact zeros.

TEMPLATE_TEST_CASE("robustness 1: -inf bias in whole tiles, leading, trailing, interleaved, every key", "[robustness]", float,
                   double) {
  using S = TestType;
  for (const index_t lk : {1, 2, 255, 256, 257, 300, 513})
    for (const pattern p : {pattern::first_tile, pattern::leading, pattern::trailing, pattern::interleaved,
                            pattern::all_but_last, pattern::every_key})
      for (const masking mask : {masking::bidirectional, masking::causal}) {
        INFO("Lk " << lk << ", hidden: " << pattern_name(p) << ", mask " << int(mask));
        const index_t lq = lk > 256 ? 70 : 5;
        const inputs<S> in(1, lq, lk, 2, 1, 4, 7);
        const attention_options<S> options{.mask = mask, .q_start = lk - lq > 0 ? lk - lq : 0, .num_threads = 2};
        const auto r = in.run(hiding_bias<S>{2, lk, p}, options);
        CHECK(compare_pair(r, tolerance<S>()) == "");
        if (p == pattern::every_key)
          for (const S lse : r.fused.lse) CHECK(lse == -inf<S>);
        for (index_t n = 0; n < r.fused.out.size(); ++n) CHECK(std::isfinite(r.fused.out.data()[n]));
      }
}

TEMPLATE_TEST_CASE("robustness 1: a window bias hides whole key tiles (offset-table path)", "[robustness]", float, double) {
  using S = TestType;
  for (const index_t window : {0, 3, 100})
    for (const masking mask : {masking::bidirectional, masking::causal}) {
      INFO("window " << window << ", mask " << int(mask));
      const inputs<S> in(2, 600, 600, 2, 2, 3, 17);
      const auto r = in.run(windowed_alibi<S>{2, window}, {.mask = mask, .num_threads = 2});
      CHECK(compare_pair(r, tolerance<S>()) == "");
    }
}

TEST_CASE("robustness 1: the issue's input, scores overflowing to -inf in the first key tile", "[robustness]") {
  tensor<float> q(1, 1, 1, 1), k(1, 257, 1, 1), v(1, 257, 1, 1), d_out(1, 1, 1, 1);
  q.data()[0] = 1e20f;
  for (index_t j = 0; j < 256; ++j) k.data()[j] = -1e20f;
  k.data()[256] = 1;
  v.data()[256] = 3;
  d_out.data()[0] = 1;
  const auto r = run_both(q.view(), k.view(), v.view(), d_out.view(), no_bias<float>{1}, {});
  CHECK(r.fused.out.data()[0] == 3.0f);
  CHECK(r.reference.out.data()[0] == 3.0f);
  CHECK(r.fused.lse[0] == 1e20f);
  CHECK(compare_pair(r, 1e-6) == "");
}

// ---- Kind 2: NaN in gives NaN out; +inf scores give NaN (no finite softmax); a row without
// visible keys gives O = 0, lse = -inf and no gradient.

TEMPLATE_TEST_CASE("robustness 2: NaN in q, k, v or the bias reaches O, lse and the gradients", "[robustness]", float, double) {
  using S = TestType;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  for (const index_t lk : {1, 3, 257})
    for (const masking mask : {masking::bidirectional, masking::causal}) {
      INFO("Lk " << lk << ", mask " << int(mask));
      const index_t lq = std::min<index_t>(lk, 4), q_start = lk - lq;
      const attention_options<S> options{.mask = mask, .q_start = q_start};
      const auto check_nan_rows = [&](const inputs<S>& in, index_t first_nan_row, const char* what) {
        INFO(what);
        const auto r = in.run(no_bias<S>{1}, options);
        CHECK(compare_pair(r, tolerance<S>()) == "");
        for (index_t row = 0; row < lq; ++row) {
          INFO("row " << row);
          CHECK(row_is_nan(r.fused.out, 0, row, 0) == (row >= first_nan_row));
          CHECK(std::isnan(r.fused.lse[std::size_t(row)]) == (row >= first_nan_row));
        }
        if (first_nan_row < lq) CHECK(row_is_nan(r.fused_grad.dq, 0, first_nan_row, 0));
      };
      {
        inputs<S> in(1, lq, lk, 1, 1, 2, 5);
        in.q.data()[1 % lq * 2] = nan;  // row 1 (row 0 when Lq = 1)
        const index_t row = 1 % lq;
        const auto r = in.run(no_bias<S>{1}, options);
        CHECK(compare_pair(r, tolerance<S>()) == "");
        CHECK(row_is_nan(r.fused.out, 0, row, 0));
        CHECK(std::isnan(r.fused.lse[std::size_t(row)]));
        CHECK(row_is_nan(r.fused_grad.dq, 0, row, 0));
        if (lq > 1) CHECK(row_is_finite(r.fused.out, 0, 0, 0));
      }
      {  // NaN key at the last position: causal rows before it never see it
        inputs<S> in(1, lq, lk, 1, 1, 2, 6);
        in.k.data()[(lk - 1) * 2] = nan;
        check_nan_rows(in, mask == masking::causal ? lq - 1 : 0, "NaN in the last key");
      }
      {  // NaN value at key 0: every row sees it with a nonzero weight
        inputs<S> in(1, lq, lk, 1, 1, 2, 8);
        in.v.data()[0] = nan;
        const auto r = in.run(no_bias<S>{1}, options);
        CHECK(compare_pair(r, tolerance<S>()) == "");
        for (index_t row = 0; row < lq; ++row) CHECK(std::isnan(r.fused.out.view().row(0, row, 0)[0]));
      }
      for (const S special : {nan, inf<S>}) {  // NaN or +inf bias at one visible cell: that row only
        INFO("bias " << special);
        const inputs<S> in(1, lq, lk, 1, 1, 2, 9);
        const index_t row = lq - 1;
        const auto r = in.run(poisoned_bias<S>{1, q_start + row, 0, special}, options);
        CHECK(compare_pair(r, tolerance<S>()) == "");
        CHECK(row_is_nan(r.fused.out, 0, row, 0));
        CHECK(std::isnan(r.fused.lse[std::size_t(row)]));
        if (lq > 1) CHECK(row_is_finite(r.fused.out, 0, 0, 0));
      }
    }
}

// The fused kernel's tile maximum may drop a NaN (it finds it through the sum of exponentials);
// a tile whose only other scores are -inf has no sum to find it in.
TEMPLATE_TEST_CASE("robustness 2: a NaN among -inf scores, before any finite score, makes its row NaN", "[robustness]", float,
                   double) {
  using S = TestType;
  for (const index_t j0 : {0, 5, 255, 256, 300, 512}) {
    INFO("NaN at key " << j0);
    const inputs<S> in(1, 3, 513, 1, 1, 4, 11);
    const auto r = in.run(poisoned_bias<S>{1, 1, j0, std::numeric_limits<S>::quiet_NaN(), -inf<S>}, {.num_threads = 2}, false);
    CHECK(row_is_nan(r.fused.out, 0, 1, 0));
    CHECK(std::isnan(r.fused.lse[1]));
    for (const index_t row : {0, 2}) {  // every score -inf: no visible key
      CHECK(r.fused.lse[std::size_t(row)] == -inf<S>);
      CHECK(r.fused.out.view().row(0, row, 0)[0] == S(0));
    }
  }
}

TEMPLATE_TEST_CASE("robustness 2: +inf scores from overflowing products give NaN, not a vanished key", "[robustness]", float,
                   double) {
  using S = TestType;
  const S big = std::is_same_v<S, float> ? S(1e20) : S(1e200);
  inputs<S> in(1, 1, 300, 1, 1, 1, 3);
  in.q.data()[0] = big;
  in.k.data()[280] = big;  // one score overflows to +inf
  const auto r = in.run(no_bias<S>{1}, {.scale = S(1)});
  CHECK(compare_pair(r, tolerance<S>()) == "");
  CHECK(std::isnan(r.fused.out.data()[0]));
  CHECK(std::isnan(r.fused.lse[0]));
}

TEMPLATE_TEST_CASE("robustness 2: rows without a visible key give O = 0, lse = -inf, zero gradients", "[robustness]", float,
                   double) {
  using S = TestType;
  for (const index_t lk : {1, 5, 300}) {
    const inputs<S> in(1, 3, lk, 2, 2, 4, 11);
    // keys start after every query: causal rows see nothing
    const auto r = in.run(alibi<S, true>{2}, {.mask = masking::causal, .q_start = 0, .k_start = 10});
    CHECK(compare_pair(r, tolerance<S>()) == "");
    for (const S lse : r.fused.lse) CHECK(lse == -inf<S>);
    for (index_t n = 0; n < r.fused.out.size(); ++n) CHECK(r.fused.out.data()[n] == S(0));
    for (index_t n = 0; n < r.fused_grad.dk.size(); ++n) CHECK(r.fused_grad.dk.data()[n] == S(0));
    for (const S g : r.fused_grad.bias_grad) CHECK(g == S(0));
  }
}

TEST_CASE("robustness 2: KERPLE rejects subnormal parameters (the kernels flush them to zero)", "[robustness]") {
  const float tiny = std::numeric_limits<float>::denorm_min();
  CHECK(contains(invalid_argument_message([&] { kerple_power<float>(std::vector<float>{1.0f}, std::vector<float>{tiny}); }),
                 "r2 of head 0 must be in (0, 2] and not subnormal"));
  CHECK(contains(invalid_argument_message([&] { kerple_log<float>(std::vector<float>{tiny}, std::vector<float>{1.0f}); }),
                 "r1 of head 0"));
  kerple_power<double> b{2};
  b.r2()[1] = std::numeric_limits<double>::denorm_min();
  CHECK(contains(invalid_argument_message([&] { b.validate(); }), "r2 of head 1"));
}

// ---- Kind 3: positions are range-checked at every entry point.

namespace {

template <class S, class Bias>
void for_every_entry(const Bias& bias, const attention_options<S>& options, index_t lq, index_t lk,
                     const std::function<void(const std::string&)>& check) {
  const inputs<S> in(1, lq, lk, bias.num_heads(), bias.num_heads(), 2, 3);
  tensor<S> o(1, lq, bias.num_heads(), 2), dq(1, lq, bias.num_heads(), 2), dk(1, lk, bias.num_heads(), 2),
      dv(1, lk, bias.num_heads(), 2);
  std::vector<S> lse(std::size_t(lq * bias.num_heads()));
  std::vector<S> grad(relbias_test::parameter_count(bias));
  const auto q = in.q.view(), k = in.k.view(), v = in.v.view(), d_out = in.d_out.view();
  check(invalid_argument_message([&] { attention(q, k, v, bias, options, o.view(), std::span<S>(lse)); }));
  check(invalid_argument_message([&] { reference_attention(q, k, v, bias, options, o.view(), std::span<S>(lse)); }));
  check(invalid_argument_message([&] { attention(q, k, v, bias, options); }));
  check(invalid_argument_message([&] {
    attention_backward(q, k, v, o.view(), d_out, std::span<const S>(lse), bias, options, dq.view(), dk.view(), dv.view(),
                       std::span<S>(grad));
  }));
  check(invalid_argument_message([&] {
    reference_attention_backward(q, k, v, o.view(), d_out, std::span<const S>(lse), bias, options, dq.view(), dk.view(),
                                 dv.view(), std::span<S>(grad));
  }));
}

}  // namespace

TEST_CASE("robustness 3: positions outside [0, 2^62] are rejected at every entry point", "[robustness]") {
  constexpr index_t top = index_t(1) << 62, max = std::numeric_limits<index_t>::max(), min = std::numeric_limits<index_t>::min();
  const fire<double> f{2};
  struct bad {
    index_t q_start, k_start;
    const char* name;
  };
  for (const bad b : {bad{max - 2, max - 5, "q_start"}, bad{max - 2, min, "q_start"}, bad{0, min, "k_start"},
                      bad{-1, 0, "q_start"}, bad{top - 7, 0, "q_start"}, bad{0, top - 7, "k_start"}, bad{0, max, "k_start"}}) {
    INFO("q_start " << b.q_start << ", k_start " << b.k_start);
    const attention_options<double> options{.mask = masking::causal, .q_start = b.q_start, .k_start = b.k_start};
    for_every_entry<double>(f, options, 8, 8, [&](const std::string& message) {
      CHECK(contains(message, std::string("options.") + b.name + " must be in [0, 2^62 - "));
    });
    for_every_entry<double>(alibi<double>{2}, options, 8, 8, [&](const std::string& message) { CHECK(contains(message, b.name)); });
  }
}

TEMPLATE_TEST_CASE("robustness 3: the largest valid positions compute correctly for every policy", "[robustness]", float, double) {
  using S = TestType;
  constexpr index_t top = index_t(1) << 62;
  const inputs<S> in(1, 8, 8, 2, 2, 3, 21);
  for (const auto& [q_start, k_start] : {std::pair{top - 8, top - 8}, {top - 8, 0}, {0, top - 8}, {top - 8, top - 16}}) {
    INFO("q_start " << q_start << ", k_start " << k_start);
    for (const masking mask : {masking::bidirectional, masking::causal}) {
      const attention_options<S> options{.mask = mask, .q_start = q_start, .k_start = k_start};
      CHECK(compare_pair(in.run(alibi<S, true>{2}, options), tolerance<S>()) == "");
      CHECK(compare_pair(in.run(kerple_log<S>{2, 1}, options), tolerance<S>()) == "");
      t5<S> t{2, mask};
      t.reset_parameters(3, 64);
      CHECK(compare_pair(in.run(t, options), tolerance<S>()) == "");
      per_offset<S> p{2, mask, 5};
      p.reset_parameters(4, 0.5);
      CHECK(compare_pair(in.run(p, options), tolerance<S>()) == "");
      CHECK(compare_pair(in.run(fire<S>{2, 5}, options), tolerance<S>()) == "");
    }
  }
}

TEMPLATE_TEST_CASE("robustness 3: the backward rejects an lse too large to recompute P from", "[robustness]", float, double) {
  using S = TestType;
  constexpr index_t top = index_t(1) << 62;
  const inputs<S> in(1, 8, 8, 2, 2, 3, 23);
  // Every key 2^62 positions back: ALiBi's bias is about -2^61, far past the scalar's precision.
  const auto r = in.run(alibi<S, true>{2}, {.q_start = top - 8});
  CHECK(r.backward_rejected);
  CHECK(compare_pair(r, tolerance<S>()) == "");
  tensor<S> dq(1, 8, 2, 3), dk(1, 8, 2, 3), dv(1, 8, 2, 3);
  CHECK(contains(invalid_argument_message([&] {
                   attention_backward(in.q.view(), in.k.view(), in.v.view(), r.fused.out.view(), in.d_out.view(),
                                      std::span<const S>(r.fused.lse), alibi<S>{2}, {.q_start = top - 8}, dq.view(), dk.view(), dv.view());
                 }),
                 "fewer than 8 correct bits"));
}

TEST_CASE("robustness 3: tensor_view::positions rejects ranges outside the view", "[robustness]") {
  tensor<float> t(1, 10, 1, 4);
  CHECK(t.view().positions(3, 7).seq == 7);
  for (const auto& range : {std::pair<index_t, index_t>{-1, 2}, {0, 11}, {11, 0}, {5, -1}, {3, std::numeric_limits<index_t>::max()}})
    // (not a structured binding: Clang 14 cannot capture one in the lambda)
    CHECK(contains(invalid_argument_message([&] { (void)t.view().positions(range.first, range.second); }), "first + count <= seq = 10"));
}

// ---- Kind 4: thread counts are clamped.

TEST_CASE("robustness 4: huge thread counts are clamped, results unchanged", "[robustness]") {
  const inputs<double> in(2, 70, 90, 4, 2, 5, 31);
  for (const int threads : {1, 3, 64, 100000, INT_MAX}) {
    INFO("num_threads " << threads);
    const auto r = in.run(kerple_power<double>{4, 2}, {.mask = masking::causal, .q_start = 20, .num_threads = threads});
    CHECK(compare_pair(r, 1e-10) == "");
  }
  CHECK(detail::thread_count(100000) <= detail::thread_limit());
  CHECK(detail::thread_count(INT_MAX) >= 1);
}

// ---- Kind 5: exceptions from worker threads reach the caller.

TEST_CASE("robustness 5: a policy that throws inside the parallel kernels reaches the caller", "[robustness]") {
  const inputs<double> in(2, 70, 300, 2, 2, 3, 41);
  for (const int threads : {1, 2, 4}) {
    INFO("num_threads " << threads);
    const throwing_bias<double> bias{2, 65, 260};
    const attention_options<double> options{.num_threads = threads};
    const auto q = in.q.view(), k = in.k.view(), v = in.v.view();
    CHECK_THROWS_WITH(attention(q, k, v, bias, options), Catch::Contains("policy failed at (65, 260)"));
    CHECK_THROWS_AS(reference_attention(q, k, v, bias, options), std::runtime_error);
    const auto ok = attention(q, k, v, no_bias<double>{2}, options);
    tensor<double> dq(2, 70, 2, 3), dk(2, 300, 2, 3), dv(2, 300, 2, 3);
    CHECK_THROWS_WITH(attention_backward(q, k, v, ok.out.view(), in.d_out.view(), std::span<const double>(ok.lse), bias, options,
                                         dq.view(), dk.view(), dv.view()),
                      Catch::Contains("policy failed"));
  }
}

// ---- Kind 6: FIRE's tables are O(Lq + Lk) wherever the window sits.

TEMPLATE_TEST_CASE("robustness 6: FIRE far from its keys: small tables, exact results", "[robustness]", float, double) {
  using S = TestType;
  const fire<S> f{2, 3};
  for (const index_t q_start : {index_t(0), index_t(1) << 24, index_t(1) << 40, (index_t(1) << 62) - 8}) {
    INFO("q_start " << q_start);
    const position_window w{q_start, 8, 0, 8};
    const detail::fire_distance_tables<fire<S>> tables(f, w);
    CHECK(tables.count() <= 15);
    CHECK(tables.first == std::max<index_t>(q_start - 7, 0));
    const inputs<S> in(1, 8, 8, 2, 2, 3, 51);
    for (const masking mask : {masking::bidirectional, masking::causal})
      CHECK(compare_pair(in.run(f, {.mask = mask, .q_start = q_start}), tolerance<S>()) == "");
    CHECK(compare_pair(in.run(f, {.q_start = 0, .k_start = q_start}), tolerance<S>()) == "");
  }
}

// ---- Kind 7: every size product of the constructors is checked.

namespace {
// Sizes the optimiser cannot see through: GCC would otherwise warn about the loops the
// constructors never reach with them (-Waggressive-loop-optimizations).
index_t opaque(index_t x) {
  volatile index_t value = x;
  return value;
}
}  // namespace

TEST_CASE("robustness 7: constructor sizes that overflow are rejected, naming the argument", "[robustness]") {
  const index_t max = opaque(std::numeric_limits<index_t>::max()), two_62 = opaque(index_t(1) << 62);
  const index_t two_32 = opaque(index_t(1) << 32), two_40 = opaque(index_t(1) << 40), two_30 = opaque(index_t(1) << 30);
  CHECK(contains(invalid_argument_message([&] { fire<float>(two_32 - 2, 0, {.width = two_32 - 1}); }), "parameter count"));
  CHECK(contains(invalid_argument_message([&] { fire<float>(1, 0, {.width = two_62}); }), "width=4611686018427387904"));
  CHECK(contains(invalid_argument_message([&] { fire<double>(max, 0); }), "num_heads="));
  CHECK(contains(invalid_argument_message([&] { kerple_power<float>{two_62}; }), "num_heads must be in [1, "));
  CHECK(contains(invalid_argument_message([&] { kerple_log<double>{max}; }), "num_heads"));
  CHECK(contains(invalid_argument_message([&] { alibi<float>{max}; }), "num_heads must be in [1, "));
  CHECK(contains(invalid_argument_message([&] { (void)alibi_slopes<float>(max); }), "num_heads"));
  CHECK(contains(invalid_argument_message([&] { t5<float>(two_40, masking::causal, two_30, 2 * two_30); }), "overflows"));
  CHECK(contains(invalid_argument_message([&] { per_offset<double>(two_40, masking::causal, two_30); }), "clip"));
  CHECK(contains(invalid_argument_message([&] { tensor<float>(two_40, two_40, 1, 1); }), "relbias::tensor"));
  CHECK(contains(invalid_argument_message([&] { tensor<float>(1, opaque(-1), 1, 1); }), "relbias::tensor"));
}

// ---- Kind 8: null spans are rejected.

TEMPLATE_TEST_CASE("robustness 8: lse and bias_grad spans without data are rejected", "[robustness]", float, double) {
  using S = TestType;
  const inputs<S> in(1, 4, 4, 2, 2, 3, 61);
  const auto q = in.q.view(), k = in.k.view(), v = in.v.view();
  const alibi<S, true> bias{2};
  tensor<S> o(1, 4, 2, 3), dq(1, 4, 2, 3), dk(1, 4, 2, 3), dv(1, 4, 2, 3);
  std::vector<S> lse(8), grad(2);
  const std::span<S> null_lse(static_cast<S*>(nullptr), 8), null_grad(static_cast<S*>(nullptr), 2);
  CHECK(contains(invalid_argument_message([&] { attention(q, k, v, bias, {}, o.view(), null_lse); }), "lse has 8 values but no data"));
  CHECK(contains(invalid_argument_message([&] { reference_attention(q, k, v, bias, {}, o.view(), null_lse); }), "lse has 8"));
  attention(q, k, v, bias, {}, o.view(), std::span<S>(lse));
  const std::span<const S> null_in(static_cast<const S*>(nullptr), 8);
  CHECK(contains(invalid_argument_message([&] {
                   attention_backward(q, k, v, o.view(), in.d_out.view(), std::span<const S>(lse), bias, {}, dq.view(), dk.view(),
                                      dv.view(), null_grad);
                 }),
                 "bias_grad has 2 values but no data"));
  CHECK(contains(invalid_argument_message([&] {
                   reference_attention_backward(q, k, v, o.view(), in.d_out.view(), null_in, bias, {}, dq.view(), dk.view(),
                                                dv.view(), std::span<S>(grad));
                 }),
                 "lse has 8 values but no data"));
  CHECK(contains(invalid_argument_message([] { kerple_log<S>(std::span<const S>(static_cast<const S*>(nullptr), 2), std::span<const S>(static_cast<const S*>(nullptr), 2)); }),
                 "with data"));
}

// ---- Kind 9: outputs must not overlap inputs, each other, or themselves.

TEMPLATE_TEST_CASE("robustness 9: aliasing outputs are rejected, packed layouts accepted", "[robustness]", float, double) {
  using S = TestType;
  const index_t L = 70, H = 2, D = 4;
  tensor<S> q = random_tensor<S>(1, L, H, D, 71), k = random_tensor<S>(1, L, H, D, 72), v = random_tensor<S>(1, L, H, D, 73),
            d_out = random_tensor<S>(1, L, H, D, 74);
  const no_bias<S> none{H};
  const auto expected = reference_attention(q.view(), k.view(), v.view(), none, {});
  tensor<S> o(1, L, H, D);
  std::vector<S> lse(std::size_t(L * H));
  const auto fwd = [&](tensor_view<S> out, std::span<S> l) {
    return invalid_argument_message([&] { attention(q.view(), k.view(), v.view(), none, {}, out, l); });
  };
  CHECK(contains(fwd(k.view(), {}), "o overlaps the input k"));
  CHECK(contains(fwd(v.view(), {}), "o overlaps the input v"));
  CHECK(contains(fwd(o.view(), std::span<S>(o.data(), lse.size())), "o and lse overlap"));
  CHECK(contains(fwd(o.view(), std::span<S>(const_cast<S*>(q.data()) + 5, lse.size())), "lse overlaps the input q"));
  auto zero_stride = o.view();
  zero_stride.seq_stride = 0;
  CHECK(contains(fwd(zero_stride, {}), "o overlaps itself"));
  auto short_stride = o.view();
  short_stride.head_stride = D - 1;
  CHECK(contains(fwd(short_stride, {}), "o overlaps itself"));

  // Backward: dk = k, dq = dk, bias_grad = the parameters.
  attention(q.view(), k.view(), v.view(), none, {}, o.view(), std::span<S>(lse));
  tensor<S> dq(1, L, H, D), dk(1, L, H, D), dv(1, L, H, D);
  const auto bwd = [&](tensor_view<S> a, tensor_view<S> b, tensor_view<S> c) {
    return invalid_argument_message([&] {
      attention_backward(q.view(), k.view(), v.view(), o.view(), d_out.view(), std::span<const S>(lse), none, {}, a, b, c);
    });
  };
  CHECK(contains(bwd(dq.view(), k.view(), dv.view()), "dk overlaps the input k"));
  CHECK(contains(bwd(dq.view(), dq.view(), dv.view()), "dq and dk overlap"));
  CHECK(contains(bwd(dq.view(), dk.view(), d_out.view()), "dv overlaps the input d_out"));
  alibi<S, true> trainable{H};
  CHECK(contains(invalid_argument_message([&] {
                   attention_backward(q.view(), k.view(), v.view(), o.view(), d_out.view(), std::span<const S>(lse), trainable, {},
                                      dq.view(), dk.view(), dv.view(),
                                      std::span<S>(trainable.parameters().data(), std::size_t(H)));
                 }),
                 "bias_grad overlaps the input bias.parameters()"));

  // Packed layouts: q, k, v interleaved in one [B, L, 3, H, D] buffer; dq, dk, dv likewise.
  std::vector<S> qkv(std::size_t(L * 3 * H * D)), grads(qkv.size());
  const auto packed = [&](std::vector<S>& buffer, index_t part) {
    return tensor_view<S>{buffer.data() + part * H * D, 1, L, H, D, L * 3 * H * D, 3 * H * D, D};
  };
  for (index_t part = 0; part < 3; ++part)
    for (index_t s = 0; s < L; ++s)
      for (index_t h = 0; h < H; ++h)
        std::copy_n((part == 0 ? q : part == 1 ? k : v).view().row(0, s, h), D, packed(qkv, part).row(0, s, h));
  const auto got = attention(packed(qkv, 0), packed(qkv, 1), packed(qkv, 2), none, {});
  CHECK(relbias_test::max_relative_error<S>(got.out.view(), expected.out.view()) < tolerance<S>());
  attention_backward(packed(qkv, 0), packed(qkv, 1), packed(qkv, 2), got.out.view(), d_out.view(), std::span<const S>(got.lse),
                     none, {}, packed(grads, 0), packed(grads, 1), packed(grads, 2));
  attention_backward(q.view(), k.view(), v.view(), got.out.view(), d_out.view(), std::span<const S>(got.lse), none, {}, dq.view(),
                     dk.view(), dv.view());
  const auto packed_grads = [&](index_t part) { return tensor_view<const S>(packed(grads, part)); };
  CHECK(relbias_test::max_relative_error<S>(packed_grads(0), dq.view()) < tolerance<S>());
  CHECK(relbias_test::max_relative_error<S>(packed_grads(1), dk.view()) < tolerance<S>());
  CHECK(relbias_test::max_relative_error<S>(packed_grads(2), dv.view()) < tolerance<S>());
}

TEST_CASE("robustness 9: the stride-based overlap test of one layout agrees with listing every row", "[robustness]") {
  // Blocks of one layout shifted by delta bytes: bshd, bhsd, packed (3 parts), gapped, reversed
  // and broadcast strides; the listing (sorted rows) is the plain definition of overlap.
  auto listed = [](const detail::memory_block& a, const detail::memory_block& b) {
    const std::vector<std::uintptr_t> rows_a = a.row_starts(), rows_b = b.row_starts();
    for (const std::uintptr_t x : rows_a)
      for (const std::uintptr_t y : rows_b)
        if (x < y + std::uintptr_t(b.row_bytes) && y < x + std::uintptr_t(a.row_bytes)) return true;
    return false;
  };
  const std::uintptr_t base = std::uintptr_t(1) << 20;
  const std::vector<std::pair<std::array<index_t, 3>, std::array<index_t, 3>>> layouts = {
      {{2, 5, 3}, {5 * 3 * 16, 3 * 16, 16}},       // bshd, 16-byte rows
      {{2, 5, 3}, {5 * 3 * 48, 3 * 48, 16}},       // q, k or v of a packed [B, L, 3, H, D]
      {{2, 5, 3}, {3 * 5 * 16, 16, 5 * 16}},       // bhsd
      {{1, 7, 2}, {0, 40, 16}},                    // gaps between rows; a broadcast batch
      {{2, 4, 3}, {-4 * 3 * 16, -3 * 16, 16}},     // reversed axes
      {{3, 1, 4}, {4 * 20, 0, 20}}};               // rows of 20 bytes at 20-byte steps
  int decided = 0;
  for (const auto& [extent, stride] : layouts)
    for (const index_t a_bytes : {16, 8, 12})
      for (const index_t b_bytes : {16, 4, 20})
        for (std::intmax_t delta = -700; delta <= 700; delta += 4) {
          const detail::memory_block a{"a", base, a_bytes, extent, stride};
          const detail::memory_block b{"b", base + std::uintptr_t(delta), b_bytes, extent, stride};
          const std::optional<bool> fast = detail::same_layout_overlap(a, b);
          if (!fast) continue;
          ++decided;
          INFO("delta " << delta << ", row bytes " << a_bytes << " and " << b_bytes << ", strides " << stride[0] << " "
                        << stride[1] << " " << stride[2]);
          REQUIRE(*fast == listed(a, b));
        }
  CHECK(decided > 10000);  // the fast path decided (nearly) every case
}

// ---- Kind 10: the float reference is exact where exp underflows.

TEST_CASE("robustness 10: the reference's exp underflows exactly", "[robustness]") {
  Eigen::Array<float, 1, Eigen::Dynamic> x(5);  // below log(FLT_MIN) = -87.34: subnormal or 0
  x << -88.0f, -90.0f, -103.0f, -200.0f, -inf<float>;
  Eigen::Array<float, 1, Eigen::Dynamic> y = x;
  detail::exact_exp<float>(y);
  for (index_t n = 0; n < x.size(); ++n) CHECK(y[n] == float(std::exp(double(x[n]))));
  Eigen::Array<double, 1, Eigen::Dynamic> xd(4);
  xd << -710.0, -720.0, -745.5, -inf<double>;
  Eigen::Array<double, 1, Eigen::Dynamic> yd = xd;
  detail::exact_exp<double>(yd);
  for (index_t n = 0; n < xd.size(); ++n) CHECK(yd[n] == std::exp(xd[n]));
}

TEST_CASE("robustness 10: the issue's KERPLE r1 = 1e30 gradient is exactly 0 in both kernels", "[robustness]") {
  const inputs<float> in(1, 300, 300, 1, 1, 4, 81);
  const kerple_power<float> bias(std::vector<float>{1e30f}, std::vector<float>{1.0f});
  for (const masking mask : {masking::bidirectional, masking::causal}) {
    const auto r = in.run(bias, {.mask = mask});
    CHECK(compare_pair(r, 1e-4) == "");
    CHECK(r.reference_grad.bias_grad[1] == 0.0f);
    CHECK(r.fused_grad.bias_grad[1] == 0.0f);
  }
}

// ---- Kind 12: the owning overloads check their size products first.

TEST_CASE("robustness 12: owning overloads name the overflowing size", "[robustness]") {
  std::vector<float> one(4, 0.5f);
  const index_t huge = index_t(1) << 31;
  const tensor_view<const float> broadcast{one.data(), huge, huge, 1, 4, 0, 0, 0};  // every row the same memory
  const tensor_view<const float> keys{one.data(), huge, 1, 1, 4, 0, 0, 0};
  CHECK(contains(invalid_argument_message([&] { attention(broadcast, keys, keys, no_bias<float>{1}, {}); }),
                 "o size batch * Lq * heads * dim_v = 2147483648 * 2147483648 * 1 * 4 overflows"));
  CHECK(contains(invalid_argument_message([&] { reference_attention(broadcast, keys, keys, no_bias<float>{1}, {}); }), "o size"));
  tensor_view<const float> wide{one.data(), 2, 2, 1, 4, std::numeric_limits<index_t>::max() / 2 + 1, 0, 0};
  CHECK(contains(invalid_argument_message([&] { attention(wide, wide, wide, no_bias<float>{1}, {}); }),
                 "spans more elements than an index addresses"));
}

// ---- The mode of t5 and per_offset must agree with options.mask.

TEST_CASE("robustness: a policy's mode that contradicts options.mask is an error naming both", "[robustness]") {
  for (const masking built : {masking::bidirectional, masking::causal}) {
    const masking used = built == masking::causal ? masking::bidirectional : masking::causal;
    const std::string expected = std::string("built for ") + (built == masking::causal ? "causal" : "bidirectional") +
                                 " attention but options.mask is " + (used == masking::causal ? "causal" : "bidirectional");
    const attention_options<float> options{.mask = used};
    for_every_entry<float>(t5<float>{2, built}, options, 3, 3, [&](const std::string& m) { CHECK(contains(m, expected)); });
    for_every_entry<float>(per_offset<float>{2, built, 4}, options, 3, 3, [&](const std::string& m) { CHECK(contains(m, expected)); });
  }
}

// ---- Issue 14 item 5: policies from known values, validated.

TEMPLATE_TEST_CASE("alibi from explicit slopes", "[robustness][alibi]", float, double) {
  using S = TestType;
  const std::vector<S> slopes = alibi_slopes<S>(6);
  const alibi<S> from_values{std::span<const S>(slopes)};
  const alibi<S> authors{6};
  for (index_t h = 0; h < 6; ++h) CHECK(from_values.slope(h) == authors.slope(h));
  const alibi<S, true> trainable{std::vector<S>{S(0.5), S(-0.25)}};
  CHECK(trainable(1, 5, 2) == S(0.75));
  CHECK(contains(invalid_argument_message([] { alibi<S>{std::vector<S>{}}; }), "slopes need one value per head"));
  CHECK(contains(invalid_argument_message([] { alibi<S>{std::vector<S>{S(1), std::numeric_limits<S>::quiet_NaN()}}; }),
                 "slope of head 1 must be finite"));
  alibi<S, true> written{2};
  written.parameters()[0] = inf<S>;
  CHECK(contains(invalid_argument_message([&] { written.validate(); }), "slope of head 0"));
}

TEMPLATE_TEST_CASE("fire from known weights equals fire with those parameters", "[robustness][fire]", float, double) {
  using S = TestType;
  const fire<S> seeded{3, 7, {.width = 4}};
  const std::vector<S> W1(seeded.W1().begin(), seeded.W1().end()), b1(seeded.b1().begin(), seeded.b1().end()),
      W2(seeded.W2().data(), seeded.W2().data() + 12), b2(seeded.b2().begin(), seeded.b2().end());
  const fire<S> known{W1, b1, W2, b2, S(0.25), S(1.5), {.init_L = 256}};
  CHECK(known.num_heads() == 3);
  CHECK(known.width() == 4);
  CHECK(known.c() == S(0.25));
  CHECK(known.L_multiplier() == S(1.5));
  CHECK(known.init_L() == S(256));
  fire<S> written{3, 0, {.width = 4, .init_L = 256}};
  written.parameters() = seeded.parameters();
  written.c() = S(0.25);
  written.L_multiplier() = S(1.5);
  CHECK(known.parameters() == written.parameters());
  for (const index_t i : {0, 300, 1000}) CHECK(known(2, i, 3) == written(2, i, 3));

  CHECK(contains(invalid_argument_message([&] { fire<S>(W1, b1, std::span<const S>(W2).first(11), b2, S(0.1), S(1)); }),
                 "W2.size()=11"));
  CHECK(contains(invalid_argument_message([&] { fire<S>(W1, std::span<const S>(b1).first(3), W2, b2, S(0.1), S(1)); }),
                 "b1.size()=3"));
  CHECK(contains(invalid_argument_message([&] { fire<S>(W1, b1, W2, b2, std::numeric_limits<S>::quiet_NaN(), S(1)); }),
                 "c must be finite"));
  std::vector<S> bad = W2;
  bad[5] = inf<S>;
  CHECK(contains(invalid_argument_message([&] { fire<S>(W1, b1, bad, b2, S(0.1), S(1)); }), "W2[1][1] must be finite"));
  CHECK(contains(invalid_argument_message([&] { fire<S>(W1, b1, W2, b2, S(0.1), std::numeric_limits<S>::max()); }),
                 "L_multiplier * init_L must be finite"));
}

TEST_CASE("validate() after writes through parameters(), for every learned policy", "[robustness]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  t5<double> t{2, masking::causal};
  t.table()(3, 1) = nan;
  CHECK(contains(invalid_argument_message([&] { t.validate(); }), "table entry (bucket 3, head 1) must be finite"));
  per_offset<double> p{2, masking::bidirectional, 3};
  p.table()(1, 2) = -inf<double>;
  CHECK(contains(invalid_argument_message([&] { p.validate(); }), "table entry (head 1, index 2) must be finite"));
  kerple_log<double> kl{2};
  kl.r1()[0] = -1;
  CHECK(contains(invalid_argument_message([&] { kl.validate(); }), "r1 of head 0"));
  kerple_power<double> kp{2};
  kp.r2()[1] = 2.5;
  CHECK(contains(invalid_argument_message([&] { kp.validate(); }), "r2 of head 1 must be in (0, 2]"));
  fire<double> f{2};
  f.b1()[3] = nan;
  CHECK(contains(invalid_argument_message([&] { f.validate(); }), "b1[3] must be finite"));
  // Valid writes pass.
  t.table()(3, 1) = 0.5;
  p.table()(1, 2) = 0.5;
  kl.r1()[0] = 1;
  kp.r2()[1] = 2;
  f.b1()[3] = 0;
  CHECK_NOTHROW(t.validate());
  CHECK_NOTHROW(p.validate());
  CHECK_NOTHROW(kl.validate());
  CHECK_NOTHROW(kp.validate());
  CHECK_NOTHROW(f.validate());
}
