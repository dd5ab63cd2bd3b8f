# Test-only target: the CUDA kernels and launchers (csrc/kernels/cuda/*.cu) compiled as C++ for
# the CPU against the CUDA emulation in csrc/emu/, with the host API layer registering the ops as
# fvdm_cuda_emu::* on CPU tensors. Loaded by tests/test_cuda_emulation.py with
# torch.ops.load_library; never installed. FVDM_EMU_SANITIZE=ON builds it with AddressSanitizer
# (run Python with libasan preloaded, as `make test-cuda-emu` does).
option(FVDM_EMU_SANITIZE "Build the CUDA emulation with AddressSanitizer" ON)

file(GLOB FVDM_EMU_CUDA_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/kernels/cuda/*.cu")
file(GLOB FVDM_EMU_OPS_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/ops/*.cpp")
set_source_files_properties(${FVDM_EMU_CUDA_SOURCES} PROPERTIES LANGUAGE CXX)

add_library(fvdm_cuda_emu SHARED
  ${FVDM_EMU_CUDA_SOURCES} ${FVDM_EMU_OPS_SOURCES}
  "${PROJECT_SOURCE_DIR}/csrc/registration.cpp"
  "${PROJECT_SOURCE_DIR}/csrc/emu/cuda_emu.cpp"
  "${PROJECT_SOURCE_DIR}/csrc/emu/emu_ops.cpp")
target_include_directories(fvdm_cuda_emu PRIVATE
  "${PROJECT_SOURCE_DIR}/csrc/include" "${PROJECT_SOURCE_DIR}/csrc/emu" "${PROJECT_SOURCE_DIR}/csrc/kernels/cuda")
target_link_libraries(fvdm_cuda_emu PRIVATE ${TORCH_LIBRARIES})
target_compile_definitions(fvdm_cuda_emu PRIVATE FVDM_CUDA_EMULATION=1)
foreach(_src ${FVDM_EMU_CUDA_SOURCES})
  set_source_files_properties(${_src} PROPERTIES COMPILE_OPTIONS "-xc++")
endforeach()
target_compile_options(fvdm_cuda_emu PRIVATE ${TORCH_CXX_FLAGS} -O1 -g -Wall -Wno-unknown-pragmas
  -fno-strict-aliasing -fno-omit-frame-pointer)
if(FVDM_EMU_SANITIZE)
  target_compile_options(fvdm_cuda_emu PRIVATE -fsanitize=address)
  target_link_options(fvdm_cuda_emu PRIVATE -fsanitize=address)
endif()
