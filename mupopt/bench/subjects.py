"""What gets timed: mupopt optimizers through a registry backend, and the peers of
docs/benchmarks.md on the same tensors.

Every timed call is a whole user-visible ``step()`` (``update_hessian()`` for the Sophia Hessian
EMA) of a ``torch.optim.Optimizer``: ours with ``backend=<name>``; torch's AdamW fused/foreach and
Muon as they are; the public libraries' optimizers (pytorch-optimizer, HeavyBall, torchao and
bitsandbytes on CUDA: ``PEERS``) where installed, with their hyperparameters mapped to ours and
their variant declared and measured (``Peer``, measure.equivalence). Timing the step rather than
the backend function keeps the per-step Python work of the class in the number, as it is in
torch's: at 1000 tensors that work is the step.

The torch.compile peer is our reference function compiled by inductor and registered for the
duration as one more backend ("compile"), so it runs through exactly the same class.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

import mupopt
from .. import backends

# The check runs these many calls of the step from fresh state, on copies, against the
# reference: 2, because ADOPT's first step only initialises v (the update runs from the second),
# and the second step exercises the bias corrections at t = 2.
CHECK_STEPS = 2


@dataclass(frozen=True)
class Subject:
    """One optimizer (a registry key) as the benchmark drives it."""

    key: str
    cls: type
    kwargs: dict
    matrix: bool = False  # matrix-bound: TFLOP/s, relative-norm checks
    call: str = "step"  # method timed
    call_kwargs: dict = field(default_factory=dict)
    registry_keys: tuple[str, ...] = ()  # kernels the class selects with its backend
    update_tol: tuple[float, float] = (1e-4, 1e-5)  # fp32 param-update check (check.py)

    @property
    def compile_keys(self) -> tuple[str, ...]:
        """Registry keys a "compile" backend needs: the class checks its backend name against
        its own rule at construction (SophiaG: "sophia", also for update_hessian)."""
        return tuple(dict.fromkeys((self.cls.rule, *self.registry_keys)))

    def make(self, params: Sequence[torch.Tensor], backend: str) -> torch.optim.Optimizer:
        return self.cls(list(params), backend=backend, **self.kwargs)

    def step(self, opt: torch.optim.Optimizer) -> None:
        getattr(opt, self.call)(**self.call_kwargs)

    def prime(self, opt: torch.optim.Optimizer) -> None:
        """After the first call: bring state to what training has (Sophia: a non-zero Hessian
        estimate, else every update saturates to sign(m) and the h read is pointless)."""
        if self.key == "sophia":
            with torch.no_grad():
                for p, st in opt.state.items():
                    st["hessian"].copy_(sophia_hessian_prime(p.grad))

    def run_check_sequence(self, opt: torch.optim.Optimizer) -> None:
        self.step(opt)
        self.prime(opt)
        for _ in range(CHECK_STEPS - 1):
            self.step(opt)


# lr = 1e-3 against params of scale 0.02: updates are 5% of a parameter, far above the fp32 and
# bf16 spacing, so a wrong kernel shows in the checks.
SUBJECTS: dict[str, Subject] = {
    "adamw": Subject("adamw", mupopt.AdamW, dict(lr=1e-3, weight_decay=0.1), registry_keys=("adamw",)),
    "adopt": Subject("adopt", mupopt.ADOPT, dict(lr=1e-3, weight_decay=0.1), registry_keys=("adopt",)),
    # LAMB: every backend forms its norms from float64 sums (issue 13), so the trust ratios agree
    # to a float32 ulp and the default update tolerance holds at any size (check.py).
    "lamb": Subject("lamb", mupopt.LAMB, dict(lr=1e-3, weight_decay=0.1), registry_keys=("lamb",)),
    "sophia": Subject("sophia", mupopt.SophiaG, dict(lr=1e-3, rho=0.04, weight_decay=0.1),
                      call_kwargs={"bs": 5120}, registry_keys=("sophia",)),
    "sophia_hessian": Subject("sophia_hessian", mupopt.SophiaG, dict(lr=1e-3), call="update_hessian",
                              registry_keys=("sophia_hessian",)),
    # bf16 Newton-Schulz on every device, as the torch.optim.Muon peer (ns_dtype=None would pick
    # float32 on a CPU without AMX) and as muon_cost counts its flops.
    "muon": Subject("muon", mupopt.Muon, dict(lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16), matrix=True, registry_keys=("muon",)),
    "shampoo": Subject("shampoo", mupopt.Shampoo, dict(lr=1e-2, precondition_frequency=1), matrix=True,
                       registry_keys=("shampoo",)),
}


def shampoo_subject(max_dim: int) -> Subject:
    base = SUBJECTS["shampoo"]
    return dataclasses.replace(base, kwargs={**base.kwargs, "max_preconditioner_dim": max_dim})


def with_scale_eps(subject: Subject) -> Subject:
    """The muP case: eps multipliers too (1/m_out per tensor), so lr and eps both vary."""
    return dataclasses.replace(subject, kwargs={**subject.kwargs, "scale_eps": True})


# --------------------------------------------------------------------------------------------
# Peers: torch's optimizers and the public libraries users would otherwise pick
# --------------------------------------------------------------------------------------------
# A peer "matches" ours when, in float64 from the same start and the same gradients, every
# parameter's update after EQUIVALENCE_STEPS calls is within this of ours, relative to the largest
# update of that tensor (measure.equivalence). float64 round-off is ~1e-15 and a changed formula
# (a bias correction, an eps added or used as a floor, a clip) moves updates by 1e-5 or more, so
# 1e-6 separates the two. Measured: torch's fused AdamW 2e-15 from our reference; HeavyBall's
# AdamW 5.3e-6 (eps used as a floor: a different variant), 5e-8 with eps = 1e-30 on both sides
# (it keeps lr as a float32 scalar).
EQUIVALENCE_TOL = 1e-6


def sophia_hessian_prime(g: torch.Tensor) -> torch.Tensor:
    """The Hessian estimate the Sophia subjects start their timed steps from (Subject.prime)."""
    return g.float().square().mul_(0.01).add_(1e-4)


@dataclass(frozen=True)
class Peer:
    """An optimizer of torch or of a public library, stepping the same tensors as our subject
    ``optimizer``, with its hyperparameters mapped to ours as closely as its API allows.

    ``differs`` says what it computes differently from our subject ("": the same variant, which
    measure.equivalence must confirm to EQUIVALENCE_TOL; otherwise it must differ). ``neutral``
    is (our kwargs, its kwargs) under which a different variant computes exactly ours: the test
    that the text of ``differs`` names the whole difference. Timed call: ``step``.
    """

    name: str  # the rows' backend column and what --peers names
    optimizer: str  # the key of the subject it stands beside
    factory: Callable[..., torch.optim.Optimizer]  # (params, subject, **its kwargs overriding the mapping)
    library: str = "torch"  # distribution (pip name)
    module: str = "torch"  # import name
    differs: str = ""
    note: str = ""  # what else a reader must know (not part of the timed call)
    neutral: tuple[dict, dict] | None = None
    neutral_tol: float = EQUIVALENCE_TOL
    needs_cuda: str = ""  # why it runs on CUDA only ("": anywhere)
    hessian_key: str | None = None  # Sophia peers: the state key of the Hessian estimate (prime)
    first_call_kwargs: dict = field(default_factory=dict)  # step kwargs of the first call only
    drops_grads: bool = False  # sets p.grad = None after its step (the bench reattaches them)
    compiles: bool = False  # has a torch.compile path (HeavyBall): used when ``compiled``
    compiled: bool = False
    refuses: Callable[[Subject, Sequence[torch.Tensor]], str | None] | None = None
    equivalence_dtype: torch.dtype = torch.float64

    @property
    def same_variant(self) -> bool:
        return not self.differs

    def unavailable(self, device: torch.device) -> str | None:
        """Why it cannot run here (no CUDA, library not installed), or None."""
        if self.needs_cuda and device.type != "cuda":
            return f"needs CUDA: {self.needs_cuda}"
        if importlib.util.find_spec(self.module) is None:
            extra = "peers-gpu" if self.needs_cuda else "peers"
            return f"{self.library} is not installed (pip install {self.library}; mupopt[{extra}] installs it)"
        return None

    def version(self) -> str:
        try:
            return importlib.metadata.version(self.library)
        except importlib.metadata.PackageNotFoundError:
            return ""

    def make(self, params: Sequence[torch.Tensor], subject: Subject | None = None, **override) -> torch.optim.Optimizer:
        """The peer on ``params``, its hyperparameters mapped from ``subject``'s (default: our
        subject of its optimizer; ``override``: its own keyword arguments, e.g. the neutral ones)."""
        params = list(params)
        opt = self.factory(params, subject or SUBJECTS[self.optimizer], **override)
        if self.drops_grads:
            opt._mupopt_bench_grads = [(p, p.grad) for p in params]
        return opt

    def step(self, opt: torch.optim.Optimizer) -> None:
        if self.drops_grads:
            for p, g in opt._mupopt_bench_grads:
                if p.grad is None:  # dropped by its last step: the bench's gradient is still the one to use
                    p.grad = g
        kwargs = self.first_call_kwargs if self.first_call_kwargs and _first_call(opt) else {}
        kwargs = {k: v(opt) if callable(v) else v for k, v in kwargs.items()}
        with _heavyball_compile(self.compiled) if self.compiles else contextlib.nullcontext():
            opt.step(**kwargs)

    def prime(self, opt: torch.optim.Optimizer) -> None:
        """As Subject.prime: the Sophia peers start from our Hessian estimate."""
        if self.hessian_key is not None:
            with torch.no_grad():
                for p, st in opt.state.items():
                    st[self.hessian_key].copy_(sophia_hessian_prime(p.grad))

    def run_check_sequence(self, opt: torch.optim.Optimizer) -> None:
        """Subject.run_check_sequence, each call with the gradients the first one saw: a peer may
        write its gradients (pytorch-optimizer's Muon lerps them in place, HeavyBall drops them),
        and a training step gets fresh ones."""
        grads = [(p, p.grad.clone()) for group in opt.param_groups for p in group["params"] if p.grad is not None]
        for k in range(CHECK_STEPS):
            if k:
                for p, g in grads:
                    p.grad = g.clone()
            self.step(opt)
            if k == 0:
                self.prime(opt)


def _first_call(opt: torch.optim.Optimizer) -> bool:
    return not any(opt.state.get(p) for group in opt.param_groups for p in group["params"])


@contextlib.contextmanager
def _heavyball_compile(on: bool):
    """HeavyBall compiles each of its fused functions with torch.compile at first use unless
    ``heavyball.utils.compile_mode`` is None (read at every call): leave it as configured when
    ``on``, None (eager) for the duration otherwise."""
    from heavyball import utils

    saved = utils.compile_mode
    if not on:
        utils.compile_mode = None
    try:
        yield
    finally:
        utils.compile_mode = saved


def hparam(subject: Subject, name: str):
    """Our subject's value of hyperparameter ``name`` (its kwargs, else the class's default): what
    a peer's mapping reads, so that SUBJECTS stays the one source of the numbers."""
    if name in subject.kwargs:
        return subject.kwargs[name]
    return inspect.signature(subject.cls).parameters[name].default


def _adamw_kw(s: Subject) -> dict:
    return {n: hparam(s, n) for n in ("lr", "betas", "eps", "weight_decay")}


def _library(module: str, cls: str, mapping: Callable[[Subject], dict], groups: Callable[[list], list] | None = None):
    """factory(params, subject, **override) -> module.cls(params, **mapping(subject), **override),
    the library imported at the call (it is optional)."""
    def make(ps, subject, **kw):
        obj = importlib.import_module(module)
        for part in cls.split("."):
            obj = getattr(obj, part)
        return obj(groups(ps) if groups else ps, **{**mapping(subject), **kw})
    return make


def _heavyball(cls: str, mapping: Callable[[Subject], dict]):
    """HeavyBall keeps its state in ``storage_dtype`` (float32 by default): here the params'
    dtype, as ours (bf16 moments for bf16 params; float64 in the equivalence run)."""
    base = _library("heavyball", cls, mapping)

    def make(ps, subject, **kw):
        dtype = str(ps[0].dtype).removeprefix("torch.") if ps else "float32"
        return base(ps, subject, **{"storage_dtype": dtype, **kw})
    return make


def _torch(cls: Callable, mapping: Callable[[Subject], dict]):
    return lambda ps, subject, **kw: cls(ps, **{**mapping(subject), **kw})


def _pto_shampoo_refuses(subject: Subject, params: Sequence[torch.Tensor]) -> str | None:
    limit = hparam(subject, "max_preconditioner_dim")
    side = max((d for p in params for d in p.shape), default=0)
    if side > limit:
        return (f"no blocking: one preconditioner per dimension, {side} x {side} here (ours: blocks of <= {limit}); "
                f"its SVD of a 3141 x 3141 statistic (GPT-2/16's embedding) took 90-108 s per step on 2 shared CPU cores")
    return None


def _sophia_k(s: Subject) -> float:
    # Ours: p -= lr * clamp(m / (rho*bs*h + 1e-15), -1, 1). SophiaH: p -= lr' * clamp(m / max(h, eps), -p', p'):
    # the same with lr' = lr/k, p' = k = rho*bs, and its decoupled decay lr'*wd' = lr*wd.
    return hparam(s, "rho") * s.call_kwargs["bs"]


def _sophiah_kw(s: Subject) -> dict:
    k = _sophia_k(s)
    return dict(lr=hparam(s, "lr") / k, betas=hparam(s, "betas"), weight_decay=hparam(s, "weight_decay") * k, p=k,
                eps=1e-15 / k, update_period=2**62)


def _sophiah_first_hessian(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    # SophiaH refreshes its estimate at its first step (Hutchinson, which needs a graph): hand it
    # zeros there, as our Hessian starts; update_period 2^62 keeps it from refreshing again.
    return [torch.zeros_like(p) for group in opt.param_groups for p in group["params"]]


def _muon_kw(s: Subject) -> dict:
    return dict(lr=hparam(s, "lr"), weight_decay=hparam(s, "weight_decay"), momentum=hparam(s, "momentum"),
                nesterov=hparam(s, "nesterov"))


def _pto_muon_groups(ps: list) -> list:
    # Its Muon takes param groups with a use_muon flag only (a plain parameter list raises).
    return [dict(params=ps, use_muon=True)]


# HeavyBall's Newton-Schulz coefficients (heavyball/utils.py, zeropower_via_newtonschulz5, 3.2.1):
# given to our Muon in the neutral comparison.
HEAVYBALL_NS_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


def _scalable_shampoo_kw(s: Subject) -> dict:
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    b1, _ = hparam(s, "betas")
    # beta2 < 1 is all it accepts (ours sums: 1.0); it also drives the graft's statistics, so the
    # graft is AdaGrad's (a sum, like our bias-corrected Adam graft on the first step).
    return dict(lr=hparam(s, "lr"), betas=(b1, 0.999), moving_average_for_momentum=True, decoupled_weight_decay=True,
                weight_decay=hparam(s, "weight_decay"), start_preconditioning_step=hparam(s, "start_preconditioning_step"),
                preconditioning_compute_steps=hparam(s, "precondition_frequency"),
                block_size=hparam(s, "max_preconditioner_dim"), graft_type=LayerWiseGrafting.ADAGRAD, nesterov=False,
                matrix_eps=hparam(s, "epsilon"), use_svd=True)


_NO_GRAFT = {"graft_type": 0}  # LayerWiseGrafting.NONE
# Shampoo peers' neutral tolerance: our L, R and roots are float32 for any param dtype
# (mupopt/optim/shampoo.py), so float64 runs agree to ~1e-5 only (measured: 5.8e-6 for
# pytorch-optimizer's Shampoo, 1.2e-5 for its ScalableShampoo); a wrong mapping is off by > 1e-2.
_SHAMPOO_NEUTRAL_TOL = 1e-4
_8BIT = ("8-bit block-quantised moments (dynamic quantisation per block): its update differs from ours by "
         "the quantisation error, about 1e-2 of the update")

PEERS: tuple[Peer, ...] = (
    # torch
    Peer("torch-fused", "adamw", _torch(torch.optim.AdamW, lambda s: {**_adamw_kw(s), "fused": True})),
    Peer("torch-foreach", "adamw", _torch(torch.optim.AdamW, lambda s: {**_adamw_kw(s), "foreach": True})),
    Peer("torch-muon", "muon", _torch(torch.optim.Muon, lambda s: {n: hparam(s, n) for n in ("lr", "weight_decay")})),
    # HeavyBall: each fused function torch.compile'd at first use (its default path)
    Peer("heavyball.AdamW", "adamw", _heavyball("AdamW", _adamw_kw), "heavyball", "heavyball",
         differs="eps as a floor, m / max(sqrt(v), eps), where ours adds it, m / (sqrt(v) + eps)",
         neutral=({"eps": 1e-30}, {"eps": 1e-30}), drops_grads=True, compiles=True),
    Peer("heavyball.ADOPT", "adopt", _heavyball("ADOPT", _adamw_kw), "heavyball", "heavyball",
         differs="no clipping of g / sqrt(v) (ours clamps it to +-s^(1/4)); m and v are bias-corrected averages "
                 "(its first update is lr * g / sqrt(v), ours lr * (1 - b1) * clip(g / sqrt(v)))",
         drops_grads=True, compiles=True),
    Peer("heavyball.Muon", "muon",
         _heavyball("Muon", lambda s: dict(lr=hparam(s, "lr"), weight_decay=hparam(s, "weight_decay"),
                                           betas=(hparam(s, "momentum"), 0.99), nesterov=hparam(s, "nesterov"))),
         "heavyball", "heavyball",
         differs="its Nesterov update is g + EMA(g) (ours: lerp(g, B, momentum)); its own 5-step Newton-Schulz "
                 "coefficients (ours: Jordan's); bf16 Newton-Schulz with stochastic rounding",
         neutral=({"nesterov": False, "ns_coefficients": HEAVYBALL_NS_COEFFICIENTS, "ns_steps": None,
                   "ns_dtype": torch.float64}, {"nesterov": False}),
         drops_grads=True, compiles=True),
    Peer("heavyball.SOAP", "shampoo",
         _heavyball("SOAP", lambda s: dict(lr=hparam(s, "lr"), weight_decay=hparam(s, "weight_decay"),
                                           precondition_frequency=hparam(s, "precondition_frequency"),
                                           max_precond_dim=hparam(s, "max_preconditioner_dim"))),
         "heavyball", "heavyball",
         differs="SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's statistics, refreshed by QR, "
                 "instead of Shampoo's inverse 4th roots with Adam grafting; statistics an EMA (0.95) where ours "
                 "sum", drops_grads=True, compiles=True),
    # pytorch-optimizer
    Peer("pytorch_optimizer.Lamb", "lamb",
         _library("pytorch_optimizer", "Lamb",
                  lambda s: {**_adamw_kw(s), "weight_decouple": False, "adam_debias": True}),
         "pytorch-optimizer", "pytorch_optimizer",
         differs="no bias correction inside the update, u = m / (sqrt(v) + eps) + wd * p (so the decay weighs "
                 "differently against m); ||p|| clipped at 10 and eps added to ||u|| in the trust ratio",
         note="mapped with weight_decouple=False (decay inside u, as ours) and adam_debias=True (its default "
              "also divides lr by 1 - b1^t outside the trust ratio: 10x our first step)",
         neutral=({"weight_decay": 0.0, "eps": 0.0}, {"weight_decay": 0.0, "eps": 0.0})),
    Peer("pytorch_optimizer.ADOPT", "adopt",
         _library("pytorch_optimizer", "ADOPT",
                  lambda s: {**_adamw_kw(s), "weight_decouple": True, "clip_lambda": lambda step: (step - 1) ** 0.25}),
         "pytorch-optimizer", "pytorch_optimizer",
         differs="decays p on the first call too, where ours (and the official ADOPT) only initialise v",
         note="clip_lambda mapped to (step - 1)^(1/4): its step count is ours + 1",
         neutral=({"weight_decay": 0.0}, {"weight_decay": 0.0})),
    Peer("pytorch_optimizer.SophiaH", "sophia", _library("pytorch_optimizer", "SophiaH", _sophiah_kw),
         "pytorch-optimizer", "pytorch_optimizer",
         note="its Hessian estimate is Hutchinson's (Hessian-vector products inside step() every update_period "
              "calls, which needs loss.backward(create_graph=True)), ours GNB (update_hessian): not timed; "
              "the timed step is mapped as lr/(rho*bs), p = rho*bs, weight_decay*rho*bs",
         hessian_key="hessian_moment", first_call_kwargs={"hessian": _sophiah_first_hessian}),
    Peer("pytorch_optimizer.Muon", "muon", _library("pytorch_optimizer", "Muon", _muon_kw, groups=_pto_muon_groups),
         "pytorch-optimizer", "pytorch_optimizer", note="given param groups with use_muon=True (a plain list raises)"),
    Peer("pytorch_optimizer.Shampoo", "shampoo",
         _library("pytorch_optimizer", "Shampoo",
                  lambda s: dict(lr=hparam(s, "lr"), momentum=0.0, weight_decay=hparam(s, "weight_decay"),
                                 weight_decouple=True, preconditioning_compute_steps=hparam(s, "precondition_frequency"),
                                 matrix_eps=hparam(s, "epsilon"))),
         "pytorch-optimizer", "pytorch_optimizer",
         differs="no grafting and no momentum (its momentum mixes the raw gradient with the last preconditioned "
                 "step: not mapped); no blocking; a vector gets a full n x n preconditioner (ours: diagonal Adam)",
         neutral=({"grafting": None, "betas": (0.0, 1.0)}, {}), neutral_tol=_SHAMPOO_NEUTRAL_TOL, refuses=_pto_shampoo_refuses),
    Peer("pytorch_optimizer.ScalableShampoo", "shampoo", _library("pytorch_optimizer", "ScalableShampoo", _scalable_shampoo_kw),
         "pytorch-optimizer", "pytorch_optimizer",
         differs="AdaGrad grafting per tensor (ours: Adam per block); momentum an EMA without bias correction; "
                 "statistics an EMA with beta2 = 0.999 (it refuses 1.0; ours sum)",
         neutral=({"grafting": None, "betas": (0.0, 0.999)}, {"betas": (0.0, 0.999), **_NO_GRAFT}), neutral_tol=_SHAMPOO_NEUTRAL_TOL),
    # 8-bit AdamW, CUDA only
    Peer("torchao.AdamW8bit", "adamw", _library("torchao.optim", "AdamW8bit", _adamw_kw), "torchao", "torchao",
         differs=_8BIT, needs_cuda="its 8-bit optimizers quantise on the GPU", equivalence_dtype=torch.float32),
    Peer("bitsandbytes.AdamW8bit", "adamw", _library("bitsandbytes.optim", "AdamW8bit", _adamw_kw), "bitsandbytes",
         "bitsandbytes", differs=_8BIT + "; tensors under 4096 elements keep 32-bit moments (min_8bit_size)",
         needs_cuda="its 8-bit kernels are CUDA kernels", equivalence_dtype=torch.float32),
)
PEERS_BY_NAME = {p.name: p for p in PEERS}
LIBRARIES = tuple(dict.fromkeys(p.library for p in PEERS if p.library != "torch"))
# Names --peers accepts: every peer, plus the contenders that are not Peer objects (the compiled
# reference, the reference backend, the matrix-function baselines), plus a library's name for
# all of its peers.
PEER_NAMES = (*(p.name for p in PEERS), "compile", "reference", "torch-ns", "eigh-loop")


def peers_of(optimizer: str) -> tuple[Peer, ...]:
    return tuple(p for p in PEERS if p.optimizer == optimizer)


def expand_peer_names(names: Sequence[str]) -> set[str]:
    """--peers: peer names, a library's distribution or module name standing for all its peers."""
    out = set()
    for n in names:
        group = [p.name for p in PEERS if n in (p.library, p.module) and p.library != "torch"]
        if group:
            out.update(group)
        elif n in PEER_NAMES:
            out.add(n)
        else:
            raise ValueError(f"unknown peer {n!r}; choose from {list(PEER_NAMES)} or a library of {list(LIBRARIES)}")
    return out


def torch_ns(G: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz (bf16, 5 steps, Jordan's coefficients), one matrix."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    return _zeropower_via_newtonschulz(G, (3.4445, -4.775, 2.0315), 5, 1e-7)


# --------------------------------------------------------------------------------------------
# torch.compile of the reference, as a temporary backend
# --------------------------------------------------------------------------------------------
COMPILE_BACKEND = "compile"


@contextlib.contextmanager
def compiled_reference(keys: Sequence[str]):
    """Register ``torch.compile(<key>_reference)`` as backend "compile" for ``keys`` while inside.

    capture_scalar_outputs: the references read the step count with ``.item()``; without it each
    read is a graph break inside the per-tensor loop and dynamo gives up on the whole function
    (measured here: no speed-up). With it one graph covers the loop: 8 ms against 64 ms eager for
    one 2^20 fp32 tensor on 2 CPU cores. ``torch._dynamo.reset()`` first: every case is a new
    list length, and past ``cache_size_limit`` (8) recompiles dynamo silently runs eager.
    """
    import torch._dynamo

    torch._dynamo.reset()
    added = []
    try:
        for key in dict.fromkeys(keys):
            if COMPILE_BACKEND in backends._REGISTRY[key]:
                continue
            compiled = torch.compile(backends._REGISTRY[key]["reference"].fn, dynamic=False)

            def fn(*args, _compiled=compiled):
                with torch._dynamo.config.patch(capture_scalar_outputs=True):
                    return _compiled(*args)

            backends._REGISTRY[key][COMPILE_BACKEND] = backends.Backend(key, COMPILE_BACKEND, fn, priority=-1)
            added.append(key)
        yield
    finally:
        for key in added:
            backends._REGISTRY[key].pop(COMPILE_BACKEND, None)
        torch._dynamo.reset()


def timed_first_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0
