"""FSDP2 optimizer step on 2 CPU ranks (gloo): mupopt against torch on the same sharded model.

    python benchmarks/bench_fsdp.py [--out FILE] [--reps 15] [--width 1024] [--layers 8]

Each contender gets its own copy of one model (a stack of width x width Linear layers and an
embedding, fully_shard per layer, one torch thread per rank) and the same gradients; the ranks
time ``opt.step()`` between barriers, rounds interleave the contenders, and each ratio is the
median of same-round ratios (the machine is shared and noisy; issue 12 item 8):

- AdamW: mupopt.AdamW (backend auto: the C++ "cpu" backend on each rank's shard) against
  torch.optim.AdamW(fused=True) and (foreach=True) on the same DTensor parameters;
- Muon: mupopt.Muon with bf16 NS (each rank orthogonalises about half of the matrices,
  gathered to it by all-to-all) against torch.optim.Muon (bf16 NS too), whose matmuls on DTensors all-gather every matrix on
  every rank, so each rank does all of the Newton-Schulz work. NS flops per rank are counted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn


def build(width: int, layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(4 * width, width), *[nn.Linear(width, width, bias=False) for _ in range(layers)])


def shard(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def contenders(kind: str, mesh, width: int, layers: int):
    import mupopt

    out = {}
    if kind == "adamw":
        out["mupopt"] = lambda ps: mupopt.AdamW(ps, lr=1e-3)
        out["torch-fused"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)
        out["torch-foreach"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)
    else:
        out["mupopt"] = None  # built below: two param groups
        out["torch"] = lambda ps: torch.optim.Muon(ps, lr=1e-2)  # matrices only (below)
    made = {}
    for name, make in out.items():
        model = shard(build(width, layers), mesh)
        params = list(model.parameters())
        if kind == "muon" and name == "torch":
            params = [p for p in params if p.ndim == 2][1:]  # torch.optim.Muon: hidden matrices only
        elif kind == "muon":
            import mupopt

            # Hidden matrices to Muon, the embedding to AdamW, as torch's run (no width info).
            # bf16 NS, as torch.optim.Muon's (the same work per flop; slow on a CPU).
            opt = mupopt.Muon([{"params": list(model.parameters())[1:]},
                               {"params": list(model.parameters())[:1], "use_muon": False}],
                              lr=1e-2, ns_dtype=torch.bfloat16)
            made[name] = (model, list(model.parameters()), opt)
            continue
        made[name] = (model, params, make(params))
    return made


def feed(params, step: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    for i, p in enumerate(params):
        gen = torch.Generator().manual_seed(1000 * step + i)
        p.grad = distribute_tensor(torch.randn(p.shape, generator=gen) * 1e-3, p.device_mesh, p.placements)


def run(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    lines = []
    for kind, reps in (("adamw", args.reps), ("muon", max(3, args.reps // 3))):
        width = args.width if kind == "adamw" else args.muon_width
        made = contenders(kind, mesh, width, args.layers)
        times = {name: [] for name in made}
        for r in range(reps + 1):  # round 0 warms up (state creation, the C++ build, plans)
            for name, (model, params, opt) in made.items():
                feed(params, r)
                dist.barrier()
                t0 = time.perf_counter()
                opt.step()
                dist.barrier()
                if r:
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        for name in made:
            line = f"{kind:6s} {name:14s} median {med[name]:9.2f} ms/step"
            if name != "mupopt":
                ratio = statistics.median(b / a for a, b in zip(times["mupopt"], times[name]))
                line += f"   {name}/mupopt time ratio {ratio:5.2f}x (median of same-round ratios)"
            lines.append(line)
        if kind == "muon":
            _, _, opt = made["mupopt"]
            hooks = [s.collectives["orthogonalize"] for plan in opt._plan_cache.values() for s in plan.segments
                     if "orthogonalize" in s.collectives]
            mine = sum(h.flops for h in hooks)
            from mupopt.optim._placement import ns_flops

            total = sum(ns_flops(width, width, 5) for _ in range(args.layers))
            flops = torch.tensor([mine], dtype=torch.float64)
            gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(gathered, flops)
            per_rank = ", ".join(f"rank {k}: {g.item() / 1e9:.3f}" for k, g in enumerate(gathered))
            lines.append(f"muon   NS GFLOP per step: mupopt {per_rank} (all matrices: {total / 1e9:.3f}, what each "
                         f"rank computes under torch.optim.Muon on DTensors)")
    if rank == 0:
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also append the report to this file")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--muon-width", type=int, default=256, help="width of the Muon case (bf16 NS is slow on a CPU)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = f"/tmp/bench_fsdp_{os.getpid()}.txt"
    torch.multiprocessing.spawn(run, args=(2, port, args, tmp), nprocs=2, join=True)
    with open(tmp) as f:
        body = f.read()
    params = 4 * args.width * args.width + args.layers * args.width * args.width
    head = (f"bench_fsdp {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  "
            f"torch {torch.__version__}  {platform.processor() or platform.machine()} ({os.cpu_count()} cores)  "
            f"2 ranks x 1 thread, gloo, FSDP2; {params / 1e6:.1f}M fp32 params "
            f"(embedding {4 * args.width}x{args.width} + {args.layers} Linear {args.width}x{args.width}; Muon case: "
            f"width {args.muon_width}, bf16 NS in both); "
            f"1-min load average {os.getloadavg()[0]:.1f}\n")
    report = head + body
    print(report, end="")
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    sys.exit(main())
