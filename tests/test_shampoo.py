"""mupopt.Shampoo against a float64 transcription of the Shampoo formulas (Gupta et al. 2018; Shi et al. 2023, arXiv 2309.06497).

The oracle below is written from the spec and from the conventions the Shampoo docstring fixes
where the spec is silent (grafting_beta2 = 0.999 and grafting_epsilon = 1e-8 for the Adam
direction, roots refreshed at t = start, start + freq, ..., 1-D and 0-element tensors take the
Adam direction, blocks cut row-major with sides <= max_preconditioner_dim, eps added after the
eigendecomposition, eps * lambda_max with relative_epsilon). It does not call
mupopt.optim.shampoo.shampoo_reference nor mupopt.linalg.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import mupopt
from mupopt.linalg import RootComputationError
from mupopt.mup import WidthInfo

from models import same_state_value, tensor_state

STEPS = 8
# (12, 20) matrix, (40, 9) matrix (own group, max_preconditioner_dim=16: row blocks 16, 16, 8),
# conv-like kernel (flattened to (6, 12)), 1-D vector, and a (4, 30) matrix whose R (30 x 30,
# rank <= 4t) stays singular for 7 steps, so the damping epsilon decides its null space.
SHAPES_A = [(12, 20), (6, 3, 2, 2), (7,), (4, 30)]
N_A = len(SHAPES_A)
SHAPES_B = [(40, 9)]
SHAPES = SHAPES_A + SHAPES_B
MAX_DIM_B = 16
START, FREQ = 2, 3


@pytest.fixture(autouse=True)
def _one_thread():
    """The matrices here are tiny: intra-op threads only oversubscribe a shared CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def grads_at(step, shapes, seed=0):
    gen = torch.Generator().manual_seed(7919 * seed + step)
    return [torch.randn(s, generator=gen) for s in shapes]


def leaves(shapes, seed=0):
    gen = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


# -------------------------------------------------------------------------------------------
# float64 transcription of the Shampoo formulas (see the module docstring)
# -------------------------------------------------------------------------------------------
def inv_root4(S, eps, relative):
    """(S + eps' I)^(-1/4) by float64 eigh; eps' = eps*lambda_max(S) when relative."""
    S = 0.5 * (S + S.T)
    lam, Q = torch.linalg.eigh(S)
    lam = lam.clamp(min=0.0)
    damp = eps * lam.max() if relative else eps
    return (Q * (lam + damp).pow(-0.25)) @ Q.T


class ShampooOracle:
    def __init__(self, p, *, lr, betas, eps, wd, max_dim, freq, start, grafting, relative=False,
                 gb2=0.999, geps=1e-8, lr_mult=1.0, wd_mult=1.0):
        self.p = p.detach().double().clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, wd
        self.freq, self.start, self.grafting, self.relative = freq, start, grafting, relative
        self.gb2, self.geps, self.lr_mult, self.wd_mult = gb2, geps, lr_mult, wd_mult
        self.t = 0
        self.v = torch.zeros_like(self.p)
        self.M = torch.zeros_like(self.p)
        self.matrix = self.p.ndim >= 2 and self.p.numel() > 0
        if self.matrix:
            rows, cols = self.p.shape[0], self.p.numel() // self.p.shape[0]
            self.blocks = [(slice(i, min(i + max_dim, rows)), slice(j, min(j + max_dim, cols)))
                           for i in range(0, rows, max_dim) for j in range(0, cols, max_dim)]
            self.L = [torch.zeros(r.stop - r.start, r.stop - r.start, dtype=torch.float64) for r, _ in self.blocks]
            self.R = [torch.zeros(c.stop - c.start, c.stop - c.start, dtype=torch.float64) for _, c in self.blocks]
            self.Lr = [None] * len(self.blocks)
            self.Rr = [None] * len(self.blocks)

    def step(self, g):
        g = g.double()
        self.t += 1
        t = self.t
        self.v = self.gb2 * self.v + (1 - self.gb2) * g * g
        A = g / ((self.v / (1 - self.gb2**t)).sqrt() + self.geps)
        D = A
        if self.matrix:
            G = g.reshape(g.shape[0], -1)
            Am = A.reshape(G.shape)
            refresh = t >= self.start and (t - self.start) % self.freq == 0
            Dm = torch.empty_like(G)
            for k, (rs, cs) in enumerate(self.blocks):
                Gb = G[rs, cs]
                if self.b2 == 1.0:
                    self.L[k] = self.L[k] + Gb @ Gb.T
                    self.R[k] = self.R[k] + Gb.T @ Gb
                else:
                    self.L[k] = self.b2 * self.L[k] + (1 - self.b2) * Gb @ Gb.T
                    self.R[k] = self.b2 * self.R[k] + (1 - self.b2) * Gb.T @ Gb
                if refresh:
                    self.Lr[k] = inv_root4(self.L[k], self.eps, self.relative)
                    self.Rr[k] = inv_root4(self.R[k], self.eps, self.relative)
                if t >= self.start:
                    Db = self.Lr[k] @ Gb @ self.Rr[k]
                    if self.grafting == "adam":
                        Db = Db * (torch.linalg.norm(Am[rs, cs]) / torch.linalg.norm(Db))
                    Dm[rs, cs] = Db
            if t >= self.start:
                D = Dm.reshape(self.p.shape)
        self.M = self.b1 * self.M + (1 - self.b1) * D
        self.p = self.p * (1 - self.lr * self.wd * self.wd_mult)
        self.p = self.p - self.lr * self.lr_mult * self.M / (1 - self.b1**t)


def make_pair(*, grafting, betas, eps, relative, wd=0.1, lr=0.05, root_method="eigh", seed=0,
              mults=None, wd_mode="independent"):
    """mupopt.Shampoo on two groups (the second with max_preconditioner_dim=16 and lr/2) and
    one oracle per tensor."""
    params = leaves(SHAPES, seed)
    mults = mults or [(1.0, 1.0)] * len(params)
    common = dict(betas=betas, epsilon=eps, weight_decay=wd, precondition_frequency=FREQ,
                  start_preconditioning_step=START, grafting=grafting, relative_epsilon=relative)
    opt = mupopt.Shampoo(
        [{"params": params[:N_A]}, {"params": params[N_A:], "lr": lr / 2, "max_preconditioner_dim": MAX_DIM_B}],
        lr=lr, root_method=root_method, wd_mode=wd_mode, **common,
    )
    oracles = []
    for i, p in enumerate(params):
        group_b = i >= N_A
        oracles.append(ShampooOracle(
            p, lr=lr / 2 if group_b else lr, betas=betas, eps=eps, wd=wd,
            max_dim=MAX_DIM_B if group_b else 1024, freq=FREQ, start=START, grafting=grafting,
            relative=relative, lr_mult=mults[i][0], wd_mult=mults[i][1],
        ))
    return params, opt, oracles


def run_pair(params, opt, oracles, steps=STEPS, seed=0):
    for t in range(steps):
        g = grads_at(t, SHAPES, seed)
        set_grads(params, g)
        opt.step()
        for o, gi in zip(oracles, g):
            o.step(gi)


# float32 eigh with damping >= 1e-3 (relative) or a condition number <~ 1e3: roots to ~1e-5
# relative; 8 steps of |update| ~ lr.
RTOL, ATOL = 1e-4, 2e-5


@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("betas", [(0.9, 1.0), (0.9, 0.99)])
@pytest.mark.parametrize("grafting", ["adam", None])
def test_matches_float64_transcription(grafting, betas, relative):
    # Absolute damping 1e-2 against L, R eigenvalues of O(1) (EMA) .. O(100) (sums); relative 1e-3.
    eps = 1e-3 if relative else 1e-2
    params, opt, oracles = make_pair(grafting=grafting, betas=betas, eps=eps, relative=relative)
    start = [p.detach().clone() for p in params]
    run_pair(params, opt, oracles)
    for p, o, p0 in zip(params, oracles, start):
        torch.testing.assert_close(p.detach().double(), o.p, rtol=RTOL, atol=ATOL)
        st = opt.state[p]
        assert st["step"].item() == STEPS
        torch.testing.assert_close(st["momentum_buffer"].double(), o.M, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(st["exp_avg_sq"].double(), o.v, rtol=1e-5, atol=1e-7)
        if o.matrix:
            assert len(st["left"]) == len(o.blocks) == len(st["right"])
            for k in range(len(o.blocks)):
                torch.testing.assert_close(st["left"][k].double(), o.L[k], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(st["right"][k].double(), o.R[k], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(st["left_root"][k].double(), o.Lr[k], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(st["right_root"][k].double(), o.Rr[k], rtol=1e-4, atol=1e-5)
        else:
            assert "left" not in st
        assert (p.detach() - p0).abs().max() > 100 * ATOL  # the comparison has something to see


def test_blocks_of_the_40x9_matrix():
    """(40, 9) with max_preconditioner_dim=16: row blocks 16, 16, 8 (ragged), one column block."""
    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 1.0), eps=1e-2, relative=False)
    run_pair(params, opt, [], steps=1)
    st = opt.state[params[N_A]]
    assert [tuple(x.shape) for x in st["left"]] == [(16, 16), (16, 16), (8, 8)]
    assert [tuple(x.shape) for x in st["right"]] == [(9, 9)] * 3
    # (12, 20) in the default group: one block; conv (6, 3, 2, 2) as (6, 12).
    assert [tuple(x.shape) for x in opt.state[params[0]]["left"] + opt.state[params[0]]["right"]] == [(12, 12), (20, 20)]
    assert [tuple(x.shape) for x in opt.state[params[1]]["left"] + opt.state[params[1]]["right"]] == [(6, 6), (12, 12)]


def test_preconditioning_changes_the_direction():
    """Guard for the transcription test: the preconditioned trajectory is far from plain
    (grafted) Adam, so the oracle comparison does test the L/R roots."""
    params, opt, oracles = make_pair(grafting="adam", betas=(0.9, 1.0), eps=1e-2, relative=False)
    adam_only = leaves(SHAPES)
    ref = mupopt.Shampoo(
        [{"params": adam_only[:N_A]}, {"params": adam_only[N_A:], "lr": 0.025}],
        lr=0.05, betas=(0.9, 1.0), epsilon=1e-2, weight_decay=0.1, start_preconditioning_step=10_000,
    )
    for t in range(STEPS):
        g = grads_at(t, SHAPES)
        set_grads(params, g), set_grads(adam_only, g)
        opt.step(), ref.step()
    diff = (params[0].detach() - adam_only[0].detach()).abs().max().item()
    assert diff > 1000 * ATOL
    assert torch.equal(params[2], adam_only[2])  # 1-D: the same Adam direction either way


def test_newton_matches_eigh():
    """root_method="newton" and "eigh" give the same trajectory on well-conditioned statistics
    (absolute damping 1e-2, no grafting so the roots' scale is not normalised away)."""
    traj = {}
    for method in ("eigh", "newton"):
        params, opt, oracles = make_pair(grafting=None, betas=(0.9, 0.99), eps=1e-2, relative=False, root_method=method)
        run_pair(params, opt, oracles)
        traj[method] = (params, opt)
        for p, o in zip(params, oracles):
            torch.testing.assert_close(p.detach().double(), o.p, rtol=RTOL, atol=ATOL)
    (pe, oe), (pn, on) = traj["eigh"], traj["newton"]
    for a, b in zip(pe, pn):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        for key in ("left_root", "right_root"):
            for x, y in zip(oe.state[a].get(key, []), on.state[b].get(key, [])):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_newton_matches_eigh_relative_epsilon():
    params = {}
    for method in ("eigh", "newton"):
        ps, opt, oracles = make_pair(grafting=None, betas=(0.9, 1.0), eps=1e-2, relative=True, root_method=method)
        run_pair(ps, opt, oracles)
        params[method] = ps
    for a, b in zip(params["eigh"], params["newton"]):
        # Newton's lambda_max is an upper bound (<= 0.1% high, much less unless the top of the
        # spectrum is flat), so eps*lambda_max may differ a little; here it stays in tolerance.
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# -------------------------------------------------------------------------------------------
# The default epsilon (1e-12) against statistics float32 does not resolve
# -------------------------------------------------------------------------------------------
U32 = torch.finfo(torch.float32).eps


def updates_beside_oracle(grads64, grafting):
    """Per-step updates of mupopt.Shampoo (defaults: epsilon=1e-12, roots every step, float32
    statistics) fed float32 gradients, and of the float64 oracle fed ``grads64``; momentum off and
    lr 1, so that each update is the step's direction D."""
    shape = grads64[0].shape
    p = torch.zeros(shape, requires_grad=True)
    opt = mupopt.Shampoo([p], lr=1.0, betas=(0.0, 1.0), grafting=grafting)
    oracle = ShampooOracle(p, lr=1.0, betas=(0.0, 1.0), eps=1e-12, wd=0.0, max_dim=1024, freq=1, start=1,
                           grafting=grafting)
    got, want = [], []
    for g in grads64:
        before, before_o = p.detach().double().clone(), oracle.p.clone()
        p.grad = g.float()
        opt.step()
        oracle.step(g)
        got.append(p.detach().double() - before)
        want.append(oracle.p - before_o)
    return got, want


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def floored_root4(S, n_floor):
    """float64 transcription of linalg.inverse_root_eigh's rule at eps = 1e-12: eigenvalues at or
    below floor = sqrt(n) * u * lambda_max count as 0, damped values are raised to the floor."""
    lam, Q = torch.linalg.eigh(S)
    floor = math.sqrt(n_floor) * U32 * lam[-1]
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    return (Q * torch.clamp(lam + 1e-12, min=floor).pow(-0.25)) @ Q.T


@pytest.mark.parametrize("grafting", ["adam", None])
def test_ill_conditioned_full_rank_gradient_stays_near_the_exact_update(grafting):
    """A 32x32 Gaussian gradient whose smallest singular value is 0.005: L = G G^T has an
    eigenvalue 1.9u * lambda_max, below the floor sqrt(32) * u * lambda_max = 5.7u. Measured
    before the floor, when the unresolved eigenvalue got epsilon^(-1/4) = 1000: ungrafted 884x the
    exact update, grafted 1.28 off."""
    U, S, Vh = torch.linalg.svd(torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    S[-1] = 0.005
    G = ((U * S) @ Vh).float().double()  # the gradient the optimizer sees, in float64
    (got,), (want,) = updates_beside_oracle([G], grafting)
    # The one direction below the floor keeps sqrt(1.9/5.7) = 0.58 of its exact weight 1 (of
    # ||D|| = sqrt(32) ungrafted): 0.42 / sqrt(32) = 0.074, as measured, grafted and not.
    assert rel(got, want) < 0.1
    # ... and the update is the documented rule to float32 accuracy (measured 3.6e-5).
    D = floored_root4(G @ G.T, 32) @ G @ floored_root4(G.T @ G, 32)
    if grafting == "adam":
        D = D * (torch.linalg.norm(G / (G.abs() + 1e-8)) / torch.linalg.norm(D))
    assert rel(got, -D) < 5e-4


@pytest.mark.parametrize("grafting", ["adam", None])
def test_rank_deficient_statistics_stay_near_the_exact_update(grafting):
    """Batch-4 gradients of a 32x32 weight: L and R have rank 4t for the first 7 steps, full
    rank after. The gradients are float32 roundings of exactly rank-4 float64 matrices, the
    oracle runs on the latter: in exact arithmetic no gradient has a component in the null space,
    so what float32 puts there is round-off and must not be blown up. Measured: at most 5.6e-5
    over 16 steps (before the floor: 0.48 ungrafted, 0.45 grafted, at the first step)."""
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(32, 4, dtype=torch.float64, generator=gen) @ torch.randn(4, 32, dtype=torch.float64, generator=gen) / 4
             for _ in range(16)]
    got, want = updates_beside_oracle(grads, grafting)
    assert max(rel(a, b) for a, b in zip(got, want)) < 1e-3


# -------------------------------------------------------------------------------------------
# muP
# -------------------------------------------------------------------------------------------
WIDTHS = [
    WidthInfo("hidden", 4.0, 2.0),  # (12, 20)
    WidthInfo("output", 2.0, 1.0),  # (6, 3, 2, 2)
    WidthInfo("vector", 1.0, 3.0),  # (7,)
    WidthInfo("hidden", 2.0, 8.0),  # (4, 30)
    WidthInfo("input", 1.0, 4.0),  # (40, 9)
]


def expected_lr_mult(grafting, info, shape, max_dim):
    """docs/mup.md: Adam grafting -> AdamW's row; no grafting -> the Shampoo row, where a side
    split into blocks counts with its block side (min(side, max_dim)) at this width over the one
    at the base width (mupopt.mup.shampoo_block_lr has the derivation)."""
    if grafting == "adam":
        return {"input": 1.0, "hidden": 1 / info.m_in, "output": 1 / info.m_in, "vector": 1.0}[info.role]
    if info.role == "vector" or len(shape) < 2:
        return 1.0  # "as AdamW"
    rows, cols = shape[0], math.prod(shape[1:])  # these are Linear-layout weights: rows = fan_out
    block_growth = [min(n, max_dim) / min(n / m, max_dim) for n, m in ((rows, info.m_out), (cols, info.m_in))]
    unblocked = {"input": math.sqrt(info.m_out), "hidden": math.sqrt(info.m_out / info.m_in),
                 "output": 1 / math.sqrt(info.m_in)}[info.role]
    if max(rows, cols) <= max_dim:
        assert math.isclose(math.sqrt(block_growth[0] * block_growth[1]) / info.m_in, unblocked)
    return math.sqrt(block_growth[0] * block_growth[1]) / info.m_in


@pytest.mark.parametrize("wd_mode", ["independent", "coupled"])
@pytest.mark.parametrize("grafting", ["adam", None])
def test_mup_multipliers(grafting, wd_mode):
    lr_mults = [expected_lr_mult(grafting, w, shape, MAX_DIM_B if i >= N_A else 1024)
                for i, (w, shape) in enumerate(zip(WIDTHS, SHAPES))]
    assert len(set(lr_mults)) >= 3  # not all 1: the test can see a missing multiplier
    mults = [(m, m if wd_mode == "coupled" else 1.0) for m in lr_mults]
    params = leaves(SHAPES)
    for p, w in zip(params, WIDTHS):
        setattr(p, mupopt.mup.WIDTH_ATTR, w)
    kw = dict(betas=(0.9, 0.99), epsilon=1e-3, weight_decay=0.1, precondition_frequency=FREQ,
              start_preconditioning_step=START, grafting=grafting, relative_epsilon=True)
    opt = mupopt.Shampoo([{"params": params[:N_A]}, {"params": params[N_A:], "lr": 0.025, "max_preconditioner_dim": MAX_DIM_B}],
                         lr=0.05, wd_mode=wd_mode, **kw)
    oracles = [
        ShampooOracle(p, lr=0.025 if i >= N_A else 0.05, betas=(0.9, 0.99), eps=1e-3, wd=0.1,
                      max_dim=MAX_DIM_B if i >= N_A else 1024, freq=FREQ, start=START, grafting=grafting,
                      relative=True, lr_mult=mults[i][0], wd_mult=mults[i][1])
        for i, p in enumerate(params)
    ]
    run_pair(params, opt, oracles)
    for p, o in zip(params, oracles):
        torch.testing.assert_close(p.detach().double(), o.p, rtol=RTOL, atol=ATOL)


# -------------------------------------------------------------------------------------------
# state_dict, memory
# -------------------------------------------------------------------------------------------
def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


def test_state_dict_round_trip_is_bitwise():
    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 0.99), eps=1e-3, relative=True)
    run_pair(params, opt, [], steps=3)
    for p in params:
        keys = {"step", "momentum_buffer", "exp_avg_sq"}
        if p.ndim >= 2:
            keys |= {"left", "right", "left_root", "right_root"}
        assert set(tensor_state(opt.state[p])) == keys
    sd = roundtrip(opt.state_dict())
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt2 = mupopt.Shampoo([{"params": twins[:N_A]}, {"params": twins[N_A:]}])  # defaults: the saved groups win
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["max_preconditioner_dim"] == MAX_DIM_B
    assert opt2.param_groups[0]["precondition_frequency"] == FREQ
    for t in range(3, 3 + 5):  # crosses the refresh at t = 5 and 8 (1-based)
        g = grads_at(t, SHAPES)
        set_grads(params, g), set_grads(twins, g)
        opt.step(), opt2.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert same_state_value(value, opt2.state[q][key]), key


def test_preconditioner_memory():
    assert "preconditioner_memory" in mupopt.Shampoo.__doc__
    assert "8*(r^2 + c^2)" in mupopt.Shampoo.__doc__
    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 1.0), eps=1e-2, relative=False)
    # Block sides computed here: (12, 20) one block; conv as (6, 12); (40, 9) at 16: 16, 16, 8 x 9.
    blocks = [(12, 20), (6, 12), (4, 30), (16, 9), (16, 9), (8, 9)]
    pre = sum(8 * (r * r + c * c) for r, c in blocks)
    buf = sum(2 * 4 * math.prod(s) for s in SHAPES)
    want = {"preconditioners": pre, "buffers": buf, "total": pre + buf}
    assert not opt.state
    assert opt.preconditioner_memory() == want  # before the first step: what it will allocate
    run_pair(params, opt, [], steps=1)
    assert opt.state
    assert opt.preconditioner_memory() == want  # after it: what the state holds


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------
def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_unchanged(opt, params, snap):
    ps, state = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].keys() == state[k].keys()
        for key, value in state[k].items():
            assert same_state_value(now[k][key], value), (k, key)


def _nan_step(nan_index, steps_before):
    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 1.0), eps=1e-3, relative=False)
    run_pair(params, opt, [], steps=steps_before)
    g = grads_at(steps_before, SHAPES)
    g[nan_index].view(-1)[0] = float("nan")
    set_grads(params, g)
    snap = snapshot(opt, params)
    return params, opt, snap


@pytest.mark.parametrize("nan_index", [
    0,  # a tensor of the first group
    N_A,  # the last group
])
def test_nan_gradient_at_refresh_step_raises_and_touches_nothing(nan_index):
    # Steps before: 4, so this is step t = 5 = START + FREQ: a root refresh.
    params, opt, snap = _nan_step(nan_index, 4)
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert_unchanged(opt, params, snap)
    # The optimizer is still usable afterwards.
    set_grads(params, grads_at(99, SHAPES))
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_nan_gradient_at_non_refresh_step_raises_and_touches_nothing():
    params, opt, snap = _nan_step(0, 2)  # t = 3: no refresh (refreshes at 2, 5, 8)
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_nan_gradient_of_vector_raises_and_touches_nothing():
    params, opt, snap = _nan_step(2, 4)  # the (7,) tensor, at a refresh step of the matrices
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert_unchanged(opt, params, snap)


@pytest.mark.parametrize("new_dim", [8, 12])  # group B's (40, 9): 3 blocks at 16; 10 at 8; 4 at 12
def test_max_preconditioner_dim_changed_after_the_first_step_raises_and_touches_nothing(new_dim):
    """The statistics are of the blocks made at the first step: a later max_preconditioner_dim
    that cuts the matrix otherwise raises a clear error before anything is written (it was a
    shape error from inside the step), and a reset parameter starts afresh with the new blocks."""
    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 0.99), eps=1e-3, relative=False)
    run_pair(params, opt, [], steps=2)
    set_grads(params, grads_at(2, SHAPES))
    snap = snapshot(opt, params)
    opt.param_groups[1]["max_preconditioner_dim"] = new_dim
    with pytest.raises(RuntimeError, match="max_preconditioner_dim changed after its first step"):
        opt.step()
    assert_unchanged(opt, params, snap)
    opt.state[params[N_A]] = {}
    opt.step()
    assert len(opt.state[params[N_A]]["left"]) == len(mupopt.optim.shampoo.blocks_of(40, 9, new_dim))


def test_root_failure_in_both_precisions_raises_and_touches_nothing(monkeypatch):
    """Finite gradients whose root still fails (float32 and float64): RootComputationError,
    raised after all roots were attempted and before anything was written."""
    import mupopt.optim.shampoo as shampoo_module

    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 1.0), eps=1e-3, relative=False)
    run_pair(params, opt, [], steps=4)
    set_grads(params, grads_at(4, SHAPES))
    snap = snapshot(opt, params)

    def failing_root(A, p, **kwargs):
        raise RootComputationError(f"root of a {tuple(A.shape)} batch failed in float32 and float64")

    monkeypatch.setattr(shampoo_module, "inverse_root_eigh", failing_root)
    with pytest.raises(RootComputationError):
        opt.step()
    assert_unchanged(opt, params, snap)


def test_root_failure_in_a_later_group_leaves_the_earlier_groups_unstepped():
    """Shampoo prepares every param group (statistics, roots) before writing any: a Newton root
    that does not converge in the second group (singular R, no damping) raises with the first
    group, which precedes it and would step fine, untouched too."""
    shapes = [(12, 20), (7,), (4, 30)]
    params = leaves(shapes)
    opt = mupopt.Shampoo([{"params": params[:2]},
                          {"params": params[2:], "root_method": "newton", "epsilon": 0.0}],
                         lr=0.05, epsilon=1e-3, start_preconditioning_step=3)
    for t in range(2):  # before start_preconditioning_step: no roots, both groups step
        set_grads(params, grads_at(t, shapes))
        opt.step()
    set_grads(params, grads_at(2, shapes))
    snap = snapshot(opt, params)
    with pytest.raises(RootComputationError):
        opt.step()
    assert_unchanged(opt, params, snap)
    assert all(opt.state[p]["step"].item() == 2 for p in params)


def test_zero_element_tensors_step():
    shapes = [(0,), (0, 5), (4, 0), (2, 0, 3), (3, 4)]
    params = leaves(shapes)
    opt = mupopt.Shampoo(params, lr=0.05, epsilon=1e-3)
    for t in range(3):
        set_grads(params, grads_at(t, shapes))
        opt.step()
    for p in params[:4]:
        assert p.numel() == 0 and opt.state[p]["step"].item() == 3
        assert "left" not in opt.state[p]
    assert torch.isfinite(params[4]).all() and opt.state[params[4]]["step"].item() == 3


@pytest.mark.parametrize("kw,match", [
    (dict(max_preconditioner_dim=0), "max_preconditioner_dim"),
    (dict(max_preconditioner_dim=2.5), "max_preconditioner_dim"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(start_preconditioning_step=0), "start_preconditioning_step"),
    (dict(grafting="sgd"), "grafting"),
    (dict(root_method="svd"), "root_method"),
    (dict(betas=(0.9, 0.0)), "beta"),
    (dict(betas=(0.9, 1.5)), "beta"),
    (dict(betas=(1.0, 0.99)), "beta"),
    (dict(lr=float("nan")), "learning rate"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grafting_beta2=1.0), "beta"),
])
def test_invalid_hyperparameters_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        mupopt.Shampoo([torch.zeros(4, 4, requires_grad=True)], **kw)


def test_sparse_gradient_raises_and_touches_nothing():
    params, opt, _ = make_pair(grafting="adam", betas=(0.9, 1.0), eps=1e-3, relative=False)
    run_pair(params, opt, [], steps=2)
    set_grads(params, grads_at(2, SHAPES))
    params[-1].grad = params[-1].grad.to_sparse()
    snap = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, params, snap)
