# Amend: `make run` starts the whole service on the embedded defaults; `make test` runs the suite.
# Every install takes the exact versions in requirements.lock (see README, "Installs").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
LOCK := requirements.lock
TORCH_VERSION ?= $(shell sed -n 's/^torch==//p' $(LOCK))

.PHONY: install run test test-fast bench lint lock lock-freeze clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, with pip: this machine's pip configuration serves its CPU wheel (uv does not read it, and a bare
# `torch` from PyPI is a multi-GB CUDA build); then uv installs exactly the lock, and the project without deps.
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	@start=$$(date +%s); set -e; \
	$(PY) -m pip install --quiet --disable-pip-version-check "torch==$(TORCH_VERSION)"; \
	$(PY) -m pip install --quiet --disable-pip-version-check -c $(LOCK) uv; \
	$(UV) pip install --quiet --python $(PY) -r $(LOCK); \
	$(UV) pip install --quiet --python $(PY) --no-deps -e .; \
	$(UV) pip check --quiet --python $(PY); \
	echo "install: $$(( $$(date +%s) - start )) s"
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/amend dev

# prints how long installing and testing took; fails when a test or the lint fails (pytest exits 5 when none
# ran). The lint runs beside the tests: the suite mostly waits on its services, and a fresh clone's mypy
# (no cache) takes most of a minute of CPU
test:
	@start=$$(date +%s); $(MAKE) --no-print-directory install || exit 1; \
	installed=$$(date +%s); lintlog=$$(mktemp); \
	$(MAKE) --no-print-directory lint > $$lintlog 2>&1 & lintpid=$$!; \
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	wait $$lintpid; lintrc=$$?; cat $$lintlog; rm -f $$lintlog; \
	if [ $$lintrc -ne 0 ]; then echo "make test: the lint failed"; [ $$rc -ne 0 ] || rc=$$lintrc; fi; \
	echo "make test: install $$(( installed - start )) s, lint + tests $$(( $$(date +%s) - installed )) s"; \
	exit $$rc

lint: install
	$(VENV)/bin/ruff check app workers tests bench
	$(VENV)/bin/mypy app workers

bench: install
	$(PY) -m bench.merge_bench
	$(PY) -m bench.merge_api_bench
	$(PY) -m bench.upload_bench
	$(PY) -m bench.poll_bench
	$(PY) -m bench.merge_quality
	$(PY) -m bench.rain_bench
	$(PY) -m bench.compress_bench
	$(PY) -m bench.unlearn_bench
	$(PY) -m bench.deletion_bench
	$(PY) -m bench.soak --minutes 10

# Resolve the newest versions pyproject.toml allows (torch stays at TORCH_VERSION) in a scratch venv, write them
# to the lock, then reinstall and run the whole suite on them.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet "torch==$(TORCH_VERSION)" uv
	.lock-venv/bin/uv pip install --quiet --python .lock-venv/bin/python -e '.[dev,bench]'
	{ sed -n '1,2p' $(LOCK); .lock-venv/bin/uv pip freeze --python .lock-venv/bin/python --exclude-editable \
	  | grep -vE '^(pip|setuptools)==' | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv $(STAMP)
	$(MAKE) test

# After adding a dependency to pyproject.toml and installing it into .venv with the lock as constraints
# (`.venv/bin/uv pip install --python .venv/bin/python -c requirements.lock NAME`): rewrite the lock from the venv,
# keeping every other pin as it was.
lock-freeze: install
	{ sed -n '1,2p' $(LOCK); $(UV) pip freeze --python $(PY) --exclude-editable | grep -vE '^(pip|setuptools)==' \
	  | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@touch $(STAMP)

clean:
	rm -rf .amend-data
