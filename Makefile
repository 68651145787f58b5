# megfb: `make train` and `make test` set everything up themselves on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
CONFIG  ?= configs/quickstart.yaml
MEGFB   := $(VENV)/bin/megfb
PY      := $(VENV)/bin/python
# The stamp is keyed on the requirements and package metadata: a second `make` reinstalls
# nothing unless one of them changed (the MegEngine wheel alone is ~0.9 GB).
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt setup.cfg pyproject.toml | sha1sum | cut -c1-12)
# MegEngine prints a CUDA-probe banner at import on CPU-only machines; keep output clean.
export MEGENGINE_LOGGING_LEVEL ?= ERROR

.PHONY: help venv data stats train submit params eval bench test clean

help:
	@echo "make train   set up, generate data if data/ has no contest files, train (CONFIG=$(CONFIG))"
	@echo "make submit  pack the newest run's best checkpoint into submit/<run>-<time>.zip"
	@echo "make params  parameter / FLOPs report and the 100,000-parameter check"
	@echo "make eval    score the newest run's best checkpoint on its validation split"
	@echo "make data    generate the synthetic default set (if needed) and data/stats.yaml"
	@echo "make bench   plain vs fast paths, side by side"
	@echo "make test    set up and run the tests"
	@echo "make clean   remove what the project generated (venv, runs, synthetic data); never your files"

venv: $(STAMP)

# MegEngine 1.13.0 has wheels only for CPython <= 3.10: find a 3.10 interpreter, also when it
# is a pyenv version that is not the active one.
$(STAMP): requirements.txt setup.cfg pyproject.toml
	@py=""; \
	for cand in python3.10 "$${PYENV_ROOT:-$$HOME/.pyenv}"/versions/3.10*/bin/python3.10 /usr/bin/python3.10 /usr/local/bin/python3.10; do \
	  if "$$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' >/dev/null 2>&1; then py="$$cand"; break; fi; \
	done; \
	if [ -z "$$py" ]; then \
	  echo "error: python3.10 not found; MegEngine 1.13.0 needs CPython 3.10 (install it, e.g. 'pyenv install 3.10', and re-run make)." >&2; \
	  exit 1; \
	fi; \
	echo "setting up $(VENV) with $$py"; \
	rm -f $(VENV)/.installed-*; \
	[ -x $(PY) ] || "$$py" -m venv $(VENV) || exit 1; \
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt || exit 1; \
	$(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e . || exit 1
	@touch $@

data: $(STAMP)
	$(MEGFB) data synth
	$(MEGFB) data stats

# the config is checked before minutes of data generation (a typo'd CONFIG= fails at once)
train: $(STAMP)
	$(MEGFB) train --config $(CONFIG) --check-config
	$(MEGFB) data synth
	$(MEGFB) data stats
	$(MEGFB) train --config $(CONFIG)

submit: $(STAMP)
	$(MEGFB) submit

params: $(STAMP)
	$(MEGFB) params --config $(CONFIG)

eval: $(STAMP)
	$(MEGFB) eval

bench: $(STAMP)
	$(MEGFB) bench

test: $(STAMP)
	$(PY) -m pytest

# Only what the project generated (megfb/clean.py): contest files, submission zips and any
# file it does not know stay. Runs with the venv's Python, or python3 when the venv is gone.
clean:
	@if [ -x $(PY) ]; then py=$(PY); else py=python3; fi; \
	PYTHONPATH=. "$$py" -m megfb.clean --venv $(VENV)
