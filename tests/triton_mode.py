"""The mode the Triton test modules define the kernels in, and the environment around it.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined: without CUDA the kernels must
be defined interpreted (they then take CPU tensors). The variable is set only while the kernels
are imported and while a Triton test runs; at any other time it is as the user left it, so that
collecting these modules does not switch other modules' ``backend="auto"`` to the (slow)
interpreter.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

VAR = "TRITON_INTERPRET"


@contextlib.contextmanager
def defining_kernels():
    """Around the imports that define the kernels: interpreted where there is no CUDA (unless the
    user's environment says otherwise), the environment restored afterwards."""
    before = os.environ.get(VAR)
    if not torch.cuda.is_available():
        os.environ.setdefault(VAR, "1")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = before


def match_environment(monkeypatch, interpret: bool) -> None:
    """While a test runs, the environment agrees with the mode the kernels were defined in."""
    if interpret:
        monkeypatch.setenv(VAR, "1")
    else:
        monkeypatch.delenv(VAR, raising=False)


def devices(interpret: bool) -> list:
    """The devices a kernel test runs on: CPU tensors in the interpreter, CUDA tensors compiled
    (marked gpu)."""
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpret, reason="CPU tensors need TRITON_INTERPRET=1")),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available() or interpret, reason="needs CUDA and compiled kernels"),
            ],
        ),
    ]
