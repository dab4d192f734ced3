// ring_layout, shard and unshard: plain arithmetic, checked by hand on every rank.
#include "catch.hpp"
#include "random_tensors.hpp"

#include <relbias/distributed/sharding.hpp>

#include <algorithm>
#include <stdexcept>
#include <vector>

using namespace relbias;
using namespace relbias::distributed;

namespace {

struct window_values {
  index_t global_first, local_first, count;
  bool operator==(const window_values&) const = default;
};

std::vector<window_values> values(const std::vector<shard_window>& windows) {
  std::vector<window_values> out;
  for (const auto& w : windows) out.push_back({w.global_first, w.local_first, w.count});
  return out;
}

}  // namespace

TEST_CASE("ring_layout: contiguous shards, the first L mod P ranks one row longer", "[sharding]") {
  const ring_layout layout(10, 3, sharding::contiguous);  // 4 + 3 + 3
  CHECK(values(layout.windows(0)) == std::vector<window_values>{{0, 0, 4}});
  CHECK(values(layout.windows(1)) == std::vector<window_values>{{4, 0, 3}});
  CHECK(values(layout.windows(2)) == std::vector<window_values>{{7, 0, 3}});
  CHECK(layout.max_shard_length() == 4);
}

TEST_CASE("ring_layout: zigzag holds chunks r and 2P-1-r, the first L mod 2P chunks one row longer", "[sharding]") {
  // L = 11, P = 2: chunks of 3, 3, 3, 2 rows at 0, 3, 6, 9; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
  const ring_layout layout(11, 2, sharding::zigzag);
  CHECK(values(layout.windows(0)) == std::vector<window_values>{{0, 0, 3}, {9, 3, 2}});
  CHECK(values(layout.windows(1)) == std::vector<window_values>{{3, 0, 3}, {6, 3, 3}});
  CHECK(layout.shard_length(0) == 5);
  CHECK(layout.shard_length(1) == 6);
  // L = 5, P = 4: chunks 0..4 hold one row, chunks 5..7 none; empty windows are dropped.
  const ring_layout short_layout(5, 4, sharding::zigzag);
  CHECK(values(short_layout.windows(0)) == std::vector<window_values>{{0, 0, 1}});
  CHECK(values(short_layout.windows(3)) == std::vector<window_values>{{3, 0, 1}, {4, 1, 1}});
  // Causal balance at L = 8P: every rank's unmasked (query, key) pairs are equal.
  const ring_layout even(32, 4, sharding::zigzag);
  for (int r = 0; r < 4; ++r) {
    index_t pairs = 0;
    for (const auto& w : even.windows(r))
      for (index_t i = w.global_first; i < w.global_first + w.count; ++i) pairs += i + 1;
    CHECK(pairs == 32 * 33 / 2 / 4);
  }
}

TEST_CASE("ring_layout: fewer rows than ranks or no ranks is an error", "[sharding]") {
  CHECK_THROWS_AS(ring_layout(2, 3, sharding::contiguous), std::invalid_argument);
  CHECK_THROWS_AS(ring_layout(4, 0, sharding::zigzag), std::invalid_argument);
  CHECK_THROWS_WITH(ring_layout(2, 3, sharding::zigzag), Catch::Contains("length=2, ranks=3"));
}

TEMPLATE_TEST_CASE("shard then unshard rebuilds the tensor, any strides", "[sharding]", float, double) {
  using S = TestType;
  const auto global = relbias_test::random_tensor<S>(2, 13, 3, 4, 5);
  for (const sharding mode : {sharding::contiguous, sharding::zigzag}) {
    const ring_layout layout(13, 3, mode);
    tensor<S> rebuilt(2, 13, 3, 4);
    for (int r = 0; r < 3; ++r) {
      const tensor<S> local = shard<S>(global.view(), layout, r);
      CHECK(local.view().seq == layout.shard_length(r));
      for (const auto& w : layout.windows(r))
        CHECK(local(1, w.local_first, 2, 3) == global(1, w.global_first, 2, 3));
      unshard<S>(local.view(), layout, r, rebuilt.view());
    }
    CHECK(std::equal(rebuilt.data(), rebuilt.data() + rebuilt.size(), global.data()));
  }
  // A [b][h][row] log-sum-exp as a bhsd view with dim 1.
  std::vector<S> lse(2 * 3 * 13);
  for (std::size_t n = 0; n < lse.size(); ++n) lse[n] = S(n);
  const ring_layout layout(13, 2, sharding::zigzag);  // rank 1: rows 4..6 and 7..9
  std::vector<S> local(std::size_t(2 * 3 * layout.shard_length(1)));
  shard<S>(bhsd<const S>(lse.data(), 2, 3, 13, 1), layout, 1, bhsd(local.data(), 2, 3, 6, 1));
  CHECK(local[0] == S(4));
  CHECK(local[5] == S(9));
  CHECK(local[6] == S(13 + 4));
  CHECK_THROWS_AS(shard<S>(global.view(), layout, 2), std::invalid_argument);
}

TEST_CASE("shard and unshard deduce the type from a tensor the caller may still write", "[sharding]") {
  // docs/ring_attention.md writes `rd::shard(q_all.view(), layout, rank)` with a non-const q_all.
  tensor<float> global = relbias_test::random_tensor<float>(1, 10, 2, 3, 7);
  const ring_layout layout(10, 3, sharding::zigzag);
  tensor<float> rebuilt(1, 10, 2, 3), copy(1, layout.shard_length(1), 2, 3);
  for (int r = 0; r < 3; ++r) {
    tensor<float> local = shard(global.view(), layout, r);
    unshard(local.view(), layout, r, rebuilt.view());
  }
  CHECK(std::equal(rebuilt.data(), rebuilt.data() + rebuilt.size(), global.data()));
  shard(global.view(), layout, 1, copy.view());
  CHECK(copy(0, 0, 1, 2) == global(0, layout.windows(1).front().global_first, 1, 2));
}
