"""Optimizer states in 16 and 8 bits (``state_bits``): the storage format and its reference path.

``state_bits`` is a param-group option of AdamW, ADOPT, LAMB, SophiaG, Muon (momentum and its
AdamW part) and Shampoo (the grafting state: momentum and Adam second moment; L, R and their
roots stay float32). Each optimizer names its elementwise state entries and their sign
(:data:`SIGNED` or :data:`UNSIGNED`, ``MupOptimizer._lean_keys``); per param, the format is
(:func:`state_format`):

- ``32`` (default): each entry in its param's dtype, as torch.optim keeps it.
- ``16``: each entry in bfloat16, for every real param (math in float32, stores rounded to
  nearest); complex params keep format 32.
- ``8``: block-wise quantized (Dettmers et al. 2021, "8-bit Optimizers via Block-wise
  Quantization", arXiv 2110.02861), for a real param with at least :data:`MIN_8BIT_SIZE`
  elements (a DTensor: of its global shape, so that every rank decides alike) that is contiguous
  (a DTensor: its local shard); others keep format 32, as bitsandbytes keeps tensors below its
  ``min_8bit_size`` (4096) in 32 bits.

Format 8, version :data:`FORMAT_VERSION` (the spec a kernel implements; ``tests/test_lean_states.py``
checks this module against a float64 transcription of it). An entry ``key`` of a param of n
elements is two tensors in the param's state:

- ``state[key]``: uint8 codes, the param's shape, contiguous; element i (row-major) is code c_i.
- ``state[key + "_absmax"]``: float32, shape ``[ceil(n / BLOCK)]``; block b covers the elements
  ``[b*BLOCK, min((b+1)*BLOCK, n))``. A DTensor param (FSDP2, tensor parallel, N-D meshes): the
  blocks cut each rank's local shard (n its local size, i its row-major index in the shard);
  ``state[key]`` is a DTensor with the param's mesh, placements and global shape (so the
  placement layer hands backends the local codes like any state), ``state[key + "_absmax"]`` a
  plain tensor of the local blocks (see "Checkpoints of DTensor params" for why).
- value: ``x_i = MAP[c_i] * absmax[i // BLOCK]`` (float32 product).
- store of float32 values x: ``absmax_b = max |x_i|`` over the block; ``y_i = x_i / absmax_b``
  (float32; ``y_i = 0`` where ``absmax_b = 0``); ``c_i`` = the code of the nearest map value:
  the number of the map's midpoints (``(MAP[k] + MAP[k+1]) / 2`` in float32, over the used
  codes) that are < y_i (a tie goes to the lower code). A NaN or inf in a block makes that
  block's values NaN, as a non-finite value poisons a 32-bit state.
- A zero state is all-zero codes and absmax: every code times absmax 0 is 0.

Maps (MAP, 256 float32 values ascending; :func:`build_map`), the two candidates of the issue,
measured on the character GPT of ``mupopt transfer`` (docs/lean-states.md):

- ``"dynamic"``: Dettmers et al.'s dynamic tree map, signed for momenta and unsigned for second
  moments (as bitsandbytes' Adam uses them): a run of e zero bits selects the decade 10^-e, the
  bits after the indicator bit a linear fraction in (0.1, 1); plus 0 and 1.0.
- ``"linear-sqrt"`` (after Li et al. 2023, "Memory Efficient Optimizers with 4-bit States",
  arXiv 2309.01507: the second moment's map must not contain zero, since a v stored as 0 turns
  a small m into an update of m/eps; the first moment gets the simplest signed map): signed linear
  ``(k - 127)/127`` for k = 0..254 (255 codes, 0 exact; code 255 unused, decodes as 1.0), and
  unsigned square-root ``((k + 1)/256)^2`` for k = 0..255 (v's square root quantized linearly,
  no zero: the smallest value is absmax/65536).

:data:`DEFAULT_MAPS` is the one the measurement picked: "dynamic" (AdamW, char GPT width 128,
300 steps, 2 seeds: +0.17% final validation loss against 32-bit states; "linear-sqrt" +0.95%,
+1.8% on one seed: the linear map's step of absmax/127 rounds the many small momenta of a block
to 0). Codes are meaningful only with the map they were made with: a checkpoint of format 8
loads into this version's maps.

Checkpoints of DTensor params. A block's scale belongs to one rank's shard, so a checkpoint of
codes and scales would be valid only for the mesh and placements that made it (torch's DCP would
reshard the codes, elementwise, under scales cut elsewhere: silently wrong), and it would not
load into a format-32 optimizer or from one (DCP loads the entries the loading optimizer's
state_dict names). So ``state_dict()`` carries each quantized entry of a DTensor param as float32
values, a DTensor placed like the param (:func:`export_state`), the form of a format-32 state of
a float32 param: DCP reshards it to any mesh, and a load quantizes this rank's shard anew
(:func:`convert`); format-32 checkpoints load into format 8 and back. A resume on the same
sharding is bit-exact: re-quantizing the exported values of a block gives its codes and absmax
back, since the block's largest magnitude is exported exactly (code 255 decodes to absmax; the
signed dynamic map has no -1.0, so :func:`exported` gives its lowest code as -absmax, within
0.71% of absmax of the decoded value, less than the code's own rounding interval) and every other
value divided by that absmax lands within 2 float32 roundings of its map value, far inside its
code's interval (the maps' values are >= 0.7% apart relative). Checked for every map and kind
on blocks of absmax 2^-126 to 1e38 (tests/test_lean_states_distributed.py); a block whose absmax
is subnormal (< 2^-126) may come back with a code off by one there. The cost: the checkpoint,
and the state_dict while it lives, hold 4 bytes per element per entry, as format 32 does.

Checkpoints of plain params keep codes and scales, bit-exact and 1/4 the size (one process, one
set of blocks), the codes under ``key + "_codes"`` (:data:`CODES`, :func:`export_codes`), not
``key``: DCP loads into the entries the loading optimizer's state_dict names and casts each to
its dtype, so uint8 codes under ``key`` would land in a format-32 optimizer's float32 ``key`` as
the numbers 0..255 (silently wrong). Under their own name a format mismatch is a missing key,
which DCP reports; ``load_state_dict`` takes them back under ``key`` (:func:`import_codes`; also
the codes of checkpoints written before, uint8 under ``key``).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ._placement import is_dtensor

FORMAT_VERSION = 1
BLOCK = 256
# bitsandbytes' min_8bit_size: tensors smaller than this keep format 32 (their states are a
# small part of the memory, and biases / norms are the tensors most sensitive to state error).
MIN_8BIT_SIZE = 4096
STATE_BITS = (8, 16, 32)
SIGNED, UNSIGNED = "signed", "unsigned"
ABSMAX = "_absmax"
CODES = "_codes"  # a plain param's codes in its state_dict (module docstring)
MAP_NAMES = ("dynamic", "linear-sqrt")
DEFAULT_MAPS = "dynamic"
# Which maps format 8 uses in this process (module attribute, for the measurement only:
# docs/lean-states.md); checkpoints do not record it.
maps = DEFAULT_MAPS


def check_state_bits(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in STATE_BITS:
        raise ValueError(f"Invalid state_bits: {value!r} (expected 8, 16 or 32)")


def _dynamic(signed: bool) -> list[float]:
    # Dettmers et al. 2021 (dynamic tree quantization): after the sign bit (signed
    # only) e zero bits give the decade 10^-e, a 1 bit ends them, the remaining f bits are a
    # linear fraction: 2^f values at the midpoints of (0.1, 1) cut in 2^f equal parts. e = 0..6
    # leaves room for exactly two more values: 0 and 1.0 (absmax itself, exact).
    bits = 7 if signed else 8
    out = []
    for e in range(7):
        f = bits - 1 - e
        n = 2**f
        out += [10.0**-e * (0.1 + 0.9 * (k + 0.5) / n) for k in range(n)]
    out = out + [0.0, 1.0] + ([-x for x in out] if signed else [])
    assert len(out) == 256
    return sorted(out)


def build_map(name: str, kind: str) -> list[float]:
    """The 256 values (ascending, as Python floats; :func:`map_tensor` rounds them to float32)
    of map ``name`` for ``kind`` (:data:`SIGNED` or :data:`UNSIGNED`)."""
    if name == "dynamic":
        return _dynamic(kind == SIGNED)
    if name == "linear-sqrt":
        if kind == SIGNED:
            return [(k - 127) / 127 for k in range(255)] + [1.0]
        return [((k + 1) / 256) ** 2 for k in range(256)]
    raise ValueError(f"unknown map {name!r} (expected one of {MAP_NAMES})")


def used_codes(name: str, kind: str) -> int:
    """How many codes a store can produce (the signed linear map leaves code 255 unused)."""
    return 255 if name == "linear-sqrt" and kind == SIGNED else 256


@functools.lru_cache(maxsize=None)
def _tables(name: str, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor(build_map(name, kind), dtype=torch.float32)
    used = values[:used_codes(name, kind)]
    midpoints = (used[:-1] + used[1:]) / 2  # float32 sum, then an exact halving
    return values.to(device), midpoints.to(device)


@functools.lru_cache(maxsize=None)
def _buckets(name: str, kind: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest-code search as two lookups: the 2^16 buckets of float32 values that share
    their top 16 bits (sign, exponent, 7 mantissa bits) hold at most one midpoint each (checked
    here; true of both map families), so the number of midpoints < y is base[bucket(y)] plus
    (y > inside[bucket(y)]) (NaN where the bucket holds none: the comparison is then False).
    Equal to bucketize by construction (tests/test_lean_states.py checks it on every midpoint
    and its float32 neighbours); about 3x faster than its binary search on the CPU."""
    _, mid = _tables(name, kind, torch.device("cpu"))
    which = (mid.view(torch.int32) >> 16) & 0xFFFF
    if torch.bincount(which.long()).max() > 1:
        raise AssertionError(f"map {name!r} ({kind}) has two midpoints in one float32 bucket")
    inside = torch.full((1 << 16,), float("nan"))
    inside[which.long()] = mid
    # One member of each bucket (its lowest 16 bits zero): every member has the same count of
    # midpoints outside the bucket below it, since none lies within the bucket.
    rep = (torch.arange(1 << 16, dtype=torch.int64) << 16).to(torch.int32).view(torch.float32)
    below = torch.bucketize(rep, mid).to(torch.int64)  # midpoints < rep
    base = below - (inside < rep).to(torch.int64)  # without the bucket's own midpoint
    return base.to(torch.uint8 if base.max() < 256 else torch.int16).to(device), inside.to(device)


def nearest_codes(y: torch.Tensor, kind: str) -> torch.Tensor:
    """The codes of float32 ``y`` (normalized values): the number of midpoints < y (the spec's
    rule), as uint8."""
    base, inside = _buckets(maps, kind, y.device)
    idx = ((y.contiguous().view(torch.int32) >> 16) & 0xFFFF).reshape(-1)  # int32: index_select takes it
    code = base.index_select(0, idx).to(torch.uint8) + (y.reshape(-1) > inside.index_select(0, idx)).to(torch.uint8)
    return code.view(y.shape)


def map_tensor(kind: str, device="cpu", name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [256], midpoints) of the map in use for ``kind``, float32 on ``device``."""
    return _tables(name or maps, kind, torch.device(device))


def blocks_of(n: int) -> int:
    return -(-n // BLOCK)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_dtensor(t) else t


def quantizable(p: torch.Tensor) -> bool:
    """Whether format 8 applies to ``p`` (module docstring): the size is the global one (every
    rank of a DTensor decides alike), contiguity that of the local shard the blocks cut."""
    if is_dtensor(p):
        return p.is_floating_point() and p.numel() >= MIN_8BIT_SIZE and p.to_local().is_contiguous()
    return (type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point() and p.numel() >= MIN_8BIT_SIZE
            and p.is_contiguous())


def _like_param(local_value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``local_value`` (p's local shape) as a DTensor with p's mesh, placements and global shape."""
    from torch.distributed.tensor import DTensor

    strides, acc = [], 1
    for n in reversed(p.shape):  # contiguous strides of the global shape
        strides.insert(0, acc)
        acc *= n
    return DTensor.from_local(local_value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                              stride=tuple(strides))


def _local_of_loaded(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a loaded state entry of DTensor param ``p``: a DTensor of another
    placement is redistributed (elementwise values: any layout holds them), a plain tensor of
    the global shape (a single-process state_dict) is cut locally."""
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(value):
        if value.device_mesh != p.device_mesh:
            raise ValueError(f"a loaded state entry on a mesh of shape {tuple(value.device_mesh.shape)} for a "
                             f"parameter on a mesh of shape {tuple(p.device_mesh.shape)}: load it through "
                             f"torch.distributed.checkpoint, which reshards it")
        if tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value.to_local()
    if tuple(value.shape) != tuple(p.shape):
        raise ValueError(f"a loaded state entry of shape {tuple(value.shape)} for a parameter of shape {tuple(p.shape)}")
    return distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()


def state_format(p: torch.Tensor, group: dict) -> int:
    """The format of ``p``'s lean state entries in ``group``: 8, 16 or 32 (module docstring)."""
    bits = group.get("state_bits", 32)
    if (bits == 8 and not quantizable(p)) or (bits == 16 and not p.is_floating_point()):
        return 32  # complex params keep their dtype (a bfloat16 state would drop the imaginary part)
    return bits


def zeros(p: torch.Tensor, group: dict, key: str) -> dict:
    """The zero state entry ``key`` of ``p`` in the group's format (one or two tensors)."""
    fmt = state_format(p, group)
    if fmt == 8:
        if is_dtensor(p):  # blocks over the local shard; codes placed like p, scales local (docstring)
            t = p.to_local()
            return {key: _like_param(torch.zeros(t.shape, dtype=torch.uint8, device=t.device), p),
                    key + ABSMAX: torch.zeros(blocks_of(t.numel()), dtype=torch.float32, device=t.device)}
        return {key: torch.zeros(p.shape, dtype=torch.uint8, device=p.device),
                key + ABSMAX: torch.zeros(blocks_of(p.numel()), dtype=torch.float32, device=p.device)}
    dtype = torch.bfloat16 if fmt == 16 else p.dtype
    return {key: torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)}


def is_quantized(state: dict, key: str) -> bool:
    return key + ABSMAX in state


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, kind: str) -> torch.Tensor:
    """The float32 values of quantized entry (``codes``, ``absmax``), shaped like ``codes``."""
    values, _ = map_tensor(kind, codes.device)
    n = codes.numel()
    flat = values[codes.reshape(-1).long()]
    pad = absmax.numel() * BLOCK - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, BLOCK) * absmax.view(-1, 1)).reshape(-1)[:n].view(codes.shape)


def quantize_(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, kind: str) -> None:
    """Store the values ``x`` (any float dtype, the codes' shape) into ``codes`` and ``absmax``."""
    n = codes.numel()
    flat = x.reshape(-1).float()
    pad = absmax.numel() * BLOCK - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, BLOCK)
    amax = blocks.abs().amax(dim=1)
    # A NaN in a block: amax is NaN (amax propagates it), so the block decodes as NaN.
    y = blocks / torch.where(amax > 0, amax, torch.ones_like(amax)).view(-1, 1)
    y = torch.where(amax.view(-1, 1) > 0, y, torch.zeros_like(y))
    c = nearest_codes(y, kind)  # the number of midpoints < y: ties to the lower code
    codes.view(-1).copy_(c.reshape(-1)[:n])
    absmax.copy_(amax)


def quantized(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """New (codes, absmax) holding ``x``."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks_of(x.numel()), dtype=torch.float32, device=x.device)
    quantize_(x, codes, absmax, kind)
    return codes, absmax


def decoded(state: dict, key: str, kind: str) -> torch.Tensor:
    """Entry ``key`` of ``state`` as a tensor of values (float32 for format 8; else itself)."""
    if is_quantized(state, key):
        return dequantize(state[key], state[key + ABSMAX], kind)
    return state[key]


def convert(state: dict, p: torch.Tensor, group: dict, kinds: dict[str, str]) -> bool:
    """Put the entries of ``kinds`` in ``state`` into the format of ``p`` in ``group`` (after a
    load_state_dict of another format, or a change of ``group["state_bits"]``): quantize,
    dequantize or cast; an entry already in its format is left as it is (bit-exact). Returns
    whether anything changed."""
    fmt = state_format(p, group)
    changed = False
    for key, kind in kinds.items():
        if key not in state or not isinstance(state[key], torch.Tensor):
            continue
        if fmt == 8:
            if is_quantized(state, key) and is_dtensor(p) and not is_dtensor(state[key]):
                # Codes of the whole tensor (a single-process state_dict): blocks cut anew per shard.
                state[key] = dequantize(state[key], state.pop(key + ABSMAX), kind)
            if is_quantized(state, key):
                continue
            if is_dtensor(p):  # blocks over this rank's shard
                codes, absmax = quantized(_local_of_loaded(state[key], p), kind)
                state[key], state[key + ABSMAX] = _like_param(codes, p), absmax
            else:
                state[key], state[key + ABSMAX] = quantized(state[key], kind)
            changed = True
            continue
        dtype = torch.bfloat16 if fmt == 16 else p.dtype
        if is_quantized(state, key):
            value = dequantize(_local(state[key]), state.pop(key + ABSMAX), kind)
            if is_dtensor(p):
                value = _like_param(value, p)
        elif state[key].dtype == dtype:
            continue
        else:
            value = state[key]
        state[key] = value.to(dtype)
        changed = True
    return changed


def exported(codes: torch.Tensor, absmax: torch.Tensor, kind: str) -> torch.Tensor:
    """The float32 values a state_dict carries for a quantized entry of a DTensor param (module
    docstring, "Checkpoints of DTensor params"): ``MAP[c] * absmax`` as :func:`dequantize`, except
    that the lowest code of a map whose lowest value is above -1 (the signed dynamic map's
    -0.99296875) gives ``-absmax``: that code holds the block's absmax when its largest
    magnitude was negative, and re-quantizing needs that magnitude back exactly."""
    values, _ = map_tensor(kind, codes.device)
    out = dequantize(codes, absmax, kind)
    if values[0] > -1.0 and kind == SIGNED and out.numel():
        scale = torch.repeat_interleave(absmax, BLOCK)[:codes.numel()].view(codes.shape)
        out = torch.where(codes == 0, -scale, out)
    return out


def export_state(state: dict, p: torch.Tensor, kinds: dict[str, str]) -> dict:
    """``state`` (of DTensor param ``p``) as its state_dict carries it: each quantized entry as a
    float32 DTensor placed like ``p`` (:func:`exported`), without its scales; a new dict."""
    out = dict(state)
    for key, kind in kinds.items():
        if is_quantized(state, key):
            out[key] = _like_param(exported(_local(state[key]), state[key + ABSMAX], kind), p)
            del out[key + ABSMAX]
    return out


def export_codes(state: dict, kinds: dict[str, str]) -> dict:
    """``state`` (of a plain param) as its state_dict carries it: each quantized entry's codes
    under ``key + CODES`` (module docstring); ``state`` itself where nothing is quantized."""
    if not any(is_quantized(state, key) for key in kinds):
        return state
    return {(key + CODES if key in kinds and is_quantized(state, key) else key): v for key, v in state.items()}


def import_codes(state, kinds: dict[str, str]):
    """The inverse of :func:`export_codes` on a loaded state: ``key + CODES`` back to ``key``.
    A state holding both (not a state_dict of this format) raises ValueError."""
    if not isinstance(state, dict) or not any(key + CODES in state for key in kinds):
        return state
    both = [key for key in kinds if key + CODES in state and key in state]
    if both:
        raise ValueError(f"loaded state dict: a state holds both {both[0]!r} and {both[0] + CODES!r} "
                         f"(8-bit codes and another value of one entry); nothing was loaded")
    names = {key + CODES: key for key in kinds}
    return {names.get(k, k): v for k, v in state.items()}


def import_codes_in_place(state, kinds: dict[str, str]) -> None:
    """:func:`import_codes` on a state in ``opt.state``: entries of a state_dict written there
    directly, as torch's ZeroRedundancyOptimizer.load_state_dict writes each rank's, step as
    loaded ones (the object stays the same: the step's plans hold it)."""
    if isinstance(state, dict) and any(key + CODES in state for key in kinds):
        renamed = import_codes(state, kinds)
        state.clear()
        state.update(renamed)


def state_keys(keys: tuple[str, ...], state_or_format, kinds: dict[str, str]) -> tuple[str, ...]:
    """``keys`` with the absmax entry after each quantized one: ``state_or_format`` is a state
    dict (its entries decide) or a format (8: every entry of ``kinds``)."""
    out = []
    for key in keys:
        out.append(key)
        if key in kinds and (state_or_format == 8 if isinstance(state_or_format, int) else is_quantized(state_or_format, key)):
            out.append(key + ABSMAX)
    return tuple(out)


def entry_nbytes(p: torch.Tensor, group: dict) -> int:
    """The bytes of one state entry of ``p`` in its group's format (a DTensor: its local shard)."""
    t = p.to_local() if hasattr(p, "to_local") else p
    fmt = state_format(p, group)
    if fmt == 8:
        return t.numel() + 4 * blocks_of(t.numel())
    return t.numel() * (2 if fmt == 16 else t.element_size())


def nbytes(state: dict) -> int:
    """The bytes of the tensors in a param's state (the local shard of a DTensor)."""
    total = 0
    for v in state.values():
        if isinstance(v, torch.Tensor):
            t = v.to_local() if hasattr(v, "to_local") else v
            total += t.numel() * t.element_size()
        elif isinstance(v, (list, tuple)):
            total += sum(nbytes({"x": x}) for x in v)
    return total


# -- the reference path -----------------------------------------------------------------------------
def reference(fn: Callable, kinds: dict[str, str], *, elementwise: bool = False, prepare: bool = False) -> Callable:
    """A reference backend function that also steps format-8 states: their entries are decoded
    to float32 tensors, ``fn`` steps those, and the results are stored back as codes. States of
    formats 32 and 16 go to ``fn`` as they are (its float32 math and rounding stores handle any
    storage dtype). ``elementwise``: ``fn`` steps each tensor on its own, so it is called one
    tensor at a time and the decoded copies of one tensor's states exist at a time (without
    keyword arguments: LAMB's norm_reduce needs all tensors in one call). ``prepare``: ``fn``
    is a two-phase prepare (Shampoo) whose result commits; the codes are written after it."""

    @functools.wraps(fn)
    def step(params, grads, states, mults, hp, **kwargs):
        if not any(is_quantized(st, k) for st in states for k in kinds):
            return fn(params, grads, states, mults, hp, **kwargs)
        if elementwise and not kwargs and not prepare:
            for one in zip(params, grads, states, mults):
                _decoded_call(fn, *map(lambda x: [x], one), hp, kinds, {})
            return None
        return _decoded_call(fn, params, grads, states, mults, hp, kinds, kwargs, prepare)

    return step


# Eager even inside torch.compile: which decoded entries fn wrote is told by their version
# counters, which a traced graph does not advance (compiled, no entry was stored back: every
# 8-bit state kept its first codes, silently). A compiled step runs this part as a graph break
# (fullgraph=True: torch's error).
@torch.compiler.disable
def _decoded_call(fn, params, grads, states, mults, hp, kinds, kwargs, prepare=False):
    views = [{k: (decoded(st, k, kinds[k]) if k in kinds else v) for k, v in st.items() if not k.endswith(ABSMAX)}
             for st in states]
    # The decoded entries as fn received them: only those fn writes (in place, or replaced) are
    # stored back. Storing an untouched entry again is not the identity: a block whose largest
    # magnitude is negative decodes (signed dynamic map, no -1.0) to 0.993 * absmax, and its
    # second quantization shrinks absmax by that much, so SophiaG's Hessian update would move
    # its momentum (and every step its Hessian estimate) without computing either.
    given = [{k: (v, v._version) for k, v in view.items() if k in kinds and isinstance(v, torch.Tensor)}
             for view in views]
    out = fn(params, grads, views, mults, hp, **kwargs)

    def write_back():
        for st, view, before in zip(states, views, given):
            for k, v in view.items():
                if k in kinds and is_quantized(st, k):
                    if k not in before or before[k][0] is not v or before[k][1] != v._version:
                        quantize_(v, st[k], st[k + ABSMAX], kinds[k])
                elif st.get(k) is not v:
                    st[k] = v

    if prepare:
        def commit():
            result = out()
            write_back()
            return result
        return commit
    write_back()
    return out


def relative_error_bound(kind: str, name: str | None = None) -> float:
    """The largest |y - MAP[code(y)]| over y in [-1, 1] (signed) or [0, 1] (unsigned): the
    error of a stored value relative to its block's absmax, before float32 rounding."""
    name = name or maps
    values = build_map(name, kind)[:used_codes(name, kind)]
    lo = -1.0 if kind == SIGNED else 0.0
    gaps = [(b - a) / 2 for a, b in zip(values, values[1:])]
    return max(gaps + [max(0.0, values[0] - lo), max(0.0, 1.0 - values[-1])])


__all__ = ["BLOCK", "MIN_8BIT_SIZE", "FORMAT_VERSION", "STATE_BITS", "SIGNED", "UNSIGNED", "state_format", "zeros",
           "quantize_", "dequantize", "convert", "reference", "nbytes"]
