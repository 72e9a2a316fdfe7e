# edgesmith: `make test` and `make demo` work on a fresh Debian machine (Python >= 3.10).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# llama-cpp-python builds llama.cpp from source for this CPU (about 5 minutes; pip caches the
# wheel, so later installs are quick).
export CMAKE_ARGS ?= -DGGML_NATIVE=ON
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install sysdeps test test-unit demo lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

# torch is pinned and installed first so no dependency pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
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

test: install sysdeps
	$(BIN)/python -m pytest -q

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
