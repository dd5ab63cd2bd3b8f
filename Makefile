# Fresh machine: `make demo` (set up + CPU demo) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine install your CUDA torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# The CUDA build of torch, for compiling the CUDA kernels on a machine without a GPU.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 8.0;9.0

.PHONY: demo test build bench cuda-check clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q pybind11 ninja cmake numpy pytest hypothesis typer rich pyyaml safetensors av pillow matplotlib diffusers scipy
	touch $@

# Incremental: CMake + ninja keep their state in build/.
build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Trains the CPU demo on the built-in moving sprites, then samples every zero-shot task into
# runs/demo_cpu/samples/. Running it again continues (or reuses) the finished run.
demo: build
	$(PY) -m fvdm info
	$(PY) -m fvdm train --config demo_cpu --out runs/demo_cpu --resume
	$(PY) -m fvdm sample all --run runs/demo_cpu

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m fvdm bench kernels

$(CUDA_VENV)/.deps: Makefile
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q --upgrade pip setuptools wheel
	$(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH_SPEC)" pybind11 ninja cmake numpy pytest hypothesis typer rich pyyaml safetensors av pillow matplotlib diffusers scipy
	touch $@

# Compiles every .cu file against the CUDA build of torch (no GPU needed), then runs the test
# suite on the CPU with that build; the `cuda` tests skip without a GPU. The package is staged
# in build/cuda-pkg so the CPU build in python/fvdm is left alone.
cuda-check: $(CUDA_VENV)/.deps
	rm -rf build/cuda-pkg && mkdir -p build/cuda-pkg && cp -r python/fvdm build/cuda-pkg/ && rm -f build/cuda-pkg/fvdm/_C*.so
	CUDA_HOME=$(CUDA_HOME) FVDM_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib build/cuda-pkg
	PYTHONPATH=build/cuda-pkg $(CUDA_VENV)/bin/python -c "import fvdm; i = fvdm.build_info(); assert i['cuda'] and all('cuda' in b for b in i['kernels'].values()), i; print('CUDA kernels compiled for', i['cuda_archs'])"
	PYTHONPATH=build/cuda-pkg $(CUDA_VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf build python/fvdm/_C*.so
