# The two commands: `make demo` and `make test`. Both create .venv with pip if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKSPACE ?= protoclip-workspace

.PHONY: demo test test-fast install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project's dependencies change. The warning filter hides setuptools' note that
# an editable install of a package folder at the top of the checkout could be shadowed by a folder of
# the same name elsewhere (informational, printed by every such install).
$(STAMP): pyproject.toml | $(BIN)/python
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/protoclip demo --workspace $(WORKSPACE)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# The fast lane: everything but the integration tests (real downloads, the teacher, processes, several trainings).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m "not integration and not slow and not gpu"

clean:
	rm -rf $(VENV) $(WORKSPACE) build *.egg-info
