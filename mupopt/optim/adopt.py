"""ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2", arXiv 2411.02853)
with per-tensor muP multipliers.

Reference: the official implementation, PyPI ``torch-adopt`` (``adopt.ADOPT``) with
``decouple=True`` and its default clipping ``clip_lambda(s) = s**0.25``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends
from . import _lean_states as lean
from ..storage import load_param, store_param
from ._base import (MupOptimizer, check, check_adam_hparams, check_implementation_flags, compute_dtype, new_step,
                    skip_on_found_inf, store, upcast)


@dataclass(frozen=True)
class ADOPTHparams:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool
    capturable: bool = False
    stochastic_rounding: bool = False  # param stores (mupopt/storage.py)
    kahan_summation: bool = False  # compensated param stores (mupopt/storage.py)


def adopt_reference(params, grads, states, mults, hp: ADOPTHparams) -> None:
    """One ADOPT step, one tensor at a time, float32 math (float64 for float64 params). s = step
    count before increment::

        s == 0:  v = g^2                                   (no parameter update)
        s >= 1:  p *= 1 - lr*wd*wd_mult
                 n = clamp(g / max(sqrt(v), eps*eps_mult), -s**0.25, s**0.25)
                 m = b1*m + (1-b1)*n
                 p -= lr*lr_mult * m
                 v = b2*v + (1-b2)*g^2

    v is updated after it normalises g: the decorrelation that is ADOPT's point. The decay is
    written p += -lr*wd*p, the operation order of torch-adopt, so fp32 results agree bit for bit.
    """
    for p, g, st, m in zip(params, grads, states, mults):
        if hp.capturable or torch.compiler.is_compiling():  # compiling: no branch on a value
            _adopt_capturable(p, g, st, m, hp)
            continue
        s = st["step"].item()
        st["step"] += 1
        cd = compute_dtype(p)
        g32 = -upcast(g, cd) if hp.maximize else upcast(g, cd)
        v32 = upcast(st["exp_avg_sq"], cd)
        if s == 0:
            v32.addcmul_(g32, g32)
            store(st["exp_avg_sq"], v32)
            continue
        p32, m32 = load_param(p, cd, st, hp.kahan_summation), upcast(st["exp_avg"], cd)
        p32.add_(p32, alpha=-hp.lr * hp.weight_decay * m.wd)
        normed = g32.div(torch.clamp(v32.sqrt(), hp.eps * m.eps))
        clip = s**0.25
        normed.clamp_(-clip, clip)
        m32.lerp_(normed, 1 - hp.beta1)
        p32.add_(m32, alpha=-hp.lr * m.lr)
        v32.mul_(hp.beta2).addcmul_(g32, g32, value=1 - hp.beta2)
        store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation), store(st["exp_avg"], m32), store(st["exp_avg_sq"], v32)


def _adopt_capturable(p, g, st, m, hp: ADOPTHparams) -> None:
    """The same step with the step count read on its device: both branches computed, the first
    step's (v = g^2 only) selected where s == 0, so no host read decides between them."""
    s = st["step"].clone()
    st["step"] += 1
    first = s == 0
    cd = compute_dtype(p)
    g32 = -upcast(g, cd) if hp.maximize else upcast(g, cd)
    p32, m32, v32 = load_param(p, cd, st, hp.kahan_summation), upcast(st["exp_avg"], cd), upcast(st["exp_avg_sq"], cd)
    decayed = p32.add(p32, alpha=-hp.lr * hp.weight_decay * m.wd)
    normed = g32.div(torch.clamp(v32.sqrt(), hp.eps * m.eps))
    clip = s.pow(0.25).to(normed.dtype)
    normed = torch.minimum(torch.maximum(normed, -clip), clip)
    m_new = m32.lerp(normed, 1 - hp.beta1)
    p_new = decayed.add_(m_new, alpha=-hp.lr * m.lr)
    v_new = v32.mul(hp.beta2).addcmul_(g32, g32, value=1 - hp.beta2)
    v_first = v32.addcmul(g32, g32)
    p32.copy_(torch.where(first, p32, p_new))
    m32.copy_(torch.where(first, m32, m_new))
    v32.copy_(torch.where(first, v_first, v_new))
    store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation), store(st["exp_avg"], m32), store(st["exp_avg_sq"], v32)


ADOPT_STATES = {"exp_avg": lean.SIGNED, "exp_avg_sq": lean.UNSIGNED}  # what state_bits stores (_lean_states)

backends.register(backends.Backend(
    "adopt", "reference", skip_on_found_inf(lean.reference(adopt_reference, ADOPT_STATES, elementwise=True)),
    capturable=True, state_bits=lean.STATE_BITS, kahan_summation=True))


class ADOPT(MupOptimizer):
    r"""ADOPT with muP (decoupled weight decay, clipping s**0.25), a drop-in for ``adopt.ADOPT``
    constructed with ``decouple=True``.

    Math: see :func:`adopt_reference`. The first step only initialises v = g^2.

    Args:
        params: parameters, named parameters or param groups.
        lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0, maximize: as torch-adopt.
        foreach, fused: accepted and ignored, as in :class:`mupopt.AdamW`; differentiable: only
            False; capturable: as :class:`mupopt.AdamW`. decouple: only True (torch-adopt's
            default is False: pass decouple=True there for the same optimizer).
        wd_mode, scale_eps, stochastic_rounding, kahan_summation, backend, base_shapes, overrides: as :class:`mupopt.AdamW`.
    """

    rule = "adopt"
    _lean_keys = ADOPT_STATES

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decouple: bool = True,
        wd_mode: str = "independent",
        scale_eps: bool = False,
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        backend: str = "auto",
        base_shapes=None,
        overrides=None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
            wd_mode=wd_mode, scale_eps=scale_eps,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            # torch-adopt's switch, True only here (refused otherwise in _check_hparams); recorded
            # so that a state_dict loads into torch-adopt's ADOPT, whose step reads it.
            decouple=decouple,
        )
        defaults["state_bits"] = state_bits
        defaults["stochastic_rounding"] = stochastic_rounding
        defaults["kahan_summation"] = kahan_summation
        super().__init__(params, defaults, backend=backend, base_shapes=base_shapes, overrides=overrides)
        # torch-adopt's implementation switches: accepted and recorded in the groups as it
        # records them; backend= chooses the implementation here (see mupopt.AdamW).
        check_implementation_flags("ADOPT", foreach, fused, differentiable)

    def _check_hparams(self, group: dict) -> None:
        check_adam_hparams(group)  # torch-adopt's checks are torch.optim.Adam's
        check(group.get("decouple", True) is True, "mupopt.ADOPT implements decouple=True only")

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": new_step(p, group), **lean.zeros(p, group, "exp_avg"), **lean.zeros(p, group, "exp_avg_sq")}

    def _hparams(self, group: dict) -> ADOPTHparams:
        b1, b2 = group["betas"]
        return ADOPTHparams(
            float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
            group["maximize"], bool(group.get("capturable", False)),
        )
