"""Initialise Intel MKL's vector math library (VML) once, on one thread, at import.

torch's CPU float32/float64 ``sqrt`` (also ``exp``, ``log``, ``tanh``, ...) calls MKL's VML
(ATen/cpu/vml.h: ``vmsSqrt(..., VML_HA)``), the high-accuracy mode: at most 1 ulp off. Measured
with torch 2.13.0's CPU wheel (MKL 2024.2) on a 2-core AVX-512 Xeon: when the process's *first*
VML call runs on several threads at once after an MKL sgemm (any float32 matmul), one thread's
share of that call comes out at about 12 bits (relative error up to 3.3e-4 instead of 6e-8) in
4 of 16 fresh processes; every later call is exact, and so is the first one when VML was used
once before, on any single thread (0 of 16). No other order of the same calls showed it (copy,
bf16 matmul, or no matmul: 0 of 12 each; one thread, or MKL restricted to AVX2: 0 of 6 each).

A training loop meets exactly that order: forward and backward (sgemm), then the optimizer's
first step, whose ``sqrt`` of a large moment is split over the threads. torch.optim.AdamW's
for-loop and foreach paths and mupopt's ``reference`` backend then write a first update with
errors of 3e-4 on half the elements (mupopt's ``cpu`` backend uses the C++ ``sqrtf`` and is not
affected); ``mupopt bench`` stopped on its own check when the reference snapshot came out so
(issue 22 item 8; tests/test_vml_first_call.py). One single-threaded VML call at import, before
the user's first matmul, removes the order: a few microseconds, once.
"""
from __future__ import annotations

import torch


def init_vml() -> None:
    """One VML call on the calling thread (16 elements: below ATen's parallel grain, so it runs
    on this thread alone). Without MKL torch uses its own vectorised sqrt and nothing is needed."""
    if torch.backends.mkl.is_available():
        torch.ones(16, dtype=torch.float32).sqrt_()
