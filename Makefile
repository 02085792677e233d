# Two commands: `make serve` and `make test`. Each sets up .venv from nothing first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/llmux.yaml
STAMP := $(VENV)/.installed
TORCH := 2.13.0

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

# torch first, pinned to the local CPU build; then everything else under that pin.
# llama-cpp-python compiles from source (~6 min on 2 cores); pip caches the wheel.
$(STAMP): pyproject.toml
	command -v espeak-ng >/dev/null && command -v sox >/dev/null || \
		{ apt-get update -q && apt-get install -y -q espeak-ng sox; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH)
	echo torch==$(TORCH) > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[runtimes,models,test,lint]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
