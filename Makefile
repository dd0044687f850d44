# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-test.txt setup.cfg | cksum | cut -d' ' -f1)
PORT ?= 8080

.PHONY: install demo test clean

$(STAMP): requirements.txt requirements-test.txt setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "Installing dependencies (llama-cpp-python builds from source the first time: ~5 minutes)"
	$(BIN)/python -m pip install -q -r requirements-test.txt -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m app --offline --model demo --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
