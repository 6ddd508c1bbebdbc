# make demo · make test · make bench — each creates .venv on first use and reuses it afterwards.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_out

.PHONY: demo test test-fast bench install clean

# Installs from the lock (requirements/lock-cpu.txt), so a fresh machine gets the same set every time. torch 2.14.1
# and torchvision 0.29.1 (the pair open_clip's torchvision needs) come from the wheel folder TORCH_INDEX when it is
# there (this project's machines: no multi-GB download), else from pip's ordinary package index, same versions.
TORCH_INDEX ?= file:///opt/pypi-more/simple
TORCH_FOLDER := $(patsubst file://%,%,$(filter file://%,$(TORCH_INDEX)))
TORCH_FROM := $(if $(TORCH_FOLDER),$(if $(wildcard $(TORCH_FOLDER)),--no-deps --index-url $(TORCH_INDEX)),--no-deps --index-url $(TORCH_INDEX))
$(STAMP): pyproject.toml requirements/lock-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_FROM) \
		$$(grep -E '^(torch|torchvision)==' requirements/lock-cpu.txt) 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/pip install -q --disable-pip-version-check -r requirements/lock-cpu.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import pipeline, torch, open_clip, deepspeed, ray, webdataset, av"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/videomamba run --config configs/demo.yaml --out $(DEMO_OUT)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/videomamba bench

clean:
	rm -rf $(VENV) $(DEMO_OUT)
