# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates or reuses .venv and installs what is needed (scripts/setup.sh).
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean

setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/bin/edgeweave demo

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow and not testbed" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache results runs
