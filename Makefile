# Two commands do everything on a fresh machine:
#   make demo   train -> precision map -> ONNX export -> TVM CPU lowering -> FPGA C-sim -> bench (digits CNN)
#   make test   the test suite (what CI runs)
# Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
# pytest-xdist workers for `make test` (CI has 2 cores); JOBS=1 runs it serially
JOBS ?= 2

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,fpga]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fxquant train --policy adapt --bits-budget 5 examples/digits_cnn.py --out $(RUN) --force
	$(BIN)/fxquant export --target onnx $(RUN)
	$(BIN)/fxquant export --target cpu $(RUN)
	$(BIN)/fxquant export --target fpga $(RUN)
	$(BIN)/fxquant bench $(RUN)
	$(BIN)/fxquant bench $(RUN) --target cpu

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(JOBS) --dist loadgroup tests

.PHONY: venv demo test
