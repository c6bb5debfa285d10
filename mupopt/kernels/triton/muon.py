"""Muon's "triton" backend: fused momentum, batched Triton Newton–Schulz, fused decay + update.

Computes what :func:`mupopt.optim.muon.muon_reference` computes::

    B = lerp(B, g, 1-mu) ;  u = lerp(g, B, mu) if nesterov else B       _muon_momentum_kernel
    O = NS(u)   (same-shape matrices stacked: one batched NS per shape)  newton_schulz_triton
    p *= 1 - lr*wd*wd_mult ;  p -= lr*lr_mult * O   (lr_mult: with the shape factor)  _muon_update_kernel

Launches per step: per group of same-shape matrices (same storage dtypes), one momentum launch,
the NS launches (1 + 3 per iteration, the whole stack in each) and one update launch; a
GPT-2-small list (4 distinct shapes) is therefore 4 * (2 + 16) = 72 launches per step whatever
the number of layers. The momentum kernel writes ``u`` straight into the NS input stack in the
NS dtype (bf16: the cast torch does in ``newton_schulz``), so stacking costs no extra pass.

Traversal: the elementwise kernels do not use ``_common``'s multi-tensor chunk tables; the
tensors of one launch all have one shape, so a 2-D grid (chunk, matrix) with one per-step table
of addresses and scalars is the whole traversal, and the launch count is set by the NS stacks
anyway. The per-element math reuses ``_common``'s device helpers (``_load``/``_store``: fp32
math, round-to-nearest-even bf16 stores, stochastic (codes 3, 4) and compensated (codes 7, 8,
``kahan_summation``: the update loads p + c and stores the split) param stores, ``_lerp``:
ATen's lerp formula).

``ns_dtype``: bfloat16 and float32 run the Triton NS; float64 (a debugging option) runs
``linalg.newton_schulz`` in torch and rounds O to float32 for the update (the reference adds the
float64 O to the float32 parameter: within a float32 rounding of this).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ... import backends, storage
from ...linalg import newton_schulz
from ...optim import _lean_states as lean
from ...optim.muon import matrix_view
from . import newton_schulz as ns

_jit = ns.DeferredJit(globals())
# Bound by _jit.build() (see DeferredJit): triton.language and the device functions these
# kernels call. Placeholders until then, so that the names are defined for readers and linters.
tl = _load = _store = _lerp = _to_storage = None

PRIORITY = 10
# Elements per program of the elementwise kernels: 4096 fp32 with 8 warps is 16 per thread, four
# 16-byte accesses per operand. Untuned: benchmarks/tune_triton.py swept _common.BLOCK (the
# AdamW-family kernels, 8192 x 16 there), not these.
BLOCK = 4096
NUM_WARPS = 8
_ALIGNMENT = 16
# Per-tensor rows of the per-step table: addresses (g, buf, p), then two fp32 scalars
# (decay, step) bit-packed into one int64, then the stochastic rounding key (P_BF16 3 and 4),
# then the address of buf's block scales (format 8; else 0), then the address of p's
# compensation (kahan_summation, P_BF16 7 and 8; else 0). The kernels' literal row stride 7 and
# fp32 offsets 14 * b + 6 and + 7 follow from it.
_ROW = 7


@_jit
def _muon_momentum_kernel(
    # per-step table [k, 7] int64: g, buf addresses and buf's block scales (p, the scalars, the
    # key and the compensation unused here); output u stack (k, numel) in the NS dtype; format-8 map tables
    # (_common.lut)
    table_ptr, u_ptr, lut,
    numel, one_minus_mu, mu,
    G_BF16: tl.constexpr, BUF_BF16: tl.constexpr, U_BF16: tl.constexpr, NESTEROV: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # numel is specialised on divisibility by 16, so the mask stays vectorisable.
    mask = offs < numel
    row = table_ptr + b * 7
    g_addr = tl.load(row)
    buf_addr = tl.load(row + 1)
    buf_amax = tl.load(row + 5)
    g = _load(g_addr, offs, mask, G_BF16, ALIGNED, True)
    # BLOCK is a multiple of 256: a program holds whole blocks of a format-8 buffer
    buf = _load(buf_addr, offs, mask, BUF_BF16, ALIGNED, True, buf_amax, lut)
    buf = _lerp(buf, g, one_minus_mu)
    _store(buf_addr, offs, buf, mask, BUF_BF16, ALIGNED, True, 0, buf_amax, lut)
    if NESTEROV:
        u = _lerp(g, buf, mu)  # from the fp32 buffer, before its storage rounding (as torch)
    else:
        u = buf
    tl.store(u_ptr + b.to(tl.int64) * numel + offs, _to_storage(u, U_BF16), mask=mask)


@_jit
def _muon_update_kernel(
    # per-step table [k, 7] int64: p address in column 2, (decay, step) fp32 pair in column 3
    # (read through scal_ptr, the same memory viewed as fp32 [k, 14]), the stochastic rounding
    # key in column 4, p's compensation in column 6; O stack (k, numel) in the NS dtype
    table_ptr, scal_ptr, o_ptr,
    numel,
    P_BF16: tl.constexpr, O_BF16: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = table_ptr + b * 7
    p_addr = tl.load(row + 2)
    decay = tl.load(scal_ptr + b * 14 + 6)
    step = tl.load(scal_ptr + b * 14 + 7)
    if P_BF16 == 3 or P_BF16 == 4:
        key = tl.load(row + 4).to(tl.uint32)
    else:
        key = 0  # unused
    if P_BF16 >= 7:  # the storage layer takes c's address in the block-scale argument
        comp = tl.load(row + 6)
    else:
        comp = 0  # unused
    p = _load(p_addr, offs, mask, P_BF16, ALIGNED, True, comp)
    o = tl.load(o_ptr + b.to(tl.int64) * numel + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * decay
    p = p + step * o
    _store(p_addr, offs, p, mask, P_BF16, ALIGNED, True, key, comp)


def build() -> None:
    ns.build()
    _jit.build(ns.device_helpers)


def _fail(message: str) -> None:
    raise RuntimeError(f"backend 'triton' cannot step these muon tensors: {message}")


def _check(params, grads, states, kahan: bool = False) -> None:
    if not (len(params) == len(grads) == len(states)):
        _fail(f"{len(params)} params, {len(grads)} gradients, {len(states)} states")
    device = params[0].device
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        reason = backends.subclass_reason([p, g, *(v for v in st.values() if isinstance(v, torch.Tensor))])
        if reason is not None:  # data_ptr() of a wrapper subclass is 0
            _fail(f"param {i}: {reason}")
        buf = st["momentum_buffer"]
        if p.device != device:
            _fail(f"param {i} is on {p.device}, param 0 on {device} (one device per call)")
        if p.dtype not in ns.SUPPORTED_DTYPES or not p.is_contiguous() or p.ndim < 2:
            _fail(f"param {i} (shape {tuple(p.shape)}, {p.dtype}) must be a contiguous fp32/bf16 matrix")
        for role, t in (("gradient", g), ("momentum_buffer", buf)):
            quantized = role == "momentum_buffer" and (t.dtype == torch.uint8 or lean.is_quantized(st, role))
            if quantized:
                _check_q8(i, t, st)
            if t.shape != p.shape:
                _fail(f"{role} {i} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
            if t.device != p.device:
                _fail(f"{role} {i} is on {t.device}, its parameter on {p.device}")
            if t.dtype not in ns.SUPPORTED_DTYPES and not quantized:
                _fail(f"{role} {i} has dtype {t.dtype}; supported: float32, bfloat16")
            if not t.is_contiguous():
                _fail(f"{role} {i} (shape {tuple(t.shape)}) is not contiguous")
        if kahan and storage.compensates(p):
            _check_compensation(i, p, st)


def _check_compensation(i: int, p: torch.Tensor, st: dict) -> None:
    """kahan_summation: a bf16 / fp16 param's compensation is read and written at the param's
    offsets (a missing one would be address 0)."""
    c = st.get(storage.COMPENSATION)
    if c is None or c.dtype != p.dtype or c.shape != p.shape or not c.is_contiguous() or c.device != p.device:
        _fail(f"{storage.COMPENSATION} {i} must be a contiguous {p.dtype} tensor of shape {tuple(p.shape)} on "
              f"{p.device}, like its parameter (kahan_summation=True)")


def _check_q8(i: int, codes: torch.Tensor, st: dict) -> None:
    """A format-8 momentum buffer: uint8 codes shaped like the param, float32 block scales."""
    scales = st.get("momentum_buffer" + lean.ABSMAX)
    if codes.dtype != torch.uint8 or scales is None:
        _fail(f"momentum_buffer {i} has dtype {codes.dtype} and {'a' if scales is not None else 'no'} block-scale "
              f"entry: an 8-bit state (state_bits=8) is uint8 codes with float32 block scales")
    blocks = lean.blocks_of(codes.numel())
    if not codes.is_contiguous() or scales.dtype != torch.float32 or scales.shape != (blocks,) or \
            not scales.is_contiguous() or scales.device != codes.device:
        _fail(f"momentum_buffer {i}: contiguous codes and contiguous float32 block scales of shape ({blocks},) "
              f"on one device needed, not {scales.dtype} {tuple(scales.shape)}")


def _buffer_kind(dtype: torch.dtype) -> int:
    """The storage code of a momentum buffer: format 8 (signed map) for codes."""
    from . import _common

    return _common.Q8_SIGNED if dtype == torch.uint8 else _common.storage_kind(dtype)


def muon_triton(params, grads, states, mults, hp, *, orthogonalize=None) -> None:
    """The functional Muon step of the "triton" backend (signature of muon_reference, whose
    docstring says what ``orthogonalize`` does: here it receives the updates in the NS dtype,
    as the momentum kernel writes them, and this backend's batched Triton NS)."""
    if not params:
        return
    _check(params, grads, states, hp.kahan_summation)
    build()
    from . import _common

    device = params[0].device
    bufs = [st["momentum_buffer"] for st in states]
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        key = (tuple(matrix_view(p).shape), p.dtype, grads[i].dtype, bufs[i].dtype)
        groups.setdefault(key, []).append(i)
    order = [i for idx in groups.values() for i in idx]

    # One per-step table for all groups (one host-to-device copy): addresses and the two fp32
    # scalars of every tensor, formed in float64 as the reference forms them, rounded once.
    scal = torch.empty(len(order), 2, dtype=torch.float32)
    table = torch.empty(len(order), _ROW, dtype=torch.int64)
    for r, i in enumerate(order):
        m = mults[i]
        scal[r, 0] = 1 - hp.lr * hp.weight_decay * m.wd
        scal[r, 1] = -hp.lr * m.lr  # m.lr includes Muon's shape factor (Muon.group_multipliers)
        table[r, 0] = grads[i].data_ptr()
        table[r, 1] = bufs[i].data_ptr()
        table[r, 2] = params[i].data_ptr()
        scales = states[i].get("momentum_buffer" + lean.ABSMAX)
        table[r, 5] = 0 if scales is None else scales.data_ptr()
        comp = states[i].get(storage.COMPENSATION) if hp.kahan_summation else None
        table[r, 6] = 0 if comp is None else comp.data_ptr()
    table[:, 3] = scal.view(torch.int64).reshape(-1)
    # Stochastic rounding's count (the reference's, mupopt/storage.py) and keys.
    counted = [st for st in states if "step" in st]
    if counted:
        _common.increment_steps(counted)
    if hp.stochastic_rounding:
        for r, i in enumerate(order):
            st = states[i]
            table[r, 4] = int(storage.step_key(st.get("sr_seed", 0), st.get("step", 0))) if "sr_seed" in st else 0
    else:
        table[:, 4] = 0
    aligned = bool((table[:, :3] % _ALIGNMENT == 0).all())
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)

    ns_dtype = hp.ns_dtype
    u_dtype = ns_dtype if ns_dtype in ns.SUPPORTED_DTYPES else torch.float32

    def orthogonalise(U: torch.Tensor) -> torch.Tensor:
        if ns_dtype in ns.SUPPORTED_DTYPES:
            return ns.newton_schulz_triton(U, hp.ns_steps, hp.ns_coefficients, hp.eps, ns_dtype, check_finite=False)
        return newton_schulz(U, hp.ns_steps, hp.ns_coefficients, hp.eps, ns_dtype, check_finite=False).float()

    with ns._device_guard(params[0]):
        launches = []  # (dtypes, idx, table rows, U, numel, grid) per group of one shape
        first = 0
        for (shape, p_dtype, g_dtype, b_dtype), idx in groups.items():
            k = len(idx)
            rows_tab = table[first:first + k]
            first += k
            numel = shape[0] * shape[1]
            U = torch.empty((k, *shape), dtype=u_dtype, device=device)
            grid = (-(-numel // BLOCK), k)
            if numel:
                _common.launch(
                    _muon_momentum_kernel, grid,
                    rows_tab, U, _common.lut(device), numel, 1.0 - hp.momentum, hp.momentum,
                    G_BF16=g_dtype == torch.bfloat16, BUF_BF16=_buffer_kind(b_dtype),
                    U_BF16=u_dtype == torch.bfloat16, NESTEROV=bool(hp.nesterov), ALIGNED=aligned, BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )
            launches.append((p_dtype, idx, rows_tab, U, numel, grid))
        if orthogonalize is not None:
            # Updates shaped like the (local) params, in the caller's order; results restacked.
            updates: list = [None] * len(params)
            for _, idx, _, U, _, _ in launches:
                for k, i in enumerate(idx):
                    updates[i] = U[k].view(params[i].shape)
            ortho = orthogonalize(updates, lambda X: orthogonalise(X.reshape(X.shape[0], X.shape[1], -1)),
                                  hp.ns_steps if hp.ns_steps is not None else len(hp.ns_coefficients))
            outs = [torch.stack([ortho[i].reshape(U.shape[1:]) for i in idx]) if U.numel() else U
                    for _, idx, _, U, _, _ in launches]
        else:
            outs = [orthogonalise(U) if numel else U for _, _, _, U, numel, _ in launches]
        for (p_dtype, _, rows_tab, _, numel, grid), O in zip(launches, outs):
            if numel == 0:
                continue
            O = O.contiguous()
            _common.launch(
                _muon_update_kernel, grid,
                rows_tab, rows_tab.view(torch.float32), O, numel,
                P_BF16=_common.param_kind(_common.storage_kind(p_dtype), hp.stochastic_rounding,
                                          hp.kahan_summation),
                O_BF16=O.dtype == torch.bfloat16, ALIGNED=aligned, BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """As the package's (CUDA, or CPU under TRITON_INTERPRET=1; fp32/bf16; contiguous), plus
    Muon's need for matrices."""
    from . import MATRIX_DTYPES, unsupported_reason as common_reason

    reason = common_reason(tensors, MATRIX_DTYPES)
    if reason is not None:
        return reason
    for i, t in enumerate(tensors):
        if t.ndim < 2:
            return f"tensor {i} has shape {tuple(t.shape)}; Muon steps matrices (ndim >= 2)"
    return None


def register() -> None:
    """Register backend "triton" for the registry name "muon" (idempotent)."""
    if "triton" not in backends.names("muon"):
        backends.register(backends.Backend("muon", "triton", muon_triton, priority=PRIORITY,
                                           unsupported_reason=unsupported_reason, devices=("cuda",),
                                           validates=True, state_bits=lean.STATE_BITS,
                                           # the update kernel's param codes 7 and 8 (_common)
                                           kahan_summation=True))
