# The two commands of the README. Each creates the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.effinfer-installed

.PHONY: bench demo test docs clean-venv

$(STAMP): pyproject.toml setup.py examples/effinfer-example-plugin/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: pip finds this CPU build locally; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,eval,docs,data,serve]'
	$(PY) -m pip install -q -e examples/effinfer-example-plugin
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/effinfer bench

demo: $(STAMP)
	$(VENV)/bin/effinfer demo

test: $(STAMP)
	$(VENV)/bin/lint-imports  # the layer contracts in pyproject.toml
	$(VENV)/bin/pytest

docs: $(STAMP)
	$(VENV)/bin/effinfer docs build

clean-venv:
	rm -rf $(VENV)
