#pragma once
// Ring attention over MPI: sequence (context) parallel attention with exact relative biases,
// forward and backward (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; the
// lse merge of REFERENCES.md section 6). Link relbias::mpi to use it; the core stays MPI-free.
//
// Each of the P ranks of a communicator holds the rows of one shard (ring_layout) of Q, K, V
// (and dO). Forward, P steps: at step s a rank computes its queries against the key/value block
// of rank (r - s) mod P with the fused kernel, every bias at global positions (q_start / k_start
// of each window), and merges the partial (O, lse) exactly; meanwhile MPI_Isend / MPI_Irecv pass
// the block on to rank r + 1 (two buffers: compute on one, receive into the other). Causal
// window pairs whose keys all follow the queries are skipped.
//
// Backward: from the final O and lse, step s adds the local queries' dQ and the visiting block's
// dK, dV contributions. The dK / dV accumulator of a block travels with it (one step behind the
// keys, so its transfer overlaps the next step's compute) and returns to its owner after P sends.
// The bias-parameter gradient of each rank is gathered and summed in rank order on every rank.
//
// Determinism: every sum has a fixed order (dQ by step, a block's dK / dV by ring position, bias
// gradients by step, then by rank), and the kernels are deterministic for a thread count: the
// same inputs, ranks and threads give the same bits.
//
// Memory per rank, beyond the user's tensors: forward two key/value blocks and one window's
// partial O; backward two key/value blocks, two travelling dK/dV accumulators, the rank's own
// contribution and one window's dK/dV and dQ (about 5.75 blocks under zigzag), each block
// n_r x Hk x (D + Dv) per batch: O(L / P x d). The kernels hold tiles only.

#include "relbias/attention.hpp"
#include "relbias/attention_backward.hpp"
#include "relbias/attention_options.hpp"
#include "relbias/concepts.hpp"
#include "relbias/distributed/sharding.hpp"
#include "relbias/tensor.hpp"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace relbias::distributed {

/// What ring_attention takes besides tensors, bias and communicator.
template <std::floating_point Scalar>
struct ring_options {
  /// mask, window, scale and threads per rank as for relbias::attention; q_start and k_start are
  /// the absolute positions of global row 0 of the sequence (the ring adds each window's offset).
  /// options.attention.sequences is not supported (each batch element is one sequence).
  attention_options<Scalar> attention{};
  /// The layout the shards were cut with (the same object shard() took): it fixes the global
  /// length and which rows each rank holds. Two layouts of one length can give every rank the
  /// same number of rows (contiguous and zigzag both give [19, 18] at L = 37, P = 2), so shard
  /// lengths alone cannot tell them apart; hence the object, not a mode.
  ring_layout layout;
};

namespace detail {
template <class S>
struct ring_buffers;
}  // namespace detail

/// The buffers of ring_attention and ring_attention_backward (key/value and gradient blocks and
/// window temporaries, O(L/P x (D + Dv)) per head; see the file comment), kept between calls. Pass one
/// workspace to the calls of every step: fresh buffers on each call cost page faults and zeroing
/// (measured on one rank at L = 2048: forward + backward 1.75-2.4x the single-process kernel's
/// time, 1.0-1.1x with a reused workspace). A workspace stops allocating once it has grown to
/// the largest shapes. Not for concurrent calls.
template <std::floating_point Scalar>
class ring_workspace {
 public:
  /// Memory held, in bytes.
  std::size_t bytes() const noexcept;
  detail::ring_buffers<Scalar>& buffers() noexcept { return *buffers_; }  ///< internal: the kernels' storage

 private:
  std::unique_ptr<detail::ring_buffers<Scalar>> buffers_ = std::make_unique<detail::ring_buffers<Scalar>>();
};

namespace detail {

using relbias::detail::fail;

template <class S>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<S, float>) return MPI_FLOAT;
  else return MPI_DOUBLE;
}

inline void mpi_check(int code, const char* call) {
  if (code != MPI_SUCCESS) throw std::runtime_error(std::string("relbias::distributed: ") + call + " failed");
}

/// What one rank contributes to the collective check: its shapes and options, and the text of
/// its own local error (empty when its arguments are fine on their own).
struct rank_record {
  long long batch, seq, q_heads, kv_heads, dim, dim_v, mask, window, q_start, k_start, length, layout, has_scale, bias_grad;
  double scale;
  char error[512];
};

template <class S>
rank_record make_record(const tensor_view<const S>& q, const tensor_view<const S>& k, const tensor_view<const S>& v,
                        const ring_options<S>& options) {
  rank_record rec{};
  const auto& a = options.attention;
  rec.batch = q.batch, rec.seq = q.seq, rec.q_heads = q.heads, rec.kv_heads = k.heads, rec.dim = q.dim, rec.dim_v = v.dim;
  rec.mask = int(a.mask), rec.window = a.sliding_window.value_or(0), rec.q_start = a.q_start, rec.k_start = a.k_start;
  rec.length = options.layout.length(), rec.layout = int(options.layout.mode());
  rec.has_scale = a.scale.has_value();
  rec.scale = a.scale.value_or(S(0));
  return rec;
}

/// The ring's own part of the contract, on the global problem: the layout fits the communicator
/// and this rank's rows, positions fit over the whole sequence (a shard's own rows would pass
/// where the sequence's end passes 2^62, and the kernel of a later window would throw on some
/// ranks only), and no options.sequences. The rest is the single-process contract, per shard.
template <class S>
void check_ring_call(const char* where, const tensor_view<const S>& q, const ring_options<S>& options, int rank, int size) {
  const ring_layout& layout = options.layout;
  if (layout.ranks() != size)
    fail(where, "options.layout is for " + std::to_string(layout.ranks()) + " ranks, but the communicator has " +
                    std::to_string(size));
  if (!options.attention.sequences.empty())
    fail(where, "options.attention.sequences is not supported by ring attention (each batch element is one sequence of "
                "options.layout.length() rows), got " + std::to_string(options.attention.sequences.size()) + " sequences");
  relbias::detail::check_contiguous_keys(where, options.attention);
  relbias::detail::check_positions(where, options.attention, layout.length(), layout.length());
  if (q.seq != layout.shard_length(rank))
    fail(where, "q.seq (" + std::to_string(q.seq) + ") must be the " + std::to_string(layout.shard_length(rank)) +
                    " rows rank " + std::to_string(rank) + " holds in the " + sharding_name(layout.mode()) + " layout of " +
                    std::to_string(layout.length()) + " rows over " + std::to_string(size) +
                    " ranks (relbias::distributed::shard cuts them)");
}

/// The communicator's rank and size; MPI must be initialised and comm a valid intracommunicator.
/// This check is local: a rank passing MPI_COMM_NULL cannot reach the others. Callers copy the
/// pair into named ints, not a structured binding: their checks capture rank and size in a
/// lambda, which clang before 16 rejects for bindings (P1091).
inline std::pair<int, int> rank_and_size(const char* where, MPI_Comm comm) {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  if (!initialised || finalised) fail(where, "MPI must be initialised (MPI_Init) and not finalised");
  if (comm == MPI_COMM_NULL) fail(where, "comm is MPI_COMM_NULL (a communicator of size 0)");
  int inter = 0, rank = 0, size = 0;
  mpi_check(MPI_Comm_test_inter(comm, &inter), "MPI_Comm_test_inter");
  if (inter) fail(where, "comm must be an intracommunicator, got an intercommunicator");
  mpi_check(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  mpi_check(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  return {rank, size};
}

template <class S>
void check_self_attention_rows(const char* where, const tensor_view<const S>& q, const tensor_view<const S>& k) {
  if (k.seq != q.seq)
    fail(where, "k and q must hold the same rows (self-attention shards), got k.seq=" + std::to_string(k.seq) +
                    ", q.seq=" + std::to_string(q.seq));
}

/// Reports the first rank's local error, else compares every rank's record with rank 0's. Every
/// rank sees the same records, so every rank throws the same message.
inline void check_records(const char* where, const std::vector<rank_record>& records) {
  for (std::size_t r = 0; r < records.size(); ++r)
    if (records[r].error[0] != '\0') fail(where, "rank " + std::to_string(r) + ": " + records[r].error);
  const rank_record& first = records.front();
  struct field {
    const char* name;
    long long rank_record::*member;
  };
  static constexpr field fields[] = {{"batch", &rank_record::batch},       {"q.heads", &rank_record::q_heads},
                                     {"k.heads", &rank_record::kv_heads},  {"q.dim", &rank_record::dim},
                                     {"v.dim", &rank_record::dim_v},       {"options.attention.mask", &rank_record::mask},
                                     {"options.attention.sliding_window (0: none)", &rank_record::window},
                                     {"options.attention.q_start", &rank_record::q_start},
                                     {"options.attention.k_start", &rank_record::k_start},
                                     {"options.layout.length()", &rank_record::length},
                                     {"options.layout.mode() (0: contiguous, 1: zigzag)", &rank_record::layout},
                                     {"bias_grad.empty() ? 0 : 1", &rank_record::bias_grad}};
  for (std::size_t r = 1; r < records.size(); ++r) {
    for (const field& f : fields)
      if (records[r].*f.member != first.*f.member)
        fail(where, std::string(f.name) + " must be equal on every rank, got " + std::to_string(first.*f.member) +
                        " on rank 0 and " + std::to_string(records[r].*f.member) + " on rank " + std::to_string(r));
    if (records[r].has_scale != first.has_scale || (first.has_scale && records[r].scale != first.scale))
      fail(where, "options.attention.scale must be equal on every rank (rank " + std::to_string(r) + " differs from rank 0)");
  }
}

/// Every rank's local checks (its call's contract: check_ring_call, then the single-process
/// one) and shapes, shared in one MPI_Allgather before any buffer is allocated or message
/// posted: every rank throws the same std::invalid_argument on any error, or none does, and the
/// communicator stays usable for the next call.
template <class LocalChecks>
void collective_check(const char* where, MPI_Comm comm, int size, rank_record record, const ring_layout& layout,
                      LocalChecks local_checks) {
  const std::string error = relbias::detail::first_violation(local_checks);
  std::memcpy(record.error, error.data(), std::min(error.size(), sizeof record.error - 1));
  std::vector<rank_record> records(static_cast<std::size_t>(size));
  mpi_check(MPI_Allgather(&record, int(sizeof record), MPI_BYTE, records.data(), int(sizeof record), MPI_BYTE, comm),
            "MPI_Allgather");
  check_records(where, records);
  const long long block = record.batch * record.kv_heads * (record.dim + record.dim_v);
  if (layout.max_shard_length() > INT_MAX / std::max(block, 1LL))
    fail(where, "a key/value block of " + std::to_string(layout.max_shard_length()) + " rows exceeds MPI's int count");
}

/// Storage a ring call needs, kept in a ring_workspace between calls.
template <class S>
struct ring_buffers {
  std::vector<S> blocks[6];              // K/V blocks (2), dK/dV accumulators (2), contribution, call
  std::vector<S> window_out, window_lse;  // one window's partial O or dQ, and partial lse
};

template <class S>
std::size_t held_bytes(const ring_buffers<S>& buffers) {
  std::size_t values = buffers.window_out.capacity() + buffers.window_lse.capacity();
  for (const auto& block : buffers.blocks) values += block.capacity();
  return values * sizeof(S);
}

/// Grows storage to at least n values (never shrinks, so a reused workspace stops allocating).
template <class S>
S* at_least(std::vector<S>& storage, index_t n) {
  if (storage.size() < std::size_t(n)) storage.resize(std::size_t(n));
  return storage.data();
}

/// Two [batch, rows, heads, dim] tensors (K then V, or dK then dV) in one contiguous buffer, so a
/// block travels as one message. The storage is sized once for the longest shard.
template <class S>
class block_buffer {
 public:
  block_buffer(std::vector<S>& storage, index_t batch, index_t capacity, index_t heads, index_t dim, index_t dim_v)
      : data_(at_least(storage, batch * capacity * heads * (dim + dim_v))), batch_(batch), heads_(heads), dim_(dim),
        dim_v_(dim_v) {}

  void set_rows(index_t rows) { rows_ = rows; }
  index_t rows() const noexcept { return rows_; }
  tensor_view<S> first() { return bshd(data_, batch_, rows_, heads_, dim_); }
  tensor_view<S> second() { return bshd(data_ + batch_ * rows_ * heads_ * dim_, batch_, rows_, heads_, dim_v_); }
  S* data() noexcept { return data_; }
  int count() const noexcept { return int(batch_ * rows_ * heads_ * (dim_ + dim_v_)); }
  void set_zero() { std::fill_n(data_, count(), S(0)); }
  void add(const block_buffer& other) {  // element-wise, same rows
    for (int n = 0; n < count(); ++n) data_[n] += other.data_[n];
  }

 private:
  S* data_;
  index_t batch_, heads_, dim_, dim_v_, rows_ = 0;
};

/// One non-blocking send to the next rank and receive from the previous one.
class ring_transfer {
 public:
  void send(const void* data, int count, MPI_Datatype type, int to, int tag, MPI_Comm comm) {
    mpi_check(MPI_Isend(data, count, type, to, tag, comm, &requests_[0]), "MPI_Isend");
  }
  void receive(void* data, int count, MPI_Datatype type, int from, int tag, MPI_Comm comm) {
    mpi_check(MPI_Irecv(data, count, type, from, tag, comm, &requests_[1]), "MPI_Irecv");
  }
  /// Lets MPI move data while the kernels run (OpenMPI progresses transfers inside MPI calls).
  void progress() {
    int done = 0;
    mpi_check(MPI_Testall(2, requests_, &done, MPI_STATUSES_IGNORE), "MPI_Testall");
  }
  void wait_send() { mpi_check(MPI_Wait(&requests_[0], MPI_STATUS_IGNORE), "MPI_Wait"); }
  void wait_receive() { mpi_check(MPI_Wait(&requests_[1], MPI_STATUS_IGNORE), "MPI_Wait"); }
  void wait() { mpi_check(MPI_Waitall(2, requests_, MPI_STATUSES_IGNORE), "MPI_Waitall"); }

 private:
  MPI_Request requests_[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

constexpr int key_value_tag = 7301, gradient_tag = 7302;

/// The ring as one rank sees it.
struct ring {
  MPI_Comm comm;
  int rank, size;
  ring_layout layout;

  int next() const noexcept { return (rank + 1) % size; }
  int previous() const noexcept { return (rank + size - 1) % size; }
  /// Owner of the key/value block this rank works on at step s.
  int owner(int step) const noexcept { return (rank - step % size + size) % size; }
};

inline index_t max_window_length(const ring_layout& layout) {
  index_t longest = 0;
  for (int r = 0; r < layout.ranks(); ++r)
    for (const shard_window& w : layout.windows(r)) longest = std::max(longest, w.count);
  return longest;
}

/// Attention options for one (query window, key window) pair: global positions.
template <class S>
attention_options<S> window_options(const attention_options<S>& base, const shard_window& qw, const shard_window& kw) {
  attention_options<S> o = base;
  o.q_start = base.q_start + qw.global_first;
  o.k_start = base.k_start + kw.global_first;
  return o;
}

/// Causal window pairs whose first key follows the last query see nothing: skipped.
template <class S>
bool fully_masked(const attention_options<S>& o, index_t query_count) {
  return o.mask == masking::causal && o.k_start > o.q_start + query_count - 1;
}

/// Folds a partial (O, lse) over more keys into the running (o, lse) of the same rows
/// (REFERENCES.md section 6): lse = log(e^a + e^b), O = e^(a - lse) O_a + e^(b - lse) O_b. A side
/// with lse = -inf has weight 0; the first contribution is copied, so one block is exact.
/// lse rows are [b][h][row] with `rows` (running) and `part.seq` (partial) rows per head.
template <class S>
void merge_partial(const tensor_view<S>& o, std::span<S> lse, index_t rows, index_t first_row,
                   const tensor_view<const S>& part, std::span<const S> part_lse) {
  constexpr S minus_infinity = -std::numeric_limits<S>::infinity();
  for (index_t b = 0; b < o.batch; ++b)
    for (index_t h = 0; h < o.heads; ++h)
      for (index_t r = 0; r < part.seq; ++r) {
        S& running = lse[std::size_t((b * o.heads + h) * rows + first_row + r)];
        const S added = part_lse[std::size_t((b * o.heads + h) * part.seq + r)];
        auto out = o.rows(b, h, first_row + r, 1);
        const auto in = part.rows(b, h, r, 1);
        if (added == minus_infinity) continue;
        if (running == minus_infinity) {
          out = in;
          running = added;
          continue;
        }
        const S merged = std::max(running, added) + std::log1p(std::exp(-std::abs(running - added)));
        out = std::exp(running - merged) * out + std::exp(added - merged) * in;
        running = merged;
      }
}

/// Copies rows [first, first + count) of an lse laid out [b][h][row] with `rows` rows per head.
template <class S>
std::vector<S> lse_rows(std::span<const S> lse, index_t batch, index_t heads, index_t rows, index_t first, index_t count) {
  std::vector<S> out(std::size_t(batch * heads * count));
  for (index_t bh = 0; bh < batch * heads; ++bh)
    std::copy_n(lse.data() + bh * rows + first, count, out.data() + bh * count);
  return out;
}

template <class S>
void add_rows(const tensor_view<const S>& src, const tensor_view<S>& dst) {
  for (index_t b = 0; b < src.batch; ++b)
    for (index_t h = 0; h < src.heads; ++h) dst.matrix(b, h) += src.matrix(b, h);
}

template <class S>
void zero_rows(const tensor_view<S>& t) {
  for (index_t b = 0; b < t.batch; ++b)
    for (index_t h = 0; h < t.heads; ++h) t.matrix(b, h).setZero();
}

/// The forward over the ring; arguments already checked.
template <class S, class Bias>
void ring_forward(const ring& ring, const tensor_view<const S>& q, const tensor_view<const S>& k,
                  const tensor_view<const S>& v, const Bias& bias, const attention_options<S>& options,
                  const tensor_view<S>& o, std::span<S> lse, ring_buffers<S>& buffers) {
  const index_t capacity = ring.layout.max_shard_length();
  block_buffer<S> current(buffers.blocks[0], q.batch, capacity, k.heads, k.dim, v.dim);
  block_buffer<S> incoming(buffers.blocks[1], q.batch, capacity, k.heads, k.dim, v.dim);
  current.set_rows(k.seq);
  copy_rows(k, 0, current.first(), 0, k.seq);
  copy_rows(v, 0, current.second(), 0, k.seq);

  zero_rows(o);
  std::fill(lse.begin(), lse.end(), -std::numeric_limits<S>::infinity());
  const index_t window_capacity = max_window_length(ring.layout);
  S* const part = at_least(buffers.window_out, q.batch * window_capacity * q.heads * v.dim);  // a window's partial O
  S* const part_lse = at_least(buffers.window_lse, q.batch * q.heads * window_capacity);
  const auto& query_windows = ring.layout.windows(ring.rank);

  for (int step = 0; step < ring.size; ++step) {
    ring_transfer transfer;
    if (step + 1 < ring.size) {
      incoming.set_rows(ring.layout.shard_length(ring.owner(step + 1)));
      transfer.receive(incoming.data(), incoming.count(), mpi_type<S>(), ring.previous(), key_value_tag, ring.comm);
      transfer.send(current.data(), current.count(), mpi_type<S>(), ring.next(), key_value_tag, ring.comm);
    }
    for (const shard_window& qw : query_windows)
      for (const shard_window& kw : ring.layout.windows(ring.owner(step))) {
        const auto window = window_options(options, qw, kw);
        if (fully_masked(window, qw.count)) continue;
        const auto part_o = bshd(part, q.batch, qw.count, q.heads, v.dim);
        const std::span<S> part_l(part_lse, std::size_t(q.batch * q.heads * qw.count));
        attention(q.positions(qw.local_first, qw.count), current.first().positions(kw.local_first, kw.count),
                  current.second().positions(kw.local_first, kw.count), bias, window, part_o, part_l);
        merge_partial<S>(o, lse, q.seq, qw.local_first, part_o, part_l);
        transfer.progress();
      }
    transfer.wait();
    std::swap(current, incoming);
  }
}

/// Bias-parameter gradients of every rank, summed in rank order on every rank, added to grad.
template <class S>
void sum_over_ranks(const ring& ring, std::span<const S> local, std::span<S> grad) {
  std::vector<S> all(local.size() * std::size_t(ring.size));
  mpi_check(MPI_Allgather(local.data(), int(local.size()), mpi_type<S>(), all.data(), int(local.size()), mpi_type<S>(),
                          ring.comm),
            "MPI_Allgather");
  for (std::size_t n = 0; n < local.size(); ++n) {
    S sum = 0;
    for (int r = 0; r < ring.size; ++r) sum += all[std::size_t(r) * local.size() + n];
    grad[n] += sum;
  }
}

/// Inputs of the backward on one rank.
template <class S>
struct backward_inputs {
  tensor_view<const S> q, k, v, o, d_out;
  std::span<const S> lse;
};

/// The backward over the ring; arguments already checked.
template <class S, class Bias>
void ring_backward(const ring& ring, const backward_inputs<S>& in, const Bias& bias, const attention_options<S>& options,
                   const tensor_view<S>& dq, const tensor_view<S>& dk, const tensor_view<S>& dv, std::span<S> bias_grad,
                   ring_buffers<S>& buffers) {
  const auto& q = in.q;
  const index_t capacity = ring.layout.max_shard_length(), window_capacity = max_window_length(ring.layout);
  const auto block = [&](int n, index_t rows) {
    return block_buffer<S>(buffers.blocks[n], q.batch, rows, in.k.heads, in.k.dim, in.v.dim);
  };
  block_buffer<S> current = block(0, capacity), incoming = block(1, capacity);  // K, V
  block_buffer<S> accumulated[2] = {block(2, capacity), block(3, capacity)};   // a block's dK, dV summed along the ring
  block_buffer<S> contribution = block(4, capacity);                           // this rank's dK, dV of the visiting block
  block_buffer<S> call = block(5, window_capacity);                            // one kernel call's dK, dV
  S* const dq_call = at_least(buffers.window_out, q.batch * window_capacity * q.heads * q.dim);
  current.set_rows(in.k.seq);
  copy_rows(in.k, 0, current.first(), 0, in.k.seq);
  copy_rows(in.v, 0, current.second(), 0, in.k.seq);

  zero_rows(dq);
  std::vector<S> local_grad(bias_grad.size(), S(0));
  const auto& query_windows = ring.layout.windows(ring.rank);
  std::vector<std::vector<S>> window_lse;
  for (const shard_window& qw : query_windows)
    window_lse.push_back(lse_rows(in.lse, q.batch, q.heads, q.seq, qw.local_first, qw.count));

  ring_transfer gradient_sends[2];
  for (int step = 0; step < ring.size; ++step) {
    const int owner = ring.owner(step);
    ring_transfer key_values, gradient_receive;
    if (step + 1 < ring.size) {
      incoming.set_rows(ring.layout.shard_length(ring.owner(step + 1)));
      key_values.receive(incoming.data(), incoming.count(), mpi_type<S>(), ring.previous(), key_value_tag, ring.comm);
      key_values.send(current.data(), current.count(), mpi_type<S>(), ring.next(), key_value_tag, ring.comm);
    }
    block_buffer<S>& acc = accumulated[step % 2];
    gradient_sends[step % 2].wait_send();  // acc's send of step - 2 must be done before it is reused
    acc.set_rows(current.rows());
    if (step > 0) gradient_receive.receive(acc.data(), acc.count(), mpi_type<S>(), ring.previous(), gradient_tag, ring.comm);
    else acc.set_zero();

    contribution.set_rows(current.rows());
    contribution.set_zero();
    for (std::size_t w = 0; w < query_windows.size(); ++w) {
      const shard_window& qw = query_windows[w];
      for (const shard_window& kw : ring.layout.windows(owner)) {
        const auto window = window_options(options, qw, kw);
        if (fully_masked(window, qw.count)) continue;
        call.set_rows(kw.count);
        const auto dq_w = bshd(dq_call, q.batch, qw.count, q.heads, q.dim);
        attention_backward(q.positions(qw.local_first, qw.count), current.first().positions(kw.local_first, kw.count),
                           current.second().positions(kw.local_first, kw.count), in.o.positions(qw.local_first, qw.count),
                           in.d_out.positions(qw.local_first, qw.count), std::span<const S>(window_lse[w]), bias, window,
                           dq_w, call.first(), call.second(), std::span<S>(local_grad));
        add_rows<S>(dq_w, dq.positions(qw.local_first, qw.count));
        add_rows<S>(call.first(), contribution.first().positions(kw.local_first, kw.count));
        add_rows<S>(call.second(), contribution.second().positions(kw.local_first, kw.count));
        key_values.progress();
        gradient_sends[(step + 1) % 2].progress();
      }
    }
    gradient_receive.wait_receive();
    acc.add(contribution);  // earlier ranks' sum first, then ours: a fixed order
    if (ring.size > 1) gradient_sends[step % 2].send(acc.data(), acc.count(), mpi_type<S>(), ring.next(), gradient_tag, ring.comm);
    key_values.wait();
    std::swap(current, incoming);
  }

  // After P steps the accumulator of this rank's own block arrives from the previous rank.
  block_buffer<S>& own = accumulated[ring.size > 1 ? ring.size % 2 : 0];
  if (ring.size > 1) {
    gradient_sends[ring.size % 2].wait_send();
    own.set_rows(in.k.seq);
    ring_transfer final_receive;
    final_receive.receive(own.data(), own.count(), mpi_type<S>(), ring.previous(), gradient_tag, ring.comm);
    final_receive.wait_receive();
  }
  copy_rows<S>(own.first(), 0, dk, 0, in.k.seq);
  copy_rows<S>(own.second(), 0, dv, 0, in.k.seq);
  gradient_sends[0].wait_send();
  gradient_sends[1].wait_send();
  if (!bias_grad.empty()) sum_over_ranks<S>(ring, local_grad, bias_grad);
}

}  // namespace detail

/// This process's rank in `comm` and the number of ranks (MPI_Comm_rank, MPI_Comm_size).
/// Errors: std::invalid_argument if MPI is not initialised or finalised, comm is MPI_COMM_NULL or
/// an intercommunicator; std::runtime_error if MPI reports a failure.
inline int comm_rank(MPI_Comm comm = MPI_COMM_WORLD) { return detail::rank_and_size("comm_rank", comm).first; }
inline int comm_size(MPI_Comm comm = MPI_COMM_WORLD) { return detail::rank_and_size("comm_size", comm).second; }

/// Ring attention forward over `comm` (collective: every rank of comm calls it).
///
/// q [B, n_r, Hq, D], k [B, n_r, Hk, D], v [B, n_r, Hk, Dv]: this rank's rows of the global
/// sequence of L = options.layout.length() rows, n_r = options.layout.shard_length(r) (shard()
/// cuts them); self-attention, so queries and keys share the layout. o [B, n_r, Hq, Dv] and lse (empty or
/// B * Hq * n_r values, [b][h][row]) receive this rank's rows of the global result, equal to
/// relbias::attention over the whole sequence up to rounding. Any strides with a contiguous
/// last axis. The bias policy must be the same on every rank.
///
/// Errors: std::invalid_argument on every rank alike, before any buffer is allocated or any data
/// moves, for whatever relbias::attention rejects on any rank's shard (shapes, a policy whose
/// mode() contradicts the mask, a window < 1, outputs overlapping inputs), positions that pass
/// 2^62 over the whole sequence, options.attention.sequences, a layout that does not fit the
/// communicator or this rank's rows, and head counts, dims, batch, mask, window, positions,
/// layout or scale that differ between ranks; the communicator stays usable. MPI not
/// initialised or comm == MPI_COMM_NULL throws on the calling rank only (it cannot reach the
/// others).
template <bias_policy Bias, class S = typename Bias::scalar_type>
void ring_attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, const Bias& bias, const ring_options<S>& options,
                    output_tensor<S> o, output_span<S> lse, MPI_Comm comm, ring_workspace<S>& workspace) {
  // Preconditions
  constexpr const char* where = "relbias::distributed::ring_attention";
  const std::pair<int, int> rank_size = detail::rank_and_size(where, comm);
  const int rank = rank_size.first, size = rank_size.second;
  detail::collective_check(where, comm, size, detail::make_record(q, k, v, options), options.layout, [&] {
    detail::check_ring_call(where, q, options, rank, size);
    relbias::detail::check_attention_call(where, q, k, v, bias, options.attention, o, lse);
    detail::check_self_attention_rows(where, q, k);
  });
  const detail::ring ring{comm, rank, size, options.layout};

  std::vector<S> own_lse;
  if (lse.empty()) own_lse.resize(std::size_t(q.batch * q.heads * q.seq)), lse = own_lse;
  detail::ring_forward(ring, q, k, v, bias, options.attention, o, lse, workspace.buffers());
}

/// ring_attention with buffers of its own (allocated and freed in the call).
template <bias_policy Bias, class S = typename Bias::scalar_type>
void ring_attention(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, const Bias& bias, const ring_options<S>& options,
                    output_tensor<S> o, output_span<S> lse, MPI_Comm comm) {
  ring_workspace<S> workspace;
  ring_attention(q, k, v, bias, options, o, lse, comm, workspace);
}

/// Ring attention backward over `comm` (collective). Inputs as for ring_attention plus this
/// rank's rows of the forward's o and lse (required) and d_out = dL/dO [B, n_r, Hq, Dv]. dq, dk,
/// dv (shaped like q, k, v) are overwritten with this rank's rows of the global gradients.
/// bias_grad (empty, or bias.parameters().size() values) is accumulated into (+=) with the sum
/// over all ranks, added in rank order, identical on every rank. Errors as for ring_attention.
template <bias_policy Bias, class S = typename Bias::scalar_type>
void ring_attention_backward(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, input_tensor<S> o,
                             input_tensor<S> d_out, input_span<S> lse, const Bias& bias, const ring_options<S>& options,
                             output_tensor<S> dq, output_tensor<S> dk, output_tensor<S> dv, output_span<S> bias_grad,
                             MPI_Comm comm, ring_workspace<S>& workspace) {
  // Preconditions
  constexpr const char* where = "relbias::distributed::ring_attention_backward";
  const std::pair<int, int> rank_size = detail::rank_and_size(where, comm);
  const int rank = rank_size.first, size = rank_size.second;
  auto record = detail::make_record(q, k, v, options);
  record.bias_grad = bias_grad.empty() ? 0 : 1;  // all ranks or none take part in the bias-gradient sum
  detail::collective_check(where, comm, size, record, options.layout, [&] {
    detail::check_ring_call(where, q, options, rank, size);
    relbias::detail::check_attention_backward_call(where, q, k, v, o, d_out, lse, bias, options.attention, dq, dk, dv,
                                                   bias_grad);
    detail::check_self_attention_rows(where, q, k);
  });
  const detail::ring ring{comm, rank, size, options.layout};
  detail::ring_backward(ring, detail::backward_inputs<S>{q, k, v, o, d_out, lse}, bias, options.attention, dq, dk, dv,
                        bias_grad, workspace.buffers());
}

/// ring_attention_backward with buffers of its own (allocated and freed in the call).
template <bias_policy Bias, class S = typename Bias::scalar_type>
void ring_attention_backward(input_tensor<S> q, input_tensor<S> k, input_tensor<S> v, input_tensor<S> o,
                             input_tensor<S> d_out, input_span<S> lse, const Bias& bias, const ring_options<S>& options,
                             output_tensor<S> dq, output_tensor<S> dk, output_tensor<S> dv, output_span<S> bias_grad,
                             MPI_Comm comm) {
  ring_workspace<S> workspace;
  ring_attention_backward(q, k, v, o, d_out, lse, bias, options, dq, dk, dv, bias_grad, comm, workspace);
}

template <std::floating_point Scalar>
std::size_t ring_workspace<Scalar>::bytes() const noexcept {
  return detail::held_bytes(*buffers_);
}

/// The whole [B, L, H, D] tensor on every rank from each rank's shard (MPI_Allgatherv), e.g. to
/// check results or to save them; a row log-sum-exp [b][h][row] passes as bhsd(lse, B, H, n_r, 1).
/// Collective; the shard lengths must follow `layout`.
template <class S>
tensor<S> allgather_shards(tensor_view<const S> local, const ring_layout& layout, MPI_Comm comm) {
  constexpr const char* where = "relbias::distributed::allgather_shards";
  const std::pair<int, int> rank_size = detail::rank_and_size(where, comm);
  const int rank = rank_size.first, size = rank_size.second;
  if (size != layout.ranks())
    relbias::detail::fail(where, "layout.ranks() (" + std::to_string(layout.ranks()) + ") must equal the communicator size (" +
                                     std::to_string(size) + ")");
  int fits = local.seq == layout.shard_length(rank), all_fit = 0;  // agreed before the transfer
  detail::mpi_check(MPI_Allreduce(&fits, &all_fit, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  if (!all_fit) relbias::detail::fail(where, "some rank's shard length does not match the layout");
  const index_t row = local.batch * local.heads * local.dim;
  std::vector<int> counts, offsets;
  for (int r = 0, offset = 0; r < size; offset += counts.back(), ++r)
    counts.push_back(int(layout.shard_length(r) * row)), offsets.push_back(offset);
  tensor<S> packed(local.batch, local.seq, local.heads, local.dim);
  detail::copy_rows(local, 0, packed.view(), 0, local.seq);
  std::vector<S> all(std::size_t(offsets.back() + counts.back()));
  detail::mpi_check(MPI_Allgatherv(packed.data(), int(packed.size()), detail::mpi_type<S>(), all.data(), counts.data(),
                                   offsets.data(), detail::mpi_type<S>(), comm),
                    "MPI_Allgatherv");
  tensor<S> global(local.batch, layout.length(), local.heads, local.dim);
  for (int r = 0; r < size; ++r)
    unshard<S>(bshd<const S>(all.data() + offsets[std::size_t(r)], local.batch, layout.shard_length(r), local.heads, local.dim),
               layout, r, global.view());
  return global;
}

}  // namespace relbias::distributed
