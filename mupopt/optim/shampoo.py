"""Shampoo (Gupta, Koren, Singer, arXiv 1802.09568) in the practical form of DistributedShampoo
(Shi et al., arXiv 2309.06497: blocking, EMA statistics, Adam grafting), with muP.

Reference: a float64 transcription of these papers' formulas (mupopt.testing, tests/test_shampoo.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import backends
from ..linalg import inverse_root_eigh, inverse_root_newton
from ..mup import Multipliers, multipliers
from ._base import MupOptimizer, check, check_betas, check_lr, check_weight_decay, compute_dtype, fp32, is_number, store, upcast
from ._placement import is_dtensor, local, placement_text, shard_shapes, stack_over_ranks, unstack_over_ranks

_MATRIX_STATE = ("left", "right", "left_root", "right_root")

GRAFTINGS = ("adam", None)
ROOT_METHODS = ("eigh", "newton")
# Shampoo's exponent for a 2-D block: -1/(2*order) with order 2, i.e. L^(-1/4) G R^(-1/4).
ROOT = 4


@dataclass(frozen=True)
class ShampooHparams:
    lr: float
    beta1: float
    beta2: float
    epsilon: float
    relative_epsilon: bool
    weight_decay: float
    max_preconditioner_dim: int
    precondition_frequency: int
    start_preconditioning_step: int
    grafting: str | None
    grafting_beta2: float
    grafting_epsilon: float
    root_method: str


def blocks_of(rows: int, cols: int, max_dim: int) -> list[tuple[slice, slice]]:
    """Row-major blocks of a (rows, cols) matrix with sides of at most max_dim."""
    r = [slice(i, min(i + max_dim, rows)) for i in range(0, rows, max_dim)]
    c = [slice(j, min(j + max_dim, cols)) for j in range(0, cols, max_dim)]
    return [(rs, cs) for rs in r for cs in c]


def is_matrix(p: torch.Tensor) -> bool:
    """Preconditioned with L and R (ndim >= 2, flattened to (shape[0], -1)); else diagonal."""
    return p.ndim >= 2 and p.numel() > 0


def init_shampoo_state(p: torch.Tensor, hp_max_dim: int) -> dict:
    state = {
        "step": torch.tensor(0.0, dtype=torch.float32),
        "momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),  # Adam grafting / diagonal
    }
    if is_matrix(p):
        rows, cols = p.shape[0], p.numel() // p.shape[0]
        blocks = blocks_of(rows, cols, hp_max_dim)
        f32 = dict(dtype=torch.float32, device=p.device)
        state["left"] = [torch.zeros(rs.stop - rs.start, rs.stop - rs.start, **f32) for rs, _ in blocks]
        state["right"] = [torch.zeros(cs.stop - cs.start, cs.stop - cs.start, **f32) for _, cs in blocks]
        state["left_root"] = [torch.zeros_like(x) for x in state["left"]]
        state["right_root"] = [torch.zeros_like(x) for x in state["right"]]
    return state


def _roots(mats: list[torch.Tensor], hp: ShampooHparams) -> list[torch.Tensor]:
    """Inverse 4th roots of ``mats``, same-size matrices batched into one call."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    by_size: dict[int, list[int]] = {}
    for i, m in enumerate(mats):
        by_size.setdefault(m.shape[0], []).append(i)
    fn = inverse_root_eigh if hp.root_method == "eigh" else inverse_root_newton
    for idx in by_size.values():
        roots = fn(torch.stack([mats[i] for i in idx]), ROOT, eps=hp.epsilon, relative_eps=hp.relative_epsilon)
        for k, i in enumerate(idx):
            out[i] = roots[k]
    return out


def shampoo_reference(params, grads, states, mults, hp: ShampooHparams) -> None:
    """One Shampoo step. Per matrix (2-D view, split into blocks of side <= max_preconditioner_dim)::

        L = b2*L + (1-b2)*G G^T ;  R = b2*R + (1-b2)*G^T G          (b2 = 1: plain sums)
        at steps t = start, start + freq, ...:  Lr = (L + eps I)^(-1/4) ;  Rr = (R + eps I)^(-1/4)
        D = Lr G Rr                           (t >= start; before: D = the Adam direction)
        grafting "adam": D *= ||A||_F / ||D||_F per block,  A = g / (sqrt(v/(1-bg2^t)) + eps_g)
        M = b1*M + (1-b1)*D ;  p *= 1 - lr*wd*wd_mult ;  p -= lr*lr_mult * M/(1-b1^t)

    1-D tensors (and 0-element ones) take the diagonal Adam direction A. The Adam second moment v
    (grafting_beta2, grafting_epsilon) is kept for every tensor. Two phases
    (:func:`shampoo_reference_prepare`): every new statistic and root is computed before anything
    is written, so a root that fails in float32 and float64 raises RootComputationError with
    params and state untouched.
    """
    shampoo_reference_prepare(params, grads, states, mults, hp)()


def shampoo_reference_prepare(params, grads, states, mults, hp: ShampooHparams) -> Callable[[], None]:
    """Phase 1 of :func:`shampoo_reference`: new statistics and roots of every tensor; may raise
    RootComputationError and writes nothing. Returns phase 2, which only writes (the optimizer's
    step prepares every param group before committing any)."""
    # Phase 1: new statistics and roots for all tensors (nothing written yet).
    plans = []
    due: list[torch.Tensor] = []
    for p, g, st in zip(params, grads, states):
        t = int(st["step"].item()) + 1
        # The elementwise parts (Adam graft, momentum, update) in float32, float64 for float64
        # params; the statistics L, R and their roots are float32 whatever the param's dtype.
        cd = compute_dtype(p)
        gc = upcast(g, cd)
        v_new = upcast(st["exp_avg_sq"], cd).mul(hp.grafting_beta2).addcmul_(gc, gc, value=1 - hp.grafting_beta2)
        plan = {"t": t, "g": gc, "v": v_new, "refresh": False}
        if is_matrix(p):
            G = fp32(g).reshape(p.shape[0], -1)
            blocks = blocks_of(*G.shape, hp.max_preconditioner_dim)
            decay, gain = (1.0, 1.0) if hp.beta2 == 1.0 else (hp.beta2, 1 - hp.beta2)
            plan["blocks"] = blocks
            plan["left"] = [L * decay + gain * (G[rs, cs] @ G[rs, cs].T) for L, (rs, cs) in zip(st["left"], blocks)]
            plan["right"] = [R * decay + gain * (G[rs, cs].T @ G[rs, cs]) for R, (rs, cs) in zip(st["right"], blocks)]
            start = hp.start_preconditioning_step
            plan["refresh"] = t >= start and (t - start) % hp.precondition_frequency == 0
            if plan["refresh"]:
                plan["root_slot"] = len(due)
                due.extend(plan["left"] + plan["right"])
        plans.append(plan)
    roots = _roots(due, hp) if due else []

    def commit() -> None:
        # Phase 2: commit state, precondition, graft, momentum, decay, update.
        for p, st, m, plan in zip(params, states, mults, plans):
            t = plan["t"]
            v = plan["v"]
            adam = plan["g"] / ((v / (1 - hp.grafting_beta2**t)).sqrt() + hp.grafting_epsilon)
            st["step"] += 1
            st["exp_avg_sq"].copy_(v)
            direction = adam
            if "blocks" in plan:
                n = len(plan["blocks"])
                for k in range(n):
                    st["left"][k].copy_(plan["left"][k])
                    st["right"][k].copy_(plan["right"][k])
                    if plan["refresh"]:
                        st["left_root"][k].copy_(roots[plan["root_slot"] + k])
                        st["right_root"][k].copy_(roots[plan["root_slot"] + n + k])
                if t >= hp.start_preconditioning_step:
                    G = fp32(plan["g"]).reshape(p.shape[0], -1)
                    A = adam.reshape(G.shape)
                    D = torch.empty_like(G)
                    for k, (rs, cs) in enumerate(plan["blocks"]):
                        Db = st["left_root"][k] @ G[rs, cs] @ st["right_root"][k]
                        if hp.grafting == "adam":
                            d_norm = torch.linalg.matrix_norm(Db)
                            scale = torch.where(d_norm > 0, torch.linalg.matrix_norm(A[rs, cs]) / d_norm, torch.zeros_like(d_norm))
                            Db = Db * scale
                        D[rs, cs] = Db
                    direction = D.view(p.shape)
            cd = compute_dtype(p)
            mom32 = upcast(st["momentum_buffer"], cd)
            mom32.mul_(hp.beta1).add_(direction, alpha=1 - hp.beta1)
            store(st["momentum_buffer"], mom32)
            p32 = upcast(p, cd)
            p32.mul_(1 - hp.lr * hp.weight_decay * m.wd)
            p32.add_(mom32, alpha=-hp.lr * m.lr / (1 - hp.beta1**t) if hp.beta1 > 0 else -hp.lr * m.lr)
            store(p, p32)


    return commit

backends.register(backends.Backend("shampoo", "reference", shampoo_reference, prepare=shampoo_reference_prepare))


class Shampoo(MupOptimizer):
    r"""Shampoo with blocking, EMA statistics, Adam grafting and muP.

    Math: see :func:`shampoo_reference`. Tensors with ndim > 2 are flattened to (shape[0], -1);
    sides longer than ``max_preconditioner_dim`` are split into blocks, each with its own L and R.

    Cost and memory: per block of shape (r, c), L is r x r and R is c x c, stored with their roots
    in float32: 8*(r^2 + c^2) bytes, plus two param-sized buffers (momentum and the Adam second
    moment) per tensor; :meth:`preconditioner_memory` reports the total. A root refresh costs an
    eigendecomposition (O(r^3 + c^3)) per block, every ``precondition_frequency`` steps; same-size
    blocks are batched into one call.

    muP (docs/mup.md): with Adam grafting every block has Adam's norm, hence AdamW's rules;
    without grafting (exponent -1/4 per side) input sqrt(m_out), hidden sqrt(m_out/m_in), output
    1/sqrt(m_in) while no side is split into blocks, and in general sqrt of the growth of the two
    block sides over m_in (:func:`mupopt.mup.shampoo_block_lr`): a side capped by
    ``max_preconditioner_dim`` no longer grows with width. Damping relative to the largest eigenvalue (``relative_epsilon=True``) makes the
    epsilon width-free.

    Args:
        params: parameters, named parameters or param groups.
        lr=1e-2, betas=(0.9, 1.0) (b1 momentum on the preconditioned direction, b2 for L and R;
        1.0 sums), epsilon=1e-12, weight_decay=0.0, max_preconditioner_dim=1024,
        precondition_frequency=1, start_preconditioning_step=1, grafting="adam" | None.
        relative_epsilon: damping epsilon * lambda_max per block instead of epsilon.
        grafting_beta2=0.999, grafting_epsilon=1e-8: the Adam grafting (and 1-D) direction.
        root_method: "eigh" (float32, retried in float64) or "newton" (coupled Newton, matmuls
            only; needs a damping that keeps L and R positive definite).
        wd_mode, backend: as :class:`mupopt.AdamW`.
    """

    rule = "shampoo"
    # L, R and their roots are float32 whatever the param's dtype (init_shampoo_state): a
    # state_dict keeps them so on load instead of torch's cast to the param's dtype.
    _state_dtypes = {key: torch.float32 for key in ("left", "right", "left_root", "right_root")}

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 1.0),
        epsilon: float = 1e-12,
        weight_decay: float = 0.0,
        max_preconditioner_dim: int = 1024,
        precondition_frequency: int = 1,
        start_preconditioning_step: int = 1,
        grafting: str | None = "adam",
        *,
        relative_epsilon: bool = False,
        grafting_beta2: float = 0.999,
        grafting_epsilon: float = 1e-8,
        root_method: str = "eigh",
        wd_mode: str = "independent",
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, grafting=grafting,
            relative_epsilon=relative_epsilon, grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            root_method=root_method, wd_mode=wd_mode, scale_eps=False,
        )
        super().__init__(params, defaults, backend=backend)

    def _check_hparams(self, group: dict) -> None:
        check_lr(group["lr"])
        # Not implemented (no backend negates the gradient): refused rather than ignored.
        check(group.get("maximize", False) is not True, "Shampoo does not support maximize=True (negate the loss instead)")
        b = group["betas"]
        check(isinstance(b, (tuple, list)) and len(b) == 2, f"Invalid betas: {b}")
        check(is_number(b[0]) and 0.0 <= b[0] < 1.0, f"Invalid beta parameter at index 0: {b[0]}")
        check(is_number(b[1]) and 0.0 < b[1] <= 1.0, f"Invalid beta parameter at index 1: {b[1]}")
        check(is_number(group["epsilon"]) and group["epsilon"] >= 0, f"Invalid epsilon value: {group['epsilon']}")
        check_weight_decay(group["weight_decay"])
        for key in ("max_preconditioner_dim", "precondition_frequency", "start_preconditioning_step"):
            v = group[key]
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"Invalid {key}: {v} (an integer >= 1)")
        check(group["grafting"] in GRAFTINGS, f"Invalid grafting: {group['grafting']!r} (expected one of {GRAFTINGS})")
        check(group["root_method"] in ROOT_METHODS, f"Invalid root_method: {group['root_method']!r} (expected one of {ROOT_METHODS})")
        check(isinstance(group["relative_epsilon"], bool), f"Invalid relative_epsilon: {group['relative_epsilon']!r}")
        check_betas((0.0, group["grafting_beta2"]))
        check(is_number(group["grafting_epsilon"]) and group["grafting_epsilon"] >= 0, f"Invalid grafting_epsilon: {group['grafting_epsilon']}")

    def _check_data(self, plans: list) -> None:
        """A non-finite gradient raises before any group is touched. It would poison L and R
        for good (every later root fails), so Shampoo refuses it; one device sync per step is
        the price. In a distributed run every rank learns of it (MupOptimizer._run)."""
        grads = [g for plan in plans for seg in plan.segments for g in (local(plan.params[k].grad) for k in seg.positions)]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            raise ValueError("Shampoo: non-finite gradient (inf or nan); params and state left unchanged")

    def _plan_options(self, group: dict) -> tuple:
        return (group["wd_mode"], group["grafting"], group["max_preconditioner_dim"])

    def group_multipliers(self, group: dict) -> list[Multipliers]:
        if group["grafting"] == "adam":
            return [multipliers("shampoo_grafted", info, wd_mode=group["wd_mode"]) for info in self.width_infos(group)]
        # The blocks are cut from what this rank steps: a DTensor's local shard (module
        # mupopt.optim._placement), so the block sides, and with them the lr rule, are the shard's.
        return [
            multipliers("shampoo", info, wd_mode=group["wd_mode"],
                        shampoo_blocks=(tuple(local(p).shape), group["max_preconditioner_dim"]) if is_matrix(p) else None)
            for p, info in zip(group["params"], self.width_infos(group))
        ]

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        if not is_dtensor(p):
            return init_shampoo_state(p, group["max_preconditioner_dim"])
        # Sharded: the param-sized buffers are DTensors like p (they reshard with it in a
        # checkpoint); L, R and their roots belong to the blocks of this rank's shard.
        state = init_shampoo_state(local(p), group["max_preconditioner_dim"])
        for key in ("momentum_buffer", "exp_avg_sq"):
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _state_keys(self, group: dict, i: int) -> tuple[str, ...]:
        keys = ("step", "momentum_buffer", "exp_avg_sq")
        # As _init_state: blocks only where this rank's part of the param is a non-empty matrix.
        return keys + _MATRIX_STATE if is_matrix(local(group["params"][i])) else keys

    def _hparams(self, group: dict) -> ShampooHparams:
        b1, b2 = group["betas"]
        return ShampooHparams(
            float(group["lr"]), float(b1), float(b2), float(group["epsilon"]), group["relative_epsilon"],
            float(group["weight_decay"]), group["max_preconditioner_dim"], group["precondition_frequency"],
            group["start_preconditioning_step"], group["grafting"], float(group["grafting_beta2"]),
            float(group["grafting_epsilon"]), group["root_method"],
        )

    # -- checkpoints of sharded params -------------------------------------------------------------
    def _index_params(self) -> dict[int, torch.Tensor]:
        """state_dict's param indices (torch numbers them in group order)."""
        params = [p for g in self.param_groups for p in g["params"]]
        return dict(enumerate(params))

    def _block_shapes(self, local_shape: tuple, max_dim: int) -> dict[str, list[tuple]]:
        rows, cols = local_shape[0], math.prod(local_shape[1:])
        blocks = blocks_of(rows, cols, max_dim) if rows and cols else []
        left = [(rs.stop - rs.start,) * 2 for rs, _ in blocks]
        right = [(cs.stop - cs.start,) * 2 for _, cs in blocks]
        return {"left": left, "left_root": left, "right": right, "right_root": right}

    def state_dict(self) -> dict:
        """As torch's, except for sharded (DTensor) params: their L, R and roots belong to the
        blocks of each rank's shard (mupopt.optim._placement), so they are returned as DTensors
        with a leading rank dimension (_placement.stack_over_ranks), which
        torch.distributed.checkpoint saves per rank. A resume needs the same sharding."""
        sd = super().state_dict()
        index = self._index_params()
        max_dim = {id(p): g["max_preconditioner_dim"] for g in self.param_groups for p in g["params"]}
        state = dict(sd["state"])
        for idx, st in sd["state"].items():
            p = index.get(idx)
            if p is None or not is_dtensor(p) or "left" not in st:
                continue
            per_rank = [self._block_shapes(shape, max_dim[id(p)]) for shape in shard_shapes(p)]
            if len({len(r["left"]) for r in per_rank}) != 1:
                raise NotImplementedError(
                    f"Shampoo: the shards of a parameter of shape {tuple(p.shape)} ({placement_text(p)}) are cut "
                    f"into different numbers of blocks of side <= {max_dim[id(p)]}; their statistics cannot be "
                    f"saved as one checkpoint entry. Choose max_preconditioner_dim so that every shard has the "
                    f"same number of blocks."
                )
            st = dict(st)
            for key in _MATRIX_STATE:
                st[key] = stack_over_ranks(st[key], [r[key] for r in per_rank], p)
            state[idx] = st
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        """Also takes the sharded form of :meth:`state_dict` (each rank keeps its own blocks)."""
        groups = state_dict.get("param_groups", [])
        params = {pid: p for g, cur in zip(groups, self.param_groups) for pid, p in zip(g["params"], cur["params"])}
        max_dim = {id(p): g["max_preconditioner_dim"] for g in self.param_groups for p in g["params"]}
        state = None
        for idx, st in state_dict.get("state", {}).items():
            p = params.get(idx)
            if p is None or not isinstance(st, dict) or not any(is_dtensor(v) for k in _MATRIX_STATE for v in st.get(k, ())):
                continue
            shapes = self._block_shapes(tuple(local(p).shape) if is_dtensor(p) else tuple(p.shape), max_dim[id(p)])
            st = dict(st)
            for key in _MATRIX_STATE:
                if len(st[key]) != len(shapes[key]):
                    raise ValueError(
                        f"Shampoo: state {key!r} of a parameter of shape {tuple(p.shape)} holds {len(st[key])} blocks, "
                        f"this rank's shard has {len(shapes[key])}: the checkpoint was saved with another sharding"
                    )
                st[key] = [unstack_over_ranks(v, shape) for v, shape in zip(st[key], shapes[key])]
            state = state if state is not None else dict(state_dict["state"])
            state[idx] = st
        if state is not None:
            state_dict = {**state_dict, "state": state}
        super().load_state_dict(state_dict)

    def preconditioner_memory(self) -> dict[str, int]:
        """Bytes of "preconditioners" (L, R and their roots, float32), "buffers" (momentum and
        the Adam second moment, in the parameter's dtype) and "total". A parameter whose state
        exists counts what it holds; one without state yet (before the first step) counts what
        its first step will allocate, so the number is known before any memory is spent."""
        pre = buf = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "momentum_buffer" in st:
                    for key in ("left", "right", "left_root", "right_root"):
                        pre += sum(x.numel() * x.element_size() for x in st.get(key, []))
                    for key in ("momentum_buffer", "exp_avg_sq"):
                        if key in st:
                            buf += st[key].numel() * st[key].element_size()
                    continue
                buf += 2 * p.numel() * p.element_size()
                if is_matrix(p):
                    blocks = blocks_of(p.shape[0], p.numel() // p.shape[0], group["max_preconditioner_dim"])
                    # L and R and their roots: 2 * (r^2 + c^2) float32 values per (r, c) block.
                    pre += sum(2 * 4 * ((rs.stop - rs.start) ** 2 + (cs.stop - cs.start) ** 2) for rs, cs in blocks)
        return {"preconditioners": pre, "buffers": buf, "total": pre + buf}
