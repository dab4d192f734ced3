#pragma once
// FIRE's fast paths for the fused kernels (bias/fire.hpp hooks them in through make_plan and
// make_gradient_accumulator).
//
// FIRE's input x(i, j) = psi(|i - j|) / (psi(max(i, L)) + eps) has one normaliser per query row.
//  * Rows with i < L share the normaliser psi(L) + eps, so there the bias is a function of the
//    distance alone: the MLP runs once per distance for all heads at once, into an offset table,
//    and the backward sums dS per (head, distance) before one MLP backward per distance.
//  * Rows with i > L have their own normaliser. The forward evaluates the MLP (Linear(1, W) ->
//    ReLU -> Linear(W, H)) as the piecewise-linear function it is (fire_pieces): one
//    multiply-add per key. The backward cuts each run of keys where units switch and sums
//    dS, dS x, dS psi and dS psi' per segment (fire_gradient_accumulator::add_row_above).
//  * A row with i == L exactly (torch.max's tie, gradient split 1/2 : 1/2) goes through the
//    policy's per-cell gradient, which implements that convention.

#include "relbias/concepts.hpp"
#include "relbias/detail/bias_plan.hpp"
#include "relbias/offset.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

namespace relbias::detail {

/// Keys handled per inner chunk: a key tile's row. Each chunk searches the MLP's pieces (forward)
/// or its units' switch points (backward) anew, so chunks of 64 cost FIRE's forward 8 % more.
inline constexpr index_t fire_chunk = 256;

/// psi(d) = log(|c| d + 1) and its derivative in c, sgn(c) d / (|c| d + 1), for the distances
/// d = first .. last that the window holds: at most Lq + Lk - 1 of them wherever the window
/// sits (a query block far past its keys starts at first = min |i - j|, not at 0).
template <class Fire>
struct fire_distance_tables {
  using S = typename Fire::scalar_type;
  index_t first, last;
  aligned_vector<S> psi, d_psi_dc;  // index d - first

  fire_distance_tables(const Fire& fire, const position_window& window)
      : first(window.min_offset() <= 0 && window.max_offset() >= 0
                  ? 0
                  : std::min(distance(window.min_offset(), 0), distance(window.max_offset(), 0))),
        last(window.max_distance()), psi(std::size_t(last - first + 1)), d_psi_dc(std::size_t(last - first + 1)) {
    for (index_t d = first; d <= last; ++d) {
      psi[std::size_t(d - first)] = fire.log_distance(d);
      d_psi_dc[std::size_t(d - first)] = fire.log_distance_derivative(d);
    }
  }

  index_t count() const noexcept { return last - first + 1; }
  const S* psi_at(index_t d) const {
    RELBIAS_ASSERT(d >= first && d <= last);
    return psi.data() + (d - first);
  }
  S d_psi_dc_at(index_t d) const {
    RELBIAS_ASSERT(d >= first && d <= last);
    return d_psi_dc[std::size_t(d - first)];
  }
};

/// Of keys [j0, j0 + n), how many come first that are at or before query i.
inline index_t keys_up_to(index_t i, index_t j0, index_t n) { return std::clamp(i + 1 - j0, index_t(0), n); }

/// x[c] = psi(|i - (j0 + c)|) / normaliser for c in [0, n): two contiguous slices of the psi
/// table, read backwards up to the query and forwards after it (packets, exact division).
template <class Tables, class S>
void fire_inputs(const Tables& tables, index_t i, index_t j0, index_t n, S normaliser, S* x) {
  using array = Eigen::Array<S, Eigen::Dynamic, 1>;
  const index_t up_to = keys_up_to(i, j0, n);
  if (up_to > 0)  // distances i - j0 down to i - j0 - up_to + 1
    Eigen::Map<array>(x, up_to) = Eigen::Map<const array>(tables.psi_at(i - j0 - up_to + 1), up_to).reverse() / normaliser;
  if (n > up_to)  // distances j0 + up_to - i up
    Eigen::Map<array>(x + up_to, n - up_to) = Eigen::Map<const array>(tables.psi_at(j0 + up_to - i), n - up_to) / normaliser;
}

/// Whether row i has the shared normaliser of the rows below the threshold.
template <class Fire>
bool below_threshold(const Fire& fire, index_t i) {
  return typename Fire::scalar_type(i) < fire.threshold();
}

/// FIRE's MLP, W2 ReLU(W1 x + b1) + b2 of a scalar x, is piecewise linear: between consecutive
/// kinks t_k = -b1[k] / W1[k] the set of active units is fixed, so on piece p
///   MLP(x)[h] = intercept[h][p] + slope[h][p] x,
/// the coefficients summed in double over the active units. Rows past L then cost one
/// multiply-add per key instead of `width` units. The values differ from the unit-by-unit sum
/// by rounding only: the MLP is continuous at every kink, so an x rounded to the wrong side of
/// one is still evaluated on a line through the same point.
template <class S>
class fire_pieces {
 public:
  template <class Fire>
  explicit fire_pieces(const Fire& fire) : heads_(fire.num_heads()) {
    const auto w1 = fire.W1(), b1 = fire.b1();
    for (index_t k = 0; k < fire.width(); ++k) {
      const S kink = -b1[k] / w1[k];
      if (w1[k] != S(0) && std::isfinite(kink)) kinks_.push_back(kink);  // else constant on finite x
    }
    std::sort(kinks_.begin(), kinks_.end());
    const index_t pieces = index_t(kinks_.size()) + 1;
    intercept_.resize(std::size_t(heads_ * pieces));
    slope_.resize(std::size_t(heads_ * pieces));
    for (index_t p = 0; p < pieces; ++p) {
      const double x = inside(p);
      for (index_t h = 0; h < heads_; ++h) {
        double a = double(fire.b2()[h]), s = 0;
        for (index_t k = 0; k < fire.width(); ++k)
          if (double(w1[k]) * x + double(b1[k]) > 0) {  // the unit is active on the whole piece
            a += double(fire.W2()(h, k)) * double(b1[k]);
            s += double(fire.W2()(h, k)) * double(w1[k]);
          }
        intercept_[std::size_t(h * pieces + p)] = S(a);
        slope_[std::size_t(h * pieces + p)] = S(s);
      }
    }
  }

  /// row[c] += MLP(x[c])[h] for c in [0, n), x monotone (either way): the keys of one piece are
  /// then contiguous, found by bisection.
  void add_monotone(index_t h, const S* x, index_t n, S* row) const {
    const index_t pieces = index_t(kinks_.size()) + 1;
    for (index_t c = 0; c < n;) {
      const index_t p = piece_of(x[c]);
      const S* end = std::partition_point(x + c, x + n, [&](S v) { return contains(p, v); });
      const index_t stop = std::max(c + 1, index_t(end - x));  // c + 1: a NaN input cannot stall
      const S a = intercept_[std::size_t(h * pieces + p)], s = slope_[std::size_t(h * pieces + p)];
      using array = Eigen::Array<S, Eigen::Dynamic, 1>;  // packets at -O2 too
      Eigen::Map<array>(row + c, stop - c) += a + s * Eigen::Map<const array>(x + c, stop - c);
      c = stop;
    }
  }

 private:
  /// Piece p holds the x with exactly p kinks at or below them: [kinks[p - 1], kinks[p]).
  index_t piece_of(S x) const { return index_t(std::upper_bound(kinks_.begin(), kinks_.end(), x) - kinks_.begin()); }
  bool contains(index_t p, S x) const {
    return (p == 0 || x >= kinks_[std::size_t(p - 1)]) && (p == index_t(kinks_.size()) || x < kinks_[std::size_t(p)]);
  }
  /// A point strictly inside piece p (in double, so between two adjacent floats too).
  double inside(index_t p) const {
    const index_t last = index_t(kinks_.size());
    if (last == 0) return 0;
    if (p == 0) return double(kinks_.front()) - std::max(1.0, std::abs(double(kinks_.front())));
    if (p == last) return double(kinks_.back()) + std::max(1.0, std::abs(double(kinks_.back())));
    return 0.5 * (double(kinks_[std::size_t(p - 1)]) + double(kinks_[std::size_t(p)]));
  }

  index_t heads_;
  aligned_vector<S> kinks_;              // sorted
  aligned_vector<S> intercept_, slope_;  // (H, pieces)
};

template <class Fire>
class fire_plan {
 public:
  using scalar_type = typename Fire::scalar_type;
  using S = scalar_type;

  fire_plan(const Fire& fire, const position_window& window)
      : fire_(fire), tables_(fire, window), below_(fire.num_heads(), window), pieces_(fire) {
    if (!below_threshold(fire, window.q_start)) return;  // no row uses the shared normaliser
    const S normaliser = fire.normalizer(window.q_start);
    const index_t heads = fire.num_heads();
    aligned_vector<S> by_distance(std::size_t(tables_.count() * heads));  // (distances, H)
    for (index_t d = tables_.first; d <= tables_.last; ++d)
      fire.mlp_all_heads(*tables_.psi_at(d) / normaliser, &by_distance[std::size_t((d - tables_.first) * heads)]);
    for (index_t h = 0; h < heads; ++h)
      below_.fill(h, [&](index_t head, index_t delta) {
        return by_distance[std::size_t((distance(delta, 0) - tables_.first) * heads + head)];
      });
  }

  /// Rows below the threshold are slices of the table; rows past it are computed (add_row).
  const S* row_values(index_t h, index_t i, index_t j0) const { return below_threshold(fire_, i) ? below_.row(h, i, j0) : nullptr; }

  void add_row(index_t h, index_t i, index_t j0, index_t n, S* row) const {
    if (const S* values = row_values(h, i, j0)) {
      add_values(values, n, row);
      return;
    }
    const S normaliser = normaliser_above(i);
    for (index_t c0 = 0; c0 < n; c0 += fire_chunk) add_chunk(h, i, j0 + c0, std::min(fire_chunk, n - c0), normaliser, row + c0);
  }

 private:
  /// psi(i) + eps for a row past the threshold: from the distance table when it holds i (psi of
  /// the same argument, so the same bits; a logarithm per row and key tile cost FIRE 1 %).
  S normaliser_above(index_t i) const {
    return i >= tables_.first && i <= tables_.last ? *tables_.psi_at(i) + fire_.eps() : fire_.normalizer(i);
  }

  /// Rows past L, one chunk of keys: the inputs, split at the diagonal into the keys up to the
  /// query (x non-increasing in j) and the keys after it (x non-decreasing).
  void add_chunk(index_t h, index_t i, index_t j0, index_t n, S normaliser, S* row) const {
    S x[fire_chunk];
    fire_inputs(tables_, i, j0, n, normaliser, x);
    const index_t split = keys_up_to(i, j0, n);
    pieces_.add_monotone(h, x, split, row);
    pieces_.add_monotone(h, x + split, n - split, row + split);
  }

  const Fire& fire_;
  fire_distance_tables<Fire> tables_;
  offset_table<S> below_;  // (H, offsets): the bias of rows with i < L
  fire_pieces<S> pieces_;  // the MLP of rows past L
};

template <class Fire>
class fire_gradient_accumulator {
 public:
  using S = typename Fire::scalar_type;

  fire_gradient_accumulator(const Fire& fire, const position_window& window)
      : fire_(fire), window_(window), tables_(fire, window), below_(std::size_t(fire.num_heads() * tables_.count()), S(0)),
        grad_(param_vector<S>::Zero(fire.parameters().size())) {}

  void add_row(index_t h, index_t i, index_t j0, index_t n, const S* ds) {
    if (below_threshold(fire_, i)) {  // sum by distance; the MLP backward runs in finish()
      S* sums = &below_[std::size_t(h * tables_.count())];
      for (index_t c = 0; c < n; ++c) sums[distance(i, j0 + c) - tables_.first] += ds[c];
    } else if (S(i) == fire_.threshold()) {
      const std::span<S> grad(grad_.data(), std::size_t(grad_.size()));
      for (index_t c = 0; c < n; ++c) fire_.accumulate_gradient(h, i, j0 + c, ds[c], grad);
    } else {
      add_row_above(h, i, j0, n, ds);
    }
  }

  void finish(std::span<S> grad) {
    const std::span<S> own(grad_.data(), std::size_t(grad_.size()));
    if (below_threshold(fire_, window_.q_start)) {
      const S normaliser = fire_.normalizer(window_.q_start);
      for (index_t d = tables_.first; d <= tables_.last; ++d) {
        const S x = *tables_.psi_at(d) / normaliser;
        S dx = 0;
        for (index_t h = 0; h < fire_.num_heads(); ++h) {
          const S g = below_[std::size_t(h * tables_.count() + d - tables_.first)];
          if (g != S(0)) dx += fire_.accumulate_mlp_gradient(h, x, g, own);
        }
        if (dx != S(0)) fire_.accumulate_input_gradient(window_.q_start, d, dx, own);
      }
    }
    for (std::size_t n = 0; n < grad.size(); ++n) grad[n] += grad_[index_t(n)];
  }

 private:
  /// Rows with i > L. Along a run of keys on one side of the diagonal x is monotone, and so is
  /// every unit's pre-activation z = W1 x + b1: a unit switches on or off at most once per run.
  /// Cutting the run where units switch leaves segments with a fixed set of active units, over
  /// which the MLP is linear in x, and the exact per-element backward sums to
  ///   dW2[h][k] += W1[k] sum(g x) + b1[k] sum(g),  dW1[k] += W2[h][k] sum(g x),
  ///   db1[k] += W2[h][k] sum(g),  db2[h] += sum(g)              (k active; ReLU'(0) = 0)
  /// and, with dx = g * slope (slope = sum of W2[h][k] W1[k] over the active k), the input
  /// gradient of the row needs sum(dx psi'(d)) and sum(dx psi(d)) only: dx/dc = psi'(d)/den -
  /// psi(d) psi'(N)/den^2 with N = i (the normaliser does not depend on L there).
  void add_row_above(index_t h, index_t i, index_t j0, index_t n, const S* ds) {
    const S normaliser = fire_.normalizer(i);
    input_sums row;
    for (index_t c0 = 0; c0 < n; c0 += fire_chunk) {
      const index_t m = std::min(fire_chunk, n - c0);
      S x[fire_chunk];
      fire_inputs(tables_, i, j0 + c0, m, normaliser, x);
      const index_t split = keys_up_to(i, j0 + c0, m);  // keys up to the query, then after
      add_monotone(h, i, j0 + c0, x, ds + c0, split, row);
      add_monotone(h, i, j0 + c0 + split, x + split, ds + c0 + split, m - split, row);
    }
    grad_[fire_.c_index()] += row.dx_dpsi / normaliser -
                              row.dx_psi * fire_.log_distance_derivative_real(S(i)) / (normaliser * normaliser);
  }

  struct input_sums {
    S dx_dpsi = 0, dx_psi = 0;
  };

  /// Unit k's activity at input x, as the per-element backward decides it.
  bool active(index_t k, S x) const { return fire_.W1()[k] * x + fire_.b1()[k] > S(0); }

  /// Keys [j0, j0 + n) with inputs x monotone: cut where units switch, then one segment at a time.
  void add_monotone(index_t h, index_t i, index_t j0, const S* x, const S* ds, index_t n, input_sums& row) {
    if (n == 0) return;
    cuts_.assign({0, n});
    for (index_t k = 0; k < fire_.width(); ++k) {
      const bool first = active(k, x[0]);
      if (first != active(k, x[n - 1]))
        cuts_.push_back(index_t(std::partition_point(x, x + n, [&](S v) { return active(k, v) == first; }) - x));
    }
    std::sort(cuts_.begin(), cuts_.end());
    for (std::size_t q = 0; q + 1 < cuts_.size(); ++q)
      if (cuts_[q] < cuts_[q + 1]) add_segment(h, i, j0 + cuts_[q], x + cuts_[q], ds + cuts_[q], cuts_[q + 1] - cuts_[q], row);
  }

  /// Keys with one set of active units (those active at x[0]).
  void add_segment(index_t h, index_t i, index_t j0, const S* x, const S* ds, index_t n, input_sums& row) {
    S g = 0, gx = 0, g_dpsi = 0, g_psi = 0;
    for (index_t c = 0; c < n; ++c) {
      const index_t d = distance(i, j0 + c);
      g += ds[c];
      gx += ds[c] * x[c];
      g_dpsi += ds[c] * tables_.d_psi_dc_at(d);
      g_psi += ds[c] * *tables_.psi_at(d);
    }
    const S* w1 = fire_.W1().data();
    const S* b1 = fire_.b1().data();
    const S* w2 = fire_.W2().data() + h * fire_.width();
    S slope = 0;
    for (index_t k = 0; k < fire_.width(); ++k) {
      if (!active(k, x[0])) continue;
      grad_[fire_.W2_index() + h * fire_.width() + k] += w1[k] * gx + b1[k] * g;
      grad_[fire_.W1_index() + k] += w2[k] * gx;
      grad_[fire_.b1_index() + k] += w2[k] * g;
      slope += w2[k] * w1[k];
    }
    grad_[fire_.b2_index() + h] += g;
    row.dx_dpsi += slope * g_dpsi;
    row.dx_psi += slope * g_psi;
  }

  const Fire& fire_;
  position_window window_;
  fire_distance_tables<Fire> tables_;
  aligned_vector<S> below_;  // (H, distances): dS summed by distance over rows with i < L
  param_vector<S> grad_;
  std::vector<index_t> cuts_;  // add_monotone's segment bounds, kept to reuse the allocation
};

}  // namespace relbias::detail
