"""Float64 transcriptions of the optimizer formulas (from the papers and reference libraries each optimizer's docstring names): test oracles.

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


def lamb_f64(p, g, st, m: Multipliers, hp, norm_scale: tuple[float, float] = (1.0, 1.0)) -> None:
    """LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2 with bias correction).

    ``norm_scale``: factors applied to the two sums of squares (of p, of u) before their square
    roots are taken: what a backend computes with a ``norm_reduce`` that scales the columns of its
    partials (tests). ``st["sums"]`` keeps the last step's unscaled sums (float64)."""
    _zeros(st, p, "m", "v")
    g = -g if hp.maximize else g
    st["t"] += 1
    t = st["t"]
    st["m"] = hp.beta1 * st["m"] + (1 - hp.beta1) * g
    st["v"] = hp.beta2 * st["v"] + (1 - hp.beta2) * g * g
    r = (st["m"] / (1 - hp.beta1**t)) / ((st["v"] / (1 - hp.beta2**t)).sqrt() + hp.eps * m.eps)
    u = r + hp.weight_decay * p
    st["sums"] = (float((p * p).sum()), float((u * u).sum()))
    w_norm = math.sqrt(norm_scale[0] * st["sums"][0])
    u_norm = math.sqrt(norm_scale[1] * st["sums"][1])
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


def _ns_f64(X, hp):
    """Newton-Schulz in float64 with the schedule of ``hp`` (transposed when rows > cols)."""
    coeffs = hp.ns_coefficients
    schedule = [coeffs] * hp.ns_steps if isinstance(coeffs[0], (int, float)) else list(coeffs)
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    X = X / max(float(torch.linalg.matrix_norm(X)), hp.eps)
    for a, b, c in schedule:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def muon_f64(p, g, st, m: Multipliers, hp) -> None:
    st.setdefault("buf", torch.zeros_like(p, dtype=torch.float64))
    st["buf"] = hp.momentum * st["buf"] + (1 - hp.momentum) * g
    u = (1 - hp.momentum) * g + hp.momentum * st["buf"] if hp.nesterov else st["buf"]
    O = _ns_f64(u.reshape(u.shape[0], -1), hp)
    rows, cols = O.shape
    factor = {
        None: math.sqrt(max(1.0, rows / cols)),
        "original": math.sqrt(max(1.0, rows / cols)),
        "match_rms_adamw": 0.2 * math.sqrt(max(rows, cols)),
        "spectral": math.sqrt(rows / cols),
    }[hp.adjust_lr_fn]
    p.mul_(1 - hp.lr * hp.weight_decay * m.wd)
    p.sub_(hp.lr * m.lr * factor * O.reshape(p.shape))


def _inv_root_f64(S, eps, relative, root=4):
    """The exact ``(S + eps' I)^(-1/root)``, nothing cut. mupopt.linalg.inverse_root_eigh agrees
    with it to float32 accuracy where eps' is well above its floor (sqrt(n) * 1.2e-7 * lambda_max
    for float32 statistics), as with the dampings this oracle is run with; below the floor float32
    does not resolve the eigenvalues, and tests compare with this formula at a stated tolerance."""
    lam, Q = torch.linalg.eigh(S)
    damp = eps * float(lam.max()) if relative else eps
    lam = (lam + damp).clamp_min(0)
    inv = torch.where(lam > 0, lam ** (-1.0 / root), torch.zeros_like(lam))
    return Q @ torch.diag(inv) @ Q.T


def shampoo_f64(p, g, st, m: Multipliers, hp) -> None:
    st.setdefault("t", 0)
    st["t"] += 1
    t = st["t"]
    st.setdefault("v", torch.zeros_like(p, dtype=torch.float64))
    st.setdefault("mom", torch.zeros_like(p, dtype=torch.float64))
    st["v"] = hp.grafting_beta2 * st["v"] + (1 - hp.grafting_beta2) * g * g
    adam = g / ((st["v"] / (1 - hp.grafting_beta2**t)).sqrt() + hp.grafting_epsilon)
    direction = adam
    if p.ndim >= 2 and p.numel() > 0:
        G, A = g.reshape(p.shape[0], -1), adam.reshape(p.shape[0], -1)
        n = hp.max_preconditioner_dim
        blocks = [(slice(i, i + n), slice(j, j + n)) for i in range(0, G.shape[0], n) for j in range(0, G.shape[1], n)]
        if "L" not in st:
            st["L"] = [torch.zeros(G[r, c].shape[0], G[r, c].shape[0], dtype=torch.float64) for r, c in blocks]
            st["R"] = [torch.zeros(G[r, c].shape[1], G[r, c].shape[1], dtype=torch.float64) for r, c in blocks]
            st["Lr"], st["Rr"] = [None] * len(blocks), [None] * len(blocks)
        keep, add = (1.0, 1.0) if hp.beta2 == 1.0 else (hp.beta2, 1 - hp.beta2)
        start = hp.start_preconditioning_step
        refresh = t >= start and (t - start) % hp.precondition_frequency == 0
        D = torch.empty_like(G)
        for k, (r, c) in enumerate(blocks):
            Gb = G[r, c]
            st["L"][k] = keep * st["L"][k] + add * Gb @ Gb.T
            st["R"][k] = keep * st["R"][k] + add * Gb.T @ Gb
            if refresh:
                st["Lr"][k] = _inv_root_f64(st["L"][k], hp.epsilon, hp.relative_epsilon)
                st["Rr"][k] = _inv_root_f64(st["R"][k], hp.epsilon, hp.relative_epsilon)
            if t >= start:
                Db = st["Lr"][k] @ Gb @ st["Rr"][k]
                if hp.grafting == "adam":
                    d = float(torch.linalg.matrix_norm(Db))
                    Db = Db * (float(torch.linalg.matrix_norm(A[r, c])) / d if d > 0 else 0.0)
                D[r, c] = Db
            else:
                D[r, c] = A[r, c]
        direction = D.reshape(p.shape)
    st["mom"] = hp.beta1 * st["mom"] + (1 - hp.beta1) * direction
    p.mul_(1 - hp.lr * hp.weight_decay * m.wd)
    p.sub_(hp.lr * m.lr * st["mom"] / ((1 - hp.beta1**t) if hp.beta1 > 0 else 1.0))


ORACLES = {
    "adamw": adamw_f64,
    "adopt": adopt_f64,
    "lamb": lamb_f64,
    "sophia": sophia_f64,
    "sophia_hessian": sophia_hessian_f64,
    "muon": muon_f64,
    "shampoo": shampoo_f64,
}


def lean_roundtrip_f64(x: torch.Tensor, values: list[float], used: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Format 8 of mupopt.optim._lean_states written from its spec in float64, by brute force:
    per block of ``block`` elements (row-major), absmax = max |x|, y = x / absmax (0 for an
    all-zero block), code = the index of the used map value (the first ``used`` of ``values``)
    nearest to y, the lower one on a tie; value = map[code] * absmax. Returns (codes as int64,
    values as float64), both flat."""
    flat = x.detach().reshape(-1).double()
    table = torch.tensor(values[:used], dtype=torch.float64)
    codes = torch.empty(flat.numel(), dtype=torch.int64)
    out = torch.empty(flat.numel(), dtype=torch.float64)
    for start in range(0, flat.numel(), block):
        xb = flat[start:start + block]
        amax = float(xb.abs().max())
        y = xb / amax if amax > 0 else torch.zeros_like(xb)
        dist = (y[:, None] - table[None, :]).abs()
        # argmin returns the first minimum: the lower code on a tie (the table ascends).
        c = dist.argmin(dim=1)
        codes[start:start + block] = c
        out[start:start + block] = table[c] * amax
    return codes, out
