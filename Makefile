# Fresh machine: `make demo` (set up + CPU demo) and `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a GPU machine install your CUDA torch into the venv first.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test build bench clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q pybind11 ninja cmake numpy pytest hypothesis typer rich pyyaml
	touch $@

# Incremental: CMake + ninja keep their state in build/.
build: $(VENV)/.deps
	$(PIP) install -q --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m fvdm info
	$(PY) -m fvdm bench kernels --quick --out build/bench-demo.json

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m fvdm bench kernels

clean:
	rm -rf build python/fvdm/_C*.so
