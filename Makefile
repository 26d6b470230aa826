# `make demo`, `make test` and `make docs` create .venv on first use and reuse it afterwards.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

VENV := .venv
PYTHON := $(VENV)/bin/python
# -qq: errors only (the local package index prints many harmless warnings).
PIP := $(PYTHON) -m pip install -qq
# This pair lies on the machine's disk; other torch/torchvision pairs do not import together here.
TORCH := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test docs bench faithfulness venv clean

demo: $(STAMP)
	$(PYTHON) -m captum_graph demo

# Two workers (the machine has two cores); loadfile keeps a module's tests, and its fixtures, on one worker.
test: $(STAMP)
	$(PYTHON) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The documentation site, offline, into docs/_build/html; warnings are errors (tests/docs builds it
# the same way). Tutorials and examples run during the build, cached by content in docs/_build/.cache.
docs: $(STAMP)
	$(PYTHON) -m sphinx -W --keep-going -q -b html docs/source docs/_build/html
	@echo "The site: docs/_build/html/index.html"

# zennit (the `bench` extra) is one of the baselines; only the benchmark needs it.
bench: $(VENV)/.bench-installed
	$(PYTHON) benchmarks/run.py

# Which explanation finds known evidence (README: "Which explanation is right"); --quick: under 3 minutes.
faithfulness: $(VENV)/.bench-installed
	$(PYTHON) benchmarks/faithfulness.py --out benchmarks/results

$(VENV)/.bench-installed: $(STAMP)
	$(PIP) -e '.[bench]' $(TORCH)
	@touch $@

venv: $(STAMP)

# Reinstalls only when the packaging files change. torch goes in first and stays pinned
# in the second step, so no dependency can move it to a pair that fails to import.
$(STAMP): setup.cfg setup.py Makefile
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@echo "Installing into $(VENV) (the first time takes a few minutes)..."
	$(PIP) $(TORCH)
	$(PIP) -e '.[test,demo,docs]' $(TORCH)
	@touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis docs/_build docs/source/_generated
