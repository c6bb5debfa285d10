"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv 1904.00962, Algorithm 2 with bias correction) with per-tensor muP multipliers.

No installable package computes exactly this variant: apex FusedLAMB skips the trust ratio when
weight_decay == 0 (unless use_nvlamb=True) and applies global gradient-norm clipping;
pytorch_optimizer's Lamb differs in bias correction. Tests therefore compare against a float64
transcription of the formula (mupopt.testing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .. import backends
from . import _lean_states as lean
from ..storage import load_param, store_param
from ._placement import NormReduce as ShardNormReduce
from ._base import (MupOptimizer, check, check_betas, check_eps, check_lr, check_weight_decay, compute_dtype,
                    is_number, new_step, skip_on_found_inf, step_count, store, upcast)


@dataclass(frozen=True)
class LAMBHparams:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    clamp_value: float | None
    maximize: bool
    capturable: bool = False
    stochastic_rounding: bool = False  # param stores (mupopt/storage.py)
    kahan_summation: bool = False  # compensated param stores (mupopt/storage.py)


NormReduce = Callable[[torch.Tensor], torch.Tensor]


def reduce_norm_sums(norm_reduce: NormReduce, partials: torch.Tensor) -> torch.Tensor:
    """Call ``norm_reduce(partials)`` (once) and check what it returns: a float64 tensor of the
    shape of ``partials`` ([N, 2]) on its device. Shared by every LAMB backend."""
    reduced = norm_reduce(partials)
    if not isinstance(reduced, torch.Tensor):
        raise TypeError(f"LAMB norm_reduce must return a tensor, got {type(reduced).__name__}")
    if reduced.dtype != torch.float64 or reduced.shape != partials.shape or reduced.device != partials.device:
        raise ValueError(
            f"LAMB norm_reduce must return a float64 tensor of shape {tuple(partials.shape)} on "
            f"{partials.device} (the reduced sums of p*p and u*u per tensor), got {reduced.dtype} "
            f"{tuple(reduced.shape)} on {reduced.device}"
        )
    return reduced


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """sum(x*x) of a float32 tensor as a float64 scalar tensor: the squares rounded to float32 (as
    the fused kernels form them), their sum accumulated in float64 (torch's cascade sum), so it
    is accurate at any size. (torch's float32 vector_norm on the CPU is 9.5e-5 off the float64
    value at 2^22 elements, which put a 1.1e-3 relative error on the LAMB update: issue 13.)"""
    return (x * x).sum(dtype=torch.float64)


def trust_ratio(p_sq: torch.Tensor, u_sq: torch.Tensor, hp: LAMBHparams,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """phi(||p||) / ||u|| from the float64 sums of squares (1 unless both norms are positive),
    as a scalar tensor of ``dtype`` (the compute dtype): in float32, the norms rounded to float32,
    phi/||u|| in float32 (what csrc/include/mupopt/lamb.h's lamb_trust does); for float64 params
    all in float64."""
    w_norm = p_sq.sqrt().to(dtype)
    u_norm = u_sq.sqrt().to(dtype)
    phi = w_norm if hp.clamp_value is None else w_norm.clamp(max=hp.clamp_value)
    return torch.where((w_norm > 0) & (u_norm > 0), phi / u_norm, torch.ones_like(w_norm))


def _lamb_direction(p, g, st, m, hp: LAMBHparams):
    """The step count and the moments (in the compute dtype; stored back here), p and u."""
    st["step"] += 1
    t = step_count(st, hp.capturable)
    cd = compute_dtype(p)
    p32, m32, v32 = load_param(p, cd, st, hp.kahan_summation), upcast(st["exp_avg"], cd), upcast(st["exp_avg_sq"], cd)
    g32 = -upcast(g, cd) if hp.maximize else upcast(g, cd)
    m32.lerp_(g32, 1 - hp.beta1)
    v32.mul_(hp.beta2).addcmul_(g32, g32, value=1 - hp.beta2)
    denom = (v32 / (1 - hp.beta2**t)).sqrt_().add_(hp.eps * m.eps)
    update = (m32 / (1 - hp.beta1**t)).div_(denom).add_(p32, alpha=hp.weight_decay)
    store(st["exp_avg"], m32), store(st["exp_avg_sq"], v32)
    return p32, update


def lamb_reference(params, grads, states, mults, hp: LAMBHparams, *, norm_reduce: NormReduce | None = None) -> None:
    """One LAMB step (You et al. 2019, arXiv 1904.00962, Algorithm 2 with bias correction),
    float32 math (float64 for float64 params)::

        m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g^2
        r = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps*eps_mult)
        u = r + wd*p
        trust = phi(||p||) / ||u||  if both norms > 0, else 1     (phi(x) = min(x, clamp_value))
        p -= lr*lr_mult * trust * u

    Norms are per tensor (Frobenius), from sums of squares accumulated in float64
    (:func:`sum_of_squares`, :func:`trust_ratio`). The decay sits inside u, so it is normalised
    by the trust ratio and scaled by lr_mult: LAMB has no separate decay multiplier.

    ``norm_reduce`` (every LAMB backend takes it): None, or a callable for tensors of which this
    call sees a shard. It is called once per call, after the step counts and moments of every
    tensor are updated, with ``partials``: float64 [N, 2] on the params' device, row i the sum of
    squares of p_i (before this step's update) and of u_i over this shard; it returns the sums
    over the whole tensors (e.g. after an all-reduce; it may reduce in place and return its
    argument), from which the trust ratios are formed. (The fused backends with bfloat16 states
    store the new moments only in their second pass, after norm_reduce: they recompute them there
    from the old ones rather than re-read them rounded, see csrc/include/mupopt/lamb.h.) With no
    params nothing is called.
    """
    if norm_reduce is None:
        for p, st, m, g in zip(params, states, mults, grads):
            p32, update = _lamb_direction(p, g, st, m, hp)
            trust = trust_ratio(sum_of_squares(p32), sum_of_squares(update), hp, p32.dtype)
            p32.add_(update * trust, alpha=-hp.lr * m.lr)
            store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation)
        return
    if not params:
        return
    pending = []
    partials = torch.empty(len(params), 2, dtype=torch.float64, device=params[0].device)
    for i, (p, g, st, m) in enumerate(zip(params, grads, states, mults)):
        p32, update = _lamb_direction(p, g, st, m, hp)
        partials[i, 0] = sum_of_squares(p32)
        partials[i, 1] = sum_of_squares(update)
        pending.append((p32, update))
    reduced = reduce_norm_sums(norm_reduce, partials)
    for i, (p, st, m, (p32, update)) in enumerate(zip(params, states, mults, pending)):
        trust = trust_ratio(reduced[i, 0], reduced[i, 1], hp, p32.dtype)
        p32.add_(update * trust, alpha=-hp.lr * m.lr)
        store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation)


LAMB_STATES = {"exp_avg": lean.SIGNED, "exp_avg_sq": lean.UNSIGNED}  # what state_bits stores (_lean_states)

backends.register(backends.Backend("lamb", "reference", skip_on_found_inf(lean.reference(lamb_reference, LAMB_STATES)),
                                   capturable=True, state_bits=lean.STATE_BITS, kahan_summation=True))


class LAMB(MupOptimizer):
    r"""LAMB with muP: the trust ratio on every tensor, bias correction, no global clipping.

    Math: see :func:`lamb_reference`.

    Args:
        params: parameters, named parameters or param groups.
        lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01.
        clamp_value: upper bound on ||p|| in the trust ratio (None: no clamp).
        hidden_lr_exponent: the hidden-layer lr multiplier is m_in**hidden_lr_exponent. P1 derives
            0 (the default) assuming ||W||_F ~ ||W||_*; a strict derivation for full-rank hidden
            weights gives -1/2. The coordinate check (mupopt coord-check) tells which transfers.
        capturable, scale_eps, stochastic_rounding, kahan_summation, backend, base_shapes, overrides: as :class:`mupopt.AdamW`. (No wd_mode: the decay is inside u.)
    """

    rule = "lamb"
    _lean_keys = LAMB_STATES

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        clamp_value: float | None = None,
        *,
        hidden_lr_exponent: float = 0.0,
        maximize: bool = False,
        capturable: bool = False,
        scale_eps: bool = False,
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        backend: str = "auto",
        base_shapes=None,
        overrides=None,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clamp_value=clamp_value,
            hidden_lr_exponent=hidden_lr_exponent, maximize=maximize, capturable=capturable, scale_eps=scale_eps,
        )
        defaults["state_bits"] = state_bits
        defaults["stochastic_rounding"] = stochastic_rounding
        defaults["kahan_summation"] = kahan_summation
        super().__init__(params, defaults, backend=backend, base_shapes=base_shapes, overrides=overrides)

    def _check_hparams(self, group: dict) -> None:
        check_lr(group["lr"])
        check_eps(group["eps"])
        check_betas(group["betas"])
        check_weight_decay(group["weight_decay"])
        c = group["clamp_value"]
        check(c is None or (is_number(c) and c > 0), f"Invalid clamp_value: {c}")
        check(is_number(group["hidden_lr_exponent"]), f"Invalid hidden_lr_exponent: {group['hidden_lr_exponent']}")
        check(group["wd_mode"] == "independent", "LAMB has no wd_mode: its decay is part of the trust-ratio update")

    def _plan_options(self, group: dict) -> tuple:
        return (group["scale_eps"], group["hidden_lr_exponent"])

    def _collectives(self, kernel: str, params: list) -> dict:
        """Sharded tensors: the trust ratio from whole-tensor norms, the per-shard partial sums
        of squares summed over the ranks, each distinct shard once, in one all-reduce per process
        group per step (_placement.NormReduce)."""
        reduce = ShardNormReduce(params, type(self).__name__)
        return {"norm_reduce": reduce} if reduce else {}

    def _rule_options(self, group: dict) -> dict:
        return {"scale_eps": group["scale_eps"], "lamb_hidden_exponent": float(group["hidden_lr_exponent"])}

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        return {"step": new_step(p, group), **lean.zeros(p, group, "exp_avg"), **lean.zeros(p, group, "exp_avg_sq")}

    def _hparams(self, group: dict) -> LAMBHparams:
        b1, b2 = group["betas"]
        c = group["clamp_value"]
        return LAMBHparams(
            float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]),
            None if c is None else float(c), group["maximize"], bool(group.get("capturable", False)),
        )
