SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

demo: $(STAMP)
	$(PYTHON) -m captum_graph demo

test: $(STAMP)
	$(PYTHON) -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(PYTHON) benchmarks/run.py

venv: $(STAMP)

# torch and torchvision first, pinned: this pair is on the machine's disk and imports together.
$(STAMP): setup.cfg setup.py
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -q -e '.[test,demo]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
