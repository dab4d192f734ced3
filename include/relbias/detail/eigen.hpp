#pragma once
// Eigen, included once for every relbias header.
//
// GCC 12 with AVX-512 (-march=native on such a machine) and -Wall reports "'__Y' may be used
// uninitialized" (-O2, -O3; "is used uninitialized" at -O1) over a hundred times inside its own
// avx512fintrin.h once Eigen's packet code is inlined (GCC bug 105593, fixed in GCC 13): a false
// positive on the intrinsics' deliberately undefined vectors, which -isystem does not hide.
// Middle-end warnings are judged by the pragma state where the intrinsics' text was read, so
// ignoring these two warnings while Eigen/Core (and the intrinsics headers it pulls in) is read
// silences them for Eigen's code only; the user's code keeps every warning. A program that
// includes Eigen before relbias needs the same lines around its own first Eigen include.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <vector>

namespace relbias::detail {

/// Storage for buffers that Eigen maps and reduces or evaluates in packets. Eigen peels scalar
/// steps up to the first aligned address, so over malloc'd memory (16-byte aligned, wherever the
/// heap's history puts it) the rounding would depend on the address; Eigen's allocator fixes the
/// alignment, so the same values give the same bits on every run.
template <class S>
using aligned_vector = std::vector<S, Eigen::aligned_allocator<S>>;

}  // namespace relbias::detail
