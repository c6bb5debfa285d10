"""What coord_check and transfer share: the optimizer table, one training step, output helpers.

Optimizer names (``--optimizers``): the six mupopt optimizers and three variants of the muP rule
table that the tools compare.

=================  ==========================================================================
adamw              mupopt.AdamW
adopt              mupopt.ADOPT
lamb               mupopt.LAMB, hidden_lr_exponent 0 (P1's rule, the default)
lamb-strict        mupopt.LAMB, hidden_lr_exponent -1/2 (the strict derivation, docs/mup.md)
sophia             mupopt.SophiaG, ``step(bs=tokens)``, GNB Hessian every ``hess_every`` steps
muon               mupopt.Muon, hidden matrices by Newton-Schulz ("original" shape factor),
                   the rest by AdamW at ``adamw_lr = muon_adamw_ratio * lr``
shampoo            mupopt.Shampoo with Adam grafting (AdamW's muP rules), blocks of side <= 256
shampoo-nograft    mupopt.Shampoo without grafting (Shampoo's own muP rule), blocks <= 256
=================  ==========================================================================

A learning rate always means the group lr at the base width (where every muP multiplier is 1).
"""
from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import ADOPT, LAMB, AdamW, Muon, Shampoo, SophiaG
from .models import PARAM_DTYPES

SIX = ("adamw", "adopt", "lamb", "sophia", "muon", "shampoo")


@dataclass(frozen=True)
class OptSpec:
    """``lr``: the coordinate-check lr; ``center``: the middle of the transfer grid; ``wd``: the
    transfer weight decay (per-step decay lr*wd, independent of width by default)."""

    name: str
    make: Callable
    lr: float
    center: float
    wd: float
    wd_modes: tuple = ("independent", "coupled", "inverse_width")


# The memory-lean options every maker passes on (docs/lean-states.md): state_bits, the
# optimizer-state format (32 default, 16, 8); stochastic_rounding, the rounding of bfloat16 param
# stores (False: to nearest; a no-op on float32 params); kahan_summation, their compensated store.
LEAN_OPTIONS = ("state_bits", "stochastic_rounding", "kahan_summation")


def _lean(extra: dict) -> dict:
    return {k: extra[k] for k in LEAN_OPTIONS if k in extra}


def _adamw(params, lr, wd, wd_mode, **extra):
    return AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd, wd_mode=wd_mode, **_lean(extra))


def _adopt(params, lr, wd, wd_mode, **extra):
    return ADOPT(params, lr=lr, betas=(0.9, 0.9999), weight_decay=wd, wd_mode=wd_mode, **_lean(extra))


def _lamb(exponent):
    def make(params, lr, wd, wd_mode, **extra):
        return LAMB(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd, hidden_lr_exponent=exponent, **_lean(extra))
    return make


def _sophia(params, lr, wd, wd_mode, **extra):
    return SophiaG(params, lr=lr, betas=(0.965, 0.99), rho=0.04, weight_decay=wd, wd_mode=wd_mode, **_lean(extra))


def _muon(params, lr, wd, wd_mode, muon_adamw_ratio=0.1, **extra):
    return Muon(params, lr=lr, weight_decay=wd, adjust_lr_fn="original", ns_dtype=torch.float32,
                adamw_lr=lr * muon_adamw_ratio, adamw_betas=(0.9, 0.95), adamw_wd=wd, wd_mode=wd_mode,
                **_lean(extra))


# Shampoo block size in these tools: preconditioner sides of at most 256, so that a CPU run at
# width 256 (MLP matrices 1024 x 256) costs eigendecompositions of 256 x 256 blocks only.
SHAMPOO_BLOCK = 256


def _shampoo(grafting):
    def make(params, lr, wd, wd_mode, precondition_frequency=1, max_preconditioner_dim=SHAMPOO_BLOCK, **extra):
        return Shampoo(params, lr=lr, betas=(0.9, 0.999), epsilon=1e-6, relative_epsilon=True,
                       weight_decay=wd, grafting=grafting, precondition_frequency=precondition_frequency,
                       max_preconditioner_dim=max_preconditioner_dim, wd_mode=wd_mode, **_lean(extra))
    return make


OPTIMIZERS: dict[str, OptSpec] = {
    "adamw": OptSpec("adamw", _adamw, lr=5e-3, center=8e-3, wd=0.1),
    "adopt": OptSpec("adopt", _adopt, lr=5e-3, center=8e-3, wd=0.1),
    "lamb": OptSpec("lamb", _lamb(0.0), lr=1e-2, center=3e-2, wd=0.01, wd_modes=("independent",)),
    "lamb-strict": OptSpec("lamb-strict", _lamb(-0.5), lr=1e-2, center=3e-2, wd=0.01, wd_modes=("independent",)),
    "sophia": OptSpec("sophia", _sophia, lr=2e-3, center=4e-3, wd=0.1),
    "muon": OptSpec("muon", _muon, lr=2e-2, center=4e-2, wd=0.1),
    "shampoo": OptSpec("shampoo", _shampoo("adam"), lr=5e-3, center=8e-3, wd=0.1),
    "shampoo-nograft": OptSpec("shampoo-nograft", _shampoo(None), lr=5e-3, center=8e-3, wd=0.1),
}


def add_storage_arguments(parser) -> None:
    """The storage options of ``mupopt transfer`` and ``mupopt coord-check`` (docs/lean-states.md):
    ``--state-bits``, ``--param-dtype``, and ``--stochastic-rounding`` or ``--kahan-summation``
    (two ways to store bf16 params: argparse refuses both together, exit status 2, as the
    optimizers refuse both with a ValueError)."""
    parser.add_argument("--state-bits", type=int, choices=(8, 16, 32), default=32,
                        help="optimizer-state format: 32 (default), 16 (bfloat16) or 8 (block-quantized; docs/lean-states.md)")
    parser.add_argument("--param-dtype", choices=tuple(PARAM_DTYPES), default="fp32",
                        help="dtype of the params, forward and backward: fp32 (default) or bf16 (pure bf16, no "
                             "float32 master copy; the loss in float32)")
    rounding = parser.add_mutually_exclusive_group()
    rounding.add_argument("--stochastic-rounding", action="store_true",
                          help="round the optimizer's bf16 param stores stochastically (default: to nearest; "
                               "a no-op with fp32 params)")
    rounding.add_argument("--kahan-summation", action="store_true",
                          help="keep each bf16 param's rounding error in a compensation (2 bytes per element) "
                               "and add it back at the next step (default: off; a no-op with fp32 params)")


def parse_optimizers(text: str | None, default=SIX) -> list[str]:
    names = list(default) if not text or text == "six" else (list(OPTIMIZERS) if text == "all" else text.split(","))
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}, 'six' or 'all'")
    return names


def make_optimizer(name: str, model: nn.Module, lr: float, *, wd: float = 0.0, wd_mode: str = "independent",
                   **extra) -> torch.optim.Optimizer:
    return OPTIMIZERS[name].make(model.parameters(), lr, wd, wd_mode, **extra)


def scale_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Multiply every group's lr (and Muon's adamw_lr) by ``factor`` relative to its initial value."""
    for g in opt.param_groups:
        base = g.setdefault("_base_lrs", {k: g[k] for k in ("lr", "adamw_lr") if k in g})
        for k, v in base.items():
            g[k] = v * factor


def lr_factor(step: int, steps: int, warmup: float = 0.05, final: float = 0.1) -> float:
    """Linear warmup over ``warmup`` of the run, then cosine decay to ``final``."""
    w = max(1, int(warmup * steps))
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, steps - w)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # In float32 also for a bfloat16 model, as torch.autocast does (log_softmax and nll_loss are
    # on its float32 list): the loss's gradient, softmax minus one-hot, is a difference of numbers
    # near 1 for the likely characters, and bf16 keeps 8 bits of it. A no-op on float32 logits.
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_step(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, *,
               hess_every: int = 10, before_hessian: Callable | None = None) -> float:
    """forward, backward, step; SophiaG gets ``bs`` = tokens in the batch and a GNB Hessian
    update every ``hess_every`` steps (after the step, as the official loop)."""
    logits = model(x)
    loss = lm_loss(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(opt, SophiaG):
        opt.step(bs=y.numel())
        if step % hess_every == hess_every - 1:
            if before_hessian:
                before_hessian()
            opt.update_hessian_from_logits(model(x))
    else:
        opt.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Output: records, CSV/JSON, DataFrame, matplotlib
# ---------------------------------------------------------------------------------------------
def to_frame(records: list[dict]):
    """A pandas DataFrame when pandas is installed, else the list of dicts itself."""
    try:
        import pandas as pd
    except ImportError:
        return records
    return pd.DataFrame(records)


def as_records(data) -> list[dict]:
    return data.to_dict("records") if hasattr(data, "to_dict") else list(data)


def write_csv(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in records:
        keys.extend(k for k in r if k not in keys)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(records)
    return path


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    return path


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a message) when it is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


NO_MATPLOTLIB = ("matplotlib is not installed: plots skipped (CSV/JSON written). "
                 "Install it with `pip install matplotlib` (or mupopt's `tools` extra).")


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(y) against log(x); nan when fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y is not None and y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else float("nan")


def flushing_denormals(fn: Callable) -> Callable:
    """Run ``fn`` with subnormal floats flushed to zero, then put the previous mode back: muP's
    small readout outputs and gradients hit slow subnormal arithmetic on the CPU. The mode is
    process's (torch.set_flush_denormal) and has no getter, so it is read from whether a
    float32 subnormal survives a multiply; leaving it set changed later code (a test of
    stochastic rounding on subnormals saw every input become 0). The mode is a per-thread CPU
    register that a new thread copies from the thread that creates it, and setting it changes
    the calling thread only: so torch's intra-op threads are started first (one op large enough
    to run in parallel), else threads created during the run would keep flushing after it."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        was_on = torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0
        torch.ones(1 << 20).add_(1.0)  # above torch's grain size (32768): every intra-op thread runs
        torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_flush_denormal(was_on)

    return run


@dataclass
class Timer:
    start: float = field(default_factory=lambda: __import__("time").perf_counter())

    def __call__(self) -> float:
        return __import__("time").perf_counter() - self.start
