"""Training quality of the optimizer-state formats (docs/lean-states.md): the character GPT of
``mupopt transfer`` (muP, one width, the optimizer's grid-centre lr), trained from the same seed
on the same batches with state_bits 32, 16 and 8 (8: each map of mupopt.optim._lean_states).

    PYTHONPATH=$PWD python benchmarks/lean_states_quality.py --optimizers adamw --width 128 \
        --steps 300 --seeds 2 --out benchmarks/results/lean-states.csv

Prints one row per run and, per optimizer and format, the mean final validation loss and its
relative difference from state_bits=32.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

from mupopt.mupcheck.models import config_for, load_corpus
from mupopt.mupcheck.train import OPTIMIZERS
from mupopt.mupcheck.transfer import train_run
from mupopt.optim import _lean_states as lean


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", default="adamw")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--formats", default="32,16,8:dynamic,8:linear-sqrt")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    data = load_corpus(None)
    cfg = config_for("gpt", data, base_width=args.base_width, depth=2, n_head=4, block_size=args.seq)
    rows = []
    for name in args.optimizers.split(","):
        spec = OPTIMIZERS[name]
        for fmt in args.formats.split(","):
            bits, _, maps = fmt.partition(":")
            lean.maps = maps or lean.DEFAULT_MAPS
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                r = train_run(data, cfg, args.width, name, spec.center, param="mup", wd=spec.wd, steps=args.steps,
                              batch=args.batch, seq=args.seq, seed=seed, state_bits=int(bits))
                r["format"] = fmt
                rows.append(r)
                print(f"{name} {fmt} seed {seed}: val {r['val_loss']:.4f} train {r['train_loss']:.4f} "
                      f"({r['seconds']:.0f} s)", flush=True)
    lean.maps = lean.DEFAULT_MAPS
    print("\noptimizer | format | mean val loss | vs 32-bit")
    for name in args.optimizers.split(","):
        base = statistics.mean(r["val_loss"] for r in rows if r["optimizer"] == name and r["format"] == "32")
        for fmt in args.formats.split(","):
            v = statistics.mean(r["val_loss"] for r in rows if r["optimizer"] == name and r["format"] == fmt)
            print(f"{name} | {fmt} | {v:.4f} | {100 * (v - base) / base:+.2f}%")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
