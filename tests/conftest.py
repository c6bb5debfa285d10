"""Test-session set-up shared by every test module."""
from __future__ import annotations

import importlib.util

import torch

import interpreter_speed
import triton_mode

# triton.language's own @triton.jit helpers (tl.sum, tl.max, tl.cdiv, ...) take the mode of the
# first import of triton: imported compiled, they refuse to run inside interpreted kernels
# ("Cannot call @triton.jit'd outside of the scope of a kernel"). Without CUDA every Triton test
# interprets, but whichever test first touched triton decided the mode (a test of tests/
# test_errors.py run before tests/test_checkpoint_records.py failed Muon's and Shampoo's kernels).
# So triton is imported here first, in the mode the kernels will be defined in.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    with triton_mode.defining_kernels():
        import triton.language  # noqa: F401
    interpreter_speed.install()  # test speed only: tests/interpreter_speed.py
