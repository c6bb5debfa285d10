"""`mupopt verify`: every optimizer x every backend available here, checked on a small model.

Each check trains a small model for a few steps on real gradients. At every step the very same
gradients are handed to the optimizer under test and to what it is checked against:

- the ``reference`` backend, with all muP multipliers 1, against the named reference library
  (torch.optim.AdamW, torch-adopt, sophia-opt, torch.optim.Muon) when it is installed;
- the ``reference`` backend with muP width information (base width 16, model width 64) against
  the float64 transcription of the formulas (mupopt.testing), which is also LAMB's reference;
- every other backend against the reference backend, with muP.

A row passes when every element satisfies |ours - theirs| <= atol + rtol * |theirs| (the rule of
torch.testing.assert_close); the table shows each row's atol and rtol. Its "max rel err" is the
largest |ours - theirs| / max(|theirs|, 1e-6), large where an element of theirs is near zero,
which the atol covers. Registered backends that cannot run here are listed by
:func:`unchecked`, with the reason and how to include them.
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import backends, storage
from .mup import WIDTH_ATTR, set_base_shapes
from .optim import ADOPT, LAMB, AdamW, Muon, Shampoo, SophiaG, gnb_backward
from .optim import _lean_states as lean
from .testing import ORACLES

VOCAB = 50
BASE_WIDTH = 16
WIDTH = 64


class _SmallLM(nn.Module):
    """Embedding -> hidden Linear -> LayerNorm -> readout: one parameter of every muP role."""

    def __init__(self, width: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.readout = nn.Linear(width, VOCAB, bias=False)

    def forward(self, tokens):
        return self.readout(self.norm(torch.relu(self.hidden(self.embed(tokens)))))


@dataclass(frozen=True)
class _Entry:
    name: str
    cls: type
    kwargs: dict
    reference_module: str | None
    reference: Callable | None  # factory(params, **kwargs) of the named reference
    oracle_kwargs: dict = field(default_factory=dict)  # ours, in the float64 comparison only
    # (rtol, atol) against the float64 transcription after 10 steps of float32 math.
    oracle_tol: tuple[float, float] = (1e-4, 1e-5)
    # (rtol, atol) against the named reference on CUDA, where set; else (1e-5, 1e-6) as on the CPU.
    named_tol_cuda: tuple[float, float] | None = None
    # (rtol, atol) of a backend against the reference backend; None: (1e-5, 1e-6).
    backend_tol: tuple[float, float] | None = None
    named_kwargs: dict = field(default_factory=dict)  # ours, in the named comparison only
    # Stochastic rounding check (bf16 params): None where every backend's float32 math is the
    # reference's, so the stored bits are too (one bfloat16 spacing allowed); else the absolute
    # drift allowed per step, as a fraction of lr: a float32 difference in the last bit flips a
    # rounding, and the trained model's gradients then carry the flip on.
    sr_drift: float | None = None


def _torch_adamw(params, **kw):
    return torch.optim.AdamW(params, **kw)


def _adopt(params, **kw):
    return importlib.import_module("adopt").ADOPT(params, decouple=True, **kw)


def _sophia(params, **kw):
    return importlib.import_module("sophia_opt").SophiaG(params, **kw)


class _TorchMuonPair:
    """torch.optim.Muon for the matrices, torch.optim.AdamW for the rest: what mupopt.Muon does
    without width information, in one object."""

    def __init__(self, params, lr, adamw_lr=1e-3, adamw_wd=0.01, **muon_kwargs):
        params = list(params)
        self.parts = [
            torch.optim.Muon([p for p in params if p.ndim >= 2], lr=lr, **muon_kwargs),
            torch.optim.AdamW([p for p in params if p.ndim < 2], lr=adamw_lr, weight_decay=adamw_wd),
        ]

    def step(self):
        for opt in self.parts:
            opt.step()


OPTIMIZERS = [
    _Entry("adamw", AdamW, dict(lr=1e-2, weight_decay=0.1), "torch", _torch_adamw),
    _Entry("adopt", ADOPT, dict(lr=1e-2, weight_decay=0.1), "adopt", _adopt),
    _Entry("lamb", LAMB, dict(lr=1e-2, weight_decay=0.1), None, None),
    _Entry("sophia", SophiaG, dict(lr=1e-3, weight_decay=0.1), "sophia_opt", _sophia),
    _Entry(
        "muon", Muon, dict(lr=2e-2, weight_decay=0.1, adamw_lr=1e-3, adamw_wd=0.01), "torch.optim._muon",
        _TorchMuonPair, oracle_kwargs={"ns_dtype": torch.float32},
        # torch.optim.Muon runs Newton-Schulz in bf16 on every device; ours by default in float32
        # on the CPU (Muon's ns_dtype=None): compare like with like.
        named_kwargs={"ns_dtype": torch.bfloat16},
        # Our reference stacks same-shape matrices (baddbmm), torch.optim.Muon steps each one
        # (addmm): bit-identical on the CPU, but cuBLAS runs other bf16 kernels for the two, so
        # the bf16 Newton-Schulz outputs differ by bf16 roundings. Measured on an H200 after 10
        # steps at lr 2e-2: max abs difference 3.8e-5 (the float64 check stays at 1e-5).
        named_tol_cuda=(1e-3, 1e-4),
        # Triton's Newton-Schulz is not the reference's bit for bit; measured under the
        # interpreter after 10 steps: 4.9e-4 absolute at lr 2e-2 (allowed: 2e-3).
        sr_drift=0.01,
    ),
    _Entry(
        "shampoo", Shampoo,
        dict(lr=1e-2, betas=(0.9, 0.99), epsilon=1e-3, relative_epsilon=True, weight_decay=0.1,
             max_preconditioner_dim=32, precondition_frequency=2),
        None, None,
        # float32 eigh of statistics damped to condition <= 1e3 loses ~1e-4 of the root; measured
        # 1e-5 absolute on params of size ~0.1 after 10 steps.
        oracle_tol=(1e-3, 5e-5),
        # Another backend sums the Gram products in another order: its statistics differ from
        # the reference backend's by float32 roundings, which the roots amplify by up to the
        # condition number, as against float64 above (measured: triton under TRITON_INTERPRET=1,
        # 2.2e-6 to 3.9e-6 absolute after 10 steps).
        backend_tol=(1e-3, 5e-5),
        # Triton's Gram products and roots differ in the last bit (above); measured under the
        # interpreter after 10 steps: 1.2e-4 absolute at lr 1e-2 (allowed: 5e-4).
        sr_drift=0.005,
    ),
]
REFERENCE_NAMES = {
    "adamw": "torch.optim.AdamW",
    "adopt": "adopt.ADOPT(decouple=True)",
    "sophia": "sophia_opt.SophiaG",
    "muon": "torch.optim.Muon + AdamW",
}
SOPHIA_BS = 256
SR = "reference-sr"  # the check of stochastic rounding: bf16 params, every backend vs the reference
KAHAN = "reference-kahan"  # the compensated store (kahan_summation): bf16 params, every backend that has it
# The param-store checks: their option.
STORE_CHECKS = {SR: {"stochastic_rounding": True}, KAHAN: {"kahan_summation": True}}
# The checks of the lean state formats (state_bits 16 and 8): every backend that steps a format
# (Backend.state_bits) vs the reference backend in the same format.
LEAN = {"reference-states16": 16, "reference-states8": 8}


@dataclass
class Row:
    optimizer: str
    backend: str
    device: str
    against: str
    max_abs: float
    max_rel: float
    passed: bool
    rtol: float = 0.0
    atol: float = 0.0


@dataclass
class Unchecked:
    """A registered backend that verify did not check, why, and how to include it."""

    optimizer: str
    backend: str
    reason: str
    how: str


def reference_problem(module: str | None) -> str | None:
    """Why the named reference library ``module`` cannot be checked against here, or None."""
    if module is None:
        return "no named reference (checked against a float64 transcription)"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"not installed ({exc}); pip install -e .[test]"
    if module == "adopt" and not hasattr(torch.optim.Optimizer, "_cuda_graph_capture_health_check"):
        # torch-adopt 0.1.0's step() calls this private method, which some torch versions lack
        # (2.11 has only _accelerator_graph_capture_health_check; 2.13 has both).
        return f"torch-adopt calls torch.optim.Optimizer._cuda_graph_capture_health_check, absent in torch {torch.__version__}"
    return None


def _compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], rtol: float, atol: float) -> tuple[float, float, bool]:
    max_abs = max_rel = 0.0
    passed = True
    for a, b in zip(ours, theirs):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        diff = (a - b).abs()
        if diff.numel() == 0:
            continue
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, (diff / b.abs().clamp_min(1e-6)).max().item())
        passed &= bool((diff <= atol + rtol * b.abs()).all()) and math.isfinite(diff.max().item())
    return max_abs, max_rel, passed


def _train(entry: _Entry, opt, model: nn.Module, followers: list[Callable], steps: int, device: str) -> None:
    """Train ``model`` with ``opt``; after each backward hand the same gradients to followers."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    sophia = entry.name == "sophia"
    for t in range(steps):
        tokens = torch.randint(0, VOCAB, (4, 12), generator=gen).to(device)
        if sophia and t % 2 == 0:
            opt.zero_grad()
            gnb_backward(model(tokens), generator=torch.Generator(device=device).manual_seed(t))
            grads = [p.grad.detach().clone() for p in model.parameters()]
            opt.update_hessian()
            for follow in followers:
                follow(grads, "hessian")
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step(**({"bs": SOPHIA_BS} if sophia else {}))
        for follow in followers:
            follow(grads, "step")


def _optimizer_follower(opt, params: list[torch.Tensor], sophia: bool, rng: torch.Tensor | None = None) -> Callable:
    """``rng``: the default generator's state to step from the first time (the followed
    optimizer's seed draws, stochastic rounding)."""
    first = [rng]

    def follow(grads, kind):
        if first[0] is not None:
            outer = torch.get_rng_state()
            torch.set_rng_state(first[0])
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if kind == "hessian":
            opt.update_hessian()
        else:
            opt.step(**({"bs": SOPHIA_BS} if sophia else {}))
        if first[0] is not None:
            torch.set_rng_state(outer)
            first[0] = None
    return follow


def _oracle_follower(entry: _Entry, opt, shadow: list[torch.Tensor]) -> Callable:
    """Float64 transcription driven by the hyperparameters and multipliers of ``opt``."""
    group = opt.param_groups[0]
    mults = opt.group_multipliers(group)
    if entry.name == "muon":  # hidden matrices by Muon, the rest by AdamW
        plan = [
            ("muon", opt._hparams(group)) if opt._uses_muon(group, i) else ("adamw", opt._adamw_hparams(group))
            for i in range(len(shadow))
        ]
    else:
        plan = [(entry.name, opt._hparams(group, **({"bs": SOPHIA_BS} if entry.name == "sophia" else {})))] * len(shadow)
    states = [dict() for _ in shadow]

    def follow(grads, kind):
        for p, g, st, m, (name, hp) in zip(shadow, grads, states, mults, plan):
            ORACLES["sophia_hessian" if kind == "hessian" else name](p, g.double().cpu(), st, m, hp)
    return follow


def _models(device: str, mup: bool) -> nn.Module:
    torch.manual_seed(0)
    model = _SmallLM(WIDTH).to(device)
    if mup:
        with torch.device("meta"):
            base = _SmallLM(BASE_WIDTH)
        set_base_shapes(model, base)
    return model


def _check(entry: _Entry, backend: str, device: str, against: str, steps: int) -> Row:
    mup = against != "named"
    model = _models(device, mup)
    start = [p.detach().clone() for p in model.parameters()]
    ours_kwargs = dict(entry.kwargs, **(entry.oracle_kwargs if against == "oracle" else {}))
    opt = entry.cls(model.parameters(), **ours_kwargs, backend=backend)
    sophia = entry.name == "sophia"
    compare = None  # (ours, theirs) of a row that compares other values than the params
    if against == "named":
        params = [p.clone().requires_grad_() for p in start]
        follower = _optimizer_follower(entry.reference(params, **entry.kwargs), params, sophia)
        opt = entry.cls(model.parameters(), **dict(entry.kwargs, **entry.named_kwargs), backend=backend)
        label, result, tol = REFERENCE_NAMES[entry.name], params, (1e-5, 1e-6)
        if device.startswith("cuda") and entry.named_tol_cuda is not None:
            tol = entry.named_tol_cuda
    elif against == "oracle":
        result = [p.double().cpu() for p in start]
        follower = _oracle_follower(entry, opt, result)
        label, tol = "float64 formula (muP)", entry.oracle_tol
    elif against in STORE_CHECKS:
        # bfloat16 params, rounded stochastically or compensated. Stochastic rounding: the same
        # random bits as the reference backend (mupopt/storage.py), so the same seeds: both draw
        # theirs from the same generator state.
        option = STORE_CHECKS[against]
        model = model.to(torch.bfloat16)
        start = [p.detach().clone() for p in model.parameters()]
        params = [p.clone().requires_grad_() for p in start]
        for p, q in zip(model.parameters(), params):
            setattr(q, WIDTH_ATTR, getattr(p, WIDTH_ATTR))
        opt = entry.cls(model.parameters(), **ours_kwargs, **option, backend=backend)
        rng = torch.get_rng_state()
        reference = entry.cls(params, **ours_kwargs, **option, backend="reference")
        follower = _optimizer_follower(reference, params, sophia, rng)
        torch.set_rng_state(rng)
        # Backends whose float32 math differs from the reference's in the last bit (MKL's square
        # root, matmul orders) may store a value the other way: one bfloat16 spacing (2^-7
        # relative; absolute for values near 0), the compensation then holding the difference.
        atol = 2.0**-14 if entry.sr_drift is None else steps * entry.kwargs["lr"] * entry.sr_drift
        tol = (2.0**-7, atol)
        if against == KAHAN:
            # What the compensated store holds, p + c: about 16 significant bits (c is bf16 too),
            # so a step's last-bit difference moves it by about 2^-16 relative; a store that
            # ignored the option would be off by up to half a spacing of p (2^-9).
            compare = (lambda: _compensated_values(list(model.parameters()), opt),
                       lambda: _compensated_values(params, reference))
            tol = (steps * 2.0**-16, atol)
        what = "stochastic rounding" if against == SR else "kahan_summation"
        label, result = f"reference backend (bf16, {what})", params
    elif against in LEAN:
        bits = LEAN[against]
        params = [p.clone().requires_grad_() for p in start]
        for p, q in zip(model.parameters(), params):
            setattr(q, WIDTH_ATTR, getattr(p, WIDTH_ATTR))
        opt = entry.cls(model.parameters(), **ours_kwargs, state_bits=bits, backend=backend)
        follower = _optimizer_follower(entry.cls(params, **ours_kwargs, state_bits=bits, backend="reference"),
                                       params, sophia)
        rtol, atol = entry.backend_tol or (1e-5, 1e-6)
        # A float32 difference in the last bit (MKL's square root, another summation order) can
        # store a state the other way: a bfloat16 spacing (2^-8 relative), or the neighbouring
        # 8-bit code (at most twice the map's error bound, relative to the block's absmax). An
        # update moves by about lr times that relative change, per step.
        flip = 2.0**-8 if bits == 16 else 2 * lean.relative_error_bound(lean.SIGNED)
        tol = (rtol, max(atol, steps * entry.kwargs["lr"] * flip))
        label, result = f"reference backend (state_bits={bits})", params
    else:
        params = [p.clone().requires_grad_() for p in start]
        for p, q in zip(model.parameters(), params):
            setattr(q, WIDTH_ATTR, getattr(p, WIDTH_ATTR))
        follower = _optimizer_follower(entry.cls(params, **ours_kwargs, backend="reference"), params, sophia)
        label, result, tol = "reference backend (muP)", params, entry.backend_tol or (1e-5, 1e-6)
        if entry.name == "muon" and opt._hparams(opt.param_groups[0]).ns_dtype == torch.bfloat16:
            # Two backends' bf16 Newton-Schulz round differently: at most one bf16 spacing (2^-8
            # relative) of a step's update, whose entries are at most lr (orthogonal factor,
            # shape factor 1 for these square matrices), per step (measured: 9.7e-5 after 10).
            tol = (1e-5, steps * entry.kwargs["lr"] * 2.0**-8)
    with warnings.catch_warnings():  # reference libraries call APIs newer torch deprecates
        warnings.simplefilter("ignore")
        _train(entry, opt, model, [follower], steps, device)
    if compare is None:
        max_abs, max_rel, passed = _compare(list(model.parameters()), result, *tol)
    else:
        max_abs, max_rel, passed = _compare(compare[0](), compare[1](), *tol)
    return Row(entry.name, backend, device, label, max_abs, max_rel, passed, *tol)


def _compensated_values(params: list[torch.Tensor], opt) -> list[torch.Tensor]:
    """p + c of each param (c: its kahan_summation compensation; none for a float32 param)."""
    out = []
    for p in params:
        c = opt.state.get(p, {}).get(storage.COMPENSATION)
        out.append(p.detach().float() + (0.0 if c is None else c.float()))
    return out


# The entries csrc's CUDA library steps, the elementwise optimizers (verify's sophia entry is
# both its step and its Hessian EMA): registered as backend "cuda" only where CUDA is.
CUDA_STEPPED = ("adamw", "adopt", "lamb", "sophia")


def _selected(optimizers: list[str] | None, backend_names: list[str] | None) -> list[tuple[_Entry, list[str]]]:
    """The (entry, backends) pairs :func:`run` checks: every registered one, or those named.
    An unknown name raises ValueError (a typo must not check nothing and pass)."""
    known = [e.name for e in OPTIMIZERS]
    for name in optimizers or []:
        if name not in known:
            raise ValueError(f"unknown optimizer {name!r} (verify knows {', '.join(known)})")
    # "cuda" registers only where CUDA is available; naming it elsewhere checks nothing and
    # unchecked() says why.
    registered = sorted({b for e in OPTIMIZERS for b in backends.names(e.name)} | {"cuda"})
    for name in backend_names or []:
        if name not in registered:
            raise ValueError(f"unknown backend {name!r} (registered here: {', '.join(registered)})")
    selected = [(e, [b for b in backends.names(e.name) if backend_names is None or b in backend_names])
                for e in OPTIMIZERS if optimizers is None or e.name in optimizers]
    # An optimizer named with --optimizer none of whose backends is named (Muon with --backend
    # cpu) would check nothing and pass; "cuda" counts for the optimizers csrc steps, where the
    # unchecked list says why it did not run.
    for e, names in selected:
        if optimizers and backend_names and not names and not (
                "cuda" in backend_names and e.name in CUDA_STEPPED):
            raise ValueError(f"optimizer {e.name!r} has no backend {' or '.join(map(repr, backend_names))} "
                             f"(its backends: {', '.join(backends.names(e.name))})")
    return selected


def run(devices: list[str] | None = None, steps: int = 10, progress: Callable[[str], None] | None = None,
        optimizers: list[str] | None = None, backend_names: list[str] | None = None) -> list[Row]:
    """All checks for the devices given (default: cpu, and cuda when present), of the
    optimizers and backends named (default: all registered)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for entry, names in _selected(optimizers, backend_names):
            for backend in names:
                if _probe_reason(entry.name, backend, device) is not None:
                    continue
                # A format's row needs both sides to step it (a registered reference may not).
                lean_checks = [c for c, bits in LEAN.items()
                               if bits in backends.get(entry.name, backend).state_bits
                               and bits in backends.get(entry.name, "reference").state_bits]
                store_checks = [SR]
                if backends.get(entry.name, backend).kahan_summation and backends.get(entry.name, "reference").kahan_summation:
                    store_checks.append(KAHAN)
                checks = ["oracle"] if backend == "reference" else ["reference", *store_checks, *lean_checks]
                if backend == "reference" and reference_problem(entry.reference_module) is None:
                    checks.insert(0, "named")
                for against in checks:
                    if progress:
                        progress(f"{entry.name} / {backend} / {device} vs {against}")
                    rows.append(_check(entry, backend, device, against, steps))
    return rows


def _probe_reason(optimizer: str, backend: str, device: str) -> str | None:
    """Why ``backend`` cannot step the verify model's tensors on ``device``, or None. The probe
    is a float32 matrix: Muon's backends step matrices only."""
    return backends._REGISTRY[optimizer][backend].reason([torch.zeros(4, 4, device=device)])


def _how_to_include(backend: str, device: str) -> str:
    if backend == "triton" and device == "cpu":
        return "TRITON_INTERPRET=1 mupopt verify --device cpu (Triton's interpreter: numerics only, minutes), or mupopt verify --device cuda on a GPU"
    if device == "cpu":
        return "mupopt verify --device cuda on a machine with CUDA"
    return "mupopt verify --device cpu"


def unchecked(devices: list[str] | None = None, optimizers: list[str] | None = None,
              backend_names: list[str] | None = None) -> list[Unchecked]:
    """Every registered (optimizer, backend) of those named (default: all) that :func:`run`
    with these devices leaves out: the backend's own reason on each device and how to include
    it. Backend "cuda" is registered only where CUDA is available; a line says so on other
    machines."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for entry, names in _selected(optimizers, backend_names):
        for backend in names:
            reasons = {d: _probe_reason(entry.name, backend, d) for d in devices}
            if all(r is not None for r in reasons.values()):
                d = devices[0]
                out.append(Unchecked(entry.name, backend, reasons[d], _how_to_include(backend, d)))
    on_cuda = [e.name for e, _ in _selected(optimizers, None) if e.name in CUDA_STEPPED]
    if not torch.cuda.is_available() and on_cuda and (backend_names is None or "cuda" in backend_names):
        out.append(Unchecked(
            ", ".join(on_cuda), "cuda", "registered only where CUDA is available (no CUDA device here)",
            "mupopt verify on a machine with CUDA",
        ))
    return out


def format_unchecked(items: list[Unchecked], selected: bool = False) -> str:
    """One line per backend verify did not check. ``selected``: the run was limited to some
    optimizers or backends (--optimizer, --backend), whose others it did not check either."""
    if not items:
        if selected:
            return "Every registered backend of the selected optimizers and backends was checked (the others were not)."
        return "Every registered backend was checked."
    lines = ["Not checked here:"]
    for u in items:
        lines.append(f"- {u.optimizer} / {u.backend}: {u.reason}. To include it: {u.how}")
    return "\n".join(lines)


RULE = (
    "A row passes when every element satisfies |ours - theirs| <= atol + rtol*|theirs| (as "
    "torch.testing.assert_close). max rel err is the largest |ours - theirs| / max(|theirs|, 1e-6): "
    "large where an element of theirs is near zero, which atol covers."
)


def format_rows(rows: list[Row]) -> str:
    header = ("optimizer", "backend", "device", "checked against", "max abs err", "max rel err", "atol", "rtol", "result")
    body = [
        (r.optimizer, r.backend, r.device, r.against, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.atol:.1e}",
         f"{r.rtol:.1e}", "pass" if r.passed else "FAIL")
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    table = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]
    return "\n".join([*table, "", RULE])
