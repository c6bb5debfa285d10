"""``mupopt coord-check``: the coordinate check of Tensor Programs V (Yang et al., arXiv 2203.03466)
for every mupopt optimizer, SP against muP.

For each optimizer, parameterization (``sp``/``mup``), seed and width, a fresh model is trained for
``steps`` steps on one fixed batch (as Microsoft mup's ``get_coord_data`` with ``fix_data=True``).
Forward hooks record, for every tracked module's output at every step t = 1..steps (the forward of
step t sees the weights after t-1 updates, mup's convention):

- ``l1`` = mean |x| (mup's default statistic) and ``rms`` = sqrt(mean x^2): the activation size;
- ``delta_l1`` / ``delta_rms``: the same of x_t - x_1, the change of the module's output since
  initialisation on the same batch. This is what diverges under SP (updates too large in wide
  layers) while the activation size itself may still be dominated by its initial value.

The records carry mup's columns (``width``, ``module``, ``t``, ``l1``) plus ``rms``,
``delta_l1``, ``delta_rms``, ``layer_type``, ``optimizer``, ``param``, ``seed``, ``model``; they
come back as a pandas DataFrame when pandas is installed (else as a list of dicts).

Verdict: for each optimizer, parameterization and layer type, the least-squares slope of
log(delta_rms at the last step) against log(width) (geometric mean over the modules of that type
and over seeds). muP passes a layer type when -``vanish`` < slope < ``flat`` (defaults 0.5 and
0.2): no growth with width (the SP failure) and no decay as fast as 1/sqrt(width) (the lazy,
kernel-regime failure). muP predicts a Theta(1) feature-learning change plus terms through the
random initial weights that shrink like 1/sqrt(width) (e.g. attention logits through
W_q0^T W_k0), so at small widths and few steps a mildly negative slope is expected and passes.
SP "grows" when the slope is > ``grow`` (default 0.4). See docs/mup-results.md for the measured
slopes these thresholds come from.

Over depth (``--depths 2,4,8,16,32``, GPT, fixed width): the same slopes against depth, SP (no
depth rule, residual multiplier 1) against the depth rule (mupopt.set_base_depth, ``--alpha``),
with the extra layer type ``stream``, the last block's output: the residual stream whose change
each block should contribute Theta(1/L) to (docs/mup.md, "Depth"). Same thresholds.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

from .models import PARAM_DTYPES, ModelConfig, build_model, config_for, layer_type, load_corpus
from .train import (NO_MATPLOTLIB, OPTIMIZERS, SIX, Timer, add_storage_arguments, flushing_denormals, as_records, loglog_slope, lm_loss, make_optimizer,
                    parse_optimizers, pyplot, to_frame, train_step, write_csv, write_json)

MUP_COLUMNS = ("width", "module", "t", "l1")  # Microsoft mup's get_coord_data columns
EXTRA_COLUMNS = ("rms", "delta_l1", "delta_rms", "layer_type", "optimizer", "param", "seed", "model")
FLAT = 0.2
VANISH = 0.5
GROW = 0.4
TYPE_ORDER = ("input", "attn_qkv", "attn_logits", "attn_out", "mlp_fc", "mlp_out", "hidden", "residual", "stream", "output")
# The parameterization each axis compares with SP: muP across widths, the depth rule across depths.
RULE = {"width": "mup", "depth": "depth"}


class _Recorder:
    """Forward hooks on the tracked modules; records only while ``active``."""

    def __init__(self, model, kind: str, base: dict):
        self.t = 0
        self.active = True
        self.base = base
        self.init: dict[str, torch.Tensor] = {}
        self.rows: list[dict] = []
        self.handles = []
        for name, module in model.named_modules():
            lt = layer_type(kind, name)
            if lt is not None:
                self.handles.append(module.register_forward_hook(self._hook(name, lt)))

    def _hook(self, name: str, lt: str):
        def hook(module, inputs, output):
            if not self.active:
                return
            with torch.no_grad():
                x = output.detach().float()
                if name not in self.init:
                    self.init[name] = x.clone()
                d = x - self.init[name]
                self.rows.append({
                    "width": self.base["width"], "module": name, "t": self.t, "l1": x.abs().mean().item(),
                    "rms": x.pow(2).mean().sqrt().item(), "delta_l1": d.abs().mean().item(),
                    "delta_rms": d.pow(2).mean().sqrt().item(), "layer_type": lt, **self.base,
                })
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _fixed_batch(cfg: ModelConfig, data, batch: int, seq: int, seed: int, device):
    gen = torch.Generator().manual_seed(1000 + seed)
    if cfg.kind == "gpt":
        return data.batch("train", batch, seq, gen, device)
    x = torch.randn(batch, cfg.d_in, generator=gen).to(device)
    y = torch.randint(0, cfg.d_out, (batch,), generator=gen).to(device)
    return x, y


def coord_data(
    optimizers=SIX,
    widths=(64, 128, 256, 512),
    *,
    model: str = "gpt",
    params=("sp", "mup"),
    steps: int = 5,
    seeds: int = 3,
    lr: float | dict | None = None,
    base_width: int | None = None,
    batch: int = 8,
    seq: int = 16,
    depth: int = 2,
    n_head: int = 4,
    device: str = "cpu",
    corpus: str | None = None,
    hess_every: int = 1,
    state_bits: int = 32,
    param_dtype: str = "fp32",
    stochastic_rounding: bool = False,
    kahan_summation: bool = False,
    depths=None,
    alpha: float = 1.0,
    progress=None,
) -> list[dict]:
    """Train every (optimizer, param, seed, width) for ``steps`` steps on one batch; return the
    coordinate records (see the module docstring). ``lr``: one value, a dict by optimizer, or
    None for each optimizer's default (OPTIMIZERS[name].lr); it is the lr at the base width.

    ``depths``: the check over depth instead (GPT only) at the fixed width ``widths[0]`` (its
    own base width, so every width multiplier is 1): params "sp" (residual multiplier 1, no
    depth rule) and "depth" (mupopt.set_base_depth with ``alpha`` against the smallest depth);
    the records gain a ``depth`` column and a ``stream`` layer type (the last block's output,
    the residual stream the readout sees)."""
    widths = sorted(widths)
    data = load_corpus(corpus) if model == "gpt" else None
    if depths:
        if model != "gpt":
            raise ValueError("the coordinate check over depth needs residual blocks: model 'gpt'")
        params = tuple("depth" if p == "mup" else p for p in params)
        runs = [(widths[0], d) for d in sorted(depths)]
        base_width = widths[0]
    else:
        runs = [(w, depth) for w in widths]
    rows: list[dict] = []
    for name in optimizers:
        opt_lr = lr.get(name, OPTIMIZERS[name].lr) if isinstance(lr, dict) else (lr or OPTIMIZERS[name].lr)
        for param in params:
            for seed in range(seeds):
                for width, d in runs:
                    clock = Timer()
                    torch.manual_seed(seed)
                    rule = {"alpha": alpha, "base_depth": min(depths)} if (depths and param == "depth") else {}
                    cfg = config_for(model, data, base_width=base_width or widths[0], depth=d, n_head=n_head,
                                     block_size=max(seq, 8), **rule)
                    # Over depth, SP keeps the width information (multipliers 1 at this, the base
                    # width): only the depth rule differs between the two (Muon routes by it).
                    net = build_model(cfg, width, "mup" if depths else param, seed=seed, device=device,
                                      param_dtype=param_dtype)
                    x, y = _fixed_batch(cfg, data, batch, seq, seed, device)
                    if x.is_floating_point():  # the MLP's inputs, in the params' dtype
                        x = x.to(PARAM_DTYPES[param_dtype])
                    opt = make_optimizer(name, net, opt_lr, wd=0.0, state_bits=state_bits,
                                         stochastic_rounding=stochastic_rounding, kahan_summation=kahan_summation)
                    base = {"width": width, "optimizer": name, "param": param, "seed": seed, "model": model}
                    if depths:
                        base["depth"] = d
                    rec = _Recorder(net, model, base)
                    if depths:
                        rec.handles.append(net.blocks[-1].register_forward_hook(rec._hook("stream", "stream")))

                    def pause():
                        rec.active = False

                    for t in range(1, steps + 1):
                        rec.t, rec.active = t, True
                        if model == "gpt":
                            train_step(opt, net, x, y, t - 1, hess_every=hess_every, before_hessian=pause)
                        else:
                            _mlp_step(opt, net, x, y, t - 1, hess_every, pause)
                    rec.remove()
                    rows.extend(rec.rows)
                    if progress:
                        progress(f"{name} {param} seed {seed} width {width} depth {d}: {clock():.1f}s")
    return rows


def _mlp_step(opt, net, x, y, step, hess_every, pause):
    from ..optim import SophiaG

    loss = torch.nn.functional.cross_entropy(net(x).float(), y)  # float32 loss, as lm_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(opt, SophiaG):
        opt.step(bs=x.shape[0])
        if step % hess_every == hess_every - 1:
            pause()
            opt.update_hessian_from_logits(net(x))
    else:
        opt.step()


def get_coord_data(*args, **kwargs):
    """:func:`coord_data` as a pandas DataFrame (a list of dicts when pandas is absent), with the
    columns of Microsoft mup's ``get_coord_data`` first."""
    return to_frame(coord_data(*args, **kwargs))


def axis_of(records: list[dict]) -> str:
    """"depth" for records of the check over depth (they carry a depth column), else "width"."""
    return "depth" if records and records[0].get("depth") is not None else "width"


def _aggregate(records: list[dict], key: str, t: int | None = None, axis: str = "width") -> dict:
    """{(optimizer, param, layer_type, t): {width (or depth): geometric mean of ``key``}}."""
    acc: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if t is not None and r["t"] != t:
            continue
        v = r[key]
        if v is not None and v > 0 and math.isfinite(v):
            acc[(r["optimizer"], r["param"], r["layer_type"], r["t"])][r[axis]].append(math.log(v))
    return {k: {w: math.exp(sum(v) / len(v)) for w, v in d.items()} for k, d in acc.items()}


def verdicts(records, flat: float = FLAT, grow: float = GROW, vanish: float = VANISH) -> list[dict]:
    """One row per (optimizer, layer_type): log-log slopes against width at the last step of the
    change since init (``*_delta_slope``) and of the activation size (``*_act_slope``), SP and
    muP, and the verdicts ``mup_flat`` (-vanish < muP delta slope < flat) and ``sp_grows``
    (SP delta slope > grow)."""
    records = as_records(records)
    if not records:
        return []
    axis = axis_of(records)
    rule = RULE[axis]
    last = max(r["t"] for r in records)
    delta = _aggregate(records, "delta_rms", last, axis)
    act = _aggregate(records, "rms", last, axis)
    keys = sorted({(k[0], k[2]) for k in delta} | {(k[0], k[2]) for k in act},
                  key=lambda k: (k[0], TYPE_ORDER.index(k[1]) if k[1] in TYPE_ORDER else 99))
    out = []
    for opt, lt in keys:
        row = {"optimizer": opt, "layer_type": lt, "t": last, "axis": axis}
        for param in ("sp", rule):
            for name, table in (("delta", delta), ("act", act)):
                d = table.get((opt, param, lt, last))
                row[f"{param}_{name}_slope"] = loglog_slope(list(d), list(d.values())) if d else float("nan")
        slope = row[f"{rule}_delta_slope"]
        row[f"{rule}_flat"] = bool(-vanish < slope < flat) if math.isfinite(slope) else None
        row["sp_grows"] = bool(row["sp_delta_slope"] > grow) if math.isfinite(row["sp_delta_slope"]) else None
        out.append(row)
    return out


def format_verdicts(rows: list[dict]) -> str:
    rule = RULE[rows[0].get("axis", "width")] if rows else "mup"
    label = "muP" if rule == "mup" else "depth"
    header = ("optimizer", "layer type", "SP dx slope", f"{label} dx slope", "SP act slope", f"{label} act slope",
              f"{label} flat", "SP grows")
    body = []
    for r in rows:
        f = lambda v: "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.2f}"
        yn = lambda v: "n/a" if v is None else ("yes" if v else "NO")
        body.append((r["optimizer"], r["layer_type"], f(r.get("sp_delta_slope")), f(r.get(f"{rule}_delta_slope")),
                     f(r.get("sp_act_slope")), f(r.get(f"{rule}_act_slope")), yn(r[f"{rule}_flat"]), yn(r["sp_grows"])))
    widths = [max(len(str(x[i])) for x in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def plot(records, out_dir: Path, prefix: str = "coord") -> list[Path]:
    """One PNG per optimizer: rows = activation RMS and RMS of the change since init; columns =
    SP and muP; one line per layer type and step (darker = later), against width (log-log)."""
    plt = pyplot()
    if plt is None:
        print(NO_MATPLOTLIB, file=sys.stderr)
        return []
    records = as_records(records)
    out_dir.mkdir(parents=True, exist_ok=True)
    axis = axis_of(records)
    rule = RULE[axis]
    act, delta = _aggregate(records, "rms", axis=axis), _aggregate(records, "delta_rms", axis=axis)
    slopes = {(r["optimizer"], r["layer_type"]): r for r in verdicts(records)}
    steps = sorted({r["t"] for r in records})
    paths = []
    for opt in dict.fromkeys(r["optimizer"] for r in records):
        types = [lt for lt in TYPE_ORDER if any(k[0] == opt and k[2] == lt for k in act)]
        colors = {lt: plt.cm.tab10(i % 10) for i, lt in enumerate(types)}
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey="row", squeeze=False)
        for col, param in enumerate(("sp", rule)):
            for row, (table, what) in enumerate(((act, "activation RMS"), (delta, "RMS of change since init"))):
                ax = axes[row][col]
                for lt in types:
                    for i, t in enumerate(steps):
                        d = table.get((opt, param, lt, t))
                        if not d or (row == 1 and t == 1):
                            continue
                        ws = sorted(d)
                        label = None
                        if t == steps[-1]:
                            s = slopes.get((opt, lt), {}).get(f"{param}_{'act' if row == 0 else 'delta'}_slope")
                            label = f"{lt} (slope {s:+.2f})" if s is not None and math.isfinite(s) else lt
                        ax.plot(ws, [d[w] for w in ws], "o-", ms=3, color=colors[lt],
                                alpha=0.25 + 0.75 * (i + 1) / len(steps), label=label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{opt}, {'SP' if param == 'sp' else ('muP' if param == 'mup' else 'depth rule')}: {what}",
                             fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if row == 1:
                    ax.set_xlabel(axis)
                ax.legend(fontsize=7, loc="best")
        fig.suptitle(f"coordinate check, {opt}: steps t=1..{steps[-1]} (darker = later); slopes at t={steps[-1]}")
        fig.tight_layout()
        path = out_dir / f"{prefix}-{opt}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


@flushing_denormals
def run(optimizers=SIX, widths=(64, 128, 256, 512), *, out: str | Path = "mupcheck-out/coord", plots: bool = True,
        flat: float = FLAT, grow: float = GROW, vanish: float = VANISH, verbose: bool = False, prefix: str | None = None, **kwargs) -> dict:
    """coord_data + verdicts + files: ``coord[-MODEL].csv``, ``coord[-MODEL]-verdict.json``,
    ``coord[-MODEL]-OPT.png``. Returns {"frame", "verdicts", "files", "seconds"}."""
    out = Path(out)
    prefix = prefix or f"coord-{kwargs.get('model', 'gpt')}" + ("-depth" if kwargs.get("depths") else "")
    clock = Timer()
    progress = (lambda m: print(f"  {m}", file=sys.stderr)) if verbose else None
    records = coord_data(optimizers, widths, progress=progress, **kwargs)
    rows = verdicts(records, flat, grow, vanish)
    files = [write_csv(records, out / f"{prefix}.csv")]
    summary = {"settings": {"optimizers": list(optimizers), "widths": sorted(widths), "flat": flat, "grow": grow, "vanish": vanish,
                            **{k: v for k, v in kwargs.items() if k != "progress"}},
               "verdicts": rows, "seconds": round(clock(), 1)}
    if kwargs.get("depths"):
        summary["settings"]["depths"] = sorted(kwargs["depths"])
    files.append(write_json(summary, out / f"{prefix}-verdict.json"))
    if plots:
        files.extend(plot(records, out, prefix))
    return {"frame": to_frame(records), "verdicts": rows, "files": files, "seconds": clock()}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", choices=("gpt", "mlp"), default="gpt", help="width family (default gpt)")
    parser.add_argument("--optimizers", default="six",
                        help=f"comma list from {list(OPTIMIZERS)}, 'six' (default) or 'all'")
    parser.add_argument("--widths", type=_ints, default=[64, 128, 256, 512], help="comma list (default 64,128,256,512)")
    parser.add_argument("--base-width", type=int, default=None, help="muP base width (default: the smallest width)")
    parser.add_argument("--params", default="sp,mup", help="parameterizations, comma list of sp, mup (default both)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("--lr", type=float, default=None, help="lr at the base width for every optimizer "
                        "(default: each optimizer's own, see mupopt.mupcheck.train.OPTIMIZERS)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8; MLP: 8 samples)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length for the GPT (default 16)")
    parser.add_argument("--depth", type=int, default=2, help="blocks / hidden layers (default 2)")
    parser.add_argument("--depths", type=_ints, default=None,
                        help="check over depth instead, e.g. 2,4,8,16,32 (GPT, fixed width = the first of --widths; "
                             "SP vs the depth rule of mupopt.set_base_depth against the smallest depth)")
    parser.add_argument("--alpha", type=float, default=1.0, help="depth rule's residual exponent (1 CompleteP, "
                        "0.5 depth-muP; default 1)")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads, fixed across widths (default 4)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    add_storage_arguments(parser)
    parser.add_argument("--corpus", default=None, help="text file for the GPT (default: the shipped Tiny Shakespeare excerpt)")
    parser.add_argument("--flat", type=float, default=FLAT, help=f"muP passes when slope < this (default {FLAT})")
    parser.add_argument("--vanish", type=float, default=VANISH,
                        help=f"muP fails when slope < -this (decay like 1/sqrt(width): lazy regime; default {VANISH})")
    parser.add_argument("--grow", type=float, default=GROW, help=f"SP counts as growing when slope > this (default {GROW})")
    parser.add_argument("--out", default="mupcheck-out/coord", help="output directory (default mupcheck-out/coord)")
    parser.add_argument("--prefix", default=None, help="file name prefix (default coord-MODEL)")
    parser.add_argument("--no-plots", action="store_true", help="write CSV/JSON only")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run as it finishes")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the check; print the verdict table; exit 1 when a muP layer type is not flat."""
    result = run(
        parse_optimizers(args.optimizers), args.widths, out=args.out, plots=not args.no_plots, flat=args.flat,
        grow=args.grow, vanish=args.vanish, verbose=args.verbose, prefix=args.prefix, model=args.model, params=tuple(args.params.split(",")),
        steps=args.steps, seeds=args.seeds, lr=args.lr, base_width=args.base_width, batch=args.batch, seq=args.seq,
        depth=args.depth, n_head=args.n_head, device=args.device, corpus=args.corpus, state_bits=args.state_bits,
        param_dtype=args.param_dtype, stochastic_rounding=args.stochastic_rounding,
        kahan_summation=args.kahan_summation,
        **({"depths": args.depths, "alpha": args.alpha} if args.depths else {}),
    )
    print(format_verdicts(result["verdicts"]))
    print(f"\nwrote {len(result['files'])} files under {args.out} in {result['seconds']:.0f} s")
    rule = RULE["depth" if args.depths else "width"]
    bad = [r for r in result["verdicts"] if r[f"{rule}_flat"] is False]
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="mupopt coord-check", description=__doc__.split("\n")[0]))


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
