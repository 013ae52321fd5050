# Two commands do all set-up on a fresh machine: `make bench` and `make test`.
# Both create .venv on first use and install the pinned requirements; later runs are quick.
# On a machine whose python already has the right torch (the GPU image), pass
# PYTHON=python3: that interpreter is used as it is and nothing is installed.

SHELL := /bin/bash
PYTHON ?=
VENV := .venv
BENCH_ARGS ?=

ifeq ($(PYTHON),)
PY := $(VENV)/bin/python
ENV_BENCH := $(VENV)/.stamp-bench build/.stamp-ext
ENV_TEST := $(VENV)/.stamp-test build/.stamp-ext
ENV_PEERS := $(VENV)/.stamp-peers build/.stamp-ext
else
PY := $(PYTHON)
ENV_BENCH := build/.stamp-ext
ENV_TEST := build/.stamp-ext
ENV_PEERS := build/.stamp-ext
endif
CSRC := $(wildcard csrc/*.json csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.inc csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh)
RUN := PYTHONPATH=$(CURDIR) $(PY)
# Large CPU tensors on transparent huge pages (read by PyTorch at start-up); set for every
# model a benchmark compares, so ratios stay fair.
BENCH_ENV := THP_MEM_ALLOC_ENABLE=1

.PHONY: test bench bench-hf bench-peers bench-compile bench-kernels bench-micro bench-collection cuda-compile gpu-static cmake-check package-check device-wheels env clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.stamp-bench: requirements.txt setup.py pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -r requirements.txt
	XCLIP_NO_EXTENSION=1 $(VENV)/bin/pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# The compiled ops (xclip_kernels/_C*.so), built in place; with CUDA where nvcc and a CUDA
# torch are present. Rebuilt when a source under csrc/ or setup.py changes.
build/.stamp-ext: $(CSRC) setup.py $(if $(PYTHON),,$(VENV)/.stamp-bench)
	$(PY) setup.py --quiet build_ext --inplace
	mkdir -p build && touch $@

$(VENV)/.stamp-test: requirements-test.txt $(VENV)/.stamp-bench
	$(VENV)/bin/pip install --quiet -r requirements-test.txt
	touch $@

# The optional peers of bench-peers (ONNX Runtime, OpenVINO, the ONNX exporter's packages);
# `make test` neither installs nor needs them.
$(VENV)/.stamp-peers: requirements-peers.txt $(VENV)/.stamp-test
	$(VENV)/bin/pip install --quiet -r requirements-peers.txt
	touch $@

env: $(ENV_TEST)

# Two pytest processes: Triton reads TRITON_INTERPRET when first imported, so the
# interpreter tests (marker triton_interpreter) get a process of their own.
test: $(ENV_TEST)
	$(RUN) -m pytest -q tests -m "not triton_interpreter"
	TRITON_INTERPRET=1 $(RUN) -m pytest -q tests -m triton_interpreter

# The main job: X-CLIP-B/32 on every backend here (GMACs, clips/s, parity with the reference),
# then X-CLIP against the other space-time attention styles at 8, 16 and 32 frames.
bench: $(ENV_BENCH)
	$(BENCH_ENV) $(RUN) -m benchmarks.main $(BENCH_ARGS)
	mkdir -p bench-results
	$(BENCH_ENV) $(RUN) -m benchmarks.run --preset cpu --json bench-results/run-cpu.json --plot bench-results/run-cpu.png

# X-CLIP-B/32 against Hugging Face XCLIPModel on the same weights (needs transformers).
bench-hf: $(ENV_TEST)
	$(BENCH_ENV) $(RUN) -m benchmarks.vs_hf $(BENCH_ARGS)

# X-CLIP-B/32 against the CPU engines a user could pick instead, on the same weights: Hugging
# Face eager, ONNX Runtime and OpenVINO (one ONNX export); BENCH_ARGS="--dtype bfloat16" for bf16.
bench-peers: $(ENV_PEERS)
	$(BENCH_ENV) $(RUN) -m benchmarks.peers $(BENCH_ARGS)

# X-CLIP-B/32 eager (automatic backend) against torch.compile with Inductor freezing (sdpa and the
# automatic backend), cold compile time apart; BENCH_ARGS="--dtype bfloat16" for bf16. Minutes:
# every variant builds its C++ from an empty Inductor cache.
bench-compile: $(ENV_BENCH)
	$(BENCH_ENV) $(RUN) -m benchmarks.compiled $(BENCH_ARGS)

# Attention kernels per backend (TFLOP/s, GB/s); on a GPU use scripts/device_check.sh.
bench-kernels: $(ENV_BENCH)
	$(RUN) -m benchmarks.kernels $(BENCH_ARGS)

# pytest-benchmark micro-suite of the ops at B/32 CPU shapes (times, does not check).
bench-micro: $(ENV_BENCH)
	$(BENCH_ENV) $(RUN) -m pytest -q benchmarks/micro --benchmark-only --benchmark-columns=median,iqr,rounds $(BENCH_ARGS)

# The collection pipeline's decode stage alone (no model): videos/s with 0 (in process), 1 and 2
# decode workers on 64 synthetic 320x240 3 s videos (written once into bench-results/), in
# interleaved rounds, with the ratios, the CPU and how loaded the machine was.
bench-collection: $(ENV_BENCH)
	$(RUN) -m benchmarks.collection $(BENCH_ARGS)

# Every .cu compiled with nvcc for sm_80 and sm_90a; needs no GPU (CI runs it where nvcc is).
cuda-compile: $(if $(PYTHON),,$(VENV)/.stamp-bench)
	$(RUN) scripts/cuda_compile.py

# The GPU image's Triton (3.6), for gpu-static only: into its own folder, never the venv.
TRITON_GPU_IMAGE := 3.6.0
.triton36/.stamp:
	rm -rf .triton36
	$(PY) -m pip install --quiet --no-deps --target .triton36 triton==$(TRITON_GPU_IMAGE)
	touch $@

# Every Triton kernel (this Triton and the GPU image's) and every CUDA kernel compiled for
# sm_80 and sm_90a without a GPU: registers, spills, shared memory, tensor cores, blocks/SM;
# fails on a compile error, too much shared memory, fp16/bf16 spills or no tensor cores in an
# fp16/bf16 Triton or CUDA kernel (scripts/gpu_static.py). Writes bench-results/gpu-static.json.
gpu-static: $(if $(PYTHON),,$(VENV)/.stamp-bench) .triton36/.stamp
	$(RUN) scripts/gpu_static.py --triton .triton36 $(if $(shell command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null),,--no-cuda)

# The CMake build (C++17, csrc/build_flags.json like setup.py) into build/cmake, smoke-tested from
# there (scripts/check_extension.py: torch version, OpenMP, both forward ops against the
# reference); then the portable configuration (no x86-64 tile kernels) the same way.
TILES_HERE := $(if $(filter x86_64 amd64 AMD64,$(shell uname -m)),yes,no)
CMAKE_CONFIGURE = cmake -S . -DPython_EXECUTABLE="$$($(PY) -c 'import sys; print(sys.executable)')" -DCMAKE_BUILD_TYPE=Release
cmake-check: $(if $(PYTHON),,$(VENV)/.stamp-bench)
	$(CMAKE_CONFIGURE) -B build/cmake
	cmake --build build/cmake -j $$(nproc)
	$(RUN) scripts/check_extension.py build/cmake --tiles $(TILES_HERE)
	$(CMAKE_CONFIGURE) -B build/cmake-portable -DXCLIP_CPU_TILES=OFF
	cmake --build build/cmake-portable -j $$(nproc)
	$(RUN) scripts/check_extension.py build/cmake-portable --tiles no

# The package as a new user gets it (scripts/check_package.py): from a clean copy, the sdist
# (built without torch), a wheel from it against this torch, that wheel installed and used
# outside the source tree; and the default isolated `pip wheel .` failing at once with the
# command that works. Not through $(RUN): the source tree must not be on the path.
package-check: $(if $(PYTHON),,$(VENV)/.stamp-bench)
	$(PY) scripts/check_package.py

# Wheels the GPU image lacks (it has no network), for scripts/device_check.sh: Python 3.12.
device-wheels:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl instant-clip-tokenizer==0.1.1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache xclip_kernels/_C*.so .triton36
