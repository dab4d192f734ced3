#pragma once
// How the fused kernels evaluate a bias policy over one attention call. A plan is built once per
// call for the call's position window; tiles then ask it to add the bias of head h to a row
// segment of scores:  plan.add_row(h, i, j0, n, row)  does  row[c] += bias(h, i, j0 + c).
//
// The plan is chosen at compile time from the policy's traits:
//   no_bias                 -> nothing to add
//   policy.make_plan(w)     -> the policy's own plan (FIRE: MLP once per distance below L)
//   shift-invariant policy  -> one table per head over the offsets of the window, O(Lq + Lk)
//                              memory; a row segment is a contiguous slice of it. A policy may
//                              fill a head's table in one call: fill_offsets(h, max_offset, out)
//                              with out[t] = at_offset(h, max_offset - t) (KERPLE does)
//   anything else           -> bias(h, i, j) per element
// A plan whose rows are slices of a table also answers plan.row_values(h, i, j0): the row's
// bias from key j0 on, contiguous, or null where it computes the values (add_row then); the
// forward adds such slices in the pass that finds the row's maximum (plan_row).

#include "relbias/bias/none.hpp"
#include "relbias/concepts.hpp"
#include "relbias/detail/parallel.hpp"
#include "relbias/offset.hpp"

#include "relbias/detail/eigen.hpp"

#include <algorithm>
#include <span>
#include <vector>

namespace relbias::detail {

/// row[c] += values[c] for c in [0, n), in Eigen packets: a plain loop needs -O3 (or GCC 12's
/// -O2 cost model skips it for the alias check), and this add runs once per score.
template <class S>
void add_values(const S* values, index_t n, S* row) {
  using array = Eigen::Array<S, Eigen::Dynamic, 1>;
  Eigen::Map<array>(row, n) += Eigen::Map<const array>(values, n);
}

/// Fallback: one call to the policy per element.
template <bias_policy Bias>
class cell_plan {
 public:
  using scalar_type = typename Bias::scalar_type;
  explicit cell_plan(const Bias& bias) : bias_(bias) {}

  void add_row(index_t h, index_t i, index_t j0, index_t n, scalar_type* row) const {
    for (index_t c = 0; c < n; ++c) row[c] += bias_(h, i, j0 + c);
  }

 private:
  const Bias& bias_;
};

/// Values of a function of the offset, tabulated per head so that the row of query i over keys
/// j0 .. j0 + n - 1 is the contiguous slice starting at (j0 - i) + max_offset. Index t holds
/// delta = max_offset - t: j grows with t, so rows read forwards.
template <class Scalar>
class offset_table {
 public:
  explicit offset_table(index_t num_heads, const position_window& window)
      : max_offset_(window.max_offset()), count_(window.offset_count()),
        values_(static_cast<std::size_t>(num_heads * count_)) {}

  template <class OffsetFunction>  // value(h, delta)
  void fill(index_t h, OffsetFunction value) {
    Scalar* out = head(h);
    for (index_t t = 0; t < count_; ++t) out[t] = value(h, max_offset_ - t);
  }

  const Scalar* row(index_t h, index_t i, index_t j0) const { return values_.data() + position(h, i, j0); }
  Scalar* row(index_t h, index_t i, index_t j0) { return values_.data() + position(h, i, j0); }
  Scalar* head(index_t h) { return values_.data() + h * count_; }
  const Scalar* head(index_t h) const { return values_.data() + h * count_; }
  index_t max_offset() const noexcept { return max_offset_; }
  index_t count() const noexcept { return count_; }

 private:
  index_t position(index_t h, index_t i, index_t j0) const {
    RELBIAS_ASSERT(j0 - i + max_offset_ >= 0 && j0 - i + max_offset_ < count_);
    return h * count_ + (j0 - i + max_offset_);
  }

  index_t max_offset_;
  index_t count_;
  aligned_vector<Scalar> values_;  // (H, offset_count)
};

/// Shift-invariant policies: at_offset(h, delta) once per head and offset of the window.
template <shift_invariant_bias Bias>
class offset_table_plan {
 public:
  using scalar_type = typename Bias::scalar_type;

  /// Large tables fill their heads in parallel: when decoding, a KERPLE table over 32768 offsets
  /// per head costs about a tenth of streaming K and V.
  offset_table_plan(const Bias& bias, const position_window& window, int threads) : table_(bias.num_heads(), window) {
    const index_t heads = index_t(bias.num_heads());
    const bool large = heads * table_.count() >= 16384;
    parallel_items(heads, large ? int(std::min<index_t>(threads, heads)) : 1, [] { return 0; }, [&](index_t h, int) {
      if constexpr (requires(std::span<scalar_type> out) { bias.fill_offsets(h, index_t(0), out); })
        bias.fill_offsets(h, table_.max_offset(), {table_.head(h), std::size_t(table_.count())});  // whole arrays
      else
        table_.fill(h, [&](index_t head, index_t delta) { return bias.at_offset(head, delta); });
    });
  }

  void add_row(index_t h, index_t i, index_t j0, index_t n, scalar_type* row) const { add_values(row_values(h, i, j0), n, row); }
  const scalar_type* row_values(index_t h, index_t i, index_t j0) const { return table_.row(h, i, j0); }

 private:
  offset_table<scalar_type> table_;
};

/// The baseline adds nothing.
template <class Scalar>
struct empty_plan {
  void add_row(index_t, index_t, index_t, index_t, Scalar*) const noexcept {}
};

/// The bias of row i from key j0 on as a contiguous slice, or null: the plan adds it (add_row).
template <class S, class Plan>
const S* plan_row(const Plan& plan, index_t h, index_t i, index_t j0) {
  if constexpr (requires { plan.row_values(h, i, j0); }) return plan.row_values(h, i, j0);
  else return nullptr;
}

/// threads: the call's thread count (thread_count()), for plans that are worth building in parallel.
template <bias_policy Bias>
auto make_bias_plan(const Bias& bias, const position_window& window, int threads) {
  using S = typename Bias::scalar_type;
  if constexpr (is_no_bias_v<Bias>) return empty_plan<S>{};
  else if constexpr (requires { bias.make_plan(window); }) return bias.make_plan(window);
  else if constexpr (shift_invariant_bias<Bias>) return offset_table_plan<Bias>(bias, window, threads);
  else return cell_plan<Bias>(bias);
}

}  // namespace relbias::detail
