# The README's two commands: `make bench` (the benchmark table) and `make test` (the test suite).
# Each creates .venv if missing, installs the pinned requirements, builds fastar (plus the test-only SIMT
# emulation build of the CUDA kernels when the CUDA headers exist), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export FASTAR_BUILD_SIMT ?= 1

.PHONY: build test bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) -m bench

clean:
	rm -rf build fastar/*.so
