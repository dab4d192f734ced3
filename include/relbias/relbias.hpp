#pragma once
// relbias: relative positional attention biases. Includes every public header.

// Foundations
#include "relbias/concepts.hpp"
#include "relbias/config.hpp"
#include "relbias/offset.hpp"
#include "relbias/paged.hpp"
#include "relbias/sequences.hpp"
#include "relbias/tensor.hpp"

// Bias policies
#include "relbias/bias/alibi.hpp"
#include "relbias/bias/fire.hpp"
#include "relbias/bias/kerple.hpp"
#include "relbias/bias/none.hpp"
#include "relbias/bias/per_offset.hpp"
#include "relbias/bias/sandwich.hpp"
#include "relbias/bias/t5.hpp"

// Kernels
#include "relbias/attention.hpp"
#include "relbias/attention_backward.hpp"
#include "relbias/attention_half.hpp"
#include "relbias/attention_options.hpp"
#include "relbias/attention_reference.hpp"
#include "relbias/attention_reference_backward.hpp"

// Training
#include "relbias/train.hpp"
