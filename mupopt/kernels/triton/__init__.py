"""The "triton" backend: fused multi-tensor Triton kernels for AdamW, ADOPT, LAMB and SophiaG.

:func:`register` adds backend "triton" (priority 10, above the reference's 0) for the registry
names "adamw", "adopt", "lamb", "sophia" and "sophia_hessian". Nothing here imports triton: the
kernel modules (``_common``, ``adamw``, ...) are imported at the first step, because
``triton.jit`` decides between compiling and interpreting (``TRITON_INTERPRET=1``) when a kernel
is defined, and a test or a user may set that variable after ``import mupopt``.

Design (launch tables, pointers, caching, numerics): see ``_common``'s docstring.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

import torch

OPTIMIZERS = ("adamw", "adopt", "lamb", "sophia", "sophia_hessian")
PRIORITY = 10
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
_import_error: str | None = None
_import_checked = False


def _triton_missing() -> str | None:
    """Why triton cannot be imported (checked once), or None."""
    global _import_checked, _import_error
    if not _import_checked:
        _import_checked = True
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            _import_error = f"triton is not importable ({exc}): pip install triton"
        except Exception as exc:  # a broken install: say why
            _import_error = f"triton is not importable: {type(exc).__name__}: {exc}"
    return _import_error


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool | None:
    """How the kernels were built: True interpreted, False compiled, None not imported yet."""
    common = sys.modules.get(__name__ + "._common")
    return None if common is None else common.INTERPRET


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """None when the Triton kernels can step ``tensors``, else why not (for the registry).

    Needs: triton importable; CUDA tensors, or CPU tensors while ``TRITON_INTERPRET=1`` (the
    interpreter's pointers are raw host addresses, so there it takes CPU tensors only); one
    device; float32 or bfloat16; contiguous layout. Any tensors may be passed (params, grads,
    states): each is checked. ``triton.jit`` fixes the mode when the kernels are first imported;
    a mode that disagrees with the environment now is reported rather than guessed at.
    """
    interp = _env_interpret()
    built = kernels_interpreted()
    device = None
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":
            if not interp:
                return f"tensor {i} is on the CPU: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
            if built is False:
                return "TRITON_INTERPRET=1 was set after the Triton kernels were compiled for the GPU: CPU tensors cannot run"
        elif t.device.type == "cuda":
            if interp or built:
                return (
                    f"tensor {i} is on {t.device}, but the Triton kernels run in the interpreter "
                    f"(TRITON_INTERPRET=1 when they were imported, or now), which reads host memory only"
                )
        else:
            return f"tensor {i} is on {t.device}: the Triton kernels need CUDA tensors"
        if device is None:
            device = t.device
        elif t.device != device:
            return f"tensors on different devices ({device} and {t.device}): one device per step call"
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"tensor {i} has dtype {t.dtype}; the Triton kernels support float32 and bfloat16"
        if not t.is_contiguous():
            return (
                f"tensor {i} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; the "
                f"kernels read each tensor as one flat array"
            )
    return _triton_missing()


# The functional entry points import their kernel module at the first call (see the docstring).
# (Not named like the submodules: importing a submodule binds its name in this package.)
def _adamw_step(params, grads, states, mults, hp) -> None:
    from .adamw import adamw_triton

    adamw_triton(params, grads, states, mults, hp)


def _adopt_step(params, grads, states, mults, hp) -> None:
    from .adopt import adopt_triton

    adopt_triton(params, grads, states, mults, hp)


def _lamb_step(params, grads, states, mults, hp) -> None:
    from .lamb import lamb_triton

    lamb_triton(params, grads, states, mults, hp)


def _sophia_step(params, grads, states, mults, hp) -> None:
    from .sophia import sophia_triton

    sophia_triton(params, grads, states, mults, hp)


def _sophia_hessian_step(params, grads, states, mults, hp) -> None:
    from .sophia import sophia_hessian_triton

    sophia_hessian_triton(params, grads, states, mults, hp)


_FUNCTIONS = {
    "adamw": _adamw_step,
    "adopt": _adopt_step,
    "lamb": _lamb_step,
    "sophia": _sophia_step,
    "sophia_hessian": _sophia_hessian_step,
}


def register() -> None:
    """Register backend "triton" for every optimizer above (idempotent)."""
    from ... import backends

    for name in OPTIMIZERS:
        if "triton" in backends.names(name):
            continue
        backends.register(
            backends.Backend(name, "triton", _FUNCTIONS[name], priority=PRIORITY, unsupported_reason=unsupported_reason)
        )
