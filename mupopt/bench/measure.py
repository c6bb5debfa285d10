"""The building blocks shared by ``mupopt bench`` (runner.py) and the pytest-benchmark files in
benchmarks/: which implementations exist for an optimizer, the check of one against the
reference, a ready-to-time callable, and what one call costs (bytes or flops).

:func:`prepare` does all of it for one (optimizer, implementation, case, dtype): the pytest files
time the callable it returns; the runner shares tensors and reference results across many
implementations, so it calls the pieces.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import backends
from ..linalg import inverse_root_eigh, inverse_root_newton, newton_schulz
from . import cases as C
from . import model
from .check import Snapshot, compare, compare_tensors, snapshot
from .subjects import (COMPILE_BACKEND, SUBJECTS, TORCH_FOREACH, TORCH_FUSED, TORCH_MUON, Subject, TorchPeer,
                       compiled_reference, shampoo_subject, timed_first_call, torch_ns, with_scale_eps)

# Optimizer -> torch peers that step the same tensors (torch's AdamW is the yardstick of every
# elementwise optimizer, filed under adamw).
TORCH_PEERS: dict[str, tuple[TorchPeer, ...]] = {"adamw": (TORCH_FUSED, TORCH_FOREACH), "muon": (TORCH_MUON,)}


# --------------------------------------------------------------------------------------------
# Optimizers (elementwise, Muon, Shampoo): registry backends and peers
# --------------------------------------------------------------------------------------------
def backend_names(key: str) -> list[str]:
    """Registered backends of ``key``, best first, without the temporary compile peer."""
    return [n for n in backends.names(key) if n != COMPILE_BACKEND]


def unsupported(subject: Subject, name: str, params: Sequence[torch.Tensor]) -> str | None:
    """Why backend ``name`` cannot step these tensors through ``subject``'s class, or None (asked
    with params and grads, as the optimizers' step asks the registry)."""
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes"):
        return "TRITON_INTERPRET=1: the Triton interpreter checks numerics, never speed"
    tensors = [*params, *(p.grad for p in params if p.grad is not None)]
    for key in subject.compile_keys:
        entry = backends._REGISTRY.get(key, {}).get(name)
        if entry is None:
            return f"not registered for {key!r}"
        reason = entry.reason(tensors)
        if reason is not None:
            return reason
    return None


def reference_snapshot(subject: Subject, params: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> Snapshot:
    """The reference backend's params and state after the check sequence, from ``start``."""
    copies = C.clone_params(params, start)
    opt = subject.make(copies, "reference")
    subject.run_check_sequence(opt)
    return snapshot(copies, opt)


def reference_rerun_differs(subject: Subject, params: Sequence[torch.Tensor], start: Sequence[torch.Tensor],
                            reference: Snapshot) -> str | None:
    """After a failed check: run the reference again from the same start and return the first
    tensor on which it differs (bitwise) from ``reference``, or None when it reproduces itself.
    A reference that does not reproduce itself puts the reference in doubt, not the backend:
    issue 22 item 8 was torch's own float32 sqrt (MKL's first vector-math call, mupopt/_vml.py)
    inside the reference snapshot, reported as a wrong "cpu" backend."""
    again = reference_snapshot(subject, params, start)
    for name, tensor in reference.items():
        if name not in again or not torch.equal(tensor, again[name]):
            return name
    return None


def matrix_tol(subject: Subject) -> float | None:
    # Muon: bf16 Newton-Schulz, 1.1e-2..1.9e-2 from float64 (check.py) -> 5e-2 on the update.
    # Shampoo: float32 eigh of rank-deficient statistics (a first step's G G^T has rank <= min
    # side); eigenvalues near the rank cut-off move under reordering, 1e-2 on the update.
    if not subject.matrix:
        return None
    return 5e-2 if subject.key == "muon" else 1e-2


def check_optimizer(subject: Subject, make: Callable[[list], torch.optim.Optimizer], params: Sequence[torch.Tensor],
                    start: Sequence[torch.Tensor], reference: Snapshot, dtype: torch.dtype, what: str) -> float:
    """Run the check sequence with ``make`` on copies of ``start``; raise CheckFailed unless the
    result matches ``reference``. Returns the largest relative error."""
    copies = C.clone_params(params, start)
    opt = make(copies)
    subject.run_check_sequence(opt)
    got = snapshot(copies, opt)
    del opt
    initial = {f"param[{i}]": t for i, t in enumerate(start)}
    return compare(reference, got, dtype=dtype, initial=initial, update_tol=subject.update_tol,
                   matrix_tol=matrix_tol(subject), what=what)


def start_optimizer(subject: Subject, make: Callable[[list], torch.optim.Optimizer], params: Sequence[torch.Tensor],
                    sync: Callable[[], None]) -> tuple[torch.optim.Optimizer, float]:
    """The optimizer to time, after its first call (state, compilation) and priming; returns it
    and the seconds of that first call."""
    opt = make(list(params))
    first = timed_first_call(lambda: subject.step(opt), sync)
    subject.prime(opt)
    return opt, first


Cost = Callable[[Sequence[torch.Tensor], Sequence[dict]], "tuple[int | None, int | None, str | None]"]


def elementwise_cost(key: str) -> Cost:
    """(bytes from the model, no flops, no matmul peak)."""
    return lambda params, states: (model.step_bytes(key, params, states), None, None)


BOUND = "no-math bound"  # the backend name of the bound's rows (kind "peak")


def traffic_bound(key: str, params: Sequence[torch.Tensor]) -> "Callable[[], None] | str":
    """The CPU's memory bound of one ``key`` step on tensors like ``params``: a callable that
    runs the step's passes (model.PASSES) with no math through ``torch.ops.mupopt.traffic_``
    (csrc/cpu/traffic.cpp: the same launch table, chunks, threads and loops as backend "cpu"), on
    buffers of its own with the operands' dtypes (states: the param's; gradients: ``p.grad``'s,
    else the param's); its ``nbytes`` is the bytes model of one call. A string saying why not
    where it cannot run (not the CPU, no C++ library)."""
    if any(p.device.type != "cpu" for p in params):
        return "the no-math bound is a CPU loop (csrc/cpu/traffic.cpp)"
    from ..kernels.cpp import build

    outcome = build.load_cpu()
    if outcome is not True:
        return f"the no-math bound needs the cpu library: {outcome}"
    names = model.operands(key)
    gen = torch.Generator().manual_seed(1)

    def buffer(p: torch.Tensor, name: str) -> torch.Tensor:
        like = p.grad if name == "grad" and p.grad is not None else p
        return torch.randn(like.shape, generator=gen).to(like.dtype)

    # The op's lists are numbered as the optimizers' streams: 0 param, 1 gradient, 2.. states.
    states = [n for n in names if n not in ("param", "grad")]
    index = {"param": 0, "grad": 1, **{n: 2 + k for k, n in enumerate(states)}}
    streams: list[list[torch.Tensor]] = [[], [], [], []]
    for name in names:
        streams[index[name]] = [buffer(p, name) for p in params]
    passes = []
    for reads, writes in model.PASSES[key]:
        passes += [sum(1 << index[n] for n in reads), sum(1 << index[n] for n in writes)]
    op = torch.ops.mupopt.traffic_.default

    def bound() -> None:
        op(*streams, passes)

    bound.nbytes = sum(sum(model.TRAFFIC[key][name]) * t.numel() * t.element_size()
                       for name in names for t in streams[index[name]])
    return bound


def muon_cost(shapes: Sequence[tuple]) -> Cost:
    flops = model.muon_step_flops(shapes)
    return lambda params, states: (None, flops, "bf16")  # Newton-Schulz runs in bf16 (ns_dtype)


def shampoo_cost(subject: Subject, params: Sequence[torch.Tensor]) -> Cost:
    """Flops of one step with roots refreshed: the matmuls as torch counts them (statistics,
    preconditioning, Q diag(r) Q^T) plus 9 n^3 per eigendecomposition (model.eigh_root_flops)."""
    copies = C.clone_params(params)
    opt = subject.make(copies, "reference")
    subject.run_check_sequence(opt)
    counted = model.counted_flops(lambda: subject.step(opt))
    eigh = sum(9 * m.shape[0] ** 3 for st in opt.state.values() for key in ("left", "right") for m in st.get(key, []))
    return lambda params, states: (None, counted + eigh, "fp32")


# --------------------------------------------------------------------------------------------
# Matrix functions alone: Newton-Schulz and inverse roots
# --------------------------------------------------------------------------------------------
@dataclass
class MatrixSetup:
    """Implementations of one matrix function on one input: name -> (kind, fn, must_match, flops)."""

    impls: dict[str, tuple[str, Callable[[], torch.Tensor], bool, int]]
    reference: torch.Tensor
    tol: float
    reference_name: str
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why not


def ns_setup(case: C.Case, dtype: str, device: torch.device, seed: int = 0) -> MatrixSetup:
    """Newton-Schulz alone, 5 steps: ours ("linalg") on the stack in one batched call; torch's
    ("torch-ns", bf16 only) per matrix, its function taking one 2-D matrix."""
    dt = C.DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    G = torch.randn(case.tensors, *case.shapes[0], generator=gen, device=device)
    flops = sum(model.ns_flops(s) for s in case.shapes)
    ours = lambda: newton_schulz(G, 5, dtype=dt, check_finite=False)  # noqa: E731
    theirs = lambda: torch.stack([torch_ns(g) for g in G])  # noqa: E731
    impls = {"linalg": ("mupopt", ours, True, flops)}
    if dt == torch.bfloat16:
        impls["torch-ns"] = ("peer", theirs, False, flops)
        # torch's bf16 iteration is the named reference (ours is bit-identical on 2-D input).
        return MatrixSetup(impls, theirs(), 5e-2, "torch.optim.Muon's bf16 Newton-Schulz")
    reference = newton_schulz(G.double(), 5, dtype=torch.float64, check_finite=False)
    return MatrixSetup(impls, reference, 1e-4, "float64 Newton-Schulz", {"torch-ns": "torch's Newton-Schulz runs in bf16 only"})


def roots_setup(case: C.Case, device: torch.device, seed: int = 0) -> MatrixSetup:
    """Inverse 4th roots of a batch of Shampoo blocks: batched eigh and batched coupled Newton
    (ours) against a per-block eigh loop (the peer of docs/benchmarks.md's ">= 2x" target)."""
    A = C.roots_input(case, device, seed)
    n, b = case.shapes[0][0], case.tensors
    kw = dict(eps=1e-6, relative_eps=True)
    batched = lambda: inverse_root_eigh(A, 4, **kw)  # noqa: E731
    newton = lambda: inverse_root_newton(A, 4, **kw)  # noqa: E731
    loop = lambda: torch.stack([inverse_root_eigh(A[i], 4, **kw) for i in range(b)])  # noqa: E731
    eigh_flops = b * model.eigh_root_flops(n)
    impls = {
        "eigh-batched": ("mupopt", batched, True, eigh_flops),
        # The coupled Newton iteration stops when converged: its matmuls are counted, not modelled.
        "newton-batched": ("mupopt", newton, True, model.counted_flops(newton)),
        "eigh-loop": ("peer", loop, False, eigh_flops),
    }
    return MatrixSetup(impls, inverse_root_eigh(A.double(), 4, **kw), 1e-4, "float64 eigh roots")


# --------------------------------------------------------------------------------------------
# One implementation, ready to time (the pytest-benchmark files)
# --------------------------------------------------------------------------------------------
MATRIX_FUNCTIONS = ("ns", "roots")


def cases_for(optimizer: str, profile: C.Profile) -> list[C.Case]:
    """The cases of ``optimizer`` (a key of runner.OPTIMIZERS) at this profile's sizes; AdamW also
    gets the muP pair (``.uniform``: every multiplier 1; ``.mup``: one per tensor)."""
    if optimizer in model.ELEMENTWISE:
        out = C.elementwise_cases(profile)
        if optimizer == "adamw":
            g = out[1]
            out += [C.Case(f"{g.name}.uniform", g.shapes, g.description), C.Case(f"{g.name}.mup", g.shapes, g.description)]
        return out
    return {
        "muon": lambda: C.muon_cases(profile),
        "shampoo": lambda: [C.shampoo_case(profile)],
        "ns": lambda: C.ns_cases(profile),
        "roots": lambda: [C.roots_case(profile)],
    }[optimizer]()


def implementations(optimizer: str, case: C.Case | None = None) -> list[tuple[str, str]]:
    """(name, kind) of everything timed for ``optimizer`` (on ``case``): registry backends, then
    peers. The muP pair has no peers: torch has no per-tensor multipliers, and the pair compares
    our backends with themselves."""
    if optimizer == "ns":
        return [("linalg", "mupopt"), ("torch-ns", "peer")]
    if optimizer == "roots":
        return [("eigh-batched", "mupopt"), ("newton-batched", "mupopt"), ("eigh-loop", "peer")]
    out = [(n, "mupopt") for n in backend_names(optimizer)]
    if case is not None and case.name.endswith((".mup", ".uniform")):
        return out
    out += [(p.name, "peer") for p in TORCH_PEERS.get(optimizer, ())]
    if optimizer != "shampoo":  # eigh breaks the graph: nothing for inductor to fuse
        out.append((COMPILE_BACKEND, "peer"))
    return out


def subject_for(optimizer: str, case: C.Case, profile: C.Profile) -> Subject:
    if optimizer == "shampoo":
        return shampoo_subject(profile.shampoo_max_dim)
    if case.name.endswith((".mup", ".uniform")):
        return with_scale_eps(SUBJECTS[optimizer])
    return SUBJECTS[optimizer]


@dataclass
class Prepared:
    """A checked implementation: ``call()`` is one timed call; ``close()`` releases it."""

    call: Callable[[], object]
    nbytes: int | None
    flops: int | None
    check_err: float | None
    first_call_s: float = 0.0
    _exit: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def close(self) -> None:
        self._exit.close()


class Skip(Exception):
    """This implementation cannot run this case here (the reason is the message)."""


def prepare(optimizer: str, impl: str, case: C.Case, dtype: str, device: torch.device, profile: C.Profile,
            seed: int = 0, compile_max_tensors: int = 1) -> Prepared:
    """Build the tensors of ``case``, check ``impl`` against the reference (CheckFailed on a
    mismatch of one of ours; a peer's mismatch raises too: pytest shows it), and return the call to
    time. Raises Skip when ``impl`` cannot run here, or is the compile peer of a list longer than
    ``compile_max_tensors`` (inductor unrolls the per-tensor loop: minutes for 148 tensors)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if optimizer in MATRIX_FUNCTIONS:
        setup = ns_setup(case, dtype, device, seed) if optimizer == "ns" else roots_setup(case, device, seed)
        if impl in setup.skipped:
            raise Skip(setup.skipped[impl])
        kind, fn, _, flops = setup.impls[impl]
        err = compare_tensors(setup.reference, fn(), setup.tol, f"{optimizer} {impl!r}, case {case.name}, {dtype}")
        return Prepared(fn, None, flops, err)

    subject = subject_for(optimizer, case, profile)
    params = C.make_params(case.shapes, C.DTYPES[dtype], device, seed)
    if case.name.endswith((".mup", ".uniform")):
        C.set_mup_widths(params, distinct=case.name.endswith(".mup"))
    ex = contextlib.ExitStack()
    if impl == COMPILE_BACKEND:
        if case.tensors > compile_max_tensors:
            raise Skip(f"{case.tensors} tensors > compile_max_tensors {compile_max_tensors}: inductor unrolls the "
                       f"per-tensor loop (10 s of compilation for 20 tensors on 2 CPU cores)")
        ex.enter_context(compiled_reference(subject.compile_keys))
        make = lambda ps: subject.make(ps, COMPILE_BACKEND)  # noqa: E731
    elif impl in {p.name for p in TORCH_PEERS.get(optimizer, ())}:
        make = next(p for p in TORCH_PEERS[optimizer] if p.name == impl).make
    else:
        reason = unsupported(subject, impl, params)
        if reason is not None:
            raise Skip(reason)
        make = lambda ps: subject.make(ps, impl)  # noqa: E731
    try:
        start = [p.detach().clone() for p in params]
        reference = reference_snapshot(subject, params, start)
        err = None
        if impl != "reference":
            err = check_optimizer(subject, make, params, start, reference, C.DTYPES[dtype],
                                  f"{optimizer} {impl!r}, case {case.name}, {dtype}")
        del reference, start
        opt, first = start_optimizer(subject, make, params, sync)
    except BaseException:
        ex.close()
        raise
    if optimizer == "shampoo":
        cost = shampoo_cost(subject, params)
    elif optimizer == "muon":
        cost = muon_cost(case.shapes)
    else:
        cost = elementwise_cost(optimizer)
    nbytes, flops, _ = cost(params, [opt.state[p] for p in params])
    return Prepared(lambda: subject.step(opt), nbytes, flops, err, first, ex)
