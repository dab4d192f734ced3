#pragma once
// What the AMX forward and backward tests share: the skip message, a problem's shape and the
// worst error found against a bound.
#include "catch.hpp"

#include <relbias/detail/amx.hpp>
#include <relbias/offset.hpp>

namespace relbias_test {

/// Prints why an AMX test checks nothing on this machine (Catch2 2 has no SKIP).
inline bool amx_or_skip() {
  namespace amx = relbias::detail::amx;
  if (amx::usable()) return true;
  WARN("skipped: no usable AMX here (compiled in: " << amx::compiled << ", detected: " << amx::detected()
                                                     << ", RELBIAS_NO_AMX or set_disabled: " << amx::disabled_flag().load() << ")");
  return false;
}

/// Batch, query and key lengths, query and key/value heads, head dimensions of q/k and of v.
struct amx_shape {
  relbias::index_t batch = 1, lq = 5, lk = 5, hq = 2, hk = 2, dim = 64, dim_v = 64;
};

/// The worst error / bound ratio over a result's elements, and the largest error itself.
struct bound_check {
  double worst_ratio = 0;
  double worst_error = 0;
};

}  // namespace relbias_test
