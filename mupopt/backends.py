"""The backend registry: which implementation computes an optimizer's step.

A backend computes, it never defines behaviour: every backend of an optimizer implements the same
functional signature ``fn(params, grads, states, mults, hp)`` and passes the same contract tests
against the ``reference`` backend (pure PyTorch, one tensor at a time: the executable spec).

Choice: the explicit ``backend=`` argument, else the ``MUPOPT_BACKEND`` environment variable, else
the highest-priority backend that can run on the given tensors. An explicit request that cannot
run raises; only an automatic choice falls back.

Gradient scaling (``torch.amp.GradScaler``): every mupopt optimizer takes the scaler's
``grad_scale`` / ``found_inf`` itself (see :mod:`mupopt.optim._base`). The skip on ``found_inf``
is done there for every backend. A backend registered with ``amp_scaling=True`` is called as
``fn(..., hp, inv_grad_scale=t)`` when the gradients carry a scale: ``t`` is a one-element float32
tensor (1/scale, formed as GradScaler.unscale_ forms it), the backend multiplies each gradient by
it in float32 before use and stores the unscaled gradient back into the gradient tensor (what
torch's fused AdamW leaves in ``p.grad``). For any other backend the base class unscales the
gradients in place before the call, so ``fn`` sees plain gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

ENV_VAR = "MUPOPT_BACKEND"


def _always(tensors: Sequence[torch.Tensor]) -> str | None:
    return None


# The only tensor types a backend steps: plain tensors and Parameters wrapping them. A wrapper
# subclass (DTensor, a tensor-parallel or FSDP shard, FakeTensor) has no storage of its own
# (data_ptr() is 0 for a DTensor), so a kernel handed one would read address 0. Distributed
# tensors are turned into their local shards above the backends (mupopt/optim/_placement.py).
PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def subclass_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why ``tensors`` cannot go to any backend (a tensor subclass among them), or None."""
    for i, t in enumerate(tensors):
        if type(t) not in PLAIN_TENSOR_TYPES:
            return (
                f"tensor {i} is a {type(t).__name__}, a tensor subclass: backends step plain tensors "
                f"(the optimizer hands them each DTensor's local shard)"
            )
    return None


@dataclass(frozen=True)
class Backend:
    optimizer: str
    name: str
    fn: Callable
    # auto picks the highest priority that can run; the reference is 0.
    priority: int = 0
    # None when the backend can step these tensors, else the reason it cannot.
    unsupported_reason: Callable[[Sequence[torch.Tensor]], "str | None"] = _always
    # True: fn takes the keyword inv_grad_scale and unscales the gradients itself (module docstring).
    amp_scaling: bool = False
    # Two-phase backends (Shampoo): prepare(same arguments as fn) does everything that can fail
    # and writes nothing, and returns the rest of the step as a callable that only writes; fn
    # is prepare(...)(). The optimizer prepares every param group before committing any.
    prepare: "Callable | None" = None
    # Device types this backend is made for (None: any). ``auto`` warns when it passes over a
    # faster backend made for the tensors' device (mupopt.optim._base, BackendFallbackWarning).
    devices: "tuple[str, ...] | None" = None
    # True: fn checks every tensor it is handed (type, shape, dtype, device, layout) before it
    # writes anything, so the optimizer need not check the gradients again at every step.
    validates: bool = False
    # True: fn takes hp.capturable (step counts on the params' device, bias corrections as
    # device tensors) and the keyword found_inf (GradScaler's, skipped on the device), so a
    # capturable=True group's step reads nothing on the host. Others are not chosen for one.
    capturable: bool = False
    # Optional: bind(params, states, mults) checks once what stays fixed between steps (the
    # tensors, devices, dtypes, shapes, layouts, step tensors, multipliers) and returns
    # step(grads, hp), which checks the gradients and then does what fn(params, grads, states,
    # mults, hp) does. Bind again when a param or state tensor object changes.
    bind: "Callable | None" = None
    # The state formats fn steps (state_bits, mupopt.optim._lean_states): 32, states in their
    # param's dtype; 16, bfloat16 states of params of another dtype; 8, block-quantized states.
    # A backend is not chosen for a tensor whose states are in another format: ``auto`` falls
    # back per tensor (BackendFallbackWarning), an explicit request raises.
    state_bits: tuple = (32,)
    # True: fn steps ``hp.kahan_summation`` (bfloat16 / float16 params with a compensation,
    # state["param_compensation"]: mupopt/storage.py), or stores no param (SophiaG's Hessian EMA).
    # A backend without it is not chosen for such a param: ``auto`` falls back per tensor
    # (BackendFallbackWarning), an explicit request raises, as for state_bits.
    kahan_summation: bool = False

    def reason(self, tensors: Sequence[torch.Tensor]) -> str | None:
        """None when this backend can step ``tensors``, else why not: a tensor subclass (every
        backend refuses them, :func:`subclass_reason`), then the backend's own reason."""
        return subclass_reason(tensors) or self.unsupported_reason(tensors)


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(backend: Backend) -> Backend:
    table = _REGISTRY.setdefault(backend.optimizer, {})
    if backend.name in table:
        raise ValueError(f"backend {backend.name!r} already registered for {backend.optimizer!r}")
    table[backend.name] = backend
    return backend


def names(optimizer: str) -> list[str]:
    """Registered backends of ``optimizer``, best first."""
    table = _REGISTRY.get(optimizer, {})
    return sorted(table, key=lambda n: -table[n].priority)


def get(optimizer: str, name: str) -> Backend:
    """The registered backend ``name`` of ``optimizer`` (KeyError if there is none)."""
    return _REGISTRY[optimizer][name]


def check_name(optimizer: str, requested: str) -> None:
    """Raise ValueError for a backend name that is neither "auto" nor registered."""
    if requested != "auto" and requested not in _REGISTRY.get(optimizer, {}):
        raise ValueError(
            f"backend {requested!r} is not available for {optimizer}; available: "
            f"{['auto', *names(optimizer)]}"
        )


def select(optimizer: str, requested: str, tensors: Sequence[torch.Tensor]) -> Backend:
    """The backend that steps ``tensors`` (see the module docstring for the order)."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    check_name(optimizer, requested)
    table = _REGISTRY[optimizer]
    if requested != "auto":
        backend = table[requested]
        reason = backend.reason(tensors)
        if reason is not None:
            raise RuntimeError(f"backend {requested!r} cannot step these {optimizer} tensors: {reason}")
        return backend
    for name in names(optimizer):
        if table[name].reason(tensors) is None:
            return table[name]
    raise RuntimeError(f"no backend of {optimizer} can step these tensors")
