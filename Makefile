# aiid-proxy: `make run` starts the gateway with demo defaults, `make test` runs the whole suite.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AIID_HOME := $(or $(AIID_HOME),$(CURDIR)/.aiid)
AIID_POLICIES := $(or $(AIID_POLICIES),$(CURDIR)/policies)
export AIID_HOME AIID_POLICIES

.PHONY: install run test lint fmt bench soak fuzz crash-soak clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $$(scripts/find-python.sh) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	@$(BIN)/python scripts/demo_home.py
	@$(BIN)/aiid run --listen "$${AIID_LISTEN:-127.0.0.1:8080}"

lint: $(STAMP)
	$(BIN)/ruff check aiid_proxy addons tests scripts
	$(BIN)/ruff format --check aiid_proxy addons tests scripts
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format aiid_proxy addons tests scripts
	$(BIN)/ruff check --fix aiid_proxy addons tests scripts

# tmux runs the console's end-to-end test (tests/test_e2e_console.py skips without it); never fatal.
TMUX_CHECK := command -v tmux >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq tmux >/dev/null 2>&1 || { timeout 300 apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq tmux >/dev/null 2>&1; }; }; } || echo "tmux not installed: the console end-to-end tests are skipped"

test: lint
	@$(TMUX_CHECK)
	$(BIN)/python -m pytest -q -n 2 -p no:cacheprovider

# `make bench BENCH_ARGS=--quick` for a short run; results in bench/results.md.
HEY := command -v hey >/dev/null || apt-get install -y -qq hey >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq hey >/dev/null 2>&1) || echo "hey not installed: the built-in load generator is used"

bench: $(STAMP)
	@$(HEY)
	$(BIN)/python scripts/bench_micro.py --json bench/results.micro.json $(BENCH_ARGS)
	$(BIN)/python scripts/bench_gateway.py --micro-json bench/results.micro.json $(BENCH_ARGS)

soak: $(STAMP)
	@$(HEY)
	$(BIN)/python scripts/bench_gateway.py --soak 600 $(BENCH_ARGS)

# kill -9 of `aiid run` under load, 500 rounds (make test runs 50): see tests/test_crash.py.
crash-soak: $(STAMP)
	AIID_CRASH_ROUNDS=$(or $(ROUNDS),500) $(BIN)/python -m pytest -q -s -p no:cacheprovider \
		--timeout 3600 tests/test_crash.py

# Long fuzzing session (make test runs a bounded one): hypothesis with FUZZ_EXAMPLES examples per
# property, then atheris (installed on demand; skipped if it does not install) FUZZ_SECONDS per target.
fuzz: $(STAMP)
	@$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/python -m pip install --quiet --disable-pip-version-check atheris || echo "atheris does not install here: hypothesis only"
	$(BIN)/python scripts/fuzz.py --examples $(or $(FUZZ_EXAMPLES),10000) --seconds $(or $(FUZZ_SECONDS),60)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
