# knnfast developer entry points. `make test` is what CI runs (.ci/run): it creates the venv,
# installs pinned dependencies, builds the extension, compile-checks the CUDA sources and
# runs pytest.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# torch is pinned everywhere: an unpinned torch pulls several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
DEPS := numpy pytest hypothesis pytest-benchmark faiss-cpu setuptools wheel cmake ninja tqdm \
	transformers tokenizers sacrebleu matplotlib accelerate build
NVCC ?= nvcc
CUDA_ARCHS ?= 80 90
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu) $(wildcard tests/cuda/*.cu)

.PHONY: venv build test test-deep cuda-check sanitize package-check bench demo reproduce clean

venv: $(VENV)/.deps-installed

$(VENV)/.deps-installed: Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(VPY) -m pip install --quiet --disable-pip-version-check $(DEPS)
	touch $@

build: venv
	$(VPY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
	$(VPY) -c "import knnfast, json; print(json.dumps(knnfast.build_info()))"

# Compile every CUDA source for sm_80 and sm_90 without a GPU; ptxas register/spill report
# goes to build/cuda-check.log (summarised into benchmarks/RESULTS.md by
# benchmarks/ptxas_report.py). Warnings are errors. The torch-facing wrappers
# (csrc/cuda/*_cuda.cpp) are syntax-checked with g++ against torch's CUDA headers; a CPU wheel
# lacks one generated header (cuda_cmake_macros.h), which gets a one-line stand-in.
CUDA_WRAPPERS := $(wildcard csrc/cuda/*_cuda.cpp)
CUDA_HOME ?= /usr/local/cuda
cuda-check: venv
	@if ! command -v $(NVCC) >/dev/null 2>&1; then echo "cuda-check: nvcc not found, skipped"; exit 0; fi; \
	mkdir -p build; : > build/cuda-check.log; \
	for f in $(CUDA_SOURCES); do \
	  for a in $(CUDA_ARCHS); do \
	    echo "nvcc sm_$$a $$f"; echo "== $$f sm_$$a" >> build/cuda-check.log; \
	    $(NVCC) -std=c++17 -O3 -c $$f -o /dev/null -Icsrc -gencode arch=compute_$$a,code=sm_$$a \
	      --expt-relaxed-constexpr -Xptxas -v -Werror all-warnings >> build/cuda-check.log 2>&1 || { cat build/cuda-check.log; exit 1; }; \
	  done; \
	done; \
	TORCH_DIR=$$($(VPY) -c "import os, torch; print(os.path.dirname(torch.__file__))"); \
	STUB=build/cuda-stub; mkdir -p $$STUB/c10/cuda/impl; \
	test -f $$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h || \
	  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > $$STUB/c10/cuda/impl/cuda_cmake_macros.h; \
	for f in $(CUDA_WRAPPERS); do \
	  echo "g++ -fsyntax-only $$f"; \
	  g++ -std=c++20 -fsyntax-only -Wall -Wextra -Wno-unused-parameter -Werror -Icsrc -I$$STUB \
	    -I$$TORCH_DIR/include -I$$TORCH_DIR/include/torch/csrc/api/include -I$(CUDA_HOME)/include \
	    -D_GLIBCXX_USE_CXX11_ABI=$$($(VPY) -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))") \
	    $$f || exit 1; \
	done; \
	echo "cuda-check: $(words $(CUDA_SOURCES)) kernel file(s) x sm_{$(CUDA_ARCHS)} compiled, $(words $(CUDA_WRAPPERS)) wrapper(s) syntax-checked; report in build/cuda-check.log"

test: build cuda-check
	$(VPY) -m pytest tests -q -p no:cacheprovider

# The property tests (every @given test: each op against its pure-PyTorch twin over random
# shapes, dtypes, metrics, padding) with the "thorough" hypothesis profile: 500 examples per
# property instead of CI's 25. Not in CI; results in benchmarks/RESULTS.md.
PROPERTY_TESTS = $(shell grep -l "@given" tests/test_*.py)
test-deep: build
	HYPOTHESIS_PROFILE=thorough $(VPY) -m pytest -q -p no:cacheprovider --durations=0 $(PROPERTY_TESTS)

# Pre-release check (not in `make test`: see README, Reliability): the op tests under
# AddressSanitizer + UndefinedBehaviorSanitizer. The instrumented library is built in
# build/sanitize (never replacing knnfast/_C*.so) and loaded through KNNFAST_LIBRARY; python
# itself is not instrumented, so the ASan runtime is preloaded, with libstdc++: python does not
# link it, and without it ASan's __cxa_throw interceptor finds no real __cxa_throw and aborts at
# the first C++ exception (every bad-input test throws; google/sanitizers#934). Options:
#   detect_leaks=0  CPython and torch keep allocations alive until exit by design (interned
#                   objects, op registries); LeakSanitizer would report those, not knnfast.
#   halt_on_error=1 (UBSan; ASan halts by default) the first report fails the run.
#   --capture=sys   a report is written to fd 2 as the process dies: pytest's fd capture
#                   would swallow it.
# The tests run twice: with the AVX-512 kernels, then with KNNFAST_SIMD=generic, because ASan
# does not see AVX-512 masked loads/stores (compiler builtins, not instrumented memory
# accesses); the portable bodies make the same index arithmetic with plain, checked accesses.
SAN_DIR := build/sanitize
SAN_TESTS := $(wildcard tests/test_knn_*.py) tests/test_label_counts.py tests/test_softmax_stats.py \
	tests/test_op_arguments.py tests/test_simd.py tests/test_build_info.py
sanitize: venv
	PATH=$(abspath $(VENV))/bin:$$PATH cmake -S . -B $(SAN_DIR) -GNinja -DCMAKE_BUILD_TYPE=Debug \
	  -DKNNFAST_SANITIZE=ON -DKNNFAST_CUDA=off -DKNNFAST_OUTPUT_DIR=$(abspath $(SAN_DIR)) \
	  -DPython_EXECUTABLE=$(abspath $(VPY))
	PATH=$(abspath $(VENV))/bin:$$PATH cmake --build $(SAN_DIR)
	for simd in auto generic; do echo "== sanitize: KNNFAST_SIMD=$$simd"; \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  KNNFAST_LIBRARY=$(abspath $(SAN_DIR))/_C.so KNNFAST_SIMD=$$simd \
	  $(VPY) -m pytest $(SAN_TESTS) -q -p no:cacheprovider --capture=sys || exit 1; done

# The package as a user gets it (several minutes, so not in `make test`: python -m build compiles
# the wheel from the sdist): sdist + wheel into build/dist, then tests/test_packaging.py
# installs the wheel into a fresh venv and runs a smoke test there, outside the source tree.
package-check: venv
	rm -rf build/dist
	$(VPY) -m build --no-isolation --outdir build/dist
	KNNFAST_WHEEL=$$(ls build/dist/knnfast-*.whl) $(VPY) -m pytest tests/test_packaging.py -q \
	  -p no:cacheprovider -rs

# The main job: English->German kNN-MT on the system's gettext catalogs (no network).
# Trains (or loads from .cache/demo) a small Marian model, builds the in-domain datastore,
# writes demo-results/ (results.json, results.md, bleu_vs_lambda.png).
demo: build
	$(VPY) -m knnfast demo --cache .cache/demo --out demo-results

# The four source papers' experiments in miniature (each <= 30 min on 2 cores from a cold
# cache; models, datastores and finished stages cached in .cache/reproduce, a killed run
# resumes). Reports go to docs/reproduce/ (<study>.md, .json, PNGs). One study:
# `$(VPY) -m knnfast reproduce meta-optimizer --out docs/reproduce`.
reproduce: build
	$(VPY) -m knnfast reproduce all --cache .cache/reproduce --out docs/reproduce

# Full benchmark suite (several minutes; needs ~10 GiB RAM for the 1M x 1024 datastores).
bench: build
	$(VPY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-json benchmarks/results.json
	$(VPY) benchmarks/write_results.py benchmarks/results.json --out benchmarks/RESULTS.md

clean:
	rm -rf build knnfast/_C*.so *.egg-info
