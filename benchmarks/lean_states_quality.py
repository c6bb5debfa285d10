"""Training quality of the memory-lean options (docs/lean-states.md): the character GPT of
``mupopt transfer`` (muP, one width, the optimizer's grid-centre lr), trained from the same seed
on the same batches in several configurations, each ``[PARAMS/]BITS[:MAP]``:

- PARAMS: ``fp32`` (default), ``bf16`` (pure-bf16 params, forward and backward; the optimizer's
  param stores rounded to nearest), ``bf16-sr`` (the same with ``stochastic_rounding=True``) or
  ``bf16-kahan`` (with ``kahan_summation=True``: compensated stores);
- BITS: ``state_bits`` 32, 16 or 8; MAP (8 only): a map family of mupopt.optim._lean_states.

    PYTHONPATH=$PWD python benchmarks/lean_states_quality.py --optimizers adamw --width 128 \
        --steps 300 --seeds 2 --configs 32,16,8:dynamic,8:linear-sqrt --out benchmarks/results/lean-states/x.csv
    PYTHONPATH=$PWD python benchmarks/lean_states_quality.py --optimizers six --steps 300 \
        --configs 32,bf16/32,bf16-sr/32,8,bf16-sr/8 --out benchmarks/results/lean-states/lean-seed0.csv

``--lr-scale F`` multiplies the grid-centre lr by F; ``--group KEY=VALUE[,KEY=VALUE]`` sets a
param-group option of every run's optimizer after it is built (e.g. ``--group rho=0.1`` for
SophiaG), an option the optimizer must already have; both are recorded in each row.

Prints one row per run and, per optimizer and configuration, the mean final validation loss and
its relative difference from the first configuration (or ``--baseline``), and the per-seed
(paired) differences with their mean and standard error; ``--inputs a.json,b.json`` without
``--plot`` prints that summary of earlier runs. ``--out X.csv`` also writes X.json, the
same rows with every step's training loss (``losses``). ``--plot P.png --inputs a.json,b.json``
draws those curves (no training): per optimizer, the training loss (moving average over
``--smooth`` steps, mean over seeds) and its difference from the first configuration.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mupopt.mupcheck.models import config_for, load_corpus
from mupopt.mupcheck.train import OPTIMIZERS, parse_optimizers, pyplot
from mupopt.mupcheck.transfer import train_run
from mupopt.optim import _lean_states as lean

PARAMS = {"fp32": ("fp32", False, False), "bf16": ("bf16", False, False), "bf16-sr": ("bf16", True, False),
          "bf16-kahan": ("bf16", False, True)}


def parse_config(text: str) -> dict:
    """``[PARAMS/]BITS[:MAP]`` -> train_run's options plus the map family."""
    params, _, fmt = text.rpartition("/")
    params = params or "fp32"
    bits, _, maps = fmt.partition(":")
    if params not in PARAMS or bits not in ("8", "16", "32") or (maps and bits != "8"):
        raise SystemExit(f"bad configuration {text!r}: expected [fp32|bf16|bf16-sr|bf16-kahan/]32|16|8[:map]")
    dtype, sr, kahan = PARAMS[params]
    return {"param_dtype": dtype, "stochastic_rounding": sr, "kahan_summation": kahan, "state_bits": int(bits),
            "maps": maps or lean.DEFAULT_MAPS}


class LostUpdates:
    """While active, per optimizer step: the fraction of elements whose update (the change the
    step made, in float32 params) is below half a bfloat16 spacing of the param, i.e. the updates
    that a bfloat16 param rounded to nearest would drop (Zamirai et al. 2020, "Revisiting
    BFloat16 Training", arXiv 2010.06192). The spacing of x in [2^(e-1), 2^e) is 2^(e-8) (8
    significant bits). Through torch's global step hooks, so that the training loop is the one
    of ``mupopt transfer``."""

    def __init__(self):
        self.fractions: list[float] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles = [register_optimizer_step_pre_hook(self._pre),
                         register_optimizer_step_post_hook(self._post)]

    def _pre(self, opt, args, kwargs):
        self._before = [(p, p.detach().clone()) for g in opt.param_groups for p in g["params"] if p.grad is not None]

    def _post(self, opt, args, kwargs):
        lost = total = 0
        for p, old in self._before:
            half = torch.ldexp(torch.ones_like(old), torch.frexp(old.bfloat16().float())[1] - 9)
            nonzero = old != 0
            lost += ((p.detach() - old).abs() < half)[nonzero].sum().item()
            total += nonzero.sum().item()
        self.fractions.append(lost / max(total, 1))

    def close(self):
        for h in self._handles:
            h.remove()


def parse_group(text: str | None) -> dict:
    """``KEY=VALUE[,KEY=VALUE]`` -> {KEY: float(VALUE)}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, eq, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            eq = ""
        if not eq or not key:
            raise SystemExit(f"bad --group item {item!r}: expected KEY=NUMBER")
    return out


def with_group_options(spec, options: dict):
    """``spec`` whose optimizer gets ``options`` set in every param group after construction."""
    if not options:
        return spec

    def make(*a, **k):
        opt = spec.make(*a, **k)
        for g in opt.param_groups:
            unknown = [key for key in options if key not in g]
            if unknown:
                raise SystemExit(f"{spec.name} has no param-group option {unknown}; it has {sorted(g)}")
            g.update(options)
        return opt
    return dataclasses.replace(spec, make=make)


def train(args, save=None) -> list[dict]:
    """Every (optimizer, configuration, seed) run; ``save(rows)`` after each (a long matrix
    keeps what it finished when stopped)."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(1)
    data = load_corpus(None)
    cfg = config_for("gpt", data, base_width=args.base_width, depth=2, n_head=4, block_size=args.seq)
    group = parse_group(args.group)
    rows = []
    for name in parse_optimizers(args.optimizers):
        spec = OPTIMIZERS[name]
        OPTIMIZERS[name] = with_group_options(spec, group)  # train_run builds through OPTIMIZERS
        try:
            for text in args.configs.split(","):
                c = parse_config(text)
                lean.maps = c.pop("maps")
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    probe = LostUpdates() if args.lost_updates and c["param_dtype"] == "fp32" else None
                    try:
                        r = train_run(data, cfg, args.width, name, spec.center * args.lr_scale, param="mup", wd=spec.wd,
                                      steps=args.steps, batch=args.batch, seq=args.seq, seed=seed, curve=True, **c)
                    finally:
                        if probe:
                            probe.close()
                    if probe:  # one entry per step (SophiaG's Hessian refresh is no step)
                        r["lost"] = probe.fractions
                        n = len(probe.fractions)
                        r["lost_thirds"] = " ".join(
                            f"{statistics.mean(probe.fractions[i * n // 3:(i + 1) * n // 3]):.3f}" for i in range(3))
                    r["config"] = text
                    r["lr_scale"] = args.lr_scale
                    r["group"] = args.group or ""
                    rows.append(r)
                    print(f"{name} {text} seed {seed}: val {r['val_loss']:.4f} train {r['train_loss']:.4f} "
                          f"({r['seconds']:.0f} s)", flush=True)
                    if save:
                        save(rows)
        finally:
            OPTIMIZERS[name] = spec
    lean.maps = lean.DEFAULT_MAPS
    return rows


def summary(rows: list[dict], baseline: str | None = None) -> str:
    """Per optimizer and configuration: mean final validation loss over seeds, and its relative
    difference from the baseline configuration (default: the first); then, paired by seed (the
    same init and batches), each seed's relative difference from the baseline, their mean and its
    standard error (sample standard deviation / sqrt(seeds); needs 2 seeds or more)."""
    base = baseline or rows[0]["config"]
    lines = [f"optimizer | config | seeds | mean val loss | vs {base} | paired by seed: mean +- s.e. (per seed)"]
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        val = defaultdict(dict)  # config -> seed -> final validation loss
        for r in rows:
            if r["optimizer"] == name:
                val[r["config"]][r["seed"]] = r["val_loss"]
        if base not in val:
            continue
        mean = {c: statistics.mean(v.values()) for c, v in val.items()}
        for c, v in val.items():
            seeds = sorted(set(v) & set(val[base]))
            d = [100 * (v[s] - val[base][s]) / val[base][s] for s in seeds]
            se = f" +- {statistics.stdev(d) / len(d) ** 0.5:.2f}%" if len(d) > 1 else ""
            paired = (f"{statistics.mean(d):+.2f}%{se} (" + ", ".join(f"{s}: {x:+.2f}%" for s, x in zip(seeds, d)) + ")"
                      if c != base and d else "")
            lines.append(f"{name} | {c} | {len(v)} | {mean[c]:.4f} | "
                         f"{100 * (mean[c] - mean[base]) / mean[base]:+.2f}% | {paired}")
    return "\n".join(lines)


def _smooth(xs: list[float], k: int) -> list[float]:
    """Trailing moving average over k steps (fewer at the start)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(rows: list[dict], path: Path, smooth: int = 25, title: str = "") -> Path | None:
    """One column per optimizer: training loss (top) and its difference from the first
    configuration (bottom), each the mean over seeds of the moving average."""
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return None
    names = sorted(dict.fromkeys(r["optimizer"] for r in rows),
                   key=lambda n: list(OPTIMIZERS).index(n) if n in OPTIMIZERS else len(OPTIMIZERS))
    every = list(dict.fromkeys(r["config"] for r in rows))  # one colour per configuration in every panel
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.5), squeeze=False, sharex=True)
    for j, name in enumerate(names):
        curves = defaultdict(list)
        for r in rows:
            if r["optimizer"] == name and r.get("losses") and not r["diverged"]:
                curves[r["config"]].append(_smooth(r["losses"], smooth))
        mean = {c: [statistics.mean(v) for v in zip(*cs)] for c, cs in curves.items()}
        configs = list(mean)
        if not configs:
            continue
        base = mean[configs[0]]
        lo = min(min(m[len(m) // 4:]) for m in mean.values())
        for c in configs:
            style = dict(color=plt.cm.tab10(every.index(c)), lw=1.2, ls="--" if c.endswith("/8") or c == "8" else "-")
            axes[0][j].plot(range(1, len(mean[c]) + 1), mean[c], label=c, **style)
            axes[1][j].plot(range(1, len(mean[c]) + 1), [a - b for a, b in zip(mean[c], base)], **style)
        axes[0][j].set_ylim(lo - 0.05, lo + 0.9)
        seeds = sorted({r["seed"] for r in rows if r["optimizer"] == name})
        axes[0][j].set_title(f"{name} (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))})", fontsize=10)
        axes[1][j].axhline(0.0, color="k", lw=0.5)
        axes[1][j].set_xlabel("step")
        for ax in axes[:, j]:
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel(f"training loss (moving average, {smooth} steps)")
    axes[1][0].set_ylabel(f"difference from {rows[0]['config']}")
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    axes[0][0].legend([handles[c] for c in every if c in handles], [c for c in every if c in handles], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write(rows: list[dict], out: Path) -> None:
    """``out`` (CSV, without the curves) and the same name .json (with them)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if k not in ("losses", "lost")} for r in rows]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    out.with_suffix(".json").write_text(json.dumps(rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizers", default="adamw", help="comma list of mupopt transfer's names, or 'six'")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr-scale", type=float, default=1.0, help="lr = the optimizer's grid centre times this")
    ap.add_argument("--group", default=None,
                    help="KEY=VALUE[,KEY=VALUE]: param-group options set after construction, e.g. rho=0.1")
    ap.add_argument("--configs", "--formats", dest="configs", default="32,16,8:dynamic,8:linear-sqrt",
                    help="comma list of [fp32|bf16|bf16-sr|bf16-kahan/]32|16|8[:map]; the first is the baseline")
    ap.add_argument("--baseline", default=None, help="the configuration the summary compares with (default: the first)")
    ap.add_argument("--lost-updates", action="store_true",
                    help="fp32-param runs also record, per step, the fraction of updates below half a bf16 spacing")
    ap.add_argument("--out", default=None, help="CSV of the runs (and the same name .json with the loss curves)")
    ap.add_argument("--inputs", default=None, help="plot these JSON files of earlier runs instead of training")
    ap.add_argument("--plot", default=None, help="PNG of the loss curves")
    ap.add_argument("--smooth", type=int, default=25, help="moving-average window of the plotted curves")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    if args.inputs:
        rows = [r for f in args.inputs.split(",") for r in json.loads(Path(f).read_text())]
    else:
        rows = train(args, (lambda rows: write(rows, Path(args.out))) if args.out else None)
    print("\n" + summary(rows, args.baseline))
    if args.plot:
        plot(rows, Path(args.plot), args.smooth, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
