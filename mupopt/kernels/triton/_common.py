"""The one multi-tensor traversal of the Triton backend: launch tables, their cache, shared helpers.

Every optimizer step here is one launch per dtype combination for the whole tensor list (LAMB:
three), however many tensors and however many distinct muP multipliers, in the manner of apex's
``multi_tensor_apply``: the work is cut into ``BLOCK``-element chunks, one program per chunk, and
each program finds its tensor and its per-tensor scalars in tables.

Tables (all device tensors, one row per tensor "slot"; slots are the caller's tensors reordered
so that each dtype combination is a contiguous range of slots):

- ``ptrs``    int64 [N, 2R] addresses of the tensors that persist across steps (param, states),
                            then the addresses of their format-8 block scales (0 for other
                            formats; :func:`plan_states`)
- ``numel``   int64 [N]
- ``chunks``  int32 [C, 2]  (slot, chunk number within the tensor) of every chunk
- ``ranges``  int32 [N, 2]  (first chunk, number of chunks) of every slot (LAMB's norm reduction)
- per step, one host-to-device copy of one int64 buffer holding the gradient addresses [N] and
  the per-tensor float32 scalars [N, K] (lr*lr_mult / bias correction, decay factor,
  eps*eps_mult, ...: steps and multipliers may differ per tensor).

Pointers: the kernels load an int64 address from ``ptrs`` and cast it with
``.to(tl.pointer_type(dtype))`` (an ``int_to_ptr``): the pattern of Triton's own grouped-GEMM
tutorial on the GPU. The interpreter (``TRITON_INTERPRET=1``) keeps pointers as raw host
addresses and dereferences them directly, so the same code runs there on CPU tensors, tables
included (checked by tests/test_triton.py); under the interpreter CUDA tensors are refused
(their addresses are device addresses). Passing tensors as kernel arguments instead would
need one launch (or one compiled signature) per tensor count; packing all tensors into one
flat buffer would cost a copy of every parameter per step. The element type of each pointer is
a compile-time storage code (the ``*_BF16`` arguments; :func:`storage_kind`: 0 float32, 1 (True)
bfloat16, 2 float16; 3 and 4 bfloat16 and float16 params rounded stochastically; 5 and 6 the
8-bit states of ``state_bits=8`` with the signed and the unsigned map; 7 and 8 bfloat16 and
float16 params with a compensation, ``kahan_summation``), so float32, bfloat16 and
float16 storage, and any mix of them between the param, the gradient and each state, is one
specialisation each.

Storage layer: :func:`_load` and :func:`_store` are the only place a kernel touches memory for a
param, gradient or state value, whatever the format; the optimizers' kernels hold the math.
Format 8 (mupopt/optim/_lean_states.py): a store quantizes whole 256-element blocks, so every
program's elements start at a multiple of 256 and number a multiple of it (``BLOCK`` here, and
the Muon / Shampoo kernels' own); a load is a gather of the map value times the block's absmax.
Both take the block-scale address from the plan row and the map tables (:func:`lut`) as one
more kernel argument; the results equal ``lean.quantize_`` and ``lean.dequantize`` bit for bit
(tests/test_lean_states_triton.py).

Vectorisation: a pointer made from an integer carries no alignment information, so the compiler
would emit 4-byte accesses. When every address of a launch is 16-byte aligned (checked on the
host; torch allocations are), ``ALIGNED`` adds ``tl.multiple_of(ptr, 16)``; full chunks run
without a mask (a mask against a numel loaded from memory would also block vectorisation) and
only the last chunk of a tensor is masked. Compiled for sm_90 (tests/test_triton.py, no GPU
needed) the full-chunk path uses ``ld.global.v4``/``st.global.v4``.

Caching: the tables that depend only on the param and state tensors (addresses, sizes, dtypes,
chunk tables) are built once and kept in an LRU cache keyed on (op, addresses, sizes, dtypes,
device); a step with the same tensors only reads their addresses to form the key, validates the
gradients, and uploads the per-step buffer. Gradients are not part of the cached tables:
``zero_grad(set_to_none=True)`` gives new gradient tensors every step. The same addresses with
the same sizes and dtypes always mean the same table contents, so a stale hit is impossible.
Parameter contiguity is re-checked every step by the registry (``unsupported_reason``), state
layouts on every cache miss, gradients every step. Host cost of a step on a cache hit, measured
on a loaded 2-core CPU (kernels stubbed out): about 9 us per tensor (1000 tensors: 9 ms), a third
of it ``torch._foreach_add_`` on the CPU step counters, which the reference's contract keeps on
the host; steps kept on the device (as torch's fused/capturable AdamW) would remove that part.

Numerics: fp32 math inside; every per-tensor scalar is formed in float64 on the host exactly as
the reference forms it (e.g. ``-lr*lr_mult/(1-b1^t)``) and rounded once to float32, which is what
torch does with a Python scalar applied to a float32 tensor; divisions and square roots are the
IEEE-rounded ``div_rn``/``sqrt_rn`` as in torch. Stores to bfloat16 and float16 round to nearest
even (on the GPU the hardware conversion; under the interpreter, whose own bfloat16 conversion
truncates, bfloat16 is rounded with integer ops and float16 by numpy's conversion, which rounds to
nearest even: interpreter results equal torch's bit for bit, tests/test_triton.py).

GradScaler (mupopt.optim._base, mupopt.backends): with a scale, every kernel takes one more
pointer, to a float32 1/scale on the device (``HAS_GRAD_SCALE``, a compile-time flag: one more
specialisation, compiled once; the scale's value is runtime data, so GradScaler's changing scale
never recompiles), multiplies the gradient by it in float32 and stores the unscaled gradient back
(torch's fused AdamW leaves it in p.grad): 4 more bytes per element for fp32 gradients. The
``found_inf`` skip is not in the kernels: step counts and the bias corrections formed from them
are host values here, so the base class reads found_inf on the host (one synchronisation, what
GradScaler's own unfused path costs) and does not call the backend at all when it is set. A
device-side skip would need device-side step counts (as torch's fused AdamW with capturable
steps) and per-step scalars computed on the device.
"""
from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from ... import storage
from ...optim import _lean_states as lean

# Elements per program and warps: 8192 with 16 warps (16 elements per thread, four 16-byte
# accesses per operand), from benchmarks/tune_triton.py on an H200 (torch 2.11, triton 3.6,
# 2026-11-27): AdamW on one 2^26 fp32 tensor at 57% of copy against 39% for the first, untuned
# 4096 x 8 (2048 x 4: 55%; 8192 x 8: 29%), ADOPT/SophiaG/LAMB 54-57% against 39-47%, AdamW on
# Llama-1B 73% against 63%. Still below the cuda backend (80% and 90%).
BLOCK = 8192
NUM_WARPS = 16
# Chunk partials per iteration of LAMB's per-tensor norm reduction.
REDUCE_BLOCK = 1024
ALIGNMENT = 16
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CACHE_SIZE = 64
# Storage codes of the kernels' compile-time dtype arguments (False/True are 0/1): those of
# mupopt.storage.Format. 3 and 4 are param formats only: bfloat16 / float16 storage whose stores
# round stochastically (_store with the tensor's key; keys_arg).
_KIND = {dtype: int(code) for dtype, code in storage.FORMAT_CODES.items()}
_STOCHASTIC_KIND = {_KIND[dtype]: int(code) for dtype, code in storage.STOCHASTIC_FORMATS.items()}
# 7 and 8: bfloat16 and float16 params with a compensation (kahan_summation, mupopt/storage.py):
# loaded as p + c, stored as p = x rounded, c = x - p rounded; c's address is in the param's
# block-scale column of the plan row (a param is never in format 8, so the column is free).
_COMPENSATED_KIND = {_KIND[torch.bfloat16]: 7, _KIND[torch.float16]: 8}
# Format 8 (state_bits=8, mupopt/optim/_lean_states.py): uint8 codes and a float32 absmax per
# lean.BLOCK elements; the code says which map decodes them (a state entry's sign is fixed).
Q8_SIGNED, Q8_UNSIGNED = 5, 6
_Q8_KIND = {lean.SIGNED: Q8_SIGNED, lean.UNSIGNED: Q8_UNSIGNED}
# The lookup tables of both maps in one float32 tensor (:func:`lut`), per map: the 256 values,
# then _lean_states._buckets' 2^16 "inside" midpoints and 2^16 base counts (as floats: exact).
_LUT_INSIDE = 256
_LUT_BASE = 256 + (1 << 16)
LUT_SIZE = 256 + 2 * (1 << 16)
_Q8_BLOCK = tl.constexpr(lean.BLOCK)
_LUT_INSIDE_C = tl.constexpr(_LUT_INSIDE)
_LUT_BASE_C = tl.constexpr(_LUT_BASE)
_LUT_SIZE_C = tl.constexpr(LUT_SIZE)


def storage_kind(dtype: torch.dtype) -> int:
    """The kernels' storage code of ``dtype``: 0 float32, 1 bfloat16, 2 float16."""
    return _KIND[dtype]


@functools.lru_cache(maxsize=None)
def _lut(maps: str, device: torch.device) -> torch.Tensor:
    """One table tensor per (maps, device): 1 MiB, built once."""
    parts = []
    for kind in (lean.SIGNED, lean.UNSIGNED):
        values, _ = lean.map_tensor(kind, "cpu", maps)
        base, inside = lean._buckets(maps, kind, torch.device("cpu"))
        parts += [values, inside, base.to(torch.float32)]
    return torch.cat(parts).to(device)


def lut(device: torch.device) -> torch.Tensor:
    """The format-8 lookup tables (float32 [2 * LUT_SIZE]: signed map, then unsigned) of the maps
    in use (``lean.maps``) on ``device``: every elementwise kernel takes it (one signature for
    every format; read only for codes 5 and 6)."""
    return _lut(lean.maps, torch.device(device))


def param_kind(kind: int, stochastic: bool, compensated: bool = False) -> int:
    """A param's storage code with stochastic rounding on: 3 for bfloat16, 4 for float16; with
    kahan_summation: 7 and 8; float32 stores are exact and keep their code."""
    if compensated:
        return _COMPENSATED_KIND.get(kind, kind)
    return _STOCHASTIC_KIND.get(kind, kind) if stochastic else kind


# Test seam: when set, launch() hands (kernel, grid, args, meta) to it instead of launching
# (tests/test_triton.py compiles the real argument lists for sm_90 on a machine without a GPU).
LAUNCH_HOOK: Callable | None = None


@triton.jit
def _probe():
    pass


# Whether these kernels run in the interpreter: decided by triton.jit when this module was
# imported (TRITON_INTERPRET at that time), which is what counts, not the environment now.
INTERPRET = type(_probe).__name__ == "InterpretedFunction"
_INTERPRET = tl.constexpr(INTERPRET)


# ---------------------------------------------------------------------------------------------
# Device-side helpers shared by every kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def _chunk_coords(chunks_ptr, numel_ptr, BLOCK: tl.constexpr):
    """(slot, element offsets, mask, whether the chunk is full) of this program's chunk."""
    c = tl.program_id(0)
    slot = tl.load(chunks_ptr + 2 * c)
    j = tl.load(chunks_ptr + 2 * c + 1)
    numel = tl.load(numel_ptr + slot)
    # int64 offsets: a tensor may have more than 2^31 elements.
    start = j.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return slot, offs, offs < numel, start + BLOCK <= numel


@triton.jit
def _chunk_inputs(chunks_ptr, numel_ptr, grad_ptrs_ptr, inv_scale_ptr, keys_ptr, P_KIND: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """What every elementwise kernel reads first: :func:`_chunk_coords`, then its gradient's
    address, the 1/grad scale (1.0 unless HAS_GRAD_SCALE) and the param's stochastic rounding
    key (0 unless the param code is 3 or 4)."""
    slot, offs, mask, full = _chunk_coords(chunks_ptr, numel_ptr, BLOCK)
    g_addr = tl.load(grad_ptrs_ptr + slot)
    if HAS_GRAD_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    else:
        inv_scale = 1.0  # unused
    if P_KIND == 3 or P_KIND == 4:
        key = tl.load(keys_ptr + slot).to(tl.uint32)
    else:
        key = 0  # unused
    return slot, offs, mask, full, g_addr, inv_scale, key


@triton.jit
def _load(addr, offs, mask, IS_BF16: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, absmax=0, lut=0):
    """Load elements ``offs`` of the tensor at int64 address ``addr`` as float32. ``IS_BF16`` is
    the storage code (:func:`storage_kind`; a bool means float32 or bfloat16; 5 and 6: format-8
    codes at ``addr``, their blocks' absmax at int64 address ``absmax``, decoded with the map
    tables at pointer ``lut``, :func:`lut`).

    Only a tensor's last chunk is masked: a mask against a numel read from memory would keep the
    compiler from vectorising the full chunks. The address is typed here rather than by a helper
    of its own: on the GPU it is free either way, but each nested jit call costs about 0.7 ms
    per program in the interpreter (AdamW step on the test list: 62 -> 30 ms).

    Codes 7 and 8 (a compensated bfloat16 / float16 param): p + c in float32, c at int64
    address ``absmax`` (mupopt/storage.py, "Compensated stores").
    """
    if IS_BF16 >= 7:
        x = _load_compensated(addr, offs, mask, IS_BF16, ALIGNED, MASKED, absmax)
    elif IS_BF16 >= 5:
        x = _load_q8(addr, offs, mask, IS_BF16, MASKED, absmax, lut)
    else:
        if IS_BF16 == 2 or IS_BF16 == 4:
            ptr = addr.to(tl.pointer_type(tl.float16))
        elif IS_BF16:
            ptr = addr.to(tl.pointer_type(tl.bfloat16))
        else:
            ptr = addr.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            # The host checked every address of this launch is 16-byte aligned; without the hint an
            # int_to_ptr pointer gets scalar 4-byte accesses.
            ptr = tl.multiple_of(ptr, 16)
        if MASKED:
            x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(ptr + offs).to(tl.float32)
    return x


@triton.jit
def _load_compensated(addr, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, comp):
    """p + c of a compensated param (codes 7 bfloat16, 8 float16): one rounded float32 addition.
    c's address carries no alignment hint (the host checks the params' alignment only)."""
    if KIND == 8:
        ptr = addr.to(tl.pointer_type(tl.float16))
        cptr = comp.to(tl.pointer_type(tl.float16))
    else:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
        cptr = comp.to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    if MASKED:
        p = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(cptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(ptr + offs).to(tl.float32)
        c = tl.load(cptr + offs).to(tl.float32)
    return p + c


@triton.jit
def _store_compensated(addr, offs, x, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, comp):
    """Codes 7 and 8: p = x rounded to nearest even, c = (x - p) rounded (x - p is exact in
    float32), each stored in the param's dtype."""
    if KIND == 8:
        ptr = addr.to(tl.pointer_type(tl.float16))
        cptr = comp.to(tl.pointer_type(tl.float16))
        y = x.to(tl.float16)
        c = (x - y.to(tl.float32)).to(tl.float16)
    else:
        ptr = addr.to(tl.pointer_type(tl.bfloat16))
        cptr = comp.to(tl.pointer_type(tl.bfloat16))
        if _INTERPRET:
            y = _bf16_rtne(x)
            c = _bf16_rtne(x - y.to(tl.float32))
        else:
            y = x.to(tl.bfloat16)
            c = (x - y.to(tl.float32)).to(tl.bfloat16)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    if MASKED:
        tl.store(ptr + offs, y, mask=mask)
        tl.store(cptr + offs, c, mask=mask)
    else:
        tl.store(ptr + offs, y)
        tl.store(cptr + offs, c)


@triton.jit
def _load_q8(addr, offs, mask, KIND: tl.constexpr, MASKED: tl.constexpr, absmax, lut):
    """Format 8's value of each element: MAP[code] * absmax of its block (float32 product)."""
    codes_ptr = addr.to(tl.pointer_type(tl.uint8))
    scales = absmax.to(tl.pointer_type(tl.float32))
    if MASKED:
        code = tl.load(codes_ptr + offs, mask=mask, other=0)
        scale = tl.load(scales + offs // _Q8_BLOCK, mask=mask, other=0.0)
    else:
        code = tl.load(codes_ptr + offs)
        scale = tl.load(scales + offs // _Q8_BLOCK)
    return tl.load(lut + (KIND - 5) * _LUT_SIZE_C + code.to(tl.int32)) * scale


@triton.jit
def _store_q8(addr, offs, x, mask, KIND: tl.constexpr, MASKED: tl.constexpr, absmax, lut):
    """Store float32 ``x`` in format 8 (lean.quantize_: absmax per block, y = x/absmax, the code
    of the nearest map value by _lean_states._buckets' two lookups). Every block of 256 lies in
    one program: the program's elements start at a multiple of 256 and number a multiple of it;
    lanes past the tensor's end count as 0, as lean.quantize_'s padding."""
    N: tl.constexpr = x.shape[0]
    if MASKED:
        x = tl.where(mask, x, 0.0)
    xb = tl.reshape(x, (N // _Q8_BLOCK, _Q8_BLOCK))
    amax = tl.max(tl.abs(xb), axis=1)
    # A NaN anywhere makes its block's absmax NaN (torch's amax; a GPU max drops NaN operands).
    has_nan = tl.max((xb != xb).to(tl.int32), axis=1) > 0
    amax = tl.where(has_nan, float("nan"), amax)
    live = amax > 0.0
    y = tl.div_rn(xb, tl.where(live, amax, 1.0)[:, None])
    y = tl.where(live[:, None], y, 0.0)
    table = lut + (KIND - 5) * _LUT_SIZE_C
    bucket = (y.to(tl.uint32, bitcast=True) >> 16).to(tl.int32)
    code = tl.load(table + _LUT_BASE_C + bucket).to(tl.int32) + (y > tl.load(table + _LUT_INSIDE_C + bucket)).to(tl.int32)
    code = tl.reshape(code, (N,)).to(tl.uint8)
    block = tl.min(tl.reshape(offs, (N // _Q8_BLOCK, _Q8_BLOCK)), axis=1) // _Q8_BLOCK
    codes_ptr = addr.to(tl.pointer_type(tl.uint8))
    scales = absmax.to(tl.pointer_type(tl.float32))
    if MASKED:
        tl.store(codes_ptr + offs, code, mask=mask)
        in_tensor = tl.max(tl.reshape(mask.to(tl.int32), (N // _Q8_BLOCK, _Q8_BLOCK)), axis=1) > 0
        tl.store(scales + block, amax, mask=in_tensor)
    else:
        tl.store(codes_ptr + offs, code)
        tl.store(scales + block, amax)


@triton.jit
def _bf16_rtne(x):
    """float32 -> bfloat16 rounding to nearest even with integer ops (interpreter only)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    # NaN stays a (quiet) NaN: rounding must not carry its payload into the exponent.
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (mupopt/storage.py mix32)."""
    x = x ^ (x >> 16)
    x = x * tl.cast(0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.cast(0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _random_bits(key, offs):
    """The 16 random bits of elements ``offs`` (int64 indices in their tensor) under the
    tensor's ``key`` (uint32): mupopt/storage.py random_bits (one word per pair of elements,
    hashed here once per element: on a GPU the hash is not what a step waits for)."""
    pair = offs >> 1
    lo = (pair & 0xFFFFFFFF).to(tl.uint32)
    hi = (pair >> 32).to(tl.uint32)
    word = _mix32(lo ^ (hi * tl.cast(0x9E3779B9, tl.uint32)) ^ key)
    return (word >> ((offs & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def _bf16_stochastic(x, r):
    """float32 -> bfloat16 rounded stochastically with random bits r (mupopt/storage.py): inf
    stays inf, NaN keeps its upper half with the quiet bit set."""
    u = x.to(tl.uint32, bitcast=True)
    body = u & 0x7FFFFFFF
    up = (u + tl.where(body < 0x7F800000, r, 0)) >> 16
    bits = tl.where(body > 0x7F800000, up | 0x40, up)
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _f16_stochastic(x, r):
    """float32 -> float16 rounded stochastically with random bits r (mupopt/storage.py)."""
    u = x.to(tl.uint32, bitcast=True)
    ua = u & 0x7FFFFFFF
    normal = (ua + (r >> 3)) & tl.cast(0xFFFFE000, tl.uint32)
    # Below 2^-14 (pattern 0x38800000) in units of 2^-24; the clamp on the pattern keeps the
    # other lanes (NaN included) finite for the int32 conversions.
    a = tl.where(ua < 0x38800000, ua, 0x38800000).to(tl.float32, bitcast=True)
    y = a * 16777216.0
    whole = y.to(tl.int32).to(tl.float32)
    threshold = ((y - whole) * 65536.0).to(tl.int32)
    up = (r.to(tl.int32) < threshold).to(tl.float32)
    small = ((whole + up) * 5.960464477539063e-08).to(tl.uint32, bitcast=True)
    mag = tl.where(ua < 0x38800000, small, normal)
    value = tl.where(ua < 0x7F800000, (mag | (u & tl.cast(0x80000000, tl.uint32))).to(tl.float32, bitcast=True), x)
    return value.to(tl.float16)


@triton.jit
def _store(addr, offs, x, mask, IS_BF16: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr, key=0,
           absmax=0, lut=0):
    """Store float32 ``x`` in the storage format (storage code ``IS_BF16`` as :func:`_load`;
    bf16 and fp16: round to nearest even, as torch; codes 3 and 4: bf16 and fp16 rounded
    stochastically with the random bits of ``key``, the tensor's uint32 key, and ``offs``; 5
    and 6: format 8, :func:`_store_q8`, ``absmax`` and ``lut`` as in :func:`_load`).
    7 and 8: a compensated param, :func:`_store_compensated`, c at address ``absmax``).
    The storage layer of this backend: a new format is one more code here and in _load."""
    if IS_BF16 >= 7:
        _store_compensated(addr, offs, x, mask, IS_BF16, ALIGNED, MASKED, absmax)
    elif IS_BF16 >= 5:
        _store_q8(addr, offs, x, mask, IS_BF16, MASKED, absmax, lut)
    else:
        if IS_BF16 == 2 or IS_BF16 == 4:
            ptr = addr.to(tl.pointer_type(tl.float16))
        elif IS_BF16:
            ptr = addr.to(tl.pointer_type(tl.bfloat16))
        else:
            ptr = addr.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        if IS_BF16 == 3:
            y = _bf16_stochastic(x, _random_bits(key, offs))
        elif IS_BF16 == 4:
            y = _f16_stochastic(x, _random_bits(key, offs))
        elif IS_BF16 == 2:
            y = x.to(tl.float16)  # cvt.rn; the interpreter: numpy's astype, also nearest even
        elif IS_BF16:
            if _INTERPRET:
                y = _bf16_rtne(x)
            else:
                y = x.to(tl.bfloat16)  # cvt.rn
        else:
            y = x
        if MASKED:
            tl.store(ptr + offs, y, mask=mask)
        else:
            tl.store(ptr + offs, y)


@triton.jit
def _entry(row, k: tl.constexpr, ROW: tl.constexpr, KIND: tl.constexpr):
    """(address, block-scale address) of static role ``k`` in a plan row of ``ROW`` columns
    (Plan.row): the scale's only for format 8 (codes 5 and 6), else 0."""
    addr = tl.load(row + k)
    if KIND >= 5:
        absmax = tl.load(row + ROW // 2 + k)
    else:
        absmax = 0
    return addr, absmax


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp with a scalar weight, in the form of ATen's vectorised CPU kernel."""
    diff = end - start
    return tl.where(weight < 0.5, start + weight * diff, end + (weight - 1.0) * diff)


# ---------------------------------------------------------------------------------------------
# Host side: validation, launch plans and their cache, per-step upload
# ---------------------------------------------------------------------------------------------
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def refusal(op: str) -> str:
    """How the triton backend's refusals of ``op``'s tensors start."""
    return f"backend 'triton' cannot step these {op} tensors"


def fail(op: str, message: str) -> None:
    raise RuntimeError(f"{refusal(op)}: {message}")


def _check_tensor(op: str, role: str, i: int, t: torch.Tensor, ref: torch.Tensor, scale=None, sign=None) -> None:
    """``scale``: the absmax tensor of a format-8 state (codes ``t``), None for other formats;
    ``sign``: the role's map sign (lean.SIGNED / UNSIGNED) where it may be in format 8."""
    if type(t) not in _PLAIN:
        # A wrapper subclass (DTensor) has no storage of its own: data_ptr() would be 0.
        fail(op, f"{role} {i} is a {type(t).__name__}, a tensor subclass: pass its local tensor")
    if t.device != ref.device:
        fail(op, f"{role} {i} is on {t.device}, its parameter on {ref.device} (one device per call)")
    if role == "param" and scale is not None:  # a compensation (kahan_summation), shaped like the param
        if (type(scale) not in _PLAIN or scale.dtype != t.dtype or scale.shape != t.shape or not scale.is_contiguous()
                or scale.device != t.device):
            fail(op, f"{storage.COMPENSATION} {i} must be a contiguous {t.dtype} tensor of shape {tuple(t.shape)} on "
                     f"{t.device}, like its parameter")
        scale = None
    if sign is not None and (t.dtype == torch.uint8) != (scale is not None):
        fail(op, f"{role} {i} has dtype {t.dtype} and {'a' if scale is not None else 'no'} {role}{lean.ABSMAX} "
                 f"entry: an 8-bit state (state_bits=8) is uint8 codes with float32 block scales")
    if scale is not None:
        if BLOCK % lean.BLOCK:
            fail(op, f"BLOCK = {BLOCK} is not a multiple of {lean.BLOCK}: a program must hold whole blocks of "
                     f"its 8-bit states")
        blocks = lean.blocks_of(t.numel())
        if (type(scale) not in _PLAIN or scale.dtype != torch.float32 or scale.shape != (blocks,)
                or not scale.is_contiguous() or scale.device != t.device):
            fail(op, f"{role}{lean.ABSMAX} {i} must be a contiguous float32 tensor of shape ({blocks},) on "
                     f"{t.device}, not {scale.dtype} {tuple(scale.shape)} on {scale.device}")
    elif t.dtype not in SUPPORTED_DTYPES:
        fail(op, f"{role} {i} has dtype {t.dtype}; supported: float32, bfloat16, float16")
    if t.shape != ref.shape:
        fail(op, f"{role} {i} has shape {tuple(t.shape)}, its parameter {tuple(ref.shape)}")
    if not t.is_contiguous():
        fail(
            op,
            f"{role} {i} (shape {tuple(t.shape)}, strides {t.stride()}) is not contiguous; the "
            f"kernels read each tensor as one flat array: make it contiguous or use backend='reference'",
        )


def check_grads(op: str, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    if len(grads) != len(params):
        fail(op, f"{len(grads)} gradients for {len(params)} parameters")
    for i, (p, g) in enumerate(zip(params, grads)):
        if type(g) not in _PLAIN or g.dtype not in SUPPORTED_DTYPES or g.shape != p.shape or not g.is_contiguous() or g.device != p.device:
            _check_tensor(op, "gradient", i, g, p)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the slots [s0, s1) sharing one dtype combination."""

    kinds: tuple[int, ...]  # storage codes (storage_kind) per static role, then the gradient
    aligned: bool  # every static address of the launch is 16-byte aligned
    s0: int
    s1: int
    c0: int  # first chunk of the launch in Plan.chunks
    n_chunks: int
    chunks: torch.Tensor  # view of Plan.chunks: this launch's chunks
    ranges: torch.Tensor  # view of Plan.ranges: this launch's slots


def _kind_of(t: torch.Tensor, sign) -> int:
    """The storage code of a static tensor: its dtype's, or format 8's for the codes of a role
    whose map sign is ``sign``."""
    return _Q8_KIND[sign] if t.dtype == torch.uint8 else _KIND[t.dtype]


class Plan:
    """Tables of one tensor list (see the module docstring); built once per cache key.

    ``ptrs`` rows hold the R static addresses, then R addresses of their format-8 block scales
    (0 for other formats): ``row`` = 2R int64 columns per slot."""

    def __init__(self, static_lists: Sequence[Sequence[torch.Tensor]], grads: Sequence[torch.Tensor],
                 scales: Sequence | None = None, signs: Sequence | None = None):
        first_list = static_lists[0]
        n = len(first_list)
        roles = len(static_lists)
        scales = scales or [None] * roles
        signs = signs or [None] * roles
        self.device = first_list[0].device
        self.n = n
        self.row = 2 * roles
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            flags = tuple(_kind_of(lst[i], sign) for lst, sign in zip(static_lists, signs)) + (_KIND[grads[i].dtype],)
            groups.setdefault(flags, []).append(i)
        self.order = [i for members in groups.values() for i in members]
        self.identity = self.order == list(range(n))
        self.order_t = torch.tensor(self.order, dtype=torch.long)

        numel = [first_list[i].numel() for i in self.order]
        counts = [-(-k // BLOCK) for k in numel]
        first = list(itertools.accumulate([0] + counts[:-1]))
        self.n_chunks = sum(counts)
        slot_of_chunk = torch.repeat_interleave(torch.arange(n), torch.tensor(counts, dtype=torch.long))
        chunk_no = torch.arange(self.n_chunks) - torch.tensor(first, dtype=torch.long)[slot_of_chunk]
        chunks = torch.stack([slot_of_chunk, chunk_no], 1).to(torch.int32)
        ranges = torch.tensor([first, counts], dtype=torch.int32).T.contiguous().reshape(n, 2)
        ptrs = torch.tensor([[lst[i].data_ptr() for lst in static_lists]
                             + [sc[i].data_ptr() if sc is not None and sc[i] is not None else 0 for sc in scales]
                             for i in self.order], dtype=torch.int64)

        dev = self.device
        self.ptrs = ptrs.reshape(n, self.row).to(dev)
        self.numel = torch.tensor(numel, dtype=torch.int64).to(dev)
        self.chunks = chunks.to(dev)
        self.ranges = ranges.to(dev)

        self.launches: list[Launch] = []
        s0 = 0
        for flags, members in groups.items():
            s1 = s0 + len(members)
            c0, c1 = first[s0], first[s1 - 1] + counts[s1 - 1]
            aligned = all(
                lst[i].data_ptr() % ALIGNMENT == 0 for lst in static_lists for i in members if lst[i].numel()
            )
            self.launches.append(
                Launch(flags, aligned, s0, s1, c0, c1 - c0, self.chunks[c0:c1], self.ranges[s0:s1])
            )
            s0 = s1

    def keys_arg(self, states: Sequence[dict], stochastic: bool) -> torch.Tensor:
        """The kernels' stochastic-rounding key table: int64 [N] in slot order, each tensor's
        key at this step (mupopt.storage.step_key of its seed and its step count, incremented
        already), or without the option the placeholder ``numel`` (never read: the param codes
        are then below 3). A tensor either way: no other kernel signature."""
        if not stochastic:
            return self.numel
        keys = [storage.step_key(st.get("sr_seed", 0), st["step"]) for st in states]
        keys = [int(k) for k in keys]
        if not self.identity:
            keys = [keys[i] for i in self.order]
        return torch.tensor(keys, dtype=torch.int64).to(self.device)

    def inv_scale_arg(self, inv_grad_scale: torch.Tensor | None) -> torch.Tensor:
        """The kernels' 1/grad-scale pointer argument: the float32 scale on this plan's device,
        or without one a placeholder (``numel``) that the kernels never read (HAS_GRAD_SCALE
        False). A tensor, never None: a None argument would be a different kernel signature."""
        if inv_grad_scale is None:
            return self.numel
        return inv_grad_scale.to(device=self.device, dtype=torch.float32).reshape(1)

    def device_guard(self):
        """The kernels launch on the current device: make it the tensors' device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def upload(self, grads: Sequence[torch.Tensor], scalars: torch.Tensor | None):
        """One host-to-device copy per step: gradient addresses and per-tensor float32 scalars.

        ``scalars`` is float64 or float32 [N, K] in the caller's order (K even), or None.
        Returns (grad address table, flat scalar table or None, whether every gradient is
        16-byte aligned).
        """
        if self.identity:
            addrs = [g.data_ptr() for g in grads]
        else:
            addrs = [grads[i].data_ptr() for i in self.order]
        aligned = all(a % ALIGNMENT == 0 for a in addrs)
        buf = torch.tensor(addrs, dtype=torch.int64)
        if scalars is not None:
            if not self.identity:
                scalars = scalars.index_select(0, self.order_t)
            assert scalars.shape[1] % 2 == 0, "pad the per-tensor scalars to an even count"
            scalars = scalars.to(torch.float32).contiguous()
            buf = torch.cat([buf, scalars.view(torch.int64).reshape(-1)])
        if self.device.type == "cuda":
            # Pinned + non_blocking: the copy does not wait for the GPU; the caching host
            # allocator keeps the buffer until the copy has run.
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        n = self.n
        return buf[:n], (buf[n:].view(torch.float32) if scalars is not None else None), aligned


_CACHE: "OrderedDict[tuple, Plan]" = OrderedDict()
_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel


def plan_for(
    op: str,
    roles: Sequence[str],
    static_lists: Sequence[Sequence[torch.Tensor]],
    grads: Sequence[torch.Tensor],
    scales: Sequence | None = None,
    signs: Sequence | None = None,
) -> Plan:
    """The cached Plan of these tensors (built and validated on a miss).

    ``static_lists[k]`` holds the tensors of role ``roles[k]`` (the first role gives sizes and
    the device); gradients are validated here every step. ``scales[k]`` (optional): None, or per
    tensor the absmax tensor of a format-8 state (None where the state is in another format);
    ``signs[k]``: the map sign of a role that may be in format 8. :func:`plan_states` forms them.
    """
    first_list = static_lists[0]
    check_grads(op, first_list, grads)
    scales = scales or [None] * len(static_lists)
    key = [op, BLOCK, first_list[0].device, tuple(map(_NUMEL, first_list)), tuple(g.dtype for g in grads)]
    for lst, sc in zip(static_lists, scales):
        if len(lst) != len(first_list):
            fail(op, f"{len(lst)} tensors of one role for {len(first_list)} parameters")
        key.append(tuple(map(_PTR, lst)))
        key.append(tuple(t.dtype for t in lst))
        if sc is not None:
            key.append(tuple(0 if t is None else t.data_ptr() for t in sc))
    key = tuple(key)
    plan = _CACHE.get(key)
    if plan is not None:
        _CACHE.move_to_end(key)
        return plan
    signs = signs or [None] * len(static_lists)
    for role, lst, sc, sign in zip(roles, static_lists, scales, signs):
        for i, (t, ref) in enumerate(zip(lst, first_list)):
            _check_tensor(op, role, i, t, ref, None if sc is None else sc[i], sign)
    plan = Plan(static_lists, grads, scales, signs)
    _CACHE[key] = plan
    if len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


def plan_states(op: str, params, grads, states, keys: Sequence[str], kinds: dict, compensated: bool = False) -> Plan:
    """The Plan of ``params`` and their state entries ``keys`` (roles "param", then the keys), in
    any state format: 32 or 16 (a float dtype) or 8 (uint8 codes, the block scales of
    ``key + lean.ABSMAX``, decoded with the map of ``kinds[key]``). ``compensated``
    (kahan_summation): each bfloat16 / float16 param's compensation goes in its block-scale
    column (kernel codes 7 and 8)."""
    static = [params] + [[st[k] for st in states] for k in keys]
    comps = None
    if compensated:
        comps = storage.compensations_of(refusal(op), params, states)
    scales = [comps] + [[st.get(k + lean.ABSMAX) for st in states] for k in keys]
    return plan_for(op, ["param", *keys], static, grads, scales, [None] + [kinds.get(k) for k in keys])


def clear_cache() -> None:
    _CACHE.clear()


def launch(kernel, grid, *args, num_warps: int | None = None, **meta) -> None:
    """kernel[grid](*args, **meta); num_warps defaults to NUM_WARPS as it is now (read at each
    launch, like BLOCK, so that benchmarks/tune_triton.py can sweep both)."""
    if num_warps is None:
        num_warps = NUM_WARPS
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kernel, grid, args, dict(meta, num_warps=num_warps))
        return
    kernel[grid](*args, num_warps=num_warps, **meta)


# ---------------------------------------------------------------------------------------------
# Step counts and multipliers (host)
# ---------------------------------------------------------------------------------------------
def read_steps(states: Sequence[dict]) -> torch.Tensor:
    """The states' step counts as a float64 CPU vector."""
    steps = [st["step"] for st in states]
    try:
        return torch.stack(steps).to("cpu", torch.float64)
    except (RuntimeError, TypeError):  # steps on several devices, or plain numbers
        return torch.tensor([float(s) for s in steps], dtype=torch.float64)


def increment_steps(states: Sequence[dict]) -> None:
    """state["step"] += 1 for every tensor, on the host as the reference does."""
    steps = [st["step"] for st in states]
    if all(isinstance(s, torch.Tensor) for s in steps):
        torch._foreach_add_(steps, 1.0)
    else:
        for st in states:
            st["step"] += 1


def mult_table(mults) -> torch.Tensor:
    """[N, 3] float64: (lr, wd, eps) multipliers per tensor."""
    return torch.tensor([tuple(m) for m in mults], dtype=torch.float64).reshape(-1, 3)
