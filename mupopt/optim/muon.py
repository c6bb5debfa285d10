"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
Liu et al., "Muon is Scalable for LLM Training", arXiv 2502.16982) with muP, for a whole model.

Reference: ``torch.optim.Muon`` (PyTorch >= 2.9) for 2-D hidden matrices. Beyond torch, one
mupopt.Muon takes the whole model: parameters whose muP role is not ``hidden`` (embeddings,
readout, biases, norms) are stepped by AdamW inside the same optimizer, with their own
hyperparameters and AdamW's muP rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import backends
from . import _lean_states as lean
from ..storage import load_param, store_param
from ..linalg import newton_schulz
from ..mup import RECORD_KEY, MupError, Multipliers, multipliers, read_record
from ._base import (MupOptimizer, check, check_betas, check_eps, check_weight_decay, compute_dtype, is_number,
                    new_step, skip_on_found_inf, store, upcast)
from ._placement import Orthogonalize
from .adamw import ADAMW_STATES, AdamWHparams

ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral")
# ns_dtype by name, as state_dict saves it (Muon._state_dict); a group may hold a name where a
# state_dict's groups are copied in without load_state_dict (ZeroRedundancyOptimizer does so).
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
# torch.optim.Muon's default lr; also the reference lr of the AdamW part when a group's lr at
# construction was 0 (Muon._adamw_hparams).
DEFAULT_LR = 1e-3


def shape_factor(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """Muon's per-matrix lr factor (A = rows, B = cols of the 2-D view).

    None / "original": sqrt(max(1, A/B)) (Jordan); "match_rms_adamw": 0.2*sqrt(max(A, B)), which
    makes the update RMS match AdamW's (Liu et al.); "spectral": sqrt(A/B), the spectral-norm
    scaling of Yang, Simon, Bernstein (arXiv 2310.17813) that P1 analyses. An empty matrix
    (A or B == 0) has no update to scale: 1.0 (A/B would divide by zero).
    """
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
    if rows == 0 or cols == 0:
        return 1.0
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "spectral":
        return math.sqrt(rows / cols)
    raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")


@dataclass(frozen=True)
class MuonHparams:
    lr: float
    weight_decay: float
    momentum: float
    nesterov: bool
    ns_coefficients: tuple
    ns_steps: int | None
    eps: float
    adjust_lr_fn: str | None
    ns_dtype: torch.dtype
    stochastic_rounding: bool = False  # param stores (mupopt/storage.py)
    kahan_summation: bool = False  # compensated param stores (mupopt/storage.py)


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """The Newton-Schulz dtype of ``Muon(ns_dtype=None)`` (the default) for tensors on ``device``:
    bfloat16, as torch.optim.Muon, wherever bfloat16 matmuls are fast: on CUDA, and on a CPU with
    AMX tiles (:func:`cpu_bf16_matmuls_fast`); float32 on other CPUs, where oneDNN emulates
    bfloat16 matmuls at 10-20x the time of float32 (measured on a 2-core AVX2 EPYC VM)."""
    if torch.device(device).type == "cpu":
        return torch.bfloat16 if cpu_bf16_matmuls_fast() else torch.float32
    return torch.bfloat16


# assume_constant_result: torch.compile calls it and keeps the answer, instead of tracing
# torch.backends.mkldnn.is_available, which dynamo refuses (a default Muon on a CPU failed
# torch.compile(opt.step, fullgraph=True)). Not functools.cache'd: dynamo traces through a cache
# wrapper (with a warning); both calls read flags torch caches itself.
@torch.compiler.assume_constant_result
def cpu_bf16_matmuls_fast() -> bool:
    """Whether this CPU runs bfloat16 matmuls faster than float32: oneDNN (torch's bf16 CPU
    matmul) with AMX tiles. Measured on 2-core Xeons with AMX (torch 2.13): a batched 8 x 512^2
    matmul 1.2 ms in bf16 against 9.7 ms in float32, a Muon step 37 ms (bf16 NS) against 138 ms
    (float32 NS; torch.optim.Muon 46.5 ms) on a quiet machine (issue 22 item 9); 12 matrices of
    512^2 at load 2: 116-240 ms against 434-478 ms. CPUs with AVX512-BF16 but no AMX (Zen 4,
    Cooper Lake) were not measured and keep float32 (pass ns_dtype to choose). Uses the private
    ``torch.cpu._is_amx_tile_supported`` (torch >= 2.3); without it the answer is no."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(torch.backends.mkldnn.is_available() and amx is not None and amx())


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view Muon orthogonalises: conv kernels (ndim > 2) flattened to (shape[0], -1).
    The column count is explicit, not -1: reshape cannot infer -1 for a tensor with no elements
    (a (4, 0) matrix)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def muon_reference(params, grads, states, mults, hp: MuonHparams, *, orthogonalize=None) -> None:
    """One Muon step for hidden matrices::

        B = lerp(B, g, 1-mu) ;  u = lerp(g, B, mu) if nesterov else B
        O = NS(u)                        (same-shape matrices stacked into one NS call)
        p *= 1 - lr*wd*wd_mult
        p -= lr*lr_mult * O

    ``lr_mult`` includes Muon's shape factor of the whole matrix (:meth:`Muon.group_multipliers`:
    ``mults`` are computed from the global shape, which a backend stepping a shard cannot see).
    ``orthogonalize(updates, ns)``, when given, replaces the local NS: it receives the updates
    shaped like the (local) params and the NS function on a stack of same-shape matrices, and
    returns the orthogonalised updates (mupopt.optim._placement.Orthogonalize gathers sharded
    matrices to owner ranks). The operation order is torch.optim.Muon's; NS runs in
    ``hp.ns_dtype`` (the optimizer resolves its default per device: :func:`default_ns_dtype`).
    """
    updates = []
    # Momentum and update in float32 (float64 for float64 params); Newton-Schulz in hp.ns_dtype.
    for p, g, st in zip(params, grads, states):
        cd = compute_dtype(p)
        buf32 = upcast(st["momentum_buffer"], cd)
        g32 = upcast(g, cd)
        buf32.lerp_(g32, 1 - hp.momentum)
        store(st["momentum_buffer"], buf32)
        updates.append(g32.lerp(buf32, hp.momentum) if hp.nesterov else buf32)

    def ns(stacked: torch.Tensor) -> torch.Tensor:
        return newton_schulz(stacked, hp.ns_steps, hp.ns_coefficients, hp.eps, hp.ns_dtype, check_finite=False)

    if orthogonalize is not None:
        ortho = orthogonalize(updates, ns, ns_steps(hp))
    else:
        views = [matrix_view(u) for u in updates]
        by_shape: dict[tuple, list[int]] = {}
        for i, u in enumerate(views):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        ortho = [None] * len(updates)
        for shape, idx in by_shape.items():
            out = ns(torch.stack([views[i] for i in idx]))
            for k, i in enumerate(idx):
                ortho[i] = out[k]
    for p, o, m, st in zip(params, ortho, mults, states):
        p32 = load_param(p, compute_dtype(p), st, hp.kahan_summation)
        p32.mul_(1 - hp.lr * hp.weight_decay * m.wd)
        p32.add_(o.view(p.shape), alpha=-hp.lr * m.lr)
        if "step" in st:  # stochastic rounding's count (mupopt/storage.py); torch's Muon has none
            st["step"] += 1
        store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation)


def ns_steps(hp: MuonHparams) -> int:
    """Iterations of the NS schedule (for flop counts)."""
    return hp.ns_steps if hp.ns_steps is not None else len(hp.ns_coefficients)


backends.register(backends.Backend("muon", "reference",
                                   skip_on_found_inf(lean.reference(muon_reference, {"momentum_buffer": lean.SIGNED})),
                                   capturable=True, state_bits=lean.STATE_BITS, kahan_summation=True))


class Muon(MupOptimizer):
    r"""Muon with muP for a whole model: hidden matrices by Muon, the rest by AdamW.

    Routing per parameter (group key ``use_muon``): None (default) sends parameters whose muP role
    is ``hidden`` to Muon and the others to AdamW; without width information (no
    ``set_base_shapes``) every parameter with ndim >= 2 goes to Muon, as torch.optim.Muon would
    take them. ``use_muon=True`` / ``False`` in a param group forces the choice for that group.
    Muon parameters with ndim > 2 (conv kernels) are orthogonalised as (shape[0], -1).

    muP (docs/mup.md): hidden matrices get lr multiplier 1 with the "original" or "spectral"
    shape factors (they are width-stable by construction; never stack 1/m on them) and
    1/sqrt(m_in) with "match_rms_adamw" (whose 0.2*sqrt(max(A, B)) grows with width); the decay
    stays lr*wd in the default independent mode. The AdamW part follows AdamW's rules.

    Args:
        params: parameters, named parameters or param groups.
        lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
        ns_coefficients=(3.4445, -4.775, 2.0315) or a list of per-iteration triples (e.g.
        mupopt.linalg.POLAR_EXPRESS_COEFFICIENTS[:5] with ns_steps=None), eps=1e-7, ns_steps=5,
        adjust_lr_fn=None | "original" | "match_rms_adamw" | "spectral": as torch.optim.Muon.
        ns_dtype: dtype of the Newton-Schulz iteration. None (default): chosen at each step by the
            params' device: bfloat16 as torch.optim.Muon on CUDA and on CPUs with AMX tiles,
            float32 on other CPUs, where bf16 matmuls are 10-20x slower
            (:func:`default_ns_dtype`). Pass torch.bfloat16 to compute exactly what
            torch.optim.Muon computes on any CPU, torch.float32 for the float32 iteration.
        adamw_lr=1e-3, adamw_betas=(0.9, 0.999), adamw_eps=1e-8, adamw_wd=0.01: the AdamW part.
            Its lr follows the group's lr schedule: adamw_lr * group["lr"] / group["lr_ref"], with
            lr_ref the group's lr at construction (or a "lr_ref" given in the param group):
            adamw_lr is the AdamW lr that goes with the Muon lr lr_ref. A group constructed with
            lr=0 gives no such pair, so lr_ref = 0 means the default one, Muon's default lr 1e-3
            (as in ``Muon(params)``, where adamw_lr goes with lr=1e-3): the AdamW part then moves
            nothing while lr is 0 and takes adamw_lr * lr / 1e-3 after. Pass ``lr_ref`` in the
            group to say which lr adamw_lr was tuned for.
        capturable: the AdamW part's step counts on the params' device and GradScaler's found_inf
            applied on the device, as :class:`mupopt.AdamW` (the Muon part has no step count).
        maximize: not supported (torch.optim.Muon has none): maximize=True in a group raises.
        wd_mode, backend, base_shapes, overrides: as :class:`mupopt.AdamW`. stochastic_rounding, kahan_summation: as :class:`mupopt.AdamW`,
            for both parts (Muon's matrices then keep a "step" count in their state for
            stochastic rounding).
    """

    rule = "muon"
    kernels = ("muon", "adamw")
    # Muon's momentum and the AdamW part's moments (one param has one or the other).
    _lean_keys = {"momentum_buffer": lean.SIGNED, **ADAMW_STATES}
    _no_scale_eps = "the Newton-Schulz eps is a norm floor, and the AdamW part's adamw_eps is not scaled with width"

    def __init__(
        self,
        params,
        lr: float = DEFAULT_LR,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: Sequence = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int | None = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype | None = None,
        adamw_lr: float = 1e-3,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_wd: float = 0.01,
        capturable: bool = False,
        wd_mode: str = "independent",
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        backend: str = "auto",
        base_shapes=None,
        overrides=None,
    ):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
            adamw_wd=adamw_wd, use_muon=None, capturable=capturable, wd_mode=wd_mode, scale_eps=False,
        )
        defaults["state_bits"] = state_bits
        defaults["stochastic_rounding"] = stochastic_rounding
        defaults["kahan_summation"] = kahan_summation
        super().__init__(params, defaults, backend=backend, base_shapes=base_shapes, overrides=overrides)

    def _check_hparams(self, group: dict) -> None:
        check(not isinstance(group["lr"], torch.Tensor) or group["lr"].numel() == 1, "Tensor lr must be 1-element")
        check(is_number(group["lr"]) and float(group["lr"]) >= 0, f"Learning rate should be >= 0 but is: {group['lr']}")
        # Not implemented in either part: refused rather than silently ignored.
        check(group.get("maximize", False) is not True, "Muon does not support maximize=True (negate the loss instead)")
        # torch.optim.Muon's message for a negative momentum; momentum >= 1 (which torch lets
        # through) would make the buffer grow without bound.
        check(is_number(group["momentum"]) and group["momentum"] >= 0, f"momentum should be >= 0 but is: {group['momentum']}")
        check(group["momentum"] < 1, f"momentum should be in [0, 1) but is: {group['momentum']}")
        check(is_number(group["weight_decay"]) and group["weight_decay"] >= 0, f"weight decay should be >= 0 but is: {group['weight_decay']}")
        check(group["adjust_lr_fn"] in ADJUST_LR_FNS, f"Adjust learning rate function {group['adjust_lr_fn']} is not supported")
        check_eps(group["eps"])
        ns_dtype = group["ns_dtype"]
        check(ns_dtype is None or ns_dtype in NS_DTYPES.values() or (isinstance(ns_dtype, str) and ns_dtype in NS_DTYPES),
              f"Invalid ns_dtype: {ns_dtype}")
        check(group["use_muon"] in (None, True, False), f"use_muon must be None, True or False, got {group['use_muon']!r}")
        check(is_number(group["adamw_lr"]) and group["adamw_lr"] >= 0, f"Invalid adamw_lr: {group['adamw_lr']}")
        check(is_number(group.get("lr_ref", 0.0)) and group.get("lr_ref", 0.0) >= 0, f"Invalid lr_ref: {group.get('lr_ref')}")
        check_betas(group["adamw_betas"])
        check_eps(group["adamw_eps"])
        check_weight_decay(group["adamw_wd"])
        # The coefficient schedule is validated by the NS function itself (one place).
        newton_schulz(torch.zeros(1, 1), group["ns_steps"], group["ns_coefficients"], check_finite=False)
        for i, p in enumerate(group.get("params", [])):
            if self._uses_muon(group, i) and p.ndim < 2:
                raise ValueError(
                    f"Muon needs matrices but got a parameter of shape {tuple(p.shape)} routed to it "
                    f"(use_muon=True or a 'hidden' role on a tensor with ndim < 2)"
                )

    def _uses_muon(self, group: dict, i: int) -> bool:
        return self._routes_to_muon(group, group["params"][i], self._width_of(group["params"][i]))

    @staticmethod
    def _routes_to_muon(group: dict, p: torch.Tensor, info) -> bool:
        """The routing of p with width info ``info``: the group's use_muon, else hidden matrices
        (every matrix without width information, as torch.optim.Muon takes them)."""
        if group["use_muon"] is not None:
            return group["use_muon"]
        if info is None:
            return p.ndim >= 2
        return info.role == "hidden"

    def group_multipliers(self, group: dict) -> list[Multipliers]:
        """AdamW's multipliers for the AdamW part; for Muon matrices the muP lr multiplier times
        Muon's shape factor of the whole matrix (its global (shape[0], -1) view: a DTensor's
        ``shape`` is global, so a rank stepping a shard still scales by the full matrix)."""
        rule = "muon_match_rms_adamw" if group["adjust_lr_fn"] == "match_rms_adamw" else "muon"
        out = []
        for i, (info, depth) in enumerate(zip(self.width_infos(group), self.depth_infos(group))):
            if not self._uses_muon(group, i):
                out.append(multipliers("adamw", info, depth=depth, wd_mode=group["wd_mode"]))
            elif info is not None and info.role != "hidden":
                raise MupError(f"use_muon=True on a parameter of role {info.role!r}: Muon's muP rules cover hidden matrices only")
            else:
                m = multipliers(rule, info, depth=depth, wd_mode=group["wd_mode"])
                shape = group["params"][i].shape
                rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, 1)
                factor = shape_factor(group["adjust_lr_fn"], rows, cols) if rows and cols else 1.0
                out.append(m._replace(lr=m.lr * factor))
        return out

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        i = next(k for k, q in enumerate(group["params"]) if q is p)
        if self._uses_muon(group, i):
            return lean.zeros(p, group, "momentum_buffer")
        return {"step": new_step(p, group), **lean.zeros(p, group, "exp_avg"), **lean.zeros(p, group, "exp_avg_sq")}

    def _state_keys(self, group: dict, i: int) -> tuple[str, ...]:
        return self._keys_of_route(self._uses_muon(group, i))

    @staticmethod
    def _keys_of_route(muon: bool) -> tuple[str, ...]:
        return ("momentum_buffer",) if muon else ("step", "exp_avg", "exp_avg_sq")

    def _saved_state_keys(self, group: dict, i: int, state: dict) -> tuple[str, ...]:
        """A loaded state's keys follow the routing of the width record loaded with it (a resume
        into an optimizer without width information routes by the saved records)."""
        record = state.get(RECORD_KEY)
        if record is None:
            return self._state_keys(group, i)
        p = group["params"][i]
        info = read_record(record, tuple(p.shape), None, lambda: self._label(p))
        return self._keys_of_route(self._routes_to_muon(group, p, info))

    def _hparams(self, group: dict) -> MuonHparams:
        coeffs = group["ns_coefficients"]
        coeffs = tuple(coeffs) if len(coeffs) == 3 and all(is_number(c) for c in coeffs) else tuple(map(tuple, coeffs))
        return MuonHparams(
            float(group["lr"]), float(group["weight_decay"]), float(group["momentum"]), bool(group["nesterov"]),
            coeffs, group["ns_steps"], float(group["eps"]), group["adjust_lr_fn"], self._ns_dtype(group),
        )

    @staticmethod
    def _ns_dtype(group: dict) -> torch.dtype:
        """The group's ns_dtype; None resolves by the device of its params (default_ns_dtype)."""
        if isinstance(group["ns_dtype"], str):
            return NS_DTYPES[group["ns_dtype"]]
        if group["ns_dtype"] is not None:
            return group["ns_dtype"]
        return default_ns_dtype(group["params"][0].device if group["params"] else "cpu")

    def _adamw_hparams(self, group: dict) -> AdamWHparams:
        """The AdamW part follows the group's lr schedule: its lr is adamw_lr * lr / lr_ref, where
        lr_ref is the group's lr at construction, so a scheduler (or a manual edit of
        group["lr"]) scales both parts of the model alike. lr_ref = 0 (constructed with lr=0)
        stands for DEFAULT_LR (class docstring): the ratio stays proportional to lr, so lr=0 moves
        nothing in either part (what torch's distributed checkpointing relies on when it runs one
        step with lr=0 to create the state)."""
        b1, b2 = group["adamw_betas"]
        ref = float(group["lr_ref"])
        # adamw_lr * (lr / ref): at lr == lr_ref the ratio is exactly 1 and the AdamW part gets
        # adamw_lr itself (bit for bit as torch.optim.AdamW with lr=adamw_lr).
        lr = float(group["adamw_lr"]) * (float(group["lr"]) / (ref if ref > 0 else DEFAULT_LR))
        return AdamWHparams(lr, float(b1), float(b2), float(group["adamw_eps"]), float(group["adamw_wd"]), False, False,
                            bool(group.get("capturable", False)))

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("lr_ref", float(param_group.get("lr", self.defaults["lr"])))
        super().add_param_group(param_group)

    # -- checkpoints -----------------------------------------------------------------------------
    def _state_dict(self) -> dict:
        """The base state_dict with each group's ns_dtype saved by name ("float32"):
        torch.distributed.checkpoint's get_state_dict with full_state_dict or cpu_offload accepts
        only tensors, numbers, strings and containers, and raised ``ValueError: Unexpected value
        type <class 'torch.dtype'>`` on a torch.dtype. load_state_dict reads names and dtypes."""
        sd = super()._state_dict()
        groups = [{**g, "ns_dtype": str(g["ns_dtype"]).removeprefix("torch.")}
                  if isinstance(g.get("ns_dtype"), torch.dtype) else g for g in sd["param_groups"]]
        return {**sd, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict.get("param_groups")
        if isinstance(groups, list):
            # A name saved by _state_dict back to its dtype; anything else is left to the group
            # check ("Invalid ns_dtype").
            groups = [{**g, "ns_dtype": NS_DTYPES[g["ns_dtype"]]}
                      if isinstance(g, dict) and isinstance(g.get("ns_dtype"), str) and g["ns_dtype"] in NS_DTYPES
                      else g for g in groups]
            state_dict = {**state_dict, "param_groups": groups}
        super().load_state_dict(state_dict)

    # -- how the step is split (mupopt.optim._base.MupOptimizer._run) --------------------------------
    def _plan_options(self, group: dict) -> tuple:
        return (group["wd_mode"], group["adjust_lr_fn"], group["use_muon"])

    def _segments(self, group: dict, kernel: str, stepped: list[int]) -> list[tuple[str, list[int]]]:
        """Hidden matrices to backend "muon", the rest to "adamw": both prepared (backend chosen,
        inputs checked) before either writes, so an error in the AdamW part leaves the matrices
        unstepped too."""
        to_muon = [self._uses_muon(group, i) for i in stepped]
        return [
            ("muon", [k for k, m in enumerate(to_muon) if m]),
            ("adamw", [k for k, m in enumerate(to_muon) if not m]),
        ]

    def _hparams_for(self, kernel: str, group: dict, extra: dict):
        return self._hparams(group) if kernel == "muon" else self._adamw_hparams(group)

    def _collectives(self, kernel: str, params: list) -> dict:
        """Sharded Muon matrices: Newton-Schulz on whole matrices, spread over the ranks."""
        if kernel != "muon":
            return {}
        hook = Orthogonalize(params, type(self).__name__)
        return {"orthogonalize": hook} if hook.distributed else {}
