// Paged KV caches, shared prefixes and explicit positions (paged.hpp, attention_options): a call
// over a pool of blocks must equal each sequence run alone over its keys laid out contiguously,
// bit for bit (the kernels compute the same tiles with the same products), explicit positions
// must match a plain per-element definition, and every bad argument must throw
// std::invalid_argument naming it.
#include "catch.hpp"
#include "random_tensors.hpp"
#include "user_policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/attention_half.hpp>
#include <relbias/attention_reference.hpp>
#include <relbias/bias/alibi.hpp>
#include <relbias/bias/fire.hpp>
#include <relbias/bias/kerple.hpp>
#include <relbias/bias/none.hpp>
#include <relbias/bias/per_offset.hpp>
#include <relbias/bias/sandwich.hpp>
#include <relbias/bias/t5.hpp>
#include <relbias/paged.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <vector>

using namespace relbias;
using relbias_test::random_tensor;

namespace {

constexpr index_t heads = 4, kv_heads = 2, dim = 16, dim_v = 8;
// Small tiles: key tiles of 24 columns cross blocks of 8 and 16 keys and start inside blocks.
constexpr detail::tile_shape small_tiles{.rows = 16, .cols = 24};

/// Every policy, built for the mask (T5 and per_offset need it), plus a user policy without fast path.
template <class S, class Visit>
void for_each_policy(masking mask, Visit visit) {
  visit(no_bias<S>{heads});
  visit(alibi<S>{heads});
  t5<S> t5_bias{heads, mask, 8, 16};
  t5_bias.reset_parameters(1, 2.0);
  visit(t5_bias);
  per_offset<S> offsets{heads, mask, 5};
  offsets.reset_parameters(2, 0.5);
  visit(offsets);
  visit(kerple_power<S>{heads, 3});
  visit(kerple_log<S>{heads, 3});
  visit(fire<S>{heads, 5, fire_config{.width = 12, .init_L = 20}});  // queries below and past L
  visit(sandwich<S>{heads, 8});
  visit(relbias_test::wave_bias<S>{heads});
}

template <class T, class S>
tensor<T> converted(const tensor<S>& from) {
  const auto v = from.view();
  tensor<T> to(v.batch, v.seq, v.heads, v.dim);
  convert(v, to.view());
  return to;
}

/// A pool of blocks holding batch element s of keys/values, rows [0, lengths[s]), for each s.
/// Blocks come from a shuffled free list (so no sequence's blocks are in order); the first
/// `shared` blocks of every sequence long enough are sequence 0's (their rows must be equal).
/// Spare blocks and the unused rows of last blocks hold NaN: reading them poisons the output.
template <class T>
struct pool {
  tensor<T> k, v;                   // [num_blocks, block, kv_heads, dim]
  std::vector<std::int32_t> table;  // [sequences, max_blocks], -1 past a sequence's blocks
  std::vector<index_t> positions;   // one per slot, [num_blocks * block]
  index_t block = 0, rows = 0, max_blocks = 0;

  paged_kv paged() const { return {block, block_table(std::span<const std::int32_t>(table), rows, max_blocks)}; }
  index_t capacity() const { return block * max_blocks; }
};

template <class T, class S>
pool<T> make_pool(const tensor<S>& keys, const tensor<S>& values, const std::vector<index_t>& lengths, index_t block, index_t shared,
                  std::uint64_t seed) {
  pool<T> p;
  p.block = block;
  p.rows = index_t(lengths.size());
  for (index_t n : lengths) p.max_blocks = std::max(p.max_blocks, (n + block - 1) / block);
  p.max_blocks += 1;  // a spare column: tables longer than needed are fine
  const index_t num_blocks = p.rows * p.max_blocks + 3;
  std::vector<std::int32_t> free_list(static_cast<std::size_t>(num_blocks));
  std::iota(free_list.begin(), free_list.end(), 0);
  std::shuffle(free_list.begin(), free_list.end(), std::mt19937(unsigned(seed)));
  const S nan = std::numeric_limits<S>::quiet_NaN();
  tensor<S> k(num_blocks, block, kv_heads, dim), v(num_blocks, block, kv_heads, dim_v);
  std::fill(k.data(), k.data() + k.size(), nan);
  std::fill(v.data(), v.data() + v.size(), nan);
  p.table.assign(std::size_t(p.rows * p.max_blocks), -1);
  p.positions.assign(std::size_t(num_blocks * block), -7);
  for (index_t s = 0; s < p.rows; ++s)
    for (index_t m = 0; m * block < lengths[std::size_t(s)]; ++m) {
      const bool share = s > 0 && m < shared && lengths[0] >= (m + 1) * block && lengths[std::size_t(s)] >= (m + 1) * block;
      const std::int32_t id = share ? p.table[std::size_t(m)] : free_list.back();
      if (!share) free_list.pop_back();
      p.table[std::size_t(s * p.max_blocks + m)] = id;
      for (index_t r = 0; r < block && m * block + r < lengths[std::size_t(s)]; ++r)
        for (index_t h = 0; h < kv_heads; ++h) {
          k.view().rows(id, h, r, 1) = keys.view().rows(s, h, m * block + r, 1);
          v.view().rows(id, h, r, 1) = values.view().rows(s, h, m * block + r, 1);
        }
    }
  p.k = converted<T>(k);
  p.v = converted<T>(v);
  return p;
}

/// Batch element s of t, rows [first, first + count), as a [1, count, heads, dim] copy.
template <class S>
tensor<S> copy_rows(const tensor<S>& t, index_t s, index_t first, index_t count) {
  const auto v = t.view();
  tensor<S> out(1, count, v.heads, v.dim);
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t r = 0; r < count; ++r) std::copy(v.row(s, first + r, h), v.row(s, first + r, h) + v.dim, out.view().row(0, r, h));
  return out;
}

/// The fused forward with the given tiles, after the public entry's checks: the float/double
/// kernel (attention.hpp) when K is the bias' scalar, the 16-bit kernel otherwise.
template <class K, class Bias, class S = typename Bias::scalar_type>
attention_result<S> fused(const tensor<S>& q, const tensor<K>& k, const tensor<K>& v, const Bias& bias, const attention_options<S>& options,
                          detail::tile_shape tiles = small_tiles) {
  const auto qv = q.view();
  attention_result<S> r{tensor<S>(qv.batch, qv.seq, heads, dim_v), std::vector<S>(std::size_t(qv.batch * heads * qv.seq))};
  detail::check_attention_call("test", qv, k.view(), v.view(), bias, options, r.out.view(), std::span<S>(r.lse));
  const detail::batch_layout layout = detail::make_layout(options, qv.batch, qv.seq, k.view().seq);
  const auto plan = detail::make_bias_plan(bias, detail::visited_window(layout), 1);
  if constexpr (std::is_same_v<K, S>) {
    const detail::forward_problem<S> pb{qv, k.view(), v.view(), r.out.view(), std::span<S>(r.lse), options, options.scale_for(dim),
                                        heads / kv_heads, tiles};
    detail::fused_forward(pb, layout, plan);
  } else {
    const detail::half_forward_problem<S, K> pb{qv, k.view(), v.view(), r.out.view(), std::span<S>(r.lse), options.scale_for(dim),
                                                heads / kv_heads, 1, 1, tiles};
    detail::half_fused_forward(pb, layout, plan, 1);
  }
  return r;
}

/// max |a - b| / max(|b|, 1) between rows [a_first, a_first + count) of a's batch element a_b
/// and rows [0, count) of b's element 0, O and lse; infinity for a NaN.
template <class S>
double rows_error(const attention_result<S>& a, index_t a_b, index_t a_first, const attention_result<S>& b, index_t count) {
  const auto x = a.out.view(), y = b.out.view();
  double worst = 0;
  auto compare = [&](double u, double w) {
    if (u == w) return;
    if (!std::isfinite(u - w)) worst = std::numeric_limits<double>::infinity();
    else worst = std::max(worst, std::abs(u - w) / std::max(std::abs(w), 1.0));
  };
  for (index_t h = 0; h < heads; ++h)
    for (index_t r = 0; r < count; ++r) {
      for (index_t d = 0; d < dim_v; ++d) compare(x.row(a_b, a_first + r, h)[d], y.row(0, r, h)[d]);
      compare(a.lse[std::size_t((a_b * heads + h) * x.seq + a_first + r)], b.lse[std::size_t(h * count + r)]);
    }
  return worst;
}

/// Worst error of a paged call against each of its sequences alone over contiguous keys (rows
/// [0, k_length) of batch element s of keys/values, stored as K), with the same tiles.
template <class K, class Bias, class S = typename Bias::scalar_type>
double paged_vs_alone(const Bias& bias, const tensor<S>& q, const tensor<S>& keys, const tensor<S>& values, const pool<K>& p,
                      attention_options<S> options, detail::tile_shape tiles = small_tiles) {
  options.paged = p.paged();
  const attention_result<S> got = fused(q, p.k, p.v, bias, options, tiles);
  double worst = 0;
  for (std::size_t s = 0; s < options.sequences.size(); ++s) {
    const sequence& seq = options.sequences[s];
    if (seq.q_length == 0) continue;
    attention_options<S> alone = options;
    alone.paged = {};
    alone.sequences = {};
    alone.q_start = seq.q_start;
    alone.k_start = seq.k_start;
    const auto k = converted<K>(copy_rows(keys, index_t(s), seq.k_begin, seq.k_length));
    const auto v = converted<K>(copy_rows(values, index_t(s), seq.k_begin, seq.k_length));
    const attention_result<S> expected = fused(copy_rows(q, seq.batch, seq.q_begin, seq.q_length), k, v, bias, alone, tiles);
    worst = std::max(worst, rows_error(got, seq.batch, seq.q_begin, expected, seq.q_length));
  }
  return worst;
}

/// Copies the first `rows` rows of batch element 0 into every other element (a shared prompt).
template <class S>
void share_prefix(tensor<S>& t, index_t rows) {
  const auto v = t.view();
  for (index_t b = 1; b < v.batch; ++b)
    for (index_t h = 0; h < v.heads; ++h) v.rows(b, h, 0, std::min(rows, v.seq)) = v.rows(0, h, 0, std::min(rows, v.seq));
}

std::string window_text(std::optional<index_t> window) { return window ? std::to_string(*window) : "none"; }

/// How far a paged call may be from the contiguous one. Tiles of at least block_rows queries
/// pack K and V, gathering the blocks into the tiles a contiguous cache gives, and 16-bit pools
/// stream the same keys: same bits. Float decoding over blocks of paged_product_rows keys or
/// more sums P V run by run (float rounding); smaller blocks gather the tile: same bits.
template <class S>
double decoding_tolerance(index_t block, index_t query_length) {
  const bool by_runs = !half_storage<S> && query_length < detail::block_rows && block >= detail::paged_product_rows;
  return by_runs ? (std::is_same_v<S, double> ? 1e-14 : 1e-6) : 0.0;
}

const std::vector<index_t> key_lengths{37, 70, 0, 16, 9};  // an idle sequence, one shorter than a block of 16

/// Runs check(bias, options, block, query_length) over every policy, mask, window, block size
/// and query length (1 and 3: decoding; 9: a prefill step after a paged prefix of length - 9).
template <class S, class Check>
void for_each_case(Check check) {
  for (index_t block : {8, 16, 24, 64})
    for (index_t query_length : {1, 3, 9})
      for (masking mask : {masking::causal, masking::bidirectional})
        for (std::optional<index_t> window : {std::optional<index_t>{}, std::optional<index_t>{5}})
          for_each_policy<S>(mask, [&](const auto& bias) {
            attention_options<S> options{.mask = mask, .sliding_window = window, .num_threads = 1};
            options.sequences = decoding_sequences(key_lengths, query_length, 80);
            INFO("block " << block << ", Lq " << query_length << ", mask " << masking_name(mask) << ", window " << window_text(window)
                          << ", policy " << typeid(bias).name());
            check(bias, options, block, query_length);
          });
}

}  // namespace

TEMPLATE_TEST_CASE("paged: a paged float/double cache equals each sequence alone over contiguous keys, every policy", "[paged]", float,
                   double) {
  using S = TestType;
  const auto keys = random_tensor<S>(5, 80, kv_heads, dim, 2), values = random_tensor<S>(5, 80, kv_heads, dim_v, 3);
  const auto q = random_tensor<S>(5, 9, heads, dim, 1);
  for_each_case<S>([&](const auto& bias, const attention_options<S>& options, index_t block, index_t query_length) {
    const pool<S> p = make_pool<S>(keys, values, key_lengths, block, 0, std::uint64_t(block));
    const double error = paged_vs_alone(bias, q, keys, values, p, options);
    CHECK(error <= decoding_tolerance<S>(block, query_length));
  });
}

TEMPLATE_TEST_CASE("paged: bf16 and f16 pools equal each sequence alone over contiguous 16-bit keys, bit for bit", "[paged]", Eigen::bfloat16,
                   Eigen::half) {
  using K = TestType;
  const auto keys = random_tensor<float>(5, 80, kv_heads, dim, 12), values = random_tensor<float>(5, 80, kv_heads, dim_v, 13);
  const auto q = random_tensor<float>(5, 9, heads, dim, 11);
  for_each_case<float>([&](const auto& bias, const attention_options<float>& options, index_t block, index_t) {
    const pool<K> p = make_pool<K>(keys, values, key_lengths, block, 0, std::uint64_t(block) + 1);
    // Streamed items address every key through the table; larger ones widen the runs into the same float tile.
    CHECK(paged_vs_alone(bias, q, keys, values, p, options) == 0);
  });
}

TEMPLATE_TEST_CASE("paged: sequences sharing a prompt's blocks each equal themselves alone", "[paged]", float, Eigen::bfloat16) {
  using K = TestType;
  // Four sequences share a 32-key prompt (sequence 0's two blocks of 16), then diverge.
  const std::vector<index_t> lengths{40, 33, 32, 57};
  auto keys = random_tensor<float>(4, 60, kv_heads, dim, 22), values = random_tensor<float>(4, 60, kv_heads, dim_v, 23);
  share_prefix(keys, 32);
  share_prefix(values, 32);
  const auto q = random_tensor<float>(4, 9, heads, dim, 21);
  const pool<K> p = make_pool<K>(keys, values, lengths, 16, 2, 5);
  for (index_t s = 1; s < 4; ++s)
    for (index_t m = 0; m < 2; ++m) REQUIRE(p.table[std::size_t(s * p.max_blocks + m)] == p.table[std::size_t(m)]);
  for (index_t query_length : {1, 9})
    for (masking mask : {masking::causal, masking::bidirectional}) {
      attention_options<float> options{.mask = mask, .num_threads = 2};
      options.sequences = decoding_sequences(lengths, query_length, p.capacity());
      t5<float> t5_bias{heads, mask, 8, 16};
      t5_bias.reset_parameters(3, 1.0);
      const double error = paged_vs_alone(t5_bias, q, keys, values, p, options);
      INFO("Lq " << query_length << ", mask " << masking_name(mask));
      CHECK(error <= decoding_tolerance<K>(16, query_length));
    }
}

TEMPLATE_TEST_CASE("paged: packed queries of one batch element, prefill chunks beside decoding steps (continuous batching)", "[paged]",
                   float, Eigen::half) {
  using K = TestType;
  // q holds every sequence's new rows back to back (vLLM's flattened batch): a 9-row prompt
  // chunk, two decoding steps, a 12-row chunk; each sequence's keys through its table row.
  const std::vector<index_t> lengths{30, 41, 17, 64}, new_rows{9, 1, 1, 12};
  const auto keys = random_tensor<float>(4, 64, kv_heads, dim, 82), values = random_tensor<float>(4, 64, kv_heads, dim_v, 83);
  const auto q = random_tensor<float>(1, 23, heads, dim, 81);
  for (index_t block : {16, 64}) {
    const pool<K> p = make_pool<K>(keys, values, lengths, block, 0, 10);
    std::vector<sequence> sequences;
    for (index_t s = 0, row = 0; s < 4; row += new_rows[std::size_t(s)], ++s)
      sequences.push_back({.batch = 0, .q_begin = row, .q_length = new_rows[std::size_t(s)], .k_length = lengths[std::size_t(s)],
                           .q_start = lengths[std::size_t(s)] - new_rows[std::size_t(s)]});
    for (masking mask : {masking::causal, masking::bidirectional}) {
      attention_options<float> options{.mask = mask, .sliding_window = 20, .num_threads = 2};
      options.sequences = sequences;
      INFO("block " << block << ", mask " << masking_name(mask));
      CHECK(paged_vs_alone(kerple_log<float>{heads, 4}, q, keys, values, p, options) <= decoding_tolerance<K>(block, 1));
    }
  }
}

TEST_CASE("paged: compute_precision::bf16 takes the fp32 path for paged caches and explicit positions", "[paged]") {
  // The AMX kernel packs contiguous keys at start + row positions; with a block table or
  // explicit positions the call must not reach it (its result would read the wrong rows).
  const std::vector<index_t> lengths{300, 140};
  const auto keys = random_tensor<float>(2, 300, kv_heads, dim, 102), values = random_tensor<float>(2, 300, kv_heads, dim_v, 103);
  const auto q = random_tensor<float>(2, 140, heads, dim, 101);
  const pool<Eigen::bfloat16> p = make_pool<Eigen::bfloat16>(keys, values, lengths, 64, 0, 12);
  attention_options<float> options{.mask = masking::causal, .num_threads = 2};
  options.sequences = decoding_sequences(lengths, 140, p.capacity());
  options.paged = p.paged();
  const alibi<float> bias{heads};
  const auto fp32 = attention(q.view(), p.k.view(), p.v.view(), bias, options);
  options.compute = compute_precision::bf16;
  const auto bf16 = attention(q.view(), p.k.view(), p.v.view(), bias, options);
  CHECK(relbias_test::max_relative_error<float>(bf16.out.view(), fp32.out.view()) == 0);
}

TEMPLATE_TEST_CASE("paged: long sequences through the public attention(), default tiles, two threads, GQA", "[paged]", float,
                   Eigen::bfloat16) {
  using K = TestType;
  // 600 and 300 keys: several 256-key tiles, blocks of 64 and 256; a causal prefill of 40
  // queries after the paged prefix and a decoding step, with and without a window.
  const std::vector<index_t> lengths{600, 300};
  const auto keys = random_tensor<float>(2, 600, kv_heads, dim, 32), values = random_tensor<float>(2, 600, kv_heads, dim_v, 33);
  const auto q = random_tensor<float>(2, 40, heads, dim, 31);
  for (index_t block : {64, 256})
    for (index_t query_length : {1, 40})
      for (std::optional<index_t> window : {std::optional<index_t>{}, std::optional<index_t>{100}}) {
        const pool<K> p = make_pool<K>(keys, values, lengths, block, 0, 9);
        attention_options<float> options{.mask = masking::causal, .sliding_window = window, .num_threads = 2};
        options.sequences = decoding_sequences(lengths, query_length, p.capacity());
        options.paged = p.paged();
        const alibi<float> bias{heads};
        tensor<float> both(2, query_length, heads, dim);
        for (index_t b = 0; b < 2; ++b)
          for (index_t h = 0; h < heads; ++h) both.view().rows(b, h, 0, query_length) = q.view().rows(b, h, 0, query_length);
        const auto got = attention(both.view(), p.k.view(), p.v.view(), bias, options);
        INFO("block " << block << ", Lq " << query_length << ", window " << window_text(window));
        for (index_t s = 0; s < 2; ++s) {
          const index_t n = lengths[std::size_t(s)];
          attention_options<float> alone{.mask = masking::causal, .sliding_window = window, .q_start = n - query_length, .num_threads = 2};
          const auto k = converted<K>(copy_rows(keys, s, 0, n)), v = converted<K>(copy_rows(values, s, 0, n));
          const auto expected = attention(copy_rows(both, s, 0, query_length).view(), k.view(), v.view(), bias, alone);
          CHECK(rows_error(got, s, 0, expected, query_length) <= decoding_tolerance<K>(block, query_length));
        }
      }
}

namespace {

/// The plain definition at explicit positions, in double: O[r] = sum_c softmax_c(scale q_r.k_c
/// + bias(h, qpos[r], kpos[c]), keys with qpos[r] - kpos[c] outside the band hidden) v_c.
/// q [1, Lq, H, D], k and v [1, Lk, Hk, D]; returns O [1, Lq, H, Dv] (a row that sees nothing: 0).
template <class Bias, class S>
tensor<double> plain_attention(const tensor<S>& q, const tensor<S>& k, const tensor<S>& v, const std::vector<index_t>& qpos,
                               const std::vector<index_t>& kpos, const Bias& bias, const attention_options<S>& options) {
  const offset_band band = options.band();
  const double scale = double(options.scale_for(dim));
  const index_t lq = q.view().seq, lk = k.view().seq;
  tensor<double> o(1, lq, heads, dim_v);
  for (index_t h = 0; h < heads; ++h)
    for (index_t r = 0; r < lq; ++r) {
      std::vector<double> w(std::size_t(lk), -std::numeric_limits<double>::infinity());
      double top = -std::numeric_limits<double>::infinity();
      for (index_t c = 0; c < lk; ++c) {
        if (!band.contains(qpos[std::size_t(r)] - kpos[std::size_t(c)])) continue;
        double dot = 0;
        for (index_t d = 0; d < dim; ++d) dot += double(q(0, r, h, d)) * double(k(0, c, h / (heads / kv_heads), d));
        w[std::size_t(c)] = scale * dot + double(bias(h, qpos[std::size_t(r)], kpos[std::size_t(c)]));
        top = std::max(top, w[std::size_t(c)]);
      }
      if (top == -std::numeric_limits<double>::infinity()) continue;
      double sum = 0;
      for (double& x : w) sum += x = std::exp(x - top);
      for (index_t c = 0; c < lk; ++c)
        for (index_t d = 0; d < dim_v; ++d) o(0, r, h, d) += w[std::size_t(c)] / sum * double(v(0, c, h / (heads / kv_heads), d));
    }
  return o;
}

template <class S>
double error_against(const attention_result<S>& got, index_t b, const tensor<double>& expected) {
  double worst = 0;
  const auto e = expected.view();
  for (index_t r = 0; r < e.seq; ++r)
    for (index_t h = 0; h < heads; ++h)
      for (index_t d = 0; d < dim_v; ++d) {
        const double x = got.out(b, r, h, d), y = expected(0, r, h, d);
        worst = std::isfinite(x) ? std::max(worst, std::abs(x - y) / std::max(std::abs(y), 1.0)) : INFINITY;
      }
  return worst;
}

}  // namespace

TEMPLATE_TEST_CASE("paged: explicit positions, a StreamingLLM cache (sinks, evicted middle, recent window), every policy", "[paged]",
                   float, double) {
  using S = TestType;
  // Sequence 0 kept 4 sink keys (positions 0..3) and the 30 keys at positions 170..199 of a
  // 200-token text; its 3 new queries sit at 200..202 (keys 197..199 are theirs). Sequence 1:
  // 20 keys at even positions 1000..1038, queries at 1039, 1041 and 1020 (not consecutive,
  // not sorted). Both in a paged pool of blocks of 8 and in contiguous tensors.
  std::vector<index_t> k0{0, 1, 2, 3}, k1, q0{200, 201, 202}, q1{1039, 1041, 1020};
  for (index_t j = 170; j < 200; ++j) k0.push_back(j);
  for (index_t j = 1000; j < 1040; j += 2) k1.push_back(j);
  const std::vector<index_t> lengths{index_t(k0.size()), index_t(k1.size())};
  const auto keys = random_tensor<S>(2, 34, kv_heads, dim, 42), values = random_tensor<S>(2, 34, kv_heads, dim_v, 43);
  const auto q = random_tensor<S>(2, 3, heads, dim, 41);
  std::vector<index_t> q_positions(q0);
  q_positions.insert(q_positions.end(), q1.begin(), q1.end());
  const std::vector<index_t>* key_positions[] = {&k0, &k1};
  for (bool paged : {false, true})
    for (masking mask : {masking::causal, masking::bidirectional})
      for (std::optional<index_t> window : {std::optional<index_t>{}, std::optional<index_t>{25}})
        for_each_policy<S>(mask, [&](const auto& bias) {
          attention_options<S> options{.mask = mask, .sliding_window = window, .num_threads = 1};
          options.sequences = std::vector<sequence>{{.batch = 0, .q_length = 3, .k_length = lengths[0]},
                                                    {.batch = 1, .q_length = 3, .k_length = lengths[1]}};
          options.q_positions = q_positions;
          pool<S> p = make_pool<S>(keys, values, lengths, 8, 0, 4);
          std::vector<index_t> contiguous_positions(2 * 34, 0);
          for (index_t s = 0; s < 2; ++s)
            for (index_t c = 0; c < lengths[std::size_t(s)]; ++c) {
              const index_t position = (*key_positions[s])[std::size_t(c)];
              contiguous_positions[std::size_t(s * 34 + c)] = position;
              p.positions[std::size_t(p.table[std::size_t(s * p.max_blocks + c / 8)] * 8 + c % 8)] = position;
            }
          if (paged) options.paged = p.paged();
          options.k_positions = paged ? std::span<const index_t>(p.positions) : std::span<const index_t>(contiguous_positions);
          const attention_result<S> got = paged ? fused(q, p.k, p.v, bias, options) : fused(q, keys, values, bias, options);
          INFO((paged ? "paged" : "contiguous") << ", mask " << masking_name(mask) << ", window " << window_text(window) << ", policy "
                                                << typeid(bias).name());
          for (index_t s = 0; s < 2; ++s) {
            const std::vector<index_t> qpos(q_positions.begin() + s * 3, q_positions.begin() + s * 3 + 3);
            const tensor<double> expected = plain_attention(copy_rows(q, s, 0, 3), copy_rows(keys, s, 0, lengths[std::size_t(s)]),
                                                            copy_rows(values, s, 0, lengths[std::size_t(s)]), qpos,
                                                            *key_positions[s], bias, options);
            CHECK(error_against(got, s, expected) < (std::is_same_v<S, float> ? 2e-5 : 1e-12));
          }
        });
}

TEMPLATE_TEST_CASE("paged: explicit positions in prefill tiles and through the 16-bit kernel", "[paged]", float, Eigen::bfloat16) {
  using K = TestType;
  // 12 queries (one packed tile for the float kernel, items of the 16-bit one) at positions
  // 141, 139, ..., 130 (unsorted) over 40 keys at 0..3 and 100..135 in blocks of 8.
  std::vector<index_t> kpos{0, 1, 2, 3}, qpos;
  for (index_t j = 100; j < 136; ++j) kpos.push_back(j);
  for (index_t r = 0; r < 12; ++r) qpos.push_back(141 - r);
  const auto q = random_tensor<float>(1, 12, heads, dim, 91);
  // Keys rounded to K once, so the plain definition sees the values the kernel reads.
  const auto keys = converted<float>(converted<K>(random_tensor<float>(1, 40, kv_heads, dim, 92)));
  const auto values = converted<float>(converted<K>(random_tensor<float>(1, 40, kv_heads, dim_v, 93)));
  pool<K> p = make_pool<K>(keys, values, {40}, 8, 0, 11);
  for (index_t c = 0; c < 40; ++c) p.positions[std::size_t(p.table[std::size_t(c / 8)] * 8 + c % 8)] = kpos[std::size_t(c)];
  for (masking mask : {masking::causal, masking::bidirectional})
    for (std::optional<index_t> window : {std::optional<index_t>{}, std::optional<index_t>{30}})
      for_each_policy<float>(mask, [&](const auto& bias) {
        attention_options<float> options{.mask = mask, .sliding_window = window, .num_threads = 1};
        options.sequences = std::vector<sequence>{{.q_length = 12, .k_length = 40}};
        options.q_positions = qpos;
        options.k_positions = p.positions;
        options.paged = p.paged();
        INFO("mask " << masking_name(mask) << ", window " << window_text(window) << ", policy " << typeid(bias).name());
        const tensor<double> expected = plain_attention(q, keys, values, qpos, kpos, bias, options);
        CHECK(error_against(fused(q, p.k, p.v, bias, options), 0, expected) < 2e-5);
      });
}

TEST_CASE("paged: explicit consecutive positions give the bits of q_start / k_start, contiguous and paged", "[paged]") {
  const std::vector<index_t> lengths{37, 50};
  const auto keys = random_tensor<float>(2, 50, kv_heads, dim, 52), values = random_tensor<float>(2, 50, kv_heads, dim_v, 53);
  const auto q = random_tensor<float>(2, 9, heads, dim, 51);
  const pool<float> p = make_pool<float>(keys, values, lengths, 16, 0, 6);
  for (masking mask : {masking::causal, masking::bidirectional})
    for_each_policy<float>(mask, [&](const auto& bias) {
      attention_options<float> options{.mask = mask, .sliding_window = 20, .num_threads = 1};
      options.sequences = decoding_sequences(lengths, 9, p.capacity());
      std::vector<index_t> q_positions(2 * 9), k_contiguous(2 * 50), k_pool(p.positions);
      for (index_t s = 0; s < 2; ++s) {
        const sequence& seq = options.sequences[std::size_t(s)];
        for (index_t r = 0; r < 9; ++r) q_positions[std::size_t(s * 9 + r)] = seq.q_start + r;
        for (index_t c = 0; c < seq.k_length; ++c) {
          k_contiguous[std::size_t(s * 50 + c)] = c;
          k_pool[std::size_t(p.table[std::size_t(s * p.max_blocks + c / 16)] * 16 + c % 16)] = c;
        }
      }
      INFO("mask " << masking_name(mask) << ", policy " << typeid(bias).name());
      const auto by_start = fused(q, keys, values, bias, options);
      attention_options<float> given = options;
      given.q_positions = q_positions;
      given.k_positions = k_contiguous;
      const auto by_positions = fused(q, keys, values, bias, given);
      CHECK(relbias_test::max_relative_error<float>(by_positions.out.view(), by_start.out.view()) == 0);
      given.k_positions = k_pool;
      given.paged = p.paged();
      auto paged_options = options;
      paged_options.paged = p.paged();
      CHECK(relbias_test::max_relative_error<float>(fused(q, p.k, p.v, bias, given).out.view(),
                                                    fused(q, p.k, p.v, bias, paged_options).out.view()) == 0);
    });
}

TEST_CASE("paged: shifting every position leaves shift-invariant policies unchanged, and FIRE below its threshold", "[paged]") {
  // The same keys and queries at positions t + ... for t = 0 and t = 1000 (llama.cpp's context
  // shift): only offsets matter to ALiBi, T5, KERPLE; FIRE normalises by the absolute query
  // position, so it moves once queries pass L (here 64): equal at t = 0 vs t = 8, not at 1000.
  const auto keys = random_tensor<float>(1, 24, kv_heads, dim, 62), values = random_tensor<float>(1, 24, kv_heads, dim_v, 63);
  const auto q = random_tensor<float>(1, 4, heads, dim, 61);
  auto run = [&](const auto& bias, index_t shift) {
    std::vector<index_t> qpos{20 + shift, 21 + shift, 22 + shift, 23 + shift}, kpos(24);
    for (index_t c = 0; c < 24; ++c) kpos[std::size_t(c)] = c + shift;
    attention_options<float> options{.mask = masking::causal, .num_threads = 1};
    options.q_positions = qpos;
    options.k_positions = kpos;
    return fused(q, keys, values, bias, options);
  };
  auto max_error = [](const attention_result<float>& a, const attention_result<float>& b) {
    return relbias_test::max_relative_error<float>(a.out.view(), b.out.view());
  };
  t5<float> t5_bias{heads, masking::causal, 8, 16};
  t5_bias.reset_parameters(1, 2.0);
  CHECK(max_error(run(alibi<float>{heads}, 1000), run(alibi<float>{heads}, 0)) < 1e-6);
  CHECK(max_error(run(t5_bias, 1000), run(t5_bias, 0)) < 1e-6);
  CHECK(max_error(run(kerple_log<float>{heads, 3}, 1000), run(kerple_log<float>{heads, 3}, 0)) < 1e-6);
  const fire<float> fire_bias{heads, 5, fire_config{.width = 12, .init_L = 64}};
  CHECK(max_error(run(fire_bias, 8), run(fire_bias, 0)) < 1e-6);    // every query below L = 64
  CHECK(max_error(run(fire_bias, 1000), run(fire_bias, 0)) > 1e-4);  // past L: psi(i) changes
}

TEST_CASE("paged: every bad argument is rejected and named", "[paged]") {
  using Catch::Contains;
  const auto keys = random_tensor<float>(2, 40, kv_heads, dim, 72), values = random_tensor<float>(2, 40, kv_heads, dim_v, 73);
  const auto q = random_tensor<float>(2, 1, heads, dim, 71);
  const std::vector<index_t> lengths{40, 17};
  pool<float> p = make_pool<float>(keys, values, lengths, 8, 0, 7);
  const alibi<float> bias{heads};
  tensor<float> o(2, 1, heads, dim_v);
  attention_options<float> good{.mask = masking::causal};
  good.sequences = decoding_sequences(lengths, 1, p.capacity());
  good.paged = p.paged();
  auto call = [&](const attention_options<float>& options) { attention(q.view(), p.k.view(), p.v.view(), bias, options, o.view()); };
  CHECK_NOTHROW(call(good));
  const index_t num_blocks = p.k.view().batch;

  // Block ids outside the pool, in a block the sequence reads.
  for (std::int32_t bad : {-1, std::int32_t(num_blocks)}) {
    pool<float> broken = p;
    broken.table[std::size_t(1 * p.max_blocks + 2)] = bad;  // sequence 1's third block (keys 16..16)
    auto options = good;
    options.paged = broken.paged();
    CHECK_THROWS_WITH(call(options), Contains("options.paged->blocks[1][2] = " + std::to_string(bad)) &&
                                         Contains("outside the pool of " + std::to_string(num_blocks) + " blocks"));
  }
  {  // -1 past the sequence's length is padding, never read
    pool<float> padded = p;
    padded.table[std::size_t(1 * p.max_blocks + 3)] = -1;
    auto options = good;
    options.paged = padded.paged();
    CHECK_NOTHROW(call(options));
  }
  {  // a table too short for the key length
    auto options = good;
    options.paged = paged_kv{8, block_table(std::span<const std::int32_t>(p.table.data(), 2 * 4), 2, 4)};
    CHECK_THROWS_WITH(call(options), Contains("options.paged->blocks row 0 is too short") && Contains("32 keys") && Contains("[0, 40)"));
  }
  {  // block sizes: not a multiple of 8, not the pools' extent
    auto options = good;
    options.paged->block_size = 12;
    CHECK_THROWS_WITH(call(options), Contains("options.paged->block_size must be a positive multiple of 8, got 12"));
    options.paged->block_size = 16;
    CHECK_THROWS_WITH(call(options), Contains("options.paged->block_size = 16") && Contains("k.seq = 8"));
    tensor<float> k12(4, 12, kv_heads, dim), v12(4, 12, kv_heads, dim_v);
    options.paged->block_size = 12;
    CHECK_THROWS_WITH(attention(q.view(), k12.view(), v12.view(), bias, options, o.view()), Contains("multiple of 8, got 12"));
  }
  {  // table rows against sequences, and no sequences at all
    auto options = good;
    options.paged = paged_kv{8, block_table(std::span<const std::int32_t>(p.table.data(), std::size_t(p.max_blocks)), 1, p.max_blocks)};
    CHECK_THROWS_WITH(call(options), Contains("has 1 rows but options.sequences has 2"));
    options = good;
    options.sequences = {};
    CHECK_THROWS_WITH(call(options), Contains("options.paged needs options.sequences"));
  }
  CHECK_THROWS_WITH(block_table(std::span<const std::int32_t>(p.table.data(), 5), 2, 3), Contains("rows * cols") && Contains("got 5"));

  // Positions: size, range, order.
  std::vector<index_t> qpos{39, 16}, kpos(p.positions.size(), 0);
  for (index_t s = 0; s < 2; ++s)
    for (index_t c = 0; c < lengths[std::size_t(s)]; ++c) kpos[std::size_t(p.table[std::size_t(s * p.max_blocks + c / 8)] * 8 + c % 8)] = c;
  auto with_positions = [&](std::vector<index_t> qs, std::vector<index_t> ks) {
    auto options = good;
    options.q_positions = qs;
    options.k_positions = ks;
    call(options);
  };
  CHECK_NOTHROW(with_positions(qpos, kpos));
  CHECK_THROWS_WITH(with_positions({39}, kpos), Contains("options.q_positions must be empty or hold one position per row of q") &&
                                                    Contains("= 2, got 1"));
  CHECK_THROWS_WITH(with_positions(qpos, {1, 2, 3}), Contains("options.k_positions") && Contains("slot of the pool") && Contains("got 3"));
  CHECK_THROWS_WITH(with_positions({39, -5}, kpos), Contains("options.q_positions[1] = -5") && Contains("[0, 2^62)"));
  CHECK_THROWS_WITH(with_positions({index_t(1) << 62, 16}, kpos), Contains("options.q_positions[0] = 4611686018427387904"));
  auto decreasing = kpos;
  const auto slot_of = [&](index_t s, index_t c) { return std::size_t(p.table[std::size_t(s * p.max_blocks + c / 8)] * 8 + c % 8); };
  decreasing[slot_of(1, 9)] = 8;  // equal to key 8's position
  CHECK_THROWS_WITH(with_positions(qpos, decreasing), Contains("options.k_positions[" + std::to_string(slot_of(1, 9)) + "] = 8") &&
                                                          Contains("of key 9 (options.sequences[1])") && Contains("increase strictly"));
  auto negative = kpos;
  negative[slot_of(0, 0)] = -1;
  CHECK_THROWS_WITH(with_positions(qpos, negative), Contains("k_positions[" + std::to_string(slot_of(0, 0)) + "] = -1"));

  // The backward and the reference kernels take contiguous keys only.
  tensor<float> dq(2, 1, heads, dim), dk(2, 40, kv_heads, dim), dv(2, 40, kv_heads, dim_v);
  std::vector<float> lse(2 * heads);
  CHECK_THROWS_WITH(attention_backward(q.view(), keys.view(), values.view(), o.view(), o.view(), lse, bias, good, dq.view(), dk.view(),
                                       dv.view()),
                    Contains("attention_backward") && Contains("options.paged is supported by the fused forward"));
  CHECK_THROWS_WITH(reference_attention(q.view(), p.k.view(), p.v.view(), bias, good), Contains("reference_attention") &&
                                                                                           Contains("options.paged"));
  attention_options<float> positioned{.mask = masking::causal};
  positioned.q_positions = qpos;
  CHECK_THROWS_WITH(reference_attention(q.view(), keys.view(), values.view(), bias, positioned), Contains("q_positions"));
}

TEST_CASE("paged: relbias::tensor starts on a cache line, and on a page from 64 KiB (a pool's blocks)", "[paged]") {
  const auto offset = [](const auto& t, std::uintptr_t alignment) { return reinterpret_cast<std::uintptr_t>(t.data()) % alignment; };
  for (index_t seq : {1, 3, 7}) {  // small tensors: odd sizes, several live at once
    const tensor<float> a(1, seq, 1, 3), b(1, seq, 1, 5);
    CHECK(offset(a, 64) == 0);
    CHECK(offset(b, 64) == 0);
  }
  const tensor<Eigen::bfloat16> pool(16, 8, 64, 64);  // 16 blocks of 64 keys, 8 heads, d = 64: 1 MiB
  const tensor<float> at_threshold(1, 16, 16, 64);     // 64 KiB exactly
  CHECK(offset(pool, 4096) == 0);
  CHECK(offset(at_threshold, 4096) == 0);
  tensor<double> moved = tensor<double>(1, 128, 8, 64);
  CHECK(offset(moved, 4096) == 0);
}
