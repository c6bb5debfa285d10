"""What every mupopt optimizer shares: muP records in the states, validation, the step loop.

A subclass declares its rule name (a key of :data:`mupopt.mup.LR_EXPONENTS` and of the backend
registry), validates its hyperparameters, creates its state lazily and turns a group into a frozen
hyperparameter record; the step itself is one call of the selected backend per param group.

Validation happens for every group before anything is touched, so a bad hyperparameter (also one
edited into ``group["lr"]`` after construction) or a sparse gradient raises with params and state
left exactly as they were.

Gradient scaling: every optimizer here sets ``_step_supports_amp_scaling``, so
``torch.amp.GradScaler.step(opt)`` neither unscales the gradients nor skips the step itself; it
sets, for the duration of ``opt.step()`` (torch/amp/grad_scaler.py, GradScaler.step):

- ``opt.found_inf``: a float32 tensor, nonzero when some gradient is inf or nan;
- ``opt.grad_scale``: the scale the gradients carry, or None when ``scaler.unscale_(opt)`` has
  already unscaled them (stage UNSCALED).

This class honours both for every optimizer and backend, as torch's fused AdamW does:

- found_inf nonzero: the whole update is skipped: no parameter, state or step count changes, no
  state is created, and ``p.grad`` is left as it is. Deciding that costs one host read of
  found_inf per step (``_run``), which waits for the GPU work queued before it (the backward):
  the synchronisation GradScaler's own unfused path pays in ``_maybe_opt_step``. The cuda and
  triton kernels keep step counts and bias corrections on the host, so a device-side skip would
  not save it there.
- capturable=True in every param group: found_inf is not read on the host; it is handed to the
  backends (``Backend.capturable``), which skip on the device: the C++ ops read it themselves,
  the reference puts back what it wrote where found_inf is set (``skip_on_found_inf``).
- grad_scale set: gradients are multiplied by ``1/grad_scale`` (formed in float64 and rounded to
  float32, as ``GradScaler.unscale_``) and the unscaled gradient is stored back into ``p.grad``,
  which is what torch's fused AdamW leaves there. A backend registered with ``amp_scaling``
  (triton) does it inside its kernels, in float32 registers; for the others ``_call`` unscales
  the gradients in place first (one ``_foreach_mul_`` per device), so their float32 math reads
  the gradient rounded to its storage dtype. With GradScaler's power-of-two scales both are
  exact and identical; with another scale and bfloat16 gradients they may differ by one
  rounding.

``SophiaG.update_hessian`` runs through the same ``_run`` and honours both attributes when they
are set, but GradScaler sets them only around ``step()``: a scaled GNB backward needs them set by
hand (both as tensors, as GradScaler sets them; tests/test_amp.py), or an unscaled backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import math
import numbers
import operator
import os
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import torch
from torch.optim import Optimizer

from .. import backends, storage
from . import _lean_states as lean
from ..mup import (RECORD_KEY, BaseShapes, DepthInfo, MupError, Multipliers, WidthInfo, canonical_name, copy_record,
                   decay_rule, depth_info, format_table, load_base_shapes, multipliers, name_in_models, old_record,
                   read_depth, read_record, recover_width_infos, width_info, width_info_by_name, width_record, WD_MODES)
from ._placement import (ELEMENTWISE, agree_seeds, check_placements, dense, dist, elementwise_view, is_dtensor, local,
                         local_grad, local_state, needs_view, same_layout, viewed_like)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def is_number(x: Any) -> bool:
    """A finite real number (numpy scalars count; so does a 1-element tensor, as torch accepts a
    tensor lr)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.is_complex():
            return False
        x = x.item()
    # -inf < x < inf rather than math.isfinite: the same for numbers (NaN compares False), and
    # torch.compile traces comparisons of the symbolic floats it may make of hyperparameters.
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and -math.inf < x < math.inf


def check_lr(lr) -> None:
    # torch.optim's message for a tensor lr of several elements, before the range check.
    check(not isinstance(lr, torch.Tensor) or lr.numel() == 1, "Tensor lr must be 1-element")
    check(is_number(lr) and float(lr) >= 0.0, f"Invalid learning rate: {lr}")


def check_betas(betas, count: int = 2, *, types: bool = True) -> None:
    """Each beta in [0, 1), then (``types``) :func:`check_beta_types`."""
    check(isinstance(betas, (tuple, list)) and len(betas) == count, f"Invalid betas: {betas} (expected {count} values)")
    for i, b in enumerate(betas):
        check(not isinstance(b, torch.Tensor) or b.numel() == 1, f"Tensor betas[{i}] must be 1-element")
        check(is_number(b) and 0.0 <= float(b) < 1.0, f"Invalid beta parameter at index {i}: {b}")
    if types:
        check_beta_types(betas)


def check_beta_types(betas) -> None:
    # As torch.optim.Adam: a tensor beta next to a plain number is refused (a sign of a
    # half-converted config). Plain numbers of any real type stay accepted.
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    check(all(tensors) or not any(tensors), "betas must be either both floats or both Tensors")


def check_adam_hparams(group: dict) -> None:
    """torch.optim.Adam(W)'s constructor checks in its order, with its messages (torch-adopt's
    ADOPT makes the same): a tensor lr, lr, eps, both betas, weight_decay, the betas' types,
    tensor betas. As torch, a tensor lr or beta with foreach=True and capturable=False is
    refused (torch's foreach kernels cannot take one; mupopt's backends could, but code that
    runs here then runs on torch too)."""
    lr, betas = group["lr"], group["betas"]
    foreach_only = bool(group.get("foreach")) and not group.get("capturable", False)
    if isinstance(lr, torch.Tensor):
        check(not foreach_only, "lr as a Tensor is not supported for capturable=False and foreach=True")
    check_lr(lr)
    check_eps(group["eps"])
    check_betas(betas, types=False)
    check_weight_decay(group["weight_decay"])
    check_beta_types(betas)
    for i, b in enumerate(betas):
        if isinstance(b, torch.Tensor):
            check(not foreach_only, f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")


def check_implementation_flags(name: str, foreach, fused, differentiable) -> None:
    """torch.optim's implementation switches, checked after the params as torch checks them:
    foreach and fused choose among torch's kernels and are ignored here (``backend=`` chooses),
    but the combinations torch refuses are refused with its errors; differentiable is not
    provided."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    check(not differentiable, f"mupopt.{name} does not support differentiable=True")


def check_eps(eps) -> None:
    check(is_number(eps) and float(eps) >= 0.0, f"Invalid epsilon value: {eps}")


def check_weight_decay(wd) -> None:
    check(is_number(wd) and float(wd) >= 0.0, f"Invalid weight_decay value: {wd}")


def fp32(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is float32 (so in-place math updates it), else a float32 copy."""
    return t if t.dtype == torch.float32 else t.float()


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the reference backends compute a tensor's update in: float64 for float64
    params (as torch.optim, which computes in the param's dtype), float32 for every other
    storage dtype (float32, bfloat16, float16)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t itself when it has ``dtype`` (so in-place math updates it), else a copy in ``dtype``
    (``fp32`` for any compute dtype; :func:`store` writes the result back)."""
    return t if t.dtype == dtype else t.to(dtype)


def store(t: torch.Tensor, t32: torch.Tensor) -> None:
    """Write the computed result back to the storage dtype (no-op when t is t32)."""
    if t is not t32:
        t.copy_(t32)


def unscale_(grads: list, inv_grad_scale: torch.Tensor) -> None:
    """grads *= inv_grad_scale in place (float32 math, stored in each gradient's dtype), one
    foreach call per device."""
    by_device: dict[torch.device, list] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, gs in by_device.items():
        torch._foreach_mul_(gs, inv_grad_scale.to(device))


class _Counted:
    """The mutating methods of a dict, each bumping ``_State.version`` (mixed into :class:`_State`
    and :class:`_StateMap`, whose docstrings say why)."""

    __slots__ = ()

    def __setitem__(self, key, value):
        if dict.get(self, key, _ABSENT) is not value:
            _State.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _State.version += 1
        super().__delitem__(key)

    def clear(self):
        _State.version += 1
        super().clear()

    def pop(self, *args):
        _State.version += 1
        return super().pop(*args)

    def popitem(self):
        _State.version += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        if key not in self:
            _State.version += 1
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        _State.version += 1
        super().update(*args, **kwargs)

    def __ior__(self, other):
        _State.version += 1
        return super().__ior__(other)


class _State(_Counted, dict):
    """One parameter's state dict in ``opt.state``: a plain dict that counts its changes.

    A step plan keeps what it derived from the states (the dicts each backend call gets, a C++
    bound step holding their tensors), so it must learn of any change a user makes between steps:
    ``opt.state[p] = {}`` or ``del opt.state[p]`` (a reset after a loss spike), ``.clear()``, a
    tensor replaced (``opt.state[p]["exp_avg"] = torch.zeros_like(p)``). Re-reading every state
    at every step costs more than the whole step of the fast backends on many small tensors
    (about 180 us for 1000 tensors of 3 entries, measured: dict lookups through
    ``Tensor.__hash__`` and an identity compare of every value), so every mutating method of
    this dict and of :class:`_StateMap` (:class:`_Counted`) bumps one counter, ``_State.version``, and a plan whose states were
    all seen at the current version is current at the cost of one integer compare. Assigning a
    value that is already there (``st["step"] += 1`` on a step tensor) is not a change.

    A plain dict a user puts into ``opt.state`` stays what it is (same object, as torch): the
    plans that hold one compare its entries at every step (``GroupPlan.plain_states``)."""

    __slots__ = ()
    version: ClassVar[int] = 0


class _StateMap(_Counted, defaultdict):
    """``opt.state`` of a mupopt optimizer: torch's ``defaultdict(dict)`` whose entries are
    :class:`_State` and whose own changes (an entry set, replaced or deleted) bump the same
    counter. ``state_dict()`` hands out plain dicts (MupOptimizer.state_dict)."""

    __slots__ = ()


_ABSENT = object()


def _tracked(state) -> _StateMap:
    """``state`` (torch's defaultdict of plain dicts, from __init__, load_state_dict or an
    unpickled optimizer) as a :class:`_StateMap` of :class:`_State` entries; values that are not
    plain dicts (a load_state_dict post-hook's flags) are kept as they are."""
    if type(state) is _StateMap and all(type(v) is not dict for v in state.values()):
        return state
    out = _StateMap(_State)
    for k, v in state.items():
        dict.__setitem__(out, k, _State(v) if type(v) is dict else v)
    _State.version += 1
    return out


def _state_snapshot(state, params: list) -> tuple:
    """What a plan derived from the states of ``params``: each state dict, its keys and its
    values, compared by identity (:func:`_same`). Absent entries are None (``state.get``: no
    entry is created, as a step skipped by GradScaler creates none)."""
    dicts = list(map(state.get, params))
    return dicts, [list(st) if st is not None else None for st in dicts], [v for st in dicts if st for v in st.values()]


def _same(a: tuple, b: tuple) -> bool:
    """Two snapshots hold the same objects (identity: a state tensor replaced by an equal one is
    a change; ``==`` on tensors would compare values)."""
    return (a[1] == b[1] and len(a[2]) == len(b[2]) and all(map(operator.is_, a[0], b[0]))
            and all(map(operator.is_, a[2], b[2])))


def _same_entries(st: dict, keys: list, values: list) -> bool:
    """A plain (untracked) state dict still holds these keys and these value objects."""
    return list(st) == keys and all(map(operator.is_, st.values(), values))


class Segment:
    """One backend call of a param group's step: a registry name (kernel), the backend chosen for
    it and the tensors it steps, as the backend sees them (local shards of DTensors)."""

    __slots__ = ("kernel", "backend", "positions", "grad_index", "grad_layout", "params", "originals", "viewed",
                 "staged", "own_grads", "states", "mults", "collectives", "bound")

    def __init__(self, kernel: str, backend: backends.Backend, positions: list[int], params: list, mults: list):
        self.kernel = kernel
        self.backend = backend
        self.positions = positions  # indices into the plan's stepped params
        self.grad_index: list[int] = []  # indices into group["params"] (and so into the gradients)
        self.grad_layout: list = []  # (dtype, contiguous) of each gradient the backend was chosen for
        self.params = params  # local tensors (elementwise kernels: complex as real, dense as flat)
        self.originals = params  # the local tensors themselves (a staged one: its buffer)
        self.viewed: list[bool] | None = None  # per position: params[k] is a view of originals[k]
        self.staged: list = []  # (local param, contiguous buffer) of params that are not dense
        self.own_grads = False  # the backend may read each param's .grad itself (plain, not viewed)
        self.states: list | None = None  # local state dicts, once state exists
        self.mults = mults
        self.collectives: dict = {}  # keyword arguments of the backend call (norm_reduce, orthogonalize)
        self.bound = None  # the backend's bound step (Backend.bind), made once per plan


class GroupPlan:
    """What one param group's step needs that does not change between steps: which params have
    gradients, their local tensors (a DTensor's shard), their muP multipliers (of the global
    shape), the backend of every tensor and the collectives sharded tensors need.

    Built by :meth:`MupOptimizer._plan` and reused while its key holds. The key covers: the group
    dict and its params list (add_param_group, load_state_dict and in-place edits of the list:
    its length, and each param by identity, ``group["params"][i] = new``), the
    optimizer's state mapping (load_state_dict or a user replaces it, with the muP records in
    it), a group list of records put in by a framework (refused), the group options that enter
    multipliers or routing (``_plan_options``), the requested backend and ``MUPOPT_BACKEND``,
    which params have a gradient, and the storage of every param (``data_ptr`` of the local
    tensor: ``p.data = ...``, ``model.to(...)``). A change of hyperparameters (lr, betas, ...) is
    read at every step and needs no new plan. Any change of the state between steps (an entry
    created, set, cleared or deleted, a state tensor or record replaced) is found by comparing
    the states with what the plan took from them (``state_snapshot``; one integer compare while
    they are all :class:`_State`: ``state_version``) and gives a new plan, so the step uses the
    state as it is now, as torch.optim, which reads the state at every step.
    """

    __slots__ = ("key", "refs", "members", "params", "locals", "ptrs", "stepped", "segments", "distributed",
                 "state_snapshot", "state_version", "plain_states")

    def __init__(self, key, refs, params, locals_, stepped, segments, distributed):
        self.key = key
        self.refs = refs  # the objects whose ids are in the key, held so that no id is reused
        # group["params"] as it was: the key has the list's id and length, not what is in it
        self.members = tuple(refs[1])
        self.params = params  # group params with a gradient (as the user holds them)
        self.locals = locals_  # their local tensors
        self.ptrs = tuple(map(_DATA_PTR, locals_))
        self.stepped = stepped  # their positions in group["params"]
        self.segments = segments
        self.distributed = distributed
        # The states the segments were given (_create_state): their snapshot, _State.version
        # then (None where opt.state is not a _StateMap: compared at every step) and the plain
        # dicts among them with their keys and values (compared at every step).
        self.state_snapshot: tuple | None = None
        self.state_version: int | None = None
        self.plain_states: list = []


_DATA_PTR = torch.Tensor.data_ptr
# Device types whose autocast a step turns off (MupOptimizer._run).
_AUTOCAST_DEVICES = ("cpu", "cuda")


class _KeepDtype:
    """A state entry on its way through ``Optimizer.load_state_dict``: torch's per-value cast
    passes objects that are neither tensors, dicts nor iterables through untouched, so the entry
    keeps its dtype; :meth:`MupOptimizer.__setstate__` (which torch's load_state_dict calls before
    its post-hooks) unwraps it and casts it to the dtype the optimizer keeps it in."""

    __slots__ = ("value", "dtype")

    def __init__(self, value, dtype: torch.dtype):
        self.value, self.dtype = value, dtype

    def restore(self, device: torch.device):
        def cast(v):
            if isinstance(v, torch.Tensor):
                return v.to(device=device, dtype=self.dtype if v.is_floating_point() else v.dtype)
            if isinstance(v, dict):
                return {k: cast(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return type(v)(cast(x) for x in v)
            return v

        return cast(self.value)


class _NamedWidths:
    """An optimizer's ``base_shapes=`` and ``overrides=``: the width information of each named
    parameter from recorded base shapes (:func:`mupopt.mup.width_info_by_name`)."""

    def __init__(self, base_shapes, overrides):
        if isinstance(base_shapes, (str, os.PathLike)):
            base_shapes = load_base_shapes(base_shapes)
        if not isinstance(base_shapes, BaseShapes):
            raise MupError(
                f"base_shapes= takes recorded base shapes (mupopt.make_base_shapes(base, delta, path), or that "
                f"path), got {type(base_shapes).__name__}; a base model goes to mupopt.set_base_shapes(model, base)"
            )
        if overrides is not None and not isinstance(overrides, Mapping):
            raise MupError(f"overrides= takes {{name pattern: role or WidthInfo}}, got {type(overrides).__name__}")
        self.record = BaseShapes({canonical_name(n): dims for n, dims in base_shapes.items()})
        self.overrides = dict(overrides or {})
        self.used: set[str] = set()

    def info(self, p: torch.Tensor, name: str | None, carried: WidthInfo | None) -> WidthInfo:
        """p's width info by its name; ``carried``: what p carries (set_base_shapes), which must agree."""
        if name is None:
            raise MupError(
                f"base_shapes= finds each parameter's width information by its name, and a parameter of shape "
                f"{tuple(p.shape)} came without one: pass model.named_parameters() (or param groups built from "
                f"(name, parameter) pairs), as torch.optim accepts them"
            )
        info = width_info_by_name(name, tuple(p.shape), self.record, self.overrides, self.used)
        if carried is not None and carried != info:
            raise MupError(
                f"parameter {name!r} carries width information from mupopt.set_base_shapes ({carried.role}, m_in "
                f"{carried.m_in:g}, m_out {carried.m_out:g}) that differs from what base_shapes= gives it ({info.role}, "
                f"m_in {info.m_in:g}, m_out {info.m_out:g}): give it one source"
            )
        return info

    def check_all_used(self) -> None:
        unused = set(self.overrides) - self.used
        if unused:
            raise MupError(f"overrides {sorted(unused)} match no parameter given to the optimizer")


def new_step(p: torch.Tensor, group: dict) -> torch.Tensor:
    """A new state's step count: a float32 scalar on the CPU (the host reads it for the bias
    corrections), or on the param's device with ``capturable=True`` (as torch.optim)."""
    device = p.device if group.get("capturable", False) else "cpu"
    return torch.zeros((), dtype=torch.float32, device=device)


def step_count(state: dict, capturable: bool):
    """The step count the bias corrections are formed from: a Python float (a host read; the
    reference's float64 expressions), or with ``capturable`` the step tensor itself, so that
    the corrections are tensors on its device and nothing waits for the device."""
    return state["step"] if capturable else state["step"].item()


def skip_on_found_inf(fn: Callable) -> Callable:
    """A reference step that takes GradScaler's ``found_inf`` (capturable groups: no host read):
    the step runs, then every param and state tensor it may have written is put back where
    found_inf is nonzero (a device-side select; the reference's way, not a fast one)."""

    @functools.wraps(fn)
    def step(params, grads, states, mults, hp, *, found_inf=None, **kwargs):
        if found_inf is None:
            return fn(params, grads, states, mults, hp, **kwargs)
        saved = [(t, t.clone()) for t in params]
        saved += [(v, v.clone()) for st in states for v in st.values() if isinstance(v, torch.Tensor)]
        fn(params, grads, states, mults, hp, **kwargs)
        skip = found_inf.reshape(()).to(torch.bool)
        for t, before in saved:
            t.copy_(torch.where(skip.to(t.device), before, t))

    return step


def _step_tensor(step, device="cpu") -> torch.Tensor:
    """A state's step count as the float32 CPU tensor every backend reads (the cpu and cuda ops
    require exactly that; _init_state creates it so). torch.optim converts a plain number in its
    optimizers' __setstate__; an int64 or float64 tensor (hand-edited states), or a float32 one
    that torch's load_state_dict moved to the param's device because the saved group had
    fused=True or capturable=True, is converted here too. Shape is kept (0-dim in practice)."""
    if isinstance(step, torch.Tensor):
        if step.dtype == torch.float32 and step.device == torch.device(device):
            return step
        return step.detach().to(device=device, dtype=torch.float32)
    return torch.tensor(float(step), dtype=torch.float32, device=device)


class MupOptimizer(Optimizer):
    """Base of the mupopt optimizers (not used directly)."""

    rule: ClassVar[str]
    # The backend tables a step may call (mupopt.backends): the rule's, and Muon's AdamW part's.
    kernels: ClassVar[tuple[str, ...]] = ()
    # torch.amp.GradScaler: hand grad_scale / found_inf to step() (module docstring).
    _step_supports_amp_scaling = True
    # State keys kept in a fixed dtype whatever the param's dtype: torch's load_state_dict casts
    # every floating state tensor (except "step") to its param's dtype, which would turn
    # Shampoo's float32 statistics of a bf16 param into bf16. See load_state_dict.
    _state_dtypes: ClassVar[dict[str, torch.dtype]] = {}
    # Attributes pickled (copy.deepcopy, pickle, torch.save(opt)) besides torch's defaults,
    # state and param_groups: every attribute a mupopt __init__ sets (tests/test_dropin.py
    # checks that a new one is listed here). Everything else set on an optimizer is left out,
    # as torch leaves it out: hook registries, an LR scheduler's instance-level ``step``
    # wrapper (a closure over the original optimizer) and its ``_opt_called``, GradScaler's
    # per-step found_inf / grad_scale, and private caches named "_plan..." (derived from the
    # param groups; rebuilt when next needed).
    _PICKLED: ClassVar[tuple[str, ...]] = ("backend", "_widths", "_named_widths")
    # The elementwise state entries that ``state_bits`` stores in 16 or 8 bits, each with its sign
    # (mupopt.optim._lean_states: SIGNED for momenta, UNSIGNED for second moments). Empty: the
    # optimizer takes no state_bits.
    _lean_keys: ClassVar[dict[str, str]] = {}
    # Why this optimizer has no scale_eps (empty: it has one). A group setting it True is then
    # refused: its multipliers never read it, so it would do nothing, silently.
    _no_scale_eps: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "rule" in cls.__dict__:  # an optimizer of its own (not a user's subclass of one)
            _OPTIMIZER_CLASSES.append(cls)

    def __init__(self, params, defaults: dict, *, backend: str = "auto", base_shapes=None, overrides=None):
        backends.check_name(self.rule, backend)
        self.backend = backend
        # base_shapes= (class docstrings): width information of named parameters by name, for
        # frameworks that build the optimizer from named parameters and give it no model.
        self._named_widths = _NamedWidths(base_shapes, overrides) if base_shapes is not None else None
        if base_shapes is None and overrides is not None:
            raise MupError("overrides= declares roles for base_shapes=: pass base_shapes= too (or use "
                           "mupopt.set_base_shapes(model, ..., overrides=...))")
        # Each parameter's width record as add_param_group took it, and its name (or None):
        # {param: (record, name)}. The record in a parameter's state wins over this one (_width_of).
        self._widths: dict[torch.Tensor, tuple[dict, str | None]] = {}
        defaults.setdefault("wd_mode", "independent")
        defaults.setdefault("scale_eps", False)
        defaults.setdefault("stochastic_rounding", False)
        defaults.setdefault("kahan_summation", False)
        self._check_group(defaults)
        super().__init__(params, defaults)
        self.state = _tracked(self.state)
        if self._named_widths is not None:
            self._named_widths.check_all_used()
        if backend != "auto" and any(g.get("state_bits", 32) == 8 for g in self.param_groups):
            chosen = backends.get(self.rule, backend)
            if 8 not in chosen.state_bits:
                raise ValueError(
                    f"{type(self).__name__}: backend {backend!r} does not implement 8-bit optimizer states "
                    f"(state_bits=8) yet; backends that do: "
                    + ", ".join(n for n in backends.names(self.rule) if 8 in backends.get(self.rule, n).state_bits)
                    + ' (or backend="auto", which steps 8-bit states there and the rest on the fastest backend)')

    # -- subclass hooks -------------------------------------------------------------------------
    def _check_hparams(self, group: dict) -> None:
        """Raise ValueError with torch's message for a bad hyperparameter."""
        raise NotImplementedError

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        raise NotImplementedError

    def _hparams(self, group: dict):
        raise NotImplementedError

    def _rule_options(self, group: dict) -> dict:
        return {"wd_mode": group["wd_mode"], "scale_eps": group["scale_eps"]}

    # -- param groups and muP records ---------------------------------------------------------
    def _check_group(self, group: dict) -> None:
        self._check_hparams(group)
        check(group["wd_mode"] in WD_MODES, f"Invalid wd_mode: {group['wd_mode']!r} (expected one of {WD_MODES})")
        check(isinstance(group["scale_eps"], bool), f"Invalid scale_eps: {group['scale_eps']!r}")
        check(not (self._no_scale_eps and group["scale_eps"]), f"{type(self).__name__} has no scale_eps: {self._no_scale_eps}")
        check(isinstance(group.get("maximize", False), bool), f"maximize must be a bool, got {group.get('maximize')!r}")
        lean.check_state_bits(group.get("state_bits", 32))
        check(isinstance(group.get("stochastic_rounding", False), bool),
              f"Invalid stochastic_rounding: {group.get('stochastic_rounding')!r} (expected a bool)")
        check(isinstance(group.get("kahan_summation", False), bool),
              f"Invalid kahan_summation: {group.get('kahan_summation')!r} (expected a bool)")
        check(not (group.get("stochastic_rounding", False) and group.get("kahan_summation", False)),
              "stochastic_rounding=True and kahan_summation=True are two ways to store bfloat16 / float16 params "
              "(unbiased random rounding, or round to nearest with the error kept in a compensation buffer): choose one")

    def add_param_group(self, param_group: dict) -> None:
        self.__dict__.pop("_plan_cache", None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            self._load_backends(group["params"])
            for p in group["params"]:
                if p.is_complex() and self.rule not in ELEMENTWISE:
                    raise ValueError(f"{type(self).__name__} does not support complex parameters (shape {tuple(p.shape)})")
            # FSDP2 / tensor parallelism replace Parameter objects after set_base_shapes: get
            # their width info back by module and name (mupopt.mup.recover_width_infos).
            recover_width_infos(group["params"])
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                info = width_info(p)
                if self._named_widths is not None:
                    info = self._named_widths.info(p, names[i] if names else None, info)
                name = info.name if info is not None and info.name else (names[i] if names else None)
                self._widths[p] = (width_record(info, p.shape, name, depth_info(p)), name)
            self._check_width_consistency()
        except Exception:
            for p in self.param_groups.pop()["params"]:
                self._widths.pop(p, None)
            raise

    def _load_backends(self, params: list) -> None:
        """Build or load now the compiled library of each backend a step of ``params`` may choose
        (those made for their device types). The first use builds it, under a lock, which a step
        traced by ``torch.compile(opt.step, fullgraph=True)`` cannot do: such a first step failed
        ("Unsupported context manager") unless something had loaded the library before."""
        device_types = {local(p).device.type for p in params}
        for kernel in self.kernels or (self.rule,):
            names = backends.names(kernel)
            for name in names if self.backend == "auto" else [n for n in names if n == self.backend]:
                backend = backends.get(kernel, name)
                if backend.devices is not None and device_types & set(backend.devices):
                    backend.unsupported_reason([])

    # A parameter's width record (mupopt.mup.width_record) lives in its optimizer state, which
    # every checkpoint layout keys by the parameter, so no framework can attach it to another
    # one (docs/mup.md, "Width records in checkpoints"). Before a parameter's state exists, the
    # record add_param_group took (or load_state_dict loaded) stands in (self._widths).
    def _width_of(self, p: torch.Tensor) -> WidthInfo | None:
        """p's width info: the record in its state, else the one add_param_group took; a record
        that does not fit p (global shape, name) raises MupError naming p."""
        record, name = self._own(p)
        st = self.state.get(p)
        if st and st.get(RECORD_KEY):
            record = st[RECORD_KEY]
        # Read once per record object (Muon's routing asks at every step): a record changes by
        # load_state_dict (which drops this cache with the plans) or a new state, not in place.
        cache = self.__dict__.setdefault("_plan_widths", {})
        hit = cache.get(p)
        if hit is not None and hit[0] is record:
            return hit[1]
        info = read_record(record, tuple(p.shape), name, lambda: self._label(p))
        cache[p] = (record, info)
        return info

    def _depth_of(self, p: torch.Tensor) -> DepthInfo | None:
        """p's depth info (mupopt.set_base_depth), from the same record as :meth:`_width_of`;
        None for a record without depth fields (depth factor 1)."""
        record = self._own(p)[0]
        st = self.state.get(p)
        if st and st.get(RECORD_KEY):
            record = st[RECORD_KEY]
        cache = self.__dict__.setdefault("_plan_depths", {})  # as _width_of's: once per record object
        hit = cache.get(p)
        if hit is not None and hit[0] is record:
            return hit[1]
        depth = read_depth(record, lambda: self._label(p))
        cache[p] = (record, depth)
        return depth

    def depth_infos(self, group: dict) -> list[DepthInfo | None]:
        """The depth info of each parameter of ``group`` (None: no depth rule for it)."""
        return [self._depth_of(p) for p in group["params"]]

    def _own(self, p: torch.Tensor) -> tuple[dict, str | None]:
        """(record, name) add_param_group took for p; for a param put into group["params"] by
        hand, what add_param_group would have taken."""
        own = self._widths.get(p)
        if own is None:
            # As add_param_group: a Parameter that replaced another in its module after
            # set_base_shapes (a layer re-initialised, then swapped into the group) gets the
            # width info recorded under its module and name back (a new shape raises, naming it).
            recover_width_infos([p])
            info = width_info(p)
            name = info.name if info is not None and info.name else None
            own = self._widths[p] = (width_record(info, p.shape, name, depth_info(p)), name)
        return own

    def _label(self, p: torch.Tensor) -> str:
        """p as messages name it: its name (param_names, set_base_shapes), else its shape."""
        name = self._own(p)[1] or name_in_models(p)
        if name:
            return repr(name)
        where = next((f"{i} of param group {g}" for g, group in enumerate(self.param_groups)
                      for i, q in enumerate(group["params"]) if q is p), None)
        return f"{where} (shape {tuple(p.shape)})" if where else f"of shape {tuple(p.shape)}"

    def _check_width_consistency(self, infos: dict | None = None) -> None:
        """All params carry width info, or none: a mix means muP was set up on part of a model.
        ``infos``: {param: WidthInfo or None} to check instead of the current records."""
        params = [p for g in self.param_groups for p in g["params"]]
        have = [(infos[p] if infos is not None else self._width_of(p)) is not None for p in params]
        if any(have) and not all(have):
            raise MupError(
                f"parameter {self._label(params[have.index(False)])} has no muP width information while others "
                f"have: call mupopt.set_base_shapes on the whole model (or clear_base_shapes to train without muP)"
            )

    def _refuse_width_changed_since_construction(self, group: dict) -> None:
        """The optimizer takes each parameter's width and depth information when it is given the
        parameter; a parameter whose information differs at its first step was set up after the
        optimizer was made (set_base_shapes, set_base_depth or readout_multiplier_ called after
        it: with set_base_shapes, every multiplier stayed 1 without a word). A parameter with
        a state keeps the record of its state, which a checkpoint may have brought on purpose
        (docs/mup.md, "Width records in checkpoints")."""
        for p in group["params"]:
            if self.state.get(p):
                continue
            now = (width_info(p), depth_info(p))
            taken = (self._width_of(p), self._depth_of(p))
            for what, have, had in zip(("width", "depth"), now, taken):
                if have is not None and have != had:
                    raise MupError(
                        f"parameter {self._label(p)} has {what} information ({have}) that differs from what the "
                        f"optimizer took when it was created ({had}): mupopt.set_base_shapes, set_base_depth "
                        f"and readout_multiplier_ must come before the optimizer is created; create it again"
                    )

    def width_infos(self, group: dict) -> list[WidthInfo | None]:
        """The width info of each parameter of ``group`` (None: no muP for it)."""
        if "mup" in group:
            raise MupError(
                "a param group carries a list of muP records ('mup'), the form mupopt saved before it kept each "
                "record in its parameter's state, put there without mupopt's load_state_dict (which converts it): "
                "torch.distributed.optim.ZeroRedundancyOptimizer copies one rank's list to every rank, so its "
                "records cannot be matched to parameters. Delete the key from the checkpoint's param_groups and set "
                "width information up with mupopt.set_base_shapes (or a .bsh file) before resuming."
            )
        return [self._width_of(p) for p in group["params"]]

    def group_multipliers(self, group: dict) -> list[Multipliers]:
        options = self._rule_options(group)
        return [multipliers(self.rule, info, depth=depth, **options)
                for info, depth in zip(self.width_infos(group), self.depth_infos(group))]

    def mup_summary(self) -> str:
        """One row per parameter: name, shape, role, m_in, m_out, lr multiplier, depth, weight decay."""
        rows = []
        for gi, group in enumerate(self.param_groups):
            infos = self.width_infos(group)
            # Plain parameters (no param_names): the names set_base_shapes saw, else positions.
            names = group.get("param_names") or [
                info.name if info is not None and info.name else f"group{gi}.param{i}" for i, info in enumerate(infos)
            ]
            for name, p, info, m, depth in zip(names, group["params"], infos, self.group_multipliers(group),
                                               self.depth_infos(group)):
                rows.append((name, tuple(p.shape), info, m, decay_rule(self.rule, m), depth))
        used = self.selected_backends
        ran = "; ".join(f"group {gi}: " + ", ".join(f"{k} on {v}" for k, v in u.items()) for gi, u in enumerate(used) if u)
        return format_table(rows) + "\nbackends at the last step: " + (ran or f"none yet (requested: {self.backend!r})")

    def state_memory(self) -> int:
        """Bytes of optimizer state this process holds: every tensor in every parameter's state
        (a DTensor's local shard; the step counts and 8-bit scales included). A parameter whose
        state does not exist yet (before its first step) counts what its first step will
        allocate, computed without allocating it (shapes and dtypes only, on fake tensors)."""
        total = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    st = _planned_state(self, p, group)
                total += lean.nbytes(st)
        return total

    # -- copy and pickle ------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """torch.optim.Optimizer pickles only defaults, state and param_groups; a mupopt optimizer
        also needs what its __init__ sets: the attributes named in _PICKLED (class comment)."""
        state = dict(super().__getstate__())
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling, and the end of ``load_state_dict`` (torch calls it with the new state
        and param_groups): drop every "_plan" cache (the groups it was derived from may have
        changed), recreate torch's hook registries, convert step counts to float32 CPU tensors
        (:func:`_step_tensor`) and restore the entries load_state_dict kept in their dtype."""
        for k in [k for k in self.__dict__ if k.startswith("_plan")]:
            del self.__dict__[k]
        super().__setstate__(state)
        self.state = _tracked(self.state)
        # An optimizer pickled by a mupopt without __getstate__ (torch's: no backend) loads with
        # the default backend; one pickled before the records moved into the states has them
        # in group["mup"] lists.
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("_named_widths", None)
        if "_widths" not in self.__dict__:
            self._widths = {}
            for group in self.param_groups:
                names = group.get("param_names") or [None] * len(group["params"])
                records = group.pop("mup", [None] * len(group["params"]))
                for p, record, name in zip(group["params"], records, names):
                    self._widths[p] = (old_record(record, p.shape), name or (record or {}).get("name"))
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                for key, value in st.items():
                    if isinstance(value, _KeepDtype):
                        st[key] = value.restore(p.device)
                if "step" in st:  # capturable groups keep it on the param's device (new_step)
                    st["step"] = _step_tensor(st["step"], p.device if group.get("capturable", False) else "cpu")

    # -- state_dict ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """:meth:`_state_dict` between torch's state_dict hooks: the pre-hooks
        (``register_state_dict_pre_hook``) run first, on the optimizer as it is, and the
        post-hooks last, on the dict returned, as torch runs them. From inside torch's
        state_dict, which :meth:`_state_dict` calls, the post-hooks would see a dict that is
        changed after them (8-bit codes under the entry's name, ``_State`` objects, no initial
        states of unstepped params, Shampoo's blocks as lists), and a change of theirs could be
        undone."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        hooks = self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            sd = self._state_dict()
        finally:
            self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = hooks
        for post_hook in hooks[1].values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _state_dict(self) -> dict:
        """torch's state_dict, every parameter's width record in its state entry (key "mup",
        mupopt.mup.width_record), each state a plain dict (``opt.state`` holds :class:`_State`
        entries, which ``torch.load(weights_only=True)`` would refuse). A parameter with muP
        width information and no state yet (not stepped) is saved with its initial state, what
        its first step would create (zeros, step 0): a record needs a state entry, and a state
        holding only a record would not load into torch.optim (it takes any non-empty state as
        created). So such a state_dict costs the memory of those parameters' states, as torch's
        distributed checkpointing (which steps once with lr 0 to create every state) does."""
        for group in self.param_groups:  # states created elsewhere (ZeRO, torch.optim) lack it
            for p in group["params"]:
                st = self.state.get(p)
                if st and not st.get(RECORD_KEY):
                    st[RECORD_KEY] = copy_record(self._own(p)[0])
        sd = super().state_dict()
        state = {k: dict(v) if type(v) is _State else v for k, v in sd["state"].items()}
        index = 0  # torch numbers the params in group order
        for group in self.param_groups:
            for p in group["params"]:
                record = self._own(p)[0]
                if not self.state.get(p) and record["role"] != 0:
                    state[index] = {**self._init_state(p, group), RECORD_KEY: copy_record(record)}
                if self._lean_keys and is_dtensor(p) and isinstance(state.get(index), dict):
                    # 8-bit entries of a sharded param as float32 values placed like it: its blocks
                    # are cut per local shard, the values are not (mupopt.optim._lean_states).
                    state[index] = lean.export_state(state[index], p, self._lean_keys)
                elif self._lean_keys and isinstance(state.get(index), dict):
                    # codes under their own key, so that a format mismatch is a missing key for
                    # DCP, not codes cast to values (mupopt.optim._lean_states)
                    state[index] = lean.export_codes(state[index], self._lean_keys)
                index += 1
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this class or of its torch counterpart.

        Group keys the saved dict lacks keep this optimizer's current values. Width records: the
        record saved in a parameter's state wins, so a resume needs no base model; it must fit the
        parameter it lands on (global shape, and name where both are known), else MupError names
        the parameter. A state without one (torch.optim's) keeps this optimizer's record. A
        state_dict of mupopt's first format (records as ``group["mup"]`` lists) is converted.
        A different number of param groups, or of params in a group, raises ValueError naming
        both counts. Step counts of any type (int, float, int64 or float64 tensor) load as
        float32 tensors. Entries of ``_state_dtypes`` (Shampoo's L, R and roots) are not cast
        to the param's dtype, as torch would cast them, but to their own dtype (float32): a
        bf16 model resumes with its statistics intact. (torch's per-value cast is
        ``Optimizer._process_value_according_to_param_policy``, called through the class
        Optimizer, so a subclass cannot override it; the entries are passed through it wrapped.)

        kahan_summation or stochastic_rounding on (the loaded group's value) for a bfloat16 /
        float16 param whose saved state lacks the option's entry (the compensation, the seed): a
        UserWarning; the next step starts a zero compensation or draws a new seed.
        torch.distributed.checkpoint loads only the entries the loading optimizer's state has,
        so a checkpoint of either loaded into an optimizer made without the option comes
        without them (make it with the option on to resume exactly).

        Load pre-hooks (``register_load_state_dict_pre_hook``) run first, on the dict as given,
        as in torch: a hook that adapts a state_dict saved for other params does so before any
        of the checks above.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if self._lean_keys and isinstance(state_dict.get("state"), dict):
            state_dict["state"] = {pid: lean.import_codes(st, self._lean_keys) for pid, st in state_dict["state"].items()}
        saved_groups = state_dict["param_groups"]
        check(
            len(saved_groups) == len(self.param_groups),
            f"loaded state dict has a different number of parameter groups: {len(saved_groups)} in the "
            f"state dict, {len(self.param_groups)} in this optimizer",
        )
        for i, (saved, current) in enumerate(zip(saved_groups, self.param_groups)):
            check(
                len(saved["params"]) == len(current["params"]),
                f"loaded state dict contains a parameter group that doesn't match the size of "
                f"optimizer's group: group {i} has {len(saved['params'])} params in the state dict, "
                f"{len(current['params'])} in this optimizer",
            )
        self._refuse_other_optimizer(saved_groups)
        state_dict = self._loaded_state(state_dict)
        state_dict, loaded = self._load_records(state_dict)
        # torch casts every floating state entry to its param's dtype. Entries of _state_dtypes
        # keep their own dtype; the state_bits entries and their 8-bit scales keep the dtype they
        # were saved in where the group or the saved state is not of format 32 (a bf16 state
        # loaded for a float16 param, a float32 scale for a bf16 param), then are converted to the
        # group's format below (lean.convert).
        lean_groups = {pid for saved, current in zip(saved_groups, self.param_groups)
                       if current.get("state_bits", 32) != 32 for pid in saved["params"]}
        if self._state_dtypes or self._lean_keys:
            kept = {}
            for pid, st in state_dict["state"].items():
                if not isinstance(st, dict):
                    continue
                keep_lean = pid in lean_groups or any(k.endswith(lean.ABSMAX) for k in st)
                if any(k in self._state_dtypes for k in st) or (keep_lean and any(k in self._lean_keys for k in st)):
                    kept[pid] = {k: _KeepDtype(v, self._state_dtypes[k]) if k in self._state_dtypes else
                                 _KeepDtype(v, v.dtype) if keep_lean and isinstance(v, torch.Tensor) and (
                                     k in self._lean_keys or k.endswith(lean.ABSMAX)) else v
                                 for k, v in st.items()}
            if kept:
                state_dict = {**state_dict, "state": {**state_dict["state"], **kept}}
        groups = [{k: v for k, v in g.items() if k != "mup"} for g in saved_groups]
        if self._lean_keys:
            # state_bits is this optimizer's choice of storage, not a hyperparameter of the
            # saved run: a checkpoint of another format is converted to it (below), not adopted.
            for saved, current in zip(groups, self.param_groups):
                saved["state_bits"] = current.get("state_bits", 32)
        for saved, current in zip(groups, self.param_groups):
            for key, value in current.items():
                if key not in ("params", "param_names"):
                    saved.setdefault(key, value)
            self._check_group({**saved, "params": current["params"]})  # saved params are indices
        unstored = self._check_saved_state_keys(groups, state_dict["state"], saved_groups)
        # The pre-hooks have run: torch's load_state_dict must not run them a second time. The
        # post-hooks run at the end, on the state as loaded (torch runs them last too): from
        # inside torch's load_state_dict they would see the state before the conversions below
        # (8-bit codes in a 32-bit optimizer, values not yet quantized, no width records).
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "param_groups": groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for p, record in loaded.items():  # old-format records of params saved without a state
            self._widths[p] = (record, self._own(p)[1])
        for p, st in self.state.items():  # states saved without a record (torch.optim) keep ours
            if isinstance(st, dict) and st and not st.get(RECORD_KEY):
                st[RECORD_KEY] = copy_record(self._own(p)[0])
        if self._lean_keys:  # a state_dict of another state_bits: quantized, dequantized or cast
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.get(p)
                    if isinstance(st, dict) and st:
                        lean.convert(st, p, group, self._lean_keys)
        self.__dict__.pop("_plan_cache", None)  # new groups and state: every plan is stale
        for option, entry, _, then in _STORE_ENTRIES:
            labels = [label for named, _, label in unstored if named == option]
            if labels:
                warnings.warn(
                    f"loaded state dict: {option}=True, but the state of {len(labels)} bfloat16 / float16 "
                    f"parameter(s) ({', '.join(labels[:3])}{', ...' if len(labels) > 3 else ''}) has no "
                    f"{entry!r}: {then}. (A checkpoint loaded through torch.distributed.checkpoint into an "
                    f"optimizer made without {option} comes without them: make the optimizer with {option}=True "
                    f"to resume exactly.)",
                    stacklevel=2,
                )
        for post_hook in post_hooks.values():
            post_hook(self)

    def _load_records(self, state_dict: dict) -> tuple[dict, dict]:
        """load_state_dict's width records, checked before anything is written: each saved
        record must fit the parameter it lands on, and all parameters must end up with width
        information or none. Records of mupopt's first format (``group["mup"]``, one per position)
        move into the states. Returns the state_dict to load and {param: record} of old-format
        records whose params were saved without a state."""
        state, loaded, infos = dict(state_dict["state"]), {}, {}
        for saved, current in zip(state_dict["param_groups"], self.param_groups):
            old = saved.get("mup")
            check(old is None or len(old) == len(saved["params"]),
                  f"state_dict: {len(old or ())} muP records for {len(saved['params'])} params in a group")
            for k, (pid, p) in enumerate(zip(saved["params"], current["params"])):
                st = state.get(pid)
                record = st.get(RECORD_KEY) if isinstance(st, dict) else None
                # Nothing but the record, or entries left empty (DCP's flattened layout gives an
                # entry it did not find as {}): the saved entries did not load.
                if record is not None and all(isinstance(v, dict) and not v for key, v in st.items() if key != RECORD_KEY):
                    raise MupError(
                        f"the state of parameter {self._label(p)} holds its muP width record and nothing else: its "
                        f"other entries were not loaded. DCP's flattened layout (flatten_optimizer_state_dict=True, "
                        f"torchtitan's) loads only the entries this optimizer's state already has, and Muon's state "
                        f"depends on its routing, which follows the width records: resume Muon with the width "
                        f"information of the run that saved it (set_base_shapes, base shapes) or an explicit use_muon"
                    )
                if old is not None and not record:
                    record = old_record(old[k], p.shape)
                    if st:
                        state[pid] = {**st, RECORD_KEY: record}
                    else:
                        loaded[p] = record
                own, name = self._own(p)
                infos[p] = read_record(record or own, tuple(p.shape), name, lambda p=p: self._label(p))
        self._check_width_consistency(infos)
        return {**state_dict, "state": state}, loaded

    def _refuse_other_optimizer(self, saved_groups: list) -> None:
        """A state_dict of another optimizer (its param groups hold hyperparameters this one does
        not take, and another mupopt optimizer does) is refused here, with the reason, instead of
        failing at the first step. Unknown keys alone are kept, as torch keeps them (a newer
        torch's flags, another library's options)."""
        own = _hyperparameter_names(type(self)) | set(self.defaults)
        own |= {k for g in self.param_groups for k in g}
        foreign = {k for g in saved_groups for k in g} - own - {"params", "param_names"}
        if not foreign:
            return
        scores = {cls: len(foreign & _hyperparameter_names(cls)) for cls in _OPTIMIZER_CLASSES
                  if not issubclass(type(self), cls)}
        best = max(scores.values(), default=0)
        if best == 0:
            return
        likely = " or ".join(cls.__name__ for cls, n in scores.items() if n == best)
        name = type(self).__name__
        raise ValueError(
            f"loaded state dict is not a {name} state_dict: its param groups hold {', '.join(sorted(foreign))}, "
            f"hyperparameters of {likely} that {name} does not take (a state_dict of {likely}?); nothing was loaded"
        )

    def _check_saved_state_keys(self, groups: list, state: dict, given: list) -> list[tuple]:
        """Every saved state that is not empty has the keys this optimizer's step reads for its
        param (``_state_keys``); ``groups`` are the saved groups completed with this optimizer's
        values, holding the saved param ids; ``given`` the saved groups as saved. Returns
        (option, entry, param label) of each bfloat16 / float16 param whose saved group turns a
        param-store option of _STORE_ENTRIES on and whose state lacks that option's entry (a
        group that does not name the option, torch.optim's, saved no such entries)."""
        unstored = []
        for saved, current, as_saved in zip(groups, self.param_groups, given):
            group = {**saved, "params": current["params"]}
            for i, pid in enumerate(saved["params"]):
                st = state.get(pid)
                if not isinstance(st, dict) or not st:
                    continue
                for option, entry, keeps, _ in _STORE_ENTRIES:
                    if as_saved.get(option) and keeps(current["params"][i]) and entry not in st:
                        unstored.append((option, entry, _param_label(current, i)))
                missing = [k for k in self._saved_state_keys(group, i, st) if k not in st]
                # 8-bit codes (uint8) without their scales cannot be decoded.
                values = {k: v.value if isinstance(v, _KeepDtype) else v for k, v in st.items()}
                missing += [k + lean.ABSMAX for k in self._lean_keys if isinstance(values.get(k), torch.Tensor)
                            and values[k].dtype == torch.uint8 and k + lean.ABSMAX not in st]
                if missing:
                    raise ValueError(
                        f"loaded state dict: the state of parameter {pid} (here the parameter "
                        f"{_param_label(current, i)}) has no {', '.join(map(repr, missing))} (it holds "
                        f"{sorted(map(str, st))}), which {type(self).__name__} needs (a state_dict of another "
                        f"optimizer?); nothing was loaded"
                    )
        return unstored

    def _loaded_state(self, state_dict: dict) -> dict:
        """A subclass's own checkpoint form turned into its state (Shampoo's blocks), after the
        pre-hooks and the count checks; never modifies ``state_dict``."""
        return state_dict

    # -- the step ------------------------------------------------------------------------------
    def _plan_options(self, group: dict) -> tuple:
        """Group values that change multipliers or routing (part of the plan's key; the storage
        options, state_bits, stochastic_rounding and kahan_summation, are in it for every
        optimizer, outside this method that subclasses replace)."""
        return (group["wd_mode"], group["scale_eps"])

    def _segments(self, group: dict, kernel: str, stepped: list[int]) -> list[tuple[str, list[int]]]:
        """(registry name, positions in ``stepped``) per backend call; Muon splits its params."""
        return [(kernel, list(range(len(stepped))))]

    def _collectives(self, kernel: str, params: list) -> dict:
        """Keyword arguments a backend needs for sharded tensors (LAMB, Muon override)."""
        return {}

    def _hparams_for(self, kernel: str, group: dict, extra: dict):
        return self._hparams(group, **extra)

    def _plan(self, group: dict, kernel: str, grads: list) -> GroupPlan:
        """The group's cached plan, rebuilt when its key changed (GroupPlan). Raises on bad input
        and writes nothing."""
        stepped = [i for i, g in enumerate(grads) if g is not None]
        if torch.compiler.is_compiling():
            # Traced by torch.compile: the plan's Python runs once per compilation (guards on
            # the groups decide when again), so no cache and no storage fingerprints.
            return self._build_plan(group, kernel, None, stepped, grads)
        cache = self.__dict__.setdefault("_plan_cache", {})
        key = (
            kernel, id(group), id(group["params"]), len(group["params"]), id(self.state), "mup" in group,
            self._plan_options(group), bool(group.get("capturable", False)), self.backend,
            group.get("state_bits", 32), bool(group.get("stochastic_rounding", False)),
            bool(group.get("kahan_summation", False)),
            os.environ.get(backends.ENV_VAR), tuple(stepped),
        )
        plan = cache.get((id(group), kernel))
        # The key holds the params list by id and length; a param replaced in it
        # (group["params"][i] = new) is found here, by identity (a C-level loop).
        if (plan is not None and plan.key == key and all(map(operator.is_, group["params"], plan.members))
                and self._states_unchanged(plan)):
            if plan.distributed:
                fresh = [local(p) for p in plan.params]
                if all(map(operator.is_, fresh, plan.locals)) and tuple(map(_DATA_PTR, fresh)) == plan.ptrs:
                    return plan
            elif tuple(map(_DATA_PTR, plan.locals)) == plan.ptrs:
                return plan
        plan = self._build_plan(group, kernel, key, stepped, grads)
        cache[(id(group), kernel)] = plan
        return plan

    def _build_plan(self, group: dict, kernel: str, key, stepped: list[int], grads: list) -> GroupPlan:
        params = [group["params"][i] for i in stepped]
        mults_all = self.group_multipliers(group)
        self._refuse_width_changed_since_construction(group)
        _refuse_bad_grads(type(self).__name__, params, [grads[i] for i in stepped])
        check_placements(params, type(self).__name__)
        locals_ = [local(p) for p in params]
        local_grads = [local_grad(p, grads[i]) for p, i in zip(params, stepped)]
        distributed = any(map(is_dtensor, params))
        segments = []
        for seg_kernel, positions in self._segments(group, kernel, stepped):
            originals = [locals_[k] for k in positions]
            seg_grads = [local_grads[k] for k in positions]
            viewed = None
            if seg_kernel in ELEMENTWISE and any(needs_view(t) or not dense(t) for t in originals):
                viewed = [needs_view(t) or not dense(t) for t in originals]
                # A param that is not dense (every other column of a larger tensor, torch's
                # test_forloop_goes_right_direction's non-contiguous case) is stepped through a
                # contiguous buffer of the plan: copied in before each call, written back after
                # (Segment.staged), so the fused backends take it too. Its gradients and states
                # take the buffer's layout.
                originals = [t if dense(t) else torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in originals]
            views = viewed_like(originals, originals, viewed)
            grad_views = _grads_as_params(seg_grads, originals, viewed)[0]
            formats = [self._state_format(group, params[k]) for k in positions]
            if self._lean_keys and group.get("state_bits", 32) == 8:
                self._warn_unquantized([params[k] for k in positions])
            kahan = bool(group.get("kahan_summation", False))
            compensated = [kahan and storage.compensates(params[k]) for k in positions]
            for backend, chosen in self._select(seg_kernel, views, grad_views, [params[k] for k in positions],
                                                originals, viewed, bool(group.get("capturable", False)), formats,
                                                compensated):
                pos = [positions[k] for k in chosen]
                seg = Segment(seg_kernel, backend, pos, [views[k] for k in chosen], [mults_all[stepped[k]] for k in pos])
                seg.originals = [originals[k] for k in chosen]
                seg.staged = [(locals_[k], o) for k, o in zip(pos, seg.originals) if o is not locals_[k]]
                seg.viewed = None if viewed is None else [viewed[k] for k in chosen]
                seg.collectives = self._collectives(seg_kernel, [params[k] for k in pos]) if distributed else {}
                seg.grad_index = [stepped[k] for k in pos]
                seg.own_grads = not distributed and seg.viewed is None
                seg.grad_layout = [(grad_views[k].dtype, grad_views[k].is_contiguous()) for k in chosen]
                segments.append(seg)
        refs = (group, group["params"], self.state)
        return GroupPlan(key, refs, params, locals_, stepped, segments, distributed)

    def _warn_unquantized(self, params: list) -> None:
        """state_bits=8 keeps 32-bit states for a param it cannot cut into blocks, though it is
        not small (``lean.quantizable``: complex, not contiguous, a tensor subclass): say so, once
        per optimizer, rather than save nothing quietly (a channels_last conv weight is one)."""
        if getattr(self, "_warned_unquantized", False) or torch.compiler.is_compiling():
            return
        left = [p for p in params if p.numel() >= lean.MIN_8BIT_SIZE and not lean.quantizable(p)]
        if not left:
            return
        self._warned_unquantized = True
        shapes = ", ".join(f"{tuple(p.shape)} {p.dtype}" + ("" if local(p).is_contiguous() else " not contiguous")
                           for p in left[:4]) + (", ..." if len(left) > 4 else "")
        warnings.warn(
            f"{type(self).__name__}: state_bits=8 keeps 32-bit states for {len(left)} param(s) of at least "
            f"{lean.MIN_8BIT_SIZE} elements that are complex, not contiguous or a tensor subclass ({shapes}): "
            "format 8 cuts a real, contiguous tensor into blocks (docs/lean-states.md). (Shown once per optimizer.)",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )

    def _state_format(self, group: dict, p: torch.Tensor) -> int:
        """The format p's state entries are in (or are about to be converted to) as backends
        see it: 8 (blocks), 16 (bfloat16 states of a param of another dtype) or 32 (states in
        the param's dtype, also bfloat16 states of a bfloat16 param)."""
        if not self._lean_keys:
            return 32
        fmt = lean.state_format(p, group)
        return 32 if fmt == 16 and p.dtype == torch.bfloat16 else fmt

    def _select(self, kernel: str, params: list, grads: list, global_params: list, originals: list,
                viewed: list | None, capturable: bool = False, formats: list | None = None,
                compensated: list | None = None):
        """[(backend, positions)]: the backend of every tensor. An explicit backend steps all or
        raises; ``auto`` takes the best backend that can step the whole list, else the best one
        per tensor (a strided or fp64 tensor falls back alone, not its whole group), and warns
        once per optimizer when a faster backend for this device could not run. ``params`` and
        ``grads`` are what the backend will see (views of ``originals`` where ``viewed``).
        ``formats[i]``: the format of tensor i's states (:meth:`_state_format`); a backend steps
        the formats in its ``state_bits``. ``compensated[i]``: tensor i is stepped with
        kahan_summation (a bfloat16 / float16 param with the option on); a backend steps those
        when its ``kahan_summation`` is True."""
        if not params:
            return []
        requested = self.backend
        # Where a backend named in an error came from: a user who set MUPOPT_BACKEND in a shell
        # and passed no backend= would otherwise be told about a backend they never asked for.
        origin = ""
        if requested == "auto":
            requested = os.environ.get(backends.ENV_VAR, "auto") or "auto"
            if requested != "auto":
                origin = f" (set by the environment variable {backends.ENV_VAR}={requested!r}; unset it for 'auto')"
        states = [self.state.get(p) for p in global_params]
        for i, (p, st) in enumerate(zip(originals, states)):
            for k, v in (st or {}).items():
                if isinstance(v, torch.Tensor) and v.ndim and local(v).shape != p.shape and not k.endswith(lean.ABSMAX):
                    raise RuntimeError(
                        f"{type(self).__name__}: state {k!r} of a parameter of shape {tuple(p.shape)} has shape "
                        f"{tuple(local(v).shape)} (a state_dict of another model?); nothing was changed"
                    )
        flags = viewed or [False] * len(params)
        # A backend's reason sees the param, its gradient and its state tensors, less the block
        # scales of 8-bit states (shaped by blocks, not like the param: a backend that lists 8 in
        # its state_bits checks them itself).
        tensors_of = [[p, g, *(elementwise_view(same_layout(local(v), o)) if f and v.shape == o.shape else local(v)
                               for k, v in (st or {}).items()
                               if isinstance(v, torch.Tensor) and v.ndim and not k.endswith(lean.ABSMAX))]
                      for p, g, st, o, f in zip(params, grads, states, originals, flags)]
        everything = [t for ts in tensors_of for t in ts]
        formats = formats or [32] * len(params)
        all_formats = set(formats)
        compensated = compensated or [False] * len(params)

        def reason_of(backend, tensors, fmts, kahan=any(compensated)):
            if kahan and not backend.kahan_summation:
                return ("it steps a bfloat16 / float16 param with kahan_summation=True (a compensation buffer), which "
                        f"backend {backend.name!r} does not implement yet (backends that do: " + ", ".join(
                            n for n in backends.names(kernel) if backends.get(kernel, n).kahan_summation) + ")")
            for fmt in sorted(fmts):
                if fmt not in backend.state_bits:
                    what = "8-bit block-quantized" if fmt == 8 else "bfloat16 states of non-bfloat16 params"
                    return (f"its optimizer states are {what} (state_bits={fmt}), which backend {backend.name!r} does "
                            f"not implement yet (backends that do: " + ", ".join(
                                n for n in backends.names(kernel) if fmt in backends.get(kernel, n).state_bits) + ")")
            return backend.reason(tensors)

        try:
            backends.check_name(kernel, requested)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}{origin}") from None
        if requested != "auto":
            backend = backends.get(kernel, requested)
            reason = reason_of(backend, everything, all_formats)
            if reason is None and capturable and not backend.capturable:
                reason = "it does not support capturable=True (backends that do: " + ", ".join(
                    n for n in backends.names(kernel) if backends.get(kernel, n).capturable) + ")"
                if torch.compiler.is_compiling():
                    # The user may never have asked for it: dynamo's OptimizerVariable sets it.
                    reason += ("; torch.compile sets capturable=True in every param group of an optimizer it traces "
                               "(torch/_dynamo/variables/optimizer.py): compile without fullgraph=True, or use "
                               "backend='auto'")
            if reason is not None:
                raise RuntimeError(f"{type(self).__name__}: backend {requested!r}{origin} cannot step these {kernel} tensors: "
                                   f"{reason}")
            return [(backend, list(range(len(params))))]
        candidates = [backends.get(kernel, n) for n in backends.names(kernel)]
        if capturable:
            candidates = [b for b in candidates if b.capturable]
        if reason_of(candidates[0], everything, all_formats) is None:  # the common case: the best one takes all
            return [(candidates[0], list(range(len(params))))]
        # Else the best backend per tensor: one fp16 or strided tensor falls back alone.
        chosen: dict[str, tuple[backends.Backend, list[int]]] = {}
        for i, ts in enumerate(tensors_of):
            refused = []
            for backend in candidates:
                reason = reason_of(backend, ts, {formats[i]}, compensated[i])
                if reason is None:
                    chosen.setdefault(backend.name, (backend, []))[1].append(i)
                    self._warn_fallback(kernel, backend, refused, params[i])
                    break
                refused.append((backend, reason))
            else:
                reasons = "; ".join(f"{b.name}: {r}" for b, r in refused)
                raise RuntimeError(f"{type(self).__name__}: no backend of {kernel} can step tensor {i} ({reasons})")
        return [chosen[n] for n in backends.names(kernel) if n in chosen]

    def _warn_fallback(self, kernel, backend, refused, sample: torch.Tensor) -> None:
        """Warn once per optimizer and (kernel, backend pair) when ``auto`` passed over a faster
        backend made for these tensors' device (a failed build, an unsupported dtype or layout)."""
        for better, reason in refused:
            if better.priority <= backend.priority or (better.devices is not None and sample.device.type not in better.devices):
                continue
            warned = self.__dict__.setdefault("_fallback_warned", set())
            if (kernel, better.name, backend.name) in warned:
                continue
            warned.add((kernel, better.name, backend.name))
            warnings.warn(
                f"{type(self).__name__}: backend {better.name!r} cannot step some {kernel} tensors ({reason}); "
                f"backend={backend.name!r} steps them instead (slower). Pass backend= to choose explicitly.",
                BackendFallbackWarning,
                stacklevel=_caller_stacklevel(),
            )

    @property
    def selected_backends(self) -> list[dict[str, str]]:
        """Per param group, the backend that stepped each kernel at the last step (after ``auto``
        and any per-tensor fallback), e.g. ``[{"adamw": "cpu"}]``; empty dicts before a step."""
        out = []
        cache = self.__dict__.get("_plan_cache", {})
        for group in self.param_groups:
            used: dict[str, list[str]] = {}
            for (gid, _), plan in cache.items():
                if gid == id(group) and plan.key[1] == id(group):
                    for seg in plan.segments:
                        names = used.setdefault(seg.kernel, [])
                        label = seg.backend.name if len(plan.segments) == 1 else f"{seg.backend.name} ({len(seg.params)})"
                        if label not in names:
                            names.append(label)
            out.append({k: " + ".join(v) for k, v in used.items()})
        return out

    def _found_inf(self) -> bool:
        """Whether GradScaler's found_inf (set only during its step) is nonzero: a host read."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.any())

    def _states_unchanged(self, plan: GroupPlan) -> bool:
        """Whether the optimizer's state of the plan's params is what the plan's segments hold
        (GroupPlan): True at once while no state anywhere changed since (``_State.version``) and
        the plain dicts among them hold what they held, else by comparing the states themselves.
        A plan whose segments hold no states yet (a new plan, or a step GradScaler skipped before
        any state existed) counts as changed unless no state of its params exists at all."""
        if plan.state_version == _State.version and all(_same_entries(*entry) for entry in plan.plain_states):
            return True
        snapshot = _state_snapshot(self.state, plan.params)
        if plan.state_snapshot is None:
            return not any(snapshot[0])
        if not _same(snapshot, plan.state_snapshot):
            return False
        if plan.state_version is not None:
            plan.state_version = _State.version
        return True

    def _create_state(self, group: dict, plan: GroupPlan) -> list:
        """Create missing state (lazily, as torch), check that every state has the keys this
        optimizer reads, then give each segment its local state views. Returns (param, had_entry)
        for each state created here (:func:`_drop_states` undoes them if the step fails before
        it writes)."""
        if plan.state_snapshot is not None:
            return []  # _plan found the states unchanged
        created = []
        for p in plan.params:
            if p not in self.state:
                created.append((p, False))
                self.state[p] = _State(self._init_state(p, group))
            elif not self.state[p]:
                created.append((p, True))
                self.state[p].update(self._init_state(p, group))
            else:
                continue
            self.state[p][RECORD_KEY] = copy_record(self._own(p)[0])
        if self._lean_keys:
            # A state of another format (group["state_bits"] changed since it was made): converted
            # now, before the keys are checked; the values stay what they were (up to rounding).
            # 8-bit codes under their state_dict name (written straight into opt.state: torch's
            # ZeroRedundancyOptimizer.load_state_dict) go back under the entry's name first.
            new = {id(q) for q, _ in created}
            for p in plan.params:
                if id(p) not in new and self.state[p]:
                    lean.import_codes_in_place(self.state[p], self._lean_keys)
                    lean.convert(self.state[p], p, group, self._lean_keys)
        try:
            self._check_state_keys(group, plan)
        except Exception:
            _drop_states(self.state, created)
            raise
        if group.get("stochastic_rounding", False):
            self._add_rounding_state(group, plan)
        _set_compensation(self.state, plan.params, group)
        for seg in plan.segments:
            states = [self.state[plan.params[k]] for k in seg.positions]
            if plan.distributed:
                states = [local_state(st, plan.params[k]) for st, k in zip(states, seg.positions)]
            if seg.viewed is not None:
                states = [_view_state(st, o) if v else st for st, o, v in zip(states, seg.originals, seg.viewed)]
            seg.states = states
            seg.bound = None
        plan.state_snapshot = snapshot = _state_snapshot(self.state, plan.params)
        # Changes of the mapping and of _State entries count in _State.version; a plain dict a
        # user put in (opt.state[p] = {}, then filled by this step) is compared entry by entry
        # at every step, it alone (a reset parameter does not slow the step of the others). A
        # mapping that is not a _StateMap (opt.state assigned by hand): everything, every step.
        if type(self.state) is _StateMap:
            plan.state_version = _State.version
            plan.plain_states = [(st, list(st), list(st.values())) for st in snapshot[0] if type(st) is not _State]
        else:
            plan.state_version = None
        return created

    def _add_rounding_state(self, group: dict, plan: GroupPlan) -> None:
        """What stochastic rounding needs in the state of each bfloat16 / float16 param
        (mupopt/storage.py): its seed, drawn here from torch's default generator the first time
        the param is stepped with the option on (a state loaded with one keeps it, so a resume
        continues the same random stream), and a step count where the state has none (Muon's
        matrices; their backends then count it). Created after every check of the plan, and
        only by a step that is taken: a step GradScaler skips draws nothing."""
        rounded = [p for p in plan.params if storage.rounds_stochastically(p)]
        unseeded = [p for p in rounded if "sr_seed" not in self.state[p]]
        if unseeded:
            self._draw_seeds(unseeded)
        for p in rounded:
            _add_rounding_step(self.state[p], p, group)

    # Eager even inside torch.compile: a seed drawn in a trace is an unknown integer there (no
    # backend can take it: the cpu op's int list refused it, the reference's compiled code did not
    # build). A compiled first step runs this as a graph break; the seeds then sit in the states
    # as numbers, and later steps trace whole.
    @torch.compiler.disable(reason="stochastic_rounding draws each param's seed from torch's default generator at "
                                   "its first step, outside the graph: with fullgraph=True, take that step eagerly")
    def _draw_seeds(self, params: list) -> None:
        for p in params:
            self.state[p]["sr_seed"] = storage.draw_seed()
        sharded = [p for p in params if is_dtensor(p)]
        if sharded and _distributed_ready():  # one seed per param on every rank (agree_seeds)
            seeds = agree_seeds(sharded, [self.state[p]["sr_seed"] for p in sharded], type(self).__name__)
            for p, seed in zip(sharded, seeds):
                self.state[p]["sr_seed"] = seed

    def _state_keys(self, group: dict, i: int) -> tuple[str, ...]:
        """The state keys the step of ``group["params"][i]`` reads (those :meth:`_init_state`
        creates; tests/test_state_handling.py checks that the two agree)."""
        return ("step", "exp_avg", "exp_avg_sq")

    def _saved_state_keys(self, group: dict, i: int, state: dict) -> tuple[str, ...]:
        """The keys a loaded ``state`` of ``group["params"][i]`` must have (Muon: by the routing
        of the width record loaded with it)."""
        return self._state_keys(group, i)

    def _check_state_keys(self, group: dict, plan: GroupPlan) -> None:
        """Every state of the plan's params has the keys its step reads: a state of another
        optimizer, one with entries removed by hand, or one made before a group option that
        needs more state was set (amsgrad, Muon's use_muon; torch.optim raises a KeyError there)
        raises here, before anything is written, instead of a KeyError from the middle of the
        step."""
        for k, p in zip(plan.stepped, plan.params):
            st = self.state[p]
            keys = self._state_keys(group, k)
            if self._lean_keys:
                keys = lean.state_keys(keys, lean.state_format(p, group), self._lean_keys)
            missing = [key for key in keys if key not in st]
            if missing:
                raise RuntimeError(
                    f"{type(self).__name__}: the state of parameter {_param_label(group, k)} has no "
                    f"{', '.join(map(repr, missing))} (it holds {sorted(map(str, st))}): a state of another optimizer, "
                    f"entries removed by hand, or a group option that needs them (e.g. amsgrad, use_muon) set after "
                    f"the state was made. Reset it with opt.state[p] = {{}} to start that parameter afresh; "
                    f"nothing was changed"
                )

    def _check_data(self, plans: list) -> None:
        """Checks of this step's values that run after the found_inf decision (Shampoo's
        non-finite gradients); may raise, writes nothing."""

    def _call(self, seg: Segment, grads: list, hp, *, prepare: bool, found_inf: torch.Tensor | None = None,
              copies: list = ()):
        """Step one segment with its backend. prepare=True and a two-phase backend
        (``Backend.prepare``): only prepare, and return the commit; otherwise step, return None.

        A backend with ``bind`` (the C++ backends) is bound once per plan and state (its
        validated tensor tables kept in C++) and then called with this step's gradients only;
        not with collectives (LAMB's norm_reduce), which need the unbound two-call form, and not
        under torch.compile, which traces the unbound ops (they have fake kernels). ``found_inf``
        (capturable groups) goes to the backend, which skips on the device.

        Gradients of another layout than their param's: where _run has not already laid them
        out (``copies``: a single call of a validating backend reads ``p.grad`` as it is, with
        no per-gradient work in Python), the backend refuses one before it writes anything; the
        gradients are then laid out like their params (:func:`_grads_as_params`) and the call
        made again. With GradScaler, the unscaled values of a copy are stored back into the
        gradient, as for any other gradient (module docstring)."""
        backend = seg.backend
        fn = backend.prepare if prepare and backend.prepare is not None else backend.fn
        if (backend.bind is not None and not seg.collectives and not prepare and found_inf is None
                and not torch.compiler.is_compiling()):
            if seg.bound is None:
                seg.bound = backend.bind(seg.params, seg.states, seg.mults)
            fn = _BoundCall(seg.bound, seg.own_grads)
        kwargs = dict(seg.collectives)
        if found_inf is not None:
            kwargs["found_inf"] = found_inf
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:
            if any(g.is_sparse for g in grads):  # before the in-place unscale touches them
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            # As GradScaler.unscale_: the reciprocal in float64 (MPS has none), rounded once to
            # float32; a device op, no host read.
            scale = grad_scale.reshape(())
            inv_grad_scale = scale.reciprocal().float() if scale.device.type == "mps" else scale.double().reciprocal().float()
            if backend.amp_scaling:
                kwargs["inv_grad_scale"] = inv_grad_scale
            else:
                unscale_(grads, inv_grad_scale)
        for p, buffer in seg.staged:
            buffer.copy_(p)
        try:
            out = fn(seg.params, grads, seg.states, seg.mults, hp, **kwargs)
        except (RuntimeError, NotImplementedError) as exc:
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients") from exc
            if copies or seg.viewed is not None or not backend.validates:
                raise  # the gradients were laid out already (_run): not a layout problem
            _refuse_bad_grads(type(self).__name__, seg.originals, grads)
            laid, copies = _grads_as_params(grads, seg.originals, None)
            if not copies:
                raise
            if isinstance(fn, _BoundCall):
                fn = _BoundCall(fn.step, False)  # the laid-out copies, not p.grad
            out = fn(seg.params, laid, seg.states, seg.mults, hp, **kwargs)
        if grad_scale is not None:
            for g, laid in copies:
                g.copy_(laid)
        if not prepare:
            for p, buffer in seg.staged:
                p.copy_(buffer)
        return out

    def _run(self, kernel: str | None = None, extra: dict | None = None, _retry: bool = False) -> None:
        """One step of every param group with the backend(s) of ``kernel`` (default: this
        optimizer's rule); ``extra`` keyword arguments go to _hparams.

        Order, so that nothing is written before everything that can fail has been checked:
        hyperparameters of every group; every group's plan (gradients, backend choice, state
        shapes); GradScaler's found_inf (skip: nothing created or written); state creation;
        data checks and the prepare phase of two-phase backends (Shampoo's roots) for every group;
        then the writes. In a distributed run the ranks agree on the outcome of the prepare phase
        before any writes (one all-reduce), so a failure on one rank stops every rank.

        Runs with autocast off: a step called inside ``torch.autocast`` (a whole training
        iteration in one autocast block) would otherwise run the matmuls of Muon's Newton-Schulz
        and Shampoo's statistics and roots in bfloat16 / float16, overriding ``ns_dtype`` and
        the float32 statistics, silently. (torch.optim's elementwise steps have no op autocast
        changes; the closure, the forward pass, still runs under the caller's autocast.)"""
        autocast = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
        if autocast:
            with contextlib.ExitStack() as stack:
                for device_type in autocast:
                    stack.enter_context(torch.autocast(device_type, enabled=False))
                return self._run(kernel, extra, _retry)
        kernel = kernel or self.rule
        extra = extra or {}
        if not torch.compiler.is_compiling():
            # Under torch.compile hyperparameters may be traced as symbolic floats, which the
            # checks' messages cannot format; they were checked when set (constructor,
            # add_param_group, load_state_dict) and at every eager step.
            for group in self.param_groups:
                self._check_group(group)
        work = []
        for group in self.param_groups:
            grads = [p.grad for p in group["params"]]
            plan = self._plan(group, kernel, grads)
            if plan.params:
                work.append((group, plan, grads))
        if not work:
            return
        # GradScaler's found_inf: a host read decides for every group (module docstring), unless
        # all groups are capturable=True: then each backend skips on the device (no host read).
        device_found_inf = None
        if all(group.get("capturable", False) for group, _, _ in work):
            device_found_inf = getattr(self, "found_inf", None)
        elif self._found_inf():
            return  # GradScaler found inf/nan: step nothing, create nothing
        # State created by this step is removed again if the step fails before it writes, so that
        # a refused first step leaves the optimizer as it was (no zero state behind).
        created: list = []
        try:
            for group, plan, _ in work:
                created += self._create_state(group, plan)
        except Exception:
            _drop_states(self.state, created)
            raise
        segments = []
        # One backend call validates its own inputs before writing (Backend.validates); with
        # several calls in this step, a gradient that would make a later one fail must be found
        # before the first one writes: then every gradient is checked here.
        several = sum(len(plan.segments) for _, plan, _ in work) > 1
        try:
            for group, plan, grads in work:
                for seg in plan.segments:
                    seg_grads = [grads[i] for i in seg.grad_index]
                    if plan.distributed:
                        seg_grads = [local_grad(plan.params[k], g) for k, g in zip(seg.positions, seg_grads)]
                    full = several or not seg.backend.validates
                    copies = []
                    if full or seg.viewed is not None:
                        # Checked here (shape, sparsity) before a gradient is copied into its
                        # param's layout: a copy would broadcast a wrong shape.
                        _refuse_bad_grads(type(self).__name__, seg.originals, seg_grads)
                        seg_grads, copies = _grads_as_params(seg_grads, seg.originals, seg.viewed)
                    if full and _check_grads(seg, seg_grads) and not _retry:
                        # A gradient's dtype changed since the backend was chosen: choose again.
                        self.__dict__.pop("_plan_cache", None)
                        _drop_states(self.state, created)
                        return self._run(kernel, extra, _retry=True)
                    segments.append((group, seg, seg_grads, copies))
        except Exception:
            _drop_states(self.state, created)
            raise
        calls, failure = [], None
        try:
            self._check_data([plan for _, plan, _ in work])
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
            failure = exc
        if failure is None:
            for group, seg, seg_grads, copies in segments:
                # A prepare phase that exchanges data (Shampoo's sharded matrices) runs on every
                # rank even after an earlier segment failed on this one, so that no other rank
                # waits in it; its result is dropped.
                if failure is not None and not (seg.backend.prepare is not None and seg.collectives):
                    continue
                try:
                    hp = self._hparams_for(seg.kernel, group, extra)
                    if group.get("stochastic_rounding", False):
                        hp = dataclasses.replace(hp, stochastic_rounding=True)
                    if group.get("kahan_summation", False):
                        hp = dataclasses.replace(hp, kahan_summation=True)
                    if seg.backend.prepare is not None:
                        calls.append(self._call(seg, seg_grads, hp, prepare=True, copies=copies))
                    else:
                        calls.append(functools.partial(self._call, seg, seg_grads, hp, prepare=False,
                                                       found_inf=device_found_inf, copies=copies))
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
                    failure = failure or exc
        # Only a step whose outcome depends on this rank's data (a prepare phase, data checks:
        # Shampoo's roots and finiteness) can fail on one rank alone; others pay no collective.
        may_diverge = type(self)._check_data is not MupOptimizer._check_data or any(
            seg.backend.prepare is not None for _, plan, _ in work for seg in plan.segments)
        if may_diverge and any(plan.distributed for _, plan, _ in work) and _distributed_ready():
            failure = _agree(failure, type(self).__name__)
        if failure is not None:
            _drop_states(self.state, created)
            raise failure
        for i, call in enumerate(calls):
            if call is None:
                continue
            if i == 0 and created:
                # The first call of a validating backend checks everything before it writes.
                try:
                    call()
                except Exception:
                    if segments[0][1].backend.validates:
                        _drop_states(self.state, created)
                    raise
            else:
                call()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run()
        return loss


class _BoundCall:
    """A bound step called with the registry function's arguments (params, states and
    multipliers are already in it). With ``own_grads`` (plain params, the gradients are their
    ``.grad``) the C++ op reads the gradients from the bound params itself: no list to convert
    (ops._bound, ``from_param_grads``)."""

    __slots__ = ("step", "own_grads")

    def __init__(self, step, own_grads: bool):
        self.step, self.own_grads = step, own_grads

    def __call__(self, params, grads, states, mults, hp, **kwargs):
        if self.own_grads and not kwargs:
            return self.step.from_param_grads(hp)
        return self.step(grads, hp, **kwargs)


_OPTIMIZER_CLASSES: list[type] = []  # every MupOptimizer subclass that defines its own rule


@functools.lru_cache(maxsize=None)
def _hyperparameter_names(cls: type) -> frozenset:
    """The keyword arguments of an optimizer class's constructor, its hyperparameters."""
    skip = {"self", "params", "backend"}
    return frozenset(n for n, a in inspect.signature(cls.__init__).parameters.items()
                     if n not in skip and a.kind not in (a.VAR_POSITIONAL, a.VAR_KEYWORD))


def _add_rounding_step(state: dict, p: torch.Tensor, group: dict) -> None:
    """A step count in the state of a param stochastic rounding stores, where the optimizer keeps
    none (Muon's matrices): the random bits are a function of the step (mupopt/storage.py).
    MupOptimizer._add_rounding_state, and _planned_state for state_memory() before the first
    step."""
    if storage.rounds_stochastically(p) and "step" not in state:
        state["step"] = new_step(p, group)


def _planned_state(opt: MupOptimizer, p: torch.Tensor, group: dict) -> dict:
    """The state p's first step would create, as fake tensors (shapes and dtypes, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def plan() -> dict:
        state = opt._init_state(p, group)
        _set_compensation({p: state}, [p], group)
        # The step count stochastic rounding adds (the seed is a Python int, no tensor).
        if group.get("stochastic_rounding", False):
            _add_rounding_step(state, p, group)
        return state

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return plan()
    except Exception:  # noqa: BLE001 - a state whose creation fake tensors cannot trace (collectives)
        return plan()


# The param-store options' state entries, which a load may leave out (load_state_dict warns):
# (group option, entry, the params that keep it, what the next step does without it).
_STORE_ENTRIES = (
    ("kahan_summation", storage.COMPENSATION, storage.compensates, "their compensations start at zero"),
    ("stochastic_rounding", "sr_seed", storage.rounds_stochastically,
     "new seeds are drawn (the random bits do not continue the saved run's)"),
)


def _set_compensation(state, params: list, group: dict) -> None:
    """kahan_summation (mupopt/storage.py): each bfloat16 / float16 param's compensation, zero
    (the param holds its value exactly) where the state has none; with the option off, a
    compensation left from when it was on is dropped, so that switching it on again starts from
    zero instead of adding an error of a param that has moved since (it is at most half a
    spacing of the param: dropping it loses no more than a store to nearest did)."""
    on = bool(group.get("kahan_summation", False))
    for p in params:
        st = state[p]
        if on and storage.compensates(p):
            if storage.COMPENSATION not in st:
                st[storage.COMPENSATION] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif storage.COMPENSATION in st:
            del st[storage.COMPENSATION]


def _drop_states(state, created: list) -> None:
    """Undo the state a failed step created: ``created`` holds (param, had_entry) pairs; an entry
    that existed (empty) is emptied again, one that did not is removed."""
    for p, had_entry in created:
        if had_entry:
            state[p].clear()
        else:
            state.pop(p, None)


def _param_label(group: dict, i: int) -> str:
    """A parameter named for a message: its name in the group or in a model, else its shape."""
    names = group.get("param_names")
    name = names[i] if names else name_in_models(group["params"][i])
    return repr(name) if name else f"of shape {tuple(group['params'][i].shape)}"


def _view_state(state: dict, original: torch.Tensor) -> dict:
    """An elementwise kernel's view of one param's state: each param-shaped tensor as the param
    is viewed (a state tensor of another layout, e.g. loaded contiguous for a channels_last
    param, is first given the param's strides, in the state itself)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.ndim and v.shape == original.shape:
            if v.stride() != original.stride():
                v = state[k] = same_layout(v, original)
            v = elementwise_view(v)
        out[k] = v
    return out


def _check_grads(seg: Segment, grads: list) -> bool:
    """Whether a gradient's dtype or contiguity (as the backend sees it: in its param's layout,
    :func:`_grads_as_params`) is not the one the segment's backend was chosen for (the caller
    then plans again). Only where every gradient is checked (several backend calls in the step,
    or a backend that does not validate its inputs); a single call of a validating backend
    checks its gradients itself, and _call names a sparse gradient or lays out a gradient of
    another layout if the backend refuses it."""
    return any(g.dtype != dtype or g.is_contiguous() != contiguous for g, (dtype, contiguous) in zip(grads, seg.grad_layout))


def _grads_as_params(grads: list, originals: list, viewed: list | None) -> tuple[list, list]:
    """Each gradient as the backend sees its param: with the param's strides (a copy where they
    differ: a gradient assigned by hand, from a hook or an all-reduce into a transposed buffer),
    then the param's elementwise view where ``viewed``. A gradient of a contiguous param is made
    contiguous; one of a param that is neither (a strided param, stepped by the reference) is
    kept. torch's fused AdamW steps such gradients too. Returns the gradients and the
    (gradient, copy) pairs, so that an unscaled gradient can be stored back (``_call``)."""
    out, copies = [], []
    flags = viewed or itertools.repeat(False)
    for g, o, v in zip(grads, originals, flags):
        if v:
            laid = same_layout(g, o)
            out.append(elementwise_view(laid))
        elif not g.is_contiguous() and o.is_contiguous():
            laid = g.contiguous()
            out.append(laid)
        else:
            out.append(g)
            continue
        if laid is not g:
            copies.append((g, laid))
    return out, copies


def _refuse_bad_grads(name: str, params: list, grads: list) -> None:
    """Raise for a sparse gradient (no backend steps one) or one of another shape than its param's."""
    if any(g.is_sparse for g in grads):
        raise RuntimeError(f"{name} does not support sparse gradients")
    for p, g in zip(params, grads):
        if g.shape != p.shape:
            raise RuntimeError(f"gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")


class BackendFallbackWarning(UserWarning):
    """``backend="auto"`` passed over a faster backend that exists for these tensors' device but
    cannot run them (the reason is in the message)."""


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside mupopt and torch (the user's call of
    step(), through torch's no_grad and step-hook wrappers)."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name.startswith("mupopt.") or name.startswith("torch.") or name == "mupopt"):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _distributed_ready() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def _agree(failure: Exception | None, name: str) -> Exception | None:
    """All ranks learn whether any rank failed its prepare phase (one all-reduce of a flag), so
    that no rank writes a step that another rank refused: each rank raises its own error, or one
    saying another rank failed."""
    flag = torch.tensor([0.0 if failure is None else 1.0])
    backend = dist.get_backend()
    if backend == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if failure is None and flag.item() > 0:
        return RuntimeError(f"{name}: the step failed on another rank (see its error); nothing was written on any rank")
    return failure
