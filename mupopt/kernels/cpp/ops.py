"""Thin wrappers: the registry's functional signature ``fn(params, grads, states, mults, hp)``
turned into one ``torch.ops.mupopt`` call per param group (the ops: ``csrc/bindings.cpp``).

The op receives the states' tensors (their "step" included: it increments them, in float32, as
the reference does), each tensor's muP multipliers and the group's hyperparameters, and forms
every per-tensor scalar itself in float64 with the reference's expressions (``csrc/prepare.h``):
no per-tensor Python work beyond building the argument lists (the step bookkeeping in Python
cost 1.6 us per tensor: 250 us per step for 150 tensors, measured). GradScaler arguments are
passed as None for now (the optimizer classes skip a step with found_inf themselves).
"""
from __future__ import annotations

from typing import Sequence

import torch


def _require(tensors: Sequence[torch.Tensor]) -> None:
    """Load the library these tensors need (once); raise with the build's reason otherwise.
    The first tensor decides: the op itself rejects a list spread over devices."""
    from . import build  # not at import time: `python -m mupopt.kernels.cpp.build` runs it as __main__

    cuda = tensors[0].is_cuda
    outcome = build.load_cuda() if cuda else build.load_cpu()
    if outcome is not True:
        raise RuntimeError(f"backend {'cuda' if cuda else 'cpu'!r} is unavailable: {outcome}")


def _lists(states: Sequence[dict], *keys: str) -> list[list[torch.Tensor]]:
    return [[st[k] for st in states] for k in keys]


def adamw(params, grads, states, mults, hp) -> None:
    """AdamW step (see mupopt.optim.adamw.adamw_reference)."""
    if not params:
        return
    _require(params)
    exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
    torch.ops.mupopt.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, _lists(states, "max_exp_avg_sq")[0] if hp.amsgrad else [], steps,
        [m.lr for m in mults], [m.wd for m in mults], [m.eps for m in mults],
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps,
        amsgrad=hp.amsgrad, maximize=hp.maximize, grad_scale=None, found_inf=None,
    )


def adopt(params, grads, states, mults, hp) -> None:
    """ADOPT step (see mupopt.optim.adopt.adopt_reference)."""
    if not params:
        return
    _require(params)
    exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
    torch.ops.mupopt.adopt_(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        [m.lr for m in mults], [m.wd for m in mults], [m.eps for m in mults],
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps,
        maximize=hp.maximize, grad_scale=None, found_inf=None,
    )


def lamb(params, grads, states, mults, hp, *, norm_reduce=None) -> None:
    """LAMB step (see mupopt.optim.lamb.lamb_reference). No decay multiplier: the decay is in u.

    ``norm_reduce`` None: one op (``lamb_``; on the CPU the cache-blocked two passes). Else two:
    ``lamb_partials_`` (moments, steps and the per-tensor sums [N, 2]), ``norm_reduce`` once,
    ``lamb_apply_`` with the reduced sums: two passes over the whole list."""
    if not params:
        return
    _require(params)
    exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
    args = (params, grads, exp_avgs, exp_avg_sqs, steps, [m.lr for m in mults], [m.eps for m in mults])
    kwargs = dict(
        lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps,
        clamp_value=hp.clamp_value, maximize=hp.maximize, grad_scale=None, found_inf=None,
    )
    if norm_reduce is None:
        torch.ops.mupopt.lamb_(*args, **kwargs)
        return
    from ...optim.lamb import reduce_norm_sums

    partials = torch.ops.mupopt.lamb_partials_(*args, **kwargs)
    sums = reduce_norm_sums(norm_reduce, partials)
    torch.ops.mupopt.lamb_apply_(*args, sums, **kwargs)


def sophia(params, grads, states, mults, hp) -> None:
    """SophiaG step (see mupopt.optim.sophia.sophia_reference)."""
    if not params:
        return
    _require(params)
    exp_avgs, hessians, steps = _lists(states, "exp_avg", "hessian", "step")
    torch.ops.mupopt.sophia_(
        params, grads, exp_avgs, hessians, steps, [m.lr for m in mults], [m.wd for m in mults],
        lr=hp.lr, beta1=hp.beta1, rho=hp.rho, bs=hp.bs, weight_decay=hp.weight_decay,
        maximize=hp.maximize, grad_scale=None, found_inf=None,
    )


def sophia_hessian(params, grads, states, mults, hp) -> None:
    """Hessian EMA h = b2*h + (1-b2)*g*g (see mupopt.optim.sophia.sophia_hessian_reference)."""
    if not params:
        return
    _require(params)
    torch.ops.mupopt.sophia_hessian_(
        grads, [st["hessian"] for st in states], beta2=hp.beta2, grad_scale=None, found_inf=None
    )


FUNCTIONS = {
    "adamw": adamw,
    "adopt": adopt,
    "lamb": lamb,
    "sophia": sophia,
    "sophia_hessian": sophia_hessian,
}
