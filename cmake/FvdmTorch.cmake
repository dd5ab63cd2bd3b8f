# Needs Python found. Finds torch (find_package(Torch)) and pybind11, and defines fvdm_configure_target().

if(NOT CMAKE_PREFIX_PATH)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import torch; print(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _torch_prefix OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
  list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")
endif()
find_package(Torch REQUIRED CONFIG)

if(NOT pybind11_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -m pybind11 --cmakedir
    OUTPUT_VARIABLE pybind11_DIR OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
endif()
find_package(pybind11 CONFIG REQUIRED)

find_package(OpenMP)
find_library(TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)

function(fvdm_configure_target target)
  target_include_directories(${target} PRIVATE "${PROJECT_SOURCE_DIR}/csrc/include")
  target_link_libraries(${target} PRIVATE ${TORCH_LIBRARIES} "${TORCH_PYTHON_LIBRARY}")
  target_compile_definitions(${target} PRIVATE
    FVDM_VERSION="${FVDM_VERSION}"
    FVDM_TORCH_VERSION="${Torch_VERSION}"
    TORCH_EXTENSION_NAME=_C)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${TORCH_CXX_FLAGS}>)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-O3 -Wall -Wno-unknown-pragmas -fno-math-errno>)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
      # GCC turns the kernels' short vector row copies (convert.h) into memmove calls; a call
      # per 64..1152-value row was a fifth of temporal attention's forward time (perf).
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fno-tree-loop-distribute-patterns>)
    endif()
    if(FVDM_NATIVE)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-march=native -mprefer-vector-width=512>)
    endif()
  endif()
  if(OpenMP_CXX_FOUND)
    # at::parallel_for uses torch's OpenMP pool; the flag lets our loops use `omp simd`.
    target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
    target_compile_definitions(${target} PRIVATE FVDM_WITH_OPENMP=1)
  endif()
  if(FVDM_WITH_CUDA)
    target_compile_definitions(${target} PRIVATE FVDM_WITH_CUDA=1 FVDM_CUDA_ARCHS="${FVDM_CUDA_ARCHS_STRING}")
    target_include_directories(${target} PRIVATE ${FVDM_CUDA_EXTRA_INCLUDES})
    set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${FVDM_CUDA_ARCHITECTURES}")
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 --use_fast_math --expt-relaxed-constexpr -lineinfo>)
  endif()
endfunction()
