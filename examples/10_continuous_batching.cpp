// Continuous batching over a paged KV cache: a server keeps keys and values in one pool of
// blocks of 16 tokens (bf16, as serving caches are), allocates blocks from a free list as
// sequences grow and returns them when they finish. Every request starts with the same 32-token
// system prompt, stored once: its two blocks are in every sequence's block table. Requests
// arrive while others are decoding; each step is one attention() call in which new requests
// prefill a chunk of their prompt (after the shared prefix) and the others decode one token.
// Every step must equal running each sequence alone over a contiguous copy of its keys (same
// bits): the program exits non-zero otherwise.
#include <relbias/relbias.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <span>
#include <stdexcept>
#include <vector>

using relbias::index_t;
using kv_type = Eigen::bfloat16;

namespace {

constexpr index_t heads = 4, kv_heads = 2, dim = 16, block = 16, num_blocks = 48, system_prompt = 32, chunk = 12;

struct request {
  index_t arrives, prompt, generate;  // step of arrival, own prompt tokens (after the system prompt), tokens to generate
};

struct live_sequence {
  index_t id;
  std::vector<std::int32_t> blocks;  // its block table row: the system prompt's blocks first
  index_t filled = system_prompt;    // keys in the cache
  index_t prompt_left, generate;
  float feature = 0;  // stand-in for the model's state: the last output feeds the next token
};

/// Stand-in for a model's projections: q, k, v of the token at `position` from a feature.
void project(float feature, index_t position, float* q, float* k, float* v) {
  for (index_t n = 0; n < heads * dim; ++n) q[n] = std::sin(0.3f * float(position + n) + feature);
  for (index_t n = 0; n < kv_heads * dim; ++n) {
    k[n] = std::cos(0.2f * float(position * (n % dim + 1) + n / dim) - feature);
    v[n] = std::sin(0.7f * float(position + 2 * n) + 0.5f * feature);
  }
}

/// The pool: K and V [num_blocks, block, kv_heads, dim] and a free list of block ids.
struct block_pool {
  relbias::tensor<kv_type> k{num_blocks, block, kv_heads, dim}, v{num_blocks, block, kv_heads, dim};
  std::vector<std::int32_t> free_list;
  std::vector<int> references = std::vector<int>(num_blocks, 0);

  block_pool() {
    for (index_t b = num_blocks - 1; b >= 0; --b) free_list.push_back(std::int32_t(b));
  }
  std::int32_t allocate() {
    if (free_list.empty()) throw std::runtime_error("the pool is full");
    const std::int32_t id = free_list.back();
    free_list.pop_back();
    references[std::size_t(id)] = 1;
    return id;
  }
  void release(std::int32_t id) {
    if (--references[std::size_t(id)] == 0) free_list.push_back(id);
  }
  /// Writes the key and value of the token at `position` of a sequence whose table is `blocks`.
  void write(const std::vector<std::int32_t>& blocks, index_t position, const float* key, const float* value) {
    const index_t id = blocks[std::size_t(position / block)], row = position % block;
    for (index_t n = 0; n < kv_heads * dim; ++n) {
      k(id, row, n / dim, n % dim) = kv_type(key[n]);
      v(id, row, n / dim, n % dim) = kv_type(value[n]);
    }
  }
  /// Rows [0, length) of a sequence's keys (or values) copied into one contiguous tensor.
  relbias::tensor<kv_type> gather(const relbias::tensor<kv_type>& from, const std::vector<std::int32_t>& blocks, index_t length) const {
    relbias::tensor<kv_type> out(1, length, kv_heads, dim);
    for (index_t t = 0; t < length; ++t)
      for (index_t h = 0; h < kv_heads; ++h)
        for (index_t d = 0; d < dim; ++d) out(0, t, h, d) = from(blocks[std::size_t(t / block)], t % block, h, d);
    return out;
  }
};

}  // namespace

int main() {
  const std::vector<request> requests{{0, 20, 6}, {0, 5, 12}, {2, 30, 4}, {3, 1, 9}, {7, 17, 5}, {9, 40, 3}};
  const relbias::alibi<float> bias{heads};
  block_pool pool;

  // The system prompt, written once into two blocks that every sequence's table will name.
  std::vector<std::int32_t> shared{pool.allocate(), pool.allocate()};
  std::vector<float> q_row(heads * dim), k_row(kv_heads * dim), v_row(kv_heads * dim);
  for (index_t t = 0; t < system_prompt; ++t) {
    project(0.0f, t, q_row.data(), k_row.data(), v_row.data());
    pool.write(shared, t, k_row.data(), v_row.data());
  }

  std::vector<live_sequence> live;
  std::size_t next_request = 0;
  index_t steps = 0, most_live = 0, most_blocks = 0, prefill_rows = 0, decode_rows = 0;
  bool all_equal = true;
  for (; next_request < requests.size() || !live.empty(); ++steps) {
    for (; next_request < requests.size() && requests[next_request].arrives <= steps; ++next_request) {
      live.push_back({index_t(next_request), shared, system_prompt, requests[next_request].prompt, requests[next_request].generate});
      for (std::int32_t id : shared) ++pool.references[std::size_t(id)];
    }
    if (live.empty()) continue;

    // This step's queries: a chunk of the prompt, or one generated token. Their keys and values
    // go into the cache first (a new block from the free list when the last one is full).
    const auto count = index_t(live.size());
    relbias::tensor<float> q(count, chunk, heads, dim);
    std::vector<relbias::sequence> sequences;
    index_t max_blocks = 0;
    for (index_t n = 0; n < count; ++n) {
      live_sequence& s = live[std::size_t(n)];
      const index_t rows = s.prompt_left > 0 ? std::min(s.prompt_left, chunk) : 1;
      (s.prompt_left > 0 ? prefill_rows : decode_rows) += rows;
      for (index_t r = 0; r < rows; ++r, ++s.filled) {
        if (s.filled % block == 0) s.blocks.push_back(pool.allocate());
        project(s.feature, s.filled, &q(n, r, 0, 0), k_row.data(), v_row.data());
        pool.write(s.blocks, s.filled, k_row.data(), v_row.data());
      }
      s.prompt_left = std::max<index_t>(0, s.prompt_left - rows);
      sequences.push_back({.batch = n, .q_length = rows, .k_length = s.filled, .q_start = s.filled - rows});
      max_blocks = std::max(max_blocks, index_t(s.blocks.size()));
    }
    std::vector<std::int32_t> table(std::size_t(count * max_blocks), -1);  // [sequences, max_blocks], -1: unused
    for (index_t n = 0; n < count; ++n) std::copy(live[std::size_t(n)].blocks.begin(), live[std::size_t(n)].blocks.end(),
                                                  table.begin() + n * max_blocks);

    relbias::attention_options<float> options{.mask = relbias::masking::causal};
    options.sequences = sequences;
    options.paged = relbias::paged_kv{block, relbias::block_table(std::span<const std::int32_t>(table), count, max_blocks)};
    const auto out = relbias::attention(q.view(), pool.k.view(), pool.v.view(), bias, options);

    // Check: each sequence alone, its keys copied out of the pool into contiguous tensors.
    for (index_t n = 0; n < count; ++n) {
      live_sequence& s = live[std::size_t(n)];
      const relbias::sequence& seq = sequences[std::size_t(n)];
      const auto k = pool.gather(pool.k, s.blocks, s.filled), v = pool.gather(pool.v, s.blocks, s.filled);
      relbias::tensor<float> q_alone(1, seq.q_length, heads, dim);
      std::copy(&q(n, 0, 0, 0), &q(n, 0, 0, 0) + seq.q_length * heads * dim, q_alone.data());
      const relbias::attention_options<float> alone_options{.mask = relbias::masking::causal, .q_start = seq.q_start};
      const auto alone = relbias::attention(q_alone.view(), k.view(), v.view(), bias, alone_options);
      for (index_t r = 0; r < seq.q_length; ++r)
        for (index_t h = 0; h < heads; ++h)
          for (index_t d = 0; d < dim; ++d) all_equal = all_equal && out.out(n, r, h, d) == alone.out(0, r, h, d);
      s.feature = out.out(n, seq.q_length - 1, 0, 0);
    }
    most_live = std::max(most_live, count);
    most_blocks = std::max(most_blocks, num_blocks - index_t(pool.free_list.size()));

    // Sequences that generated their tokens finish and return their blocks (the shared ones
    // stay while any other sequence names them).
    for (live_sequence& s : live)
      if (s.prompt_left == 0 && --s.generate == 0)  // the last prompt row's output is the first token
        for (std::int32_t id : s.blocks) pool.release(id);
    std::erase_if(live, [](const live_sequence& s) { return s.generate == 0; });
  }
  const bool all_returned = index_t(pool.free_list.size()) == num_blocks - 2;  // the system prompt's two blocks remain

  std::printf("%zu requests over %ld steps (one call each): %ld prompt rows prefilled in chunks of up to %ld, %ld tokens decoded;\n"
              "up to %ld sequences at once sharing the %ld-token system prompt's 2 blocks, up to %ld of %ld blocks in use; "
              "every block returned: %s\n",
              requests.size(), long(steps), long(prefill_rows), long(chunk), long(decode_rows), long(most_live), long(system_prompt),
              long(most_blocks), long(num_blocks), all_returned ? "yes" : "NO");
  std::printf("every step equals each sequence run alone over contiguous keys: %s\n", all_equal ? "yes" : "NO");
  return all_equal && all_returned ? 0 : 1;
}
