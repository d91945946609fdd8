# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

# uv installs the stack in about 1 min (pip: about 2 min). It reads no pip.conf, so it gets pip's
# find-links (where this machine keeps the CPU torch wheel) from pip's own configuration.
# --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set, every process would
# otherwise recompile the stack on import (13 s more per stage of the demo, measured).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
UV := $(PY) -m uv pip install -q --compile-bytecode --python $(PY) $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv
	# torch first, pinned: the CPU wheel. A bare `torch` would pull a multi-GB CUDA build.
	$(UV) torch==2.13.0
	$(UV) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the built-in shapes world (configs/demo/): pretrain → online alignment
# with LoRA (DiffusionNFT, and the RAFT control) → evaluation → runs/demo/report.html and a printed summary.
demo: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m align.demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs
