#pragma once
// FIRE's fast paths for the fused kernels (bias/fire.hpp hooks them in through make_plan and
// make_gradient_accumulator).
//
// FIRE's input x(i, j) = psi(|i - j|) / (psi(max(i, L)) + eps) has one normaliser per query row.
//  * Rows with i < L share the normaliser psi(L) + eps, so there the bias is a function of the
//    distance alone: the MLP runs once per distance for all heads at once, into an offset table,
//    and the backward sums dS per (head, distance) before one MLP backward per distance.
//  * Rows with i > L have their own normaliser: the MLP (Linear(1, W) -> ReLU -> Linear(W, H))
//    runs per element, one head at a time, vectorised over a chunk of keys with the hidden
//    units in the outer loop. The input gradient of a row needs only two sums over its keys,
//    since dx/dc splits into a distance part and a row part.
//  * A row with i == L exactly (torch.max's tie, gradient split 1/2 : 1/2) goes through the
//    policy's per-cell gradient, which implements that convention.

#include "relbias/concepts.hpp"
#include "relbias/detail/bias_plan.hpp"
#include "relbias/offset.hpp"

#include <algorithm>
#include <cmath>
#include <span>
#include <vector>

namespace relbias::detail {

/// Keys handled per inner chunk: small enough for stack buffers, long enough to vectorise.
inline constexpr index_t fire_chunk = 64;

/// psi(d) = log(|c| d + 1) and its derivative in c, sgn(c) d / (|c| d + 1), for d = 0 .. D.
template <class Fire>
struct fire_distance_tables {
  using S = typename Fire::scalar_type;
  std::vector<S> psi, d_psi_dc;

  fire_distance_tables(const Fire& fire, index_t max_distance)
      : psi(std::size_t(max_distance + 1)), d_psi_dc(std::size_t(max_distance + 1)) {
    for (index_t d = 0; d <= max_distance; ++d) {
      psi[std::size_t(d)] = fire.log_distance(d);
      d_psi_dc[std::size_t(d)] = fire.log_distance_derivative(d);
    }
  }
};

/// x[c] = psi(|i - (j0 + c)|) / normaliser for c in [0, n).
template <class S>
void fire_inputs(const std::vector<S>& psi, index_t i, index_t j0, index_t n, S normaliser, S* x) {
  for (index_t c = 0; c < n; ++c) x[c] = psi[std::size_t(distance(i, j0 + c))] / normaliser;
}

/// Whether row i has the shared normaliser of the rows below the threshold.
template <class Fire>
bool below_threshold(const Fire& fire, index_t i) {
  return typename Fire::scalar_type(i) < fire.threshold();
}

template <class Fire>
class fire_plan {
 public:
  using scalar_type = typename Fire::scalar_type;
  using S = scalar_type;

  fire_plan(const Fire& fire, const position_window& window)
      : fire_(fire), tables_(fire, window.max_distance()), below_(fire.num_heads(), window) {
    if (!below_threshold(fire, window.q_start)) return;  // no row uses the shared normaliser
    const S normaliser = fire.normalizer(window.q_start);
    std::vector<S> by_distance(std::size_t((window.max_distance() + 1) * fire.num_heads()));  // (D + 1, H)
    for (index_t d = 0; d <= window.max_distance(); ++d)
      fire.mlp_all_heads(tables_.psi[std::size_t(d)] / normaliser, &by_distance[std::size_t(d * fire.num_heads())]);
    for (index_t h = 0; h < fire.num_heads(); ++h)
      below_.fill(h, [&](index_t head, index_t delta) {
        return by_distance[std::size_t((delta < 0 ? -delta : delta) * fire.num_heads() + head)];
      });
  }

  void add_row(index_t h, index_t i, index_t j0, index_t n, S* row) const {
    if (below_threshold(fire_, i)) {
      const S* values = below_.row(h, i, j0);
      for (index_t c = 0; c < n; ++c) row[c] += values[c];
      return;
    }
    const S normaliser = fire_.normalizer(i);
    for (index_t c0 = 0; c0 < n; c0 += fire_chunk) add_chunk(h, i, j0 + c0, std::min(fire_chunk, n - c0), normaliser, row + c0);
  }

 private:
  /// The MLP of head h for up to fire_chunk keys: blocks of 16 keys outer, hidden units inner,
  /// so the 16 outputs stay in one vector register while the weights are broadcast.
  void add_chunk(index_t h, index_t i, index_t j0, index_t n, S normaliser, S* row) const {
    constexpr index_t block = 16;
    const S* w1 = fire_.W1().data();
    const S* b1 = fire_.b1().data();
    const S* w2 = fire_.W2().data() + h * fire_.width();
    for (index_t c0 = 0; c0 < n; c0 += block) {
      S x[block] = {}, out[block];
      const index_t m = std::min(block, n - c0);
      fire_inputs(tables_.psi, i, j0 + c0, m, normaliser, x);
      std::fill(out, out + block, fire_.b2()[h]);
      for (index_t k = 0; k < fire_.width(); ++k)
        for (index_t l = 0; l < block; ++l) out[l] += w2[k] * std::max(w1[k] * x[l] + b1[k], S(0));
      for (index_t l = 0; l < m; ++l) row[c0 + l] += out[l];
    }
  }

  const Fire& fire_;
  fire_distance_tables<Fire> tables_;
  offset_table<S> below_;  // (H, offsets): the bias of rows with i < L
};

template <class Fire>
class fire_gradient_accumulator {
 public:
  using S = typename Fire::scalar_type;

  fire_gradient_accumulator(const Fire& fire, const position_window& window)
      : fire_(fire), window_(window), tables_(fire, window.max_distance()),
        below_(std::size_t(fire.num_heads() * (window.max_distance() + 1)), S(0)),
        grad_(param_vector<S>::Zero(fire.parameters().size())) {}

  void add_row(index_t h, index_t i, index_t j0, index_t n, const S* ds) {
    if (below_threshold(fire_, i)) {  // sum by distance; the MLP backward runs in finish()
      S* sums = &below_[std::size_t(h * (window_.max_distance() + 1))];
      for (index_t c = 0; c < n; ++c) sums[distance(i, j0 + c)] += ds[c];
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
      for (index_t d = 0; d <= window_.max_distance(); ++d) {
        const S x = tables_.psi[std::size_t(d)] / normaliser;
        S dx = 0;
        for (index_t h = 0; h < fire_.num_heads(); ++h) {
          const S g = below_[std::size_t(h * (window_.max_distance() + 1) + d)];
          if (g != S(0)) dx += fire_.accumulate_mlp_gradient(h, x, g, own);
        }
        if (dx != S(0)) fire_.accumulate_input_gradient(window_.q_start, d, dx, own);
      }
    }
    for (std::size_t n = 0; n < grad.size(); ++n) grad[n] += grad_[index_t(n)];
  }

 private:
  /// Rows with i > L: the MLP backward per element. Keys outer, hidden units inner in blocks of
  /// 16: every running sum is then a per-hidden-unit vector the compiler keeps in registers
  /// (5 sums x 16 lanes), with no horizontal reduction to serialise on. The input gradient of
  /// the row needs sum_c dx_c psi'(d_c) and sum_c dx_c psi(d_c); as dx_c = sum_k dz_kc W1_k,
  /// both are kept per hidden unit too. dx/dc = psi'(d)/den - psi(d) psi'(N)/den^2 with N = i
  /// (the normaliser does not depend on L there). ReLU'(0) = 0 as in PyTorch.
  void add_row_above(index_t h, index_t i, index_t j0, index_t n, const S* ds) {
    const S normaliser = fire_.normalizer(i);
    S dx_dpsi = 0, dx_psi = 0, g_sum = 0;
    for (index_t c = 0; c < n; ++c) g_sum += ds[c];
    for (index_t k0 = 0; k0 < fire_.width(); k0 += hidden_block) {
      const hidden_sums sums = mlp_backward_block(h, k0, i, j0, n, ds, normaliser);
      for (index_t l = 0; l < hidden_block; ++l) {
        dx_dpsi += sums.w1[l] * sums.dz_dpsi[l];
        dx_psi += sums.w1[l] * sums.dz_psi[l];
      }
    }
    grad_[fire_.b2_index() + h] += g_sum;
    grad_[fire_.c_index()] += dx_dpsi / normaliser - dx_psi * fire_.log_distance_derivative_real(S(i)) / (normaliser * normaliser);
  }

  static constexpr index_t hidden_block = 16;
  struct hidden_sums {
    S w1[hidden_block] = {}, dz_dpsi[hidden_block] = {}, dz_psi[hidden_block] = {};
  };

  /// Hidden units [k0, k0 + 16) of head h over one row; units past the width are zero weights,
  /// whose z = 0 is inactive. Adds the W1, b1, W2 gradients and returns the row's input sums.
  hidden_sums mlp_backward_block(index_t h, index_t k0, index_t i, index_t j0, index_t n, const S* ds, S normaliser) {
    const index_t m = std::min(hidden_block, fire_.width() - k0);
    hidden_sums out;
    S b1[hidden_block] = {}, w2[hidden_block] = {};
    S g_a[hidden_block] = {}, dz_sum[hidden_block] = {}, dz_x[hidden_block] = {};
    std::copy_n(fire_.W1().data() + k0, m, out.w1);
    std::copy_n(fire_.b1().data() + k0, m, b1);
    std::copy_n(fire_.W2().data() + h * fire_.width() + k0, m, w2);
    for (index_t c = 0; c < n; ++c) {
      const S g = ds[c];
      if (g == S(0)) continue;  // hidden keys
      const std::size_t d = std::size_t(distance(i, j0 + c));
      const S psi = tables_.psi[d], dpsi = tables_.d_psi_dc[d], x = psi / normaliser;
      for (index_t l = 0; l < hidden_block; ++l) {  // branch-free, so it vectorises
        const S z = out.w1[l] * x + b1[l];
        const S dz = g * w2[l] * S(z > S(0));
        g_a[l] += g * std::max(z, S(0));
        dz_sum[l] += dz;
        dz_x[l] += dz * x;
        out.dz_dpsi[l] += dz * dpsi;
        out.dz_psi[l] += dz * psi;
      }
    }
    for (index_t l = 0; l < m; ++l) {
      grad_[fire_.W2_index() + h * fire_.width() + k0 + l] += g_a[l];
      grad_[fire_.b1_index() + k0 + l] += dz_sum[l];
      grad_[fire_.W1_index() + k0 + l] += dz_x[l];
    }
    return out;
  }

  const Fire& fire_;
  position_window window_;
  fire_distance_tables<Fire> tables_;
  std::vector<S> below_;  // (H, D + 1): dS summed by distance over rows with i < L
  param_vector<S> grad_;
};

}  // namespace relbias::detail
