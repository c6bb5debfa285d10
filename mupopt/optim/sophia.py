"""SophiaG (Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
Pre-training", arXiv 2305.14342) with per-tensor muP multipliers.

Reference: the official code, PyPI ``sophia-opt`` (``sophia_opt.SophiaG``): the same defaults,
``step(bs=...)``, ``update_hessian()`` and state keys ``step``, ``exp_avg``, ``hessian``.
"""
from __future__ import annotations

import warnings

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import backends
from . import _lean_states as lean
from ..storage import load_param, store_param
from ._base import (MupOptimizer, _caller_stacklevel, check, check_betas, check_lr, check_weight_decay, compute_dtype,
                    is_number, new_step, skip_on_found_inf, store, upcast)

# The official code's guard against h == 0 in |m| / (rho*bs*h + 1e-15): with no Hessian estimate
# the ratio saturates at 1 and the step is sign(m).
HESSIAN_FLOOR = 1e-15


@dataclass(frozen=True)
class SophiaHparams:
    lr: float
    beta1: float
    beta2: float
    rho: float
    weight_decay: float
    bs: float
    maximize: bool
    capturable: bool = False  # no step count enters the math: nothing changes but found_inf's skip
    stochastic_rounding: bool = False  # param stores (mupopt/storage.py)
    kahan_summation: bool = False  # compensated param stores (mupopt/storage.py)


def sophia_reference(params, grads, states, mults, hp: SophiaHparams) -> None:
    """One SophiaG step, one tensor at a time, float32 math (float64 for float64 params)::

        p *= 1 - lr*wd*wd_mult
        m = b1*m + (1-b1)*g
        p -= lr*lr_mult * sign(m) * min(|m| / (rho*bs*h + 1e-15), 1)

    Operation order as sophia-opt, so fp32 results agree bit for bit.
    """
    for p, g, st, m in zip(params, grads, states, mults):
        st["step"] += 1
        cd = compute_dtype(p)
        p32, m32, h32 = load_param(p, cd, st, hp.kahan_summation), upcast(st["exp_avg"], cd), upcast(st["hessian"], cd)
        g32 = -upcast(g, cd) if hp.maximize else upcast(g, cd)
        p32.mul_(1 - hp.lr * hp.weight_decay * m.wd)
        m32.mul_(hp.beta1).add_(g32, alpha=1 - hp.beta1)
        ratio = (m32.abs() / (hp.rho * hp.bs * h32 + HESSIAN_FLOOR)).clamp(None, 1)
        p32.addcmul_(m32.sign(), ratio, value=-hp.lr * m.lr)
        store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation), store(st["exp_avg"], m32)


def sophia_hessian_reference(params, grads, states, mults, hp: SophiaHparams) -> None:
    """Hessian EMA from a GNB gradient: h = b2*h + (1-b2)*g*g (the step count is not touched);
    float32 math, float64 for float64 params."""
    for p, g, st in zip(params, grads, states):
        cd = compute_dtype(p)
        h32 = upcast(st["hessian"], cd)
        g32 = upcast(g, cd)
        h32.mul_(hp.beta2).addcmul_(g32, g32, value=1 - hp.beta2)
        store(st["hessian"], h32)


# What state_bits stores (_lean_states); the Hessian EMA is a non-negative GNB estimate.
SOPHIA_STATES = {"exp_avg": lean.SIGNED, "hessian": lean.UNSIGNED}

backends.register(backends.Backend(
    "sophia", "reference", skip_on_found_inf(lean.reference(sophia_reference, SOPHIA_STATES, elementwise=True)),
    capturable=True, state_bits=lean.STATE_BITS, kahan_summation=True))
# The Hessian EMA's reference decodes and re-stores h only: re-storing exp_avg, which it does not
# change, would not be the identity in format 8 (a block whose largest |m| is negative decodes
# as -0.993*absmax with the signed dynamic map, and re-quantizing shrinks its absmax so).
backends.register(backends.Backend(
    "sophia_hessian", "reference",
    skip_on_found_inf(lean.reference(sophia_hessian_reference, {"hessian": SOPHIA_STATES["hessian"]}, elementwise=True)),
    capturable=True, state_bits=lean.STATE_BITS, kahan_summation=True))


def gnb_backward(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Backward pass of the Gauss-Newton-Bartlett estimator (Sophia, Algorithm 2).

    Labels are sampled from the model's own distribution softmax(logits) (last dim = classes)
    and the mean cross-entropy against them is back-propagated; the squared gradient it leaves in
    ``p.grad`` estimates the Gauss-Newton diagonal. Returns the sampled loss (detached).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(F.softmax(flat.float(), dim=-1), 1, generator=generator).squeeze(-1)
    loss = F.cross_entropy(flat, labels)
    loss.backward()
    return loss.detach()


# sophia-opt's default tokens per batch in SophiaG.step(bs=...).
DEFAULT_BS = 5120


class _DefaultBS:
    """The default of ``SophiaG.step(bs=...)``: sophia-opt's 5120, with a warning. A sentinel, not
    None, so that an explicit ``bs=None`` stays an error as in sophia-opt."""

    def __repr__(self) -> str:
        return f"{DEFAULT_BS} (sophia-opt's default; warns once)"


_DEFAULT_BS = _DefaultBS()


class SophiaG(MupOptimizer):
    r"""SophiaG with muP: a drop-in for ``sophia_opt.SophiaG``.

    Usage, as the official training loop (k = 10 in the paper)::

        loss.backward(); opt.step(bs=tokens_per_batch); opt.zero_grad()
        if it % k == k - 1:
            opt.update_hessian_from_logits(model(x))   # GNB estimate, leaves .grad cleared

    Math: see :func:`sophia_reference`; beta1, beta2 and rho are not width-scaled (docs/mup.md).

    ``step(bs=...)``: the tokens per batch, which scale the clip threshold rho*bs*h. Without it
    the step uses sophia-opt's default, 5120, and warns once per optimizer.

    Args:
        params: parameters, named parameters or param groups.
        lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, maximize: as sophia-opt.
        capturable: as :class:`mupopt.AdamW` (the step count enters no formula here).
        wd_mode, stochastic_rounding, kahan_summation, backend, base_shapes, overrides: as :class:`mupopt.AdamW`.
    """

    rule = "sophia"
    _lean_keys = SOPHIA_STATES
    _no_scale_eps = "its 1e-15 floor is not a tunable epsilon and is never scaled (docs/mup.md, Epsilon)"

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 1e-1,
        *,
        maximize: bool = False,
        capturable: bool = False,
        wd_mode: str = "independent",
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        backend: str = "auto",
        base_shapes=None,
        overrides=None,
    ):
        # sophia-opt's switch, recorded in the groups as it records it; only False here.
        defaults = dict(
            lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, maximize=maximize, wd_mode=wd_mode,
            capturable=capturable,
        )
        defaults["state_bits"] = state_bits
        defaults["stochastic_rounding"] = stochastic_rounding
        defaults["kahan_summation"] = kahan_summation
        super().__init__(params, defaults, backend=backend, base_shapes=base_shapes, overrides=overrides)

    def _check_hparams(self, group: dict) -> None:
        check_lr(group["lr"])
        check_betas(group["betas"])
        check(is_number(group["rho"]) and float(group["rho"]) >= 0.0, f"Invalid rho parameter: {group['rho']}")
        check_weight_decay(group["weight_decay"])

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": new_step(p, group), **lean.zeros(p, group, "exp_avg"), **lean.zeros(p, group, "hessian")}

    def _state_keys(self, group: dict, i: int) -> tuple[str, ...]:
        return ("step", "exp_avg", "hessian")

    def _hparams(self, group: dict, bs: float = 5120) -> SophiaHparams:  # 5120: DEFAULT_BS
        b1, b2 = group["betas"]
        return SophiaHparams(
            float(group["lr"]), float(b1), float(b2), float(group["rho"]), float(group["weight_decay"]),
            float(bs), group["maximize"], bool(group.get("capturable", False)),
        )

    @torch.no_grad()
    def step(self, closure=None, bs: int = _DEFAULT_BS):
        """One step; ``bs`` is the number of tokens (samples) per batch, as in sophia-opt. Not
        given: sophia-opt's default 5120, with a warning the first time (the clip threshold
        rho*bs*h depends on the real batch size)."""
        if bs is _DEFAULT_BS:
            bs = DEFAULT_BS
            if not getattr(self, "_warned_default_bs", False) and not torch.compiler.is_compiling():
                self._warned_default_bs = True
                warnings.warn(
                    f"SophiaG.step() without bs= uses sophia-opt's default bs={DEFAULT_BS}, but the clip "
                    f"threshold rho*bs*h depends on the real number of tokens per batch: pass "
                    f"step(bs=tokens_per_batch). (This warning is shown once per optimizer.)",
                    UserWarning,
                    stacklevel=_caller_stacklevel(),
                )
        check(is_number(bs) and float(bs) > 0, f"Invalid bs: {bs} (tokens per batch, a positive number)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run("sophia", {"bs": bs})
        return loss

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h = b2*h + (1-b2)*g*g from the gradients now in ``p.grad`` (a GNB backward)."""
        self._run("sophia_hessian")

    def update_hessian_from_logits(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clear grads, run the GNB backward on ``logits``, update the Hessian EMA, clear grads.

        Returns the sampled-label loss."""
        self.zero_grad(set_to_none=True)
        loss = gnb_backward(logits, generator=generator)
        self.update_hessian()
        self.zero_grad(set_to_none=True)
        return loss
