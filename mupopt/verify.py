"""`mupopt verify`: every optimizer x every backend available here, checked on a small model.

Each check trains a small model for a few steps on real gradients. At every step the very same
gradients are handed to the optimizer under test and to what it is checked against:

- the ``reference`` backend, with all muP multipliers 1, against the named reference library of
  optimizer-specs.md (torch.optim.AdamW, torch-adopt, sophia-opt) when it is installed;
- the ``reference`` backend with muP width information (base width 16, model width 64) against
  the float64 transcription of the formulas (mupopt.testing), which is also LAMB's reference;
- every other backend against the reference backend, with muP.
"""
from __future__ import annotations

import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import backends
from .mup import WIDTH_ATTR, set_base_shapes
from .optim import ADOPT, LAMB, AdamW, Muon, Shampoo, SophiaG, gnb_backward
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
        # Our reference stacks same-shape matrices (baddbmm), torch.optim.Muon steps each one
        # (addmm): bit-identical on the CPU, but cuBLAS runs other bf16 kernels for the two, so
        # the bf16 Newton-Schulz outputs differ by bf16 roundings. Measured on an H200 after 10
        # steps at lr 2e-2: max abs difference 3.8e-5 (the float64 check stays at 1e-5).
        named_tol_cuda=(1e-3, 1e-4),
    ),
    _Entry(
        "shampoo", Shampoo,
        dict(lr=1e-2, betas=(0.9, 0.99), epsilon=1e-3, relative_epsilon=True, weight_decay=0.1,
             max_preconditioner_dim=32, precondition_frequency=2),
        None, None,
        # float32 eigh of statistics damped to condition <= 1e3 loses ~1e-4 of the root; measured
        # 1e-5 absolute on params of size ~0.1 after 10 steps.
        oracle_tol=(1e-3, 5e-5),
    ),
]
REFERENCE_NAMES = {
    "adamw": "torch.optim.AdamW",
    "adopt": "adopt.ADOPT(decouple=True)",
    "sophia": "sophia_opt.SophiaG",
    "muon": "torch.optim.Muon + AdamW",
}
SOPHIA_BS = 256


@dataclass
class Row:
    optimizer: str
    backend: str
    device: str
    against: str
    max_abs: float
    max_rel: float
    passed: bool


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


def _optimizer_follower(opt, params: list[torch.Tensor], sophia: bool) -> Callable:
    def follow(grads, kind):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if kind == "hessian":
            opt.update_hessian()
        else:
            opt.step(**({"bs": SOPHIA_BS} if sophia else {}))
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
    if against == "named":
        params = [p.clone().requires_grad_() for p in start]
        follower = _optimizer_follower(entry.reference(params, **entry.kwargs), params, sophia)
        label, result, tol = REFERENCE_NAMES[entry.name], params, (1e-5, 1e-6)
        if device.startswith("cuda") and entry.named_tol_cuda is not None:
            tol = entry.named_tol_cuda
    elif against == "oracle":
        result = [p.double().cpu() for p in start]
        follower = _oracle_follower(entry, opt, result)
        label, tol = "float64 formula (muP)", entry.oracle_tol
    else:
        params = [p.clone().requires_grad_() for p in start]
        for p, q in zip(model.parameters(), params):
            setattr(q, WIDTH_ATTR, getattr(p, WIDTH_ATTR))
        follower = _optimizer_follower(entry.cls(params, **ours_kwargs, backend="reference"), params, sophia)
        label, result, tol = "reference backend (muP)", params, (1e-5, 1e-6)
    with warnings.catch_warnings():  # reference libraries call APIs newer torch deprecates
        warnings.simplefilter("ignore")
        _train(entry, opt, model, [follower], steps, device)
    max_abs, max_rel, passed = _compare(list(model.parameters()), result, *tol)
    return Row(entry.name, backend, device, label, max_abs, max_rel, passed)


def run(devices: list[str] | None = None, steps: int = 10, progress: Callable[[str], None] | None = None) -> list[Row]:
    """All checks for the devices given (default: cpu, and cuda when present)."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        probe = [torch.zeros(2, device=device)]
        for entry in OPTIMIZERS:
            for backend in backends.names(entry.name):
                if backends._REGISTRY[entry.name][backend].reason(probe) is not None:
                    continue
                checks = ["oracle"] if backend == "reference" else ["reference"]
                if backend == "reference" and reference_problem(entry.reference_module) is None:
                    checks.insert(0, "named")
                for against in checks:
                    if progress:
                        progress(f"{entry.name} / {backend} / {device} vs {against}")
                    rows.append(_check(entry, backend, device, against, steps))
    return rows


def format_rows(rows: list[Row]) -> str:
    header = ("optimizer", "backend", "device", "checked against", "max abs err", "max rel err", "result")
    body = [
        (r.optimizer, r.backend, r.device, r.against, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", "pass" if r.passed else "FAIL")
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])
