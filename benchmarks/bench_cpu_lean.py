"""CPU step time of AdamW with lean storage (issue 20 item 6): bfloat16 params with stochastic
rounding and 8-bit states against torch's fused AdamW on float32, and each storage format
against its own memory bound, paired in one process and the same rounds.

    python benchmarks/bench_cpu_lean.py [--numel 16777216] [--tensors 16] [--reps 15] [--repeat 2]
                                        [--warmup 2] [--threads N]

Contenders (backend "cpu" unless named torch; every one steps its own tensors, gradients in the
params' dtype):

- ``torch fused fp32``: ``torch.optim.AdamW(fused=True)``, float32 params and states (28 B per
  element);
- ``fp32 p, 32/16/8-bit states``: float32 params, states in float32 (28 B), bfloat16 (20 B) or
  8-bit blocks (16 B + 8 B per 256 elements of block scales);
- ``bf16 p SR, 16/8-bit states``: bfloat16 params rounded stochastically, bfloat16 states (14 B:
  format 32 of a bf16 param) or 8-bit blocks (10 B).

Target (issue 20 item 6): ``bf16 p SR, 8-bit states`` >= 1.5x faster than ``torch fused fp32``;
each format >= 90% of its bound. The bound of a format is the same step's bytes with no math
(``mupopt.bench.measure.traffic_bound``, csrc/cpu/traffic.cpp: the launch table, chunks, threads
and loops of backend "cpu"), with the states in the format's storage: bfloat16, or uint8 codes
moved as bytes (the block scales, 0.03 B per element, left out).

Timing as benchmarks/bench_cpu_fused.py: warm-up steps, then rounds of one step of each
contender, each ratio the median over rounds of the ratio of two steps of the same round (a
change of the machine's load hits both alike); ``--repeat`` blocks give the spread. The load
average is printed before and after each block: on a shared machine say "measured under load".
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mupopt
import mupopt.kernels.cpp as cpp_backend
from mupopt.bench import measure
from mupopt.bench.runner import cpu_name
from mupopt.kernels.cpp import build as cpp_build

KW = dict(lr=1e-3, weight_decay=0.01)


def make_params(numel: int, tensors: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [numel // tensors] * tensors
    sizes[-1] += numel - sum(sizes)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    return params


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


# label: (param dtype, state_bits or "torch", stochastic rounding, bound: (param dtype, state dtype))
CONTENDERS = {
    "torch fused fp32": (torch.float32, "torch", False, (torch.float32, torch.float32)),
    "fp32 p, 32-bit states": (torch.float32, 32, False, (torch.float32, torch.float32)),
    "fp32 p, 16-bit states": (torch.float32, 16, False, (torch.float32, torch.bfloat16)),
    "fp32 p, 8-bit states": (torch.float32, 8, False, (torch.float32, torch.uint8)),
    "bf16 p SR, 16-bit states": (torch.bfloat16, 16, True, (torch.bfloat16, torch.bfloat16)),
    "bf16 p SR, 8-bit states": (torch.bfloat16, 8, True, (torch.bfloat16, torch.uint8)),
}
LEAN = "bf16 p SR, 8-bit states"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15, help="rounds per block")
    parser.add_argument("--repeat", type=int, default=2, help="blocks of --reps rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpp_backend.register()
    outcome = cpp_build.load_cpu()
    if outcome is not True:
        raise SystemExit(f"backend 'cpu' unavailable: {outcome}")
    n, k = args.numel, args.tensors
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu {cpu_name()}, "
          f"our loops {torch.ops.mupopt.cpu_isa()}; {n} params in {k} tensors; {args.repeat} block(s) of "
          f"{args.reps} rounds after {args.warmup} warm-up steps")
    print(f"load average (1, 5, 15 min) before: {load()}")

    steps, bounds = {}, {}
    for label, (dtype, bits, sr, (bp, bs)) in CONTENDERS.items():
        ps = make_params(n, k, dtype)
        if bits == "torch":
            opt = torch.optim.AdamW(ps, fused=True, **KW)
        else:
            opt = mupopt.AdamW(ps, backend="cpu", state_bits=bits, stochastic_rounding=sr, **KW)
        steps[label] = opt.step
        key = (bp, bs)
        if key not in bounds:
            bounds[key] = measure.traffic_bound("adamw", make_params(n, k, bp, seed=1), state_dtype=bs)
    bound_label = {key: f"{b.nbytes / n:.0f} B" for key, b in bounds.items()}
    for key, b in bounds.items():
        steps[bound_label[key]] = b
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {label: [] for label in steps}
    blocks = []
    for b in range(args.repeat):
        first = len(times[LEAN])
        for _ in range(args.reps):
            for label, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - t0)
        blocks.append((first, len(times[LEAN])))
        print(f"load average after block {b + 1}: {load()}")

    def paired(a: str, base: str) -> tuple[float, str]:
        r = [x / y for x, y in zip(times[a], times[base])]
        per = [statistics.median(r[lo:hi]) for lo, hi in blocks]
        return statistics.median(r), (f"{min(per):.2f}-{max(per):.2f}" if len(per) > 1 else "")

    print(f"\n  {'contender':<26}{'ms':>9}{'x torch fused':>15}{'blocks':>12}{'bound':>10}{'% of bound':>12}"
          f"{'blocks':>13}")
    for label, (_, _, _, key) in CONTENDERS.items():
        ms = statistics.median(times[label]) * 1e3
        speed, spread = paired("torch fused fp32", label)
        pct, pspread = paired(bound_label[key], label)
        print(f"  {label:<26}{ms:>9.2f}{speed:>14.2f}x{spread:>12}{bound_label[key]:>10}{100 * pct:>11.1f}%"
              f"{'-'.join(f'{100 * float(x):.1f}' for x in pspread.split('-')) if pspread else '':>13}")
    speed = paired("torch fused fp32", LEAN)[0]
    print(f"\n  target: {LEAN} >= 1.5x faster than torch fused fp32: {speed:.2f}x {'MET' if speed >= 1.5 else 'MISSED'}")
    for label, (_, bits, _, key) in CONTENDERS.items():
        if bits != "torch":
            pct = 100 * paired(bound_label[key], label)[0]
            print(f"  target: {label} >= 90% of its bound: {pct:.1f}% {'MET' if pct >= 90 else 'MISSED'}")
    print(f"  load average at the end {load()} (other processes share this machine)")


if __name__ == "__main__":
    main()
