"""ADOPT (decoupled decay, clipping s**0.25) as one fused multi-tensor Triton kernel.

Computes what :func:`mupopt.optim.adopt.adopt_reference` computes; s is each tensor's step count
before the increment, so tensors at different steps share one launch::

    s == 0:  v = v + g*g                                  (p, m unchanged)
    s >= 1:  p = p + (-lr*wd*wd_mult) * p
             n = clamp(g / max(sqrt(v), eps*eps_mult), -s**0.25, s**0.25)
             m = lerp(m, n, 1-b1) ;  p = p + (-lr*lr_mult) * m
             v = b2*v + (1-b2)*g*g

The first step is a per-tensor flag in the scalar table and selected per element, so a tensor on
its first step still reads and rewrites p and m (unchanged values, exact in either storage
dtype): one launch for the list at the price of 16 extra bytes per element on that one step.
Bytes per element otherwise (fp32): 28, as AdamW; with a GradScaler scale the unscaled gradient
is stored back (see _common): 32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ...optim.adopt import ADOPT_STATES
from ._common import _chunk_inputs, _entry, _lerp, _load, _store

_DECAY_ALPHA, _STEP, _EPS, _CLIP, _FIRST = range(5)
_NUM_SCALARS = 6  # padded to an even count (the per-step buffer packs them in int64 words)


@triton.jit
def _adopt_chunk(
    p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, key,
    decay_alpha, step, eps, clip, first, beta1_weight, beta2, one_minus_beta2, inv_scale,
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr,
):
    p = _load(p_addr, offs, mask, P_BF16, ALIGNED, MASKED, p_comp)
    g = _load(g_addr, offs, mask, G_BF16, ALIGNED, MASKED)
    m = _load(m_addr, offs, mask, M_BF16, ALIGNED, MASKED, m_amax, lut)
    v = _load(v_addr, offs, mask, V_BF16, ALIGNED, MASKED, v_amax, lut)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
        _store(g_addr, offs, g, mask, G_BF16, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    # v is read before it is updated: normalising g by the previous v is ADOPT's decorrelation.
    denom = tl.maximum(tl.sqrt_rn(v), eps, propagate_nan=tl.PropagateNan.ALL)
    normed = tl.clamp(tl.div_rn(g, denom), -clip, clip, propagate_nan=tl.PropagateNan.ALL)
    m_new = _lerp(m, normed, beta1_weight)
    p_new = p + decay_alpha * p
    p_new = p_new + step * m_new
    v_new = v * beta2 + one_minus_beta2 * g * g
    is_first = first != 0.0
    _store(p_addr, offs, tl.where(is_first, p, p_new), mask, P_BF16, ALIGNED, MASKED, key, p_comp)
    _store(m_addr, offs, tl.where(is_first, m, m_new), mask, M_BF16, ALIGNED, MASKED, 0, m_amax, lut)
    _store(v_addr, offs, tl.where(is_first, v + g * g, v_new), mask, V_BF16, ALIGNED, MASKED, 0, v_amax, lut)


@triton.jit
def _adopt_kernel(
    # tables (see _common): static addresses [N, ROW] (p, m, v, then their block scales),
    # per-step gradient addresses [N], per-step scalars [N, 6], sizes [N], this launch's chunks
    # [C, 2]; 1/grad scale [1] (read only when HAS_GRAD_SCALE); stochastic rounding keys [N]
    # (P_BF16 >= 3); format-8 map tables (_common.lut)
    ptrs_ptr, grad_ptrs_ptr, scalars_ptr, numel_ptr, chunks_ptr, inv_scale_ptr, keys_ptr, lut,
    # hyperparameters shared by all tensors
    beta1_weight, beta2, one_minus_beta2,
    # storage codes, variant, layout
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    slot, offs, mask, full, g_addr, inv_scale, key = _chunk_inputs(
        chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, keys_ptr, P_BF16, HAS_GRAD_SCALE, BLOCK)
    row = ptrs_ptr + slot * ROW
    p_addr, p_comp = _entry(row, 0, ROW, P_BF16)  # p_comp: codes 7 and 8 only
    m_addr, m_amax = _entry(row, 1, ROW, M_BF16)
    v_addr, v_amax = _entry(row, 2, ROW, V_BF16)
    scal = scalars_ptr + slot * 6
    decay_alpha = tl.load(scal)
    step = tl.load(scal + 1)
    eps = tl.load(scal + 2)
    clip = tl.load(scal + 3)
    first = tl.load(scal + 4)
    if full:
        _adopt_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, key,
                     decay_alpha, step, eps, clip, first, beta1_weight, beta2, one_minus_beta2, inv_scale,
                     P_BF16, G_BF16, M_BF16, V_BF16, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE, False)
    else:
        _adopt_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, key,
                     decay_alpha, step, eps, clip, first, beta1_weight, beta2, one_minus_beta2, inv_scale,
                     P_BF16, G_BF16, M_BF16, V_BF16, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE, True)


def adopt_triton(params, grads, states, mults, hp, inv_grad_scale=None) -> None:
    """The functional ADOPT step of the "triton" backend (signature of adopt_reference; with
    ``inv_grad_scale``, GradScaler's unscale: see mupopt.backends)."""
    if not params:
        return
    plan = _common.plan_states("adopt", params, grads, states, ("exp_avg", "exp_avg_sq"), ADOPT_STATES, hp.kahan_summation)

    s = _common.read_steps(states)  # before the increment
    _common.increment_steps(states)
    mult = _common.mult_table(mults)
    scalars = torch.zeros(len(params), _NUM_SCALARS, dtype=torch.float64)
    scalars[:, _DECAY_ALPHA] = -hp.lr * hp.weight_decay * mult[:, 1]
    scalars[:, _STEP] = -hp.lr * mult[:, 0]
    scalars[:, _EPS] = hp.eps * mult[:, 2]
    scalars[:, _CLIP] = s**0.25
    scalars[:, _FIRST] = (s == 0).to(torch.float64)
    grad_ptrs, scal, grads_aligned = plan.upload(grads, scalars)
    inv_scale = plan.inv_scale_arg(inv_grad_scale)
    sr_keys = plan.keys_arg(states, hp.stochastic_rounding)

    with plan.device_guard():
        for launch in plan.launches:
            if launch.n_chunks == 0:
                continue
            p16, m16, v16, g16 = launch.kinds
            _common.launch(
                _adopt_kernel, (launch.n_chunks,),
                plan.ptrs, grad_ptrs, scal, plan.numel, launch.chunks, inv_scale, sr_keys, _common.lut(plan.device),
                1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2,
                P_BF16=_common.param_kind(p16, hp.stochastic_rounding, hp.kahan_summation), G_BF16=g16, M_BF16=m16, V_BF16=v16,
                MAXIMIZE=hp.maximize, ALIGNED=launch.aligned and grads_aligned,
                HAS_GRAD_SCALE=inv_grad_scale is not None, ROW=plan.row, BLOCK=_common.BLOCK,
            )
