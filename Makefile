# The two set-up commands (README): `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OPS_LOG := $(VENV)/setup_ops.log
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

# headless Chromium renders `revcol compare --html` reports in the tests
CHROMIUM := command -v chromium >/dev/null || $(SUDO) apt-get install -y -q chromium || \
	($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

.PHONY: install demo test test-fast bench lock clean

install: $(STAMP)

# Pinned set (constraints.txt) so a fresh machine installs in minutes instead of ~18 min of resolver backtracking.
# DeepSpeed's ops are the longest part (4–6 min of compiling on 2 cores): torch and DeepSpeed go in first, then the
# ops build in the background while pip installs the rest and apt Chromium; the build's log is printed after it.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# DeepSpeed's async I/O op (NVMe offload) links libaio
	test -e /usr/include/libaio.h || $(SUDO) apt-get install -y -q libaio-dev || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q libaio-dev)
	$(PY) -m pip install --quiet -c constraints.txt torch torchvision deepspeed
	$(PY) -m pipeline.setup_ops > $(OPS_LOG) 2>&1 & ops=$$!; \
		$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]' && { $(CHROMIUM); }; rest=$$?; \
		wait $$ops; built=$$?; cat $(OPS_LOG); test $$rest -eq 0 && test $$built -eq 0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/revcol demo

test: $(STAMP)
	$(PY) -m pytest tests

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# Regenerate the pinned set after changing dependencies (needs the package registries).
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv
	.lockenv/bin/pip install --quiet -e '.[dev]'
	.lockenv/bin/pip freeze --exclude-editable | grep -v '^-e ' > constraints.txt
	rm -rf .lockenv

clean:
	rm -rf $(VENV) .pytest_cache
