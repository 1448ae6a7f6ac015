# The two commands of the README. Both create .venv on first use and are fast afterwards.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sfv-installed
# torch first, pinned: on the project machines this takes the CPU build on disk (no CUDA wheels).
TORCH  := torch==2.13.0

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

# pytest exit code 5 means "no tests ran": that is a failure here. Tests use tiny models, which run
# faster on one intra-op thread, and some spawn training/collector subprocesses beside pytest: one
# thread each keeps 2 cores from being oversubscribed.
test: setup
	@OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: setup
	$(VENV)/bin/sfv-world pipeline preset=cpu-demo

clean:
	rm -rf $(VENV) $(STAMP) runs
