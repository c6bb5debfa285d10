"""Chunk size and warps of the Triton elementwise kernels, swept on a GPU, side by side with the
copy bandwidth, torch's fused AdamW and the ``cuda`` backend measured in the same run.

    PYTHONPATH=$PWD python benchmarks/tune_triton.py [--case one|llama] [--configs 4096x8,8192x16]
        [--optimizers adamw,adopt,sophia,lamb] [--mode quick|full] [--json FILE]

(--json: not into benchmarks/results/, whose *.json files are `mupopt bench` runs that
docs/benchmarks.md's tables are generated from; commit the printed table as a .txt there.)

Why: on an H200 (2026-11-27) the ``triton`` AdamW ran at 38% of the copy bandwidth on one
2^26-element tensor, 0.5x torch fused, with the untuned ``_common.BLOCK = 4096`` and
``NUM_WARPS = 8``. Every kernel reads both from ``mupopt.kernels.triton._common`` at launch, and
the launch tables are cached per BLOCK, so a configuration is a pair of module attributes.

Per configuration and optimizer: one check of the step against the reference backend
(``mupopt.bench.check``, as ``mupopt bench`` does; a wrong result stops the run), then the timing
of whole ``step()`` calls with cold caches (``mupopt.bench.timing``). Prints GB/s from the byte
model, % of the copy bandwidth, and the ratio to torch fused AdamW and to our ``cuda`` backend.
Under ``TRITON_INTERPRET=1`` on CPU tensors (``--device cpu --mode smoke``) it only exercises
the machinery: the interpreter says nothing about speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Sequence

import torch

import mupopt.kernels.cpp as cpp_backend
from mupopt.bench import cases as C
from mupopt.bench import model, subjects, timing
from mupopt.bench.measure import check_optimizer, reference_snapshot
from mupopt.kernels import triton as triton_backend
from mupopt.kernels.triton import _common

DEFAULT_CONFIGS = "1024x4,2048x4,2048x8,4096x4,4096x8,8192x8,8192x16,16384x16"
CASES = {
    # 2^26 fp32 elements: 28 B x 2^26 = 1.9 GB of AdamW traffic per step, far above any L2.
    "one": lambda: [(1 << 26,)],
    # Llama-1B (1.24B parameters, 146 tensors): ~35 GB of fp32 AdamW traffic, fits an H100.
    "llama": C.llama_shapes,
    "smoke": lambda: [(5000,), (64, 33)],
}


def parse_configs(text: str) -> list[tuple[int, int]]:
    """"4096x8,8192x16" -> [(4096, 8), (8192, 16)]; BLOCK a power of two (tl.arange needs it)."""
    out = []
    for item in text.split(","):
        block, _, warps = item.strip().partition("x")
        b, w = int(block), int(warps)
        if b <= 0 or b & (b - 1) or w <= 0 or w & (w - 1):
            raise SystemExit(f"config {item!r}: BLOCK and warps must be powers of two")
        out.append((b, w))
    return out


def set_config(block: int, warps: int) -> None:
    _common.BLOCK = block
    _common.NUM_WARPS = warps
    _common.clear_cache()


def sweep(device: torch.device, shapes: Sequence[tuple], configs: Sequence[tuple[int, int]], optimizers: Sequence[str],
          mode: str) -> list[dict]:
    """One row per (config, optimizer), plus one per peer; every row carries the copy bandwidth."""
    timer = timing.Timer(device, timing.BUDGETS[mode])
    copy_t, copy_bytes = timing.measure_copy(timer, timing.copy_numel(device, mode))
    copy_gbs = copy_bytes / copy_t.median_ms / 1e6
    rows: list[dict] = []

    def add(name: str, backend: str, block: int | None, warps: int | None, opt, key: str, params) -> None:
        subject = subjects.SUBJECTS[key]
        subject.step(opt)  # state, compilation
        subject.prime(opt)
        t = timer.time(lambda: subject.step(opt))
        nbytes = model.step_bytes(key, params, [opt.state[p] for p in params])
        gbs = nbytes / t.median_ms / 1e6
        rows.append(dict(optimizer=name, backend=backend, block=block, warps=warps, median_ms=t.median_ms,
                         gbps=gbs, pct_of_copy=100 * gbs / copy_gbs, copy_gbps=copy_gbs))

    def fresh(seed: int = 0) -> list[torch.Tensor]:
        return C.make_params(shapes, torch.float32, device, seed)

    # Peers first, once: torch fused AdamW and (where it builds) our cuda backend.
    params = fresh()
    if device.type == "cuda":
        add("adamw", "torch-fused", None, None, subjects.PEERS_BY_NAME["torch-fused"].make(params), "adamw", params)
        cpp_backend.register()
        if cpp_backend.cuda_unsupported_reason(params) is None:
            for key in optimizers:
                ps = fresh()
                add(key, "cuda", None, None, subjects.SUBJECTS[key].make(ps, "cuda"), key, ps)
    for block, warps in configs:
        set_config(block, warps)
        for key in optimizers:
            subject = subjects.SUBJECTS[key]
            ps = fresh()
            start = [p.detach().clone() for p in ps]
            reference = reference_snapshot(subject, ps, start)
            check_optimizer(subject, lambda xs: subject.make(xs, "triton"), ps, start, reference, torch.float32,
                            f"{key} triton BLOCK={block} warps={warps}")
            del reference
            add(key, "triton", block, warps, subject.make(ps, "triton"), key, ps)
    return rows


def format_rows(rows: Sequence[dict]) -> str:
    lines = [f"{'optimizer':<8} {'backend':<12} {'BLOCK':>6} {'warps':>5} {'ms':>9} {'GB/s':>8} {'% copy':>7}"
             f" {'x torch fused':>13} {'x cuda':>7}"]
    fused = {r["optimizer"]: r["median_ms"] for r in rows if r["backend"] == "torch-fused"}
    cuda = {r["optimizer"]: r["median_ms"] for r in rows if r["backend"] == "cuda"}
    for r in rows:
        vs_fused = f"{fused['adamw'] / r['median_ms']:.2f}x" if "adamw" in fused and r["optimizer"] == "adamw" else ""
        vs_cuda = f"{cuda[r['optimizer']] / r['median_ms']:.2f}x" if r["optimizer"] in cuda else ""
        lines.append(f"{r['optimizer']:<8} {r['backend']:<12} {r['block'] or '':>6} {r['warps'] or '':>5} "
                     f"{r['median_ms']:>9.3f} {r['gbps']:>8.1f} {r['pct_of_copy']:>6.0f}% {vs_fused:>13} {vs_cuda:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="one")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"BLOCKxWARPS list (default {DEFAULT_CONFIGS})")
    parser.add_argument("--optimizers", default="adamw", help="comma list of adamw,adopt,sophia,lamb")
    parser.add_argument("--mode", choices=("quick", "full", "smoke"), default="quick")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this sweep times GPU kernels (--device cpu --mode smoke only runs the machinery)")
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    unknown = set(optimizers) - {"adamw", "adopt", "sophia", "lamb"}
    if unknown:
        raise SystemExit(f"unknown optimizers {sorted(unknown)}")
    triton_backend.register()
    before = (_common.BLOCK, _common.NUM_WARPS)
    try:
        rows = sweep(device, CASES[args.case](), parse_configs(args.configs), optimizers, args.mode)
    finally:
        set_config(*before)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    import triton

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"{name}; torch {torch.__version__}, triton {triton.__version__}; {date}; case {args.case}, mode {args.mode}")
    print(format_rows(rows))
    if args.json:
        meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, date=date, case=args.case,
                    mode=args.mode)
        with open(args.json, "w") as f:
            json.dump([dict(r, **meta) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
