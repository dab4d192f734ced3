#pragma once
// The only macros of relbias: its version and its internal assertion.

#define RELBIAS_VERSION_MAJOR 0
#define RELBIAS_VERSION_MINOR 1
#define RELBIAS_VERSION_PATCH 0

// Internal invariants in hot loops (tier 3 of the error model). Public entry points throw
// std::invalid_argument instead. Define RELBIAS_ASSERT before including relbias to override.
#ifndef RELBIAS_ASSERT
#include <cassert>
#define RELBIAS_ASSERT(condition) assert(condition)
#endif
