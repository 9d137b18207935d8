# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# torch is pinned and installed first so pip never resolves the bare `torch>=2.5`
# range itself (on a machine without torch that would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test venv clean

# the demo needs the package alone; the tests also need the extras they exercise
$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,hub,data,serve,lm-eval]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.base
	$(VENV)/bin/blt demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
