# Warnings for effattn's own programs (tests, benchmarks, examples); not exported.
add_library(effattn_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(effattn_warnings INTERFACE -Wall -Wextra -Wpedantic -Wshadow
    -Wno-unknown-pragmas)
  # GCC 12 flags its own AVX-512 intrinsics headers (`__m512 __Y = __Y;`) when Eigen uses them.
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    target_compile_options(effattn_warnings INTERFACE -Wno-maybe-uninitialized)
  endif()
endif()
