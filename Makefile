# nsexp: the two commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
NSEXP  := $(VENV)/bin/nsexp
OUT    ?= data/runs/latest
FIGS   ?= figures/latest
KERNEL ?=
PYTEST_ARGS ?=
CALLS  ?= 100000
FUZZ_RECORD ?= build/debug/debug_ioctl_fuzz.json

.PHONY: help setup test test-debug fuzz-debug run lab figures kmod debug-kernel vm-shell lint format clean lock

help:
	@echo "make run       set up, build the module, boot the VM, run the paper's experiment ($(OUT))"
	@echo "make test      set up, then run the whole test suite (PYTEST_ARGS=\"-m 'not vm'\")"
	@echo "make setup     install what is missing (apt packages, .venv from the lock); idempotent"
	@echo "make lab       JupyterLab on notebooks/ (http://127.0.0.1:8888; saves without outputs)"
	@echo "make figures   execute the notebooks with papermill: regenerate data/ and figures/"
	@echo "make kmod      build kmod/nsmigrate.ko for the default kernel"
	@echo "make debug-kernel  build (or reuse) the cached debug guest kernel (KASAN, lockdep, ...)"
	@echo "make test-debug    the module's VM suite, fault injection and fuzz on the debug kernel"
	@echo "make fuzz-debug    the ioctl fuzzer alone on the debug kernel, CALLS=$(CALLS) (about 20/s)"
	@echo "make vm-shell  interactive shell in the VM with the module loaded (KERNEL=<release>)"
	@echo "make lock      re-resolve the Python dependencies into requirements/lock.txt (hashes)"
	@echo "make lint      ruff check + ruff format --check"
	@echo "make clean     remove build products (build/, caches; keeps .venv and data/)"

setup:
	@bash tools/setup.sh

# `make test` builds (or reuses, from ~/.cache/nsexp/kernels) the debug kernel as its own step
# before pytest, never inside a test's timeout; a run that deselects the VM tests skips it.
# `make test-debug` runs only the debug-kernel suite (tests marked `debug`).
test: setup
	$(if $(findstring not vm,$(PYTEST_ARGS)),,$(NSEXP) debug-kernel)
	$(PY) -m pytest $(PYTEST_ARGS)

test-debug: setup debug-kernel
	$(PY) -m pytest -m debug $(PYTEST_ARGS)

# The issue's 100,000 calls take well over an hour, so they are a run of their own; the record
# (totals, kernel-log reports, kmemleak, commit) goes to $(FUZZ_RECORD), never into data/; -s shows
# the boot's progress lines (the command and the fuzzer's count) as it goes.
fuzz-debug: setup debug-kernel
	NSEXP_DEBUG_PARTS=fuzz NSEXP_DEBUG_IOCTL_FUZZ=$(CALLS) NSEXP_DEBUG_FUZZ_RECORD=$(FUZZ_RECORD) \
		$(PY) -m pytest -s -m debug tests/test_kmod_debug.py $(PYTEST_ARGS)

run: setup
	$(NSEXP) run --backend kmod --testbed vm --out $(OUT) --figures $(FIGS)

# Saves strip outputs (nsexp/lab.py): a session never writes its results into the tracked notebooks.
lab: setup
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser --notebook-dir notebooks \
		--ContentsManager.pre_save_hook=nsexp.lab.strip_outputs \
		$(if $(filter 0,$(shell id -u)),--allow-root)

figures: setup
	$(NSEXP) figures

kmod:
	$(MAKE) -C kmod

debug-kernel: setup
	$(NSEXP) debug-kernel

vm-shell: setup
	$(NSEXP) vm-shell $(if $(KERNEL),--kernel $(KERNEL))

# Python dependencies: pyproject.toml -> requirements/lock.txt (exact versions + sha256), which
# setup installs with --require-hashes. Run after changing a dependency; commit the lock.
lock:
	@bash tools/lock.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	-[ -f kmod/Makefile ] && $(MAKE) -C kmod clean
