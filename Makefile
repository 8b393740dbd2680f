# The README's commands. Each one sets everything up on a fresh machine (a venv in .venv, torch,
# flashsae built from source with its test and demo extras) and then runs:
#
#   make train   the main job: `flashsae train`, the offline demo (a TopK SAE on all-MiniLM-L6-v2)
#   make bench   `flashsae bench`, flashsae vs dense PyTorch on one training step
#   make test    the test suite (what .ci/run calls)
#   make test-integrations   tests/integrations with the real clients (SAELens, SAEBench, TransformerLens,
#                nnsight) in a separate venv, .venv-peers: they are never flashsae dependencies
#
# Knobs:
#   PYTHON           interpreter that creates the venv (python3)
#   TORCH_SPEC       the torch requirement (torch==2.13.0)
#   TORCH_INDEX_URL  package index for the torch install only, which picks the build: empty means pip's
#                    configured index (PyPI's Linux x86-64 torch is a CUDA build); the CPU-only wheel:
#                    https://download.pytorch.org/whl/cpu, for a given CUDA https://download.pytorch.org/whl/cu128
#   FLASHSAE_CUDA=AUTO|ON|OFF, FLASHSAE_WERROR=ON|OFF   build options of the extension (see pyproject.toml)
# e.g. make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The torch step runs once per venv: after changing TORCH_SPEC or TORCH_INDEX_URL, `make clean` first.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc python kernels -type f -not -name '*.pyc')

PEERS_VENV ?= .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python

.PHONY: train bench test test-integrations clean

$(VENV)/.torch-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	touch $@

# Rebuilt whenever a source changes; torch is already in the venv, so pip keeps it.
$(VENV)/.flashsae-installed: $(VENV)/.torch-installed $(SOURCES)
	$(PY) -m pip install ".[test,demo]"
	touch $@

train: $(VENV)/.flashsae-installed
	$(VENV)/bin/flashsae train

bench: $(VENV)/.flashsae-installed
	$(VENV)/bin/flashsae bench

# PYTHONSAFEPATH=1: `python -m pytest` would put the checkout's root on sys.path, where the top-level
# kernels/ folder (shipped as flashsae.kernels) then shadows the `kernels` package that transformers
# >= 5 looks for (`from kernels import CUDAProperties` -> ImportError in every model load).
test: $(VENV)/.flashsae-installed
	PYTHONSAFEPATH=1 TRITON_INTERPRET=1 $(PY) -m pytest

# The clients pull their own requirements (transformers, datasets, ...) and may move torch: TORCH_SPEC
# is part of their install (else pip's resolver backtracks through other torch builds, CUDA ones
# included) and pinned again after them, and a torchvision built for another torch is removed (it fails
# at import, and transformers imports it when present). Own build folder: the main venv's stays as is.
$(PEERS_VENV)/.installed: $(SOURCES)
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install -Cbuild-dir=build/peers-{wheel_tag} ".[test,demo,integrations]" "$(TORCH_SPEC)"
	$(PEERS_PY) -m pip install $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "$(TORCH_SPEC)"
	$(PEERS_PY) -c "import torchvision" 2>/dev/null || $(PEERS_PY) -m pip uninstall -y torchvision
	touch $@

test-integrations: $(PEERS_VENV)/.installed
	PYTHONSAFEPATH=1 TRITON_INTERPRET=1 $(PEERS_PY) -m pytest tests/integrations tests/test_docs_snippets.py -k 'integrations or needs_marker'

clean:
	rm -rf $(VENV) $(PEERS_VENV) build
