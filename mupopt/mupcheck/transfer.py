"""``mupopt transfer``: learning-rate transfer across widths for the small character GPT.

For every optimizer, parameterization (``sp``/``mup``), weight-decay mode and width, a model is
trained from the same seed on the same batches for each learning rate of a log grid (factor
``spacing`` between points, centred on the optimizer's default or ``--lr-center``); the
validation loss of each run is recorded. A learning rate always means the group lr at the base
width, where SP and muP coincide.

Outputs (under ``--out``): ``transfer.csv`` / ``transfer.json`` (one row per run), a summary
``transfer-summary.json`` and one PNG per optimizer (validation loss against lr, one line per
width, one panel per parameterization / weight-decay mode).

Summary numbers per (optimizer, param, wd_mode):

- ``best_lr`` / ``best_index`` per width: the grid argmin of the validation loss (diverged runs
  count as +inf), and ``best_log2_lr``, a parabola fitted through the minimum and its neighbours
  in log2(lr) (a finer estimate than the grid);
- ``shift_steps``: max - min of ``best_index`` across widths, in grid steps (P1's pass criterion:
  at most one step across widths >= 128), and ``shift_steps_wide`` over widths >= ``wide``
  (default 128);
- ``fixed_lr_monotone``: at the lr that is best at the base width, whether the loss never gets
  worse as the width grows (P1's second criterion), with the losses.

Over depth (``--depths 2,4,16``): the same sweep at one width (the first of ``--widths``) and
several depths, SP (no depth rule) against the depth rule of mupopt.set_base_depth (``--alpha``,
base depth the smallest); the summary's ``widths`` then lists depths (``axis`` "depth").

Weight decay (P2, Kosson et al., arXiv 2510.19093): ``--wd-modes independent,coupled`` runs muP
with both decay modes; the difference needs training long compared with 1/(lr*wd) steps, so at
CPU scale pass a large ``--wd`` to shorten that time scale (and say so when quoting results).
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .models import build_model, config_for, load_corpus
from .train import (NO_MATPLOTLIB, OPTIMIZERS, SIX, Timer, add_storage_arguments, flushing_denormals, as_records, lm_loss, lr_factor, make_optimizer,
                    parse_optimizers, pyplot, scale_lr, to_frame, train_step, write_csv, write_json)


def lr_grid(center: float, points: int = 7, spacing: float = 2.0) -> list[float]:
    """``points`` learning rates spaced by ``spacing``, centred (in log) on ``center``."""
    lo = -(points - 1) / 2
    return [center * spacing ** (lo + i) for i in range(points)]


@torch.no_grad()
def _evaluate(model, data, batches, seq, device, seed=12345, n=8) -> float:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x, y = data.batch("val", batches, seq, gen, device)
        losses.append(lm_loss(model(x), y).item())
    return sum(losses) / len(losses)


def train_run(data, cfg, width: int, optimizer: str, lr: float, *, param: str = "mup", wd: float = 0.0,
              wd_mode: str = "independent", steps: int = 150, batch: int = 16, seq: int = 64, seed: int = 0,
              device: str = "cpu", hess_every: int = 10, precondition_frequency: int = 10,
              muon_adamw_ratio: float = 0.1, eval_batches: int = 8, width_param: str | None = None,
              state_bits: int = 32, param_dtype: str = "fp32", stochastic_rounding: bool = False,
              kahan_summation: bool = False, curve: bool = False) -> dict:
    """Train one model; return its record (losses nan when it diverged). ``width_param``: the
    width parameterization to build with when it is not ``param`` (the depth sweeps).
    ``param_dtype`` ("fp32", "bf16"), ``stochastic_rounding``, ``kahan_summation`` and ``state_bits``: the
    memory-lean options (docs/lean-states.md); ``curve``: the record also holds every step's
    training loss (``losses``)."""
    clock = Timer()
    torch.manual_seed(seed)
    model = build_model(cfg, width, width_param or param, seed=seed, device=device, param_dtype=param_dtype)
    opt = make_optimizer(optimizer, model, lr, wd=wd, wd_mode=wd_mode,
                         precondition_frequency=precondition_frequency, muon_adamw_ratio=muon_adamw_ratio,
                         state_bits=state_bits, stochastic_rounding=stochastic_rounding,
                         kahan_summation=kahan_summation)
    gen = torch.Generator().manual_seed(seed)
    tail = max(1, steps // 10)
    losses = []
    diverged = False
    first = None
    for step in range(steps):
        scale_lr(opt, lr_factor(step, steps))
        x, y = data.batch("train", batch, seq, gen, device)
        loss = train_step(opt, model, x, y, step, hess_every=hess_every)
        first = loss if first is None else first
        losses.append(loss)
        if not math.isfinite(loss) or loss > first + 3.0:
            diverged = True
            break
    val = float("nan") if diverged else _evaluate(model, data, batch, seq, device, n=eval_batches)
    if not math.isfinite(val):
        diverged = True
    record = {
        "optimizer": optimizer, "param": param, "wd_mode": wd_mode, "width": width, "depth": cfg.depth, "lr": lr, "seed": seed,
        "steps": steps, "weight_decay": wd, "train_loss": float("nan") if diverged else sum(losses[-tail:]) / tail,
        "val_loss": val, "diverged": diverged, "seconds": round(clock(), 2), "state_bits": state_bits,
        "param_dtype": param_dtype, "stochastic_rounding": stochastic_rounding, "kahan_summation": kahan_summation,
    }
    if curve:
        record["losses"] = losses
    return record


def sweep(optimizers=SIX, widths=(32, 64, 128), *, params=("sp", "mup"), wd_modes=("independent",),
          lrs: list[float] | None = None, lr_center: float | None = None, points: int = 7, spacing: float = 2.0,
          steps: int = 150, batch: int = 16, seq: int = 64, depth: int = 2, n_head: int = 4,
          base_width: int | None = None, seeds: int = 1, wd: float | None = None, device: str = "cpu",
          corpus: str | None = None, hess_every: int = 10, precondition_frequency: int = 10,
          muon_adamw_ratio: float = 0.1, eval_batches: int = 8, depths=None, alpha: float = 1.0,
          joint: bool = False, state_bits: int = 32, param_dtype: str = "fp32", stochastic_rounding: bool = False,
          kahan_summation: bool = False, progress=None) -> list[dict]:
    """Every (optimizer, param, wd_mode, seed, width, lr) run; the records of :func:`train_run`.
    SP runs use only the first wd mode (SP has no lr multipliers, so the modes coincide); LAMB
    has no wd mode (its decay is inside the trust-ratio update).

    ``depths``: the sweep over depth instead, at the fixed width ``widths[0]`` (its own base
    width): params "sp" (no depth rule) and "depth" (mupopt.set_base_depth with ``alpha``
    against the smallest depth; "mup" in ``params`` means it). ``joint``: width and depth grow
    together, the i-th width with the i-th depth (e.g. widths 32,64 with depths 2,8): "depth"
    is then muP in width plus the depth rule, "sp" standard parameterization in both."""
    widths = sorted(widths)
    data = load_corpus(corpus)
    if joint and (not depths or len(depths) != len(widths)):
        raise ValueError(f"joint=True pairs widths with depths: got {len(widths)} widths and {len(depths or ())} depths")
    if depths:
        params = tuple("depth" if p == "mup" else p for p in params)
        runs = list(zip(widths, sorted(depths))) if joint else [(widths[0], d) for d in sorted(depths)]
        base_width = widths[0]
    else:
        runs = [(w, depth) for w in widths]

    def cfg_for(param, d):
        rule = {"alpha": alpha, "base_depth": min(depths)} if (depths and param == "depth") else {}
        return config_for("gpt", data, base_width=base_width or widths[0], depth=d, n_head=n_head, block_size=seq,
                          **rule)
    records = []
    for name in optimizers:
        spec = OPTIMIZERS[name]
        grid = lrs or lr_grid(lr_center or spec.center, points, spacing)
        decay = spec.wd if wd is None else wd
        for param in params:
            modes = [m for m in wd_modes if m in spec.wd_modes] or [spec.wd_modes[0]]
            if param == "sp":
                modes = modes[:1]
            for mode in modes:
                for seed in range(seeds):
                    for width, d in runs:
                        cfg = cfg_for(param, d)
                        # Over depth alone, SP keeps the width information (all multipliers 1 at
                        # this, the base width): only the depth rule differs (Muon routes by it).
                        width_param = ("sp" if joint else "mup") if param == "sp" and depths else (
                            "mup" if param == "depth" else None)
                        for lr in grid:
                            r = train_run(data, cfg, width, name, lr, param=param, wd=decay, wd_mode=mode,
                                          width_param=width_param,
                                          steps=steps, batch=batch, seq=seq, seed=seed, device=device,
                                          hess_every=hess_every, precondition_frequency=precondition_frequency,
                                          muon_adamw_ratio=muon_adamw_ratio, eval_batches=eval_batches,
                                          state_bits=state_bits, param_dtype=param_dtype,
                                          stochastic_rounding=stochastic_rounding, kahan_summation=kahan_summation)
                            r["grid_index"] = grid.index(lr)
                            records.append(r)
                            if progress:
                                progress(f"{name} {param} {mode} w={width} d={d} lr={lr:.3g}: val {r['val_loss']:.4f} "
                                         f"({r['seconds']:.1f}s)")
    return records


def _parabola_min(xs: list[float], ys: list[float], i: int) -> float:
    """x of the vertex of the parabola through points i-1, i, i+1 (x itself at an edge)."""
    if i == 0 or i == len(xs) - 1 or not all(math.isfinite(y) for y in ys[i - 1:i + 2]):
        return xs[i]
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1:i + 2], ys[i - 1:i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    return -b / (2 * a) if a > 0 else xs[i]


def axis_of(records: list[dict]) -> str:
    """"depth" for a sweep over depth (its runs differ in depth; in a joint sweep also in
    width, one width per depth), else "width"."""
    return "depth" if len({r.get("depth") for r in records}) > 1 else "width"


def summarize(records, wide: int = 128) -> list[dict]:
    """Per (optimizer, param, wd_mode): best lr per width (or per depth in a sweep over depth,
    where ``widths`` lists the depths and ``axis`` says so), shift in grid steps, fixed-lr trend."""
    records = as_records(records)
    axis = axis_of(records)
    groups: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        loss = r["val_loss"]
        loss = float("inf") if (loss is None or not math.isfinite(loss)) else loss
        cell = groups[(r["optimizer"], r["param"], r["wd_mode"])][r[axis]]
        cell.setdefault(r["lr"], []).append(loss)
    out = []
    for (opt, param, mode), by_width in groups.items():
        widths = sorted(by_width)
        grid = sorted({lr for w in widths for lr in by_width[w]})
        best = {}
        for w in widths:
            losses = [sum(by_width[w].get(lr, [math.inf])) / len(by_width[w].get(lr, [1])) for lr in grid]
            i = min(range(len(grid)), key=lambda k: losses[k])
            logs = [math.log2(lr) for lr in grid]
            best[w] = {"best_lr": grid[i], "best_index": i, "best_loss": losses[i],
                       "best_log2_lr": _parabola_min(logs, losses, i), "losses": losses,
                       "edge": i in (0, len(grid) - 1)}
        idx = [best[w]["best_index"] for w in widths]
        wide_idx = [best[w]["best_index"] for w in widths if w >= wide]
        base_lr = best[widths[0]]["best_lr"]
        j = grid.index(base_lr)
        fixed = [best[w]["losses"][j] for w in widths]
        out.append({
            "optimizer": opt, "param": param, "wd_mode": mode, "axis": axis, "widths": widths, "grid": grid,
            "best_lr": [best[w]["best_lr"] for w in widths], "best_index": idx,
            "best_log2_lr": [round(best[w]["best_log2_lr"], 3) for w in widths],
            "best_loss": [best[w]["best_loss"] for w in widths],
            "best_at_grid_edge": [best[w]["edge"] for w in widths],
            "shift_steps": max(idx) - min(idx),
            "drift_steps": idx[-1] - idx[0],
            "shift_steps_wide": (max(wide_idx) - min(wide_idx)) if len(wide_idx) >= 2 and axis == "width" else None,
            "fixed_lr": base_lr, "fixed_lr_losses": fixed,
            "fixed_lr_monotone": all(b <= a + 1e-3 for a, b in zip(fixed, fixed[1:])),
        })
    return out


def format_summary(rows: list[dict]) -> str:
    axis = rows[0].get("axis", "width") if rows else "width"
    header = ("optimizer", "param", "wd", f"best lr per {axis} ({','.join(map(str, rows[0]['widths'])) if rows else ''})",
              "shift", "drift", "loss at base-best lr", "monotone")
    body = []
    for r in rows:
        lrs = " ".join(f"{lr:.2g}{'*' if e else ''}" for lr, e in zip(r["best_lr"], r["best_at_grid_edge"]))
        fixed = " ".join("div" if not math.isfinite(v) else f"{v:.3f}" for v in r["fixed_lr_losses"])
        body.append((r["optimizer"], r["param"], r["wd_mode"], lrs, str(r["shift_steps"]), f"{r['drift_steps']:+d}",
                     fixed, "yes" if r["fixed_lr_monotone"] else "no"))
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def plot(records, out_dir: Path, prefix: str = "transfer") -> list[Path]:
    """One PNG per optimizer: validation loss against lr, one line per width; one panel per
    (parameterization, weight-decay mode); the best lr of each width marked."""
    plt = pyplot()
    if plt is None:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return []
    records = as_records(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {(s["optimizer"], s["param"], s["wd_mode"]): s for s in summarize(records)}
    paths = []
    for opt in dict.fromkeys(r["optimizer"] for r in records):
        panels = [k for k in summary if k[0] == opt]
        panels.sort(key=lambda k: (k[1] != "sp", k[2] != "independent"))  # SP first
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharex=True, sharey=True, squeeze=False)
        finite = [r["val_loss"] for r in records if r["optimizer"] == opt and r["val_loss"] is not None
                  and math.isfinite(r["val_loss"])]
        for ax, key in zip(axes[0], panels):
            s = summary[key]
            cmap = plt.cm.viridis
            for k, w in enumerate(s["widths"]):
                losses = [r for r in records if (r["optimizer"], r["param"], r["wd_mode"]) == key and r[s["axis"]] == w]
                by_lr = defaultdict(list)
                for r in losses:
                    v = r["val_loss"]
                    by_lr[r["lr"]].append(v if v is not None and math.isfinite(v) else math.nan)
                xs = sorted(by_lr)
                ys = [sum(by_lr[x]) / len(by_lr[x]) for x in xs]
                color = cmap(k / max(1, len(s["widths"]) - 1))
                ax.plot(xs, ys, "o-", ms=3, color=color, label=f"{s['axis']} {w}")
                ax.plot([s["best_lr"][k]], [s["best_loss"][k]], "*", ms=12, color=color, mec="k")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            title = f"{opt} {dict(sp='SP', mup='muP', depth='depth rule')[key[1]]}" + (f", wd {key[2]}" if key[1] == "mup" else "")
            ax.set_title(f"{title}\nbest-lr shift {s['shift_steps']} grid step(s)", fontsize=10)
            ax.set_xlabel("learning rate (at the base width)")
            ax.grid(True, which="both", alpha=0.3)
            if finite:
                lo = min(finite)
                ax.set_ylim(lo - 0.05, min(max(finite), lo + 1.2) + 0.05)
        axes[0][0].set_ylabel("validation loss")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{prefix}-{opt}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


@flushing_denormals
def run(optimizers=SIX, widths=(32, 64, 128), *, out: str | Path = "mupcheck-out/transfer", plots: bool = True,
        verbose: bool = False, prefix: str = "transfer", wide: int = 128, **kwargs) -> dict:
    """sweep + summary + files (``PREFIX.csv``, ``PREFIX.json``, ``PREFIX-summary.json``,
    ``PREFIX-OPT.png``). Returns {"frame", "summary", "files", "seconds"}."""
    out = Path(out)
    clock = Timer()
    progress = (lambda m: print(f"  {m}", file=sys.stderr)) if verbose else None
    records = sweep(optimizers, widths, progress=progress, **kwargs)
    summary = summarize(records, wide)
    files = [write_csv(records, out / f"{prefix}.csv"), write_json(records, out / f"{prefix}.json")]
    settings = {"optimizers": list(optimizers), "widths": sorted(widths), **kwargs}
    if settings.get("depths"):
        settings["depths"] = sorted(settings["depths"])
    files.append(write_json({"settings": settings, "summary": summary, "seconds": round(clock(), 1)},
                            out / f"{prefix}-summary.json"))
    if plots:
        files.extend(plot(records, out, prefix))
    return {"frame": to_frame(records), "summary": summary, "files": files, "seconds": clock()}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--optimizers", default="six", help=f"comma list from {list(OPTIMIZERS)}, 'six' (default) or 'all'")
    parser.add_argument("--widths", type=_ints, default=[32, 64, 128], help="comma list (default 32,64,128)")
    parser.add_argument("--base-width", type=int, default=None, help="muP base width (default: the smallest width)")
    parser.add_argument("--params", default="sp,mup", help="parameterizations, comma list of sp, mup (default both)")
    parser.add_argument("--wd-modes", default="independent",
                        help="muP weight-decay modes, comma list of independent, coupled, inverse_width (default independent)")
    parser.add_argument("--wd", type=float, default=None, help="weight decay (default: per optimizer, see train.OPTIMIZERS)")
    parser.add_argument("--lrs", type=_floats, default=None, help="explicit lr grid (comma list); overrides the grid options")
    parser.add_argument("--lr-center", type=float, default=None, help="centre of the lr grid (default: per optimizer)")
    parser.add_argument("--points", type=int, default=7, help="lr grid points (default 7)")
    parser.add_argument("--spacing", type=float, default=2.0, help="factor between grid points (default 2)")
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seq", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--depths", type=_ints, default=None,
                        help="sweep over depth instead, e.g. 2,4,8,16 (fixed width = the first of --widths; SP vs "
                             "the depth rule of mupopt.set_base_depth against the smallest depth)")
    parser.add_argument("--alpha", type=float, default=1.0, help="depth rule's residual exponent (1 CompleteP, "
                        "0.5 depth-muP; default 1)")
    parser.add_argument("--joint", action="store_true", help="with --depths: width and depth grow together, the "
                        "i-th width with the i-th depth (muP + depth rule vs SP in both)")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per point (default 1)")
    parser.add_argument("--hess-every", type=int, default=10, help="SophiaG Hessian update interval (default 10)")
    parser.add_argument("--precondition-frequency", type=int, default=10, help="Shampoo root refresh interval (default 10)")
    parser.add_argument("--muon-adamw-ratio", type=float, default=0.1, help="Muon: adamw_lr = ratio * lr (default 0.1)")
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches (default 8)")
    parser.add_argument("--wide", type=int, default=128, help="shift_steps_wide counts widths >= this (default 128)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    add_storage_arguments(parser)
    parser.add_argument("--corpus", default=None, help="text file (default: the shipped Tiny Shakespeare excerpt)")
    parser.add_argument("--out", default="mupcheck-out/transfer", help="output directory (default mupcheck-out/transfer)")
    parser.add_argument("--prefix", default="transfer", help="file name prefix (default transfer)")
    parser.add_argument("--no-plots", action="store_true", help="write CSV/JSON only")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run as it finishes")
    return parser


def main(args: argparse.Namespace) -> int:
    result = run(
        parse_optimizers(args.optimizers), args.widths, out=args.out, plots=not args.no_plots, verbose=args.verbose,
        prefix=args.prefix, wide=args.wide, params=tuple(args.params.split(",")),
        wd_modes=tuple(args.wd_modes.split(",")), wd=args.wd, lrs=args.lrs, lr_center=args.lr_center,
        points=args.points, spacing=args.spacing, steps=args.steps, batch=args.batch, seq=args.seq,
        depth=args.depth, n_head=args.n_head, base_width=args.base_width, seeds=args.seeds, device=args.device,
        corpus=args.corpus, hess_every=args.hess_every, precondition_frequency=args.precondition_frequency,
        muon_adamw_ratio=args.muon_adamw_ratio, eval_batches=args.eval_batches, state_bits=args.state_bits,
        param_dtype=args.param_dtype, stochastic_rounding=args.stochastic_rounding,
        kahan_summation=args.kahan_summation,
        **({"depths": args.depths, "alpha": args.alpha, "joint": args.joint} if args.depths else {}),
    )
    print(format_summary(result["summary"]))
    print(f"\nwrote {len(result['files'])} files under {args.out} in {result['seconds']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="mupopt transfer", description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
