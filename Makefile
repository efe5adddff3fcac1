# One command each for a fresh machine: `make demo` and `make test` create .venv and install
# everything they need (CPU PyTorch 2.13.0, the package with its test and Triton extras).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,triton,diffusers]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tailattn study

test: $(STAMP)
	$(BIN)/ruff check src tests scripts examples
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts examples
	$(BIN)/ruff format --check src tests scripts examples

clean:
	rm -rf $(VENV) reports
