# The README's two commands: `make bench` (the benchmark table) and `make test` (the test suite); `make lint`
# runs the static checks.
# Each creates .venv if missing, installs the pinned requirements (bench: also requirements-bench.txt), builds
# fastar (plus the test-only SIMT emulation build of the CUDA kernels when the CUDA headers exist), then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make gpu-check PY=python3` uses that interpreter's packages as they are (an offline GPU machine): no venv,
# no pip.
ifeq ($(origin PY),command line)
INSTALLED :=
else
INSTALLED := $(VENV)/.installed
endif
export FASTAR_BUILD_SIMT ?= 1
# Without a GPU (no nvidia-smi), the CUDA kernels are compiled for sm_90 only: half the build time. CI compiles
# them for sm_80 too and gates that code (.ci/arch_gate.py). With a GPU: setup.py's default, its own arch.
export FASTAR_CUDA_ARCHS ?= $(shell nvidia-smi -L >/dev/null 2>&1 || echo 9.0)

.PHONY: build test bench lint gpu-check clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

# make bench's extras; DISABLE_CUDA=1: hqq's setup would otherwise try to compile its optional CUDA kernels.
$(VENV)/.installed-bench: $(VENV)/.installed requirements-bench.txt
	DISABLE_CUDA=1 $(PY) -m pip install --disable-pip-version-check -q -r requirements-bench.txt -c requirements.txt
	touch $@

build: $(VENV)/.installed
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation --no-deps -e .

# The full suite runs the CPU kernels of the best ISA this CPU runs; then the CPU tests run again under each
# other ISA it runs (FASTAR_CPU_ISA, csrc/cpu/isa.h). pytest-xdist spreads the tests over the CPUs (-n auto).
test: build
	$(PY) -m pytest tests -n auto
	@for isa in $$($(PY) -c "import fastar; i = fastar.build_info(); print(*[x for x in i['cpu_isas_supported'] if x != i['cpu_isa']])"); do \
	  echo "== CPU tests with FASTAR_CPU_ISA=$$isa"; \
	  FASTAR_CPU_ISA=$$isa $(PY) -m pytest tests -q -n auto -k "cpu and not cpu_isa" || exit 1; \
	done

bench: build $(VENV)/.installed-bench
	$(PY) -m bench

# Static checks: ruff's rules of pyproject.toml over the Python sources, .clang-format over the C++ and CUDA.
lint: $(VENV)/.installed
	$(PY) -m ruff check fastar tests bench setup.py .ci
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# The prepared GPU check (bench/gpu_check.py): build, cuda tests, compute-sanitizer, GPU bench into
# bench/results/gpu.json. Without a GPU: a dry run of its CPU parts (CI runs it so).
gpu-check: $(INSTALLED)
	$(PY) -m bench.gpu_check

clean:
	rm -rf build fastar/*.so
