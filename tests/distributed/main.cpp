// Catch2 runner for the MPI tests: every rank runs every test case in the same order (they call
// collectives), and the exit code is the worst over the ranks.
#define CATCH_CONFIG_RUNNER
#include "catch.hpp"

#include <mpi.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int failed = Catch::Session().run(argc, argv);
  int worst = 0;
  MPI_Allreduce(&failed, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
