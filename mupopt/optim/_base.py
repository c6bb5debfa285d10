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
  state is created, and ``p.grad`` is left as it is. Deciding that costs a host read of
  found_inf in ``_gather``: one per param group with gradients. The first waits for the GPU work
  queued before it (the backward): a host synchronisation, the one GradScaler's own unfused path
  pays in ``_maybe_opt_step``; later groups find the value ready. Step counts and bias
  corrections live on the host (kernels/triton/_common.py), so a device-side skip would not save
  that synchronisation without moving them to the device.
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

import math
import numbers
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch.optim import Optimizer

from .. import backends
from ..mup import MupError, Multipliers, WidthInfo, multipliers, width_info, format_table, decay_rule, WD_MODES


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
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def check_lr(lr) -> None:
    check(is_number(lr) and float(lr) >= 0.0, f"Invalid learning rate: {lr}")


def check_betas(betas, count: int = 2) -> None:
    check(isinstance(betas, (tuple, list)) and len(betas) == count, f"Invalid betas: {betas} (expected {count} values)")
    for i, b in enumerate(betas):
        check(is_number(b) and 0.0 <= float(b) < 1.0, f"Invalid beta parameter at index {i}: {b}")


def check_eps(eps) -> None:
    check(is_number(eps) and float(eps) >= 0.0, f"Invalid epsilon value: {eps}")


def check_weight_decay(wd) -> None:
    check(is_number(wd) and float(wd) >= 0.0, f"Invalid weight_decay value: {wd}")


def fp32(t: torch.Tensor) -> torch.Tensor:
    """t itself when it is float32 (so in-place math updates it), else a float32 copy."""
    return t if t.dtype == torch.float32 else t.float()


def store(t: torch.Tensor, t32: torch.Tensor) -> None:
    """Write the float32 result back to lower-precision storage (no-op when t is t32)."""
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


class Work(NamedTuple):
    """One group's prepared step: params with a gradient, grads, their indices, multipliers."""

    params: list
    grads: list
    index: list
    mults: list


class MupOptimizer(Optimizer):
    """Base of the mupopt optimizers (not used directly)."""

    rule: ClassVar[str]
    # torch.amp.GradScaler: hand grad_scale / found_inf to step() (module docstring).
    _step_supports_amp_scaling = True

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
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_group(group)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters (shape {tuple(p.shape)})")
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
            label = repr(names[i]) if names else f"of shape {tuple(g['params'][i].shape)}"
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
        return format_table(rows)

    # -- state_dict ------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this class or of its torch counterpart.

        Group keys the saved dict lacks (a torch.optim.AdamW state_dict has no muP records) keep
        this optimizer's current values; saved muP records win, so a resume needs no base model.
        """
        groups = [dict(g) for g in state_dict["param_groups"]]
        for saved, current in zip(groups, self.param_groups):
            for key, value in current.items():
                if key not in ("params", "param_names"):
                    saved.setdefault(key, value)
            check(len(saved["mup"]) == len(saved["params"]), "state_dict: muP records do not match the params")
            for record in saved["mup"]:
                if record is not None:
                    WidthInfo.from_dict(record)
            self._check_group({**saved, "params": current["params"]})  # saved params are indices
        super().load_state_dict({**state_dict, "param_groups": groups})

    # -- the step ------------------------------------------------------------------------------
    def _gather(self, group: dict) -> Work:
        """Params with a gradient, their gradients, indices in the group and multipliers.

        Raises on bad input; called for every group before any group is stepped."""
        self._check_group(group)
        params, grads, index = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if p.grad.shape != p.shape:
                raise RuntimeError(f"gradient of shape {tuple(p.grad.shape)} for a parameter of shape {tuple(p.shape)}")
            params.append(p)
            grads.append(p.grad)
            index.append(i)
        mults = self.group_multipliers(group)
        if params and self._found_inf():
            return Work([], [], [], [])  # GradScaler found inf/nan: step nothing (module docstring)
        return Work(params, grads, index, [mults[i] for i in index])

    def _found_inf(self) -> bool:
        """Whether GradScaler's found_inf (set only during its step) is nonzero: a host read."""
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.any())

    def _call(self, kernel: str, group: dict, params, grads, mults, hp, *, prepare: bool = False):
        """Create missing state, then step ``params`` with the selected backend of ``kernel``.
        prepare=True and a two-phase backend (``Backend.prepare``): only prepare, and return the
        commit; otherwise step and return None."""
        if not params:
            return None
        states = []
        for p in params:
            if len(self.state[p]) == 0:
                self.state[p].update(self._init_state(p, group))
            states.append(self.state[p])
        backend = backends.select(kernel, self.backend, [*params, *grads])
        fn = backend.prepare if prepare and backend.prepare is not None else backend.fn
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            return fn(params, grads, states, mults, hp)
        # As GradScaler.unscale_: the reciprocal in float64 (MPS has none), rounded once to
        # float32; a device op, no host read.
        scale = grad_scale.reshape(())
        inv_grad_scale = scale.reciprocal().float() if scale.device.type == "mps" else scale.double().reciprocal().float()
        if backend.amp_scaling:
            return fn(params, grads, states, mults, hp, inv_grad_scale=inv_grad_scale)
        unscale_(grads, inv_grad_scale)
        return fn(params, grads, states, mults, hp)

    def _run(self, kernel: str | None = None, extra: dict | None = None) -> None:
        """Validate every group, then call the backend of ``kernel`` (default: this optimizer's
        rule) once per group; extra keyword arguments go to _hparams. Two-phase backends (Shampoo)
        prepare every group before any group is written, so a failure in a later group (a root
        that does not converge) leaves the earlier ones as they were."""
        work = [(group, self._gather(group)) for group in self.param_groups]
        commits = [self._call(kernel or self.rule, group, w.params, w.grads, w.mults,
                              self._hparams(group, **(extra or {})), prepare=True)
                   for group, w in work]
        for commit in commits:
            if commit is not None:
                commit()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform a single optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run()
        return loss
