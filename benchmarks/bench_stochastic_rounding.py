"""What stochastic rounding costs on the CPU: AdamW (backend "cpu") on bfloat16 params, states and
gradients, rounded to nearest vs stochastically (``stochastic_rounding=True``), paired in one run;
``--mode kahan``: vs compensated stores instead (``kahan_summation=True``: a bf16 compensation
read and written beside each param, 14 -> 18 bytes per element).

    python benchmarks/bench_stochastic_rounding.py [--numel 16777216] [--tensors 16] [--reps 21]
                                                   [--warmup 3] [--threads 2] [--optimizer adamw]
                                                   [--mode stochastic|kahan]

Target (issue 20 item 6): stochastic <= 1.1x nearest. Both optimizers step their own copy of the
same params with the same gradients; every round takes one step of each, in alternating order,
and the ratio is the median over rounds of stochastic (kahan) / nearest within a round (pairing keeps a
shared machine's load changes out of the ratio, as benchmarks/bench_cpu_fused.py does). The
ratio is given in wall time and in process CPU time (every thread of this process). The 1-minute
load average is printed before and after: on a loaded machine say so when quoting the numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mupopt

OPTIMIZERS = {"adamw": mupopt.AdamW, "adopt": mupopt.ADOPT, "sophia": mupopt.SophiaG, "lamb": mupopt.LAMB}


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=1 << 24)
    ap.add_argument("--tensors", type=int, default=16)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    ap.add_argument("--mode", choices=("stochastic", "kahan"), default="stochastic",
                    help="the store paired with rounding to nearest")
    args = ap.parse_args()
    other = args.mode
    torch.set_num_threads(args.threads)
    cls = OPTIMIZERS[args.optimizer]
    per = args.numel // args.tensors
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(per, generator=g).to(torch.bfloat16) for _ in range(args.tensors)]
    grads = [torch.randn(per, generator=g).to(torch.bfloat16) for _ in range(args.tensors)]
    runs = {}
    for label, on in (("nearest", False), (other, True)):
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        kw = dict(rho=0.04) if args.optimizer == "sophia" else {}
        kw[{"stochastic": "stochastic_rounding", "kahan": "kahan_summation"}[other]] = on
        opt = cls(params, lr=1e-4, backend="cpu", **kw)
        runs[label] = opt
    step = {k: (lambda o=o: o.step(bs=64) if args.optimizer == "sophia" else o.step()) for k, o in runs.items()}
    for _ in range(args.warmup):
        for f in step.values():
            f()
    print(f"{args.optimizer}, backend cpu, bf16 params/states/grads, {args.numel} elements in {args.tensors} "
          f"tensors, {args.threads} threads; {load()}")
    wall, cpu = [], []
    for r in range(args.reps):
        order = ("nearest", other) if r % 2 == 0 else (other, "nearest")
        t_wall, t_cpu = {}, {}
        for k in order:
            w0, c0 = time.perf_counter(), time.process_time()
            step[k]()
            t_wall[k], t_cpu[k] = time.perf_counter() - w0, time.process_time() - c0
        wall.append((t_wall["nearest"], t_wall[other]))
        cpu.append((t_cpu["nearest"], t_cpu[other]))
    for name, rows in (("wall", wall), ("cpu time", cpu)):
        ratio = statistics.median(s / n for n, s in rows)
        print(f"{name:>9}: nearest {statistics.median(n for n, _ in rows) * 1e3:8.2f} ms, {other} "
              f"{statistics.median(s for _, s in rows) * 1e3:8.2f} ms, ratio (median of paired) {ratio:.3f}x")
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
