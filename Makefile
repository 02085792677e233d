# Two commands: `make serve` and `make test`. Each sets up .venv from nothing first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/llmux.yaml
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench setup clean

serve: $(STAMP)
	$(BIN)/llmux serve --config $(CONFIG)

test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check llmux tests $(wildcard bench)
	$(BIN)/mypy

bench: $(STAMP)
	@for b in bench/*.py; do [ -e "$$b" ] || continue; $(BIN)/python $$b || exit 1; done

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
