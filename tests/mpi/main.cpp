// Catch2's runner inside MPI: every rank runs every test; the exit status is the worst rank's.
// Tests must make the same MPI calls on every rank, so they CHECK (never REQUIRE, which would
// leave a test early on one rank and stall the others).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include "effattn/mpi/communicator.hpp"  // <mpi.h>, without the C++ bindings

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  Catch::Session session;
  if (const int bad = session.applyCommandLine(argc, argv); bad != 0) return bad;
  if (rank != 0) session.configData().showSuccessfulTests = false;
  int result = session.run();
  MPI_Allreduce(MPI_IN_PLACE, &result, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return result;
}
