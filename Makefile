# Amend: `make run` starts the whole service on the embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the CPU wheel (a bare `torch` requirement would fetch a multi-GB CUDA build)
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/amend dev

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check app workers tests bench
	$(VENV)/bin/mypy app workers

bench: install
	$(PY) -m bench.merge_bench
	$(PY) -m bench.merge_api_bench
	$(PY) -m bench.merge_quality
	$(PY) -m bench.unlearn_bench
	$(PY) -m bench.soak --minutes 10

clean:
	rm -rf .amend-data
