# mtfm_rec: every target installs what it needs first (idempotent, see docs/INSTALL.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR ?= data
ML1M_GENRE := $(DATA_DIR)/ml1m_genre
ML1M_SWR := $(DATA_DIR)/ml1m_swr
PYTEST_ARGS ?=
# make test: pytest-xdist workers, one intra-op thread each (2 workers x 1 thread = the 2 CI cores)
TEST_WORKERS ?= 2

.PHONY: install data train test lint bench compare compare-genre gpu-check java-check clean help

help:
	@echo "make train   install if needed, build ml1m_genre, train configs/ml1m_genre.yaml, print AUC/GAUC"
	@echo "make test    install if needed, run the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)"
	@echo "make lint    install if needed, ruff check + ruff format --check + mypy (settings: pyproject.toml)"
	@echo "make data    install if needed, build the MovieLens-1M recipes ml1m_swr and ml1m_genre"
	@echo "make bench   install if needed, run the benchmarks, write/*.json and docs/BENCHMARKS.md"
	@echo "make compare install if needed, MTFM against the baselines on ML-1M (docs/EXPERIMENTS.md);"
	@echo "             COMPARE_MODELS=... COMPARE_SEEDS=0,1,2 (a re-run finishes only what is missing)"
	@echo "make compare-genre   the same on the ml1m_genre scenarios: the paper's Table 2 shape"
	@echo "make gpu-check GPU_PY=python   on a CUDA machine (docs/INSTALL.md): GPU parity tests,"
	@echo "             kernel bench (docs/bench/kernels-cuda.json), training on the Triton path"

# Re-installs only when a lock file, setup.py, pyproject.toml or a kernel's C++ source changes; a second run is a no-op.
$(STAMP): requirements-lock.txt requirements-nodeps.txt setup.py pyproject.toml kernels/hstu_attention/csrc/hstu_cpu.cpp kernels/group_norm/csrc/group_norm_cpu.cpp
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m mtfm_rec.install_check
	$(PY) -m mtfm_rec.kernels.cpu_extension
	@touch $(STAMP)

install: $(STAMP)

data: install
	$(PY) -m mtfm_rec.data.public.movielens --recipe ml1m_genre --out $(ML1M_GENRE)
	$(PY) -m mtfm_rec.data.public.movielens --recipe ml1m_swr --out $(ML1M_SWR)

train: install
	$(PY) -m mtfm_rec.data.public.movielens --recipe ml1m_genre --out $(ML1M_GENRE)
	$(PY) -m mtfm_rec.train --config configs/ml1m_genre.yaml data.raw=$(ML1M_GENRE)

test: install java-check
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

# The Spark aggregation engine (aggregation.engine=spark) and its equality test need Java 17+.
JAVA_HINT := the Spark aggregation engine (aggregation.engine=spark) and its tests need Java 17+: apt-get install -y openjdk-17-jre-headless, or set JAVA_HOME
JAVA = $$(command -v java || echo "$$JAVA_HOME/bin/java")
java-check:
	@command -v java >/dev/null 2>&1 || { test -n "$$JAVA_HOME" && test -x "$$JAVA_HOME/bin/java"; } || { echo "make: no java on PATH and no JAVA_HOME; $(JAVA_HINT)" >&2; exit 1; }
	@$(JAVA) -version 2>&1 | head -1 | grep -Eq '"(1[7-9]|[2-9][0-9])[."]' || { echo "make: $$($(JAVA) -version 2>&1 | head -1) is older than 17; $(JAVA_HINT)" >&2; exit 1; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m mtfm_rec.bench $(BENCH_ARGS)

# MTFM against the paper's baselines on the ML-1M Scenario-Wise Rec split, trained to early
# stopping on validation (docs/EXPERIMENTS.md, results in docs/BENCHMARKS.md "Baselines").
COMPARE_MODELS ?= mtfm,mmoe,star,pepnet,dcnv2,mtgr,onetrans,rankmixer
COMPARE_SEEDS ?= 0,1,2
COMMA := ,
compare: data
	$(PY) -m mtfm_rec.experiments compare --config configs/ml1m_swr.yaml --models $(COMPARE_MODELS) \
		$(if $(filter mtfm,$(subst $(COMMA), ,$(COMPARE_MODELS))),--model-config mtfm=configs/ml1m_swr_mtfm.yaml) \
		--seeds $(COMPARE_SEEDS) --name ml1m_swr data.raw=$(ML1M_SWR) data.loader.batch_size=256 \
		train.max_minutes=0 train.max_steps=5000 train.eval_every=250 train.early_stopping_patience=4 \
		train.checkpoint_every=250 train.progress_bar=false train.tensorboard=false
	MTFM_COMPARE_DIR=runs/ml1m_swr $(PY) -m mtfm_rec.bench --only baselines

# The paper's Table 2 on ML-1M's genre scenarios (heterogeneous schemas, click and like), every
# model with configs/ml1m_genre.yaml's model section and the same budget (docs/BENCHMARKS.md "table2").
compare-genre: data
	$(PY) -m mtfm_rec.experiments compare --config configs/ml1m_genre.yaml --models $(COMPARE_MODELS) \
		--seeds $(COMPARE_SEEDS) --name ml1m_genre data.raw=$(ML1M_GENRE) data.loader.batch_size=256 \
		train.max_minutes=0 train.max_steps=5000 train.eval_every=250 train.early_stopping_patience=4 \
		train.checkpoint_every=250 train.progress_bar=false train.tensorboard=false
	MTFM_TABLE2_DIR=runs/ml1m_genre $(PY) -m mtfm_rec.bench --only table2

# On a CUDA machine set up as docs/INSTALL.md says ("CUDA GPUs"); GPU_PY is that environment's
# python. Nothing here installs: the pinned lock is the CPU stack.
GPU_PY ?= python
gpu-check:
	@$(GPU_PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make gpu-check: $(GPU_PY) sees no CUDA device; install the CUDA stack (docs/INSTALL.md) and pass GPU_PY=<its python>')"
	TRITON_INTERPRET=0 $(GPU_PY) -m pytest -q -m gpu tests
	$(GPU_PY) -m mtfm_rec.bench --only kernels
	$(GPU_PY) -m mtfm_rec.data.synthetic --out $(DATA_DIR)/synthetic --users 2000 --days 7
	$(GPU_PY) -m mtfm_rec.train --config configs/synthetic.yaml data.raw=$(DATA_DIR)/synthetic \
		train.run_dir=runs/gpu_check train.resume=never model.attention_backend=triton

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
