# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates or reuses .venv and installs what is needed (scripts/setup.sh).
VENV ?= .venv
PYTEST_ARGS ?=
# two pytest workers, each test file on one of them (module fixtures such as a local cluster are
# shared by a file's tests; the testbed files use distinct prefixes and subnets), the files that
# run whole models on many processes one after another (tests/conftest.py, HEAVY)
JOBS ?= 2

.PHONY: setup demo test test-fast clean

setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/bin/edgeweave demo

test: setup
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadgroup $(PYTEST_ARGS)

test-fast: setup
	$(VENV)/bin/python -m pytest -q -n $(JOBS) --dist loadgroup -m "not slow and not testbed" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache results runs
