# Resolves effattn's dependencies. Eigen is required; OpenMP is optional.
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
