"""Float64 transcriptions of the optimizer formulas (../shared/optimizer-specs.md): test oracles.

They are written straight from the formulas, independently of the backends, one tensor at a time,
so that a backend's per-tensor multipliers and odd cases (LAMB, which has no installable
reference; muP multipliers other than 1, which no reference library has) can be checked. Each
takes float64 tensors ``p, g``, a state dict of float64 tensors (created on first use), a
:class:`mupopt.mup.Multipliers` and the optimizer's hyperparameter record, and updates in place.
"""
from __future__ import annotations

import math

import torch

from .mup import Multipliers


def _zeros(st: dict, p: torch.Tensor, *keys: str) -> None:
    for k in keys:
        st.setdefault(k, torch.zeros_like(p, dtype=torch.float64))
    st.setdefault("t", 0)


def adamw_f64(p, g, st, m: Multipliers, hp) -> None:
    _zeros(st, p, "m", "v", "vmax")
    g = -g if hp.maximize else g
    st["t"] += 1
    t = st["t"]
    p.mul_(1 - hp.lr * hp.weight_decay * m.wd)
    st["m"] = hp.beta1 * st["m"] + (1 - hp.beta1) * g
    st["v"] = hp.beta2 * st["v"] + (1 - hp.beta2) * g * g
    v = st["v"]
    if hp.amsgrad:
        st["vmax"] = torch.maximum(st["vmax"], v)
        v = st["vmax"]
    mhat = st["m"] / (1 - hp.beta1**t)
    vhat = v / (1 - hp.beta2**t)
    p.sub_(hp.lr * m.lr * mhat / (vhat.sqrt() + hp.eps * m.eps))


def adopt_f64(p, g, st, m: Multipliers, hp) -> None:
    _zeros(st, p, "m", "v")
    g = -g if hp.maximize else g
    s = st["t"]
    st["t"] += 1
    if s == 0:
        st["v"] = g * g
        return
    p.mul_(1 - hp.lr * hp.weight_decay * m.wd)
    n = (g / torch.clamp(st["v"].sqrt(), min=hp.eps * m.eps)).clamp(-(s**0.25), s**0.25)
    st["m"] = hp.beta1 * st["m"] + (1 - hp.beta1) * n
    p.sub_(hp.lr * m.lr * st["m"])
    st["v"] = hp.beta2 * st["v"] + (1 - hp.beta2) * g * g


def lamb_f64(p, g, st, m: Multipliers, hp) -> None:
    _zeros(st, p, "m", "v")
    g = -g if hp.maximize else g
    st["t"] += 1
    t = st["t"]
    st["m"] = hp.beta1 * st["m"] + (1 - hp.beta1) * g
    st["v"] = hp.beta2 * st["v"] + (1 - hp.beta2) * g * g
    r = (st["m"] / (1 - hp.beta1**t)) / ((st["v"] / (1 - hp.beta2**t)).sqrt() + hp.eps * m.eps)
    u = r + hp.weight_decay * p
    w_norm = math.sqrt(float((p * p).sum()))
    u_norm = math.sqrt(float((u * u).sum()))
    phi = w_norm if hp.clamp_value is None else min(w_norm, hp.clamp_value)
    trust = phi / u_norm if (w_norm > 0 and u_norm > 0) else 1.0
    p.sub_(hp.lr * m.lr * trust * u)


def sophia_f64(p, g, st, m: Multipliers, hp) -> None:
    _zeros(st, p, "m", "h")
    g = -g if hp.maximize else g
    st["t"] += 1
    p.mul_(1 - hp.lr * hp.weight_decay * m.wd)
    st["m"] = hp.beta1 * st["m"] + (1 - hp.beta1) * g
    ratio = torch.clamp(st["m"].abs() / (hp.rho * hp.bs * st["h"] + 1e-15), max=1.0)
    p.sub_(hp.lr * m.lr * torch.sign(st["m"]) * ratio)


def sophia_hessian_f64(p, g, st, m: Multipliers, hp) -> None:
    _zeros(st, p, "m", "h")
    st["h"] = hp.beta2 * st["h"] + (1 - hp.beta2) * g * g


ORACLES = {
    "adamw": adamw_f64,
    "adopt": adopt_f64,
    "lamb": lamb_f64,
    "sophia": sophia_f64,
    "sophia_hessian": sophia_hessian_f64,
}
