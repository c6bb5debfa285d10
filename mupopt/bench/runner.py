"""The benchmark run: every optimizer x registered backend x case x dtype, with the peers of
docs/benchmarks.md measured in the same run on the same tensors, each result checked against
the reference backend before it is timed.

Backends come from the registry (``mupopt.backends``): whatever ``import mupopt`` has registered
is measured, so new backends (triton, cuda, cpu) are covered as soon as they register. A backend
that cannot step a case (``unsupported_reason``) gives a "skipped" row saying why.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from typing import Callable, Sequence

import torch

from .. import backends
from . import cases as C
from . import measure as M
from . import model
from .check import CheckFailed, compare_tensors
from .subjects import (COMPILE_BACKEND, PEER_NAMES, SUBJECTS, Peer, Subject, compiled_reference, expand_peer_names,
                       peers_of, shampoo_subject, timed_first_call, with_scale_eps)
from .timing import BUDGETS, LoopTimer, Timer, Timing, copy_numel, matmul_n, measure_copy, measure_matmul

OPTIMIZERS = ("adamw", "adopt", "lamb", "sophia", "sophia_hessian", "muon", "shampoo", "ns", "roots")
ELEMENTWISE = model.ELEMENTWISE
MODES = ("quick", "full", "smoke")

# ratio_to_<peer> = peer median / this row's median: > 1 means this row is faster.
RATIO_COLUMNS = {
    "torch-fused": "ratio_to_torch_fused",
    "torch-foreach": "ratio_to_torch_foreach",
    "compile": "ratio_to_compile",
    "reference": "ratio_to_reference",
    "torch-muon": "ratio_to_torch_muon",
    "torch-ns": "ratio_to_torch_ns",
    "eigh-loop": "ratio_to_eigh_loop",
}

# Compile unrolls the per-tensor loop of a reference into one graph: 10 s of inductor for 20
# tensors on 2 CPU cores (measured), minutes for 1000; a one-tensor step compiles in 6-15 s.
# Default: the one-tensor case only (quick: AdamW alone, 2 compilations; full: every elementwise
# optimizer and Muon). --compile-max-tensors 200 adds the model lists, for minutes per list.
COMPILE_MAX_TENSORS = {"quick": 1, "full": 1, "smoke": 0}
COMPILE_OPTIMIZERS = {"quick": ("adamw",), "full": tuple(ELEMENTWISE) + ("muon",), "smoke": ()}


@dataclass
class Row:
    """One result: the schema of the JSON and CSV files (same columns, same order)."""

    optimizer: str
    backend: str
    kind: str  # "mupopt" (a registry backend or our linalg function), "peer", "peak"
    case: str
    dtype: str
    numel: int
    tensors: int
    status: str = "ok"  # ok | skipped | failed
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    reps: int | None = None
    bytes: int | None = None  # bytes model of one call (elementwise steps, copy)
    gbps: float | None = None
    flops: int | None = None  # flop count of one call (matrix-bound parts, matmul)
    tflops: float | None = None
    pct_of_peak: float | None = None  # of the copy bandwidth (GB/s rows) or matmul rate (TFLOP/s rows)
    peak: str = ""  # which peak, with its value
    # CPU elementwise rows: % of the no-math bound of this optimizer's bytes on the same tensors
    # (the bound row's time / this row's time; measure.traffic_bound)
    pct_of_bound: float | None = None
    ratio_to_torch_fused: float | None = None
    ratio_to_torch_foreach: float | None = None
    ratio_to_compile: float | None = None
    ratio_to_reference: float | None = None
    ratio_to_torch_muon: float | None = None
    ratio_to_torch_ns: float | None = None
    ratio_to_eigh_loop: float | None = None
    ratio_to_adamw: float | None = None  # our AdamW, same backend, same case and dtype
    ratio_to_uniform_lr: float | None = None  # muP case: the same step with every multiplier 1
    target: str = ""  # docs/benchmarks.md target for this row, if any
    meets_target: bool | None = None
    check_err: float | None = None  # largest relative error against the reference
    notes: str = ""
    device: str = ""
    device_name: str = ""
    threads: int | None = None
    torch: str = ""
    triton: str = ""
    python: str = ""
    date: str = ""
    host: str = ""
    mode: str = ""
    load_avg: float | None = None  # 1-minute load average when the row was measured
    run_note: str = ""


COLUMNS = [f.name for f in fields(Row)]


@dataclass
class Config:
    device: str = "auto"
    mode: str = "quick"
    optimizers: Sequence[str] | None = None  # None: all of OPTIMIZERS
    backends: Sequence[str] | None = None  # None: every registered backend
    peers: Sequence[str] | None = None  # None: all of PEER_NAMES (a library's name: all its peers)
    cases: Sequence[str] | None = None  # None: all; else case names or their prefixes
    dtypes: Sequence[str] = ("fp32", "bf16")
    compile_max_tensors: int | None = None  # None: COMPILE_MAX_TENSORS[mode]
    compile_optimizers: Sequence[str] | None = None  # None: COMPILE_OPTIMIZERS[mode]
    keep_going: bool = False  # record a failing check and go on (exit status 1 at the end)
    max_seconds: float | None = None  # start no new case group after this many seconds
    note: str = ""  # stored with every row (e.g. "CPU shared with other jobs")
    seed: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r} (cpu, cuda or auto)")
    return dev


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, config: Config) -> dict:
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:
        triton_version = ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} cores)"
    return dict(
        device=device.type, device_name=name, threads=torch.get_num_threads(), torch=torch.__version__,
        triton=triton_version, python=platform.python_version(),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=socket.gethostname(),
        mode=config.mode, run_note=config.note,
    )


class Progress:
    """Plain text on stderr (tqdm's bar when tqdm is installed and stderr is a terminal)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="group")
            except ImportError:
                pass

    def start(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label)
        elif self.enabled:
            elapsed = time.perf_counter() - self.t0
            print(f"[{self.done + 1:3d}/{self.total} {elapsed:6.0f} s] {label}", file=sys.stderr, flush=True)

    def log(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(f"        {line}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class Group:
    """One unit of work: a family of measurements on one set of tensors."""

    family: str  # "peaks", "elementwise", "overhead", "mup", "lean", "muon", "shampoo", "ns", "roots"
    case: C.Case | None
    dtype: str
    keys: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.case is None:
            return "device peaks (copy bandwidth, matmul)"
        keys = ",".join(self.keys) if self.keys else self.family
        return f"{keys} | {self.case.name} | {self.dtype}"


class Runner:
    def __init__(self, config: Config, progress: bool = True):
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {config.mode!r}")
        unknown = set(config.optimizers or ()) - set(OPTIMIZERS)
        if unknown:
            raise ValueError(f"unknown optimizers {sorted(unknown)}; choose from {list(OPTIMIZERS)}")
        peers = expand_peer_names(config.peers) if config.peers is not None else set(PEER_NAMES)
        unknown = set(config.dtypes) - set(C.DTYPES)
        if unknown:
            raise ValueError(f"unknown dtypes {sorted(unknown)}; choose from {list(C.DTYPES)}")
        # A misspelt backend would time none of ours, only the peers, and exit 0. "cuda" is
        # registered only where CUDA is; naming it elsewhere gives rows that say why not.
        registered = sorted({n for key in backends._REGISTRY for n in M.backend_names(key)} | {"cuda"})
        unknown = set(config.backends or ()) - set(registered)
        if unknown:
            raise ValueError(f"unknown backends {sorted(unknown)}; choose from {registered}")
        self.config = config
        self.device = resolve_device(config.device)
        self.profile = C.profile_for(self.device, config.mode)
        self.timer = Timer(self.device, BUDGETS[config.mode])
        self.env = environment(self.device, config)
        self.optimizers = tuple(config.optimizers or OPTIMIZERS)
        self.peers = peers
        self.equivalences: dict[str, str] = {}  # peer name -> its equivalence label (measured once per run)
        limit = config.compile_max_tensors
        self.compile_max = COMPILE_MAX_TENSORS[config.mode] if limit is None else limit
        chosen = config.compile_optimizers
        self.compile_optimizers = set(COMPILE_OPTIMIZERS[config.mode] if chosen is None else chosen)
        self.rows: list[Row] = []
        self.failures: list[str] = []
        self.stopped_early = ""
        self.copy_gbps: float | None = None
        self.matmul_tflops: dict[str, float] = {}
        self.bound_ms: dict[tuple[str, str, str], float] = {}  # (optimizer, case, dtype) -> no-math bound
        self._show = progress
        self.progress: Progress | None = None

    # ---------------------------------------------------------------------------------------
    # Plan
    # ---------------------------------------------------------------------------------------
    def _want_case(self, case: C.Case) -> bool:
        sel = self.config.cases
        matched = [s for s in sel or () if case.name == s or case.name.startswith(s)]
        self._matched_cases.update(matched)
        return not sel or bool(matched)

    def plan(self) -> list[Group]:
        prof, dtypes = self.profile, list(self.config.dtypes)
        self._matched_cases: set[str] = set()
        groups = self._plan(prof, dtypes)
        # A --cases name that matches no case of the selected optimizers (a typo) would time
        # only the device peaks and exit 0.
        unmatched = sorted(set(self.config.cases or ()) - self._matched_cases)
        if unmatched:
            raise ValueError(f"--cases {unmatched} match no case of the selected optimizers "
                             f"({', '.join(self.optimizers)}) in {self.config.mode} mode")
        return groups

    def _plan(self, prof, dtypes: list) -> list[Group]:
        groups = [Group("peaks", None, "")]
        elem = tuple(k for k in ELEMENTWISE if k in self.optimizers)
        if elem:
            for case in C.elementwise_cases(prof):
                if self._want_case(case):
                    groups += [Group("elementwise", case, dt, elem) for dt in dtypes]
        if elem and "fp32" in dtypes:
            groups += [Group("overhead", case, "fp32", elem) for case in C.overhead_cases(prof) if self._want_case(case)]
        if "adamw" in self.optimizers:
            case = C.elementwise_cases(prof)[1]
            mup_case = C.Case(f"{case.name}.mup", case.shapes, "GPT-2 list, a different lr and eps multiplier per tensor")
            if self._want_case(mup_case):
                groups += [Group("mup", mup_case, dt, ("adamw",)) for dt in dtypes]
            lean_case = C.Case(f"{case.name}.lean", case.shapes,
                               "GPT-2 list, AdamW with 16- and 8-bit states (bf16: and stochastic rounding)")
            if self._want_case(lean_case):
                groups += [Group("lean", lean_case, dt, ("adamw",)) for dt in dtypes]
        if "muon" in self.optimizers:
            groups += [Group("muon", case, dt, ("muon",)) for case in C.muon_cases(prof) if self._want_case(case) for dt in dtypes]
        if "ns" in self.optimizers:
            groups += [Group("ns", case, dt, ("ns",)) for case in C.ns_cases(prof) if self._want_case(case) for dt in dtypes]
        if "shampoo" in self.optimizers:
            case = C.shampoo_case(prof)
            if self._want_case(case):
                groups += [Group("shampoo", case, dt, ("shampoo",)) for dt in dtypes]
        if "roots" in self.optimizers and "fp32" in dtypes:
            case = C.roots_case(prof)
            if self._want_case(case):
                groups.append(Group("roots", case, "fp32", ("roots",)))
        return groups

    # ---------------------------------------------------------------------------------------
    # Run
    # ---------------------------------------------------------------------------------------
    def run(self) -> list[Row]:
        groups = self.plan()
        self.progress = Progress(len(groups), self._show)
        threads = torch.get_num_threads()
        if self.config.mode == "smoke" and self.device.type == "cpu":
            # Smoke numbers mean nothing; one thread keeps OpenMP barriers from stalling for a
            # scheduler slice when the CPU is shared (measured: tiny addmm calls of 7 ms at load 7
            # on 2 cores), so the smoke test stays within seconds.
            torch.set_num_threads(1)
        self.env["threads"] = torch.get_num_threads()
        started = time.perf_counter()
        try:
            for done, group in enumerate(groups):
                budget = self.config.max_seconds
                if budget is not None and done and time.perf_counter() - started > budget:
                    # Stop between groups so that what was measured is still written.
                    self.stopped_early = f"stopped after {done} of {len(groups)} groups: --max-seconds {budget:g} spent"
                    self.progress.log(self.stopped_early)
                    break
                self.progress.start(group.label)
                getattr(self, f"_group_{group.family}")(group)
                self._cleanup()
                self.progress.advance()
        finally:
            torch.set_num_threads(threads)
            self.progress.close()
        finish(self.rows, self.device.type, targets=self.config.mode != "smoke")
        if self.stopped_early:
            for row in self.rows:
                row.run_note = f"{row.run_note}; {self.stopped_early}".lstrip("; ")
        return self.rows

    def _cleanup(self) -> None:
        # Only the GPU needs it (cached blocks of the last case's tensors); on the CPU refcounting
        # already freed them and a full gc.collect costs ~0.3 s with torch imported.
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------
    # Rows
    # ---------------------------------------------------------------------------------------
    def _row(self, optimizer: str, backend: str, kind: str, case: C.Case | None, dtype: str, timing: Timing | None = None,
             *, status: str = "ok", nbytes: int | None = None, flops: int | None = None, peak_dtype: str | None = None,
             check_err: float | None = None, notes: str = "", case_name: str | None = None) -> Row:
        row = Row(optimizer, backend, kind, case_name or (case.name if case else ""), dtype,
                  case.numel if case else 0, case.tensors if case else 0, status, **self.env)
        row.notes, row.check_err = notes, check_err
        row.load_avg = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        if timing is not None:
            row.median_ms, row.p20_ms, row.p80_ms, row.reps = timing.median_ms, timing.p20_ms, timing.p80_ms, timing.reps
            if nbytes is not None:
                row.bytes = nbytes
                row.gbps = nbytes / (timing.median_ms * 1e6)
                if self.copy_gbps:
                    row.pct_of_peak = 100 * row.gbps / self.copy_gbps
                    row.peak = f"copy {self.copy_gbps:.3g} GB/s"
            if flops is not None:
                row.flops = flops
                row.tflops = flops / (timing.median_ms * 1e9)
                peak = self.matmul_tflops.get(peak_dtype or "")
                if peak:
                    row.pct_of_peak = 100 * row.tflops / peak
                    row.peak = f"matmul {peak_dtype} {peak:.3g} TFLOP/s"
        self.rows.append(row)
        if status == "ok":
            rate = f"{row.gbps:.2f} GB/s" if row.gbps is not None else f"{row.tflops:.3g} TFLOP/s" if row.tflops is not None else ""
            pct = f" ({row.pct_of_peak:.0f}% of peak)" if row.pct_of_peak is not None else ""
            bound = self.bound_ms.get((optimizer, row.case, dtype))
            if bound is not None and kind != "peak":
                pct += f" ({100 * bound / row.median_ms:.0f}% of bound)"
            self.progress.log(f"{optimizer:>14} {backend:>15}: {row.median_ms:9.3f} ms  {rate}{pct}")
        else:
            self.progress.log(f"{optimizer:>14} {backend:>15}: {status}: {notes[:150]}")
        return row

    def _fail(self, message: str) -> None:
        """A mupopt backend failed its check or raised: stop, unless --keep-going."""
        self.failures.append(message)
        if not self.config.keep_going:
            raise CheckFailed(message)

    # ---------------------------------------------------------------------------------------
    # Optimizers: every backend and peer of a subject on one set of tensors
    # ---------------------------------------------------------------------------------------
    def _backend_names(self, subject: Subject) -> list[str]:
        names = M.backend_names(subject.key)
        if self.config.backends is not None:
            names = [n for n in names if n in self.config.backends]
        # The reference is also a peer: timed when asked for either way.
        if "reference" in self.peers and "reference" not in names:
            names.append("reference")
        return names

    def _prepare(self, subject: Subject, name: str, kind: str, make: Callable[[list], torch.optim.Optimizer],
                 group: Group, params, start, reference, *, cost: M.Cost, check: bool = True,
                 case_name: str | None = None, must_match: bool = True, notes: str = "",
                 peer: Peer | None = None) -> "_Contender | Callable[[], Row]":
        """Check one implementation against the reference and make its first call: a contender
        ready to be timed, or (after a failure) the call that records its row. A failure of ours
        stops the run (unless --keep-going); a peer's is recorded, and a peer whose result
        differs is still timed, with the difference in its notes. A library peer steps gradients
        of its own (it may write them: pytorch-optimizer's Muon does), attached before each call."""
        what = f"{subject.key} backend {name!r}, case {case_name or group.case.name}, {group.dtype}"
        row = functools.partial(self._row, subject.key, name, kind, group.case, group.dtype, case_name=case_name)
        grads = [p.grad for p in params]
        own = peer is not None and peer.library != "torch"
        mine = [g.clone() for g in grads] if own else grads
        err = None
        try:
            if check:
                try:
                    err = M.check_optimizer(subject, make, params, start, reference, C.DTYPES[group.dtype], what, peer=peer)
                except CheckFailed as e:
                    if must_match:
                        differs = M.reference_rerun_differs(subject, params, start, reference)
                        if differs is not None:
                            raise CheckFailed(f"{e}; but the reference itself is not reproducible: a second run from the "
                                              f"same start differs in {differs}, so the reference, not this backend, "
                                              f"may be the wrong side") from e
                        raise
                    notes = _join(notes, f"MISMATCH vs reference: {e}")
            _attach(params, mine)
            try:
                opt, first = M.start_optimizer(peer or subject, make, params, self.timer.sync)
                if peer is not None and peer.compiled:
                    # HeavyBall's ADOPT compiles at its second call (its first only fills v): not in a timed one.
                    first += timed_first_call(lambda: peer.step(opt), self.timer.sync)
            finally:
                _attach(params, grads)
        except CheckFailed as e:
            self._fail(str(e))
            return functools.partial(row, status="failed", notes=f"CHECK FAILED: {e}")
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if must_match:
                self._fail(f"{what}: raised {msg}")
            return functools.partial(row, status="failed", notes=_join(notes, msg))
        if name == COMPILE_BACKEND:
            notes = _join(notes, f"first call (compilation) {first:.1f} s")
        elif peer is not None and peer.compiled:
            notes = _join(notes, f"first two calls (compilation) {first:.1f} s")
        nbytes, flops, peak = cost(params, M.cost_states(params, opt, peer))
        step = (peer or subject).step
        return _Contender(name, kind, functools.partial(step, opt), functools.partial(_attach, params, mine), row,
                          dict(nbytes=nbytes, flops=flops, peak_dtype=peak, check_err=err, notes=notes))

    def _time(self, contenders: Sequence["_Contender"]) -> None:
        """Time ready contenders in the same rounds (Timer.time_rounds); a call that raises marks
        its contender failed (its later calls do nothing) and the others go on."""
        if not contenders:
            return
        errors: dict[int, str] = {}

        def guarded(i: int, c: _Contender) -> Callable[[], None]:
            def call() -> None:
                if i in errors:
                    return
                try:
                    c.call()
                except Exception as e:  # noqa: BLE001: recorded in the row
                    errors[i] = f"raised while timed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return call

        timings = self.timer.time_rounds([guarded(i, c) for i, c in enumerate(contenders)], [c.setup for c in contenders])
        for i, (c, t) in enumerate(zip(contenders, timings)):
            c.timing, c.error, c.call = t, errors.get(i, ""), None  # drop the optimizer: its memory goes now

    def _memory_tight(self) -> bool:
        """On a GPU, whether to time what is ready before starting the next contender: all of a
        subject's contenders alive at once (params, grads, each its state) do not fit beside a
        Llama-1B list (1.24B params: 10 GB of AdamW state each)."""
        if self.device.type != "cuda":
            return False
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # ours to reuse
        return free + cached < 0.35 * total

    def _measure(self, subject: Subject, name: str, kind: str, make: Callable[[list], torch.optim.Optimizer],
                 group: Group, params, start, reference, **kw) -> None:
        """Prepare one implementation, time it alone and make its row."""
        ready = self._prepare(subject, name, kind, make, group, params, start, reference, **kw)
        if isinstance(ready, _Contender):
            self._time([ready])
            ready.record()
        else:
            ready()

    def _subject(self, subject: Subject, group: Group, params, *, cost: M.Cost, peers: Sequence[Peer] = (),
                 case_name: str | None = None, compile_peer: bool = True, only_peers: bool = False) -> None:
        """Every backend of ``subject`` and its peers on ``params``, checked one by one, then timed
        in the same rounds (Timer.time_rounds); the compile peer after them, alone (it registers
        a backend and resets dynamo for as long as it runs)."""
        # Timed steps move the params; every check starts from these values, as the reference did.
        start = [p.detach().clone() for p in params]
        grads = [p.grad for p in params]
        reference = M.reference_snapshot(subject, params, start)
        slots: list = []  # in row order: a _Contender, or the call that records a skipped/failed row
        pending: list[_Contender] = []

        def time_pending() -> None:
            self._time(pending)
            pending.clear()
            # The last call may have been a peer's, with its own gradients or none (HeavyBall drops them).
            _attach(params, grads)

        def add(slot) -> None:
            slots.append(slot)
            if isinstance(slot, _Contender):
                pending.append(slot)
                if self._memory_tight():
                    time_pending()

        for name in [] if only_peers else self._backend_names(subject):
            reason = M.unsupported(subject, name, params)
            if reason is not None:
                add(functools.partial(self._row, subject.key, name, "mupopt", group.case, group.dtype, status="skipped",
                                      notes=reason, case_name=case_name))
                continue
            add(self._prepare(subject, name, "mupopt", lambda ps, n=name: subject.make(ps, n), group, params, start,
                              reference, cost=cost, check=name != "reference", case_name=case_name))
        for peer in peers:
            if peer.name in self.peers:
                add(self._prepare_peer(subject, peer, group, params, start, reference, cost=cost, case_name=case_name))
        time_pending()
        for slot in slots:
            slot.record() if isinstance(slot, _Contender) else slot()
        if compile_peer and not only_peers and "compile" in self.peers:
            self._compile_peer(subject, group, params, start, reference, cost)

    def _prepare_peer(self, subject: Subject, peer: Peer, group: Group, params, start, reference, *, cost: M.Cost,
                      case_name: str | None) -> "_Contender | Callable[[], Row]":
        """A peer: skipped with the reason where it cannot run; else its equivalence with our
        subject (once per run, in float64: measure.equivalence) in its notes, then checked on this
        case if it is the same variant, and prepared."""
        row = functools.partial(self._row, subject.key, peer.name, "peer", group.case, group.dtype, case_name=case_name)
        reason = peer.unavailable(self.device) or (peer.refuses(subject, params) if peer.refuses else None)
        if reason is not None:
            return functools.partial(row, status="skipped", notes=reason)
        notes = f"{peer.library} {peer.version()}".strip() if peer.library != "torch" else ""
        label = self.equivalences.get(peer.name)
        if label is None:
            try:
                eq = M.equivalence(subject, peer, self.device, self.config.seed)
                label = eq.label(peer)
            except Exception as e:  # the peer fails on a plain float64 list: its error is the row
                label = f"equivalence run raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.equivalences[peer.name] = label
        notes = _join(notes, label)
        if label.startswith("equivalence run raised"):
            return functools.partial(row, status="failed", notes=notes)
        if peer.note:
            notes = _join(notes, peer.note)
        if peer.compiles:
            compiled = self.config.mode != "smoke" and len(params) <= self.compile_max
            peer = dataclasses.replace(peer, compiled=compiled)
            if compiled:
                import torch._dynamo

                torch._dynamo.reset()  # every case is a new list: past cache_size_limit dynamo runs eager silently
                notes = _join(notes, "its torch.compile path")
            else:
                why = ("--smoke compiles nothing" if self.config.mode == "smoke" else
                       f"{len(params)} tensors > --compile-max-tensors {self.compile_max}: it compiles each fused "
                       f"function for the whole list (109 s for GPT-2/8's 148 tensors on 2 shared CPU cores)")
                notes = _join(notes, f"eager ({why})")
        return self._prepare(subject, peer.name, "peer", lambda ps: peer.make(ps, subject), group, params, start,
                             reference, cost=cost, check=peer.same_variant, case_name=case_name, must_match=False,
                             notes=notes, peer=peer)

    def _compile_peer(self, subject: Subject, group: Group, params, start, reference, cost: M.Cost) -> None:
        skip = None
        if subject.key not in self.compile_optimizers:
            chosen = ", ".join(sorted(self.compile_optimizers))
            skip = (f"{self.config.mode} mode compiles " + (f"{chosen} only" if chosen else "nothing") +
                    " (--compile-optimizers): a compilation takes 6-15 s on 2 CPU cores")
        elif len(params) > self.compile_max:
            skip = (f"{len(params)} tensors > --compile-max-tensors {self.compile_max}: inductor unrolls the per-tensor "
                    f"loop (10 s of compilation for 20 tensors on 2 CPU cores)")
        if skip:
            self._row(subject.key, COMPILE_BACKEND, "peer", group.case, group.dtype, status="skipped", notes=skip)
            return
        try:
            with compiled_reference(subject.compile_keys):
                self._measure(subject, COMPILE_BACKEND, "peer", lambda ps: subject.make(ps, COMPILE_BACKEND), group, params,
                              start, reference, cost=cost, must_match=False, notes="torch.compile(reference)")
        except Exception as e:  # torch.compile itself unusable here (no compiler, unsupported platform)
            self._row(subject.key, COMPILE_BACKEND, "peer", group.case, group.dtype, status="failed",
                      notes=f"torch.compile unavailable: {type(e).__name__}: {e}")

    # ---------------------------------------------------------------------------------------
    # Groups
    # ---------------------------------------------------------------------------------------
    def _group_peaks(self, group: Group) -> None:
        n = copy_numel(self.device, self.config.mode)
        t, nbytes = measure_copy(self.timer, n)
        self.copy_gbps = nbytes / (t.median_ms * 1e6)
        notes = "torch copy_, read + write counted"
        if self.device.type == "cpu":
            notes += ("; on a CPU stores also read their lines (write-allocate, timing.measure_copy), so an in-place "
                      "step can exceed 100%; measured again before each group of rows")
        self._row("copy", "torch.copy_", "peak", C.Case(f"copy-{n}", ((n,),)), "fp32", t, nbytes=nbytes, notes=notes)
        n = matmul_n(self.device, self.config.mode)
        for dt in ("fp32", "bf16"):
            t, flops = measure_matmul(self.timer, n, C.DTYPES[dt])
            self.matmul_tflops[dt] = flops / (t.median_ms * 1e9)
            notes = f"allow_tf32={torch.backends.cuda.matmul.allow_tf32}" if dt == "fp32" and self.device.type == "cuda" else ""
            self._row("matmul", "torch.matmul", "peak", C.Case(f"matmul-{n}", ((n, n),)), dt, t, flops=flops, peak_dtype=dt, notes=notes)

    def _refresh_peak(self, dtype: str | None = None) -> None:
        """Measure the peak a group's rows are divided by again, next to them: on a shared CPU the
        neighbours' load changes it several-fold within a run (timing.py). The rows' peak column
        says which value they used."""
        if self.config.mode == "smoke":
            return
        quick = Timer(self.device, BUDGETS["quick"])
        if dtype is None:
            t, nbytes = measure_copy(quick, copy_numel(self.device, self.config.mode))
            self.copy_gbps = nbytes / (t.median_ms * 1e6)
        else:
            t, flops = measure_matmul(quick, matmul_n(self.device, self.config.mode), C.DTYPES[dtype])
            self.matmul_tflops[dtype] = flops / (t.median_ms * 1e9)

    def _group_elementwise(self, group: Group) -> None:
        self._refresh_peak()
        params = C.make_params(group.case.shapes, C.DTYPES[group.dtype], self.device, self.config.seed)
        # torch's AdamW is the yardstick of every elementwise optimizer: measured once, filed
        # under adamw, compared against by every row of this case and dtype.
        for key in group.keys:
            self._bound(key, group, params)
            self._subject(SUBJECTS[key], group, params, cost=M.elementwise_cost(key), peers=peers_of(key))
        torch_adamw = _torch_adamw_peers(self.peers)
        if "adamw" not in group.keys and torch_adamw:
            # Our AdamW not selected: its torch peers still give every row its ratio columns.
            self._bound("adamw", group, params)
            self._subject(SUBJECTS["adamw"], group, params, cost=M.elementwise_cost("adamw"), peers=torch_adamw,
                          only_peers=True)

    def _bound(self, key: str, group: Group, params) -> None:
        """The CPU's no-math bound of ``key``'s bytes on this case (measure.traffic_bound), timed
        just before ``key``'s rows: a row of kind "peak" under ``key`` by which every row of this
        optimizer, case and dtype is divided (pct_of_bound). Nothing on other devices, nor when
        --backends leaves out "cpu" (the bound runs that backend's loops: no build for it)."""
        if self.device.type != "cpu" or (self.config.backends is not None and "cpu" not in self.config.backends):
            return
        fn = M.traffic_bound(key, params)
        if isinstance(fn, str):
            self._row(key, M.BOUND, "peak", group.case, group.dtype, status="skipped", notes=fn)
            return
        timing = self.timer.time(fn)
        row = self._row(key, M.BOUND, "peak", group.case, group.dtype, timing, nbytes=fn.nbytes,
                        notes="this optimizer's passes with no math, same table, chunks, threads and loops as "
                              "backend 'cpu' (csrc/cpu/traffic.cpp)")
        self.bound_ms[(key, group.case.name, group.dtype)] = row.median_ms

    def _group_overhead(self, group: Group) -> None:
        """Issue 15: host time of a whole step() on many tiny tensors, every elementwise optimizer
        and backend against torch's AdamW (fused, foreach) in the same run. One torch thread, warm
        caches, steps back to back (timing.LoopTimer); each row's notes give us per tensor."""
        threads = torch.get_num_threads()
        timer, self.timer = self.timer, LoopTimer(self.device, self.timer.budget)
        first = len(self.rows)
        try:
            if self.device.type == "cpu":
                torch.set_num_threads(1)
            params = C.make_params(group.case.shapes, C.DTYPES[group.dtype], self.device, self.config.seed)
            for key in group.keys:
                self._subject(SUBJECTS[key], group, params, cost=_no_cost, peers=peers_of(key), compile_peer=False)
            torch_adamw = _torch_adamw_peers(self.peers)
            if "adamw" not in group.keys and torch_adamw:
                self._subject(SUBJECTS["adamw"], group, params, cost=_no_cost, peers=torch_adamw, only_peers=True)
        finally:
            self.timer = timer
            torch.set_num_threads(threads)
        for row in self.rows[first:]:
            if row.status == "ok":
                per = 1e3 * row.median_ms / max(1, row.tensors)
                how = f"{per:.3g} us per tensor per step; host time, " + (
                    "1 torch thread, " if self.device.type == "cpu" else "") + "warm, steps back to back"
                row.notes = _join(row.notes, how)
                if self.device.type == "cpu":
                    row.threads = 1

    def _group_mup(self, group: Group) -> None:
        """AdamW with a different lr and eps multiplier per tensor against all multipliers 1, on
        the same tensors (target: <= 1.02x the time, i.e. ratio_to_uniform_lr >= 0.98)."""
        self._refresh_peak()
        params = C.make_params(group.case.shapes, C.DTYPES[group.dtype], self.device, self.config.seed)
        subject = with_scale_eps(SUBJECTS["adamw"])
        base = group.case.name[: -len(".mup")]
        try:
            for distinct, name in ((False, f"{base}.uniform"), (True, group.case.name)):
                C.set_mup_widths(params, distinct)
                self._subject(subject, group, params, cost=M.elementwise_cost("adamw"), case_name=name, compile_peer=False)
        finally:
            C.clear_mup_widths(params)

    def _group_lean(self, group: Group) -> None:
        """AdamW with the memory-lean options (docs/lean-states.md) on the GPT-2 list, every
        backend that steps them: state_bits 16 and 8, and on bf16 params stochastic rounding
        alone and with 8-bit states. Each variant is its own case (``<list>.states8``, ...); its
        bytes are the states' own (uint8 codes, bf16), so pct_of_peak is against the format's
        bytes. torch's AdamW on the same list is the elementwise group's row of the base case."""
        self._refresh_peak()
        params = C.make_params(group.case.shapes, C.DTYPES[group.dtype], self.device, self.config.seed)
        base = group.case.name[: -len(".lean")]
        variants = {"states16": {"state_bits": 16}, "states8": {"state_bits": 8}}
        if group.dtype == "bf16":
            variants.update({"sr": {"stochastic_rounding": True},
                             "sr-states8": {"stochastic_rounding": True, "state_bits": 8}})
        adamw = SUBJECTS["adamw"]
        for name, options in variants.items():
            subject = dataclasses.replace(adamw, kwargs={**adamw.kwargs, **options})
            self._subject(subject, group, params, cost=M.elementwise_cost("adamw"), case_name=f"{base}.{name}",
                          compile_peer=False)

    def _group_muon(self, group: Group) -> None:
        self._refresh_peak("bf16")
        params = C.make_params(group.case.shapes, C.DTYPES[group.dtype], self.device, self.config.seed)
        self._subject(SUBJECTS["muon"], group, params, cost=M.muon_cost(group.case.shapes), peers=peers_of("muon"))

    def _group_shampoo(self, group: Group) -> None:
        self._refresh_peak("fp32")
        params = C.make_params(group.case.shapes, C.DTYPES[group.dtype], self.device, self.config.seed)
        subject = shampoo_subject(self.profile.shampoo_max_dim)
        # eigh breaks the graph: there is nothing for inductor to fuse, so no compile peer.
        self._subject(subject, group, params, cost=M.shampoo_cost(subject, params), peers=peers_of("shampoo"),
                      compile_peer=False)

    def _group_ns(self, group: Group) -> None:
        self._refresh_peak(group.dtype)
        self._matrix(group, M.ns_setup(group.case, group.dtype, self.device, self.config.seed))

    def _group_roots(self, group: Group) -> None:
        self._refresh_peak("fp32")
        self._matrix(group, M.roots_setup(group.case, self.device, self.config.seed))

    def _matrix(self, group: Group, setup: M.MatrixSetup) -> None:
        optimizer = group.keys[0]
        for name, why in setup.skipped.items():
            if name in self.peers:
                self._row(optimizer, name, "peer", group.case, group.dtype, status="skipped", notes=why)
        for name, (kind, fn, must, flops) in setup.impls.items():
            if kind == "peer" and name not in self.peers:
                continue
            what = f"{optimizer} {name!r}, case {group.case.name}, {group.dtype} (against {setup.reference_name})"
            row = functools.partial(self._row, optimizer, name, kind, group.case, group.dtype)
            try:
                err = compare_tensors(setup.reference, fn(), setup.tol, what)
                self.timer.sync()
                timing = self.timer.time(fn)
            except Exception as e:
                msg = str(e) if isinstance(e, CheckFailed) else f"{what}: raised {type(e).__name__}: {e}"
                if must:
                    self._fail(msg)
                row(status="failed", notes=msg)
                continue
            row(timing, flops=flops, peak_dtype="bf16" if group.dtype == "bf16" else "fp32", check_err=err)


@dataclass
class _Contender:
    """One implementation of a subject, checked and past its first call, waiting to be timed
    with the others (Runner._time); ``record`` makes its row."""

    name: str
    kind: str
    call: Callable[[], None] | None  # one timed call (None once timed: the optimizer is released)
    setup: Callable[[], None]  # attaches the gradients it steps with, before each call (untimed)
    row: Callable[..., Row]
    row_kwargs: dict
    timing: Timing | None = None
    error: str = ""

    def record(self) -> Row:
        if self.error:
            return self.row(status="failed", notes=_join(self.row_kwargs["notes"], self.error))
        return self.row(self.timing, **self.row_kwargs)


def _attach(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def _torch_adamw_peers(selected: set[str]) -> list[Peer]:
    return [p for p in peers_of("adamw") if p.library == "torch" and p.name in selected]


def _no_cost(params, states) -> tuple[None, None, None]:
    """The overhead cases count time, not bytes."""
    return None, None, None


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


# --------------------------------------------------------------------------------------------
# After the run: ratios and targets
# --------------------------------------------------------------------------------------------
def _ok(row: Row) -> bool:
    return row.status == "ok" and row.median_ms is not None and row.median_ms > 0


def finish(rows: list[Row], device_type: str, targets: bool = True) -> None:
    """Fill the ratio columns (peer median / row median, peers of the same case and dtype) and
    the targets of docs/benchmarks.md (not for smoke runs, whose numbers mean nothing)."""
    by_key: dict[tuple, Row] = {}
    for r in rows:
        if _ok(r):
            by_key[(r.optimizer, r.case, r.dtype, r.backend)] = r
    for r in rows:
        if not _ok(r) or r.kind == "peak":
            continue
        bound = by_key.get((r.optimizer, r.case, r.dtype, M.BOUND))
        if bound is not None:
            r.pct_of_bound = 100 * bound.median_ms / r.median_ms
        for peer, column in RATIO_COLUMNS.items():
            # torch's AdamW peers are filed under adamw and serve every elementwise optimizer.
            owner = "adamw" if peer in ("torch-fused", "torch-foreach") and r.optimizer in ELEMENTWISE else r.optimizer
            p = by_key.get((owner, r.case, r.dtype, peer))
            if p is not None:
                setattr(r, column, p.median_ms / r.median_ms)
        if r.optimizer in ELEMENTWISE and r.optimizer != "adamw":
            a = by_key.get(("adamw", r.case, r.dtype, r.backend))
            if a is not None:
                r.ratio_to_adamw = a.median_ms / r.median_ms
        if r.case.endswith(".mup"):
            u = by_key.get((r.optimizer, r.case[: -len(".mup")] + ".uniform", r.dtype, r.backend))
            if u is not None:
                r.ratio_to_uniform_lr = u.median_ms / r.median_ms
        target = target_for(r, device_type) if targets else None
        if target is not None:
            r.target, r.meets_target = target


# (optimizer, case predicate, device type or None, dtype or None, [(column, minimum, label)])
def _targets():
    gpu = "cuda"
    overhead = [(opt, lambda c: c.startswith("overhead-"), "cpu", "fp32",
                 [("ratio_to_torch_fused", 4.0, "host time <= 0.25x torch fused (issue 15)")])
                for opt in ("adamw", "adopt", "lamb", "sophia")]
    return overhead + [
        ("adamw", lambda c: c == "large", gpu, "fp32",
         [("pct_of_peak", 90.0, ">= 90% of copy"), ("ratio_to_torch_fused", 1.0, ">= 1.0x torch fused")]),
        ("adamw", lambda c: c == "llama-1b", gpu, None,
         [("ratio_to_torch_fused", 1.0, ">= 1.0x torch fused"), ("pct_of_peak", 85.0, ">= 85% of copy")]),
        ("adamw", lambda c: c.startswith("tiny-1000"), gpu, None,
         [("ratio_to_torch_fused", 1.0, ">= 1.0x torch fused"), ("ratio_to_torch_foreach", 5.0, ">= 5x foreach")]),
        ("adamw", lambda c: c.endswith(".mup"), None, None, [("ratio_to_uniform_lr", 1 / 1.02, "<= 1.02x uniform-lr time")]),
        ("adopt", lambda c: not c.endswith((".mup", ".uniform")), None, None, [("ratio_to_adamw", 1 / 1.05, "<= 1.05x our AdamW time")]),
        ("sophia", lambda c: True, None, None, [("ratio_to_adamw", 1 / 0.9, "<= 0.9x our AdamW time")]),
        ("lamb", lambda c: True, None, None, [("ratio_to_adamw", 1 / 1.5, "<= 1.5x our AdamW time")]),
        ("ns", lambda c: True, gpu, "bf16", [("ratio_to_torch_ns", 1.3, ">= 1.3x torch NS")]),
        ("muon", lambda c: c.startswith("gpt2-small"), None, None, [("ratio_to_torch_muon", 1.5, ">= 1.5x torch.optim.Muon")]),
        ("roots", lambda c: True, None, None, [("ratio_to_eigh_loop", 2.0, ">= 2x per-block eigh loop")]),
        ("adamw", lambda c: c == "large", "cpu", "fp32",
         [("ratio_to_torch_fused", 1.0, ">= 1.0x torch fused"), ("ratio_to_reference", 10.0, ">= 10x reference")]),
    ]


def target_for(row: Row, device_type: str) -> tuple[str, bool] | None:
    """The docs/benchmarks.md target of a row of one of our compiled implementations (the reference
    is the spec, not a contender), as (text, met)."""
    if row.kind != "mupopt" or row.backend == "reference":
        return None
    if row.optimizer == "ns" and not min(_dims(row.case)) >= 2048:
        return None
    if row.optimizer == "adamw" and row.case == "large" and device_type == "cpu" and row.numel < (1 << 24):
        return None  # the CPU target is stated at 16M params
    for opt, pred, dev, dtype, checks in _targets():
        if opt == row.optimizer and pred(row.case) and dev in (None, device_type) and dtype in (None, row.dtype):
            met, labels = True, []
            for column, minimum, label in checks:
                value = getattr(row, column)
                labels.append(label)
                met = met and value is not None and value >= minimum
            return "; ".join(labels), met
    return None


def _dims(case: str) -> list[int]:
    """Matrix sides in a Newton-Schulz case name ("ns-4096x4096", "ns-8x2048x8192")."""
    parts = case.split("-", 1)[-1].split("x")
    dims = [int(x) for x in parts if x.isdigit()]
    return dims[-2:] if len(dims) >= 2 else [0]


def rows_as_dicts(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


def run(config: Config, progress: bool = True) -> tuple[list[Row], list[str]]:
    """Run the benchmark; returns (rows, failures). Raises CheckFailed on the first failing check
    of one of our backends unless ``config.keep_going``."""
    runner = Runner(config, progress)
    rows = runner.run()
    return rows, runner.failures
