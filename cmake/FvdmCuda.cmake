# Enables CUDA for the extension. CUDA 13 rejects torch's default arch list (compute_50), so
# the list comes from TORCH_CUDA_ARCH_LIST (default 8.0;9.0); the cuBLAS/cuSPARSE/nvrtc headers
# and libraries come from the pip nvidia-* wheels.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} OR "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0")
endif()
set(FVDM_CUDA_ARCHS_STRING "$ENV{TORCH_CUDA_ARCH_LIST}")
string(REPLACE " " ";" _archs "${FVDM_CUDA_ARCHS_STRING}")
set(FVDM_CUDA_ARCHITECTURES "")
foreach(_a IN LISTS _archs)
  string(REPLACE "+PTX" "" _a "${_a}")
  string(REPLACE "." "" _a "${_a}")
  if(NOT _a STREQUAL "")
    list(APPEND FVDM_CUDA_ARCHITECTURES "${_a}")
  endif()
endforeach()

# Reported by fvdm.build_info(); a ';' inside a compile definition would split it in two.
string(REPLACE ";" " " FVDM_CUDA_ARCHS_STRING "${FVDM_CUDA_ARCHS_STRING}")

set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
set(CMAKE_CUDA_ARCHITECTURES "${FVDM_CUDA_ARCHITECTURES}")
enable_language(CUDA)

# torch's config runs the legacy FindCUDA, which guesses the toolkit root from the nvcc on PATH;
# here that is a wrapper script in /usr/local/bin, so it looked in /usr/local and found no
# cudart. Point it at the toolkit of the compiler CMake actually uses (or CUDA_HOME).
if(NOT CUDA_TOOLKIT_ROOT_DIR)
  if(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(_cuda_root "$ENV{CUDA_HOME}")
  else()
    get_filename_component(_nvcc_real "${CMAKE_CUDA_COMPILER}" REALPATH)
    get_filename_component(_cuda_root "${_nvcc_real}" DIRECTORY)
    get_filename_component(_cuda_root "${_cuda_root}" DIRECTORY)
  endif()
  set(CUDA_TOOLKIT_ROOT_DIR "${_cuda_root}" CACHE PATH "CUDA toolkit used by torch's FindCUDA")
  set(CUDAToolkit_ROOT "${_cuda_root}")
endif()

# pip's nvidia wheels (CUDA build of torch): headers and nvrtc live under site-packages.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0] + '/x'))"
  OUTPUT_VARIABLE _nvidia_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
set(FVDM_CUDA_EXTRA_INCLUDES "")
if(_nvidia_root)
  file(GLOB _nv_includes "${_nvidia_root}/cu*/include")
  list(APPEND FVDM_CUDA_EXTRA_INCLUDES ${_nv_includes})
  file(GLOB _nvrtc "${_nvidia_root}/cu*/lib/libnvrtc.so*")
  if(_nvrtc AND NOT CUDA_nvrtc_LIBRARY)
    list(GET _nvrtc 0 _nvrtc0)
    set(CUDA_nvrtc_LIBRARY "${_nvrtc0}" CACHE FILEPATH "nvrtc from the nvidia pip wheel")
  endif()
  include_directories(${FVDM_CUDA_EXTRA_INCLUDES})
endif()
