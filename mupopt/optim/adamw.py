"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) with per-tensor muP multipliers.

Reference: ``torch.optim.AdamW``. With every multiplier 1 this computes what torch computes, with
the same defaults, state keys and state_dict layout, so either loads the other's state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import backends
from . import _lean_states as lean
from ..storage import load_param, store_param
from ._base import (MupOptimizer, check, check_adam_hparams, check_implementation_flags, compute_dtype, new_step,
                    skip_on_found_inf, step_count, store, upcast)


@dataclass(frozen=True)
class AdamWHparams:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    capturable: bool = False
    stochastic_rounding: bool = False  # param stores (mupopt/storage.py)
    kahan_summation: bool = False  # compensated param stores (mupopt/storage.py)


def adamw_reference(params, grads, states, mults, hp: AdamWHparams) -> None:
    """One AdamW step, one tensor at a time, float32 math (float64 for float64 params), the
    executable spec::

        p *= 1 - lr*wd*wd_mult
        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2      (amsgrad: vmax = max(vmax, v))
        p -= lr*lr_mult * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps*eps_mult)

    The operation order is torch.optim.AdamW's single-tensor path, so fp32 and fp64 results agree
    bit for bit.
    """
    for p, g, st, m in zip(params, grads, states, mults):
        st["step"] += 1
        t = step_count(st, hp.capturable)
        cd = compute_dtype(p)
        p32, m32, v32 = load_param(p, cd, st, hp.kahan_summation), upcast(st["exp_avg"], cd), upcast(st["exp_avg_sq"], cd)
        g32 = -upcast(g, cd) if hp.maximize else upcast(g, cd)
        p32.mul_(1 - hp.lr * hp.weight_decay * m.wd)
        m32.lerp_(g32, 1 - hp.beta1)
        v32.mul_(hp.beta2).addcmul_(g32, g32, value=1 - hp.beta2)
        if hp.amsgrad:
            vmax32 = upcast(st["max_exp_avg_sq"], cd)
            torch.maximum(vmax32, v32, out=vmax32)
            store(st["max_exp_avg_sq"], vmax32)
            second = vmax32
        else:
            second = v32
        if hp.capturable:
            # The corrections as device tensors (t is the step tensor: no host read), applied
            # as the host path applies them. torch.optim.AdamW(capturable=True) divides by the
            # step size instead (denom = sqrt(v)/(sqrt(bc2)*step_size) + eps/step_size), so at
            # lr = 0 (a warmup from zero) it writes 0/0 = NaN wherever v = 0; here lr = 0
            # leaves p as it is (tests/test_capturable.py).
            step_size = (hp.lr * m.lr) / (1 - hp.beta1**t)
            bias_correction2_sqrt = (1 - hp.beta2**t).sqrt()
            denom = (second.sqrt() / bias_correction2_sqrt).add_(hp.eps * m.eps)
            p32.addcdiv_(m32 * step_size, denom, value=-1.0)
        else:
            bias_correction1 = 1 - hp.beta1**t
            bias_correction2_sqrt = math.sqrt(1 - hp.beta2**t)
            denom = (second.sqrt() / bias_correction2_sqrt).add_(hp.eps * m.eps)
            p32.addcdiv_(m32, denom, value=-hp.lr * m.lr / bias_correction1)
        store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation), store(st["exp_avg"], m32), store(st["exp_avg_sq"], v32)


# The entries state_bits stores in 16 or 8 bits, with the sign of their values (_lean_states).
ADAMW_STATES = {"exp_avg": lean.SIGNED, "exp_avg_sq": lean.UNSIGNED, "max_exp_avg_sq": lean.UNSIGNED}

backends.register(backends.Backend(
    "adamw", "reference", skip_on_found_inf(lean.reference(adamw_reference, ADAMW_STATES, elementwise=True)),
    capturable=True, state_bits=lean.STATE_BITS, kahan_summation=True))


class AdamW(MupOptimizer):
    r"""AdamW with muP: a drop-in for ``torch.optim.AdamW``.

    Math (per tensor, t the step count after increment, decay in the default ``independent``
    mode; ``lr_mult``, ``eps_mult`` from the tensor's muP role, docs/mup.md)::

        p *= 1 - lr*wd
        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
        p -= lr*lr_mult * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps*eps_mult)

    Args:
        params: parameters, named parameters or param groups, as torch.optim.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``.
        wd_mode: "independent" (default; the decay lr*wd is width-free, P1/P2) or "coupled"
            (decay scaled with the lr multiplier).
        scale_eps: multiply eps by 1/m_out (P1; worth it in low precision). Default False.
        foreach, fused: accepted for drop-in compatibility and ignored: ``backend`` chooses the
            implementation (``auto``: the fastest available). differentiable: only False.
        capturable: as torch: step counts on the params' device, bias corrections as device
            tensors, GradScaler's found_inf applied on the device (no host read in the step).
            Backends that support it: "reference" and "cpu" (``Backend.capturable``).
        state_bits: 32 (default: exp_avg and exp_avg_sq in the param's dtype), 16 (bfloat16) or 8
            (blocks of 256 quantized with a float32 scale per block; tensors below 4096 elements
            stay in 32 bits; stepped by the reference backend for now): docs/lean-states.md.
        stochastic_rounding: round bfloat16 / float16 param stores stochastically (unbiased; the
            cure for bf16 params whose small updates round away), not to nearest. Default False;
            a no-op for float32 params. docs/dtypes.md, mupopt/storage.py.
        kahan_summation: keep each bfloat16 / float16 param's rounding error in a compensation
            buffer of its dtype (``state["param_compensation"]``, 2 bytes per element for bf16)
            and add it back before the next update: deterministic, the alternative to
            stochastic_rounding (both together raise). Default False; a no-op for float32
            params. mupopt/storage.py, docs/lean-states.md.
        backend: "auto", or a registered backend name (``mupopt.backends.names("adamw")``).
        base_shapes: muP width information by parameter name, for code that builds the optimizer
            from ``model.named_parameters()`` without calling ``mupopt.set_base_shapes`` on the
            model: recorded base shapes (``mupopt.make_base_shapes(base, delta, path)``) or that
            path. Roles come from which dimensions scale (docs/mup.md, "Width information by name").
        overrides: ``{name pattern: role or WidthInfo}`` for base_shapes=, as in set_base_shapes;
            needed for (vocab, d) matrices, which are readouts or embedding tables.
    """

    rule = "adamw"
    _lean_keys = ADAMW_STATES

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
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
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            wd_mode=wd_mode, scale_eps=scale_eps, state_bits=state_bits,
            # torch.optim.AdamW's group keys with the values it records, so that code reading
            # group["fused"] (or a torch.optim.AdamW loading this state_dict) finds them.
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True,
        )
        defaults["stochastic_rounding"] = stochastic_rounding
        defaults["kahan_summation"] = kahan_summation
        super().__init__(params, defaults, backend=backend, base_shapes=base_shapes, overrides=overrides)
        # torch.optim.AdamW's implementation switches, accepted so that a call written for torch
        # runs unchanged (foreach/fused choose among torch's own kernels, here backend= chooses),
        # checked where torch checks them: after the hyperparameters and the params.
        check_implementation_flags("AdamW", foreach, fused, differentiable)

    def __setstate__(self, state: dict) -> None:
        """As torch.optim.AdamW: whatever a loaded state_dict says (a torch.optim.Adam one
        says False), the decay here is decoupled."""
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def _check_hparams(self, group: dict) -> None:
        check_adam_hparams(group)
        check(isinstance(group["amsgrad"], bool), f"amsgrad must be a bool, got {group['amsgrad']!r}")

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = {"step": new_step(p, group), **lean.zeros(p, group, "exp_avg"), **lean.zeros(p, group, "exp_avg_sq")}
        if group["amsgrad"]:
            state.update(lean.zeros(p, group, "max_exp_avg_sq"))
        return state

    def _state_keys(self, group: dict, i: int) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("step", "exp_avg", "exp_avg_sq")

    def _plan_options(self, group: dict) -> tuple:
        # amsgrad switched on by hand after the state exists: a new plan checks the state for
        # max_exp_avg_sq (_check_state_keys) before anything is written.
        return (*super()._plan_options(group), group["amsgrad"])

    def _hparams(self, group: dict) -> AdamWHparams:
        b1, b2 = group["betas"]
        return AdamWHparams(
            float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
            group["amsgrad"], group["maximize"], bool(group.get("capturable", False)),
        )
