"""Shampoo (Gupta, Koren, Singer, arXiv 1802.09568) in the practical form of DistributedShampoo
(Shi et al., arXiv 2309.06497: blocking, EMA statistics, Adam grafting), with muP.

Reference: a float64 transcription of these papers' formulas (mupopt.testing, tests/test_shampoo.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import backends
from . import _lean_states as lean
from ..storage import load_param, store_param
from ..linalg import inverse_root_eigh, inverse_root_newton
from ..mup import Multipliers, multipliers
from ._base import (MupOptimizer, _agree, _param_label, _distributed_ready, check, check_betas, check_lr, check_weight_decay, compute_dtype, fp32,
                    is_number, store, upcast)
from ._placement import (Exchange, ExchangeItem, balance, check_param, dist, is_dtensor, local, matrix_shape, mesh_group,
                         split_mesh_dims)

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
    stochastic_rounding: bool = False  # param stores (mupopt/storage.py)
    kahan_summation: bool = False  # compensated param stores (mupopt/storage.py)


def blocks_of(rows: int, cols: int, max_dim: int) -> list[tuple[slice, slice]]:
    """Row-major blocks of a (rows, cols) matrix with sides of at most max_dim."""
    r = [slice(i, min(i + max_dim, rows)) for i in range(0, rows, max_dim)]
    c = [slice(j, min(j + max_dim, cols)) for j in range(0, cols, max_dim)]
    return [(rs, cs) for rs in r for cs in c]


def is_matrix(p: torch.Tensor) -> bool:
    """Preconditioned with L and R (ndim >= 2, flattened to (shape[0], -1)); else diagonal."""
    return p.ndim >= 2 and p.numel() > 0


def init_shampoo_state(p: torch.Tensor, hp_max_dim: int, owned: list[bool] | None = None, group: dict | None = None) -> dict:
    """A new state; the blocks are those of p's (global) shape. ``owned``: per block, whether
    this rank keeps its L, R and roots (a sharded matrix, :class:`GlobalBlocks`); the others
    get empty placeholders. Default: every block. ``group``: its ``state_bits`` give the format
    of the momentum and the Adam second moment (grafting / diagonal); L, R and roots are float32."""
    group = group or {}
    state = {
        "step": torch.tensor(0.0, dtype=torch.float32),
        **lean.zeros(p, group, "momentum_buffer"),
        **lean.zeros(p, group, "exp_avg_sq"),
    }
    if is_matrix(p):
        blocks = blocks_of(*matrix_shape(p.shape), hp_max_dim)
        keep = owned or [True] * len(blocks)
        f32 = dict(dtype=torch.float32, device=p.device)

        def side(n: int, k: int) -> torch.Tensor:
            return torch.zeros(n, n, **f32) if keep[k] else torch.empty(0, **f32)

        state["left"] = [side(rs.stop - rs.start, k) for k, (rs, _) in enumerate(blocks)]
        state["right"] = [side(cs.stop - cs.start, k) for k, (_, cs) in enumerate(blocks)]
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


def shampoo_reference_prepare(params, grads, states, mults, hp: ShampooHparams, *, precondition=None) -> Callable[[], None]:
    """Phase 1 of :func:`shampoo_reference`: new statistics and roots of every tensor; may raise
    RootComputationError and writes nothing. Returns phase 2, which only writes (the optimizer's
    step prepares every param group before committing any).

    ``precondition``: None, or the placement layer's hook for sharded matrices
    (:class:`GlobalBlocks`): the tensors at ``precondition.covered`` are local shards of
    matrices whose blocks are the global tensor's; the hook computes their statistics, roots
    and grafted directions on the blocks' owner ranks (its prepare exchanges data with every
    rank, so it is called before anything here can raise) and returns this rank's piece of
    each direction at commit. Everything elementwise stays here, on the local shard."""
    covered = set(precondition.covered) if precondition is not None else set()
    # Phase 1: new statistics and roots for all tensors (nothing written yet).
    plans = []
    due: list[torch.Tensor] = []
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        t = int(st["step"].item()) + 1
        # The elementwise parts (Adam graft, momentum, update) in float32, float64 for float64
        # params; the statistics L, R and their roots are float32 whatever the param's dtype.
        cd = compute_dtype(p)
        gc = upcast(g, cd)
        v_new = upcast(st["exp_avg_sq"], cd).mul(hp.grafting_beta2).addcmul_(gc, gc, value=1 - hp.grafting_beta2)
        plan = {"t": t, "g": gc, "v": v_new, "refresh": False}
        if i in covered:
            # The Adam direction now: the hook grafts each global block to its norm.
            plan["adam"] = gc / ((v_new / (1 - hp.grafting_beta2**t)).sqrt() + hp.grafting_epsilon)
        elif is_matrix(p):
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
    finish = None
    if covered:
        finish = precondition.prepare({i: fp32(grads[i]) for i in covered}, {i: plans[i]["adam"] for i in covered},
                                      {i: plans[i]["t"] for i in covered}, {i: states[i] for i in covered}, hp)
    roots = _roots(due, hp) if due else []

    def commit() -> None:
        # Phase 2: commit state, precondition, graft, momentum, decay, update.
        directions = finish() if finish is not None else {}
        for i, (p, st, m, plan) in enumerate(zip(params, states, mults, plans)):
            t = plan["t"]
            v = plan["v"]
            adam = plan["adam"] if "adam" in plan else plan["g"] / ((v / (1 - hp.grafting_beta2**t)).sqrt() + hp.grafting_epsilon)
            st["step"] += 1
            st["exp_avg_sq"].copy_(v)
            direction = directions.get(i, adam)
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
                            Db = Db * graft_scale(torch.linalg.matrix_norm(A[rs, cs]), Db)
                        D[rs, cs] = Db
                    direction = D.view(p.shape)
            cd = compute_dtype(p)
            mom32 = upcast(st["momentum_buffer"], cd)
            mom32.mul_(hp.beta1).add_(direction, alpha=1 - hp.beta1)
            store(st["momentum_buffer"], mom32)
            p32 = load_param(p, cd, st, hp.kahan_summation)
            p32.mul_(1 - hp.lr * hp.weight_decay * m.wd)
            p32.add_(mom32, alpha=-hp.lr * m.lr / (1 - hp.beta1**t) if hp.beta1 > 0 else -hp.lr * m.lr)
            store_param(p, p32, st, hp.stochastic_rounding, hp.kahan_summation)

    return commit


def graft_scale(a_norm: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Adam grafting: ||A_b||_F / ||D_b||_F, 0 when D_b = 0."""
    d_norm = torch.linalg.matrix_norm(D)
    return torch.where(d_norm > 0, a_norm / d_norm, torch.zeros_like(d_norm))


# ---------------------------------------------------------------------------------------------
# Sharded matrices: the blocks of the global tensor, each on an owner rank
# ---------------------------------------------------------------------------------------------
def sharded_matrix(p: torch.Tensor) -> bool:
    """A matrix DTensor split on some mesh dim: preconditioned through :class:`GlobalBlocks`.
    (A replicated DTensor's local tensor is the whole tensor: it is stepped where it is.)"""
    return is_dtensor(p) and is_matrix(p) and bool(split_mesh_dims(p, "Shampoo"))


def root_cost(rows: int, cols: int) -> float:
    """What a block's inverse roots cost, up to a constant: eigh of r x r and c x c."""
    return float(rows) ** 3 + float(cols) ** 3


def block_owners(groups: Sequence[tuple[Sequence[torch.Tensor], int]]) -> dict[int, list[int]]:
    """The global rank that keeps each block's L, R and roots, for every sharded matrix of
    ``groups`` ((params, max_preconditioner_dim) per param group): {id(param): [rank per block]}.

    Per mesh, over every rank of it (replicas included), largest root cost first to the least
    loaded rank (:func:`_placement.balance`), group after group with the loads carried over, so
    that a group added later leaves the earlier groups' owners as they are. From shapes alone:
    every rank computes the same owners, whichever params have gradients."""
    loads: dict[tuple, list[float]] = {}
    owners: dict[int, list[int]] = {}
    for params, max_dim in groups:
        by_mesh: dict[tuple, list] = {}
        for p in params:
            if not sharded_matrix(p):
                continue
            ranks = tuple(p.device_mesh.mesh.flatten().tolist())
            for k, (rs, cs) in enumerate(blocks_of(*matrix_shape(p.shape), max_dim)):
                by_mesh.setdefault(ranks, []).append((p, k, root_cost(rs.stop - rs.start, cs.stop - cs.start)))
        for ranks, blocks in by_mesh.items():
            where = balance([c for _, _, c in blocks], loads.setdefault(ranks, [0.0] * len(ranks)))
            for (p, k, _), r in zip(blocks, where):
                owners.setdefault(id(p), []).append(ranks[r])
    return owners


class GlobalBlocks:
    """Shampoo's ``precondition`` hook for one param group's sharded matrices (the placement
    layer's part of a step: docs/distributed.md).

    The blocks of a sharded matrix are those of its global (shape[0], -1) view, as on one
    process; each block has an owner rank (:func:`block_owners`) that keeps its L, R and roots.
    Per step (:meth:`prepare`) every rank sends each owner its piece of the block's gradient,
    with the Frobenius norm of the same piece of its Adam direction (the graft), in one
    all-to-all per process group (:class:`_placement.Exchange`, Muon's); the owners update L and
    R, compute the due roots and the grafted directions ``D = Lr G Rr * ||A||/||D||``; at commit
    a second all-to-all returns every rank, replicas included, its pieces of D. The same math as
    one process, the root work spread over the ranks (Shi et al., arXiv 2309.06497: its
    distributors). ``covered``: the positions of the sharded matrices among ``params``.
    """

    def __init__(self, params: Sequence[torch.Tensor], max_dim: int, owners: dict[int, list[int]], optimizer: str = "Shampoo"):
        self.covered = [i for i, p in enumerate(params) if sharded_matrix(p)]
        self.shapes = {i: tuple(local(params[i]).shape) for i in self.covered}
        self.blocks = {i: blocks_of(*matrix_shape(params[i].shape), max_dim) for i in self.covered}
        self.device = local(params[self.covered[0]]).device if self.covered else None
        self.optimizer = optimizer
        by_group: dict[int, tuple] = {}
        for i in self.covered:
            p = params[i]
            check_param(p, optimizer)
            group = mesh_group(p.device_mesh, optimizer)
            by_group.setdefault(id(group), (group, []))[1].append(i)
        self.exchanges = []  # (Exchange, [(tensor, block) per item])
        for group, idx in by_group.values():
            items, where = [], []
            for i in idx:
                p = params[i]
                for k, (rs, cs) in enumerate(self.blocks[i]):
                    owner = dist.get_group_rank(group, owners[id(p)][k])
                    items.append(ExchangeItem(i, tuple(p.shape), tuple(p.placements), p.device_mesh,
                                              (rs.start, rs.stop), (cs.start, cs.stop), owner))
                    where.append((i, k))
            self.exchanges.append((Exchange(group, items, optimizer), where))
        self.roots = 0  # inverse roots this rank computed in the last step (tests, reports)
        self.root_cost = 0.0  # their sum of n^3
        self.calls = 0  # all-to-alls in the last step

    def prepare(self, grads: dict, adams: dict, steps: dict, states: dict, hp: ShampooHparams) -> Callable[[], dict]:
        """Phase 1 for the covered tensors: ``grads[i]`` (float32) and ``adams[i]`` (the Adam
        direction) are local shards, ``steps[i]`` the step being taken (t), ``states[i]`` the
        local state. Exchanges data with every rank of each group first; then computes what may
        fail (the owners' roots) and writes nothing. Returns phase 2: it writes the owners' L, R
        and roots and returns {i: this rank's piece of the grafted direction, shaped like the
        local shard} for the tensors with t >= start_preconditioning_step (a collective too:
        every rank commits, or none)."""
        start = hp.start_preconditioning_step
        graft = hp.grafting == "adam"
        calls = sum(ex.calls for ex, _ in self.exchanges)
        owned = []  # (exchange, item, tensor, block, gathered G, norm of the gathered A)
        for e, (ex, where) in enumerate(self.exchanges):
            tensors = {i for i, _ in where}
            norms_of = {i: adams[i].reshape(ex.local_shape[i]) for i in tensors} if graft and any(
                steps[i] >= start for i in tensors) else None
            got = ex.gather({i: grads[i].reshape(ex.local_shape[i]) for i in tensors}, torch.float32, self.device, norms_of)
            whole, a_norms = got if norms_of is not None else (got, {})
            owned += [(e, j, *where[j], G, a_norms.get(j)) for j, G in whole.items()]
        self.calls = sum(ex.calls for ex, _ in self.exchanges) - calls
        # Everything below may raise: every rank has sent its pieces.
        self._check_states(states)
        decay, gain = (1.0, 1.0) if hp.beta2 == 1.0 else (hp.beta2, 1 - hp.beta2)
        new, due = [], []
        for e, j, i, k, G, _ in owned:
            st, t = states[i], steps[i]
            L = st["left"][k] * decay + gain * (G @ G.T)
            R = st["right"][k] * decay + gain * (G.T @ G)
            refresh = t >= start and (t - start) % hp.precondition_frequency == 0
            new.append((L, R, len(due) if refresh else None))
            if refresh:
                due += [L, R]
        roots = _roots(due, hp) if due else []
        self.roots, self.root_cost = len(due), sum(float(m.shape[0]) ** 3 for m in due)
        done: dict[int, dict] = {e: {} for e in range(len(self.exchanges))}
        for (e, j, i, k, G, a_norm), (_, _, slot) in zip(owned, new):
            if steps[i] < start:
                continue
            st = states[i]
            Lr, Rr = (st["left_root"][k], st["right_root"][k]) if slot is None else (roots[slot], roots[slot + 1])
            D = Lr @ G @ Rr
            done[e][j] = D * graft_scale(a_norm, D) if graft else D

        def commit() -> dict:
            for (e, j, i, k, G, _), (L, R, slot) in zip(owned, new):
                st = states[i]
                st["left"][k].copy_(L)
                st["right"][k].copy_(R)
                if slot is not None:
                    st["left_root"][k].copy_(roots[slot])
                    st["right_root"][k].copy_(roots[slot + 1])
            calls = sum(ex.calls for ex, _ in self.exchanges)
            out = {}
            for e, (ex, where) in enumerate(self.exchanges):
                active = [j for j, (i, _) in enumerate(where) if steps[i] >= start]
                if active:
                    out.update(ex.scatter(done[e], torch.float32, self.device, active))
            self.calls += sum(ex.calls for ex, _ in self.exchanges) - calls
            return {i: d.view(self.shapes[i]) for i, d in out.items()}

        return commit

    def _check_states(self, states: dict) -> None:
        """This rank must hold the blocks it owns (r x r, c x c) and placeholders for the others:
        a state made for other owners (param groups edited after the state was created) raises."""
        for ex, where in self.exchanges:
            for it, (i, k) in zip(ex.items, where):
                mine = it.owner == ex.me
                for key, (lo, hi) in (("left", it.rows), ("right", it.cols), ("left_root", it.rows), ("right_root", it.cols)):
                    blocks = states[i].get(key, ())
                    x = blocks[k] if k < len(blocks) else None
                    if x is None or tuple(x.shape) != ((hi - lo,) * 2 if mine else (0,)):
                        raise RuntimeError(
                            f"{self.optimizer}: state {key!r} of block {k} of a parameter of shape {it.shape} is "
                            f"{None if x is None else tuple(x.shape)} on this rank, which {'owns' if mine else 'does not own'} "
                            f"the block: the state was made for other owners (param groups changed after it was "
                            f"created?); nothing was changed"
                        )


SHAMPOO_STATES = {"momentum_buffer": lean.SIGNED, "exp_avg_sq": lean.UNSIGNED}  # what state_bits stores

backends.register(backends.Backend("shampoo", "reference", lean.reference(shampoo_reference, SHAMPOO_STATES),
                                   prepare=lean.reference(shampoo_reference_prepare, SHAMPOO_STATES, prepare=True),
                                   state_bits=lean.STATE_BITS, kahan_summation=True))


class Shampoo(MupOptimizer):
    r"""Shampoo with blocking, EMA statistics, Adam grafting and muP.

    Math: see :func:`shampoo_reference`. Tensors with ndim > 2 are flattened to (shape[0], -1);
    sides longer than ``max_preconditioner_dim`` are split into blocks, each with its own L and R.

    Cost and memory: per block of shape (r, c), L is r x r and R is c x c, stored with their roots
    in float32: 8*(r^2 + c^2) bytes, plus two param-sized buffers (momentum and the Adam second
    moment) per tensor; :meth:`preconditioner_memory` reports the total. A root refresh costs an
    eigendecomposition (O(r^3 + c^3)) per block, every ``precondition_frequency`` steps; same-size
    blocks are batched into one call.

    Sharded parameters (FSDP2, tensor parallelism, HSDP and their combinations; DTensors): the
    blocks are those of the global tensor, so a sharded run is the single-process run whatever
    the mesh and world size. Each block of a sharded matrix has an owner rank that keeps its L,
    R and roots and computes them from the pieces of the gradient the other ranks send it
    (:class:`GlobalBlocks`, docs/distributed.md); the root work is spread over every rank of
    the mesh, and :meth:`preconditioner_memory` counts what this rank holds. ``state_dict`` and
    ``load_state_dict`` then are collectives (every rank calls them, as torch's
    get_state_dict / set_state_dict do); the checkpoint holds each block whole (a DTensor of its
    global shape, rows sharded), so it resumes at any world size.

    muP (docs/mup.md): with Adam grafting every block has Adam's norm, hence AdamW's rules;
    without grafting (exponent -1/4 per side) input sqrt(m_out), hidden sqrt(m_out/m_in), output
    1/sqrt(m_in) while no side is split into blocks, and in general sqrt of the growth of the two
    block sides over m_in (:func:`mupopt.mup.shampoo_block_lr`): a side capped by
    ``max_preconditioner_dim`` no longer grows with width (the global blocks' sides, on every
    placement). Damping relative to the largest eigenvalue (``relative_epsilon=True``) makes the
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
        wd_mode, stochastic_rounding, kahan_summation, backend, base_shapes, overrides: as :class:`mupopt.AdamW`.
    """

    rule = "shampoo"
    _lean_keys = SHAMPOO_STATES
    _no_scale_eps = "its damping is made width-free by relative_epsilon (docs/mup.md), and grafting_epsilon is not scaled"
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
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        kahan_summation: bool = False,
        backend: str = "auto",
        base_shapes=None,
        overrides=None,
    ):
        defaults = dict(
            lr=lr, betas=betas, epsilon=epsilon, weight_decay=weight_decay,
            max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
            start_preconditioning_step=start_preconditioning_step, grafting=grafting,
            relative_epsilon=relative_epsilon, grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
            root_method=root_method, wd_mode=wd_mode, scale_eps=False,
        )
        defaults["state_bits"] = state_bits
        defaults["stochastic_rounding"] = stochastic_rounding
        defaults["kahan_summation"] = kahan_summation
        super().__init__(params, defaults, backend=backend, base_shapes=base_shapes, overrides=overrides)

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
        the price. In a distributed run every rank learns of it (MupOptimizer._run); where a
        prepare phase exchanges data (sharded matrices, :class:`GlobalBlocks`) the ranks agree
        on it here, before that exchange, so that every rank takes part in it or none does."""
        grads = [g for plan in plans for seg in plan.segments for g in (local(plan.params[k].grad) for k in seg.positions)]
        failure = None
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            failure = ValueError("Shampoo: non-finite gradient (inf or nan); params and state left unchanged")
        if any("precondition" in seg.collectives for plan in plans for seg in plan.segments) and _distributed_ready():
            failure = _agree(failure, type(self).__name__)
        if failure is not None:
            raise failure

    def _plan_options(self, group: dict) -> tuple:
        return (group["wd_mode"], group["grafting"], group["max_preconditioner_dim"])

    def group_multipliers(self, group: dict) -> list[Multipliers]:
        depths = self.depth_infos(group)
        if group["grafting"] == "adam":
            return [multipliers("shampoo_grafted", info, depth=depth, wd_mode=group["wd_mode"])
                    for info, depth in zip(self.width_infos(group), depths)]
        # The blocks are those of the global shape (a DTensor's p.shape), on every placement.
        return [
            multipliers("shampoo", info, depth=depth, wd_mode=group["wd_mode"],
                        shampoo_blocks=(tuple(p.shape), group["max_preconditioner_dim"]) if is_matrix(p) else None)
            for p, info, depth in zip(group["params"], self.width_infos(group), depths)
        ]

    def _owners(self) -> dict[int, list[int]]:
        """:func:`block_owners` of this optimizer's param groups, cached while the groups' params
        and block sides stay the same."""
        key = tuple((tuple(map(id, g["params"])), g["max_preconditioner_dim"]) for g in self.param_groups)
        cached = self.__dict__.get("_plan_owners")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_plan_owners"] = (key, block_owners([(g["params"], g["max_preconditioner_dim"]) for g in self.param_groups]))
        return cached[1]

    def _create_state(self, group: dict, plan) -> list:
        """As MupOptimizer's, after turning blocks a framework wrote straight into ``self.state``
        in the checkpoint form (a dict by block number: ZeroRedundancyOptimizer copies the
        consolidated states in without load_state_dict) back into the list the step reads."""
        for p in plan.params:
            st = self.state.get(p)
            for key in _MATRIX_STATE if st else ():
                blocks = st.get(key)
                if isinstance(blocks, dict):
                    st[key] = [blocks[str(k)] for k in range(len(blocks))]
        return super()._create_state(group, plan)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        # A DTensor's param-sized buffers are DTensors like p (they reshard with it in a
        # checkpoint); the blocks are the global tensor's, and of a sharded matrix this rank
        # keeps those it owns (GlobalBlocks).
        owned = None
        if sharded_matrix(p):
            owned = [r == dist.get_rank() for r in self._owners()[id(p)]]
        return init_shampoo_state(p, group["max_preconditioner_dim"], owned, group)

    def _collectives(self, kernel: str, params: list) -> dict:
        """Sharded matrices: blocks of the global tensor on owner ranks (GlobalBlocks)."""
        group = next(g for g in self.param_groups if any(q is params[0] for q in g["params"]))
        hook = GlobalBlocks(params, group["max_preconditioner_dim"], self._owners(), type(self).__name__)
        return {"precondition": hook} if hook.covered else {}

    def _state_keys(self, group: dict, i: int) -> tuple[str, ...]:
        keys = ("step", "momentum_buffer", "exp_avg_sq")
        # As _init_state: blocks only where this rank's part of the param is a non-empty matrix.
        return keys + _MATRIX_STATE if is_matrix(local(group["params"][i])) else keys

    def _check_state_keys(self, group: dict, plan) -> None:
        """Also: each matrix's statistics are of the blocks that ``max_preconditioner_dim`` cuts
        now. A change of it after a param's first step would otherwise fail inside the step with
        a shape error; which rank owns a sharded matrix's block is _check_states' check."""
        super()._check_state_keys(group, plan)
        for k, p in zip(plan.stepped, plan.params):
            st = self.state[p]
            if "left" not in st:
                continue
            blocks = blocks_of(*matrix_shape(p.shape), group["max_preconditioner_dim"])
            sides = [((rs.stop - rs.start,) * 2, (cs.stop - cs.start,) * 2) for rs, cs in blocks]
            have = [(tuple(a.shape), tuple(b.shape)) for a, b in zip(st["left"], st["right"])]
            if len(have) != len(sides) or any(h not in (s, ((0,), (0,))) for h, s in zip(have, sides)):
                raise RuntimeError(
                    f"{type(self).__name__}: the statistics of parameter {_param_label(group, k)} are of "
                    f"{len(have)} block(s) with L, R of shapes {have[:4]}{' ...' if len(have) > 4 else ''}, but "
                    f"max_preconditioner_dim={group['max_preconditioner_dim']} cuts it into {len(sides)} block(s) of "
                    f"{sides[:4]}{' ...' if len(sides) > 4 else ''}: was max_preconditioner_dim changed after its "
                    f"first step? Set it back, or reset the parameter with opt.state[p] = {{}} (its statistics "
                    f"start afresh); nothing was changed"
                )

    def _hparams(self, group: dict) -> ShampooHparams:
        b1, b2 = group["betas"]
        return ShampooHparams(
            float(group["lr"]), float(b1), float(b2), float(group["epsilon"]), group["relative_epsilon"],
            float(group["weight_decay"]), group["max_preconditioner_dim"], group["precondition_frequency"],
            group["start_preconditioning_step"], group["grafting"], float(group["grafting_beta2"]),
            float(group["grafting_epsilon"]), group["root_method"],
        )

    # -- checkpoints -------------------------------------------------------------------------------
    # A state_dict gives each block's L, R and roots as {"0": ..., "1": ...} (by block number):
    # torch's flatten_optimizer_state_dict takes dicts, not lists (a list's index and the same
    # key in a dict name one checkpoint entry, so the list form of earlier mupopt still loads).
    # A sharded matrix's blocks live on their owner ranks, which depend on the world size: a
    # checkpoint holds each as a DTensor of its global shape (n, n), its rows sharded over every
    # rank of the parameter's mesh (Shard(0) on every mesh dim), the same entries at every world
    # size and sharding, so torch.distributed.checkpoint reshards them (one process loads them
    # as plain (n, n) tensors). state_dict sends each rank its rows from the owners (one
    # all-to-all per process group), load_state_dict the rows to the loading optimizer's owners:
    # with sharded matrices both are collectives (every rank calls them, as get_state_dict and
    # set_state_dict do).
    def _state_dict(self) -> dict:
        """As torch's, with the blocks' statistics in the checkpoint form (comment above)."""
        sd = super()._state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        state = dict(sd["state"])
        for idx, st in sd["state"].items():
            if "left" in st:
                state[idx] = {**st, **{key: {str(k): x for k, x in enumerate(st[key])} for key in _MATRIX_STATE}}
        sd = {**sd, "state": state}
        max_dim = {id(p): g["max_preconditioner_dim"] for g in self.param_groups for p in g["params"]}
        owners = self._owners()
        jobs = [(idx, p, key, k) for idx, p in enumerate(params) if sharded_matrix(p) and "left" in state.get(idx, {})
                for key in _MATRIX_STATE for k in range(len(owners[id(p)]))]
        if not jobs:
            return sd
        from torch.distributed.tensor import DTensor, Shard

        for group, batch in _by_group(jobs, lambda job: job[1].device_mesh):
            items = []
            for n, (idx, p, key, k) in enumerate(batch):
                side = _side(p, key, k, max_dim[id(p)])
                items.append(ExchangeItem(n, (side, side), (Shard(0),) * p.device_mesh.ndim, p.device_mesh, (0, side), (0, side),
                                          dist.get_group_rank(group, owners[id(p)][k])))
            ex = Exchange(group, items, type(self).__name__)
            device = local(batch[0][1]).device
            rows = ex.scatter({n: self.state[batch[n][1]][batch[n][2]][batch[n][3]] for n in ex.mine}, torch.float32, device)
            for n, ((idx, p, key, k), it) in enumerate(zip(batch, items)):
                state[idx][key][str(k)] = DTensor.from_local(rows[n], it.mesh, it.placements, run_check=False,
                                                             shape=it.shape, stride=(it.shape[1], 1))
        return sd

    def _loaded_state(self, state_dict: dict) -> dict:
        """load_state_dict takes the checkpoint form (comment above) and the list form: each
        block in a list or in a dict by block number; of a sharded matrix, each block a DTensor
        of any sharding (rows sent to this optimizer's owners, a collective) or a plain tensor."""
        groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        # The saved groups' block sides win (MupOptimizer.load_state_dict), so do their owners.
        sides = [(cur["params"], g.get("max_preconditioner_dim", cur["max_preconditioner_dim"]))
                 for g, cur in zip(groups, self.param_groups)]
        owners = block_owners(sides)
        max_dim = {id(p): md for params, md in sides for p in params}
        state = None
        jobs = []  # (pid, p, key, k, value) of sharded matrices, in this optimizer's param order (the
        # same on every rank, so the exchanges pair up)
        for g, cur in zip(groups, self.param_groups):
            for pid, p in zip(g["params"], cur["params"]):
                st = saved_state.get(pid)
                if not isinstance(st, dict) or not any(key in st for key in _MATRIX_STATE):
                    continue
                n_blocks = len(blocks_of(*matrix_shape(p.shape), max_dim[id(p)])) if is_matrix(p) else 0
                lists = {}
                for key in _MATRIX_STATE:
                    lists[key] = _block_list(st.get(key))
                    if len(lists[key]) != n_blocks:
                        raise ValueError(
                            f"Shampoo: state {key!r} of a parameter of shape {tuple(p.shape)} holds {len(lists[key])} "
                            f"blocks, its blocks of side <= {max_dim[id(p)]} are {n_blocks}"
                        )
                if sharded_matrix(p):
                    jobs += [(pid, p, key, k, v) for key in _MATRIX_STATE for k, v in enumerate(lists[key])]
                    lists = {key: [None] * n_blocks for key in _MATRIX_STATE}
                state = state if state is not None else dict(saved_state)
                state[pid] = {**st, **lists}
        checked: set = set()  # geometries of loaded DTensors checked against DTensor (once each)
        ranks_of: dict[int, list] = {}
        for group, batch in _by_group(jobs, lambda job: job[1].device_mesh):
            items, pieces = [], []
            for n, (pid, p, key, k, v) in enumerate(batch):
                side = _side(p, key, k, max_dim[id(p)])
                _check_block(p, key, k, v, side)
                owner = owners[id(p)][k]
                if not is_dtensor(v):  # the whole block, on every rank: its owner keeps it
                    state[pid][key][k] = v if owner == dist.get_rank() else v.new_empty(0)
                    continue
                mesh = v.device_mesh
                if (side, id(mesh), v.placements) not in checked:
                    check_param(v, type(self).__name__)
                    checked.add((side, id(mesh), v.placements))
                if id(mesh) not in ranks_of:
                    ranks_of[id(mesh)] = mesh.mesh.flatten().tolist()
                if owner not in ranks_of[id(mesh)]:
                    raise ValueError(f"Shampoo: a block of a parameter of shape {tuple(p.shape)} was loaded as a DTensor on a "
                                     f"mesh without its owner rank {owner} (the parameter's mesh: {p.device_mesh})")
                items.append(ExchangeItem(n, (side, side), tuple(v.placements), mesh, (0, side), (0, side),
                                          dist.get_group_rank(group, owner)))
                pieces.append(v.to_local())
            if not items:
                continue
            ex = Exchange(group, items, type(self).__name__)
            whole = ex.gather({it.tensor: x.reshape(ex.local_shape[it.tensor]) for it, x in zip(items, pieces)},
                              torch.float32, pieces[0].device)
            for j, (it, x) in enumerate(zip(items, pieces)):
                pid, _, key, k, _ = batch[it.tensor]
                state[pid][key][k] = whole[j] if it.owner == ex.me else x.new_empty(0, dtype=torch.float32)
        return state_dict if state is None else {**state_dict, "state": state}

    def preconditioner_memory(self) -> dict[str, int]:
        """Bytes this rank holds of "preconditioners" (L, R and their roots, float32), "buffers"
        (momentum and the Adam second moment in their ``state_bits`` format, 8-bit scales
        included; a DTensor's local shard)
        and "total". A parameter whose state exists counts what it holds (of a sharded matrix,
        the blocks this rank owns); one without state yet (before the first step) counts what
        its first step will allocate, so the number is known before any memory is spent."""
        pre = buf = 0
        owners = None
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p, {})
                if "momentum_buffer" in st:
                    for key in _MATRIX_STATE:
                        pre += sum(x.numel() * x.element_size() for x in st.get(key, []))
                    buf += lean.nbytes({k: v for k, v in st.items()
                                        if k.removesuffix(lean.ABSMAX) in ("momentum_buffer", "exp_avg_sq")})
                    continue
                buf += 2 * lean.entry_nbytes(p, group)
                if is_matrix(p):
                    blocks = blocks_of(*matrix_shape(p.shape), group["max_preconditioner_dim"])
                    if sharded_matrix(p):
                        owners = owners or self._owners()
                        blocks = [b for b, r in zip(blocks, owners[id(p)]) if r == dist.get_rank()]
                    # L and R and their roots: 2 * (r^2 + c^2) float32 values per (r, c) block.
                    pre += sum(2 * 4 * ((rs.stop - rs.start) ** 2 + (cs.stop - cs.start) ** 2) for rs, cs in blocks)
        return {"preconditioners": pre, "buffers": buf, "total": pre + buf}


def _side(p: torch.Tensor, key: str, k: int, max_dim: int) -> int:
    """The side of block k's L (``left*``) or R (``right*``) of matrix p."""
    rs, cs = blocks_of(*matrix_shape(p.shape), max_dim)[k]
    return rs.stop - rs.start if key.startswith("left") else cs.stop - cs.start


def _block_list(value) -> list:
    """A state entry's blocks in order: a list, or a dict by block number (str or int keys)."""
    if value is None:
        return []
    if isinstance(value, dict):
        keys = sorted(value, key=int)
        if [int(k) for k in keys] != list(range(len(keys))):
            raise ValueError(f"Shampoo: blocks numbered {keys} in a state_dict (expected 0 .. {len(keys) - 1})")
        return [value[k] for k in keys]
    return list(value)


def _check_block(p, key: str, k: int, value, side: int) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (side, side):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"Shampoo: state {key!r} of block {k} of a parameter of shape {tuple(p.shape)} is {shape}, expected "
            f"({side}, {side}) (a checkpoint of per-shard blocks, saved by an earlier mupopt, cannot be loaded)"
        )


def _by_group(jobs: list, mesh_of) -> list[tuple]:
    """``jobs`` batched by the process group of their mesh, in order: [(group, jobs)]."""
    out: dict[int, tuple] = {}
    for job in jobs:
        group = mesh_group(mesh_of(job), "Shampoo")
        out.setdefault(id(group), (group, []))[1].append(job)
    return list(out.values())
