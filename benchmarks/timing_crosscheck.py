"""Issue 16 item 1: why `mupopt bench` and benchmarks/tune_triton.py disagree on absolute GPU times,
settled in one short GPU call.

    PYTHONPATH=$PWD python benchmarks/timing_crosscheck.py [--rows 5] [--json FILE]
    PYTHONPATH=$PWD bash benchmarks/gpu_check.sh OUT crosscheck          # the same, as a stage

One AdamW step on one 2^26-element fp32 tensor (28 B/element: 1.9 GB per step, about 30 times an
H200's L2) for torch's fused AdamW and our ``cuda`` and ``triton`` backends, each timed by:

- ``timer``: ``mupopt.bench.timing.Timer`` as both harnesses use it (zero a 256 MB buffer,
  synchronise, CUDA events around the whole ``step()`` call): the host work of ``step()`` before its
  first kernel is inside the interval, with the GPU idle;
- ``events``: the same flush and events but no synchronisation before the start event (the host
  enqueues ``step()`` while the GPU still zeroes the flush buffer), then one synchronisation at the
  end: device time, the host work hidden as in a training loop;
- ``do_bench``: ``triton.testing.do_bench`` (its own L2 clearing, warm-up and repetitions; p20,
  median, p80);
- ``host``: ``time.perf_counter`` around ``step()`` after a synchronisation, no synchronisation
  after it: the host time to enqueue one step, i.e. what ``timer`` has in its interval before the
  GPU can start.

Each contender is measured in ``--rows`` independent rows, round robin (row r of every contender,
then row r+1; every other round in reverse order), each row a fresh optimizer (fresh state tensors) on a fresh param/grad set per
round, as `mupopt bench` gives each row fresh state; the first row's optimizer of each contender is
kept and timed again in every later round (``same`` series). The spread between rows against the
spread within a row (p20..p80 of one Timer call) says whether single rows, as both harnesses report
them, can be compared at all; fresh against same says whether the allocation or the time moves them.
The copy bandwidth ("% of copy" divides by it) is measured with each method too.

Then both harnesses themselves, twice each and alternated (bench, tune, bench, tune), in this one
process: ``mupopt.bench.runner.Runner`` restricted to AdamW on the "large" case (cuda, triton,
torch-fused) and ``tune_triton.sweep`` at the current BLOCK x warps. GPU clocks, power and
temperature are read (never set) around every phase through nvidia-smi.

Prints a table last and the ratios that decide the question: bench/tune per contender against
the between-row spread, timer/events (the host part of the Timer's interval), timer/do_bench.
Without CUDA it says so and exits 0; ``--device cpu --smoke`` runs the machinery on tiny CPU
tensors (torch fused and the reference; no events, no do_bench, no harness runs) for the tests.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from mupopt.bench import cases as C
from mupopt.bench import model, subjects, timing

NUMEL = 1 << 26
GPU_CONTENDERS = ("torch-fused", "cuda", "triton")
CPU_CONTENDERS = ("torch-fused", "reference")
METHODS = ("timer", "events", "do_bench", "host")


# --------------------------------------------------------------------------------------------
# Records and their analysis (pure: tested on the CPU with made-up numbers)
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One row: one contender, one method, one optimizer instance, one round."""

    contender: str
    method: str
    series: str  # "fresh" (new optimizer, new state) or "same" (round 0's optimizer again)
    round: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    nbytes: int | None = None
    gpu: dict = field(default_factory=dict)  # clocks etc. read just before


def spread(xs: Sequence[float]) -> float:
    """(max - min) / median; 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    return (max(xs) - min(xs)) / statistics.median(xs)


def summarize(samples: Sequence[Sample]) -> list[dict]:
    """Per (contender, method, series): median of the row medians, their min and max, the
    between-row spread and the median within-row spread ((p80 - p20) / median)."""
    keys = sorted({(s.contender, s.method, s.series) for s in samples})
    out = []
    for contender, method, series in keys:
        rows = [s for s in samples if (s.contender, s.method, s.series) == (contender, method, series)]
        meds = [s.median_ms for s in rows]
        within = [(s.p80_ms - s.p20_ms) / s.median_ms for s in rows if s.median_ms > 0]
        out.append(dict(contender=contender, method=method, series=series, rows=len(rows),
                        median_ms=statistics.median(meds), min_ms=min(meds), max_ms=max(meds),
                        between=spread(meds), within=statistics.median(within) if within else 0.0,
                        nbytes=rows[0].nbytes))
    return out


def pct_of_copy(summary: Sequence[dict], copy_ms: dict[str, float], copy_bytes: int) -> None:
    """Add ``pct_of_copy`` to every summary row: its GB/s over the copy's, the copy timed by the
    same method (``copy_ms[method]``)."""
    for r in summary:
        c = copy_ms.get(r["method"])
        if r["nbytes"] and c:
            r["pct_of_copy"] = 100.0 * (r["nbytes"] / r["median_ms"]) / (copy_bytes / c)


def harness_medians(bench_rows: Sequence[dict], tune_rows: Sequence[dict]) -> tuple[dict[str, dict], dict[str, list]]:
    """From `mupopt bench` rows (runner Row dicts; AdamW, case "large", fp32 counted) and
    tune_triton rows: ({contender: {"bench": [ms, ...], "tune": [ms, ...]}}, {"bench": [copy GB/s
    each AdamW row was divided by], "tune": [...]}), one entry per row in run order."""
    times: dict[str, dict] = {}
    copies: dict[str, list] = {"bench": [], "tune": []}
    for r in bench_rows:
        if r.get("status") != "ok" or (r["optimizer"], r["case"], r["dtype"]) != ("adamw", "large", "fp32"):
            continue
        times.setdefault(r["backend"], {"bench": [], "tune": []})["bench"].append(r["median_ms"])
        if r.get("pct_of_peak"):
            copies["bench"].append(100.0 * r["gbps"] / r["pct_of_peak"])
    for r in tune_rows:
        if r["optimizer"] != "adamw":
            continue
        times.setdefault(r["backend"], {"bench": [], "tune": []})["tune"].append(r["median_ms"])
        copies["tune"].append(r["copy_gbps"])
    return times, copies


def verdicts(summary: Sequence[dict], times: dict[str, dict], copies: dict[str, list] | None = None) -> list[str]:
    """The sentences the numbers support, one per finding, each with its numbers."""
    by = {(r["contender"], r["method"], r["series"]): r for r in summary}
    lines = []
    for contender in sorted({r["contender"] for r in summary}):
        t = by.get((contender, "timer", "fresh"))
        if t is None:
            continue
        parts = [f"{contender}: timer {t['median_ms']:.3f} ms (rows {t['min_ms']:.3f}-{t['max_ms']:.3f}, "
                 f"between-row spread {100 * t['between']:.0f}% vs within-row {100 * t['within']:.0f}%)"]
        for method in ("events", "do_bench"):
            m = by.get((contender, method, "fresh"))
            if m is not None:
                parts.append(f"timer/{method} {t['median_ms'] / m['median_ms']:.2f}x")
        h = by.get((contender, "host", "fresh"))
        if h is not None:
            parts.append(f"host enqueue {h['median_ms']:.3f} ms = {100 * h['median_ms'] / t['median_ms']:.0f}% of timer")
        s = by.get((contender, "timer", "same"))
        if s is not None:
            parts.append(f"same instance re-timed: spread {100 * s['between']:.0f}%")
        lines.append("; ".join(parts))
    for contender, d in sorted(times.items()):
        if d["bench"] and d["tune"]:
            b, tu = statistics.median(d["bench"]), statistics.median(d["tune"])
            t = by.get((contender, "timer", "fresh"))
            noise = f" (between-row spread of its timer rows {100 * t['between']:.0f}%)" if t else ""
            lines.append(f"{contender}: mupopt bench {_ms(d['bench'])} vs tune_triton {_ms(d['tune'])}: "
                         f"bench/tune {b / tu:.2f}x{noise}")
    if copies and (copies["bench"] or copies["tune"]):
        lines.append("copy GB/s divided by: bench " + ", ".join(f"{g:.0f}" for g in dict.fromkeys(copies["bench"])) +
                     "; tune " + ", ".join(f"{g:.0f}" for g in dict.fromkeys(copies["tune"])))
    return lines


def _ms(xs: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in xs) + "] ms"


def format_summary(summary: Sequence[dict]) -> str:
    lines = [f"{'contender':<12} {'method':<9} {'series':<6} {'rows':>4} {'median ms':>10} {'min':>8} {'max':>8}"
             f" {'between':>8} {'within':>7} {'% copy':>7}"]
    for r in summary:
        pct = f"{r['pct_of_copy']:.0f}%" if "pct_of_copy" in r else ""
        lines.append(f"{r['contender']:<12} {r['method']:<9} {r['series']:<6} {r['rows']:>4} {r['median_ms']:>10.3f}"
                     f" {r['min_ms']:>8.3f} {r['max_ms']:>8.3f} {100 * r['between']:>7.0f}% {100 * r['within']:>6.0f}% {pct:>7}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Measurement methods
# --------------------------------------------------------------------------------------------
def time_timer(timer: timing.Timer, fn: Callable[[], object]) -> tuple[float, float, float]:
    """Both harnesses' way: mupopt.bench.timing.Timer.time."""
    t = timer.time(fn)
    return t.median_ms, t.p20_ms, t.p80_ms


def time_events(timer: timing.Timer, fn: Callable[[], object], reps: int = 20) -> tuple[float, float, float]:
    """Flush, start event, fn, end event per repetition, with no synchronisation before the start
    event: the host enqueues fn while the GPU still works on the flush, so the interval is the
    device's (launch gaps included only where the host falls behind)."""
    fn()
    timer.sync()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        timer.flush()
        starts[i].record()
        fn()
        ends[i].record()
    timer.sync()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_do_bench(fn: Callable[[], object]) -> tuple[float, float, float]:
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(fn, quantiles=[0.2, 0.5, 0.8])
    return p50, p20, p80


def time_host(timer: timing.Timer, fn: Callable[[], object], reps: int = 20) -> tuple[float, float, float]:
    """Host time of the call alone (on a GPU: enqueueing it), each after a synchronisation."""
    xs = []
    for _ in range(reps):
        timer.sync()
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    timer.sync()
    return _quantiles(xs)


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    s = timing.summarize(xs)
    return s.median_ms, s.p20_ms, s.p80_ms


def methods_for(device: torch.device) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("timer", "host")  # no events; do_bench needs a GPU
    try:
        import triton.testing  # noqa: F401
    except ImportError:
        return ("timer", "events", "host")
    return METHODS


def gpu_state() -> dict:
    """Clocks, power, temperature and throttle reasons as nvidia-smi reports them (read only)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    base = "clocks.sm,clocks.mem,power.draw,temperature.gpu"
    # The throttle field's name changed across drivers; an unknown field fails the whole query.
    for extra in (",clocks_event_reasons.active", ",clocks_throttle_reasons.active", ""):
        try:
            res = subprocess.run([exe, f"--query-gpu={base}{extra}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return {}
        out = res.stdout.strip().splitlines()
        if res.returncode == 0 and out:
            vals = [v.strip() for v in out[0].split(",")]
            return dict(zip(("sm_mhz", "mem_mhz", "power_w", "temp_c", "throttle"), vals))
    return {}


# --------------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------------
def make_optimizer(contender: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if contender == "torch-fused":
        return subjects.PEERS_BY_NAME["torch-fused"].make(params)
    return subjects.SUBJECTS["adamw"].make(params, contender)


def available(contenders: Sequence[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(contenders that can run here, {contender: why not})."""
    from mupopt.bench.measure import unsupported

    probe = C.make_params([(64,)], torch.float32, device)
    ok, skipped = [], {}
    for c in contenders:
        reason = None if c == "torch-fused" else unsupported(subjects.SUBJECTS["adamw"], c, probe)
        if reason is None:
            ok.append(c)
        else:
            skipped[c] = reason
    return ok, skipped


def measure_rows(device: torch.device, contenders: Sequence[str], methods: Sequence[str], rows: int, numel: int,
                 mode: str, errors: list[str], log: Callable[[str], None] = print
                 ) -> tuple[list[Sample], dict[str, float], int]:
    """Round robin over contenders, ``rows`` rounds; returns the samples, the copy time per
    method and the copy's bytes; what raised goes to ``errors``."""
    timer = timing.Timer(device, timing.BUDGETS[mode])
    src = torch.randn(timing.copy_numel(device, mode), device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    copy()
    copy_ms = {}
    for method in methods:
        if method != "host":
            got = _try(method, timer, copy, "copy", errors, log)
            if got is not None:
                copy_ms[method] = got[0]
    copy_bytes = model.copy_bytes(src)
    del src, dst, copy
    samples: list[Sample] = []
    kept: dict[str, torch.optim.Optimizer] = {}
    for r in range(rows):
        params = C.make_params([(numel,)], torch.float32, device, seed=r)
        # Read once per round (nvidia-smi takes ~0.1 s: the GPU idles meanwhile), kept with each row.
        state = gpu_state() if device.type == "cuda" else {}
        # Every other round in reverse order: an effect of the position in the round shows.
        for contender in (contenders if r % 2 == 0 else list(reversed(contenders))):
            try:
                opt = make_optimizer(contender, params)
                step = opt.step
                step()  # state, compilation
                timer.sync()
            except Exception as e:
                errors.append(f"round {r} {contender}: first step raised {type(e).__name__}: {e}")
                log(errors[-1])
                continue
            nbytes = model.step_bytes("adamw", params, [opt.state[p] for p in params])
            for method in methods:
                got = _try(method, timer, step, f"round {r} {contender}", errors, log)
                if got is not None:
                    samples.append(Sample(contender, method, "fresh", r, *got, nbytes, state))
            if r == 0:
                kept[contender] = opt
            elif contender in kept:
                got = _try("timer", timer, kept[contender].step, f"round {r} {contender} (same)", errors, log)
                if got is not None:
                    samples.append(Sample(contender, "timer", "same", r, *got, nbytes))
            del opt, step
            log(f"round {r} {contender}: " + ", ".join(f"{s.method} {s.median_ms:.3f}" for s in samples
                                                       if s.round == r and s.contender == contender))
        del params
    if rows > 1:  # the kept instances' own first row, so "same" has as many rows as "fresh"
        samples += [Sample(s.contender, "timer", "same", 0, s.median_ms, s.p20_ms, s.p80_ms, s.nbytes)
                    for s in samples if s.round == 0 and s.method == "timer" and s.series == "fresh"]
    kept.clear()
    return samples, copy_ms, copy_bytes


def _try(method: str, timer: timing.Timer, fn: Callable[[], object], what: str, errors: list[str],
         log: Callable[[str], None]) -> tuple[float, float, float] | None:
    """_run_method, or None with the error written down: one failing method leaves the others'
    numbers in the one GPU call."""
    try:
        return _run_method(method, timer, fn)
    except Exception as e:
        errors.append(f"{what} {method}: raised {type(e).__name__}: {e}")
        log(errors[-1])
        return None


def _run_method(method: str, timer: timing.Timer, fn: Callable[[], object]) -> tuple[float, float, float]:
    if method == "timer":
        return time_timer(timer, fn)
    if method == "events":
        return time_events(timer, fn)
    if method == "do_bench":
        return time_do_bench(fn)
    if method == "host":
        return time_host(timer, fn)
    raise ValueError(method)


# --------------------------------------------------------------------------------------------
# The two harnesses, as they are
# --------------------------------------------------------------------------------------------
def bench_style(device: torch.device, contenders: Sequence[str], mode: str) -> list[dict]:
    """`mupopt bench --quick --optimizers adamw --cases large --dtypes fp32` with our backends
    and torch fused only (no reference, foreach, compile): its copy, its rows."""
    from mupopt.bench.runner import Config, Runner, rows_as_dicts

    ours = [c for c in contenders if c != "torch-fused"]
    config = Config(device=device.type, mode=mode, optimizers=["adamw"], backends=ours, peers=["torch-fused"],
                    cases=["large"], dtypes=["fp32"], compile_optimizers=[])
    return rows_as_dicts(Runner(config, progress=False).run())


def tune_style(device: torch.device, numel: int, mode: str) -> list[dict]:
    """benchmarks/tune_triton.py's sweep at the current BLOCK x warps, AdamW, one tensor."""
    tune = _load_tune()
    from mupopt.kernels.triton import _common

    return tune.sweep(device, [(numel,)], [(_common.BLOCK, _common.NUM_WARPS)], ["adamw"], mode)


def _load_tune():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tune_triton.py")
    spec = importlib.util.spec_from_file_location("tune_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=5, help="rounds of fresh rows per contender (default 5)")
    parser.add_argument("--numel", type=int, default=NUMEL, help="elements of the one fp32 tensor (default 2^26)")
    parser.add_argument("--harness-runs", type=int, default=2, help="bench/tune alternations (default 2; 0: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, smoke budgets: the machinery only")
    parser.add_argument("--json", default=None, help="write samples, summary, harness rows and verdicts here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("timing_crosscheck: skipped: no CUDA device here (this script times GPU kernels; "
              "--device cpu --smoke runs its machinery)")
        return 0
    mode = "smoke" if args.smoke else "quick"
    numel = min(args.numel, 1 << 12) if args.smoke else args.numel

    import mupopt.kernels.cpp as cpp_backend
    from mupopt.kernels import triton as triton_backend

    triton_backend.register()
    cpp_backend.register()
    contenders, skipped = available(GPU_CONTENDERS if device.type == "cuda" else CPU_CONTENDERS, device)
    methods = methods_for(device)
    for c, why in skipped.items():
        print(f"{c}: skipped: {why}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    import triton

    header = (f"{name}; torch {torch.__version__}, triton {triton.__version__}; {date}; one fp32 tensor of {numel} "
              f"elements, AdamW; {args.rows} rounds; methods {', '.join(methods)}")
    print(header, flush=True)
    states = {"start": gpu_state() if device.type == "cuda" else {}}
    errors: list[str] = []
    samples, copy_ms, copy_bytes = measure_rows(device, contenders, methods, args.rows, numel, mode, errors)
    states["after_rows"] = gpu_state() if device.type == "cuda" else {}
    summary = summarize(samples)
    pct_of_copy(summary, copy_ms, copy_bytes)

    bench_rows: list[dict] = []
    tune_rows: list[dict] = []
    harness_log = []
    if device.type == "cuda" and args.harness_runs > 0:
        for k in range(args.harness_runs):
            for style in ("bench", "tune"):
                t0 = time.perf_counter()
                try:
                    rows = bench_style(device, contenders, mode) if style == "bench" else tune_style(device, numel, mode)
                except Exception as e:  # one harness failing still leaves the other's numbers
                    harness_log.append(f"{style} run {k}: raised {type(e).__name__}: {e}")
                    continue
                for r in rows:
                    r["harness_run"] = k
                (bench_rows if style == "bench" else tune_rows).extend(rows)
                states[f"after_{style}_{k}"] = gpu_state()
                harness_log.append(f"{style} run {k}: {time.perf_counter() - t0:.1f} s")
    times, copies = harness_medians(bench_rows, tune_rows)
    lines = verdicts(summary, times, copies)

    print()
    print(f"copy (fp32, {copy_bytes / 1e9:.2f} GB read+write): " +
          ", ".join(f"{m} {c:.3f} ms = {copy_bytes / c / 1e6:.0f} GB/s" for m, c in copy_ms.items()))
    for line in errors + harness_log:
        print(line)
    for k, st in states.items():
        if st:
            print(f"gpu {k}: {st}")
    print()
    print(format_summary(summary))
    print()
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, device=name, torch=torch.__version__, triton=triton.__version__, date=date,
                           numel=numel, rows=args.rows, methods=list(methods), skipped=skipped, copy_ms=copy_ms,
                           copy_bytes=copy_bytes, samples=[asdict(s) for s in samples], summary=summary,
                           bench_rows=bench_rows, tune_rows=tune_rows, errors=errors, harness_log=harness_log, gpu_states=states,
                           verdicts=lines), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
