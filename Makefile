# Two entry points (README): `make verify` runs the main job, `make test` runs the tests.
# Both create .venv and install what they need on a fresh machine. Without a GPU the CPU build of
# torch is installed (a bare `torch` requirement would pull several GB of CUDA packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
STAMP  := $(VENV)/.installed

.PHONY: setup verify test clean

setup: $(STAMP)

# mup and torchtitan without their declared dependencies (mup's pull a torchvision that breaks
# beside a CPU torch; torchtitan's serve its trainer: what its optimizer code imports is in the
# test extra). The last step builds the C++ libraries ahead of time (tests would otherwise build
# them at first use); without a C++ compiler that backend is skipped, so a failed build (-) does
# not stop the set-up.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps mup
	$(BIN)/pip install --quiet --no-deps torchtitan==0.3.0
	-$(BIN)/python -m mupopt.kernels.cpp.build --quiet
	touch $(STAMP)

verify: $(STAMP)
	$(BIN)/mupopt verify

# Two pytest-xdist workers, each test file on one worker (a module's spawn fixture runs once):
# a clean-clone CI run on an idle 2-core machine, tests 682 s against 1025-1106 s serial
# (2026-12-07; an earlier trial that found no gain ran beside other work).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
