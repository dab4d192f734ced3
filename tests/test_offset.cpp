#include "catch.hpp"

#include <relbias/offset.hpp>

using namespace relbias;

TEST_CASE("offset: positions and relative offsets follow the library's sign convention", "[offset]") {
  CHECK(query_position(10, 3) == 13);
  CHECK(key_position(4, 2) == 6);
  CHECK(relative_offset(13, 6) == 7);   // key in the past: positive
  CHECK(relative_offset(6, 13) == -7);  // key in the future: negative
  CHECK(distance(6, 13) == 7);
  CHECK(distance(13, 6) == 7);
}

TEST_CASE("offset: causal masks exactly the keys after the query", "[offset]") {
  CHECK_FALSE(is_masked(masking::causal, 5, 5));
  CHECK_FALSE(is_masked(masking::causal, 5, 4));
  CHECK(is_masked(masking::causal, 5, 6));
  CHECK_FALSE(is_masked(masking::bidirectional, 5, 6));
}

TEST_CASE("offset: KV-cache alignment puts the last query on the last key", "[offset]") {
  CHECK(kv_cache_q_start(1, 10) == 9);
  CHECK(kv_cache_q_start(10, 10) == 0);
  CHECK_THROWS_AS(kv_cache_q_start(0, 10), std::invalid_argument);
  CHECK_THROWS_WITH(kv_cache_q_start(11, 10), Catch::Contains("query_length=11") && Catch::Contains("key_length=10"));
}

TEST_CASE("offset: clipped table indices", "[offset]") {
  // bidirectional, K = 3: 7 entries, delta -3..3 -> 0..6
  CHECK(clipped_offset_count(masking::bidirectional, 3) == 7);
  CHECK(clipped_offset_index(masking::bidirectional, -100, 3) == 0);
  CHECK(clipped_offset_index(masking::bidirectional, -1, 3) == 2);
  CHECK(clipped_offset_index(masking::bidirectional, 0, 3) == 3);
  CHECK(clipped_offset_index(masking::bidirectional, 3, 3) == 6);
  CHECK(clipped_offset_index(masking::bidirectional, 50, 3) == 6);
  // causal, K = 3: 4 entries, future keys share entry 0 with delta = 0
  CHECK(clipped_offset_count(masking::causal, 3) == 4);
  CHECK(clipped_offset_index(masking::causal, -5, 3) == 0);
  CHECK(clipped_offset_index(masking::causal, 2, 3) == 2);
  CHECK(clipped_offset_index(masking::causal, 9, 3) == 3);
}

TEST_CASE("offset: a position window bounds the offsets that occur", "[offset]") {
  const position_window w{.q_start = 5, .query_length = 3, .k_start = 0, .key_length = 10};
  // i in [5, 7], j in [0, 9]: delta in [5 - 9, 7 - 0] = [-4, 7]
  CHECK(w.min_offset() == -4);
  CHECK(w.max_offset() == 7);
  CHECK(w.offset_count() == 12);
  CHECK(w.max_distance() == 7);
}
