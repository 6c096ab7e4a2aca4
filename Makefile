# `make demo` and `make test` work on a fresh clone with only python3: they create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds this project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-quick bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The demo is what runner is for: distributed training (2 CPU processes, gloo) that survives restarts.
demo: $(VENV)/.installed
	$(BIN)/torchrun --standalone --nproc-per-node=2 -m runner train examples/digits.yaml

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

# Everything but the long end-to-end tests (marked `slow`: real torchrun, kills, servers).
test-quick: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m "not slow"

# The `bench` extra adds Lightning, for compare.py's third column.
$(VENV)/.bench: $(VENV)/.dev
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python benchmarks/checkpoint_bench.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/sharded_bench.py

clean:
	rm -rf $(VENV) runs
