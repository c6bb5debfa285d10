"""AdamW (with amsgrad and maximize) as one fused multi-tensor Triton kernel.

Computes what :func:`mupopt.optim.adamw.adamw_reference` computes, operation for operation::

    p *= 1 - lr*wd*wd_mult
    m = lerp(m, g, 1-b1) ;  v = b2*v + (1-b2)*g*g          (amsgrad: vmax = max(vmax, v))
    p += (-lr*lr_mult/(1-b1^t)) * (m / (sqrt(v)/sqrt(1-b2^t) + eps*eps_mult))

Bytes per element (fp32 everywhere): reads p g m v, writes p m v: 28 (amsgrad: 36). With a
GradScaler scale (``inv_grad_scale``): g *= 1/scale first, in float32, and the unscaled g is stored
back (torch's fused AdamW leaves it in p.grad): 32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ...optim.adamw import ADAMW_STATES
from ._common import _chunk_inputs, _entry, _lerp, _load, _store

# Per-tensor scalars, in table order.
_DECAY, _STEP_SIZE, _BC2_SQRT, _EPS = range(4)
_NUM_SCALARS = 4


@triton.jit
def _adamw_chunk(
    p_addr, p_comp, g_addr, m_addr, v_addr, vmax_addr, m_amax, v_amax, vmax_amax, lut, offs, mask, key,
    decay, step_size, bc2_sqrt, eps, beta1_weight, beta2, one_minus_beta2, inv_scale,
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    VMAX_BF16: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr,
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
    p = p * decay
    m = _lerp(m, g, beta1_weight)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(_load(vmax_addr, offs, mask, VMAX_BF16, ALIGNED, MASKED, vmax_amax, lut), v,
                          propagate_nan=tl.PropagateNan.ALL)
        _store(vmax_addr, offs, vmax, mask, VMAX_BF16, ALIGNED, MASKED, 0, vmax_amax, lut)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + step_size * tl.div_rn(m, denom)
    _store(p_addr, offs, p, mask, P_BF16, ALIGNED, MASKED, key, p_comp)
    _store(m_addr, offs, m, mask, M_BF16, ALIGNED, MASKED, 0, m_amax, lut)
    _store(v_addr, offs, v, mask, V_BF16, ALIGNED, MASKED, 0, v_amax, lut)


@triton.jit
def _adamw_kernel(
    # tables (see _common): static addresses [N, ROW] (p, m, v[, vmax], then their block scales),
    # per-step gradient addresses [N], per-step scalars [N, 4], sizes [N], this launch's chunks
    # [C, 2]; 1/grad scale [1] (read only when HAS_GRAD_SCALE); stochastic rounding keys [N]
    # (P_BF16 >= 3); format-8 map tables (_common.lut)
    ptrs_ptr, grad_ptrs_ptr, scalars_ptr, numel_ptr, chunks_ptr, inv_scale_ptr, keys_ptr, lut,
    # hyperparameters shared by all tensors
    beta1_weight, beta2, one_minus_beta2,
    # storage codes, variant, layout
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    VMAX_BF16: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    slot, offs, mask, full, g_addr, inv_scale, key = _chunk_inputs(
        chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, keys_ptr, P_BF16, HAS_GRAD_SCALE, BLOCK)
    row = ptrs_ptr + slot * ROW
    p_addr, p_comp = _entry(row, 0, ROW, P_BF16)  # p_comp: codes 7 and 8 only
    m_addr, m_amax = _entry(row, 1, ROW, M_BF16)
    v_addr, v_amax = _entry(row, 2, ROW, V_BF16)
    if AMSGRAD:
        vmax_addr, vmax_amax = _entry(row, 3, ROW, VMAX_BF16)
    else:
        vmax_addr, vmax_amax = v_addr, v_amax  # unused
    scal = scalars_ptr + slot * 4
    decay = tl.load(scal)
    step_size = tl.load(scal + 1)
    bc2_sqrt = tl.load(scal + 2)
    eps = tl.load(scal + 3)
    if full:
        _adamw_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, vmax_addr, m_amax, v_amax, vmax_amax, lut, offs, mask, key,
                     decay, step_size, bc2_sqrt, eps, beta1_weight, beta2, one_minus_beta2, inv_scale,
                     P_BF16, G_BF16, M_BF16, V_BF16, VMAX_BF16, AMSGRAD, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE, False)
    else:
        _adamw_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, vmax_addr, m_amax, v_amax, vmax_amax, lut, offs, mask, key,
                     decay, step_size, bc2_sqrt, eps, beta1_weight, beta2, one_minus_beta2, inv_scale,
                     P_BF16, G_BF16, M_BF16, V_BF16, VMAX_BF16, AMSGRAD, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE, True)


def adamw_triton(params, grads, states, mults, hp, inv_grad_scale=None) -> None:
    """The functional AdamW step of the "triton" backend (signature of adamw_reference; with
    ``inv_grad_scale``, GradScaler's unscale: see mupopt.backends)."""
    if not params:
        return
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hp.amsgrad else [])
    plan = _common.plan_states("adamw", params, grads, states, keys, ADAMW_STATES, hp.kahan_summation)

    _common.increment_steps(states)
    t = _common.read_steps(states)
    mult = _common.mult_table(mults)
    scalars = torch.empty(len(params), _NUM_SCALARS, dtype=torch.float64)
    scalars[:, _DECAY] = 1 - hp.lr * hp.weight_decay * mult[:, 1]
    scalars[:, _STEP_SIZE] = -hp.lr * mult[:, 0] / (1 - hp.beta1**t)
    scalars[:, _BC2_SQRT] = torch.sqrt(1 - hp.beta2**t)
    scalars[:, _EPS] = hp.eps * mult[:, 2]
    grad_ptrs, scal, grads_aligned = plan.upload(grads, scalars)
    inv_scale = plan.inv_scale_arg(inv_grad_scale)
    sr_keys = plan.keys_arg(states, hp.stochastic_rounding)

    with plan.device_guard():
        for launch in plan.launches:
            if launch.n_chunks == 0:
                continue
            p16, m16, v16, *rest = launch.kinds
            vmax16 = rest[0] if hp.amsgrad else False
            g16 = launch.kinds[-1]
            _common.launch(
                _adamw_kernel, (launch.n_chunks,),
                plan.ptrs, grad_ptrs, scal, plan.numel, launch.chunks, inv_scale, sr_keys, _common.lut(plan.device),
                1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2,
                P_BF16=_common.param_kind(p16, hp.stochastic_rounding, hp.kahan_summation), G_BF16=g16, M_BF16=m16, V_BF16=v16, VMAX_BF16=vmax16,
                AMSGRAD=hp.amsgrad, MAXIMIZE=hp.maximize, ALIGNED=launch.aligned and grads_aligned,
                HAS_GRAD_SCALE=inv_grad_scale is not None, ROW=plan.row, BLOCK=_common.BLOCK,
            )
