# Test-only targets: the CPU kernels (csrc/kernels/cpu/*.cpp) and the host API layer compiled for
# any x86-64 CPU (no -march=native) with their AVX-512 paths on, the intrinsics coming from SIMDe
# and csrc/emu/avx512_emu.h (csrc/kernels/cpu/simd.h chooses). Two libraries, one per bf16
# narrowing: fvdm_avx512_emu (every op; bf16 by integer rounding, as without AVX512-BF16)
# registering the ops as fvdm_avx512_emu::*, and fvdm_avx512bf16_emu (the AVX512-BF16
# instruction; the modulation ops only, which take bf16 through both narrowings: the host API
# files cost most of the build) as fvdm_avx512bf16_emu::*. Loaded by tests/test_avx512_emulation.py with torch.ops.load_library;
# never installed. FVDM_EMU_SANITIZE=ON (the default) builds them with AddressSanitizer: a masked
# tail that reads or writes past its row is an error there, as the hardware's fault suppression
# would hide it.
option(FVDM_EMU_SANITIZE "Build the emulations with AddressSanitizer" ON)

# SIMDe's headers, from the cmeel-simde pip package (site-packages/cmeel.prefix/include).
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"
  OUTPUT_VARIABLE _purelib OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
find_path(FVDM_SIMDE_INCLUDE simde/x86/avx512.h PATHS "${_purelib}/cmeel.prefix/include" NO_DEFAULT_PATH)
if(NOT FVDM_SIMDE_INCLUDE)
  message(FATAL_ERROR "SIMDe not found under ${_purelib}/cmeel.prefix/include: pip install cmeel-simde")
endif()

file(GLOB _all_sources CONFIGURE_DEPENDS
  "${PROJECT_SOURCE_DIR}/csrc/kernels/cpu/*.cpp" "${PROJECT_SOURCE_DIR}/csrc/ops/*.cpp")
set(FVDM_avx512_SOURCES ${_all_sources})
set(FVDM_avx512bf16_SOURCES
  "${PROJECT_SOURCE_DIR}/csrc/kernels/cpu/modulate_cpu.cpp" "${PROJECT_SOURCE_DIR}/csrc/ops/modulate.cpp")

foreach(_variant IN ITEMS avx512 avx512bf16)
  set(_target fvdm_${_variant}_emu)
  add_library(${_target} SHARED ${FVDM_${_variant}_SOURCES}
    "${PROJECT_SOURCE_DIR}/csrc/registration.cpp" "${PROJECT_SOURCE_DIR}/csrc/emu/avx512_emu_ops.cpp")
  target_include_directories(${_target} PRIVATE
    "${PROJECT_SOURCE_DIR}/csrc/include" "${PROJECT_SOURCE_DIR}/csrc/emu")
  target_include_directories(${_target} SYSTEM PRIVATE "${FVDM_SIMDE_INCLUDE}")
  target_link_libraries(${_target} PRIVATE ${TORCH_LIBRARIES})
  target_compile_definitions(${_target} PRIVATE FVDM_AVX512_EMULATION=1 FVDM_AVX512_EMU_NS=${_target}
    FVDM_AVX512_EMULATION_BF16=$<STREQUAL:${_variant},avx512bf16>)
  # -fopenmp-simd: the `omp simd` loops as the real build compiles them (it links OpenMP), without
  # the OpenMP runtime. No -march: the kernels' AVX-512 code runs on any x86-64 host.
  target_compile_options(${_target} PRIVATE ${TORCH_CXX_FLAGS} -O1 -g -Wall -Wno-unknown-pragmas -Wno-psabi
    -fopenmp-simd -fno-math-errno -fno-omit-frame-pointer)
  if(FVDM_EMU_SANITIZE)
    target_compile_options(${_target} PRIVATE -fsanitize=address)
    target_link_options(${_target} PRIVATE -fsanitize=address)
  endif()
endforeach()
