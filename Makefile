# One-command environment. `make demo` runs the main job, `make test` the test suite; both
# build .venv from the pinned requirement files when it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.usn-installed
REQS := requirements/constraints.txt requirements/torch.txt requirements/base.txt \
        requirements/dev.txt setup.py setup.cfg package.xml
PIP := $(PY) -m pip install --disable-pip-version-check -c requirements/constraints.txt
RUN := source env.sh &&
DEMO_OUT ?= demo_output
PYTEST_ARGS ?= -n 2

.PHONY: setup test demo lint clean bench

setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and alone: the pinned CPU wheel lies on local disk; letting pip choose
	# torch for another package would download a multi-GB CUDA build.
	$(PIP) -r requirements/torch.txt
	$(PIP) -r requirements/base.txt -r requirements/dev.txt
	$(PIP) --no-deps --no-build-isolation -e .
	# An editable install does not install data_files: link the share directory the way
	# `colcon build --symlink-install` would, so the ament index finds the package.
	mkdir -p $(VENV)/share/ament_index/resource_index/packages $(VENV)/share/usn_perception
	touch $(VENV)/share/ament_index/resource_index/packages/usn_perception
	for d in package.xml launch config models; do \
	  ln -sfn $(CURDIR)/$$d $(VENV)/share/usn_perception/$$d; done
	touch $(STAMP)

test: setup
	$(RUN) $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(RUN) $(VENV)/bin/usn-perception demo --out $(DEMO_OUT)

bench: setup
	$(RUN) $(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build install log .pytest_cache
