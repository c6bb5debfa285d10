"""The C++ backends: ``csrc/`` built at first use (see :mod:`.build`), stepped through
``torch.ops.mupopt`` (see :mod:`.ops`).

:func:`register` adds, for the registry names "adamw", "adopt", "lamb", "sophia" and
"sophia_hessian":

- backend "cpu" (CPU tensors of float32, bfloat16, float16 and float64, the last computed in
  float64; optimizer states in every ``state_bits`` format, 32, 16 and 8; priority 20, so
  ``auto`` prefers it on the CPU over the reference and over Triton's interpreter);
- backend "cuda" (CUDA tensors; states of formats 32, 16 and 8, format 8 compiled but not yet
  run on a GPU; only when ``torch.cuda.is_available()``; priority 15, above
  Triton's 10: on an H200 it stepped GPT-2 small and Llama-1B lists 1.4-2.4x faster than the
  Triton kernels, level with or ahead of torch's fused AdamW; benchmarks/results/).

Both step ``kahan_summation=True`` (bfloat16 / float16 params with a compensation: storage.h's
compensated param format; lists with one step through the per-call ops).

Both also register ``bind`` (:data:`ops.BIND`): a step bound to a param group's tensors, which
checks only the gradients per step (``csrc/bound.h``).

Importing this package compiles nothing. The first step, or the registry's first question
whether a backend can run (``unsupported_reason``), tries the build once and remembers the
outcome: without a compiler, ninja or CUDA toolkit, ``auto`` falls back to the next backend and
an explicit ``backend="cpu"`` raises with the build's reason.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import ops

OPTIMIZERS = ("adamw", "adopt", "lamb", "sophia", "sophia_hessian")
CPU_PRIORITY = 20
CUDA_PRIORITY = 15
# Storage dtypes per backend. float64 is computed in float64 on the CPU (as torch.optim); the
# CUDA kernels compute in float32 only, so float64 CUDA tensors go to the reference backend.
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Both step every state format in their kernels (csrc/include/mupopt/multi_tensor.h): the CPU
# loops and the CUDA kernel decode and encode format 8 per block of 256. The CUDA kernel's
# formats 16 and 8 are compiled by tests/test_csrc_compiles.py and not yet run on a GPU
# (tests/test_lean_states_cuda.py, marked gpu, waits for one).
STATE_BITS = (8, 16, 32)


def _layout_reason(tensors: Sequence[torch.Tensor], cuda: bool, backend: str) -> str | None:
    """Why these tensors cannot run, from their device, dtype and layout; else None.

    Called for every step: the loop touches only cheap attributes (is_cuda, dtype,
    is_contiguous(): about 0.5 us per tensor; device.type allocates a device object each time)."""
    supported = _CUDA_DTYPES if cuda else _CPU_DTYPES
    index = None
    for i, t in enumerate(tensors):
        if t.is_cuda != cuda or (not cuda and not t.is_cpu):
            return f"tensor {i} is on {t.device}: backend {backend!r} steps {'CUDA' if cuda else 'CPU'} tensors"
        if cuda:
            if index is None:
                index = t.get_device()
            elif t.get_device() != index:
                return f"tensors on different devices (cuda:{index} and {t.device}): one device per step call"
        if t.dtype == torch.uint8 and t.is_contiguous():
            continue  # state_bits=8's codes (the op checks that they are a state's)
        if t.dtype not in supported:
            why = (" (float64 params are stepped in float64 arithmetic by the cpu backend on the CPU and by "
                   "the reference backend; the CUDA kernels compute in float32)" if t.dtype == torch.float64 else "")
            names = "float32, bfloat16 and float16" if cuda else "float32, bfloat16, float16 and float64"
            return f"tensor {i} has dtype {t.dtype}; backend {backend!r} supports {names}{why}"
        if not t.is_contiguous():
            return (
                f"tensor {i} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; the "
                f"kernels read each tensor as one flat array"
            )
    return None


def cpu_unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """None when backend "cpu" can step ``tensors``, else why not (tries the build once)."""
    reason = _layout_reason(tensors, False, "cpu")
    if reason is not None:
        return reason
    from .build import load_cpu

    outcome = load_cpu()
    return None if outcome is True else outcome


def cuda_unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """None when backend "cuda" can step ``tensors``, else why not (tries the build once)."""
    reason = _layout_reason(tensors, True, "cuda")
    if reason is not None:
        return reason
    from .build import load_cuda

    outcome = load_cuda()
    return None if outcome is True else outcome


def register() -> None:
    """Register backends "cpu" (and "cuda" when CUDA is available) for every optimizer above.
    Idempotent; builds nothing."""
    from ... import backends

    with_cuda = torch.cuda.is_available()
    for name in OPTIMIZERS:
        if "cpu" not in backends.names(name):
            backends.register(
                backends.Backend(
                    name, "cpu", ops.FUNCTIONS[name], priority=CPU_PRIORITY, unsupported_reason=cpu_unsupported_reason,
                    # capturable: on CPU tensors the step counts live on the host anyway; the op
                    # reads found_inf itself (no Python host read), so nothing here waits.
                    devices=("cpu",), validates=True, capturable=True,
                    bind=ops.BIND[name], state_bits=STATE_BITS,
                    # kahan_summation: storage.h's compensated param format (the Hessian EMA
                    # stores no param).
                    kahan_summation=True,
                )
            )
        if with_cuda and "cuda" not in backends.names(name):
            backends.register(
                backends.Backend(
                    name, "cuda", ops.FUNCTIONS[name], priority=CUDA_PRIORITY, unsupported_reason=cuda_unsupported_reason,
                    devices=("cuda",), validates=True,
                    bind=ops.BIND[name], state_bits=STATE_BITS,
                    # kahan_summation: storage.h's compensated param format (the Hessian EMA
                    # stores no param).
                    kahan_summation=True,
                )
            )


__all__ = ["OPTIMIZERS", "cpu_unsupported_reason", "cuda_unsupported_reason", "ops", "register"]
