// Ring attention (relbias::distributed) against one process, and the numbers of the bandwidth
// model in bench/README.md. A timing driver run under mpirun (Google Benchmark has no notion of
// ranks); every figure is a median of repetitions interleaved within one run.
//
//   mpirun -np 2 --bind-to none bench_ring speed <policy> <L> <repetitions>
//       causal zigzag and bidirectional, 8 heads, d = 64, fp32, batch 1: forward and backward wall
//       time of (a) one process on P threads (the other ranks idle, sleeping) and (b) the P-rank
//       ring with one thread per rank; prints both and the ratio ring / single.
//   mpirun -np P bench_ring memory <policy> <L>
//       one causal zigzag forward + backward; peak RSS of every rank (getrusage), and the size of
//       the rank's own tensors (q, k, v, o, dO, dq, dk, dv) for comparison.
//   bench_ring rates <n> <d> <repetitions>
//       one thread: CPU time of one ring step's kernels (an n x n bidirectional block, 8 heads, head
//       size d) per policy, forward and backward, and the bytes that step sends: the link
//       bandwidth below which the transfer takes longer than the compute it overlaps.
#include "policies.hpp"

#include <relbias/attention.hpp>
#include <relbias/attention_backward.hpp>
#include <relbias/distributed/ring_attention.hpp>

#include <mpi.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace relbias;
using namespace relbias_bench;
namespace rd = relbias::distributed;

namespace {

/// A barrier that sleeps instead of spinning, so an idle rank leaves its core to the others.
void quiet_barrier() {
  MPI_Request request;
  MPI_Ibarrier(MPI_COMM_WORLD, &request);
  for (int done = 0;;) {
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (done) return;
    usleep(2000);
  }
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

tensor<float> random_tensor(index_t seq, index_t num_heads, index_t head_dim, std::uint64_t seed) {
  tensor<float> t(1, seq, num_heads, head_dim);
  detail::random_stream rng(seed);
  for (index_t n = 0; n < t.size(); ++n) t.data()[n] = float(rng.uniform(-1, 1));
  return t;
}

/// Inputs, outputs and gradients of one pass (the whole sequence or one rank's shard).
struct buffers {
  tensor<float> q, k, v, d_out, o, dq, dk, dv;
  std::vector<float> lse, bias_grad;

  buffers(index_t rows, index_t head_dim, std::size_t parameters)
      : q(random_tensor(rows, heads, head_dim, 1)), k(random_tensor(rows, heads, head_dim, 2)),
        v(random_tensor(rows, heads, head_dim, 3)), d_out(random_tensor(rows, heads, head_dim, 4)), o(1, rows, heads, head_dim),
        dq(1, rows, heads, head_dim), dk(1, rows, heads, head_dim), dv(1, rows, heads, head_dim),
        lse(std::size_t(heads * rows)), bias_grad(parameters) {}
  double mib() const { return 8.0 * double(q.size()) * sizeof(float) / (1024.0 * 1024.0); }
};

template <class Bias>
std::size_t parameter_count(const Bias& bias) {
  if constexpr (learned_bias<Bias>) return std::size_t(bias.parameters().size());
  else return 0;
}

struct pass_times {
  double forward, backward;
};

double wall_seconds() { return MPI_Wtime(); }

/// CPU time of the process: on a shared machine, the compute a pass needs whatever else runs.
double cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

template <class Bias>
pass_times time_single(const Bias& bias, buffers& b, const attention_options<float>& options, double (*now)() = wall_seconds) {
  const double t0 = now();
  attention(b.q.view(), b.k.view(), b.v.view(), bias, options, b.o.view(), b.lse);
  const double t1 = now();
  attention_backward(b.q.view(), b.k.view(), b.v.view(), b.o.view(), b.d_out.view(), b.lse, bias, options, b.dq.view(),
                     b.dk.view(), b.dv.view(), b.bias_grad);
  return {t1 - t0, now() - t1};
}

template <class Bias>
pass_times time_ring(const Bias& bias, buffers& b, const rd::ring_options<float>& options, rd::ring_workspace<float>& workspace) {
  MPI_Barrier(MPI_COMM_WORLD);
  const double t0 = MPI_Wtime();
  rd::ring_attention(b.q.view(), b.k.view(), b.v.view(), bias, options, b.o.view(), b.lse, MPI_COMM_WORLD, workspace);
  const double t1 = MPI_Wtime();
  rd::ring_attention_backward(b.q.view(), b.k.view(), b.v.view(), b.o.view(), b.d_out.view(), b.lse, bias, options,
                              b.dq.view(), b.dk.view(), b.dv.view(), b.bias_grad, MPI_COMM_WORLD, workspace);
  pass_times local{t1 - t0, MPI_Wtime() - t1}, slowest{};
  MPI_Allreduce(&local, &slowest, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);  // the ring is as fast as its slowest rank
  return slowest;
}

template <class Bias>
void speed(const char* name, index_t length, int repetitions) {
  const int rank = rd::comm_rank(), ranks = rd::comm_size();
  for (const masking mask : {masking::causal, masking::bidirectional}) {
    const Bias bias = make_bias<Bias>(mask);
    const rd::sharding mode = mask == masking::causal ? rd::sharding::zigzag : rd::sharding::contiguous;
    const rd::ring_layout layout(length, ranks, mode);
    buffers shard(layout.shard_length(rank), dim, parameter_count(bias));
    rd::ring_workspace<float> workspace;  // reused across repetitions, as in training
    std::vector<double> single_fwd, single_bwd, ring_fwd, ring_bwd;
    for (int rep = 0; rep < repetitions; ++rep) {
      if (rank == 0) {
        buffers whole(length, dim, parameter_count(bias));  // allocated inside: the ring's ranks do not pay for it
        const auto t = time_single(bias, whole, {.mask = mask, .num_threads = ranks});
        single_fwd.push_back(t.forward), single_bwd.push_back(t.backward);
      }
      quiet_barrier();
      const auto t = time_ring(bias, shard, {{.mask = mask, .num_threads = 1}, layout}, workspace);
      ring_fwd.push_back(t.forward), ring_bwd.push_back(t.backward);
    }
    if (rank == 0) {
      const double sf = median(single_fwd), sb = median(single_bwd), rf = median(ring_fwd), rb = median(ring_bwd);
      std::printf("| %s | %s | %ld | %d | %.0f | %.0f | %.0f | %.0f | %.2fx | %.2fx | %.2fx |\n", name,
                  mask == masking::causal ? "causal zigzag" : "bidirectional", long(length), ranks, sf * 1e3, rf * 1e3,
                  sb * 1e3, rb * 1e3, rf / sf, rb / sb, (rf + rb) / (sf + sb));
      std::fflush(stdout);
    }
  }
}

template <class Bias>
void memory(const char* name, index_t length) {
  const int rank = rd::comm_rank(), ranks = rd::comm_size();
  const Bias bias = make_bias<Bias>(masking::causal);
  const rd::ring_layout layout(length, ranks, rd::sharding::zigzag);
  buffers shard(layout.shard_length(rank), dim, parameter_count(bias));
  rd::ring_workspace<float> workspace;
  const auto t = time_ring(bias, shard, {{.mask = masking::causal, .num_threads = 1}, layout}, workspace);
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double peak_mib = double(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
  std::vector<double> peaks(static_cast<std::size_t>(ranks));
  MPI_Gather(&peak_mib, 1, MPI_DOUBLE, peaks.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank == 0)
    for (int r = 0; r < ranks; ++r)
      std::printf("policy=%s L=%ld P=%d rank=%d rows=%ld peak_rss_MiB=%.0f own_tensors_MiB=%.0f forward_s=%.1f backward_s=%.1f\n",
                  name, long(length), ranks, r, long(layout.shard_length(r)), peaks[std::size_t(r)], shard.mib(), t.forward,
                  t.backward);
}

template <class Bias>
void rates(const char* name, index_t rows, index_t head_dim, int repetitions) {
  const Bias bias = make_bias<Bias>(masking::bidirectional);
  buffers b(rows, head_dim, parameter_count(bias));
  std::vector<double> forward, backward;
  for (int rep = 0; rep < repetitions; ++rep) {
    const auto t = time_single(bias, b, {.mask = masking::bidirectional, .num_threads = 1}, cpu_seconds);
    forward.push_back(t.forward), backward.push_back(t.backward);
  }
  // A forward step sends one K, V block; a backward step that block and its dK, dV accumulator.
  const double block_bytes = 2.0 * double(rows * heads * head_dim) * sizeof(float);
  const double f = median(forward), bw = median(backward);
  std::printf("| %s | %ld | %ld | %.1f | %.1f | %.1f | %.0f | %.0f |\n", name, long(head_dim), long(rows), block_bytes / 1e6,
              f * 1e3, bw * 1e3, block_bytes / f / 1e6, 2 * block_bytes / bw / 1e6);
  std::fflush(stdout);
}

int usage(const char* program) {
  std::fprintf(stderr,
               "usage: %s speed <policy> <L> <repetitions> | memory <policy> <L> | rates <n> <d> <repetitions>\n", program);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 0;
  const std::string command = argc > 1 ? argv[1] : "";
  if (command == "rates" && argc == 5) {
    if (rd::comm_rank() == 0) {
      std::printf("| policy | d | n | K+V block MB | forward step ms | backward step ms | forward MB/s | backward MB/s |\n"
                  "|---|---|---|---|---|---|---|---|\n");
      for_each_policy([&]<class Bias>(const char* name) { rates<Bias>(name, std::stol(argv[2]), std::stol(argv[3]), std::atoi(argv[4])); });
    }
  } else if ((command == "speed" && argc == 5) || (command == "memory" && argc == 4)) {
    bool found = false;
    for_each_policy([&]<class Bias>(const char* name) {
      if (argv[2] != std::string(name)) return;
      found = true;
      if (command == "memory") memory<Bias>(name, std::stol(argv[3]));
      else {
        if (rd::comm_rank() == 0)
          std::printf("| policy | mode | L | P | single fwd ms | ring fwd ms | single bwd ms | ring bwd ms | fwd ratio | bwd "
                      "ratio | total ratio |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
        speed<Bias>(name, std::stol(argv[3]), std::atoi(argv[4]));
      }
    });
    if (!found) std::fprintf(stderr, "unknown policy %s\n", argv[2]);
    status = found ? 0 : 2;
  } else {
    status = rd::comm_rank() == 0 ? usage(argv[0]) : 2;
  }
  MPI_Finalize();
  return status;
}
