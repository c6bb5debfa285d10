"""How a computed float32 value is stored: the storage layer of the reference backend.

Every backend keeps its load/store conversions in one place, keyed by a storage code:

- reference: this module (:func:`store_param`, :func:`round_stochastic`);
- cpu / cuda: ``csrc/include/mupopt/storage.h`` (``Rounding``, ``store_value``; ``load_param`` /
  ``store_param`` with ``Rounding::kCompensated`` for ``kahan_summation``);
- triton: ``mupopt/kernels/triton/_common.py`` (``_load`` / ``_store``, storage codes
  :data:`FORMAT_CODES`; 7 and 8 the compensated params of ``kahan_summation``).

Formats (the codes the Triton kernels take as compile-time constants; the C++ loops take the
dtype and a :class:`Rounding` as template arguments): float32, bfloat16 and float16 rounded to
nearest even (what torch's ``copy_`` does), and bfloat16 and float16 rounded stochastically.
A block-quantized 8-bit state format would be one more code here and one more pair of load /
store functions in each backend's storage layer; the per-element math does not change.

Stochastic rounding (``stochastic_rounding=True`` on every optimizer; param stores only, the
states keep their rounding to nearest). E[stored] equals the float32 result exactly:

Each element gets 16 random bits r (below):

- bfloat16: r is added to the float32 bit pattern below bfloat16's mantissa and the low 16
  bits are truncated. A value a fraction f of the way from its lower neighbour (in magnitude)
  to the upper one carries f*2^16 in those bits, so it rounds up with probability f.
- float16: for |x| >= 2^-14 (float16's normals) float16 keeps 10 of float32's 23 mantissa bits:
  the same rule with the top 13 bits of r. Below 2^-14 float16's spacing is the fixed 2^-24,
  which is more than 13 dropped bits: y = |x|*2^24 (exact) splits into floor(y) and frac = y -
  floor(y) (exact); the value rounds up when r (as an integer) is below frac*2^16, truncated.
  That is exact for |x| >= 2^-17 (frac has at most 16 bits); below, the value rounds up with a
  probability low by less than 2^-16, a bias below 2^-40 in absolute terms.
- inf stays inf and NaN a quiet NaN (bfloat16: the upper half of its bits with the quiet bit
  set; float16: torch's conversion); finite values above the largest bfloat16 / float16 round to
  inf with the probability of their fraction.
- float32 and float64 params: the option does nothing (their store is exact), so a group may mix
  bfloat16 and float32 params (e.g. norms kept in float32).

Random bits: counter-based, a pure function of (seed, step, element index), so every backend
produces the same bits (tests/test_stochastic_rounding.py compares reference, cpu and triton bit
for bit) and a resume from a state_dict continues the same stream:

- seed: one 32-bit integer per parameter, ``state["sr_seed"]``, drawn from torch's default
  generator when the parameter is first stepped with the option on (``torch.manual_seed`` makes a
  run reproducible); it is saved with the state, so it is also the parameter's key: no two
  parameters share a stream unless their seeds collide (probability 2^-32 per pair);
- step: the state's step count after this step's increment (Muon's matrices, which have no step
  count of their own, get one when the option is on);
- element index: the element's offset in the param's memory (the flat index of a contiguous
  param; a param the fused backends step through a contiguous copy: its row-major index), the
  same however a backend cuts the tensor into chunks.

One 32-bit word per pair of elements, j = i >> 1: word(j) = mix32(key ^ lo32(j) ^
hi32(j)*0x9E3779B9) with key = mix32(mix32(step) ^ seed); element i takes its low half when i
is even, its high half when i is odd. mix32 is C. Wellons' "lowbias32" (hash-prospector, 2018):
two multiply-xorshift rounds, full avalanche of every input bit (bias 0.17 by its author's
measure), cheap in vector integer code. 16 bits are all a bfloat16 store consumes, so one word
serves two elements: the hash was most of what the option costs on the CPU (docs/dtypes.md),
and sharing it cuts that cost (measured in docs/dtypes.md).
Arithmetic is modulo 2^32; here in int64 tensors or Python ints with explicit masks, every
product split into 16-bit halves so that nothing overflows int64.

Compensated stores (``kahan_summation=True`` on every optimizer; the alternative to stochastic
rounding, the two are refused together): a bfloat16 / float16 param keeps a second tensor of its
dtype and shape, ``state["param_compensation"]`` = c, the rounding error of its last store
(Zamirai et al. 2020, "Revisiting BFloat16 Training", arXiv 2010.06192, Kahan-summation weight
update). The step reads the param as x = float32(p) + float32(c) (one rounded float32 addition),
applies its update to x in float32 as for any param, and stores

    p = round_nearest(x),   c = round_nearest(x - float32(p))

x - p is exact in float32 (p is x rounded to nearest), so p + c holds x to about 16 significant
bits (bfloat16: 8 + 8) where p alone holds 8: an update smaller than half a spacing of p
accumulates in c until it moves p, deterministically, at 2 bytes per element. float16's c is
limited by float16's range (errors below 2^-24 are lost). A non-finite x makes c NaN (inf - inf), so
the param is NaN after its next step. float32 and float64 params: the option does nothing.
"""
from __future__ import annotations

import enum

import torch

MASK32 = 0xFFFFFFFF
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads the high word of a 64-bit index


class Format(enum.IntEnum):
    """Storage codes (the Triton kernels' constexpr storage argument; _common.storage_kind)."""

    FP32 = 0
    BF16 = 1
    FP16 = 2
    BF16_SR = 3
    FP16_SR = 4


# The code of each storage dtype, and of its stochastically rounded param store.
FORMAT_CODES = {torch.float32: Format.FP32, torch.bfloat16: Format.BF16, torch.float16: Format.FP16}
STOCHASTIC_FORMATS = {torch.bfloat16: Format.BF16_SR, torch.float16: Format.FP16_SR}


def rounds_stochastically(t: torch.Tensor) -> bool:
    """Whether stochastic rounding changes anything for a tensor of this dtype."""
    return t.dtype in STOCHASTIC_FORMATS


def _mul32(x, c: int):
    """x*c modulo 2^32 for 0 <= x < 2^32 (int or int64 tensor) without leaving int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """lowbias32 (module docstring) of 0 <= x < 2^32, a Python int or an int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def step_key(seed, step):
    """The key of one parameter at one step: mix32(mix32(step) ^ seed). ``step`` the count after
    the increment, a number or a tensor (capturable states: no host read)."""
    if isinstance(step, torch.Tensor):
        step = step.to(torch.int64) & MASK32
    else:
        step = int(step) & MASK32
    return mix32(mix32(step) ^ (int(seed) & MASK32))


def draw_seed() -> int:
    """A parameter's seed from torch's default generator (one draw)."""
    return int(torch.randint(0, 1 << 32, (), dtype=torch.int64))


def element_index(t: torch.Tensor) -> torch.Tensor:
    """int64 tensor shaped like ``t``: each element's index as the fused backends count it
    (module docstring): its memory offset in a dense layout, else its row-major index."""
    from .optim._placement import dense  # here: mupopt.optim imports this module

    n = t.numel()
    index = torch.arange(n, dtype=torch.int64, device=t.device)
    # (torch.Tensor has no is_non_overlapping_and_dense method: that test raised AttributeError
    # for every non-contiguous bfloat16 / float16 param stepped here, e.g. Muon's transposed ones.)
    if not t.is_contiguous() and dense(t):
        return index.as_strided(t.shape, t.stride())
    return index.view(t.shape)


def random_bits(key, index: torch.Tensor) -> torch.Tensor:
    """The 16 random bits (int64 in [0, 2^16)) of each element ``index`` under ``key``: the
    low half of its pair's word for an even index, the high half for an odd one."""
    pair = index >> 1
    word = (pair & MASK32) ^ _mul32(pair >> 32, _GOLDEN)
    if isinstance(key, torch.Tensor):
        key = key.to(index.device)
    return (mix32(word ^ key) >> ((index & 1) * 16)) & 0xFFFF


def _to_int16(bits: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^16) -> int16 with the same 16 bits."""
    return ((bits ^ 0x8000) - 0x8000).to(torch.int16)


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, bits: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to bfloat16 or float16 with the random ``bits`` (int64 in [0,
    2^16), one per element, shaped like x): the rules of the module docstring."""
    assert x.dtype == torch.float32, x.dtype
    finite = torch.isfinite(x)
    if dtype == torch.bfloat16:
        u = x.view(torch.int32).to(torch.int64) & MASK32
        up = ((u + torch.where(finite, bits, 0)) >> 16) | torch.where(x.isnan(), 0x40, 0)
        return _to_int16(up).view(torch.bfloat16)
    if dtype != torch.float16:
        raise ValueError(f"stochastic rounding stores bfloat16 or float16, not {dtype}")
    a = x.abs()
    ua = a.view(torch.int32).to(torch.int64)
    normal = ((ua + (bits >> 3)) & ~0x1FFF).to(torch.int32).view(torch.float32)
    # float16's subnormal range: units of 2^-24. min() keeps y finite where this branch is not
    # taken (the C++ and Triton code do the same, so no lane ever converts inf or NaN).
    y = torch.clamp_max(a, 2.0**-14) * 2.0**24
    whole = torch.trunc(y)
    threshold = ((y - whole) * 2.0**16).to(torch.int64)
    small = (whole + (bits < threshold).to(torch.float32)) * 2.0**-24
    mag = torch.where(a >= 2.0**-14, normal, small)
    return torch.where(finite, torch.copysign(mag, x), x).to(dtype)


def load_param(p: torch.Tensor, dtype: torch.dtype, state: dict, compensated: bool = False) -> torch.Tensor:
    """The param in the compute ``dtype``: ``p`` itself when it has that dtype (in-place math
    updates it), else a copy; with ``compensated`` (``kahan_summation=True``) and p bfloat16 or
    float16, p + c in float32 (one rounded float32 addition), c = ``state[COMPENSATION]``."""
    if compensated and compensates(p):
        return p.to(dtype) + state[COMPENSATION].to(dtype)
    return p if p.dtype == dtype else p.to(dtype)


def store_param(p: torch.Tensor, p32: torch.Tensor, state: dict, stochastic: bool, compensated: bool = False) -> None:
    """Write the computed param ``p32`` (float32 or float64) into ``p``: rounded to nearest
    (``copy_``), or stochastically when ``stochastic`` and p is bfloat16 or float16, with the
    parameter's seed and this step's count from ``state``; with ``compensated`` and p bfloat16
    or float16, rounded to nearest with the rounding error kept in ``state[COMPENSATION]``
    (module docstring, "Compensated stores")."""
    if p is p32:
        return
    if compensated and compensates(p):
        rounded = round_to_nearest(p32, p.dtype)
        p.copy_(rounded)
        # p32 - p is exact in float32 (p is p32 rounded to nearest: their difference is p32's
        # low mantissa bits); rounding it to p's dtype is the only loss.
        state[COMPENSATION].copy_(p32.float() - rounded.float())
    elif stochastic and rounds_stochastically(p):
        _store_stochastic(p, p32, state)
    else:
        p.copy_(p32)


# Eager even inside torch.compile (a graph break per param): traced after a graph break, a seed
# that differs between params becomes a symbolic integer, and inductor's C++ code for the hash of
# one failed to build (torch 2.13: an xor of floats).
@torch.compiler.disable(reason="the reference backend's stochastic rounding runs eagerly")
def _store_stochastic(p: torch.Tensor, p32: torch.Tensor, state: dict) -> None:
    key = step_key(state["sr_seed"], state["step"])
    p.copy_(round_stochastic(p32.float(), p.dtype, random_bits(key, element_index(p))))


@torch.library.custom_op("mupopt::round_to_nearest", mutates_args=())
def round_to_nearest(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, as an op that torch.compile keeps: inductor (by default, without
    ``emulate_precision_casts``) computes a float32 -> bfloat16 -> float32 round trip as the
    float32 value itself, so a compiled step measured every compensation as zero and stored to
    nearest, silently (tests/test_kahan.py)."""
    return x.to(dtype)


@round_to_nearest.register_fake
def _(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype)


COMPENSATION = "param_compensation"  # the state entry of kahan_summation=True


def compensates(t: torch.Tensor) -> bool:
    """Whether ``kahan_summation=True`` keeps a compensation for a tensor of this dtype."""
    return t.dtype in STOCHASTIC_FORMATS


def compensations_of(where: str, params, states) -> list:
    """kahan_summation's compensations as the fused backends pass them: one per param,
    ``state[COMPENSATION]`` for a bfloat16 / float16 param, None for a wider one (its store is
    exact: it keeps none). A 16-bit param without one raises a RuntimeError starting with
    ``where``: a fused op would otherwise read no compensation, or the next param's."""
    out = []
    for i, (p, st) in enumerate(zip(params, states)):
        if p.dtype not in STOCHASTIC_FORMATS:  # compensates(p), inlined: a per-step loop
            out.append(None)
            continue
        c = st.get(COMPENSATION)
        if c is None:
            raise RuntimeError(f"{where}: param {i} ({p.dtype}) has no state[{COMPENSATION!r}] (kahan_summation=True)")
        out.append(c)
    return out


def seeds_of(states, stochastic: bool = True) -> list[int]:
    """The fused backends' per-tensor seeds: empty for rounding to nearest (``stochastic``
    False, or no state with a seed: float32 params only), else one per state (0 for a state
    without one: a float32 param, whose store ignores it)."""
    if not stochastic or not any("sr_seed" in st for st in states):
        return []
    return [int(st.get("sr_seed", 0)) for st in states]
