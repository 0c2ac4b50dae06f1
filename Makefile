# Two commands on a fresh machine: `make run` (the demo on embedded defaults), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run gallery test lint bench browser clean

$(STAMP): pyproject.toml scripts/setup.sh
	PY=$(PY) VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/talkmosaic demo

# The web gallery and the Q&A worker (and the chat adapters whose tokens are set).
gallery: $(STAMP)
	$(BIN)/python -m bot

test: $(STAMP) browser
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

browser:
	bash scripts/setup-browser.sh

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/mosaic.py
	$(BIN)/python bench/gallery.py
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/kvcache.py
	$(BIN)/python bench/qa.py

clean:
	rm -rf $(VENV) data
