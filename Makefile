# mistral-tune: `make run` trains the default recipe, `make test` runs the tests. Both install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on disk on our dev/CI machines; GPU users: make install TORCH=torch
TORCH ?= torch==2.13.0
OVERRIDES ?=

.PHONY: install run test lint clean

install: $(BIN)/mistral-tune

$(BIN)/mistral-tune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

run: install
	$(BIN)/mistral-tune recipe=sft_lora $(OVERRIDES)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check mistral_tune tests scripts $(wildcard bench)
	$(BIN)/ruff format --check mistral_tune tests scripts $(wildcard bench)

clean:
	rm -rf $(VENV) build dist *.egg-info
