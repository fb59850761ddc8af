# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates or reuses .venv and installs what is needed (scripts/setup.sh).
VENV ?= .venv
PYTEST_ARGS ?=
# the light test files on two pytest workers (a file per worker), then the heavy ones (many
# processes or large models at once: tests/conftest.py) two at a time, then the testbed's heavy
# ones (CPU caps and timings on the shared host) one after another; for a subset, run pytest
# directly (.venv/bin/python -m pytest tests/test_x.py)
JOBS ?= 2

.PHONY: setup demo test test-fast clean

setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/bin/edgeweave demo

test: setup
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadfile -m "not heavy" $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadfile -m "heavy and not testbed" $(PYTEST_ARGS)
	$(VENV)/bin/python -m pytest -q -m "heavy and testbed" $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadfile -m "not slow and not testbed and not heavy" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache results runs
