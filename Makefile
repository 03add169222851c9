# CollaFuse developer commands. `make demo` and `make test` work on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_OUT ?= demo-out
# The torch release `make setup` installs (any build of it; see the setup recipe).
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo demo-multihost test test-all soak bench lint typecheck protos check-protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing CollaFuse and its dependencies into $(VENV) (log: $(VENV)/pip.log)"
	@# torch first, as this exact release: its CPU build lies on disk on our machines, while the
	@# project's range (torch>=2.3,<3) would let pip fetch a multi-GB CUDA build from the index.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) \
		> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	$(PY) -m pip install --quiet -e '.[dev]' --config-settings editable_mode=strict \
		>> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	touch $(STAMP)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

setup: $(STAMP) $(FMNIST)
	@# The strict editable install links each file; relink so new modules are importable.
	@$(PY) -m pip install --quiet --no-deps -e . --config-settings editable_mode=strict \
		> $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

demo: setup
	$(VENV)/bin/collafuse demo --clients 3 --out $(DEMO_OUT) --overwrite

# The demo across network namespaces: 1 server + 3 client hosts on a bridge, links shaped by
# tc tbf and delayed by a relay (the last client's link is the poor one). Run as root.
demo-multihost: setup
	$(VENV)/bin/collafuse demo-multihost --clients 3 --out demo-multihost-out --overwrite

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy -p collafuse.common -p collafuse.server -p collafuse.client -p collafuse.experiments
	$(PY) -m pytest -m "not slow"

test-all: setup
	$(PY) -m pytest

# The fault suite at full length (load, fuzz, kills); prints its figures, exit 0 when every
# invariant holds. `make test` runs a short version of each scenario.
soak: setup
	$(PY) tests/soak.py

# The server's hot paths (P1-P6), side by side with bare baselines, on whatever device is here.
bench: setup
	$(VENV)/bin/collafuse bench --out bench-results.json

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy -p collafuse.common -p collafuse.server -p collafuse.client -p collafuse.experiments

# Regenerate the committed protobuf/gRPC modules and stubs from proto/.
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
		proto/collafuse/v1/collafuse.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
