# `make demo` and `make test` work on a fresh clone with only python3: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds this project is tested with (they install from the local wheel cache here).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test clean

$(BIN)/runner: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/runner
	$(BIN)/runner train examples/digits.yaml

test: $(BIN)/runner
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
