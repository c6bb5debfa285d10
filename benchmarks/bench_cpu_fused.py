"""CPU step time of the C++ backend ("cpu") against its peers, side by side in one run.

    python benchmarks/bench_cpu_fused.py [--numel 16777216] [--tensors 16] [--reps 25] [--warmup 3]

Cases (fp32 params, grads and states; the same tensors and gradients for every contender):

- AdamW: ours (``mupopt.AdamW(backend="cpu")``) vs ``torch.optim.AdamW(fused=True)`` (ATen's
  vectorised CPU kernel) vs ``torch.optim.AdamW(foreach=False)`` vs our reference backend.
  Targets (docs/benchmarks.md): >= 1.0x torch fused, >= 10x the reference.
- ADOPT, SophiaG, LAMB with backend "cpu", as a ratio to our AdamW. Targets: ADOPT and Sophia
  within 1.1x of our AdamW (Sophia moves 24 B per element, AdamW 28 B), LAMB within its byte
  ratio 40/28 = 1.43x (a norm pass and an update pass).

Reports the median of ``--reps`` timed steps after ``--warmup`` steps, taken round-robin over
the contenders (one step of each per round), and each ratio as the median over rounds of the
ratio of two steps of the same round: on a shared machine whose load changes from one second to
the next, pairing steps taken milliseconds apart keeps such changes out of the ratios (the
medians of the step times alone moved LAMB's ratio between 1.15x and 1.39x in two runs minutes
apart). GB/s from the byte model (bytes per element: AdamW/ADOPT 28, Sophia 24, LAMB 40). Each
contender's result after one step from identical tensors is checked against the reference
before timing. The load average is printed with the results.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import mupopt
import mupopt.kernels.cpp as cpp_backend
from mupopt.bench.runner import cpu_name
from mupopt.kernels.cpp import build as cpp_build

BYTES = {"adamw": 28, "adopt": 28, "sophia": 24, "lamb": 40}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--numel", type=int, default=16 * 2**20, help="total parameters (default 16M)")
    parser.add_argument("--tensors", type=int, default=16, help="split into this many equal tensors")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ref-reps", type=int, default=7, help="timed steps of the slow contenders")
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
    print(f"{n} fp32 params in {k} tensors; median of {args.reps} steps after {args.warmup} warm-up "
          f"(reference: {args.ref_reps}); library load {build_s:.1f} s; load average {os.getloadavg()[0]:.2f}")

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
    steps, times = {}, {}
    for label, (build_opt, name, slow) in contenders.items():
        opt = build_opt(clone(base))
        if name == "sophia":
            opt.update_hessian()  # a nonzero Hessian estimate, so the ratio is not saturated everywhere
        steps[label] = stepper(opt, name == "sophia")
    del base
    for label, step in steps.items():
        for _ in range(1 if contenders[label][2] else args.warmup):
            step()
    # times[label][r]: the step of round r, None where a slow contender sat the round out.
    times = {label: [] for label in steps}
    for r in range(args.reps):
        for label, step in steps.items():
            if contenders[label][2] and r >= args.ref_reps:
                times[label].append(None)
                continue
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    median_s = {label: statistics.median(t for t in v if t is not None) for label, v in times.items()}

    def paired(label: str, base_label: str) -> float:
        """Median over rounds of time(label) / time(base_label) in the same round."""
        return statistics.median(a / b for a, b in zip(times[label], times[base_label]) if a is not None)

    def gbs(seconds: float, name: str) -> float:
        return BYTES[name] * n / seconds / 1e9

    print("\nAdamW step")
    print(f"  {'contender':<22}{'ms':>9}{'GB/s':>8}{'ours faster by':>16}")
    for label in ("ours (cpu)", "torch fused", "torch single-tensor", "reference"):
        s_, ratio = median_s[label], paired(label, "ours (cpu)")
        print(f"  {label:<22}{s_ * 1e3:>9.2f}{gbs(s_, 'adamw'):>8.2f}{ratio:>15.2f}x")
    vs_fused, vs_ref = paired("torch fused", "ours (cpu)"), paired("reference", "ours (cpu)")
    print(f"  target >= 1.0x torch fused: {vs_fused:.2f}x {'MET' if vs_fused >= 1.0 else 'MISSED'};"
          f" target >= 10x reference: {vs_ref:.1f}x {'MET' if vs_ref >= 10 else 'MISSED'}")

    targets = {"adopt": 1.1, "sophia": 1.1, "lamb": 40 / 28}
    print("\nOther optimizers, backend 'cpu', against our AdamW")
    print(f"  {'optimizer':<10}{'ms':>9}{'GB/s':>8}{'x AdamW':>9}{'target':>9}")
    for name, target in targets.items():
        s_, ratio = median_s[name], paired(name, "ours (cpu)")
        print(f"  {name:<10}{s_ * 1e3:>9.2f}{gbs(s_, name):>8.2f}{ratio:>8.2f}x{target:>8.2f}x "
              f"{'MET' if ratio <= target else 'MISSED'}")

    print("\nChecks")
    for line in checks:
        print("  " + line)
    print(f"  load average at the end {os.getloadavg()[0]:.2f} (other processes share this machine)")


if __name__ == "__main__":
    main()
