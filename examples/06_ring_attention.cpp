// Ring attention over MPI (run: mpirun -np 2 ./example_06_ring_attention). Each rank keeps a
// zigzag shard of a causal sequence, runs the forward and backward with FIRE (its normaliser
// needs the absolute query position), and checks its rows and the summed bias gradient against
// one process running the whole sequence. Link relbias::mpi.
#include <relbias/relbias.hpp>
#include <relbias/distributed/ring_attention.hpp>

#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace rd = relbias::distributed;
using relbias::index_t;

relbias::tensor<double> wave(index_t seq, index_t heads, index_t dim, double frequency) {
  relbias::tensor<double> t(1, seq, heads, dim);
  for (index_t n = 0; n < t.size(); ++n) t.data()[n] = std::sin(frequency * double(n));
  return t;
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int rank = rd::comm_rank(), ranks = rd::comm_size();

  const index_t length = 301, heads = 4, dim = 16;  // 301 rows: shards of unequal length
  const auto q = wave(length, heads, dim, 0.37), k = wave(length, heads, dim, 0.11), v = wave(length, heads, dim, 0.23),
             d_out = wave(length, heads, dim, 0.05);
  const relbias::fire<double> bias{heads, /*seed=*/1, relbias::fire_config{.init_L = 64}};
  // This rank's rows: chunks rank and 2P-1-rank of 2P. The ring takes the same layout object.
  const rd::ring_layout layout(length, ranks, rd::sharding::zigzag);
  const rd::ring_options<double> options{{.mask = relbias::masking::causal}, layout};
  const auto my_q = rd::shard(q.view(), layout, rank), my_k = rd::shard(k.view(), layout, rank),
             my_v = rd::shard(v.view(), layout, rank), my_d_out = rd::shard(d_out.view(), layout, rank);
  const index_t rows = layout.shard_length(rank);
  relbias::tensor<double> o(1, rows, heads, dim), dq(1, rows, heads, dim), dk(1, rows, heads, dim), dv(1, rows, heads, dim);
  std::vector<double> lse(std::size_t(heads * rows)), bias_grad(std::size_t(bias.parameters().size()));
  rd::ring_attention(my_q.view(), my_k.view(), my_v.view(), bias, options, o.view(), lse, MPI_COMM_WORLD);
  rd::ring_attention_backward(my_q.view(), my_k.view(), my_v.view(), o.view(), my_d_out.view(), lse, bias, options,
                              dq.view(), dk.view(), dv.view(), bias_grad, MPI_COMM_WORLD);

  // The same on one process, over every row.
  const auto full = relbias::attention(q.view(), k.view(), v.view(), bias, options.attention);
  relbias::tensor<double> full_dq(1, length, heads, dim), full_dk(1, length, heads, dim), full_dv(1, length, heads, dim);
  std::vector<double> full_bias_grad(bias_grad.size());
  relbias::attention_backward(q.view(), k.view(), v.view(), full.out.view(), d_out.view(), full.lse, bias, options.attention,
                              full_dq.view(), full_dk.view(), full_dv.view(), full_bias_grad);

  double worst = 0;
  const auto compare = [&](const relbias::tensor<double>& mine, const relbias::tensor<double>& global) {
    const auto expected = rd::shard(global.view(), layout, rank);
    for (index_t n = 0; n < mine.size(); ++n) worst = std::max(worst, std::abs(mine.data()[n] - expected.data()[n]));
  };
  compare(o, full.out);
  compare(dq, full_dq);
  compare(dk, full_dk);
  compare(dv, full_dv);
  for (std::size_t n = 0; n < bias_grad.size(); ++n) worst = std::max(worst, std::abs(bias_grad[n] - full_bias_grad[n]));

  double worst_anywhere = 0;
  MPI_Allreduce(&worst, &worst_anywhere, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0)
    std::printf("%d ranks, zigzag causal L = %ld, FIRE: max |ring - single process| over O, dQ, dK, dV, bias grad = %.3g\n",
                ranks, long(length), worst_anywhere);
  MPI_Finalize();
  return worst_anywhere < 1e-12 ? 0 : 1;
}
