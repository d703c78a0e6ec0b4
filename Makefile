# All set-up happens here: `make demo` and `make test` create .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-interop lint clean bench-data zoo bench-vq bench-latent bench-kv bench-throughput bench-wheels bench-sae-real

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sparsecode demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench-data: $(STAMP)
	$(PY) bench/data_bench.py

zoo: $(STAMP)
	$(PY) bench/sae_zoo.py --d 32 --m 128 --k 4 --steps 600 --batch 512 --lr 4e-3 --eval-rows 4096 --out zoo.md

bench-vq: $(STAMP)
	$(PY) bench/vq_utilisation.py --sizes 1024 4096 16384

bench-latent: $(STAMP)
	$(PY) bench/latent_quant.py

bench-kv: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/kv_incremental.py

# The peers (SAELens, sparsify, vector-quantize-pytorch) live in their own venv: benchmark-only.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed

# a peers' venv: $(1) its folder, $(2) the packages beside torch and sparsecode (torchvision, which some pull
# in, is removed: it breaks the CPU build's imports)
define peer_venv
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(1)/bin/python -m pip install -q -c constraints.txt $(2)
	$(1)/bin/python -m pip uninstall -y -q torchvision
	$(1)/bin/python -m pip install -q -c constraints.txt -e .
	touch $(1)/.installed
endef

$(BENCH_STAMP): pyproject.toml constraints.txt
	$(call peer_venv,$(BENCH_VENV),sae-lens==6.54.12 eai-sparsify==1.3.3 vector-quantize-pytorch==1.32.0)

# SAELens, sparsify and dictionary_learning from PyPI, beside sparsecode, to check our files with their own loaders
INTEROP_VENV ?= .venv-interop
INTEROP_PY := $(INTEROP_VENV)/bin/python
INTEROP_STAMP := $(INTEROP_VENV)/.installed

$(INTEROP_STAMP): pyproject.toml constraints.txt
	$(call peer_venv,$(INTEROP_VENV),sae-lens==6.54.12 eai-sparsify==1.3.3 dictionary-learning==0.1.0 nnsight==0.3.7 pytest)

test-interop: $(INTEROP_STAMP)
	$(INTEROP_PY) -m pytest -q -m interop tests/test_interop_libs.py

bench-throughput: $(BENCH_STAMP)
	$(BENCH_PY) bench/throughput.py $(BENCH_ARGS)

# SAEs on 1.2M MiniLM activations beside SAELens (issue 14); the harvest returns at once when the store is complete
bench-sae-real: $(STAMP) $(BENCH_STAMP)
	$(PY) -m sparsecode harvest --tokens 1200000 --out runs/stores/minilm-h --no-progress
	OMP_NUM_THREADS=1 $(PY) bench/sae_real.py --store runs/stores/minilm-h $(BENCH_ARGS)

# The peers as wheels for the GPU machine: HAVE= its `pip list --format=freeze` (see bench/gpu_wheels.py)
bench-wheels: $(BENCH_STAMP)
	$(BENCH_PY) bench/gpu_wheels.py --have $(HAVE) --out .whl

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
