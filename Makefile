# Cascade — the two commands (see README):
#   make demo   install everything, start local Kafka + Redis, run the pipeline on real data, serve, replay events
#   make test   install everything, run the test suite
# Both are idempotent and fast once installed (the venv is rebuilt only when
# pyproject.toml / requirements.txt change).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSSTAMP := .stamp-sysdeps
export TRITON_INTERPRET ?= 1
export PYTHONDONTWRITEBYTECODE ?=

.PHONY: demo test test-all install install-gpu sysdeps proto lint bench clean services-down

demo: install
	$(VENV)/bin/cascade demo

test: install
	$(PY) -m pytest -q

# The slow tier (multi-minute training/benchmark-sized checks), not part of `make test`.
test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

install: $(STAMP) $(SYSSTAMP)

$(STAMP): pyproject.toml requirements.txt setup.py shims/fbgemm-gpu/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip check
	touch $(STAMP)

# System packages the local services and the chart checks need:
# redis-server (online state), prometheus (promtool for the alert rules) and prometheus-pushgateway (the
# pipeline's outcome metrics test).
# Java 17 is required by Spark and is expected on the host.
$(SYSSTAMP):
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-pushgateway >/dev/null || missing="$$missing prometheus-pushgateway"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing \
	    || { echo "could not install$$missing: install them with your package manager (Debian: apt-get install$$missing)"; exit 1; }; \
	fi
	@command -v java >/dev/null || { echo "java not found: Spark needs Java 17 (Debian: apt-get install openjdk-17-jre-headless)"; exit 1; }
	touch $(SYSSTAMP)

# GPU hosts: CUDA torch + the real fbgemm-gpu instead of the CPU shim.
install-gpu:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==26.3
	$(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cu128 torch==2.13.0 fbgemm-gpu==1.8.0
	$(PY) -m pip install -q -r requirements-gpu.txt
	touch $(STAMP)

# Recompile serving/proto/*.proto (also done by every install).
proto: install
	$(PY) tools/compile_protos.py

lint: install
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/run_all.py

services-down:
	-$(VENV)/bin/cascade services down

clean: services-down
	rm -rf $(VENV) $(SYSSTAMP) build *.egg-info .pytest_cache
