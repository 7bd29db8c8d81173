# Resolves effattn's dependencies. Eigen is required; OpenMP, nlohmann_json and MPI are optional.
find_package(Eigen3 3.4 REQUIRED NO_MODULE)

set(EFFATTN_WITH_OPENMP OFF)
if(EFFATTN_USE_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    set(EFFATTN_WITH_OPENMP ON)
  else()
    message(STATUS "effattn: OpenMP not found; everything runs on one thread")
  endif()
endif()

# nlohmann_json (Debian: nlohmann-json3-dev) parses the header of safetensors checkpoints; only
# effattn/training/safetensors.hpp needs it.
set(EFFATTN_WITH_JSON OFF)
find_package(nlohmann_json 3.10 QUIET)
if(nlohmann_json_FOUND)
  set(EFFATTN_WITH_JSON ON)
else()
  message(STATUS "effattn: nlohmann_json not found; effattn/training/safetensors.hpp unavailable")
endif()

# MPI (Debian: libopenmpi-dev openmpi-bin) for the sequence-parallel layers in effattn/mpi/,
# target effattn::mpi. Only its C interface is used.
set(EFFATTN_WITH_MPI OFF)
if(EFFATTN_USE_MPI)
  set(MPI_CXX_SKIP_MPICXX ON)
  find_package(MPI COMPONENTS CXX QUIET)
  if(MPI_CXX_FOUND)
    set(EFFATTN_WITH_MPI ON)
  else()
    message(STATUS "effattn: MPI not found; effattn::mpi (effattn/mpi/) unavailable")
  endif()
endif()
