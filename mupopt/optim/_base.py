"""What every mupopt optimizer shares: muP records in the param groups, validation, the step loop.

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

import functools
import math
import numbers
import operator
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, ClassVar

import torch
from torch.optim import Optimizer

from .. import backends
from ..mup import (MupError, Multipliers, WidthInfo, multipliers, name_in_models, recover_width_infos, width_info,
                   format_table, decay_rule, WD_MODES)
from ._placement import (ELEMENTWISE, check_placements, dist, elementwise_view, is_dtensor, local, local_grad, local_state, needs_view,
                         same_layout, viewed_like)


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


def check_betas(betas, count: int = 2) -> None:
    check(isinstance(betas, (tuple, list)) and len(betas) == count, f"Invalid betas: {betas} (expected {count} values)")
    for i, b in enumerate(betas):
        check(not isinstance(b, torch.Tensor) or b.numel() == 1, f"Tensor betas[{i}] must be 1-element")
        check(is_number(b) and 0.0 <= float(b) < 1.0, f"Invalid beta parameter at index {i}: {b}")
    # As torch.optim.Adam: a tensor beta next to a plain number is refused (a sign of a
    # half-converted config). Plain numbers of any real type stay accepted.
    tensors = [isinstance(b, torch.Tensor) for b in betas]
    check(all(tensors) or not any(tensors), "betas must be either both floats or both Tensors")


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


class Segment:
    """One backend call of a param group's step: a registry name (kernel), the backend chosen for
    it and the tensors it steps, as the backend sees them (local shards of DTensors)."""

    __slots__ = ("kernel", "backend", "positions", "grad_index", "grad_layout", "params", "originals", "viewed",
                 "own_grads", "states", "mults", "collectives", "bound")

    def __init__(self, kernel: str, backend: backends.Backend, positions: list[int], params: list, mults: list):
        self.kernel = kernel
        self.backend = backend
        self.positions = positions  # indices into the plan's stepped params
        self.grad_index: list[int] = []  # indices into group["params"] (and so into the gradients)
        self.grad_layout: list = []  # (dtype, contiguous) of each gradient the backend was chosen for
        self.params = params  # local tensors (elementwise kernels: complex as real, dense as flat)
        self.originals = params  # the local tensors themselves
        self.viewed: list[bool] | None = None  # per position: params[k] is a view of originals[k]
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
    dict and its params list (add_param_group, load_state_dict and in-place edits of the list), the
    optimizer's state mapping (load_state_dict replaces it; entries created or removed), the muP
    records, the group options that enter multipliers or routing (``_plan_options``), the
    requested backend and ``MUPOPT_BACKEND``, which params have a gradient, and the storage of
    every param (``data_ptr`` of the local tensor: ``p.data = ...``, ``model.to(...)``). A change
    of hyperparameters (lr, betas, ...) is read at every step and needs no new plan. Not
    noticed: a state tensor replaced by hand inside an existing state dict.
    """

    __slots__ = ("key", "refs", "params", "locals", "ptrs", "stepped", "segments", "distributed", "state_len")

    def __init__(self, key, refs, params, locals_, stepped, segments, distributed):
        self.key = key
        self.refs = refs  # the objects whose ids are in the key, held so that no id is reused
        self.params = params  # group params with a gradient (as the user holds them)
        self.locals = locals_  # their local tensors
        self.ptrs = tuple(map(_DATA_PTR, locals_))
        self.stepped = stepped  # their positions in group["params"]
        self.segments = segments
        self.distributed = distributed
        self.state_len = -1


_DATA_PTR = torch.Tensor.data_ptr


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
    _PICKLED: ClassVar[tuple[str, ...]] = ("backend",)

    def __init__(self, params, defaults: dict, *, backend: str = "auto"):
        backends.check_name(self.rule, backend)
        self.backend = backend
        defaults.setdefault("wd_mode", "independent")
        defaults.setdefault("scale_eps", False)
        self._check_group(defaults)
        super().__init__(params, defaults)

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
        check(isinstance(group.get("maximize", False), bool), f"maximize must be a bool, got {group.get('maximize')!r}")

    def add_param_group(self, param_group: dict) -> None:
        self.__dict__.pop("_plan_cache", None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            for p in group["params"]:
                if p.is_complex() and self.rule not in ELEMENTWISE:
                    raise ValueError(f"{type(self).__name__} does not support complex parameters (shape {tuple(p.shape)})")
            # FSDP2 / tensor parallelism replace Parameter objects after set_base_shapes: get
            # their width info back by module and name (mupopt.mup.recover_width_infos).
            recover_width_infos(group["params"])
            # Width info travels in the group (and so in the state_dict): one record per param.
            group["mup"] = [None if (w := width_info(p)) is None else w.as_dict() for p in group["params"]]
            self._check_width_consistency()
        except Exception:
            self.param_groups.pop()
            raise

    def _check_width_consistency(self) -> None:
        """All params carry width info, or none: a mix means muP was set up on part of a model."""
        records = [(g, i) for g in self.param_groups for i in range(len(g["params"]))]
        have = [g["mup"][i] is not None for g, i in records]
        if any(have) and not all(have):
            g, i = records[have.index(False)]
            names = g.get("param_names")
            name = names[i] if names else name_in_models(g["params"][i])
            label = repr(name) if name else f"of shape {tuple(g['params'][i].shape)}"
            raise MupError(
                f"parameter {label} has no muP width information while others have: call "
                f"mupopt.set_base_shapes on the whole model (or clear_base_shapes to train without muP)"
            )

    def width_infos(self, group: dict) -> list[WidthInfo | None]:
        return [None if r is None else WidthInfo.from_dict(r) for r in group["mup"]]

    def group_multipliers(self, group: dict) -> list[Multipliers]:
        options = self._rule_options(group)
        return [multipliers(self.rule, info, **options) for info in self.width_infos(group)]

    def mup_summary(self) -> str:
        """One row per parameter: name, shape, role, m_in, m_out, lr multiplier, weight decay."""
        rows = []
        for gi, group in enumerate(self.param_groups):
            infos = self.width_infos(group)
            # Plain parameters (no param_names): the names set_base_shapes saw, else positions.
            names = group.get("param_names") or [
                info.name if info is not None and info.name else f"group{gi}.param{i}" for i, info in enumerate(infos)
            ]
            for name, p, info, m in zip(names, group["params"], infos, self.group_multipliers(group)):
                rows.append((name, tuple(p.shape), info, m, decay_rule(self.rule, m)))
        used = self.selected_backends
        ran = "; ".join(f"group {gi}: " + ", ".join(f"{k} on {v}" for k, v in u.items()) for gi, u in enumerate(used) if u)
        return format_table(rows) + "\nbackends at the last step: " + (ran or f"none yet (requested: {self.backend!r})")

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
        # An optimizer pickled by a mupopt without __getstate__ (torch's: no backend) loads with
        # the default backend.
        self.__dict__.setdefault("backend", "auto")
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
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this class or of its torch counterpart.

        Group keys the saved dict lacks (a torch.optim.AdamW state_dict has no muP records) keep
        this optimizer's current values; saved muP records win, so a resume needs no base model.
        A different number of param groups, or of params in a group, raises ValueError naming
        both counts. Step counts of any type (int, float, int64 or float64 tensor) load as
        float32 tensors. Entries of ``_state_dtypes`` (Shampoo's L, R and roots) are not cast
        to the param's dtype, as torch would cast them, but to their own dtype (float32): a
        bf16 model resumes with its statistics intact. (torch's per-value cast is
        ``Optimizer._process_value_according_to_param_policy``, called through the class
        Optimizer, so a subclass cannot override it; the entries are passed through it wrapped.)

        Load pre-hooks (``register_load_state_dict_pre_hook``) run first, on the dict as given,
        as in torch: a hook that adapts a state_dict saved for other params does so before any
        of the checks above.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
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
        state_dict = self._loaded_state(state_dict)
        if self._state_dtypes:
            kept = {}
            for pid, st in state_dict["state"].items():
                if isinstance(st, dict) and any(k in self._state_dtypes for k in st):
                    kept[pid] = {k: _KeepDtype(v, self._state_dtypes[k]) if k in self._state_dtypes else v for k, v in st.items()}
            if kept:
                state_dict = {**state_dict, "state": {**state_dict["state"], **kept}}
        groups = [dict(g) for g in saved_groups]
        for saved, current in zip(groups, self.param_groups):
            for key, value in current.items():
                if key not in ("params", "param_names"):
                    saved.setdefault(key, value)
            check(len(saved["mup"]) == len(saved["params"]), "state_dict: muP records do not match the params")
            for record in saved["mup"]:
                if record is not None:
                    WidthInfo.from_dict(record)
            self._check_group({**saved, "params": current["params"]})  # saved params are indices
        # The pre-hooks have run: torch's load_state_dict must not run them a second time.
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "param_groups": groups})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
        self.__dict__.pop("_plan_cache", None)  # new groups and state: every plan is stale

    def _loaded_state(self, state_dict: dict) -> dict:
        """A subclass's own checkpoint form turned into its state (Shampoo's blocks), after the
        pre-hooks and the count checks; never modifies ``state_dict``."""
        return state_dict

    # -- the step ------------------------------------------------------------------------------
    def _plan_options(self, group: dict) -> tuple:
        """Group values that change multipliers or routing (part of the plan's key)."""
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
            kernel, id(group), id(group["params"]), len(group["params"]), id(self.state), id(group.get("mup")),
            self._plan_options(group), bool(group.get("capturable", False)), self.backend,
            os.environ.get(backends.ENV_VAR), tuple(stepped),
        )
        plan = cache.get((id(group), kernel))
        if plan is not None and plan.key == key:
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
            if seg_kernel in ELEMENTWISE and any(map(needs_view, originals)):
                viewed = [needs_view(t) for t in originals]
            views = viewed_like(originals, originals, viewed)
            grad_views = viewed_like(seg_grads, originals, viewed)
            for backend, chosen in self._select(seg_kernel, views, grad_views, [params[k] for k in positions],
                                                originals, viewed, bool(group.get("capturable", False))):
                pos = [positions[k] for k in chosen]
                seg = Segment(seg_kernel, backend, pos, [views[k] for k in chosen], [mults_all[stepped[k]] for k in pos])
                seg.originals = [originals[k] for k in chosen]
                seg.viewed = None if viewed is None else [viewed[k] for k in chosen]
                seg.collectives = self._collectives(seg_kernel, [params[k] for k in pos]) if distributed else {}
                seg.grad_index = [stepped[k] for k in pos]
                seg.own_grads = not distributed and seg.viewed is None
                seg.grad_layout = [(grad_views[k].dtype, grad_views[k].is_contiguous()) for k in chosen]
                segments.append(seg)
        refs = (group, group["params"], self.state, group.get("mup"))
        return GroupPlan(key, refs, params, locals_, stepped, segments, distributed)

    def _select(self, kernel: str, params: list, grads: list, global_params: list, originals: list,
                viewed: list | None, capturable: bool = False):
        """[(backend, positions)]: the backend of every tensor. An explicit backend steps all or
        raises; ``auto`` takes the best backend that can step the whole list, else the best one
        per tensor (a strided or fp64 tensor falls back alone, not its whole group), and warns
        once per optimizer when a faster backend for this device could not run. ``params`` and
        ``grads`` are what the backend will see (views of ``originals`` where ``viewed``)."""
        if not params:
            return []
        requested = self.backend
        if requested == "auto":
            requested = os.environ.get(backends.ENV_VAR, "auto") or "auto"
        states = [self.state.get(p) for p in global_params]
        for i, (p, st) in enumerate(zip(originals, states)):
            for k, v in (st or {}).items():
                if isinstance(v, torch.Tensor) and v.ndim and local(v).shape != p.shape:
                    raise RuntimeError(
                        f"{type(self).__name__}: state {k!r} of a parameter of shape {tuple(p.shape)} has shape "
                        f"{tuple(local(v).shape)} (a state_dict of another model?); nothing was changed"
                    )
        flags = viewed or [False] * len(params)
        tensors_of = [[p, g, *(elementwise_view(same_layout(local(v), o)) if f else local(v)
                               for v in (st or {}).values() if isinstance(v, torch.Tensor) and v.ndim)]
                      for p, g, st, o, f in zip(params, grads, states, originals, flags)]
        everything = [t for ts in tensors_of for t in ts]
        backends.check_name(kernel, requested)
        if requested != "auto":
            backend = backends.get(kernel, requested)
            reason = backend.reason(everything)
            if reason is None and capturable and not backend.capturable:
                reason = "it does not support capturable=True (backends that do: " + ", ".join(
                    n for n in backends.names(kernel) if backends.get(kernel, n).capturable) + ")"
            if reason is not None:
                raise RuntimeError(f"{type(self).__name__}: backend {requested!r} cannot step these {kernel} tensors: {reason}")
            return [(backend, list(range(len(params))))]
        candidates = [backends.get(kernel, n) for n in backends.names(kernel)]
        if capturable:
            candidates = [b for b in candidates if b.capturable]
        if candidates[0].reason(everything) is None:  # the common case: the best one takes all
            return [(candidates[0], list(range(len(params))))]
        # Else the best backend per tensor: one fp16 or strided tensor falls back alone.
        chosen: dict[str, tuple[backends.Backend, list[int]]] = {}
        for i, ts in enumerate(tensors_of):
            refused = []
            for backend in candidates:
                reason = backend.reason(ts)
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

    def _create_state(self, group: dict, plan: GroupPlan) -> None:
        """Create missing state (lazily, as torch), then give each segment its local state views."""
        if plan.state_len == len(self.state) and all(seg.states is not None for seg in plan.segments):
            return
        for p in plan.params:
            if len(self.state[p]) == 0:
                self.state[p].update(self._init_state(p, group))
        for seg in plan.segments:
            states = [self.state[plan.params[k]] for k in seg.positions]
            if plan.distributed:
                states = [local_state(st) for st in states]
            if seg.viewed is not None:
                states = [_view_state(st, o) if v else st for st, o, v in zip(states, seg.originals, seg.viewed)]
            seg.states = states
            seg.bound = None
        plan.state_len = len(self.state)

    def _check_data(self, plans: list) -> None:
        """Checks of this step's values that run after the found_inf decision (Shampoo's
        non-finite gradients); may raise, writes nothing."""

    def _call(self, seg: Segment, grads: list, hp, *, prepare: bool, found_inf: torch.Tensor | None = None):
        """Step one segment with its backend. prepare=True and a two-phase backend
        (``Backend.prepare``): only prepare, and return the commit; otherwise step, return None.

        A backend with ``bind`` (the C++ backends) is bound once per plan and state (its
        validated tensor tables kept in C++) and then called with this step's gradients only;
        not with collectives (LAMB's norm_reduce), which need the unbound two-call form, and not
        under torch.compile, which traces the unbound ops (they have fake kernels). ``found_inf``
        (capturable groups) goes to the backend, which skips on the device."""
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
        try:
            return fn(seg.params, grads, seg.states, seg.mults, hp, **kwargs)
        except (RuntimeError, NotImplementedError) as exc:
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients") from exc
            raise

    def _run(self, kernel: str | None = None, extra: dict | None = None, _retry: bool = False) -> None:
        """One step of every param group with the backend(s) of ``kernel`` (default: this
        optimizer's rule); ``extra`` keyword arguments go to _hparams.

        Order, so that nothing is written before everything that can fail has been checked:
        hyperparameters of every group; every group's plan (gradients, backend choice, state
        shapes); GradScaler's found_inf (skip: nothing created or written); state creation;
        data checks and the prepare phase of two-phase backends (Shampoo's roots) for every group;
        then the writes. In a distributed run the ranks agree on the outcome of the prepare phase
        before any writes (one all-reduce), so a failure on one rank stops every rank."""
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
        for group, plan, _ in work:
            self._create_state(group, plan)
        segments = []
        # One backend call validates its own inputs before writing (Backend.validates); with
        # several calls in this step, a gradient that would make a later one fail must be found
        # before the first one writes: then every gradient is checked here.
        several = sum(len(plan.segments) for _, plan, _ in work) > 1
        for group, plan, grads in work:
            for seg in plan.segments:
                seg_grads = [grads[i] for i in seg.grad_index]
                if plan.distributed:
                    seg_grads = [local_grad(plan.params[k], g) for k, g in zip(seg.positions, seg_grads)]
                seg_grads = viewed_like(seg_grads, seg.originals, seg.viewed)
                full = several or not seg.backend.validates
                if _check_grads(type(self).__name__, seg, seg_grads, full=full) and not _retry:
                    # A gradient's dtype or layout changed since the backend was chosen: choose again.
                    self.__dict__.pop("_plan_cache", None)
                    return self._run(kernel, extra, _retry=True)
                segments.append((group, seg, seg_grads))
        calls, failure = [], None
        try:
            self._check_data([plan for _, plan, _ in work])
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
            failure = exc
        if failure is None:
            for group, seg, seg_grads in segments:
                # A prepare phase that exchanges data (Shampoo's sharded matrices) runs on every
                # rank even after an earlier segment failed on this one, so that no other rank
                # waits in it; its result is dropped.
                if failure is not None and not (seg.backend.prepare is not None and seg.collectives):
                    continue
                try:
                    hp = self._hparams_for(seg.kernel, group, extra)
                    if seg.backend.prepare is not None:
                        calls.append(self._call(seg, seg_grads, hp, prepare=True))
                    else:
                        calls.append(functools.partial(self._call, seg, seg_grads, hp, prepare=False,
                                                       found_inf=device_found_inf))
                except Exception as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
                    failure = failure or exc
        # Only a step whose outcome depends on this rank's data (a prepare phase, data checks:
        # Shampoo's roots and finiteness) can fail on one rank alone; others pay no collective.
        may_diverge = type(self)._check_data is not MupOptimizer._check_data or any(
            seg.backend.prepare is not None for _, plan, _ in work for seg in plan.segments)
        if may_diverge and any(plan.distributed for _, plan, _ in work) and _distributed_ready():
            failure = _agree(failure, type(self).__name__)
        if failure is not None:
            raise failure
        for call in calls:
            if call is not None:
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


def _check_grads(name: str, seg: Segment, grads: list, *, full: bool) -> bool:
    """With ``full``: raise for a sparse gradient (no backend steps one) or one of another shape
    than its parameter's, and return True when a gradient's dtype or contiguity is not the one
    the segment's backend was chosen for (the caller then plans again). Without (a single call
    of a validating backend): nothing here; _call names a sparse gradient if the backend refuses
    one (a C++ op is not even dispatched for it)."""
    if not full:
        return False
    _refuse_bad_grads(name, seg.params, grads)
    return any(g.dtype != dtype or g.is_contiguous() != contiguous for g, (dtype, contiguous) in zip(grads, seg.grad_layout))


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
