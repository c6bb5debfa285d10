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

# The last step builds the "cpu" backend's library ahead of time (tests would otherwise build it
# at first use); without a C++ compiler that backend is skipped, so a failed build (-) does not
# stop the set-up.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps mup
	-$(BIN)/python -m mupopt.kernels.cpp.build --quiet
	touch $(STAMP)

verify: $(STAMP)
	$(BIN)/mupopt verify

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
