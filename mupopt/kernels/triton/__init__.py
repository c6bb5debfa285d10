"""The "triton" backend: fused multi-tensor Triton kernels for AdamW, ADOPT, LAMB and SophiaG
(this package), Muon and Shampoo (``muon``, ``shampoo``, on ``newton_schulz``).

:func:`register` adds backend "triton" (priority 10, above the reference's 0) for the registry
names "adamw", "adopt", "lamb", "sophia", "sophia_hessian", "muon" and "shampoo". Nothing here
imports triton: the
kernel modules (``_common``, ``adamw``, ...) are imported at the first step, because
``triton.jit`` decides between compiling and interpreting (``TRITON_INTERPRET=1``) when a kernel
is defined, and a test or a user may set that variable after ``import mupopt``.

Design (launch tables, pointers, caching, numerics, GradScaler): see ``_common``'s docstring. Each
registry function is a ``torch.library`` custom op (below), so that ``torch.compile`` of a
training step that calls ``optimizer.step()`` sees the fused step as one opaque op.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Sequence

import torch

from ...mup import Multipliers
from ...storage import COMPENSATION, compensates, seeds_of

OPTIMIZERS = ("adamw", "adopt", "lamb", "sophia", "sophia_hessian")
PRIORITY = 10
# The optimizer-state formats every kernel here steps (mupopt/optim/_lean_states.py): 32, 16
# (bfloat16 states: the storage code of their dtype) and 8 (_common's codes 5 and 6).
STATE_BITS = (8, 16, 32)
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Muon's and Shampoo's kernels (Newton-Schulz, Gram products) take float32 and bfloat16 only.
MATRIX_DTYPES = (torch.float32, torch.bfloat16)


def _dtype_names(dtypes) -> str:
    names = [str(d).replace("torch.", "") for d in dtypes]
    return ", ".join(names[:-1]) + " and " + names[-1]
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


def unsupported_reason(tensors: Sequence[torch.Tensor], supported=_SUPPORTED_DTYPES) -> str | None:
    """None when the Triton kernels can step ``tensors``, else why not (for the registry).

    Needs: triton importable; CUDA tensors, or CPU tensors while ``TRITON_INTERPRET=1`` (the
    interpreter's pointers are raw host addresses, so there it takes CPU tensors only); one
    device; a dtype of ``supported`` (the elementwise kernels: float32, bfloat16, float16);
    contiguous layout. Any tensors may be passed (params, grads,
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
        if t.dtype == torch.uint8:
            continue  # the codes of 8-bit states (state_bits=8): the kernels check their roles and scales
        if t.dtype not in supported:
            why = (" (float64 params are stepped in float64 arithmetic by the reference backend; the kernels "
                   "compute in float32)" if t.dtype == torch.float64 else "")
            return f"tensor {i} has dtype {t.dtype}; these Triton kernels support {_dtype_names(supported)}{why}"
        if not t.is_contiguous():
            return (
                f"tensor {i} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; the "
                f"kernels read each tensor as one flat array"
            )
    return _triton_missing()


# ---------------------------------------------------------------------------------------------
# The step functions as torch.library custom ops
# ---------------------------------------------------------------------------------------------
# Each registry function is one opaque custom op, "mupopt::<name>_triton_", so that torch.compile
# (Dynamo) traces a training step up to the optimizer's call and puts the whole fused step in
# the graph as one op, instead of tracing into the host code (data_ptr tables, cache, launch),
# which it cannot. The op's schema states exactly what the step writes, so functionalisation
# copies back exactly that: params, the written state tensors and the step counts; gradients
# are read only, except in the "<name>_triton_unscale_" variant (a GradScaler scale), which
# stores the unscaled gradients back. State dicts, Multipliers and the hyperparameter record
# travel flattened (tensor lists per state key, float lists) and are rebuilt inside the op
# (stochastic rounding's per-tensor seeds as floats after the multipliers: exact below 2^53).
# kahan_summation's compensation: a group may mix float32 params, which have none, with bf16 /
# fp16 ones; the op takes one tensor list per entry, so a param without one has an empty
# placeholder in its slot, which the op drops (storage.compensates: a float32 param's store
# ignores it).
#
# name: (state keys written, state keys only read, params written, step counts incremented)
_OP_SPECS = {
    "adamw": (("exp_avg", "exp_avg_sq", "max_exp_avg_sq", COMPENSATION), (), True, True),
    "adopt": (("exp_avg", "exp_avg_sq", COMPENSATION), (), True, True),
    "lamb": (("exp_avg", "exp_avg_sq", COMPENSATION), (), True, True),
    "sophia": (("exp_avg", COMPENSATION), ("hessian",), True, True),
    # The Hessian EMA writes h only: params are read for their count, step counts untouched.
    "sophia_hessian": (("hessian",), (), False, False),
}


def op_name(name: str, unscale: bool) -> str:
    """The custom op's name in namespace "mupopt" (torch.ops.mupopt.<op_name>)."""
    return f"{name}_triton_unscale_" if unscale else f"{name}_triton_"


def _schema(name: str, unscale: bool) -> tuple[str, tuple[str, ...]]:
    """(schema string, names of the mutated arguments) of one op."""
    _, _, writes_params, counts_steps = _OP_SPECS[name]
    args, mutated = [], []
    for arg, writes in (
        ("params", writes_params), ("grads", unscale), ("states", True), ("read_states", False), ("steps", counts_steps),
    ):
        if writes:
            args.append(f"Tensor({chr(ord('a') + len(mutated))}!)[] {arg}")
            mutated.append(arg)
        else:
            args.append(f"Tensor[] {arg}")
    args += ["str[] keys", "str[] read_keys", "float[] mults", "float[] hparams"]
    if unscale:
        args.append("Tensor inv_grad_scale")
    return "(" + ", ".join(args) + ") -> ()", tuple(mutated)


def _kernel(name: str):
    """(functional step, hyperparameter record class) of ``name``: imports the kernels."""
    if name == "adamw":
        from ...optim.adamw import AdamWHparams
        from .adamw import adamw_triton

        return adamw_triton, AdamWHparams
    if name == "adopt":
        from ...optim.adopt import ADOPTHparams
        from .adopt import adopt_triton

        return adopt_triton, ADOPTHparams
    if name == "lamb":
        from ...optim.lamb import LAMBHparams
        from .lamb import lamb_triton

        return lamb_triton, LAMBHparams
    from ...optim.sophia import SophiaHparams
    from .sophia import sophia_hessian_triton, sophia_triton

    return (sophia_triton if name == "sophia" else sophia_hessian_triton), SophiaHparams


def _encode_hparams(hp) -> list[float]:
    """A frozen hyperparameter record as floats: bool -> 0/1, None -> nan (no field may be nan)."""
    return [float("nan") if v is None else float(v) for v in (getattr(hp, f.name) for f in dataclasses.fields(hp))]


def _decode_hparams(cls, values: Sequence[float]):
    out = []
    for f, v in zip(dataclasses.fields(cls), values):
        kind = f.type if isinstance(f.type, str) else str(getattr(f.type, "__name__", f.type))
        if kind == "bool":
            out.append(v != 0.0)
        elif "None" in kind and math.isnan(v):
            out.append(None)
        else:
            out.append(v)
    return cls(*out)


def _op_keys(names: Sequence[str], params, states) -> tuple[list[str], list[torch.Tensor]]:
    """The state entries one custom-op call passes: the keys among ``names`` that any state has,
    each followed by its block scales (``key + "_absmax"``) where any state keeps it in 8 bits,
    and the flat list, key-major, with an empty placeholder where a state lacks the entry: one
    param group mixes float32 and bf16 params (a compensation for the bf16 ones only) and
    tensors below ``MIN_8BIT_SIZE`` (32-bit states) with 8-bit ones. :func:`_entry_present`
    tells the op's implementation which entries are real."""
    from ...optim._lean_states import ABSMAX

    keys = []
    for k in names:
        if any(k in st for st in states):
            keys.append(k)
            if any(k + ABSMAX in st for st in states):
                keys.append(k + ABSMAX)
    flat = [st[k] if k in st else p.new_empty(0) for k in keys for p, st in zip(params, states)]
    return keys, flat


def _entry_present(key: str, param: torch.Tensor, entries: dict) -> bool:
    """Whether a state has ``key`` (the rule :func:`_op_keys` filled its placeholders by): a
    compensation for bfloat16 / float16 params, block scales for 8-bit (uint8) states, every
    other entry always."""
    from ...optim._lean_states import ABSMAX

    if key == COMPENSATION:
        return compensates(param)
    if key.endswith(ABSMAX):
        codes = entries.get(key[: -len(ABSMAX)])
        return codes is not None and codes.dtype == torch.uint8
    return True


def _make_impl(name: str):
    def impl(params, grads, states, read_states, steps, keys, read_keys, mults, hparams, inv_grad_scale=None):
        n = len(grads)
        dicts = [{} for _ in range(n)]
        for flat, names in ((states, keys), (read_states, read_keys)):
            for k, key in enumerate(names):  # a key's block scales come after the key (_op_keys)
                for i in range(n):
                    if _entry_present(key, params[i], dicts[i]):
                        dicts[i][key] = flat[k * n + i]
        for i, step in enumerate(steps):
            dicts[i]["step"] = step
        if len(mults) == 4 * n:  # stochastic rounding: the seeds follow the multipliers
            for i in range(n):
                dicts[i]["sr_seed"] = int(mults[3 * n + i])
        fn, hp_cls = _kernel(name)
        multipliers = [Multipliers(*mults[3 * i:3 * i + 3]) for i in range(n)]
        fn(params, grads, dicts, multipliers, _decode_hparams(hp_cls, hparams), inv_grad_scale)

    return impl


def _fake(*args, **kwargs) -> None:
    """Shape propagation for torch.compile: the ops return nothing (they mutate their inputs)."""
    return None


def _define_ops() -> None:
    """Define the custom ops once per process (a second import of this module reuses them)."""
    for name in OPTIMIZERS:
        for unscale in (False, True):
            qualname = op_name(name, unscale)
            if hasattr(torch.ops.mupopt, qualname):
                continue
            schema, mutated = _schema(name, unscale)
            op = torch.library.custom_op(f"mupopt::{qualname}", _make_impl(name), mutates_args=mutated, schema=schema)
            op.register_fake(_fake)


def _step_fn(name: str):
    """The registry function of ``name``: in eager mode the kernel function itself; while
    torch.compile traces, one custom-op call with flattened arguments.

    Eager calls skip the op: flattening, the dispatcher and rebuilding the dicts double the host
    cost of a step (measured with the kernels stubbed out, 1 CPU thread: 1000 tensors 5.2 ms
    direct, 10.9 ms through the op), and eager code gains nothing from the op."""
    written, read, _, counts_steps = _OP_SPECS[name]

    def step(params, grads, states, mults, hp, inv_grad_scale=None, **collectives) -> None:
        if not grads:
            return
        if not torch.compiler.is_compiling() or collectives:
            # collectives (LAMB's norm_reduce for sharded tensors) call back into Python between
            # kernels: eager only, never inside the custom op.
            _kernel(name)[0](params, grads, states, mults, hp, inv_grad_scale, **collectives)
            return
        # The keys some state has (AdamW's max_exp_avg_sq exists with amsgrad only), with
        # placeholders where a state lacks one (a float32 param's compensation, a small tensor's
        # block scales).
        keys, flat = _op_keys(written, params, states)
        read_keys, read_flat = _op_keys(read, params, states)
        steps = [st["step"] for st in states] if counts_steps else []
        mult = [float(x) for m in mults for x in m]
        if getattr(hp, "stochastic_rounding", False):
            mult += [float(seed) for seed in seeds_of(states) or [0] * len(states)]  # exact: < 2^32
        args = (list(params), list(grads), flat, read_flat, steps, keys, read_keys, mult, _encode_hparams(hp))
        if inv_grad_scale is None:
            getattr(torch.ops.mupopt, op_name(name, False))(*args)
        else:
            getattr(torch.ops.mupopt, op_name(name, True))(*args, inv_grad_scale)

    step.__name__ = f"_{name}_step"
    return step


def register() -> None:
    """Define the custom ops and register backend "triton" for every optimizer above, and for
    Muon and Shampoo (their modules register themselves; imported here, not at the top, because
    they need mupopt.optim). Idempotent; imports no triton."""
    from ... import backends
    from . import muon, shampoo

    muon.register()
    shampoo.register()
    _define_ops()
    for name in OPTIMIZERS:
        if "triton" in backends.names(name):
            continue
        backends.register(
            backends.Backend(
                name, "triton", _step_fn(name), priority=PRIORITY, unsupported_reason=unsupported_reason,
                amp_scaling=True, devices=("cuda",), validates=True, state_bits=STATE_BITS,
                # kahan_summation: the storage layer's codes 7 and 8 (_common); the Hessian EMA
                # stores no param.
                kahan_summation=True,
            )
        )
