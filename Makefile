# edgesmith: `make test` and `make demo` work on a fresh Debian machine (Python >= 3.10).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# llama-cpp-python builds llama.cpp from source for this CPU (about 5 minutes). The wheel is kept
# in WHEELS, keyed by the version, CMAKE_ARGS and this CPU's flags, so later installs are quick and
# a changed flag or CPU really rebuilds (pip's own wheel cache ignores CMAKE_ARGS).
# On x86-64, AMX is compiled out: llama.cpp's AMX matmul crashes (SIGSEGV in
# ggml_backend_amx_mul_mat, ggml-org/llama.cpp#20824) on Sapphire Rapids machines that report it.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
AMX_OFF := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
NO_AMX  := $(shell [ "$$(uname -m)" = x86_64 ] && $${CC:-cc} $(AMX_OFF) -x c -E /dev/null \
             >/dev/null 2>&1 && echo "'-DCMAKE_C_FLAGS=$(AMX_OFF)' '-DCMAKE_CXX_FLAGS=$(AMX_OFF)'")
export CMAKE_ARGS ?= -DGGML_NATIVE=ON $(NO_AMX)
WHEELS  := $(HOME)/.cache/edgesmith/wheels/$(shell { echo "$(LLAMA_CPP_VERSION) $(CMAKE_ARGS)"; \
             uname -m; grep -m1 -E '^(flags|Features)' /proc/cpuinfo; } | sha256sum | cut -c1-16)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install sysdeps test test-unit demo lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

# torch is pinned and installed first so no dependency pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q torch==2.13.0
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) (CMAKE_ARGS=$(CMAKE_ARGS)), about 5 minutes"; \
	  rm -rf $(WHEELS).tmp $(WHEELS) && $(BIN)/pip wheel -q --no-deps --no-cache-dir \
	    -w $(WHEELS).tmp "llama-cpp-python==$(LLAMA_CPP_VERSION)" && mv $(WHEELS).tmp $(WHEELS); fi
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	$(BIN)/pip install -q -e '.[all,dev]'
	$(BIN)/pip install -q -e '.[litert]'
	$(BIN)/pip install -q -e '.[coreml]'
	$(BIN)/pip install -q -e '.[ray]'
	touch $@

install: $(VENV)/.installed

# System tools the tests use: Debian's chromium (report rendering), shellcheck and
# systemd-analyze (install script and its unit), cmake (llama.cpp's own tools, for benchmarks).
# Installed only when missing and when root.
sysdeps:
	@if ! command -v chromium >/dev/null || ! command -v shellcheck >/dev/null \
	    || ! command -v cmake >/dev/null || ! command -v systemd-analyze >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium shellcheck cmake systemd >/dev/null; \
	  else echo "please install: chromium shellcheck cmake systemd (apt-get)"; exit 1; fi; \
	fi

# the install-script test installs llama-cpp-python from the wheel built above (same CMAKE_ARGS)
test: install sysdeps
	EDGESMITH_WHEELS=$(WHEELS) $(BIN)/python -m pytest -q

test-unit: install
	$(BIN)/python -m pytest -q -m "not e2e"

demo: install
	$(BIN)/edgesmith compress builtin:smollm2-135m --target raspberry-pi-5 -o out/demo --force

lint: install
	$(BIN)/ruff check .

bench: install sysdeps
	$(BIN)/python benchmarks/gguf_vs_llamacpp.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
