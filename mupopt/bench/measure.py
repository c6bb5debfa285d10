"""The building blocks shared by ``mupopt bench`` (runner.py) and the pytest-benchmark files in
benchmarks/: which implementations exist for an optimizer, the check of one against the
reference, a ready-to-time callable, and what one call costs (bytes or flops).

:func:`prepare` does all of it for one (optimizer, implementation, case, dtype): the pytest files
time the callable it returns; the runner shares tensors and reference results across many
implementations, so it calls the pieces.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import backends
from ..linalg import inverse_root_eigh, inverse_root_newton, newton_schulz
from . import cases as C
from . import model
from .check import Snapshot, compare, compare_tensors, snapshot, update_error
from .subjects import (COMPILE_BACKEND, EQUIVALENCE_TOL, PEERS_BY_NAME, SUBJECTS, Peer, Subject, compiled_reference,
                       peers_of, shampoo_subject, timed_first_call, torch_ns, with_scale_eps)


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
                    start: Sequence[torch.Tensor], reference: Snapshot, dtype: torch.dtype, what: str,
                    peer: Peer | None = None) -> float:
    """Run the check sequence with ``make`` on copies of ``start``; raise CheckFailed unless the
    result matches ``reference``. Returns the largest relative error.

    A ``peer`` runs its own sequence (Peer.run_check_sequence) on gradients of its own (a peer
    may write its gradients, which the other contenders share), and only the params are compared:
    its state may use our names for other things."""
    copies = C.clone_params(params, start)
    if peer is not None:
        for q in copies:
            q.grad = q.grad.clone()
    opt = make(copies)
    (peer or subject).run_check_sequence(opt)
    got = snapshot(copies, opt)
    del opt
    if peer is not None and peer.library != "torch":  # torch's optimizers keep our state names
        got = {k: v for k, v in got.items() if k.startswith("param[")}
    initial = {f"param[{i}]": t for i, t in enumerate(start)}
    return compare(reference, got, dtype=dtype, initial=initial, update_tol=subject.update_tol,
                   matrix_tol=matrix_tol(subject), what=what)


def start_optimizer(subject: Subject | Peer, make: Callable[[list], torch.optim.Optimizer], params: Sequence[torch.Tensor],
                    sync: Callable[[], None]) -> tuple[torch.optim.Optimizer, float]:
    """The optimizer to time, after its first call (state, compilation) and priming; returns it
    and the seconds of that first call. ``subject``: ours, or a Peer (its own step and prime)."""
    opt = make(list(params))
    first = timed_first_call(lambda: subject.step(opt), sync)
    subject.prime(opt)
    return opt, first


# --------------------------------------------------------------------------------------------
# Peers: are they the same variant as ours?
# --------------------------------------------------------------------------------------------
# Calls of the equivalence run: the bench's check sequence (CHECK_STEPS = 2: a step, priming, a
# step) and one more, each with a new gradient: with the same gradient every call, ADOPT's
# normalised gradient g / sqrt(v) is +-1 at the second call and no clip ever acts, so a peer
# without the clip would pass; the third call runs the bias corrections at t = 3.
EQUIVALENCE_STEPS = 3
# Small tensors: equivalence is a property of the formulas, not of the sizes. Shampoo: full-rank
# square blocks within one preconditioner block (a first step's G G^T of a wide block is rank
# deficient, and its null space's roots follow the rounding, not the formula).
EQUIVALENCE_SHAPES = {"muon": ((48, 32), (32, 80), (64, 64)), "shampoo": ((32, 32), (24, 24))}
ELEMENTWISE_EQUIVALENCE_SHAPES = ((48, 32), (32, 80), (40,))


@dataclass(frozen=True)
class Equivalence:
    """A peer against our subject in ``dtype``: the relative error of its updates (update_error)
    with the hyperparameters as mapped, and under ``peer.neutral`` (None when it has none)."""

    error: float
    neutral_error: float | None
    dtype: torch.dtype

    @property
    def matches(self) -> bool:
        return self.error <= EQUIVALENCE_TOL

    def consistent(self, peer: Peer) -> bool:
        """The declaration holds: a same variant matches; a different one differs, and matches
        under its neutral settings when it has some."""
        if peer.same_variant:
            return self.matches
        return not self.matches and (self.neutral_error is None or self.neutral_error <= peer.neutral_tol)

    def label(self, peer: Peer) -> str:
        how = f"{str(self.dtype).removeprefix('torch.')}, {EQUIVALENCE_STEPS} steps"
        if peer.same_variant:
            if self.matches:
                text = f"same variant: matches our reference to {EQUIVALENCE_TOL:g} ({how}: {self.error:.1g})"
            else:
                text = f"MISMATCH: declared the same variant, but {self.error:.2g} from our reference ({how})"
        elif self.matches:
            text = f"MISLABELLED: declared a different variant ({peer.differs}), but matches our reference ({how}: {self.error:.1g})"
        else:
            text = f"different variant: {peer.differs} ({self.error:.2g} from ours, {how})"
            if self.neutral_error is not None:
                ours, theirs = (", ".join(f"{k}={_short(v)}" for k, v in d.items()) or "as mapped" for d in peer.neutral)
                verdict = "matches" if self.neutral_error <= peer.neutral_tol else "still DIFFERS"
                text += (f"; {verdict} to {peer.neutral_tol:g} with ours {ours} and its {theirs} "
                         f"({self.neutral_error:.1g})")
        return text


def _well_conditioned(shape, *, dtype, device, generator) -> torch.Tensor:
    """U diag(s) V^T with s in [0.5, 2]: Shampoo's statistics G G^T then have a condition number
    of 16. A Gaussian square matrix often has a singular value near 0 (seed 1, 32 x 32: 0.005),
    below what float32 statistics resolve (about sqrt(n) * 1.2e-7 * lambda_max): our roots raise
    such eigenvalues to that floor (linalg.inverse_root_eigh), so such a gradient measures the
    floor, not the formula, and a peer computing in float32 its own way differs there."""
    n = shape[0]
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype, device=device, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype, device=device, generator=generator))
    return u @ torch.diag(torch.linspace(0.5, 2.0, n, dtype=dtype, device=device)) @ v.T


def _short(v) -> str:
    if isinstance(v, (tuple, list)) and len(v) > 3:
        return f"[{len(v)} entries]"
    return str(v).removeprefix("torch.")


def equivalence(subject: Subject, peer: Peer, device: torch.device, seed: int = 0) -> Equivalence:
    """Run ``peer`` (eager) and our reference backend from the same start with the same
    gradients for EQUIVALENCE_STEPS calls (the first followed by both sides' priming), in
    ``peer.equivalence_dtype`` (float64: round-off far below EQUIVALENCE_TOL), and compare the
    params' updates; then again under ``peer.neutral``."""
    peer = dataclasses.replace(peer, compiled=False)
    key = subject.key if subject.key in EQUIVALENCE_SHAPES else None
    shapes = EQUIVALENCE_SHAPES[key] if key else ELEMENTWISE_EQUIVALENCE_SHAPES
    dtype = peer.equivalence_dtype
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    draw = _well_conditioned if key == "shampoo" else torch.randn
    grads = [[draw(s, dtype=dtype, device=device, generator=gen) for s in shapes] for _ in range(EQUIVALENCE_STEPS)]

    def updates(make, step, prime) -> tuple[Snapshot, Snapshot]:
        params = C.make_params(shapes, dtype, device, seed)
        start = {f"param[{i}]": p.detach().clone() for i, p in enumerate(params)}
        opt = make(params)
        for k, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()  # a peer may write its gradients
            step(opt)
            if k == 0:
                prime(opt)
        return {f"param[{i}]": p.detach() for i, p in enumerate(params)}, start

    def error(ours: dict, theirs: dict) -> float:
        mine = dataclasses.replace(subject, kwargs={**subject.kwargs, **ours})
        ref, start = updates(lambda ps: mine.make(ps, "reference"), mine.step, mine.prime)
        got, _ = updates(lambda ps: peer.make(ps, subject, **theirs), peer.step, peer.prime)
        return update_error(ref, got, start)

    mapped = error({}, {})
    neutral = error(*peer.neutral) if peer.neutral is not None and not peer.same_variant else None
    return Equivalence(mapped, neutral, dtype)


Cost = Callable[[Sequence[torch.Tensor], Sequence[dict]], "tuple[int | None, int | None, str | None]"]


class _LikeParam(dict):
    """A state whose every tensor is like its param: what our step keeps."""

    def __init__(self, p: torch.Tensor):
        super().__init__()
        self.p = p

    def __missing__(self, key: str) -> torch.Tensor:
        return self.p


def cost_states(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer, peer: Peer | None) -> list:
    """The states a row's bytes are counted from: the optimizer's own, except for a library peer,
    whose state may be named, shaped or typed otherwise (HeavyBall nests it; 8-bit ones quantise):
    its row counts the bytes our step must move for these params, so GB/s compares the times."""
    if peer is not None and peer.library != "torch":
        return [_LikeParam(p) for p in params]
    return [opt.state[p] for p in params]


def elementwise_cost(key: str) -> Cost:
    """(bytes from the model, no flops, no matmul peak)."""
    return lambda params, states: (model.step_bytes(key, params, states), None, None)


BOUND = "no-math bound"  # the backend name of the bound's rows (kind "peak")


def traffic_bound(key: str, params: Sequence[torch.Tensor], state_dtype: torch.dtype | None = None
                  ) -> "Callable[[], None] | str":
    """The CPU's memory bound of one ``key`` step on tensors like ``params``: a callable that
    runs the step's passes (model.PASSES) with no math through ``torch.ops.mupopt.traffic_``
    (csrc/cpu/traffic.cpp: the same launch table, chunks, threads and loops as backend "cpu"), on
    buffers of its own with the operands' dtypes (states: the param's, or ``state_dtype``:
    bfloat16 for state_bits=16, uint8 for state_bits=8's codes, moved as bytes; gradients:
    ``p.grad``'s, else the param's); its ``nbytes`` is the bytes model of one call. A string
    saying why not where it cannot run (not the CPU, no C++ library)."""
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
        dtype = state_dtype if state_dtype is not None and name not in ("param", "grad") else like.dtype
        if dtype == torch.uint8:
            return torch.randint(0, 256, like.shape, generator=gen, dtype=torch.uint8)
        return torch.randn(like.shape, generator=gen).to(dtype)

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
    out += [(p.name, "peer") for p in peers_of(optimizer)]
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
    peer = None
    if impl == COMPILE_BACKEND:
        if case.tensors > compile_max_tensors:
            raise Skip(f"{case.tensors} tensors > compile_max_tensors {compile_max_tensors}: inductor unrolls the "
                       f"per-tensor loop (10 s of compilation for 20 tensors on 2 CPU cores)")
        ex.enter_context(compiled_reference(subject.compile_keys))
        make = lambda ps: subject.make(ps, COMPILE_BACKEND)  # noqa: E731
    elif impl in PEERS_BY_NAME:
        peer = PEERS_BY_NAME[impl]
        reason = peer.unavailable(device) or (peer.refuses(subject, params) if peer.refuses else None)
        if reason is not None:
            raise Skip(reason)
        peer = dataclasses.replace(peer, compiled=peer.compiles and case.tensors <= compile_max_tensors)
        make = lambda ps: peer.make(ps, subject)  # noqa: E731
    else:
        reason = unsupported(subject, impl, params)
        if reason is not None:
            raise Skip(reason)
        make = lambda ps: subject.make(ps, impl)  # noqa: E731
    try:
        start = [p.detach().clone() for p in params]
        reference = reference_snapshot(subject, params, start)
        err = None
        # A peer of another variant computes other numbers by design (Peer.differs): not checked.
        if impl != "reference" and (peer is None or peer.same_variant):
            err = check_optimizer(subject, make, params, start, reference, C.DTYPES[dtype],
                                  f"{optimizer} {impl!r}, case {case.name}, {dtype}", peer=peer)
        del reference, start
        opt, first = start_optimizer(peer or subject, make, params, sync)
    except BaseException:
        ex.close()
        raise
    if optimizer == "shampoo":
        cost = shampoo_cost(subject, params)
    elif optimizer == "muon":
        cost = muon_cost(case.shapes)
    else:
        cost = elementwise_cost(optimizer)
    nbytes, flops, _ = cost(params, cost_states(params, opt, peer))
    return Prepared(lambda: (peer or subject).step(opt), nbytes, flops, err, first, ex)
