"""CPU step time of the C++ backend ("cpu") against its peers and against the memory bound, side
by side in one process and the same rounds.

    python benchmarks/bench_cpu_fused.py [--numel 16777216] [--tensors 16] [--reps 25] [--warmup 3]
                                         [--repeat 3] [--threads 2] [--no-slow]

Contenders (fp32 params, grads and states; every contender steps its own copy of the same tensors
and gradients):

- AdamW: ours (``mupopt.AdamW(backend="cpu")``) vs ``torch.optim.AdamW(fused=True)`` (ATen's
  vectorised CPU kernel) vs ``torch.optim.AdamW(foreach=False)`` vs our reference backend.
  Targets (docs/benchmarks.md): >= 1.0x torch fused, >= 10x the reference.
- ADOPT, SophiaG, LAMB with backend "cpu", as a ratio to our AdamW. Targets: ADOPT and Sophia
  within 1.1x of our AdamW (Sophia moves 24 B per element, AdamW 28 B), LAMB within its byte
  ratio 40/28 = 1.43x (a norm pass and an update pass).
- The memory bound of each byte count: the step's passes with no math
  (``mupopt.bench.measure.traffic_bound``, csrc/cpu/traffic.cpp: the same launch table, chunks of
  32768, threads and loops as backend "cpu", on buffers of their own): 28 B per element for
  AdamW and ADOPT, 24 for SophiaG, 40 for LAMB (two passes), as mupopt/bench/model.py counts
  them. Each optimizer's "% of bound" is the bound's time over its step time in the same round.
  Targets (issue 22 item 11): >= 90% for AdamW, ADOPT and SophiaG, >= 85% for LAMB.

Timing: ``--warmup`` steps, then rounds of one step of each contender (round-robin), and every
ratio is the median over rounds of the ratio of two steps of the same round: on a shared machine
whose load changes from one second to the next, pairing steps taken milliseconds apart keeps such
changes out of the ratios (the medians of the step times alone moved LAMB's ratio between 1.15x
and 1.39x in two runs minutes apart). ``--repeat`` runs ``--reps`` rounds that many times (blocks);
each ratio is then given as the median over all rounds with the range of the blocks' medians (the
spread). GB/s from the byte model. Each contender's result after one step from identical tensors
is checked against the reference before timing. The 1-minute load average (what ``uptime``
prints) is printed before the first block and after each.

The % of bound is also given in process CPU time (``time.process_time``, every thread of this
process): on a machine shared with other jobs the wall time of a parallel step mostly measures
when the OS runs its threads (at load 9 on 2 cores the same step took 40 to 380 ms), while the
CPU time it used moves far less; it includes the time a thread spins at the end of a parallel
region waiting for the other.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mupopt
import mupopt.kernels.cpp as cpp_backend
from mupopt.bench import measure, model
from mupopt.bench.runner import cpu_name
from mupopt.kernels.cpp import build as cpp_build

FP32 = {name: 4 for name in ("param", "grad", "exp_avg", "exp_avg_sq", "hessian")}
BYTES = {name: model.bytes_per_element(name, FP32) for name in ("adamw", "adopt", "sophia", "lamb")}
# % of the no-math bound of the same bytes (issue 22 item 11).
BOUND_TARGETS = {"adamw": 90.0, "adopt": 90.0, "sophia": 90.0, "lamb": 85.0}
# Our optimizer's label -> the bound it is held to.
BOUND_OF = {"ours (cpu)": "bound 28 B", "torch fused": "bound 28 B", "adopt": "bound 28 B", "sophia": "bound 24 B",
            "lamb": "bound 40 B"}


def make_params(numel: int, tensors: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors] * tensors
    sizes[-1] += numel - sum(sizes)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        out.append(q)
    return out


def stepper(opt, sophia: bool):
    if sophia:
        return lambda: opt.step(bs=5120)
    return opt.step


def check_close(name: str, ours: list[torch.Tensor], ref: list[torch.Tensor]) -> str:
    worst = max(((a.detach() - b.detach()).abs().max().item() for a, b in zip(ours, ref)), default=0.0)
    scale = max((b.detach().abs().max().item() for b in ref), default=1.0)
    ok = worst <= 1e-6 * max(scale, 1.0)
    return f"{name}: max |ours - reference| after 1 step = {worst:.2e} ({'ok' if ok else 'MISMATCH'})"


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20, help="total parameters (default 16M)")
    parser.add_argument("--tensors", type=int, default=16, help="split into this many equal tensors")
    parser.add_argument("--reps", type=int, default=25, help="rounds per block")
    parser.add_argument("--repeat", type=int, default=1, help="blocks of --reps rounds (the spread between them)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ref-reps", type=int, default=7, help="rounds of the first block the slow contenders join")
    parser.add_argument("--no-slow", action="store_true", help="leave out torch single-tensor and the reference")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cpp_backend.register()
    start = time.perf_counter()
    outcome = cpp_build.load_cpu()
    if outcome is not True:
        raise SystemExit(f"backend 'cpu' unavailable: {outcome}")
    build_s = time.perf_counter() - start

    n, k = args.numel, args.tensors
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {cpu_name()}, "
          f"ATen capability {torch.backends.cpu.get_cpu_capability()}, our loops {torch.ops.mupopt.cpu_isa()}")
    print(f"{n} fp32 params in {k} tensors; {args.repeat} block(s) of {args.reps} rounds after {args.warmup} warm-up "
          f"steps (slow contenders: {'none' if args.no_slow else f'{args.ref_reps} rounds'}); library load {build_s:.1f} s")
    print(f"load average (1, 5, 15 min) before: {load()}")

    kw = dict(lr=1e-3, weight_decay=0.01)
    base = make_params(n, k)

    # Agreement first (one step each from identical tensors).
    checks = []
    ref_p = clone(base)
    mupopt.AdamW(ref_p, backend="reference", **kw).step()
    for label, build_opt in (
        ("ours", lambda ps: mupopt.AdamW(ps, backend="cpu", **kw)),
        ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True, **kw)),
    ):
        ps = clone(base)
        build_opt(ps).step()
        checks.append(check_close(f"AdamW {label}", ps, ref_p))
    del ref_p

    # Every contender gets its own copy of the tensors; steps are taken round-robin (one step of
    # each per round) so that a change in the machine's load hits all of them alike.
    contenders = {
        "ours (cpu)": (lambda ps: mupopt.AdamW(ps, backend="cpu", **kw), "adamw", False),
        "torch fused": (lambda ps: torch.optim.AdamW(ps, fused=True, **kw), "adamw", False),
        "torch single-tensor": (lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), "adamw", True),
        "reference": (lambda ps: mupopt.AdamW(ps, backend="reference", **kw), "adamw", True),
        "adopt": (lambda ps: mupopt.ADOPT(ps, backend="cpu", **kw), "adopt", False),
        "sophia": (lambda ps: mupopt.SophiaG(ps, backend="cpu", **kw), "sophia", False),
        "lamb": (lambda ps: mupopt.LAMB(ps, backend="cpu", **kw), "lamb", False),
    }
    if args.no_slow:
        contenders = {label: c for label, c in contenders.items() if not c[2]}
    steps = {}
    for label, (build_opt, name, slow) in contenders.items():
        opt = build_opt(clone(base))
        if name == "sophia":
            opt.update_hessian()  # a nonzero Hessian estimate, so the ratio is not saturated everywhere
        steps[label] = stepper(opt, name == "sophia")
    for name, label in (("adamw", "bound 28 B"), ("sophia", "bound 24 B"), ("lamb", "bound 40 B")):
        steps[label] = measure.traffic_bound(name, base)
        contenders[label] = (None, name, False)
    del base
    for label, step in steps.items():
        for _ in range(1 if contenders[label][2] else args.warmup):
            step()
    # times[label][r]: the step of round r, None where a slow contender sat the round out;
    # cpu_times: the same in process CPU time.
    times = {label: [] for label in steps}
    cpu_times = {label: [] for label in steps}
    blocks = []  # (first round, end) of each block
    for b in range(args.repeat):
        first = len(times["ours (cpu)"])
        for r in range(args.reps):
            for label, step in steps.items():
                if contenders[label][2] and (b > 0 or r >= args.ref_reps):
                    times[label].append(None)
                    cpu_times[label].append(None)
                    continue
                c0, t0 = time.process_time(), time.perf_counter()
                step()
                times[label].append(time.perf_counter() - t0)
                cpu_times[label].append(time.process_time() - c0)
        blocks.append((first, len(times["ours (cpu)"])))
        print(f"load average after block {b + 1}: {load()}")
    median_s = {label: statistics.median(t for t in v if t is not None) for label, v in times.items()}

    def ratios(label: str, base_label: str, lo: int = 0, hi: int | None = None, clock=times) -> list[float]:
        pairs = zip(clock[label][lo:hi], clock[base_label][lo:hi])
        return [a / b for a, b in pairs if a is not None and b is not None and b > 0]

    def paired(label: str, base_label: str) -> tuple[float, str]:
        """Median over all rounds of time(label) / time(base_label) in the same round, and the
        range of the per-block medians."""
        med = statistics.median(ratios(label, base_label))
        per_block = [statistics.median(x) for lo, hi in blocks if (x := ratios(label, base_label, lo, hi))]
        spread = f"{min(per_block):.3f}-{max(per_block):.3f}" if len(per_block) > 1 else ""
        return med, spread

    def gbs(seconds: float, name: str) -> float:
        return BYTES[name] * n / seconds / 1e9

    print("\nAdamW step")
    print(f"  {'contender':<22}{'ms':>9}{'GB/s':>8}{'ours faster by':>16}{'blocks':>14}")
    for label in ("ours (cpu)", "torch fused", "torch single-tensor", "reference"):
        if label not in steps:
            continue
        ratio, spread = paired(label, "ours (cpu)")
        s_ = median_s[label]
        print(f"  {label:<22}{s_ * 1e3:>9.2f}{gbs(s_, 'adamw'):>8.2f}{ratio:>15.2f}x{spread:>14}")
    vs_fused = paired("torch fused", "ours (cpu)")[0]
    line = f"  target >= 1.0x torch fused: {vs_fused:.2f}x {'MET' if vs_fused >= 1.0 else 'MISSED'}"
    if "reference" in steps:
        vs_ref = paired("reference", "ours (cpu)")[0]
        line += f"; target >= 10x reference: {vs_ref:.1f}x {'MET' if vs_ref >= 10 else 'MISSED'}"
    print(line)

    targets = {"adopt": 1.1, "sophia": 1.1, "lamb": 40 / 28}
    print("\nOther optimizers, backend 'cpu', against our AdamW")
    print(f"  {'optimizer':<10}{'ms':>9}{'GB/s':>8}{'x AdamW':>9}{'target':>9}{'blocks':>14}")
    for name, target in targets.items():
        s_ = median_s[name]
        ratio, spread = paired(name, "ours (cpu)")
        print(f"  {name:<10}{s_ * 1e3:>9.2f}{gbs(s_, name):>8.2f}{ratio:>8.2f}x{target:>8.2f}x "
              f"{'MET' if ratio <= target else 'MISSED':<7}{spread:>13}")

    print("\nThe memory bound: each step's bytes with no math, same rounds (% of bound = bound time / step time;"
          " blocks: the range of the blocks' medians)")
    print(f"  {'step':<14}{'ms':>9}{'bound':>12}{'bound ms':>10}{'% of bound':>12}{'target':>14}{'blocks':>13}"
          f"{'CPU time %':>12}{'blocks':>13}")
    for label, bound in BOUND_OF.items():
        name = contenders[label][1]
        cells = []
        for clock in (times, cpu_times):
            pct = 100 * statistics.median(ratios(bound, label, clock=clock))
            per_block = [100 * statistics.median(x) for lo, hi in blocks if (x := ratios(bound, label, lo, hi, clock))]
            cells.append((pct, f"{min(per_block):.1f}-{max(per_block):.1f}" if len(per_block) > 1 else ""))
        (pct, spread), (cpu_pct, cpu_spread) = cells
        target = BOUND_TARGETS[name] if label != "torch fused" else None
        verdict = "" if target is None else f"{target:.0f}% {'MET' if pct >= target else 'MISSED'}"
        print(f"  {label:<14}{median_s[label] * 1e3:>9.2f}{bound:>12}{median_s[bound] * 1e3:>10.2f}"
              f"{pct:>11.1f}%  {verdict:<12}{spread:>13}{cpu_pct:>11.1f}%{cpu_spread:>13}")

    print("\nChecks")
    for line in checks:
        print("  " + line)
    print(f"  load average at the end {load()} (other processes share this machine)")


if __name__ == "__main__":
    main()
