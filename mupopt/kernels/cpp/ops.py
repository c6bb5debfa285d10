"""Thin wrappers: the registry's functional signature ``fn(params, grads, states, mults, hp)``
turned into one ``torch.ops.mupopt`` call per param group (the ops: ``csrc/bindings.cpp``).

The op receives the states' tensors (their "step" included: it increments them, in float32, as
the reference does), each tensor's muP multipliers and the group's hyperparameters, and forms
every per-tensor scalar itself in float64 with the reference's expressions (``csrc/prepare.h``):
no per-tensor Python work beyond building the argument lists (the step bookkeeping in Python
cost 1.6 us per tensor: 250 us per step for 150 tensors, measured). GradScaler arguments are
passed as None for now (the optimizer classes skip a step with found_inf themselves).

Bound steps (``BIND``): ``bind(params, states, mults)`` checks and keeps what does not change
between steps (the tensors, their devices, dtypes, shapes and layouts, the step tensors, the
multipliers) in a C++ plan (``csrc/bound.h``) and returns ``step(grads, hp)``, which checks only
this step's gradients and then does exactly what ``fn(params, grads, states, mults, hp)`` does.
The caller binds again when a param or state tensor object changes; a tensor changed in place
(``p.data = ...``: same object, new storage) is noticed by the plan, which is then rebuilt here.
``step.from_param_grads(hp)`` does ``step([p.grad for p in params], hp)`` with the gradients read
in C++ from the bound params (see :func:`_bound`).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ...backends import PLAIN_TENSOR_TYPES, subclass_reason
from ...optim import _lean_states as lean
from ...storage import COMPENSATION, compensates, compensations_of, seeds_of


def _require(tensors: Sequence[torch.Tensor]) -> None:
    """Load the library these tensors need (once); raise with the build's reason otherwise.
    The first tensor decides: the op itself rejects a list spread over devices."""
    from . import build  # not at import time: `python -m mupopt.kernels.cpp.build` runs it as __main__

    cuda = tensors[0].is_cuda
    outcome = build.load_cuda() if cuda else build.load_cpu()
    if outcome is not True:
        raise RuntimeError(f"backend {'cuda' if cuda else 'cpu'!r} is unavailable: {outcome}")


def _lists(states: Sequence[dict], *keys: str) -> list[list[torch.Tensor]]:
    return [[st[k] for st in states] for k in keys]


# -- state_bits=8 -------------------------------------------------------------------------------
def _kinds(name: str) -> dict[str, str]:
    """The kind (signed / unsigned map) of each state entry of optimizer ``name``: its own
    *_STATES dict (imported here: the optimizer modules import the backends)."""
    if name == "adamw":
        from ...optim.adamw import ADAMW_STATES as kinds
    elif name == "adopt":
        from ...optim.adopt import ADOPT_STATES as kinds
    elif name == "lamb":
        from ...optim.lamb import LAMB_STATES as kinds
    else:  # sophia, sophia_hessian
        from ...optim.sophia import SOPHIA_STATES as kinds
    return kinds


_TABLES: dict = {}


def _sort_key16(x: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of float32 ``x``'s order-preserving integer key (non-negative: the pattern
    with its sign bit set; negative: the pattern complemented), as int64 in [0, 2^16)."""
    u = x.view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(u >= 1 << 31, u ^ 0xFFFFFFFF, u | (1 << 31)) >> 16


def _vector_tables(values: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """The tables of the AVX-512 VBMI codec (csrc/cpu/q8_vbmi.h), as int32 words: the map values
    and the midpoints as four byte planes each (plane j: byte j of the 256 float32 patterns; the
    midpoints padded with NaN after the last, so that no y compares above a padding entry), then
    the pivots of the rank search over the midpoints' 16-bit keys (:func:`_sort_key16`, padded
    with 0xFFFF): for step s = 1, 2, 4, ..., 128, ``key[2*s*t + s - 1]`` for t < 128 / s, at
    words 0, 128, 192, 224, ..., 352 of 384 uint16 (each from step 4 on in a slot of 32)."""
    pad = torch.full((256 - mid.numel(),), float("nan"), dtype=torch.float32)
    mids = torch.cat([mid, pad])
    planes = [t.view(torch.uint8).view(256, 4).t().contiguous().view(-1).view(torch.int32) for t in (values, mids)]
    key = torch.cat([_sort_key16(mid), torch.full((256 - mid.numel(),), 0xFFFF, dtype=torch.int64)])
    pivots = torch.zeros(384, dtype=torch.int64)
    for i in range(8):
        s = 1 << i
        at = (0, 128)[i] if i < 2 else 192 + 32 * (i - 2)
        pivots[at:at + 128 // s] = key[s - 1::2 * s]
    pivots = torch.where(pivots >= 1 << 15, pivots - (1 << 16), pivots).to(torch.int16)  # uint16 as int16
    return torch.cat([*planes, pivots.view(torch.int32)])


RANK_LINE_WORDS = 132  # after _vector_tables' 704 words: csrc/include/mupopt/storage.h, kQuantVectorWords


def _decade(t: float) -> int:
    """The decade e of the dynamic map holding magnitude ``t`` (t in (10^-(e+1), 10^-e]; 6 below)."""
    e = 0
    while e < 6 and t <= 10.0 ** -(e + 1):
        e += 1
    return e


def _rank_lines(name: str, kind: str, values: torch.Tensor) -> torch.Tensor:
    """The closed-form code search of the VBMI codec (csrc/cpu/q8_vbmi.h, encode_lines), as int32
    words, for the maps whose codes are linear in y within each binade but for at most one kink:
    the continuous rank rho(t) of a magnitude t (rho(MAP[c]) = c, rho(midpoint c) = c + 1/2 up to
    the float32 roundings) is the minimum of two lines per binade [2^(b-31), 2^(b-30)), b < 32.

    - "dynamic" (Dettmers et al. 2021; _lean_states._dynamic): decade e holds n = 2^f values
      10^-e (0.1 + 0.9 (k + 1/2) / n) at codes start_e + k, so rho = start_e + k where
      k + 1/2 = (t 10^e - 0.1) n / 0.9: the line t * 10^e n / 0.9 + start_e - 1/2 - n / 9. Each
      decade's line is steeper than the next one up (density 5^e up to a factor), and the lines of
      neighbouring decades meet at 10^-e, so the minimum of the (at most two) decades a binade
      meets is rho. Decade 6's line also holds down to 0 (rho(0) = start_6 - 1/2 - n / 9).
    - "linear-sqrt" signed: rho = 127 + 127 t (values (k - 127) / 127).

    A signed map mirrors negative y: rho(y) = 254 - rho(|y|) (MAP[254 - c] = -MAP[c] on codes
    0..254, and the float32 midpoints mirror exactly). The "linear-sqrt" unsigned map (values
    ((k + 1) / 256)^2) has no lines: all words zero, the codec keeps its rank search.
    Layout: slope and intercept of the lower line (32 each), of the upper line, then the top code
    (float32; where a NaN y lands), signed (0 / 1), enabled (0 / 1) and a zero word."""
    words = torch.zeros(RANK_LINE_WORDS, dtype=torch.int32)
    signed = kind == lean.SIGNED
    if name == "dynamic":
        bits = 7 if signed else 8
        decades = []
        for e in range(7):
            n = 2 ** (bits - 1 - e)
            first = torch.tensor(10.0 ** -e * (0.1 + 0.9 * 0.5 / n), dtype=torch.float32)
            start = int((values == first).nonzero())
            decades.append((10.0 ** e * n / 0.9, start - 0.5 - n / 9))
        lines = [(decades[_decade(2.0 ** (b - 31))], decades[_decade(min(2.0 ** (b - 30), 1.0) * (1 - 1e-9))])
                 for b in range(32)]
    elif name == "linear-sqrt" and signed:
        lines = [((127.0, 127.0), (127.0, 127.0))] * 32
    else:
        return words
    f = torch.tensor([[lo[0] for lo, _ in lines], [lo[1] for lo, _ in lines],
                      [hi[0] for _, hi in lines], [hi[1] for _, hi in lines]], dtype=torch.float32)
    words[:128] = f.reshape(-1).view(torch.int32)
    words[128] = torch.tensor([float(lean.used_codes(name, kind) - 1)], dtype=torch.float32).view(torch.int32)
    words[129] = int(signed)
    words[130] = 1
    return words


def map_table(kind: str, name: str | None = None) -> torch.Tensor:
    """The int32 table of format 8's map ``name`` (default: the one in use) for ``kind``, as the
    C++ loops read it (csrc/include/mupopt/storage.h, QuantTable): the 256 map values (float32
    bits), lo, count, then 2*count bucket entries ``base << 16 | t`` for the magnitude buckets
    lo .. lo+count-1 of y >= 0, then of y < 0, then the 704 words of the vector codec's tables
    (:func:`_vector_tables`) and its 132 words of rank lines (:func:`_rank_lines`). Made from the
    spec's own tables (``_lean_states._tables`` and ``_buckets``), so the maps are defined once. A CPU tensor for CPU and CUDA ops alike: the
    CUDA ops copy it to the device with their launch table and the kernel its values and bucket
    entries into shared memory (csrc/bindings_cuda.cpp, multi_tensor.h's q8_chunk)."""
    name = name or lean.maps
    key = (name, kind)
    if key not in _TABLES:
        cpu = torch.device("cpu")
        values, mid = lean._tables(name, kind, cpu)
        base, inside = lean._buckets(name, kind, cpu)
        magnitude = (mid.view(torch.int32) >> 16) & 0x7FFF
        lo = max(int(magnitude.min()) - 1, 0)  # below the smallest |midpoint|'s bucket: one code
        hi = 0x3F80  # the bucket of 1.0 (|y| <= 1); NaN takes it too (the spec's top code)
        if bool((magnitude >= hi).any()):
            raise AssertionError(f"map {name!r} ({kind}) has a midpoint at or above 1.0")
        buckets = torch.arange(lo, hi + 1, dtype=torch.int64)
        entries = []
        for sign in (0, 0x8000):
            idx = buckets | sign
            b = base.long()[idx]
            ins = inside[idx]
            low = ins.view(torch.int32).long() & 0xFFFF
            # y < 0: the low bits' order is reversed, so compare their complements
            t = torch.where(torch.isnan(ins), torch.full_like(low, 0xFFFF), low if sign == 0 else 0xFFFF - low)
            entries.append((b << 16) | t)
        body = torch.cat(entries)
        header = torch.tensor([lo, hi + 1 - lo], dtype=torch.int64)
        table = torch.cat([values.view(torch.int32).long(), header, body])
        # int32 two's complement of the uint32 entries
        table = torch.where(table >= 1 << 31, table - (1 << 32), table).to(torch.int32)
        _TABLES[key] = torch.cat([table, _vector_tables(values, mid), _rank_lines(name, kind, values)])
    return _TABLES[key]


def _lean(name: str, states: Sequence[dict], keys: Sequence[str]) -> dict:
    """The state_bits=8 arguments of an op over the state lists ``keys``: none when no state is
    quantized, else ``absmax`` (every quantized state's block scales, tensor by tensor, each
    tensor's in the order of ``keys``) and ``maps`` (one table per list)."""
    absmax = [st[k + lean.ABSMAX] for st in states for k in keys if k + lean.ABSMAX in st]
    if not absmax:
        return {}
    kinds = _kinds(name)
    return dict(absmax=absmax, maps=[map_table(kinds[k]) for k in keys])


def _quantized(states: Sequence[dict]) -> bool:
    return any(k.endswith(lean.ABSMAX) for st in states for k in st)


# -- kahan_summation ----------------------------------------------------------------------------
def _compensations(name: str, params, states: Sequence[dict], hp) -> dict:
    """kahan_summation's argument of an op (csrc/include/mupopt/storage.h, the compensated param
    format): none with the option off, else ``compensations``, those of the bfloat16 / float16
    params in list order (float32 / float64 params have none: their store is exact)."""
    if not hp.kahan_summation:
        return {}
    return {"compensations": _compensation_list(f"{name}_", params, states)}


def _compensation_list(op: str, params, states: Sequence[dict]) -> list:
    """The compensations of the bfloat16 / float16 params in list order, as the ops take them."""
    return [c for c in compensations_of(op, params, states) if c is not None]


def _compensated(states: Sequence[dict]) -> bool:
    return any(COMPENSATION in st for st in states)


def _hyper(name: str, hp) -> dict:
    """The uniform hyperparameters of optimizer ``name`` as its ops' keyword arguments: the list
    op (``<name>_``) and the bound ops (``<name>_bound_``, ``<name>_bound_grads_``) take the same."""
    if name == "sophia_hessian":
        return dict(beta2=hp.beta2)
    if name == "sophia":
        return dict(lr=hp.lr, beta1=hp.beta1, rho=hp.rho, bs=hp.bs, weight_decay=hp.weight_decay,
                    maximize=hp.maximize)
    kw = dict(lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps)
    if name == "adamw":
        kw["amsgrad"] = hp.amsgrad
    if name == "lamb":
        kw["clamp_value"] = hp.clamp_value
    kw["maximize"] = hp.maximize
    return kw


def adamw(params, grads, states, mults, hp, *, found_inf=None) -> None:
    """AdamW step (see mupopt.optim.adamw.adamw_reference). ``found_inf`` (GradScaler's, for
    capturable groups): nonzero, the op changes nothing, read by the op, not by Python."""
    if not params:
        return
    _require(params)
    exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if hp.amsgrad else ("exp_avg", "exp_avg_sq")
    torch.ops.mupopt.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, _lists(states, "max_exp_avg_sq")[0] if hp.amsgrad else [], steps,
        [m.lr for m in mults], [m.wd for m in mults], [m.eps for m in mults],
        **_hyper("adamw", hp), grad_scale=None, found_inf=found_inf,
        sr_seeds=seeds_of(states, hp.stochastic_rounding), **_lean("adamw", states, keys),
        **_compensations("adamw", params, states, hp),
    )


def adopt(params, grads, states, mults, hp, *, found_inf=None) -> None:
    """ADOPT step (see mupopt.optim.adopt.adopt_reference)."""
    if not params:
        return
    _require(params)
    exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
    torch.ops.mupopt.adopt_(
        params, grads, exp_avgs, exp_avg_sqs, steps,
        [m.lr for m in mults], [m.wd for m in mults], [m.eps for m in mults],
        **_hyper("adopt", hp), grad_scale=None, found_inf=found_inf,
        sr_seeds=seeds_of(states, hp.stochastic_rounding), **_lean("adopt", states, ("exp_avg", "exp_avg_sq")),
        **_compensations("adopt", params, states, hp),
    )


def lamb(params, grads, states, mults, hp, *, norm_reduce=None, found_inf=None) -> None:
    """LAMB step (see mupopt.optim.lamb.lamb_reference). No decay multiplier: the decay is in u.

    ``norm_reduce`` None: one op (``lamb_``; on the CPU the cache-blocked two passes). Else two:
    ``lamb_partials_`` (moments, steps and the per-tensor sums [N, 2]), ``norm_reduce`` once,
    ``lamb_apply_`` with the reduced sums: two passes over the whole list."""
    if not params:
        return
    _require(params)
    exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
    args = (params, grads, exp_avgs, exp_avg_sqs, steps, [m.lr for m in mults], [m.eps for m in mults])
    kwargs = dict(_hyper("lamb", hp), grad_scale=None, found_inf=found_inf,
                  sr_seeds=seeds_of(states, hp.stochastic_rounding), **_lean("lamb", states, ("exp_avg", "exp_avg_sq")),
                  **_compensations("lamb", params, states, hp))
    if norm_reduce is None:
        torch.ops.mupopt.lamb_(*args, **kwargs)
        return
    from ...optim.lamb import reduce_norm_sums

    partials = torch.ops.mupopt.lamb_partials_(*args, **kwargs)
    sums = reduce_norm_sums(norm_reduce, partials)
    torch.ops.mupopt.lamb_apply_(*args, sums, **kwargs)


def sophia(params, grads, states, mults, hp, *, found_inf=None) -> None:
    """SophiaG step (see mupopt.optim.sophia.sophia_reference)."""
    if not params:
        return
    _require(params)
    exp_avgs, hessians, steps = _lists(states, "exp_avg", "hessian", "step")
    torch.ops.mupopt.sophia_(
        params, grads, exp_avgs, hessians, steps, [m.lr for m in mults], [m.wd for m in mults],
        **_hyper("sophia", hp), grad_scale=None, found_inf=found_inf,
        sr_seeds=seeds_of(states, hp.stochastic_rounding), **_lean("sophia", states, ("exp_avg", "hessian")),
        **_compensations("sophia", params, states, hp),
    )


def sophia_hessian(params, grads, states, mults, hp, *, found_inf=None) -> None:
    """Hessian EMA h = b2*h + (1-b2)*g*g (see mupopt.optim.sophia.sophia_hessian_reference)."""
    if not params:
        return
    _require(params)
    torch.ops.mupopt.sophia_hessian_(
        grads, [st["hessian"] for st in states], **_hyper("sophia_hessian", hp), grad_scale=None,
        found_inf=found_inf, **_lean("sophia_hessian", states, ("hessian",)),
    )


# ---------------------------------------------------------------------------------------------
# Bound steps
# ---------------------------------------------------------------------------------------------
_PLAIN = frozenset(PLAIN_TENSOR_TYPES)


def _nothing(grads, hp) -> None:
    """The step of an empty param list."""


def _nothing_from_param_grads(hp) -> None:
    """The step of an empty param list."""


_nothing.from_param_grads = _nothing_from_param_grads


def _check_plain(name: str, grads: Sequence[torch.Tensor]) -> None:
    """Gradients are plain tensors (a wrapper subclass has no storage to step)."""
    if not _PLAIN.issuperset(map(type, grads)):
        raise RuntimeError(f"{name} bound step: gradient {subclass_reason(grads)}")


def _raw(overload):
    """The C++ callable behind an op overload. An op taking a custom-class object is a
    TorchBindOpOverload, whose Python __call__ looks for FakeScriptObjects in every argument,
    every tensor of a list included (about 0.1 us per tensor); eager steps never carry one."""
    return getattr(overload, "_op", overload)


def _mults(mults, *fields: str) -> list[list[float]]:
    return [[float(getattr(m, f)) for m in mults] for f in fields]


def _bound(name: str, make: Callable, seeds: Sequence[int] = (), unbound: Callable | None = None,
           params: Sequence[torch.Tensor] = (), compensated: bool | None = None) -> Callable:
    """``step(grads, hp)`` over the plan ``make()`` builds, through the ops ``<name>_bound_``
    (False when a bound tensor changed in place: nothing done, then bind anew) and
    ``<name>_bound_grads_``.

    ``step.from_param_grads(hp)`` is ``step([p.grad for p in params], hp)`` with the gradients
    read by the C++ op from the bound params themselves (the ``*_bound_grads_`` op): no list to
    build and convert per step (300 tensors: ~58 -> ~40 us; 1000: ~260 -> ~190 us, measured).
    For params whose ``.grad`` is the gradient to apply (not for local shards of DTensors, whose
    gradients are elsewhere); a None ``.grad`` raises.

    Stochastic rounding: the plan is bound with the states' seeds (``seeds``, from
    :func:`mupopt.storage.seeds_of`); a step with ``hp.stochastic_rounding`` off on such a plan
    (the option switched off while the seeds stay in the states) goes to ``unbound(grads, hp)``,
    the per-call op, which rounds to nearest. kahan_summation: ``compensated`` says whether the
    plan was bound with compensations (None: no param of the plan has one to keep, or the op
    stores no param); a step whose ``hp.kahan_summation`` differs from it (switched since the
    plan was bound) goes to ``unbound``, which reads the states as they are then."""
    op = _raw(getattr(torch.ops.mupopt, f"{name}_bound_").default)
    op_grads = _raw(getattr(torch.ops.mupopt, f"{name}_bound_grads_").default)
    plan = make()

    def call(run) -> None:
        nonlocal plan
        if not run(plan):
            plan = make()
            if not run(plan):
                raise RuntimeError(f"{name} bound step: the bound tensors keep changing")

    def off_plan(hp) -> bool:
        return (bool(seeds) and not hp.stochastic_rounding) or (
            compensated is not None and compensated != hp.kahan_summation)

    def step(grads, hp) -> None:
        if off_plan(hp):
            return unbound(grads, hp)
        _check_plain(name, grads)
        call(lambda plan: op(plan, grads, **_hyper(name, hp)))

    def from_param_grads(hp) -> None:
        if off_plan(hp):
            return unbound([p.grad for p in params], hp)
        call(lambda plan: op_grads(plan, **_hyper(name, hp)))

    step.from_param_grads = from_param_grads
    return step


def _per_call_only(params, states: Sequence[dict]) -> bool:
    """Whether a list steps through the per-call op instead of a plan: 8-bit states of CUDA
    params (their bound steps of format 8 have never run on a GPU)."""
    return params[0].device.type != "cpu" and _quantized(states)


def _per_call(fn: Callable, params, states, mults) -> Callable:
    """The step of a list of CUDA params with state_bits=8 states (:func:`_bind`): the per-call
    op, its argument lists built per step, as without a plan."""
    params, states, frozen = list(params), list(states), list(mults)

    def step(grads, hp) -> None:
        fn(params, grads, states, frozen, hp)

    step.from_param_grads = lambda hp: step([p.grad for p in params], hp)
    return step


def _bind(name: str, unbound: Callable, lists: Callable, keys: tuple, mult_fields: tuple, params, states,
          mults) -> Callable:
    """The bound step of optimizer op ``name`` (``bind_<name>``, then ``<name>_bound_``): the
    plan binds ``params``, ``lists(states)`` (the state lists of ``keys``, step counts last),
    the muP multipliers ``mult_fields``, the stochastic-rounding seeds, format 8's block scales
    and maps (CPU params) and the compensations (kahan_summation), all as the per-call op takes
    them. 8-bit states of CUDA params go to the per-call op ``unbound`` (:func:`_per_call`; the
    CUDA bound steps of format 8 have never run on a GPU), as does a step whose rounding option
    no longer matches the plan (:func:`_bound`)."""
    if not params:
        return _nothing
    if _per_call_only(params, states):
        return _per_call(unbound, params, states, mults)
    _require(params)
    params, states, frozen = list(params), list(states), list(mults)
    mult_lists = _mults(mults, *mult_fields)
    bind = getattr(torch.ops.mupopt, f"bind_{name}").default
    seeds = seeds_of(states)
    # kahan_summation concerns the 16-bit params only: a list of none steps the same either way.
    comps = compensated = None
    if any(compensates(p) for p in params):
        compensated = _compensated(states)
        if compensated:
            comps = _compensation_list(f"bind_{name}", params, states)

    def make():
        return bind(params, *lists(states), *mult_lists, seeds, compensations=comps, **_lean(name, states, keys))

    return _bound(name, make, seeds, lambda grads, hp: unbound(params, grads, states, frozen, hp), params,
                  compensated)


def bind_adamw(params, states, mults) -> Callable:
    """Bound AdamW step (see the module docstring). Bound with every state's "max_exp_avg_sq"
    when each has one; an amsgrad step without them goes to :func:`adamw` (which raises as before)."""
    has_max = bool(states) and all("max_exp_avg_sq" in st for st in states)

    def lists(states):
        exp_avgs, exp_avg_sqs, steps = _lists(states, "exp_avg", "exp_avg_sq", "step")
        return exp_avgs, exp_avg_sqs, _lists(states, "max_exp_avg_sq")[0] if has_max else [], steps

    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if has_max else ("exp_avg", "exp_avg_sq")
    bound = _bind("adamw", adamw, lists, keys, ("lr", "wd", "eps"), params, states, mults)
    if has_max or bound is _nothing:
        return bound
    params, states, frozen = list(params), list(states), list(mults)

    def step(grads, hp) -> None:
        if hp.amsgrad:
            adamw(params, grads, states, frozen, hp)
        else:
            bound(grads, hp)

    def from_param_grads(hp) -> None:
        if hp.amsgrad:
            adamw(params, [p.grad for p in params], states, frozen, hp)
        else:
            bound.from_param_grads(hp)

    step.from_param_grads = from_param_grads
    return step


def bind_adopt(params, states, mults) -> Callable:
    """Bound ADOPT step (see the module docstring)."""
    return _bind("adopt", adopt, lambda st: _lists(st, "exp_avg", "exp_avg_sq", "step"), ("exp_avg", "exp_avg_sq"),
                 ("lr", "wd", "eps"), params, states, mults)


def bind_lamb(params, states, mults) -> Callable:
    """Bound LAMB step (see the module docstring); whole-tensor norms only (no norm_reduce)."""
    return _bind("lamb", lamb, lambda st: _lists(st, "exp_avg", "exp_avg_sq", "step"), ("exp_avg", "exp_avg_sq"),
                 ("lr", "eps"), params, states, mults)


def bind_sophia(params, states, mults) -> Callable:
    """Bound SophiaG step (see the module docstring)."""
    return _bind("sophia", sophia, lambda st: _lists(st, "exp_avg", "hessian", "step"), ("exp_avg", "hessian"),
                 ("lr", "wd"), params, states, mults)


def bind_sophia_hessian(params, states, mults) -> Callable:
    """Bound Hessian EMA: ``step(grads, hp)`` updates each state's "hessian" only."""
    if not params:
        return _nothing
    if _per_call_only(params, states):
        return _per_call(sophia_hessian, params, states, mults)
    _require(params)
    params, states = list(params), list(states)
    bind = torch.ops.mupopt.bind_sophia_hessian.default

    def make():
        return bind(params, [st["hessian"] for st in states], **_lean("sophia_hessian", states, ("hessian",)))

    return _bound("sophia_hessian", make)


BIND = {
    "adamw": bind_adamw,
    "adopt": bind_adopt,
    "lamb": bind_lamb,
    "sophia": bind_sophia,
    "sophia_hessian": bind_sophia_hessian,
}


FUNCTIONS = {
    "adamw": adamw,
    "adopt": adopt,
    "lamb": lamb,
    "sophia": sophia,
    "sophia_hessian": sophia_hessian,
}
