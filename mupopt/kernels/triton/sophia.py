"""SophiaG's step and its Hessian EMA as fused multi-tensor Triton kernels.

Compute what :func:`mupopt.optim.sophia.sophia_reference` and ``sophia_hessian_reference``
compute::

    step:     p = p * (1 - lr*wd*wd_mult)
              m = b1*m + (1-b1)*g
              p = p + (-lr*lr_mult) * sign(m) * min(|m| / ((rho*bs)*h + 1e-15), 1)
    hessian:  h = b2*h + (1-b2)*g*g

Bytes per element (fp32): step reads p g m h and writes p m: 24; Hessian EMA reads g h, writes h: 12.
With a GradScaler scale (either kernel) the unscaled gradient is stored back (see _common): +4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...optim.sophia import HESSIAN_FLOOR, SOPHIA_STATES
from . import _common
from ._common import _chunk_inputs, _entry, _load, _store

_DECAY, _STEP = range(2)
_NUM_SCALARS = 2


@triton.jit
def _sophia_chunk(
    p_addr, p_comp, g_addr, m_addr, h_addr, m_amax, h_amax, lut, offs, mask, key,
    decay, step, beta1, one_minus_beta1, rho_bs, hessian_floor, inv_scale,
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, H_BF16: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr,
):
    p = _load(p_addr, offs, mask, P_BF16, ALIGNED, MASKED, p_comp)
    g = _load(g_addr, offs, mask, G_BF16, ALIGNED, MASKED)
    m = _load(m_addr, offs, mask, M_BF16, ALIGNED, MASKED, m_amax, lut)
    h = _load(h_addr, offs, mask, H_BF16, ALIGNED, MASKED, h_amax, lut)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
        _store(g_addr, offs, g, mask, G_BF16, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    p = p * decay
    m = m * beta1 + one_minus_beta1 * g
    # h == 0 (no estimate yet): the floor makes the ratio saturate at 1, the step sign(m).
    ratio = tl.minimum(tl.div_rn(tl.abs(m), rho_bs * h + hessian_floor), 1.0, propagate_nan=tl.PropagateNan.ALL)
    sign = tl.where(m > 0.0, 1.0, tl.where(m < 0.0, -1.0, 0.0))
    p = p + step * sign * ratio
    _store(p_addr, offs, p, mask, P_BF16, ALIGNED, MASKED, key, p_comp)
    _store(m_addr, offs, m, mask, M_BF16, ALIGNED, MASKED, 0, m_amax, lut)


@triton.jit
def _sophia_kernel(
    # tables (see _common): static addresses [N, ROW] (p, m, h, then their block scales),
    # per-step gradient addresses [N], per-step scalars [N, 2], sizes [N], this launch's chunks
    # [C, 2]; 1/grad scale [1] (read only when HAS_GRAD_SCALE); stochastic rounding keys [N]
    # (P_BF16 >= 3); format-8 map tables (_common.lut)
    ptrs_ptr, grad_ptrs_ptr, scalars_ptr, numel_ptr, chunks_ptr, inv_scale_ptr, keys_ptr, lut,
    # hyperparameters shared by all tensors
    beta1, one_minus_beta1, rho_bs, hessian_floor,
    # storage codes, variant, layout
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, H_BF16: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    slot, offs, mask, full, g_addr, inv_scale, key = _chunk_inputs(
        chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, keys_ptr, P_BF16, HAS_GRAD_SCALE, BLOCK)
    row = ptrs_ptr + slot * ROW
    p_addr, p_comp = _entry(row, 0, ROW, P_BF16)  # p_comp: codes 7 and 8 only
    m_addr, m_amax = _entry(row, 1, ROW, M_BF16)
    h_addr, h_amax = _entry(row, 2, ROW, H_BF16)
    decay = tl.load(scalars_ptr + slot * 2)
    step = tl.load(scalars_ptr + slot * 2 + 1)
    if full:
        _sophia_chunk(p_addr, p_comp, g_addr, m_addr, h_addr, m_amax, h_amax, lut, offs, mask, key,
                      decay, step, beta1, one_minus_beta1, rho_bs, hessian_floor, inv_scale,
                      P_BF16, G_BF16, M_BF16, H_BF16, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE, False)
    else:
        _sophia_chunk(p_addr, p_comp, g_addr, m_addr, h_addr, m_amax, h_amax, lut, offs, mask, key,
                      decay, step, beta1, one_minus_beta1, rho_bs, hessian_floor, inv_scale,
                      P_BF16, G_BF16, M_BF16, H_BF16, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE, True)


@triton.jit
def _sophia_hessian_chunk(g_addr, h_addr, h_amax, lut, offs, mask, beta2, one_minus_beta2, inv_scale,
                          G_BF16: tl.constexpr, H_BF16: tl.constexpr, ALIGNED: tl.constexpr,
                          HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    g = _load(g_addr, offs, mask, G_BF16, ALIGNED, MASKED)
    h = _load(h_addr, offs, mask, H_BF16, ALIGNED, MASKED, h_amax, lut)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
        _store(g_addr, offs, g, mask, G_BF16, ALIGNED, MASKED)
    _store(h_addr, offs, h * beta2 + one_minus_beta2 * g * g, mask, H_BF16, ALIGNED, MASKED, 0, h_amax, lut)


@triton.jit
def _sophia_hessian_kernel(
    # tables (see _common): static addresses [N, ROW] (h, its block scale), per-step gradient
    # addresses [N], sizes [N], this launch's chunks [C, 2]; 1/grad scale [1] (read only when
    # HAS_GRAD_SCALE); format-8 map tables (_common.lut)
    ptrs_ptr, grad_ptrs_ptr, numel_ptr, chunks_ptr, inv_scale_ptr, lut,
    beta2, one_minus_beta2,
    G_BF16: tl.constexpr, H_BF16: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    # keys_ptr is never read (no param store): numel_ptr stands in
    slot, offs, mask, full, g_addr, inv_scale, key = _chunk_inputs(
        chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, numel_ptr, 0, HAS_GRAD_SCALE, BLOCK)
    h_addr, h_amax = _entry(ptrs_ptr + slot * ROW, 0, ROW, H_BF16)
    if full:
        _sophia_hessian_chunk(g_addr, h_addr, h_amax, lut, offs, mask, beta2, one_minus_beta2, inv_scale,
                              G_BF16, H_BF16, ALIGNED, HAS_GRAD_SCALE, False)
    else:
        _sophia_hessian_chunk(g_addr, h_addr, h_amax, lut, offs, mask, beta2, one_minus_beta2, inv_scale,
                              G_BF16, H_BF16, ALIGNED, HAS_GRAD_SCALE, True)


def sophia_triton(params, grads, states, mults, hp, inv_grad_scale=None) -> None:
    """The functional SophiaG step of the "triton" backend (signature of sophia_reference; with
    ``inv_grad_scale``, GradScaler's unscale: see mupopt.backends)."""
    if not params:
        return
    plan = _common.plan_states("sophia", params, grads, states, ("exp_avg", "hessian"), SOPHIA_STATES, hp.kahan_summation)

    _common.increment_steps(states)
    mult = _common.mult_table(mults)
    scalars = torch.empty(len(params), _NUM_SCALARS, dtype=torch.float64)
    scalars[:, _DECAY] = 1 - hp.lr * hp.weight_decay * mult[:, 1]
    scalars[:, _STEP] = -hp.lr * mult[:, 0]
    grad_ptrs, scal, grads_aligned = plan.upload(grads, scalars)
    inv_scale = plan.inv_scale_arg(inv_grad_scale)
    sr_keys = plan.keys_arg(states, hp.stochastic_rounding)

    with plan.device_guard():
        for launch in plan.launches:
            if launch.n_chunks == 0:
                continue
            p16, m16, h16, g16 = launch.kinds
            _common.launch(
                _sophia_kernel, (launch.n_chunks,),
                plan.ptrs, grad_ptrs, scal, plan.numel, launch.chunks, inv_scale, sr_keys, _common.lut(plan.device),
                hp.beta1, 1.0 - hp.beta1, hp.rho * hp.bs, HESSIAN_FLOOR,
                P_BF16=_common.param_kind(p16, hp.stochastic_rounding, hp.kahan_summation), G_BF16=g16, M_BF16=m16, H_BF16=h16,
                MAXIMIZE=hp.maximize, ALIGNED=launch.aligned and grads_aligned,
                HAS_GRAD_SCALE=inv_grad_scale is not None, ROW=plan.row, BLOCK=_common.BLOCK,
            )


def sophia_hessian_triton(params, grads, states, mults, hp, inv_grad_scale=None) -> None:
    """The Hessian EMA of the "triton" backend (signature of sophia_hessian_reference; with
    ``inv_grad_scale``, GradScaler's unscale: see mupopt.backends)."""
    if not params:
        return
    if len(states) != len(params):
        _common.fail("sophia_hessian", f"{len(states)} states for {len(params)} parameters")
    hessians = [st["hessian"] for st in states]
    plan = _common.plan_for("sophia_hessian", ["hessian"], [hessians], grads,
                            [[st.get("hessian" + _common.lean.ABSMAX) for st in states]], [SOPHIA_STATES["hessian"]])
    grad_ptrs, _, grads_aligned = plan.upload(grads, None)
    inv_scale = plan.inv_scale_arg(inv_grad_scale)

    with plan.device_guard():
        for launch in plan.launches:
            if launch.n_chunks == 0:
                continue
            h16, g16 = launch.kinds
            _common.launch(
                _sophia_hessian_kernel, (launch.n_chunks,),
                plan.ptrs, grad_ptrs, plan.numel, launch.chunks, inv_scale, _common.lut(plan.device),
                hp.beta2, 1.0 - hp.beta2,
                G_BF16=g16, H_BF16=h16, ALIGNED=launch.aligned and grads_aligned,
                HAS_GRAD_SCALE=inv_grad_scale is not None, ROW=plan.row, BLOCK=_common.BLOCK,
            )
