"""Timing: median, p20 and p80 of repeated calls with cold caches, and the peaks of this device
(copy bandwidth, matmul rate) measured the same way in the same run.

GPU: in the manner of ``triton.testing.do_bench``: warm up, then per repetition zero a 256 MB
buffer (flushes an L2 of up to 50 MB on H100, 60 MB on B200), synchronise, and time the call with
CUDA events. The synchronisation before the start event keeps the host-side launch work of the
call inside the measured interval: a step over 1000 tensors is launch-bound, and its host time is
what a training loop waits for.

CPU: ``time.perf_counter`` around each call, after writing a 128 MB buffer (4x the 32 MB L3
that lscpu reports on the machine this was written on; a VM may hide a larger one) so that each
repetition starts from memory as a real step does after the backward pass.

On a shared CPU the neighbours' memory traffic moves every number: the same copy measured 9.9
GB/s at a load average of 5 and 30 GB/s at 0.5 on this 2-core VM. The runner therefore measures
the peaks again next to each group of rows it divides by them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

GPU_FLUSH_BYTES = 256 << 20
CPU_FLUSH_BYTES = 128 << 20


@dataclass(frozen=True)
class Budget:
    """How long to measure one thing: repetitions fill ``seconds`` within [min_reps, max_reps]."""

    seconds: float
    min_reps: int
    max_reps: int
    warmup_seconds: float


BUDGETS = {
    # quick: about 0.2 s per measurement, at least 3 repetitions (p20/p80 are then interpolated
    # between them: a spread, not a distribution). The first call in Timer.time is the warm-up.
    # A 15-minute first version (5 repetitions, 0.3 s) ran past "a few minutes" on 2 cores.
    "quick": Budget(0.2, 3, 10, 0.0),
    "full": Budget(1.5, 10, 200, 0.2),
    "smoke": Budget(0.0, 2, 2, 0.0),
}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def percentile(sorted_xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> Timing:
    xs = sorted(times_ms)
    return Timing(percentile(xs, 0.5), percentile(xs, 0.2), percentile(xs, 0.8), len(xs))


class Timer:
    """Times callables on one device; holds the cache-flush buffer."""

    def __init__(self, device: torch.device, budget: Budget):
        self.device = device
        self.budget = budget
        self.cuda = device.type == "cuda"
        nbytes = GPU_FLUSH_BYTES if self.cuda else CPU_FLUSH_BYTES
        self._flush_buf = torch.empty(nbytes, dtype=torch.int8, device=device)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        self._flush_buf.zero_()

    def _once_ms(self, fn: Callable[[], object], setup: Callable[[], object] | None = None) -> float:
        """One cold call, in ms (``setup`` runs before the cache flush, untimed)."""
        if setup is not None:
            setup()
        self.flush()
        self.sync()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def time(self, fn: Callable[[], object]) -> Timing:
        """Warm up (at least once), then repeat cold calls; the caller has already made one call
        that created state and compiled whatever compiles."""
        return self.time_rounds([fn])[0]

    def time_rounds(self, fns: Sequence[Callable[[], object]],
                    setups: Sequence[Callable[[], object] | None] | None = None) -> list[Timing]:
        """Time several callables in the same rounds: each round makes one cold call of every one
        (starting one further along each round), so that a change in a shared machine's load
        hits all of them alike and their medians compare as a pair would. ``setups[i]`` runs
        before each call of ``fns[i]``, untimed. Repetitions: as many rounds as the budget's
        seconds allow for the mean call, within [min_reps, max_reps]."""
        b, n = self.budget, len(fns)
        setups = list(setups) if setups is not None else [None] * n
        est = [self._once_ms(f, s) for f, s in zip(fns, setups)]
        warm_until = time.perf_counter() + b.warmup_seconds
        while time.perf_counter() < warm_until:
            est = [min(e, self._once_ms(f, s)) for e, f, s in zip(est, fns, setups)]
        mean_s = max(sum(est) / max(n, 1), 1e-3) / 1e3
        reps = int(min(b.max_reps, max(b.min_reps, b.seconds / mean_s)))
        samples: list[list[float]] = [[] for _ in range(n)]
        for r in range(reps):
            for k in range(n):
                i = (r + k) % n
                samples[i].append(self._once_ms(fns[i], setups[i]))
        return [summarize(s) for s in samples]


class LoopTimer(Timer):
    """Host time of calls that do almost no arithmetic (the overhead cases): warm caches, each
    repetition times ``inner`` calls back to back (enough for ``budget.seconds / 10``, at least
    one) and reports their mean, so that a 50 us step is not lost in the clock's and the cache
    flush's noise. On a GPU it synchronises around each repetition only: what the host waits for
    in a loop of steps."""

    def __init__(self, device: torch.device, budget: Budget):
        self.device, self.budget, self.cuda = device, budget, device.type == "cuda"  # no flush buffer

    def time_rounds(self, fns: Sequence[Callable[[], object]],
                    setups: Sequence[Callable[[], object] | None] | None = None) -> list[Timing]:
        """Timer.time_rounds with warm caches: per round, each callable's ``inner`` calls back to
        back (its setup, untimed, before them)."""
        b, n = self.budget, len(fns)
        setups = list(setups) if setups is not None else [None] * n
        ones, inners = [], []
        for fn, setup in zip(fns, setups):
            if setup is not None:
                setup()
            fn()
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            one = max(time.perf_counter() - t0, 1e-6)
            ones.append(one)
            inners.append(max(1, int(b.seconds / 10 / one)))
        per_round = sum(i * o for i, o in zip(inners, ones)) / max(n, 1)
        reps = int(min(b.max_reps, max(b.min_reps, b.seconds / per_round)))
        samples: list[list[float]] = [[] for _ in range(n)]
        for r in range(reps):
            for k in range(n):
                i = (r + k) % n
                if setups[i] is not None:
                    setups[i]()
                self.sync()
                t0 = time.perf_counter()
                for _ in range(inners[i]):
                    fns[i]()
                self.sync()
                samples[i].append((time.perf_counter() - t0) * 1e3 / inners[i])
        return [summarize(s) for s in samples]


# --------------------------------------------------------------------------------------------
# Peaks of this device, measured in the same run
# --------------------------------------------------------------------------------------------
def copy_numel(device: torch.device, mode: str) -> int:
    # GPU: 2^28 fp32 = 1 GiB each way, 20x an L2. CPU: 2^25 = 128 MiB (4x a 32 MB L3) in full
    # mode, 2^24 in quick; smoke only exercises the code.
    if mode == "smoke":
        return 1 << 16
    if device.type == "cuda":
        return 1 << 28
    return 1 << 25 if mode == "full" else 1 << 24


def matmul_n(device: torch.device, mode: str) -> int:
    # H100: 8192^3 bf16 is ~1.4 ms, well past launch overheads. CPU: 1024^3 fp32 is ~2 GFLOP,
    # about 50 ms on 2 AVX2 cores.
    if mode == "smoke":
        return 64
    if device.type == "cuda":
        return 8192
    return 2048 if mode == "full" else 1024


def measure_copy(timer: Timer, numel: int) -> tuple[Timing, int]:
    """A device-to-device (CPU: memory-to-memory) fp32 copy with torch ``copy_``; returns the
    timing and the bytes counted (read + write).

    On a CPU each store first reads its line (write-allocate), so the copy moves 3 bytes for the
    2 counted, while an in-place step reads every line it writes anyway: measured here, an
    in-place multiply ran at 52-62 GB/s against 30 GB/s for the copy, and an in-place optimizer
    step can read as more than 100% of this peak. GPUs write whole sectors without reading them."""
    src = torch.randn(numel, device=timer.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = timer.time(lambda: dst.copy_(src))
    return t, 2 * numel * 4


def measure_matmul(timer: Timer, n: int, dtype: torch.dtype) -> tuple[Timing, int]:
    """An n x n x n matmul on random data; returns the timing and its 2 n^3 flops."""
    a = torch.randn(n, n, device=timer.device).to(dtype)
    b = torch.randn(n, n, device=timer.device).to(dtype)
    out = torch.empty(n, n, device=timer.device, dtype=dtype)
    torch.matmul(a, b, out=out)
    t = timer.time(lambda: torch.matmul(a, b, out=out))
    return t, 2 * n**3
