#pragma once
// Eigen, included once for every relbias header.
//
// GCC 12 at -O2/-O3 with AVX-512 (-march=native on such a machine) and -Wall reports "'__Y' may
// be used uninitialized" over a hundred times inside its own avx512fintrin.h once Eigen's packet
// code is inlined (GCC bug 105593, fixed in GCC 13): a false positive that -isystem does not
// hide. Middle-end warnings are judged by the pragma state where the intrinsics' text was read,
// so ignoring that one warning while Eigen/Core (and the intrinsics headers it pulls in) is read
// silences it for Eigen's code only; the user's code keeps every warning. A program that includes
// Eigen before relbias needs the same three lines around its own first Eigen include.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
