# Warnings for effattn's own programs (tests, benchmarks, examples); not exported.
add_library(effattn_warnings INTERFACE)
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(effattn_warnings INTERFACE -Wall -Wextra -Wpedantic -Wshadow
    -Wno-unknown-pragmas)
endif()
