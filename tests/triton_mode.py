"""The mode the Triton test modules define the kernels in, and the environment around it.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined: without CUDA the kernels must
be defined interpreted (they then take CPU tensors). The variable is set only while the kernels
are imported and while a Triton test runs; at any other time it is as the user left it, so that
collecting these modules does not switch other modules' ``backend="auto"`` to the (slow)
interpreter.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

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


def runs_on_cpu() -> bool:
    """Whether the "triton" backend steps CPU tensors here: triton installed, its kernels
    defined interpreted (no CUDA). Imports the kernels inside :func:`defining_kernels`."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return False
    with defining_kernels():
        from mupopt.kernels.triton import _common
    return bool(_common.INTERPRET)


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


def compile_for_sm90(script: str) -> list:
    """Run ``script`` (which compiles kernels for sm_90 through a launch hook and prints its
    results as JSON on the last line) in a fresh interpreter with compiled-mode kernels; return
    the parsed results. Skips where triton has no ahead-of-time compile API or no ptxas."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0 and ("ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower()):
        pytest.skip("no ptxas for the NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
