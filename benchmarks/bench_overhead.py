"""Host time of one optimizer step on many tiny tensors (issue 15 item 2), paired with torch's
fused AdamW in the same rounds (the machine is shared: a ratio of same-round times is steadier
than a ratio of medians taken minutes apart; `mupopt bench --cases overhead` times rows alone).

    python benchmarks/bench_overhead.py [--out FILE] [--rounds 9] [--counts 300,1000]

One torch thread, N fp32 tensors of 64 elements with gradients; each round times 50 steps of
ours then 50 of torch.optim.AdamW(fused=True); reported: median per-step time of each and the
median of the same-round ratios ours/fused (target: <= 0.25).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import timeit

import torch

import mupopt

TARGET = 0.25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also append the report to this file")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--counts", default="300,1000")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = [f"bench_overhead {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  "
             f"torch {torch.__version__}  {platform.machine()} ({os.cpu_count()} cores), 1 torch thread, "
             f"1-min load average {os.getloadavg()[0]:.1f}; target: ours/fused <= {TARGET}"]
    for n in map(int, args.counts.split(",")):
        ps = [torch.nn.Parameter(torch.randn(64)) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn(64)
        fused = torch.optim.AdamW(ps, lr=1e-3, fused=True)
        fused.step()
        for cls in (mupopt.AdamW, mupopt.ADOPT, mupopt.LAMB, mupopt.SophiaG):
            opt = cls(ps, lr=1e-3, backend=args.backend)
            step = (lambda o=opt: o.step(bs=64)) if cls is mupopt.SophiaG else opt.step
            step()
            ours, theirs, ratios = [], [], []
            for _ in range(args.rounds):
                a = timeit.timeit(step, number=50) / 50
                b = timeit.timeit(fused.step, number=50) / 50
                ours.append(a), theirs.append(b), ratios.append(a / b)
            ratio = statistics.median(ratios)
            lines.append(
                f"{n:5d} tensors  {cls.__name__:8s} ({opt.selected_backends[0]})  ours {statistics.median(ours) * 1e6:7.0f} us "
                f"({statistics.median(ours) * 1e6 / n:.2f} us/tensor)  torch fused AdamW {statistics.median(theirs) * 1e6:7.0f} us  "
                f"ours/fused {ratio:.3f}  {'met' if ratio <= TARGET else 'NOT met'}"
            )
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
