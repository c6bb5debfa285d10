"""The muP layer: per-tensor width information, the rule table, base shapes, init.

Every parameter of a width family gets a :class:`WidthInfo` (role, m_in, m_out), from which each
optimizer derives its per-tensor learning-rate, weight-decay and epsilon multipliers
(:func:`multipliers`). The rules are those of docs/mup.md, taken from

- P1: Gupta, Ngom, Foreman, Vishwanath, "Extending muP: Spectral Conditions for Feature Learning
  Across Optimizers", arXiv 2602.20937 (Table 2, Result 4.1);
- P2: Kosson et al., "Weight Decay may matter more than muP for Learning Rate Transfer in
  Practice", arXiv 2510.19093 (independent weight decay);
- Yang et al., "Tensor Programs V", arXiv 2203.03466, and Microsoft's ``mup`` package.

Notation: a weight has shape (fan_out, fan_in, ...) as ``nn.Linear``; ``nn.Embedding.weight`` is
(vocab, d), so its fan_in is dim 0 and its fan_out dim 1. ``m_in = fan_in / base_fan_in`` and
``m_out = fan_out / base_fan_out``; a dimension that does not scale with width has m = 1.

Width information reaches a parameter in one of four ways, all through :func:`set_base_shapes`:
(a) a base model (or a dict of base shapes), (b) a base-width table ``{width: base_width}``,
(c) ``p.infshape`` left by Microsoft's ``mup.set_base_shapes``, (d) explicit overrides by
parameter-name pattern. It is stored on the parameter (``p.mupopt_width``) and copied into the
optimizer, which keeps it in each parameter's state (:func:`width_record`), so a state_dict
carries it and a resume needs no base model.

FSDP2 (``fully_shard``) and tensor parallelism (``parallelize_module``) replace a module's
Parameter objects with new DTensor Parameters, which carry no attributes. So set_base_shapes
also records the width info by parameter name on the module that owns it
(``module.mupopt_widths``), and remembers the model (weakly): an optimizer built later over the
new Parameters finds their width info there (:func:`recover_width_infos`), so the order
``set_base_shapes`` -> ``fully_shard`` -> optimizer gives the same muP run as the reverse.

Depth information (:func:`set_base_depth`: CompleteP, Dey et al., arXiv 2505.01618; depth-muP,
Yang et al., arXiv 2310.02244) is kept the same way, in ``p.mupopt_depth`` and
``module.mupopt_depths``, and joins the width record (docs/mup.md, "Depth").
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import sys
import warnings
import weakref
import zlib
from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple

import torch
from torch import nn

ROLES = ("input", "hidden", "output", "vector")
WD_MODES = ("independent", "coupled", "inverse_width")
WIDTH_ATTR = "mupopt_width"
DEPTH_ATTR = "mupopt_depth"
# On each module that owns a parameter set_base_depth saw: {local name: (DepthInfo, shape)}.
MODULE_DEPTHS_ATTR = "mupopt_depths"
# The residual exponents the depth theory covers: 1/2 (depth-muP: Yang et al., Tensor Programs
# VI, arXiv 2310.02244; Bordelon et al., arXiv 2309.16620) to 1 (CompleteP: Dey et al., arXiv
# 2505.01618). Outside it set_base_depth refuses (docs/mup.md, "Depth").
ALPHA_RANGE = (0.5, 1.0)
# On each module that owns a parameter set_base_shapes saw: {parameter name in that module:
# (WidthInfo, shape)}; survives FSDP2 / tensor parallelism replacing the Parameter objects.
MODULE_WIDTHS_ATTR = "mupopt_widths"
# Models set_base_shapes has been called on (weakly held: a model's lifetime is the user's).
_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# In the __dict__ of each model in _MODELS: its _Registration (copy.deepcopy, below).
REGISTRATION_ATTR = "mupopt_registration"


class _Registration:
    """Carries a model's width and depth information through ``copy.deepcopy(model)``.

    ``nn.Parameter.__deepcopy__`` makes a bare Parameter: the copies lose ``p.mupopt_width`` and
    ``p.mupopt_depth``, and an optimizer over them would run without muP, silently. The modules'
    records are copied with their ``__dict__``, but the copy is not in ``_MODELS``, where
    :func:`recover_width_infos` looks. This object sits in the model's ``__dict__`` after the
    submodules (set_base_shapes adds it after ``__init__``), so when deepcopy reaches it the memo
    already maps the model and every parameter to their copies: it gives each copy its
    original's information and registers the new model. Pickling keeps Parameter attributes by
    itself; an unpickled registration registers the unpickled model."""

    def __init__(self, model: nn.Module | None = None):
        self._model = weakref.ref(model) if model is not None else None
        if model is not None:
            _MODELS.add(model)

    def __deepcopy__(self, memo):
        old = self._model() if self._model is not None else None
        new = memo.get(id(old)) if old is not None else None
        if not isinstance(new, nn.Module):
            return _Registration()
        for old_p in old.parameters():
            new_p = memo.get(id(old_p))
            if new_p is None:
                continue
            for attr in (WIDTH_ATTR, DEPTH_ATTR):
                if hasattr(old_p, attr) and not hasattr(new_p, attr):
                    setattr(new_p, attr, getattr(old_p, attr))
        _MODELS.add(new)
        return _Registration(new)

    def __reduce__(self):
        # Unpickled (torch.load of a whole model), it registers the new model: pickle creates
        # the model before its __dict__, so the reference resolves.
        model = self._model() if self._model is not None else None
        return (_Registration, (model,) if model is not None else ())


def _register(model: nn.Module) -> None:
    _MODELS.add(model)
    model.__dict__[REGISTRATION_ATTR] = _Registration(model)


class MupError(ValueError):
    """Width information is missing, ambiguous or inconsistent."""


class MupWarning(UserWarning):
    """Width information that is probably, not certainly, wrong (mupopt.set_base_shapes)."""


@dataclass(frozen=True)
class WidthInfo:
    """How one tensor scales with width.

    role: "input" (fan_in fixed, fan_out scales), "hidden" (both scale), "output" (fan_in scales,
    fan_out fixed) or "vector" (biases, norm gains, scalars).
    m_in, m_out: fan_in / base fan_in and fan_out / base fan_out (1 for a fixed dimension).
    fan_in_dim: which dimension of the weight is fan_in: 1 as ``nn.Linear`` (fan_out, fan_in,
    ...), 0 for ``nn.Embedding`` (vocab, d). Only Shampoo's blocks need it (which side is capped).
    name: the parameter's name in the model that :func:`set_base_shapes` saw (None when built by
    hand). Only labels (``mup_summary()`` of an optimizer given plain parameters) use it; it takes
    no part in equality.
    """

    role: str
    m_in: float = 1.0
    m_out: float = 1.0
    fan_in_dim: int = 1
    name: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.role not in ROLES:
            raise MupError(f"unknown muP role {self.role!r}; expected one of {ROLES}")
        for key in ("m_in", "m_out"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise MupError(f"{key} must be a positive finite number, got {value!r}")
        if self.fan_in_dim not in (0, 1):
            raise MupError(f"fan_in_dim must be 0 or 1, got {self.fan_in_dim!r}")

    def as_dict(self) -> dict:
        d = {"role": self.role, "m_in": float(self.m_in), "m_out": float(self.m_out), "fan_in_dim": self.fan_in_dim}
        if self.name is not None:
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "WidthInfo":
        # fan_in_dim and name: absent from state_dicts saved before they existed (then
        # nn.Linear's layout, no name).
        return cls(d["role"], float(d["m_in"]), float(d["m_out"]), int(d.get("fan_in_dim", 1)), d.get("name"))


def width_info(p: torch.Tensor) -> WidthInfo | None:
    """The WidthInfo that :func:`set_base_shapes` attached to ``p``, or None."""
    return getattr(p, WIDTH_ATTR, None)


@dataclass(frozen=True)
class DepthInfo:
    """How one tensor scales with depth (:func:`set_base_depth`).

    branch: the tensor lives in a residual branch (a parameter of one of the repeated blocks,
    whose output the forward multiplies by ``m_depth ** -alpha``); False for the embedding,
    final norm and readout, which depth does not touch.
    m_depth: m_L = depth / base_depth (number of blocks over the base model's).
    alpha: the residual exponent, in [1/2, 1] (1: CompleteP, 1/2: depth-muP).
    """

    branch: bool
    m_depth: float = 1.0
    alpha: float = 1.0

    def __post_init__(self):
        if not isinstance(self.branch, bool):
            raise MupError(f"branch must be a bool, got {self.branch!r}")
        if not (isinstance(self.m_depth, (int, float)) and math.isfinite(self.m_depth) and self.m_depth > 0):
            raise MupError(f"m_depth must be a positive finite number, got {self.m_depth!r}")
        lo, hi = ALPHA_RANGE
        if not (isinstance(self.alpha, (int, float)) and lo <= self.alpha <= hi):
            raise MupError(f"alpha must be in [{lo}, {hi}] (1: CompleteP, 0.5: depth-muP), got {self.alpha!r}")

    @property
    def lr(self) -> float:
        """The depth factor of a branch tensor's lr: m_L^(alpha-1) (CompleteP Table 1)."""
        return self.m_depth ** (self.alpha - 1.0) if self.branch else 1.0

    @property
    def eps(self) -> float:
        """The depth factor of a branch tensor's Adam epsilon: m_L^(-alpha) (CompleteP Table 1):
        its gradient carries the residual multiplier m_L^(-alpha), so sqrt(v) does too."""
        return self.m_depth ** (-self.alpha) if self.branch else 1.0


def depth_info(p: torch.Tensor) -> DepthInfo | None:
    """The DepthInfo that :func:`set_base_depth` attached to ``p``, or None."""
    return getattr(p, DEPTH_ATTR, None)


# ---------------------------------------------------------------------------------------------
# Width records: a parameter's WidthInfo as its optimizer state carries it (docs/mup.md,
# "Width records in checkpoints"). The record sits in the parameter's own state entry
# (``optimizer.state[p]["mup"]``) because every checkpoint layout keys that entry by the
# parameter: torch's state_dict by its index, ZeroRedundancyOptimizer by its global index, DCP
# and torchtitan by its name. Param-group keys are not: ZeRO copies them between ranks, and
# flattened layouts copy each group's keys under every one of its parameters.
#
# Only plain numbers and dicts, for three readers: torch's Optimizer.load_state_dict casts every
# tensor in a state to the param's dtype (float64 ratios would round in a bf16 model) and turns a
# string into the text of a generator (it rebuilds every iterable that is not a dict); DCP's
# flattened optimizer state takes tensors, ints, floats and dicts only; torch.load(weights_only).
# Hence the role as a code and the name as a CRC-32.
# ---------------------------------------------------------------------------------------------
RECORD_KEY = "mup"
ROLE_CODES = {"input": 1, "hidden": 2, "output": 3, "vector": 4}  # 0: no width information
_ROLE_OF_CODE = {code: role for role, code in ROLE_CODES.items()}
_RECORD_FIELDS = ("role", "m_in", "m_out", "fan_in_dim", "name")
# Path components that wrappers insert into parameter names: activation checkpointing, torch.compile
# (a compiled module's named_parameters), FSDP1; DDP / DataParallel put "module." in front. A
# record saved under one wrapping must fit the same parameter under another.
_WRAPPER_PARTS = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"})


def canonical_name(name: str) -> str:
    """``name`` without the path components wrappers insert (``_checkpoint_wrapped_module``,
    ``_orig_mod``, ``_fsdp_wrapped_module``, a leading ``module``)."""
    parts = [part for part in name.split(".") if part not in _WRAPPER_PARTS]
    if len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


# name -> name_code(name), filled when a record is made (add_param_group): a step traced by
# torch.compile(fullgraph=True) reads the code here, since dynamo cannot trace zlib.crc32.
_NAME_CODES: dict[str, int] = {}


def name_code(name: str | None) -> int:
    """The record's form of a parameter name: CRC-32 of :func:`canonical_name`, -1 if unknown."""
    if name is None:
        return -1
    code = _NAME_CODES.get(name)
    if code is None:
        code = _NAME_CODES[name] = zlib.crc32(canonical_name(name).encode())
    return code


def width_record(info: WidthInfo | None, shape: Iterable[int], name: str | None = None,
                 depth: DepthInfo | None = None) -> dict:
    """The record of a parameter of global shape ``shape`` (a DTensor's ``shape``) with width
    ``info`` (None: no width information, every multiplier 1), name ``name`` and depth
    ``depth``. The depth fields (``branch`` 0/1, ``m_depth``, ``alpha``) are there only with
    depth information: a record without them (every record saved before they existed) reads as
    depth multiplier 1 (:func:`read_depth`)."""
    if info is None:
        role, m_in, m_out, fan_in_dim = 0, 1.0, 1.0, 1
    else:
        role, m_in, m_out, fan_in_dim = ROLE_CODES[info.role], float(info.m_in), float(info.m_out), info.fan_in_dim
    record = {"role": role, "m_in": m_in, "m_out": m_out, "fan_in_dim": fan_in_dim, "name": name_code(name),
              "shape": {str(i): int(s) for i, s in enumerate(shape)}}
    if depth is not None:
        record.update(branch=int(depth.branch), m_depth=float(depth.m_depth), alpha=float(depth.alpha))
    return record


_DEPTH_FIELDS = ("branch", "m_depth", "alpha")


def read_depth(record: Mapping, label) -> DepthInfo | None:
    """The DepthInfo of a width record (:func:`width_record`); None for a record without depth
    fields (saved before they existed, or without set_base_depth). A record with only some of
    them, or with bad values, raises :class:`MupError` naming the parameter (``label``)."""
    have = [k in record for k in _DEPTH_FIELDS]
    if not any(have):
        return None
    def where() -> str:
        return label() if callable(label) else label
    if not all(have):
        raise MupError(f"the muP record for parameter {where()} has some depth fields but not all of {_DEPTH_FIELDS}: {record!r}")
    if record["branch"] not in (0, 1):
        raise MupError(f"the muP record for parameter {where()} has branch {record['branch']!r} (expected 0 or 1)")
    try:
        return DepthInfo(bool(record["branch"]), float(record["m_depth"]), float(record["alpha"]))
    except (MupError, TypeError, ValueError) as exc:
        raise MupError(f"the muP record for parameter {where()} has malformed depth fields: {exc}") from None


def copy_record(record: Mapping) -> dict:
    return {**record, "shape": dict(record.get("shape", {}))}


def old_record(record: Mapping | None, shape: Iterable[int]) -> dict:
    """A record of mupopt's first format (``WidthInfo.as_dict()`` in ``group["mup"]``, by
    position) as a width record; it knew no shape, so the parameter's own is taken."""
    info = None if record is None else WidthInfo.from_dict(record)
    return width_record(info, shape, None if record is None else record.get("name"))


def read_record(record: Mapping, shape: tuple[int, ...], name: str | None, label) -> WidthInfo | None:
    """The WidthInfo of ``record`` for the parameter it is about to serve, whose global shape is
    ``shape`` and name ``name`` (None: not known here). Raises :class:`MupError` naming the
    parameter (``label``: its text, or a callable returning it, called only for an error) when
    the record is malformed or was saved for another parameter: another global shape, or another
    name where both names are known."""

    def fail(problem: str) -> MupError:
        return MupError(f"the muP width record for parameter {label() if callable(label) else label} {problem}")

    if not isinstance(record, Mapping) or any(k not in record for k in _RECORD_FIELDS):
        raise fail(f"is malformed: expected a dict with keys {_RECORD_FIELDS} and 'shape', got {record!r}")
    dims = record.get("shape", {})  # DCP's flattened layout drops the empty shape of a scalar
    try:
        saved_shape = tuple(int(dims[str(i)]) for i in range(len(dims)))
    except (KeyError, TypeError, ValueError):
        raise fail(f"has a malformed shape {dims!r}") from None
    if saved_shape != tuple(shape):
        raise fail(
            f"was saved for a parameter of shape {saved_shape}, but it has shape {tuple(shape)}: the records belong "
            f"to other parameters (a state_dict of another model, edited, or re-keyed by a framework)"
        )
    code = name_code(name)
    if record["name"] != -1 and code != -1 and record["name"] != code:
        raise fail(
            f"was saved for a parameter of another name (same shape {tuple(shape)}): the records belong to other "
            f"parameters (re-ordered, edited, or re-keyed by a framework)"
        )
    role = record["role"]
    if role == 0:
        return None
    if role not in _ROLE_OF_CODE:
        raise fail(f"has an unknown role code {role!r} (known: {ROLE_CODES}, 0 for none)")
    try:
        return WidthInfo(_ROLE_OF_CODE[role], record["m_in"], record["m_out"], record["fan_in_dim"], name)
    except MupError as exc:
        raise fail(f"is malformed: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The rule table (docs/mup.md, P1 Table 2 in "multiplier = 1 at the base width" form).
# Each entry is the pair of exponents (e_in, e_out): lr multiplier = m_in**e_in * m_out**e_out.
# ---------------------------------------------------------------------------------------------
_ADAM_LIKE = {"input": (0.0, 0.0), "hidden": (-1.0, 0.0), "output": (-1.0, 0.0), "vector": (0.0, 0.0)}

LR_EXPONENTS: dict[str, dict[str, tuple[float, float]]] = {
    "adamw": _ADAM_LIKE,
    "adopt": _ADAM_LIKE,
    "sophia": _ADAM_LIKE,
    # P1 derives Theta(1) for every LAMB layer; the hidden exponent is an option (see multipliers).
    "lamb": {"input": (0.0, 0.0), "hidden": (0.0, 0.0), "output": (0.0, 0.0), "vector": (0.0, 0.0)},
    # Shampoo without grafting, exponent -1/4 on both sides; vectors are preconditioned
    # diagonally, i.e. like Adam.
    "shampoo": {"input": (0.0, 0.5), "hidden": (-0.5, 0.5), "output": (-0.5, 0.0), "vector": (0.0, 0.0)},
    # Adam grafting gives every block Adam's norm, hence Adam's rule.
    "shampoo_grafted": _ADAM_LIKE,
    # Muon's own shape factor already makes hidden updates width-stable: never stack 1/m on it.
    "muon": {"hidden": (0.0, 0.0)},
    # match_rms_adamw (0.2*sqrt(max(A, B))) grows with width: P1/Zheng give lr / sqrt(m_in).
    "muon_match_rms_adamw": {"hidden": (-0.5, 0.0)},
}

# The rules of Muon's matrices (hidden only: the other tensors take AdamW's, Muon's AdamW part).
MUON_RULES = ("muon", "muon_match_rms_adamw")

# Where the decay acts: "decoupled" is p *= 1 - lr*wd*wd_mult before the update; LAMB puts wd*p
# inside its trust-ratio-normalised direction, so its decay scales with the lr multiplier.
WD_FORM = {name: "decoupled" for name in LR_EXPONENTS}
WD_FORM["lamb"] = "in_update"

# P1: epsilon needs scaling (by 1/m_out) only where it is not negligible; opt-in via scale_eps.
EPS_SCALED = {"adamw", "adopt", "lamb"}  # the optimizers with a scale_eps option
# Depth: the rules whose epsilon is added to sqrt(v) of the gradient, which carries the residual
# multiplier m_L^(-alpha) in a branch: their epsilon gets that factor too (CompleteP Table 1),
# always (the depth rule is opted into by set_base_depth). Sophia's clip denominator and
# Shampoo's damping take no epsilon multiplier (Shampoo's relative_epsilon is scale-free).
DEPTH_EPS = {"adamw", "adopt", "lamb"}


class Multipliers(NamedTuple):
    """Per-tensor scalars applied inside step(): lr*lr, decay lr*wd*wd, eps*eps."""

    lr: float = 1.0
    wd: float = 1.0
    eps: float = 1.0


ONES = Multipliers()


def shampoo_block_lr(info: WidthInfo, shape: tuple[int, ...], max_dim: int) -> float:
    """Ungrafted Shampoo's lr multiplier for a weight preconditioned in blocks of side <= max_dim
    (its 2-D view (shape[0], rest), as mupopt.optim.shampoo.blocks_of cuts it).

    For one block, L^(-1/4) G R^(-1/4) of a rank-one gradient u v^T is u v^T / (|u| |v|): entries
    of size 1/sqrt(b_r b_c) for block sides b_r x b_c. Per output coordinate, Delta W x adds
    fan_in / b_c coherent blocks of size sqrt(b_c) each (x has Theta(1) coordinates and v is
    aligned with x), so |(Delta W x)_i| ~ fan_in / sqrt(b_r b_c) and muP's Theta(1) needs
    lr ~ sqrt(b_r b_c) / fan_in. Unblocked (b = the sides) this is docs/mup.md's row: input
    sqrt(m_out), hidden sqrt(m_out/m_in), output 1/sqrt(m_in); with both sides capped at a fixed
    block it is AdamW's 1/m_in, since a capped side no longer grows with width.
    """
    rows = shape[0]
    cols = math.prod(shape[1:])
    m_rows, m_cols = (info.m_out, info.m_in) if info.fan_in_dim == 1 else (info.m_in, info.m_out)

    def side_growth(n: int, m: float) -> float:  # block side at this width / at the base width
        return min(n, max_dim) / min(n / m, max_dim)

    return math.sqrt(side_growth(rows, m_rows) * side_growth(cols, m_cols)) / info.m_in


def multipliers(
    rule: str,
    info: WidthInfo | None,
    *,
    depth: DepthInfo | None = None,
    wd_mode: str = "independent",
    scale_eps: bool = False,
    lamb_hidden_exponent: float = 0.0,
    shampoo_blocks: tuple[tuple[int, ...], int] | None = None,
) -> Multipliers:
    """The per-tensor multipliers of optimizer ``rule`` for a tensor with width ``info`` and
    depth ``depth`` (None: no width / no depth information, factor 1).

    wd_mode "independent" (default, P1 and P2): the per-step decay lr*wd is the same at every
    width, i.e. the width lr multiplier does not touch the decay. "coupled": the decay is scaled
    with the lr multiplier, as torch.optim with one param group per width would do (P2 shows it
    fails late in training). "inverse_width" (Qiu et al., arXiv 2512.05620): independent decay
    scaled by 1/m, m = max(m_in, m_out), the tensor's width ratio (near-optimal for
    compute-optimal horizons, where training runs longer at larger width). ``shampoo_blocks``
    (shape, max_preconditioner_dim) of a weight with L and R: rule "shampoo" then takes the
    block sides into account (:func:`shampoo_block_lr`) instead of the table's unblocked exponents.

    Depth (docs/mup.md, "Depth"): a tensor of a residual branch gets lr and decay factor
    m_L^(alpha-1) (CompleteP, Dey et al., arXiv 2505.01618, Table 1, for AdamW; derived for the
    other optimizers, all of which make scale-free updates) and, for the Adam-type epsilon
    (DEPTH_EPS), m_L^(-alpha). Tensors outside the branches get no depth factor.
    """
    if rule not in LR_EXPONENTS:
        raise MupError(f"no muP rule for optimizer {rule!r}; known: {sorted(LR_EXPONENTS)}")
    if wd_mode not in WD_MODES:
        raise ValueError(f"Invalid wd_mode: {wd_mode!r} (expected one of {WD_MODES})")
    lr = wd = eps = 1.0
    if info is not None:
        table = LR_EXPONENTS[rule]
        if info.role not in table:
            raise MupError(f"optimizer rule {rule!r} has no entry for role {info.role!r}")
        e_in, e_out = table[info.role]
        if rule == "lamb" and info.role == "hidden":
            e_in = lamb_hidden_exponent
        lr = info.m_in**e_in * info.m_out**e_out
        if rule == "shampoo" and shampoo_blocks is not None and info.role != "vector":
            lr = shampoo_block_lr(info, *shampoo_blocks)
        if wd_mode == "coupled":
            wd = lr
        elif wd_mode == "inverse_width":
            wd = 1.0 / max(info.m_in, info.m_out)
        eps = 1.0 / info.m_out if (scale_eps and rule in EPS_SCALED) else 1.0
    if depth is not None:
        # CompleteP scales the decay with the depth lr factor (weight_decay * m_N only, lr *
        # m_L^(alpha-1)): lr*wd follows depth in every wd_mode; 1 at alpha = 1.
        lr *= depth.lr
        wd *= depth.lr
        if rule in DEPTH_EPS:
            eps *= depth.eps
    return Multipliers(lr, wd, eps)


# ---------------------------------------------------------------------------------------------
# set_base_shapes: which dimensions scale, and each parameter's role.
# ---------------------------------------------------------------------------------------------
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_MATRIX_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)

# One dimension: (size, base size or None when the dimension does not scale with width).
Dim = tuple[int, "int | None"]


def _shape_of(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(x)


def _canonical_keys(shapes: Mapping) -> dict:
    return {canonical_name(n): s for n, s in shapes.items()}


def _dims_from_base(name, shape, base_shapes, delta_shapes, key=None) -> list[Dim]:
    """``key``: the name in ``base_shapes`` / ``delta_shapes`` (canonical_name), default name."""
    key = name if key is None else key
    if key not in base_shapes:
        raise MupError(
            f"parameter {name!r} is missing from the base model: build the base model with the "
            f"same module names, or declare it with overrides={{{name!r}: <role or WidthInfo>}}"
        )
    base = base_shapes[key]
    ref = delta_shapes.get(key, shape) if delta_shapes is not None else shape
    if delta_shapes is not None and key not in delta_shapes:
        raise MupError(f"parameter {name!r} is missing from the delta model")
    if len(base) != len(shape) or len(ref) != len(shape):
        raise MupError(f"parameter {name!r} has shape {shape} but {base} in the base model")
    return [(s, b if b != r else None) for s, b, r in zip(shape, base, ref)]


def _dims_from_record(name, shape, record: "BaseShapes", key=None) -> list[Dim]:
    """Dims from recorded base shapes: each entry is the base size of a width dimension or None."""
    key = name if key is None else key
    if key not in record:
        raise MupError(
            f"parameter {name!r} is missing from the recorded base shapes: record them again with "
            f"mupopt.make_base_shapes(base, delta, savefile) from models with the same module names, "
            f"or declare it with overrides={{{name!r}: <role or WidthInfo>}}"
        )
    base = record[key]
    if len(base) != len(shape):
        raise MupError(f"parameter {name!r} has shape {shape} but {len(base)} dimensions in the recorded base shapes")
    return [(s, b) for s, b in zip(shape, base)]


def _check_not_narrower(name, shape, dims: list[Dim]) -> None:
    """A width dimension smaller than its base size: the base must be the narrower model."""
    for i, (size, base) in enumerate(dims):
        if base is not None and size < base:
            raise MupError(
                f"parameter {name!r}: dimension {i} is {size} in the model but {base} at the base width "
                f"(shape {shape}): the base must be the narrow model the learning rate was tuned on and "
                f"the model at least as wide. Did you swap model and base (set_base_shapes(model, base))?"
            )


def _check_same_names(model_names: set[str], other: Mapping, what: str) -> None:
    """A base (or delta) with parameters the model lacks was built from another configuration."""
    extra = sorted(set(other) - model_names)
    if extra:
        shown = ", ".join(map(repr, extra[:5])) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise MupError(
            f"the {what} has {len(extra)} parameter(s) the model lacks ({shown}): build it from the "
            f"same configuration as the model except the width (same depth, same modules)"
        )


def _dims_from_infshape(name, p) -> list[Dim]:
    infshape = getattr(p, "infshape", None)
    if infshape is None:
        raise MupError(
            f"parameter {name!r} has no width information: pass base= (a base model or its "
            f"shapes), base_widths=, or call mup.set_base_shapes first so it carries p.infshape"
        )
    return [(d.dim, d.base_dim if d.isinf() else None) for d in infshape]


def _dims_from_widths(shape, base_widths) -> list[Dim]:
    return [(s, base_widths.get(s)) for s in shape]


def _ratio(dim: Dim) -> float:
    size, base = dim
    return 1.0 if base is None else size / base


def _fan_dims(module) -> tuple[int, int]:
    """(fan_in dim, fan_out dim) of a weight of this module type. nn.Embedding (vocab, d) and
    the transposed convolutions, whose weight is (in_channels, out_channels / groups, *kernel),
    have fan_in first; nn.Linear and the other convolutions (out, in / groups, ...) have it
    second. A grouped transposed convolution keeps the second: its dim 0 holds every group, and
    a depthwise one (groups = in_channels, the grouping that grows with width) has a fixed fan_in
    (the kernel) and its channels, dim 0, as fan_out, like a depthwise nn.Conv2d."""
    if isinstance(module, _EMBEDDINGS):
        return (0, 1)
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups == 1:
        return (0, 1)
    return (1, 0)


_NO_WIDTH_HINT = (
    "Pass delta= (a model of another width) or base_widths= listing every width-derived size"
)
# At the base width the model has the base's shapes, so nothing tells a width from a fixed size.
_BASE_WIDTH_HINT = (
    "The model has the base's shapes (the tuning run at the base width?). One-line fix: give a "
    "model at another width as delta, e.g. set_base_shapes(model, base, delta=GPT(width=2 * "
    "base_width)) built on the meta device, or record the shapes once with "
    "mupopt.make_base_shapes(base, delta, 'model.bsh') and pass 'model.bsh' as base= at every width"
)


def _infer(name: str, module, dims: list[Dim], hint: str | None = None) -> WidthInfo:
    scales = [base is not None for _, base in dims]
    if len(dims) <= 1:
        return WidthInfo("vector", 1.0, _ratio(dims[0]) if dims else 1.0)
    if sum(scales) > 2:
        raise MupError(f"parameter {name!r} has more than two width dimensions: {dims}")
    fan_in, fan_out = _fan_dims(module)
    if any(scales[2:]):
        raise MupError(
            f"parameter {name!r}: a dimension beyond fan_out/fan_in scales with width; declare it "
            f"with overrides={{{name!r}: WidthInfo(role, m_in, m_out)}}"
        )
    in_s, out_s = scales[fan_in], scales[fan_out]
    m_in, m_out = _ratio(dims[fan_in]), _ratio(dims[fan_out])
    if module is None:  # known by its name alone (an optimizer's base_shapes=): nn.Linear's layout
        return _infer_by_name(name, dims, in_s, out_s, m_in, m_out)
    if isinstance(module, _EMBEDDINGS):
        if in_s:
            raise MupError(f"embedding {name!r}: its vocabulary dimension (dim 0) scales with width")
        return WidthInfo("input", m_in, m_out, fan_in_dim=fan_in)
    if in_s and out_s:
        return WidthInfo("hidden", m_in, m_out, fan_in_dim=fan_in)
    if isinstance(module, _MATRIX_MODULES):
        if in_s:
            return WidthInfo("output", m_in, m_out, fan_in_dim=fan_in)
        if out_s:
            return WidthInfo("input", m_in, m_out, fan_in_dim=fan_in)
        raise MupError(
            f"parameter {name!r} ({type(module).__name__}, shape {tuple(s for s, _ in dims)}): no "
            f"dimension scales with width, so its role cannot be told. {hint or _NO_WIDTH_HINT} "
            f"(or declare overrides={{{name!r}: 'hidden'}})"
        )
    raise MupError(
        f"parameter {name!r} of module type {type(module).__name__} with shape "
        f"{tuple(s for s, _ in dims)} and width dimensions {[i for i, s in enumerate(scales) if s]} "
        f"is ambiguous (input, output or hidden?); declare it with "
        f"overrides={{{name!r}: 'input' | 'hidden' | 'output' | 'vector' | WidthInfo(...)}}"
    )


def _infer_by_name(name: str, dims: list[Dim], in_s: bool, out_s: bool, m_in: float, m_out: float) -> WidthInfo:
    """The role of a matrix whose module is not known (dims in nn.Linear's (fan_out, fan_in)
    layout). Both dimensions scale: hidden; only dim 0: input (a Linear from fixed features).
    Only dim 1 is a readout (nn.Linear (vocab, d): output) or an embedding table (nn.Embedding
    (vocab, d): input, its fan_in the vocabulary): the same shapes, so the name must be declared."""
    shape = tuple(s for s, _ in dims)
    if in_s and out_s:
        return WidthInfo("hidden", m_in, m_out)
    if out_s:
        return WidthInfo("input", m_in, m_out)
    if in_s:
        raise MupError(
            f"parameter {name!r} (shape {shape}): only dimension 1 scales with width, the shape of a readout "
            f"(nn.Linear weight (vocab, d): role 'output') and of an embedding table (nn.Embedding weight "
            f"(vocab, d): role 'input'); its name alone does not tell which. Declare it: "
            f"overrides={{{name!r}: 'output'}} or {{{name!r}: 'input'}} (or call mupopt.set_base_shapes on the "
            f"model, where the module type tells)"
        )
    raise MupError(
        f"parameter {name!r} (shape {shape}): no dimension scales with width in the recorded base shapes, so "
        f"its role cannot be told; declare it with overrides={{{name!r}: 'hidden' | 'input' | 'output'}}"
    )


def width_info_by_name(name: str, shape: tuple[int, ...], record: "BaseShapes",
                       overrides: Mapping[str, "str | WidthInfo"], used: set[str] | None = None) -> WidthInfo:
    """The width information of a parameter known by its name and global shape only, not its
    module (an optimizer given ``base_shapes=`` and named parameters): dimensions from the
    recorded base shapes (:func:`make_base_shapes`; keys and ``name`` compared without wrapper
    path components, :func:`canonical_name`), the role from which of them scale
    (:func:`_infer_by_name`) or from ``overrides`` (``{name pattern: role or WidthInfo}``, first
    match wins; matched patterns are added to ``used``)."""
    key = canonical_name(name)
    pattern = _matches([name, key], overrides)
    if key in record or pattern is None:
        dims = _dims_from_record(name, shape, record, key)
    else:  # declared by an override and absent from the record: nothing scales but the override
        dims = [(s, None) for s in shape]
    _check_not_narrower(name, shape, dims)
    if pattern is not None:
        if used is not None:
            used.add(pattern)
        info = _from_override(name, None, dims, overrides[pattern])
    else:
        info = _infer(name, None, dims)
    return dataclasses.replace(info, name=name)


def _from_override(name, module, dims: list[Dim], value) -> WidthInfo:
    """WidthInfo for a declared role: the role says where the width sits (input: fan_out;
    output: fan_in; vector: its one dimension), so a bare Parameter or a tied weight gets its m
    values from the role, not from the module it was found in."""
    if isinstance(value, WidthInfo):
        return value
    if value not in ROLES:
        raise MupError(f"override for {name!r}: expected a role in {ROLES} or a WidthInfo, got {value!r}")
    scaling = [_ratio(d) for d in dims if d[1] is not None]
    fan_in, fan_out = _fan_dims(module)
    if value == "hidden" and len(dims) >= 2:
        return WidthInfo("hidden", _ratio(dims[fan_in]), _ratio(dims[fan_out]), fan_in_dim=fan_in)
    if len(scaling) > 1:
        raise MupError(
            f"override for {name!r}: role {value!r} has one width dimension but {len(scaling)} of its "
            f"dimensions scale; declare it with overrides={{{name!r}: WidthInfo(role, m_in, m_out)}}"
        )
    m = scaling[0] if scaling else 1.0
    # The layout follows the declared role where a dimension scales (a tied (vocab, d) weight
    # declared "output" is used as a readout, whose fan_in d is dim 1, whichever module was
    # found first), else the module's.
    layout = fan_in
    width_dims = [i for i, d in enumerate(dims) if d[1] is not None]
    if len(dims) >= 2 and width_dims and width_dims[0] in (0, 1):
        layout = width_dims[0] if value == "output" else 1 - width_dims[0]
    return WidthInfo(value, m, 1.0, layout) if value == "output" else WidthInfo(value, 1.0, m, layout)


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    owners = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, _ in module.named_parameters(recurse=False, remove_duplicate=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    return owners


class BaseShapes(dict):
    """Recorded base shapes: ``{parameter name: [base size of each dimension, or None where the
    dimension does not scale with width]}``, what Microsoft mup's ``make_base_shapes`` records in
    a .bsh file. Made by :func:`make_base_shapes`, read by :func:`load_base_shapes`; pass it (or
    the file's path) as ``base=`` to :func:`set_base_shapes` at every width, the base included."""


def make_base_shapes(
    base: nn.Module | Mapping[str, Iterable[int]],
    delta: nn.Module | Mapping[str, Iterable[int]],
    savefile: str | os.PathLike | None = None,
) -> BaseShapes:
    """Record which dimensions scale with width, once, from two models that differ only in width.

    ``base`` is the model at the base width (the width the hyperparameters are tuned at) and
    ``delta`` the same model at any other width; build both on the meta device
    (``with torch.device("meta"):``), so they cost no memory. A dimension whose size differs
    between them is a width dimension; its base size is recorded. With ``savefile`` the record is
    also written there (JSON, which YAML readers such as Microsoft mup's also read). Then
    ``set_base_shapes(model, shapes_or_savefile)`` works at every width, the base width included.
    """
    base_shapes, delta_shapes = _named_shapes(base), _named_shapes(delta)
    if set(base_shapes) != set(delta_shapes):
        missing = sorted(set(base_shapes) ^ set(delta_shapes))[:5]
        raise MupError(f"base and delta have different parameters ({missing}): build both from one configuration")
    record = BaseShapes()
    for name, shape in base_shapes.items():
        other = delta_shapes[name]
        if len(other) != len(shape):
            raise MupError(f"parameter {name!r} has shape {shape} in the base but {other} in delta")
        record[name] = [b if b != d else None for b, d in zip(shape, other)]
    if not any(b is not None for dims in record.values() for b in dims):
        raise MupError("base and delta have the same shapes: build delta at another width")
    if savefile is not None:
        with open(savefile, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return record


def load_base_shapes(path: str | os.PathLike) -> BaseShapes:
    """Read base shapes written by :func:`make_base_shapes` (JSON) or by Microsoft mup's
    ``make_base_shapes`` (a YAML .bsh file; needs pyyaml)."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml
        except ImportError as e:
            raise MupError(f"{os.fspath(path)!r} is not JSON; reading a YAML .bsh file needs pyyaml (pip install pyyaml)") from e
        data = yaml.safe_load(text)
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and all(b is None or isinstance(b, int) for b in v) for v in data.values()
    ):
        raise MupError(f"{os.fspath(path)!r} does not hold base shapes ({{name: [base size or null, ...]}})")
    return BaseShapes(data)


def set_base_shapes(
    model: nn.Module,
    base: nn.Module | Mapping[str, Iterable[int]] | str | os.PathLike | None = None,
    *,
    delta: nn.Module | Mapping[str, Iterable[int]] | None = None,
    base_widths: Mapping[int, int] | None = None,
    overrides: Mapping[str, "str | WidthInfo"] | None = None,
    partial: bool = False,
) -> dict[str, WidthInfo]:
    """Give every parameter of ``model`` its muP width information; return it by name.

    Sources, in order of precedence per parameter:

    - ``overrides``: ``{name pattern: role or WidthInfo}`` (fnmatch patterns, first match wins).
      A pattern that matches no parameter is an error (a typo must not pass silently).
    - ``base``: a model (build it on the meta device to spend no memory) or ``{name: shape}``.
      A dimension that differs from the base is a width dimension. ``delta`` (a model at a
      third width) tells which dimensions scale when ``model`` equals the base, as in mup.
      Or recorded base shapes (:func:`make_base_shapes`, or the path of the file it wrote):
      they say which dimensions scale, so they work unchanged at every width, the base included.
      The base must not be wider than the model, nor have parameters the model lacks.
    - ``base_widths``: ``{size: base size}`` for a base-width configuration without a base model,
      e.g. ``{1024: 256, 4096: 1024}`` for d_model and d_ff; a dimension of a listed size scales.
    - otherwise ``p.infshape`` from Microsoft's ``mup.set_base_shapes``.

    Roles come from the module type and which dimensions scale (docs/mup.md). Tied weights
    without an override, unknown modules with an ambiguous shape and parameters missing from the
    base raise :class:`MupError` naming the parameter and the fix.

    Names are matched without the path components wrappers insert (:func:`canonical_name`:
    activation checkpointing's ``_checkpoint_wrapped_module``, ``_orig_mod``, DDP's ``module.``),
    so base shapes recorded from a plain model serve its wrapped, sharded form too (a DTensor's
    ``shape`` is the global one). ``partial=True``: ``model`` is a part of the model the base
    was recorded from (a pipeline stage), so base entries it lacks are no error.
    """
    if base is not None and base_widths is not None:
        raise MupError("pass either base= or base_widths=, not both")
    if delta is not None and base is None:
        raise MupError("delta= needs base=")
    _check_source_types(base, delta, base_widths)
    if isinstance(base, (str, os.PathLike)):
        base = load_base_shapes(base)
    if isinstance(base, Mapping) and not isinstance(base, BaseShapes) and _is_record(base):
        base = _as_record(base)
    record = base if isinstance(base, BaseShapes) else None
    if record is not None and delta is not None:
        raise MupError("recorded base shapes already say which dimensions scale: pass them without delta=")
    base_shapes = delta_shapes = None
    if base is not None and record is None:
        base_shapes = _canonical_keys(_named_shapes(base))
    if delta is not None:
        delta_shapes = _canonical_keys(_named_shapes(delta))
        if base_shapes == delta_shapes:  # else every Linear's "nothing scales" error says "pass delta="
            raise MupError("base and delta have the same shapes: build delta at another width than the base")
    if record is not None:
        record = BaseShapes(_canonical_keys(record))
    overrides = dict(overrides or {})
    used_patterns: set[str] = set()

    _warn_unapplied_readouts(model)
    owners = _owners(model)
    names_of: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params[id(p)] = p
    for other, what in ((base_shapes, "base model"), (delta_shapes, "delta model"), (record, "recorded base shapes")):
        if other is not None and not partial:
            _check_same_names({canonical_name(n) for n in owners}, other, what)
    # Which fix the "nothing scales" error shows: at the base width, the one-line delta= fix.
    hint = None
    if base_shapes is not None and delta_shapes is None and all(
        base_shapes.get(canonical_name(n)) == tuple(params[pid].shape) for pid, ns in names_of.items() for n in ns
    ):
        hint = _BASE_WIDTH_HINT

    result: dict[str, WidthInfo] = {}
    planned: list[tuple[torch.nn.Parameter, list[str], WidthInfo, tuple[int, ...]]] = []
    for pid, names in names_of.items():
        p = params[pid]
        name = names[0]
        key = canonical_name(name)
        shape = tuple(p.shape)
        pattern = _matches(names + [canonical_name(n) for n in names], overrides)
        if base_shapes is not None and (key in base_shapes or pattern is None):
            dims = _dims_from_base(name, shape, base_shapes, delta_shapes, key)
        elif record is not None and (key in record or pattern is None):
            dims = _dims_from_record(name, shape, record, key)
        elif base_widths is not None:
            dims = _dims_from_widths(shape, base_widths)
        elif hasattr(p, "infshape") or pattern is None:
            dims = _dims_from_infshape(name, p)
        else:  # declared by an override and absent from the base: nothing scales but the override
            dims = [(s, None) for s in shape]
        _check_not_narrower(name, shape, dims)
        if pattern is not None:
            used_patterns.add(pattern)
            info = _from_override(name, owners[name], dims, overrides[pattern])
        elif len(names) > 1:
            raise MupError(_tied_message(name, names, owners))
        else:
            info = _infer(name, owners[name], dims, hint)
            if base_widths is not None:
                _warn_unlisted_width(name, owners[name], shape, info, base_widths)
        info = dataclasses.replace(info, name=name)  # labels mup_summary() of plain parameters
        if info.role == "output" and (hasattr(owners[name], READOUT_BUFFER) or _is_mu_readout(owners[name])):
            # readout_multiplier_ (or restore_readout_multipliers) put the output rule's 1/m in
            # the forward pass, as Microsoft mup's MuReadout does (its output / width_mult, m_in):
            # the lr must not apply it again.
            info = dataclasses.replace(info, m_in=1.0)
        planned.append((p, names, info, shape))
    unused = set(overrides) - used_patterns
    if unused and not partial:  # in a pipeline stage, a pattern may name another stage's parameters
        raise MupError(f"overrides {sorted(unused)} match no parameter of the model")
    # Every error is raised above, before any parameter is changed: a failed call leaves the
    # model as it was (not part of the new information beside part of an older call's).
    for p, names, info, shape in planned:
        for n in names:
            result[n] = info
            local_name = n.rpartition(".")[2]
            owners[n].__dict__.setdefault(MODULE_WIDTHS_ATTR, {})[local_name] = (info, shape)
        setattr(p, WIDTH_ATTR, info)
    _register(model)
    return result


def _is_mu_readout(module) -> bool:
    """Microsoft mup's MuReadout (or MuSharedReadout): its forward divides the logits by its
    width_mult, the readout's m_in. Looked up where mup is imported only (a model holding one
    imported it); mupopt does not depend on mup."""
    layer = sys.modules.get("mup.layer")
    readout = getattr(layer, "MuReadout", None)
    return isinstance(readout, type) and isinstance(module, readout)


def _is_record(shapes: Mapping) -> bool:
    """Recorded base shapes in a plain dict rather than {name: shape}: what Microsoft mup's
    make_base_shapes returns (without a savefile: {name: InfShape}, whose InfDims have a
    base_dim, None for a fixed dimension) or a .bsh file read by hand ({name: [16, None]})."""
    return any(
        isinstance(v, (list, tuple)) and any(d is None or hasattr(d, "base_dim") for d in v) for v in shapes.values()
    )


def _as_record(shapes: Mapping) -> "BaseShapes":
    return BaseShapes({n: [getattr(d, "base_dim", d) for d in v] for n, v in shapes.items()})


def _tied_message(name: str, names: list[str], owners: Mapping[str, nn.Module]) -> str:
    """A tied weight: say muP's answer for an embedding tied to a readout (Microsoft mup's
    MuSharedReadout): the optimizer treats it as input, the readout's logits get 1/m."""
    readouts = [n for n in names if not isinstance(owners[n], _EMBEDDINGS)]
    if readouts and any(isinstance(owners[n], _EMBEDDINGS) for n in names):
        module = readouts[0].rsplit(".", 1)[0] if "." in readouts[0] else ""
        return (
            f"parameter {name!r} is tied to {names[1:]}: an embedding shared with a readout. muP treats "
            f"it as input and multiplies the readout's logits by 1/m: pass overrides={{{name!r}: 'input'}}, "
            f"then call mupopt.readout_multiplier_(model, {module!r}) before creating the optimizer"
        )
    return (
        f"parameter {name!r} is tied to {names[1:]}: its role cannot be told from one "
        f"module; declare it with overrides={{{name!r}: 'input' | 'output' | ...}}"
    )


def _warn_unlisted_width(name: str, module, shape: tuple[int, ...], info: WidthInfo,
                         base_widths: Mapping[int, int]) -> None:
    """base_widths= takes a size it does not list for a fixed dimension. A Linear/conv weight that
    came out "input" or "output" (one side scales) whose other side is a multiple of a listed
    size most likely forgot one (d_ff = 4 d_model, a fused qkv of 3 d_model): its role, and so
    its multipliers, would then be wrong without a word. Warn, naming both fixes."""
    if not isinstance(module, _MATRIX_MODULES) or info.role not in ("input", "output") or len(shape) < 2:
        return
    fan_in, fan_out = _fan_dims(module)
    fixed = shape[fan_in] if info.role == "input" else shape[fan_out]
    for width in sorted(base_widths):
        if fixed != width and fixed % width == 0:
            warnings.warn(
                f"set_base_shapes(base_widths=...): {name!r} {tuple(shape)} came out {info.role!r} because "
                f"its dimension {fixed} is not in base_widths, but {fixed} is {fixed // width}x the listed "
                f"width {width}. If it derives from the width, add {{{fixed}: <its base size>}}; if it is "
                f"fixed, declare overrides={{{name!r}: {info.role!r}}} to say so.",
                MupWarning,
                stacklevel=3,
            )
            return


def _check_source_types(base, delta, base_widths) -> None:
    """Wrong types get a TypeError saying what each argument takes, not an AttributeError."""
    sources = (nn.Module, Mapping, str, os.PathLike)
    if base is not None and not isinstance(base, sources):
        hint = f" For a base width, pass base_widths={{<width>: {base!r}}}." if isinstance(base, int) else ""
        raise TypeError(
            f"set_base_shapes: base= takes a base model (built on the meta device), its {{name: shape}} "
            f"dict, or base shapes recorded by mupopt.make_base_shapes (or their file's path); got "
            f"{type(base).__name__} {base!r}.{hint}"
        )
    if delta is not None and not isinstance(delta, (nn.Module, Mapping)):
        raise TypeError(f"set_base_shapes: delta= takes a model at another width or its {{name: shape}} dict; got {type(delta).__name__}")
    if base_widths is not None and not (
        isinstance(base_widths, Mapping)
        and all(isinstance(k, int) and isinstance(v, int) and k > 0 and v > 0 for k, v in base_widths.items())
    ):
        raise TypeError(
            f"set_base_shapes: base_widths= takes {{size in the model: its size at the base width}} (positive ints), "
            f"e.g. {{2048: 256, 8192: 1024}}; got {base_widths!r}"
        )


def _matches(names: list[str], overrides: Mapping[str, object]) -> str | None:
    for pattern in overrides:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


def _named_shapes(x) -> dict[str, tuple[int, ...]]:
    if isinstance(x, nn.Module):
        return {n: tuple(p.shape) for n, p in x.named_parameters(remove_duplicate=False)}
    return {n: _shape_of(s) for n, s in x.items()}


def clear_base_shapes(model: nn.Module) -> None:
    """Remove mupopt's width information from every parameter (multipliers back to 1)."""
    for p in model.parameters():
        if hasattr(p, WIDTH_ATTR):
            delattr(p, WIDTH_ATTR)
    for module in model.modules():
        module.__dict__.pop(MODULE_WIDTHS_ATTR, None)
    _MODELS.discard(model)


def name_in_models(p: torch.Tensor) -> str | None:
    """The name of ``p`` in a model set_base_shapes was called on, or None (for messages)."""
    for model in list(_MODELS):
        for name, q in model.named_parameters(remove_duplicate=False):
            if q is p:
                return name
    return None


def recover_width_infos(params: Iterable[torch.Tensor]) -> int:
    """Re-attach width info to parameters that lost it when FSDP2 or tensor parallelism replaced
    them (same module, same name, same global shape: a DTensor's ``shape`` is the global one).

    Looks only at models set_base_shapes was called on. A parameter found under a recorded name
    whose shape differs raises :class:`MupError` (its width info would be wrong). Returns how many
    parameters got their width info back."""
    params = list(params)
    _recover_depth_infos(params)  # set_base_depth's information, kept the same way
    missing = {id(p): p for p in params if getattr(p, WIDTH_ATTR, None) is None}
    if not missing:
        return 0
    recovered = 0
    for model in list(_MODELS):
        for mod_name, module in model.named_modules(remove_duplicate=False):
            records = module.__dict__.get(MODULE_WIDTHS_ATTR)
            if not records:
                continue
            for local_name, (info, shape) in records.items():
                q = module._parameters.get(local_name)
                if q is None or id(q) not in missing:
                    continue
                name = f"{mod_name}.{local_name}" if mod_name else local_name
                if tuple(q.shape) != tuple(shape):
                    raise MupError(
                        f"parameter {name!r} now has shape {tuple(q.shape)} but {tuple(shape)} when "
                        f"set_base_shapes saw it: call mupopt.set_base_shapes again on the model as it is now"
                    )
                setattr(q, WIDTH_ATTR, info)
                del missing[id(q)]
                recovered += 1
    return recovered


def _recover_depth_infos(params: Iterable[torch.Tensor]) -> None:
    """recover_width_infos for the depth information of :func:`set_base_depth`."""
    missing = {id(p) for p in params if getattr(p, DEPTH_ATTR, None) is None}
    if not missing:
        return
    for model in list(_MODELS):
        for mod_name, module in model.named_modules(remove_duplicate=False):
            for local_name, (info, shape) in (module.__dict__.get(MODULE_DEPTHS_ATTR) or {}).items():
                q = module._parameters.get(local_name)
                if q is None or id(q) not in missing:
                    continue
                if tuple(q.shape) != tuple(shape):
                    name = f"{mod_name}.{local_name}" if mod_name else local_name
                    raise MupError(f"parameter {name!r} now has shape {tuple(q.shape)} but {tuple(shape)} when "
                                   f"set_base_depth saw it: call mupopt.set_base_depth again on the model as it is now")
                setattr(q, DEPTH_ATTR, info)
                missing.discard(id(q))



# ---------------------------------------------------------------------------------------------
# set_base_depth: which parameters live in residual branches, and the depth multiplier.
# ---------------------------------------------------------------------------------------------
RESIDUAL_ATTR = "mupopt_residual_multiplier"


def _block_signature(block: nn.Module) -> tuple:
    return tuple((type(m).__name__, n) for n, m in block.named_modules()) + tuple(
        (n, tuple(p.shape)) for n, p in block.named_parameters(remove_duplicate=False))


def set_base_depth(model: nn.Module, blocks: Iterable[nn.Module], base_depth: int = 2, alpha: float = 1.0) -> float:
    """Give every parameter of ``model`` its depth information; return the residual multiplier
    ``(base_depth / depth) ** alpha`` for the forward pass (``x = x + mult * block(x)``).

    ``blocks``: the repeated residual blocks (e.g. ``model.blocks``), all modules of ``model``
    and all of the same structure; depth = their number, m_L = depth / base_depth. Their
    parameters are the residual-branch tensors (lr and decay x m_L^(alpha-1), Adam epsilon x
    m_L^(-alpha): :func:`multipliers`); every other parameter gets depth factor 1. ``alpha``: 1
    is CompleteP (Dey et al., arXiv 2505.01618), 1/2 depth-muP (Yang et al., arXiv 2310.02244;
    Bordelon et al., arXiv 2309.16620); values outside [1/2, 1] are refused (the theory covers
    that range only; alpha = 0 is standard parameterization: do not call this function).

    The information composes with :func:`set_base_shapes` in either order (a separate
    attribute, ``p.mupopt_depth``), is recorded by name on the owning modules so that FSDP2 /
    tensor parallelism keep it (:func:`recover_width_infos`), travels in the optimizer's width
    records (``state[p]["mup"]``) and shows in :func:`summary`. The multiplier is also kept as
    ``model.mupopt_residual_multiplier``. The forward multiplier itself is the model's to apply.
    """
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise MupError(f"blocks= takes the repeated blocks (an nn.ModuleList or a list of modules), got one "
                       f"{type(blocks).__name__}")
    blocks = list(blocks)
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise MupError("blocks= must be a non-empty list of the model's residual blocks (nn.Module)")
    if isinstance(base_depth, bool) or not isinstance(base_depth, (int, float)) or not math.isfinite(base_depth) \
            or base_depth <= 0:
        raise MupError(f"base_depth must be a positive number (the depth the hyperparameters were tuned at), "
                       f"got {base_depth!r}")
    lo, hi = ALPHA_RANGE
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not lo <= alpha <= hi:
        raise MupError(f"alpha must be in [{lo}, {hi}]: 1 is CompleteP, 0.5 depth-muP; got {alpha!r} (alpha = 0, "
                       f"standard parameterization, means no depth rule: do not call set_base_depth)")
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    for i, b in enumerate(blocks):
        if id(b) not in names:
            raise MupError(f"block {i} ({type(b).__name__}) is not a module of the model: pass the model's own "
                           f"blocks (e.g. blocks=model.blocks)")
    if len({id(b) for b in blocks}) != len(blocks):
        raise MupError("blocks= lists a module more than once")
    first = _block_signature(blocks[0])
    for i, b in enumerate(blocks[1:], 1):
        if _block_signature(b) != first:
            raise MupError(f"block {i} ({names[id(b)]!r}) differs in structure from block 0 ({names[id(blocks[0])]!r}): "
                           f"the depth rule assumes repeated identical blocks")
    m_depth = len(blocks) / base_depth
    in_branch = {id(p) for b in blocks for p in b.parameters()}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            info = DepthInfo(id(p) in in_branch, float(m_depth), float(alpha))
            setattr(p, DEPTH_ATTR, info)
            module.__dict__.setdefault(MODULE_DEPTHS_ATTR, {})[local] = (info, tuple(p.shape))
    mult = (base_depth / len(blocks)) ** alpha
    model.__dict__[RESIDUAL_ATTR] = mult
    _register(model)
    return mult


def clear_base_depth(model: nn.Module) -> None:
    """Remove mupopt's depth information from every parameter (depth factors back to 1)."""
    for p in model.parameters():
        if hasattr(p, DEPTH_ATTR):
            delattr(p, DEPTH_ATTR)
    for module in model.modules():
        module.__dict__.pop(MODULE_DEPTHS_ATTR, None)
    model.__dict__.pop(RESIDUAL_ATTR, None)


# ---------------------------------------------------------------------------------------------
# Summary and init
# ---------------------------------------------------------------------------------------------
def decay_rule(rule: str, m: Multipliers) -> str:
    """How the weight decay acts on a tensor, as text for the summary."""
    if WD_FORM[rule] == "in_update":
        return f"u += wd*p, step lr*{m.lr:.4g}*trust*u"
    return "p *= 1 - lr*wd" if m.wd == 1.0 else f"p *= 1 - lr*wd*{m.wd:.4g}"


def depth_text(depth: DepthInfo | None) -> str:
    """The depth column of the summary: "-" without depth information, else where the tensor
    lives (branch or trunk) and m_L, with alpha for a branch."""
    if depth is None:
        return "-"
    if depth.branch:
        return f"branch(m_L={depth.m_depth:.4g},a={depth.alpha:.3g})"
    return f"trunk(m_L={depth.m_depth:.4g})"


def format_table(rows: list[tuple[str, tuple, WidthInfo | None, Multipliers, str, DepthInfo | None]]) -> str:
    """One row per parameter: name, shape, role, m_in, m_out, lr multiplier, depth, weight-decay
    rule (and the epsilon multiplier where one is not 1)."""
    header = ("name", "shape", "role", "m_in", "m_out", "lr mult", "depth", "weight decay")
    body = [
        (
            name,
            "x".join(map(str, shape)) or "scalar",
            info.role if info else "-",
            f"{info.m_in:.4g}" if info else "1",
            f"{info.m_out:.4g}" if info else "1",
            f"{m.lr:.4g}",
            depth_text(depth),
            wd + (f", eps x{m.eps:.4g}" if m.eps != 1.0 else ""),
        )
        for name, shape, info, m, wd, depth in rows
    ]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in body])


def summary(model: nn.Module, optimizer: str = "adamw", *, max_preconditioner_dim: int = 1024, **rule_options) -> str:
    """The per-parameter muP table of ``model`` for optimizer rule ``optimizer``.
    ``max_preconditioner_dim``: rule "shampoo" (no grafting) only, the block cap that
    :func:`shampoo_block_lr` takes into account (1024: mupopt.Shampoo's default)."""
    from .optim.shampoo import is_matrix  # mupopt.optim imports this module

    _warn_unapplied_readouts(model)
    rows = []
    recover_width_infos(model.parameters())  # FSDP2's to_empty / fully_shard made new Parameters
    for name, p in model.named_parameters():
        info, depth = width_info(p), depth_info(p)
        blocks = (tuple(p.shape), max_preconditioner_dim) if optimizer == "shampoo" and is_matrix(p) else None
        # Muon steps only hidden matrices; every other tensor takes its AdamW part's rules
        # (docs/mup.md's table: "AdamW fallback"), whose multipliers the muon rules lack.
        rule = "adamw" if optimizer in MUON_RULES and info is not None and info.role != "hidden" else optimizer
        m = multipliers(rule, info, depth=depth, shampoo_blocks=blocks, **rule_options)
        rows.append((name, tuple(p.shape), info, m, decay_rule(rule, m), depth))
    table = format_table(rows)
    forward = readout_multipliers(model)
    if forward:
        table += "\nforward readout multipliers (mupopt.readout_multiplier_): " + ", ".join(
            f"{name} output x {mult:.4g}" for name, mult in forward.items()
        )
    residual = model.__dict__.get(RESIDUAL_ATTR)
    if residual is not None:
        table += f"\nforward residual multiplier (mupopt.set_base_depth): x = x + {residual:.4g} * block(x)"
    return table


@torch.no_grad()
def init_mup_(model: nn.Module, std_base: float = 0.02, *, zero_readout: bool = False, generator=None) -> nn.Module:
    """Re-initialise matrices by role (P1 Result 4.1, multiplier form); vectors are left alone.

    input: N(0, std_base^2) (unchanged from the base); hidden: std_base / sqrt(m_in);
    output: std_base / m_in, or zero with ``zero_readout``. Every parameter needs width info.
    Depth (:func:`set_base_depth`) changes no std: CompleteP's Table 1 (Dey et al., arXiv
    2505.01618) keeps every init variance depth-free and puts the 1/L in the forward residual
    multiplier instead (the GPT-2 habit of std / sqrt(2 L) on output projections must be off).
    """
    _warn_unapplied_readouts(model)
    recover_width_infos(model.parameters())  # FSDP2's to_empty / fully_shard made new Parameters
    for module in model.modules():
        # A readout multiplier set on the meta device: to_empty left its buffer uninitialised
        # (logits times garbage, often 0); init_mup_ is the re-initialisation that follows.
        value = module.__dict__.get(READOUT_VALUE_ATTR)
        buffer = getattr(module, READOUT_BUFFER, None)
        if value is not None and isinstance(buffer, torch.Tensor) and not buffer.is_meta:
            buffer.fill_(value)
    for name, p in model.named_parameters():
        info = width_info(p)
        if info is None:
            raise MupError(f"parameter {name!r} has no width information; call set_base_shapes first")
        if info.role == "vector":
            continue
        if info.role == "output" and zero_readout:
            p.zero_()
            continue
        std = {"input": std_base, "hidden": std_base / math.sqrt(info.m_in), "output": std_base / info.m_in}[info.role]
        p.normal_(0.0, std, generator=generator)
    return model


# ---------------------------------------------------------------------------------------------
# The readout multiplier (the forward form of muP's output rule)
# ---------------------------------------------------------------------------------------------
READOUT_BUFFER = "mup_output_mult"
# The multiplier as a float in the module's __dict__, beside the buffer: what init_mup_ writes
# back into a buffer that to_empty left uninitialised.
READOUT_VALUE_ATTR = "mupopt_readout_value"


def _readout_hook(module: nn.Module, args, output):
    return output * getattr(module, READOUT_BUFFER)


def readout_multiplier_(model: nn.Module, readout: str) -> float:
    """Multiply the output of the readout module ``readout`` (e.g. ``"lm_head"``) by 1/m, muP's
    readout multiplier (Tensor Programs V; Microsoft mup's MuReadout and MuSharedReadout), and
    return 1/m. Call it after :func:`set_base_shapes`, before :func:`init_mup_` and before
    creating the optimizer (both read the width information it changes for an untied readout).

    - A readout tied to the token embedding (GPT-2, most Hugging Face LMs): declare the shared
      weight ``"input"`` (``overrides={"transformer.wte.weight": "input"}``); the optimizer steps
      it as an embedding and this multiplier, with m = the width ratio of its d_model side, keeps
      the logits width-stable. Without it they grow with width.
    - An untied readout (role ``"output"``): the forward form of the output rule instead of the
      1/m_in learning rate (P1 lists both): its width information becomes m_in = 1 (learning-rate
      multiplier 1, init std_base in :func:`init_mup_`) and the 1/m moves into the forward pass.
      For Adam-type optimizers the two forms train identically (tests/test_readout_multiplier.py)
      under wd_mode "independent"; "coupled" and "inverse_width" scale the readout's decay by
      1/m_in, which the forward form makes 1.

    The multiplier is a buffer of the module (``<readout>.mup_output_mult``), so it is saved in
    the model's ``state_dict``; a forward hook applies it. A model rebuilt from a checkpoint gets
    it back by calling this function again before ``load_state_dict``. :func:`summary` shows it.
    A Hugging Face model (one with a ``config`` that ``save_pretrained`` writes) also gets it
    recorded in ``model.config`` (key ``mupopt_readout_multipliers``): after ``from_pretrained``,
    :func:`restore_readout_multipliers` puts it back, and :func:`set_base_shapes`,
    :func:`summary` and :func:`init_mup_` warn while it is missing.
    """
    module = model.get_submodule(readout)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise MupError(f"module {readout!r} ({type(module).__name__}) has no weight: pass the name of the readout (output) module")
    if hasattr(module, READOUT_BUFFER):
        raise MupError(f"module {readout!r} already has a readout multiplier ({float(getattr(module, READOUT_BUFFER)):.4g})")
    info = width_info(weight)
    if info is None:
        raise MupError(f"{readout}.weight has no width information: call mupopt.set_base_shapes(model, ...) first")
    tied = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if info.role == "output":
        m = info.m_in
    elif info.role == "input" and len(tied) > 1:
        m = info.m_out  # the d_model side of the shared (vocab, d) weight
    else:
        raise MupError(
            f"{readout}.weight has role {info.role!r}: the readout multiplier goes on a readout, an "
            f"untied one (role 'output') or one tied to the embedding (declared 'input')"
        )
    mult = 1.0 / m
    recorded = _recorded_readouts(model).get(readout)
    if recorded is not None and not math.isclose(float(recorded), mult, rel_tol=1e-6):
        raise MupError(f"model.config records a readout multiplier {float(recorded):.6g} for {readout!r}, the widths "
                       f"give {mult:.6g}: the base shapes differ from the ones the model was trained with")
    _apply_readout(model, readout, mult)
    return mult


# Where readout_multiplier_ also records the multipliers of a Hugging Face model: its config,
# which save_pretrained writes to config.json and from_pretrained reads back (the buffer itself is
# dropped there as an unexpected key when the model class is rebuilt without it).
READOUT_CONFIG_KEY = "mupopt_readout_multipliers"


def _hf_config(model: nn.Module):
    """The model's Hugging Face config (a transformers PretrainedConfig: what save_pretrained
    serialises), else None. Duck-typed so that mupopt does not import transformers."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") and hasattr(config, "save_pretrained") else None


def _recorded_readouts(model: nn.Module) -> dict[str, float]:
    config = _hf_config(model)
    return dict(getattr(config, READOUT_CONFIG_KEY, None) or {}) if config is not None else {}


def _apply_readout(model: nn.Module, readout: str, mult: float) -> None:
    """Register the multiplier buffer and its forward hook on module ``readout``; an untied
    readout's width info moves its 1/m from the lr to the forward pass (m_in = 1)."""
    module = model.get_submodule(readout)
    weight = getattr(module, "weight", None)
    info = width_info(weight) if isinstance(weight, torch.Tensor) else None
    if info is not None and info.role == "output":
        info = dataclasses.replace(info, m_in=1.0)
        setattr(weight, WIDTH_ATTR, info)
        records = module.__dict__.get(MODULE_WIDTHS_ATTR)
        if records and "weight" in records:  # what recover_width_infos gives a wrapped weight
            records["weight"] = (info, records["weight"][1])
    device = weight.device if isinstance(weight, torch.Tensor) else None
    module.register_buffer(READOUT_BUFFER, torch.tensor(mult, dtype=torch.float32, device=device))
    module.__dict__[READOUT_VALUE_ATTR] = float(mult)
    module.register_forward_hook(_readout_hook)
    config = _hf_config(model)
    if config is not None:
        setattr(config, READOUT_CONFIG_KEY, {**_recorded_readouts(model), readout: mult})


def restore_readout_multipliers(model: nn.Module) -> dict[str, float]:
    """Re-apply the readout multipliers a Hugging Face model's config records (written by
    :func:`readout_multiplier_` and saved by ``save_pretrained``) to a model rebuilt by
    ``from_pretrained``, which drops the multiplier buffer as an unexpected key: its logits would
    otherwise be m times too large. Call it right after ``from_pretrained`` (and before
    :func:`set_base_shapes` or after it, either order). Returns {module name: multiplier};
    a module that already applies a different multiplier raises :class:`MupError`."""
    recorded = _recorded_readouts(model)
    for readout, mult in recorded.items():
        module = model.get_submodule(readout)
        have = getattr(module, READOUT_BUFFER, None)
        if have is None:
            _apply_readout(model, readout, float(mult))
        elif not math.isclose(float(have), float(mult), rel_tol=1e-6):
            raise MupError(f"module {readout!r} applies a readout multiplier {float(have):.6g} but model.config "
                           f"records {float(mult):.6g}")
    return {k: float(v) for k, v in recorded.items()}


def _warn_unapplied_readouts(model: nn.Module) -> None:
    """A model whose config records readout multipliers that its modules do not apply (a
    from_pretrained model before :func:`restore_readout_multipliers`): say so."""
    missing = {name: mult for name, mult in _recorded_readouts(model).items()
               if not hasattr(model.get_submodule(name), READOUT_BUFFER)}
    if missing:
        warnings.warn(
            f"model.config records muP readout multipliers {missing} that the model does not apply (a model "
            f"loaded with from_pretrained?): its logits are too large by 1/multiplier. Call "
            f"mupopt.restore_readout_multipliers(model) after loading.",
            MupWarning,
            stacklevel=3,
        )


def readout_multipliers(model: nn.Module) -> dict[str, float]:
    """{module name: forward multiplier} of the readouts :func:`readout_multiplier_` equipped."""
    return {
        name: float(getattr(module, READOUT_BUFFER))
        for name, module in model.named_modules()
        if isinstance(getattr(module, READOUT_BUFFER, None), torch.Tensor)
    }
