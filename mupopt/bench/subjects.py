"""What gets timed: mupopt optimizers through a registry backend, and the peers of
docs/benchmarks.md on the same tensors.

Every timed call is a whole user-visible ``step()`` (``update_hessian()`` for the Sophia Hessian
EMA) of a ``torch.optim.Optimizer``: ours with ``backend=<name>``, torch's AdamW fused/foreach and
Muon as they are. Timing the step rather than the backend function keeps the per-step Python work
of the class in the number, as it is in torch's: at 1000 tensors that work is the step.

The torch.compile peer is our reference function compiled by inductor and registered for the
duration as one more backend ("compile"), so it runs through exactly the same class.
"""
from __future__ import annotations

import contextlib
import dataclasses
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
                    st["hessian"].copy_(p.grad.float().square().mul_(0.01).add_(1e-4))

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
# Peers
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TorchPeer:
    """A torch optimizer on the same tensors (its step is the timed call)."""

    name: str
    factory: Callable[[list], torch.optim.Optimizer]
    # Whether it computes what our subject of this key computes (then it is checked too).
    same_math_as: str | None

    def make(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        return self.factory(list(params))


_ADAMW_KW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)

TORCH_FUSED = TorchPeer("torch-fused", lambda ps: torch.optim.AdamW(ps, fused=True, **_ADAMW_KW), "adamw")
TORCH_FOREACH = TorchPeer("torch-foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **_ADAMW_KW), "adamw")
TORCH_MUON = TorchPeer("torch-muon", lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1), "muon")

PEER_NAMES = ("torch-fused", "torch-foreach", "compile", "reference", "torch-muon", "torch-ns", "eigh-loop")


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
