"""LAMB as two fused multi-tensor passes and a per-tensor norm reduction.

Computes what :func:`mupopt.optim.lamb.lamb_reference` computes::

    m = lerp(m, g, 1-b1) ;  v = b2*v + (1-b2)*g*g
    u = (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps*eps_mult) + wd*p
    trust = phi(||p||) / ||u||  if both norms > 0 else 1        (phi(x) = min(x, clamp_value))
    p = p + (-lr*lr_mult) * (u * trust)

Three launches per dtype combination, with no host synchronisation:

1. ``_lamb_norms_kernel``, one program per chunk: updates m and v, forms u, and writes the
   chunk's partial sums of p^2 and u^2 (float64) to a [chunks, 2] buffer.
2. ``_lamb_trust_kernel``, one program per tensor: sums its chunks' partials (float64) in a
   fixed order and writes the tensor's trust ratio. Partials and a fixed-order sum rather than atomic adds: the
   result is deterministic (run to run bit-identical) at the cost of one tiny launch.
3. ``_lamb_update_kernel``, one program per chunk: recomputes u and applies the step.

With ``norm_reduce`` (sharded tensors, see lamb_reference): pass 1 of every launch, then kernel 2
stores each tensor's sums instead, ``norm_reduce`` sees them (in the caller's order), and kernel 2
forms the trust ratios from the reduced sums before each pass 3. With the sums unchanged the
result is bit for bit the one without.

Bytes per element with float32 states: pass 1 reads p g m v and writes m v, pass 3 reads p m v
and writes p: 40, the floor of the performance table. With lower-precision states (bf16, fp16,
8-bit), pass 3 cannot recompute u from the stored (rounded) m and v and match the reference,
which forms u from the unrounded float32 moments; there (``MOMENTS_IN_PASS_1`` False) pass 1 stores nothing and pass 3
recomputes m and v from the old states and g and stores them (fp32 p,g with bf16 m,v: 32 bytes
against 28 for the two-pass form, for a result equal to the reference's).

With a GradScaler scale both passes that read g multiply it by 1/scale in float32 (the same
value), and pass 3 stores the unscaled g back (see _common): with fp32 moments pass 3 then reads
and writes g, 8 more bytes per element; with bf16 moments it already reads g, 4 more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...optim.lamb import LAMB_STATES
from . import _common
from ._common import _chunk_inputs, _entry, _lerp, _load, _store

_BC1, _BC2, _EPS, _STEP = range(4)
_NUM_SCALARS = 4


@triton.jit
def _lamb_moments(g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, beta1_weight, beta2, one_minus_beta2, inv_scale,
                  G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
                  MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  STORE_GRAD: tl.constexpr, MASKED: tl.constexpr):
    g = _load(g_addr, offs, mask, G_BF16, ALIGNED, MASKED)
    if HAS_GRAD_SCALE:
        g = g * inv_scale
        if STORE_GRAD:
            _store(g_addr, offs, g, mask, G_BF16, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    m = _lerp(_load(m_addr, offs, mask, M_BF16, ALIGNED, MASKED, m_amax, lut), g, beta1_weight)
    v = _load(v_addr, offs, mask, V_BF16, ALIGNED, MASKED, v_amax, lut) * beta2 + one_minus_beta2 * g * g
    return m, v


@triton.jit
def _lamb_direction(p, m, v, bc1, bc2, eps, weight_decay):
    """u = (m/bc1) / (sqrt(v/bc2) + eps) + wd*p: one function for both passes, so the update
    pass recomputes exactly the u whose norm the first pass took."""
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    return tl.div_rn(tl.div_rn(m, bc1), denom) + weight_decay * p


@triton.jit
def _lamb_norms_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, partials_ptr, offs, mask,
                      bc1, bc2, eps, beta1_weight, beta2, one_minus_beta2, weight_decay, inv_scale,
                      P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
                      MAXIMIZE: tl.constexpr, MOMENTS_IN_PASS_1: tl.constexpr, ALIGNED: tl.constexpr,
                      HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    p = _load(p_addr, offs, mask, P_BF16, ALIGNED, MASKED, p_comp)
    # g stays scaled in memory until pass 3 (which may read it again) has used it.
    m, v = _lamb_moments(g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, beta1_weight, beta2,
                         one_minus_beta2, inv_scale, G_BF16, M_BF16, V_BF16, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE,
                         False, MASKED)
    if MOMENTS_IN_PASS_1:  # float32 states only
        _store(m_addr, offs, m, mask, M_BF16, ALIGNED, MASKED)
        _store(v_addr, offs, v, mask, V_BF16, ALIGNED, MASKED)
    u = _lamb_direction(p, m, v, bc1, bc2, eps, weight_decay)
    if MASKED:
        u = tl.where(mask, u, 0.0)  # masked lanes: 0/(0+eps), NaN when eps == 0
    c = tl.program_id(0)
    # Squares in float32 (as the cpu/cuda backends form them), their sum in float64: accurate at
    # any size (issue 13: float32 norms were 1e-4 off at 2^22 elements).
    tl.store(partials_ptr + 2 * c, tl.sum((p * p).to(tl.float64), axis=0))
    tl.store(partials_ptr + 2 * c + 1, tl.sum((u * u).to(tl.float64), axis=0))


@triton.jit
def _lamb_norms_kernel(
    # tables (see _common): static addresses [N, ROW] (p, m, v, then their block scales),
    # per-step gradient addresses [N], per-step scalars [N, 4], sizes [N], this launch's chunks
    # [C, 2]; output partials [C, 2]; 1/grad scale [1] (read only when HAS_GRAD_SCALE);
    # format-8 map tables (_common.lut)
    ptrs_ptr, grad_ptrs_ptr, scalars_ptr, numel_ptr, chunks_ptr, partials_ptr, inv_scale_ptr, lut,
    # hyperparameters shared by all tensors
    beta1_weight, beta2, one_minus_beta2, weight_decay,
    # storage codes, variant, layout
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    MAXIMIZE: tl.constexpr, MOMENTS_IN_PASS_1: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    # no param store here: the key is not read (numel_ptr stands in for the key table)
    slot, offs, mask, full, g_addr, inv_scale, key = _chunk_inputs(
        chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, numel_ptr, 0, HAS_GRAD_SCALE, BLOCK)
    row = ptrs_ptr + slot * ROW
    p_addr, p_comp = _entry(row, 0, ROW, P_BF16)  # p_comp: codes 7 and 8 only
    m_addr, m_amax = _entry(row, 1, ROW, M_BF16)
    v_addr, v_amax = _entry(row, 2, ROW, V_BF16)
    scal = scalars_ptr + slot * 4
    bc1 = tl.load(scal)
    bc2 = tl.load(scal + 1)
    eps = tl.load(scal + 2)
    if full:
        _lamb_norms_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, partials_ptr, offs, mask,
                          bc1, bc2, eps, beta1_weight, beta2, one_minus_beta2, weight_decay, inv_scale,
                          P_BF16, G_BF16, M_BF16, V_BF16, MAXIMIZE, MOMENTS_IN_PASS_1, ALIGNED, HAS_GRAD_SCALE, False)
    else:
        _lamb_norms_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, partials_ptr, offs, mask,
                          bc1, bc2, eps, beta1_weight, beta2, one_minus_beta2, weight_decay, inv_scale,
                          P_BF16, G_BF16, M_BF16, V_BF16, MAXIMIZE, MOMENTS_IN_PASS_1, ALIGNED, HAS_GRAD_SCALE, True)


@triton.jit
def _lamb_trust_kernel(
    # this launch's slots: (first chunk, chunk count) [S, 2]; all chunk partials [C_total, 2]
    # (float64); per-slot sums of this launch's slots [S, 2] (float64: written with SUMS == 1,
    # read with SUMS == 2); output trust ratios of this launch's slots [S]
    ranges_ptr, partials_ptr, sums_ptr, trust_ptr,
    clamp_value,
    HAS_CLAMP: tl.constexpr, SUMS: tl.constexpr, REDUCE_BLOCK: tl.constexpr,
):
    """One program per slot. SUMS == 0: its chunks' partials summed (float64, fixed order), then
    its trust ratio; 1: the sums stored (norm_reduce gets them); 2: the trust ratio from the
    (reduced) sums. Trust as csrc/include/mupopt/lamb.h's lamb_trust: the norms rounded to
    float32, phi / ||u|| in float32."""
    s = tl.program_id(0)
    if SUMS == 2:
        p_sq = tl.load(sums_ptr + 2 * s)
        u_sq = tl.load(sums_ptr + 2 * s + 1)
    else:
        first = tl.load(ranges_ptr + 2 * s)
        count = tl.load(ranges_ptr + 2 * s + 1)
        acc_p = tl.zeros([REDUCE_BLOCK], dtype=tl.float64)
        acc_u = tl.zeros([REDUCE_BLOCK], dtype=tl.float64)
        for i in range(0, count, REDUCE_BLOCK):
            idx = i + tl.arange(0, REDUCE_BLOCK)
            live = idx < count
            chunk = (first + idx).to(tl.int64)
            acc_p += tl.load(partials_ptr + 2 * chunk, mask=live, other=0.0)
            acc_u += tl.load(partials_ptr + 2 * chunk + 1, mask=live, other=0.0)
        p_sq = tl.sum(acc_p, axis=0)
        u_sq = tl.sum(acc_u, axis=0)
    if SUMS == 1:
        tl.store(sums_ptr + 2 * s, p_sq)
        tl.store(sums_ptr + 2 * s + 1, u_sq)
    else:
        w_norm = tl.sqrt(p_sq).to(tl.float32)
        u_norm = tl.sqrt(u_sq).to(tl.float32)
        phi = w_norm
        if HAS_CLAMP:
            phi = tl.minimum(w_norm, clamp_value)
        trust = tl.where((w_norm > 0.0) & (u_norm > 0.0), tl.div_rn(phi, u_norm), 1.0)
        tl.store(trust_ptr + s, trust)


@triton.jit
def _lamb_update_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, key,
                       bc1, bc2, eps, step, trust, beta1_weight, beta2, one_minus_beta2, weight_decay, inv_scale,
                       P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
                       MAXIMIZE: tl.constexpr, MOMENTS_IN_PASS_1: tl.constexpr, ALIGNED: tl.constexpr,
                       HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    p = _load(p_addr, offs, mask, P_BF16, ALIGNED, MASKED, p_comp)
    if MOMENTS_IN_PASS_1:
        m = _load(m_addr, offs, mask, M_BF16, ALIGNED, MASKED)
        v = _load(v_addr, offs, mask, V_BF16, ALIGNED, MASKED)
        if HAS_GRAD_SCALE:  # leave the unscaled gradient in memory, as the other kernels
            g = _load(g_addr, offs, mask, G_BF16, ALIGNED, MASKED) * inv_scale
            _store(g_addr, offs, g, mask, G_BF16, ALIGNED, MASKED)
    else:
        m, v = _lamb_moments(g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, beta1_weight, beta2,
                             one_minus_beta2, inv_scale, G_BF16, M_BF16, V_BF16, MAXIMIZE, ALIGNED, HAS_GRAD_SCALE,
                             True, MASKED)
        _store(m_addr, offs, m, mask, M_BF16, ALIGNED, MASKED, 0, m_amax, lut)
        _store(v_addr, offs, v, mask, V_BF16, ALIGNED, MASKED, 0, v_amax, lut)
    u = _lamb_direction(p, m, v, bc1, bc2, eps, weight_decay)
    _store(p_addr, offs, p + step * (u * trust), mask, P_BF16, ALIGNED, MASKED, key, p_comp)


@triton.jit
def _lamb_update_kernel(
    # tables as _lamb_norms_kernel; trust ratios of all slots [N]; stochastic rounding keys [N]
    # (P_BF16 >= 3)
    ptrs_ptr, grad_ptrs_ptr, scalars_ptr, numel_ptr, chunks_ptr, trust_ptr, inv_scale_ptr, keys_ptr, lut,
    beta1_weight, beta2, one_minus_beta2, weight_decay,
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    MAXIMIZE: tl.constexpr, MOMENTS_IN_PASS_1: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    slot, offs, mask, full, g_addr, inv_scale, key = _chunk_inputs(
        chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, keys_ptr, P_BF16, HAS_GRAD_SCALE, BLOCK)
    row = ptrs_ptr + slot * ROW
    p_addr, p_comp = _entry(row, 0, ROW, P_BF16)  # p_comp: codes 7 and 8 only
    m_addr, m_amax = _entry(row, 1, ROW, M_BF16)
    v_addr, v_amax = _entry(row, 2, ROW, V_BF16)
    scal = scalars_ptr + slot * 4
    bc1 = tl.load(scal)
    bc2 = tl.load(scal + 1)
    eps = tl.load(scal + 2)
    step = tl.load(scal + 3)
    trust = tl.load(trust_ptr + slot)
    if full:
        _lamb_update_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, key,
                           bc1, bc2, eps, step, trust, beta1_weight, beta2, one_minus_beta2, weight_decay, inv_scale,
                           P_BF16, G_BF16, M_BF16, V_BF16, MAXIMIZE, MOMENTS_IN_PASS_1, ALIGNED, HAS_GRAD_SCALE, False)
    else:
        _lamb_update_chunk(p_addr, p_comp, g_addr, m_addr, v_addr, m_amax, v_amax, lut, offs, mask, key,
                           bc1, bc2, eps, step, trust, beta1_weight, beta2, one_minus_beta2, weight_decay, inv_scale,
                           P_BF16, G_BF16, M_BF16, V_BF16, MAXIMIZE, MOMENTS_IN_PASS_1, ALIGNED, HAS_GRAD_SCALE, True)


def lamb_triton(params, grads, states, mults, hp, inv_grad_scale=None, *, norm_reduce=None) -> None:
    """The functional LAMB step of the "triton" backend (signature of lamb_reference, whose
    ``norm_reduce`` it takes; with ``inv_grad_scale``, GradScaler's unscale: see mupopt.backends).

    ``norm_reduce`` None: per launch, the norm pass, the trust ratios, the update pass. Else the
    norm passes of every launch, the per-tensor float64 sums, ``norm_reduce`` once, then the
    trust ratios from the reduced sums and the update passes."""
    if not params:
        return
    plan = _common.plan_states("lamb", params, grads, states, ("exp_avg", "exp_avg_sq"), LAMB_STATES, hp.kahan_summation)

    _common.increment_steps(states)
    t = _common.read_steps(states)
    mult = _common.mult_table(mults)
    scalars = torch.empty(len(params), _NUM_SCALARS, dtype=torch.float64)
    scalars[:, _BC1] = 1 - hp.beta1**t
    scalars[:, _BC2] = 1 - hp.beta2**t
    scalars[:, _EPS] = hp.eps * mult[:, 2]
    scalars[:, _STEP] = -hp.lr * mult[:, 0]
    grad_ptrs, scal, grads_aligned = plan.upload(grads, scalars)
    inv_scale = plan.inv_scale_arg(inv_grad_scale)
    sr_keys = plan.keys_arg(states, hp.stochastic_rounding)
    lut = _common.lut(plan.device)

    partials = torch.empty(max(plan.n_chunks, 1), 2, dtype=torch.float64, device=plan.device)
    trust = torch.ones(plan.n, dtype=torch.float32, device=plan.device)
    shared = (1.0 - hp.beta1, hp.beta2, 1.0 - hp.beta2, hp.weight_decay)
    clamp = dict(HAS_CLAMP=hp.clamp_value is not None, REDUCE_BLOCK=_common.REDUCE_BLOCK, num_warps=4)
    clamp_value = hp.clamp_value if hp.clamp_value is not None else 0.0
    launches = [launch for launch in plan.launches if launch.n_chunks]  # else only empty tensors

    def meta(launch):
        p16, m16, v16, g16 = launch.kinds
        return dict(
            P_BF16=_common.param_kind(p16, hp.stochastic_rounding, hp.kahan_summation), G_BF16=g16, M_BF16=m16, V_BF16=v16, MAXIMIZE=hp.maximize,
            MOMENTS_IN_PASS_1=not (m16 or v16), ALIGNED=launch.aligned and grads_aligned,
            HAS_GRAD_SCALE=inv_grad_scale is not None, ROW=plan.row, BLOCK=_common.BLOCK,
        )

    def norms(launch):
        _common.launch(
            _lamb_norms_kernel, (launch.n_chunks,),
            plan.ptrs, grad_ptrs, scal, plan.numel, launch.chunks, partials[launch.c0:launch.c0 + launch.n_chunks],
            inv_scale, lut, *shared, **meta(launch),
        )

    def update(launch):
        _common.launch(
            _lamb_update_kernel, (launch.n_chunks,),
            plan.ptrs, grad_ptrs, scal, plan.numel, launch.chunks, trust, inv_scale, sr_keys, lut,
            *shared, **meta(launch),
        )

    with plan.device_guard():
        if norm_reduce is None:
            for launch in launches:
                norms(launch)
                _common.launch(
                    _lamb_trust_kernel, (launch.s1 - launch.s0,),
                    launch.ranges, partials, partials, trust[launch.s0:launch.s1], clamp_value, SUMS=0, **clamp,
                )
                update(launch)
            return
        sums = torch.zeros(plan.n, 2, dtype=torch.float64, device=plan.device)  # slot order
        for launch in launches:
            norms(launch)
            _common.launch(
                _lamb_trust_kernel, (launch.s1 - launch.s0,),
                launch.ranges, partials, sums[launch.s0:launch.s1], trust, clamp_value, SUMS=1, **clamp,
            )
    from ...optim.lamb import reduce_norm_sums

    if plan.identity:
        reduced = reduce_norm_sums(norm_reduce, sums)
    else:
        order = plan.order_t.to(plan.device)
        reduced = reduce_norm_sums(norm_reduce, torch.empty_like(sums).index_copy_(0, order, sums))
        reduced = reduced.index_select(0, order)
    reduced = reduced.contiguous()
    with plan.device_guard():
        for launch in launches:
            _common.launch(
                _lamb_trust_kernel, (launch.s1 - launch.s0,),
                launch.ranges, partials, reduced[launch.s0:launch.s1], trust[launch.s0:launch.s1], clamp_value,
                SUMS=2, **clamp,
            )
            update(launch)
