# agentcg: `make demo` and `make test` set up everything they need (idempotent).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(wildcard proto/agentcg/v1/*.proto)
PYTEST_ARGS ?=

ifeq ($(CI),true)
export AGENTCG_REQUIRE_KERNEL := 1
endif

.PHONY: setup host venv vm proto loadgen demo test lint clean

setup: host venv loadgen

host:
	bash scripts/setup-host.sh

# The venv gets bcc from Debian's python3-bpfcc (a pure-Python module over libbcc) by symlink,
# not Debian's whole dist-packages.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	ln -sfn /usr/lib/python3/dist-packages/bcc "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
	touch $@

# The qemu kit for the cgroup v2 driver's real-kernel test (Debian trixie's 6.12 kernel under
# qemu without KVM): idempotent, a no-op once var/vm holds the kernel.
vm: venv
	PY=$(PY) bash scripts/setup-vm.sh >/dev/null

# The native load generator of `agentcg bench admission` (C++, Debian's gRPC from `make host`):
# C++ stubs generated from the protos into build/loadgen (never checked in), one object per
# source, rebuilt when loadgen.cc or a proto changes.
LOADGEN_DIR := build/loadgen
LOADGEN := $(LOADGEN_DIR)/loadgen
LOADGEN_PROTOS := proto/agentcg/v1/broker.proto proto/agentcg/v1/types.proto
LOADGEN_GEN := $(LOADGEN_DIR)/gen/agentcg/v1
LOADGEN_OBJS := $(LOADGEN_DIR)/loadgen.o $(LOADGEN_DIR)/broker.pb.o $(LOADGEN_DIR)/broker.grpc.pb.o \
  $(LOADGEN_DIR)/types.pb.o
LOADGEN_CXXFLAGS = -std=c++17 -O2 -Wall -Wextra -I$(LOADGEN_DIR)/gen $$(pkg-config --cflags grpc++ protobuf)

loadgen: | host
loadgen: $(LOADGEN)

$(LOADGEN): $(LOADGEN_OBJS)
	$(CXX) -o $@ $^ $$(pkg-config --libs grpc++ protobuf)

$(LOADGEN_GEN)/.generated: $(LOADGEN_PROTOS)
	mkdir -p $(LOADGEN_DIR)/gen
	protoc -Iproto --cpp_out=$(LOADGEN_DIR)/gen --grpc_out=$(LOADGEN_DIR)/gen \
	  --plugin=protoc-gen-grpc=$$(command -v grpc_cpp_plugin) $(LOADGEN_PROTOS)
	touch $@

$(LOADGEN_DIR)/loadgen.o: clients/loadgen/loadgen.cc $(LOADGEN_GEN)/.generated
	$(CXX) $(LOADGEN_CXXFLAGS) -c -o $@ $<

$(LOADGEN_DIR)/%.o: $(LOADGEN_GEN)/.generated
	$(CXX) $(LOADGEN_CXXFLAGS) -c -o $@ $(LOADGEN_GEN)/$*.cc

# Regenerate the gRPC stubs (checked in; never edited by hand).
proto: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=proto --grpc_python_out=proto --mypy_out=proto --mypy_grpc_out=proto $(PROTOS)

demo: setup
	$(VENV)/bin/agentcg demo

# The broker suite runs on SQLite and on a local PostgreSQL (Debian's, started here).
test: setup vm
	AGENTCG_TEST_POSTGRES_URL=$${AGENTCG_TEST_POSTGRES_URL:-$$(bash scripts/start-postgres.sh | tail -n 1)} \
	  $(PY) -m pytest -q $(PYTEST_ARGS)

# Lint and type-check (ruff, ruff format --check, mypy --strict over the product package).
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	bash scripts/typecheck.sh

clean:
	rm -rf $(VENV) var build *.egg-info
