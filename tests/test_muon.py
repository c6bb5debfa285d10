"""mupopt.Muon against torch.optim.Muon, against a float64 transcription of the Muon step of
the Muon formulas (torch.optim.Muon's documentation, Jordan et al.), and against torch.optim.AdamW for the parameters it routes to AdamW.

The float64 oracle below is written from the spec (torch.optim.Muon's documented algorithm) and does not call
mupopt.optim.muon.muon_reference or mupopt.linalg.newton_schulz.
"""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

import mupopt
from mupopt.linalg import POLAR_EXPRESS_COEFFICIENTS
from mupopt.mup import WidthInfo

from models import same_state_value, tensor_state

STEPS = 10
JORDAN = (3.4445, -4.775, 2.0315)
# tall, wide, square, plus a second square and a second tall one: same-shape matrices are
# stacked into one batched Newton-Schulz call by mupopt.
SHAPES = [(16, 8), (8, 24), (12, 12), (12, 12), (16, 8)]
# bf16 Newton-Schulz: per step, an element of O may differ by a bf16 rounding (2^-8 relative,
# O entries are O(1/sqrt(min side)) <= 1) between implementations (batched vs single, GPU
# kernels). Errors do not feed back (gradients are fixed), so they add up linearly over steps.
BF16_REL = 2.0**-7


@pytest.fixture(autouse=True)
def _one_thread():
    """The matrices here are tiny: intra-op threads only oversubscribe a shared CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bf16_atol(lr: float, factor: float, steps: int = STEPS) -> float:
    return steps * lr * factor * BF16_REL


def grads_at(step: int, shapes, seed: int = 0):
    gen = torch.Generator().manual_seed(7919 * seed + step)
    return [torch.randn(s, generator=gen) for s in shapes]


def leaves(shapes, seed: int = 0):
    gen = torch.Generator().manual_seed(10_000 + seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def clones(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def run(opt, params, steps, seed=0, start=0):
    for t in range(start, start + steps):
        set_grads(params, grads_at(t, [p.shape for p in params], seed))
        opt.step()


def snapshot(opt, params):
    """Deep copy of params and the optimizer state (for 'nothing was touched' checks)."""
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_unchanged(opt, params, snap):
    ps, state = snap
    for p, q in zip(params, ps):
        assert torch.equal(p.detach(), q)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for k in state:
        assert now[k].keys() == state[k].keys()
        for key in state[k]:
            assert same_state_value(now[k][key], state[k][key]), (k, key)


# -------------------------------------------------------------------------------------------
# float64 transcription of the Muon step
# -------------------------------------------------------------------------------------------
def ns64(u: torch.Tensor, schedule, eps: float) -> torch.Tensor:
    """O = NS(u) in float64: transposed if rows > cols, X /= max(||X||_F, eps),
    per step A = X X^T ; Bm = b*A + c*A A ; X = a*X + Bm X."""
    X = u.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / max(torch.linalg.norm(X).item(), eps)
    for a, b, c in schedule:
        A = X @ X.T
        Bm = b * A + c * (A @ A)
        X = a * X + Bm @ X
    return X.T if tall else X


def spec_shape_factor(fn, A, B):
    if fn in (None, "original"):
        return math.sqrt(max(1.0, A / B))
    if fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    assert fn == "spectral"
    return math.sqrt(A / B)


class MuonOracle:
    """One tensor, float64: B = lerp(B, g, 1-mu); u = lerp(g, B, mu) if nesterov else B;
    O = NS(u) on the (shape[0], -1) view; p *= 1 - lr*wd; p -= lr*lr_mult*shape_factor*O."""

    def __init__(self, p, *, lr, wd, mu, nesterov, schedule, eps, adjust_lr_fn, lr_mult=1.0):
        self.p = p.detach().double().clone()
        self.B = torch.zeros_like(self.p)
        self.lr, self.wd, self.mu, self.nesterov = lr, wd, mu, nesterov
        self.schedule, self.eps, self.fn, self.lr_mult = schedule, eps, adjust_lr_fn, lr_mult

    def step(self, g):
        g = g.double()
        self.B = self.B + (1 - self.mu) * (g - self.B)
        u = g + self.mu * (self.B - g) if self.nesterov else self.B
        u2 = u.reshape(u.shape[0], -1)
        O = ns64(u2, self.schedule, self.eps).reshape(self.p.shape)
        A, B = u2.shape
        self.p = self.p * (1 - self.lr * self.wd)
        self.p = self.p - self.lr * self.lr_mult * spec_shape_factor(self.fn, A, B) * O


# -------------------------------------------------------------------------------------------
# Equal to torch.optim.Muon for 2-D matrices without width information
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_matches_torch_muon(adjust_lr_fn, nesterov):
    lr, wd = 0.02, 0.1
    ours = leaves(SHAPES)
    theirs = clones(ours)

    def groups(ps):  # two groups with different hyperparameters
        return [
            {"params": ps[:3]},
            {"params": ps[3:], "lr": lr / 2, "momentum": 0.8, "weight_decay": 0.05},
        ]

    kw = dict(lr=lr, weight_decay=wd, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    o = mupopt.Muon(groups(ours), **kw, ns_dtype=torch.bfloat16)  # torch's NS dtype on every device
    r = torch.optim.Muon(groups(theirs), **kw)
    run(o, ours, STEPS)
    run(r, theirs, STEPS)
    factor = max(spec_shape_factor(adjust_lr_fn, *s) for s in SHAPES)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=bf16_atol(lr, factor))
        assert set(tensor_state(o.state[a])) == {"momentum_buffer"}
        # The momentum buffer does not involve NS: fp32 tolerance.
        torch.testing.assert_close(o.state[a]["momentum_buffer"], r.state[b]["momentum_buffer"], rtol=1e-6, atol=1e-7)
    # The comparison can fail: the total movement is far above the tolerance.
    moved = min((a.detach() - p0).abs().max().item() for a, p0 in zip(ours, leaves(SHAPES)))
    assert moved > 20 * bf16_atol(lr, factor) / STEPS


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "spectral"])
def test_float64_transcription(adjust_lr_fn, nesterov):
    """ns_dtype=float32 against the float64 transcription of the spec; "spectral" (sqrt(A/B),
    not in torch) is only checkable this way, the others cross-check the transcription."""
    lr, wd, mu = 0.02, 0.1, 0.9
    params = leaves(SHAPES, seed=1)
    oracles = [
        MuonOracle(p, lr=lr, wd=wd, mu=mu, nesterov=nesterov, schedule=[JORDAN] * 5, eps=1e-7, adjust_lr_fn=adjust_lr_fn)
        for p in params
    ]
    opt = mupopt.Muon(params, lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov,
                      adjust_lr_fn=adjust_lr_fn, ns_dtype=torch.float32)
    for t in range(STEPS):
        grads = grads_at(t, SHAPES, seed=1)
        set_grads(params, grads)
        opt.step()
        for orc, g in zip(oracles, grads):
            orc.step(g)
    for p, orc in zip(params, oracles):
        # float32 NS: ~1e-6 relative per step, amplified by the a=3.4 slope of the quintic.
        torch.testing.assert_close(p.detach().double(), orc.p, rtol=0, atol=lr * 2e-4)


def test_spectral_shape_factor_is_sqrt_rows_over_cols():
    """One step from zero momentum: p moves by lr*sqrt(A/B)*O, so tall matrices move more and
    wide ones less than with "original" (which floors the factor at 1)."""
    moves = {}
    for fn in ("original", "spectral"):
        ps = leaves([(32, 8), (8, 32)], seed=2)
        p0 = [p.detach().clone() for p in ps]
        opt = mupopt.Muon(ps, lr=0.1, weight_decay=0.0, adjust_lr_fn=fn, ns_dtype=torch.float32)
        run(opt, ps, 1, seed=2)
        moves[fn] = [(p.detach() - q).norm().item() for p, q in zip(ps, p0)]
    assert moves["spectral"][0] == pytest.approx(moves["original"][0], rel=1e-5)  # tall: both sqrt(4)
    assert moves["spectral"][1] == pytest.approx(moves["original"][1] * 0.5, rel=1e-5)  # wide: sqrt(1/4)


# -------------------------------------------------------------------------------------------
# Whole model with muP
# -------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, width: int, vocab: int = 11, classes: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)  # input
        self.h1 = nn.Linear(width, width)  # hidden
        self.h2 = nn.Linear(width, width)  # hidden, same shape as h1 (batched NS)
        self.ln = nn.LayerNorm(width)  # vectors
        self.conv = nn.Conv2d(width, width, 2)  # hidden, (w, w, 2, 2) -> (w, 4w)
        self.readout = nn.Linear(width, classes)  # output

    def forward(self, ids):  # not used by the optimizer tests; documents the roles
        x = self.ln(self.h2(torch.relu(self.h1(self.emb(ids)))))
        x = self.conv(x[..., None, None].expand(*x.shape, 2, 2)).flatten(1)
        return self.readout(x)


BASE_W, MULT = 4, 4
ROLES = {
    "emb.weight": ("input", 1.0, MULT),
    "h1.weight": ("hidden", MULT, MULT),
    "h2.weight": ("hidden", MULT, MULT),
    "conv.weight": ("hidden", MULT, MULT),
    "readout.weight": ("output", MULT, 1.0),
}


def mup_model(seed=0):
    torch.manual_seed(seed)
    model = Net(BASE_W * MULT)
    mupopt.set_base_shapes(model, Net(BASE_W))
    for name, p in model.named_parameters():
        info = mupopt.width_info(p)
        if name in ROLES:
            assert (info.role, info.m_in, info.m_out) == ROLES[name], name
        else:
            assert info.role == "vector", name
    return model


def adamw_lr_mult(role: str, m_in: float) -> float:
    """docs/mup.md, AdamW row: input 1, hidden 1/m_in, output 1/m_in, vector 1."""
    return {"input": 1.0, "hidden": 1.0 / m_in, "output": 1.0 / m_in, "vector": 1.0}[role]


MUON_KW = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True)
ADAMW_KW = dict(adamw_lr=3e-3, adamw_betas=(0.8, 0.95), adamw_eps=1e-6, adamw_wd=0.05)


def model_grads(model, step):
    gen = torch.Generator().manual_seed(500 + step)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw", "spectral"])
def test_whole_model_routing_and_multipliers(adjust_lr_fn):
    model = mup_model()
    named = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    ns_dtype = torch.float32 if adjust_lr_fn == "spectral" else torch.bfloat16
    opt = mupopt.Muon(model.parameters(), adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, **MUON_KW, **ADAMW_KW)

    # References. AdamW part: one torch group per tensor with lr = adamw_lr*lr_mult and
    # weight_decay = adamw_wd/lr_mult, so lr*wd = adamw_lr*adamw_wd ("independent" decay,
    # docs/mup.md: the muP lr multiplier does not touch the decay).
    muon_names = ["h1.weight", "h2.weight", "conv.weight"]
    adam_names = [n for n in named if n not in muon_names]
    ref = {n: start[n].clone().requires_grad_() for n in adam_names}
    groups = []
    for n in adam_names:
        info = mupopt.width_info(named[n])
        mult = adamw_lr_mult(info.role, info.m_in)
        groups.append({"params": [ref[n]], "lr": ADAMW_KW["adamw_lr"] * mult, "weight_decay": ADAMW_KW["adamw_wd"] / mult})
    adamw = torch.optim.AdamW(groups, betas=ADAMW_KW["adamw_betas"], eps=ADAMW_KW["adamw_eps"])
    # Muon part: lr multiplier 1 (original, spectral) or 1/sqrt(m_in) (match_rms_adamw); the
    # conv kernel is orthogonalised as its (shape[0], -1) view.
    mult = 1.0 / math.sqrt(MULT) if adjust_lr_fn == "match_rms_adamw" else 1.0
    views = {n: start[n].reshape(start[n].shape[0], -1).clone().requires_grad_() for n in muon_names}
    if adjust_lr_fn == "spectral":
        oracles = {
            n: MuonOracle(views[n], lr=MUON_KW["lr"], wd=MUON_KW["weight_decay"], mu=MUON_KW["momentum"],
                          nesterov=True, schedule=[JORDAN] * 5, eps=1e-7, adjust_lr_fn="spectral")
            for n in muon_names
        }
    else:
        tmuon = torch.optim.Muon(
            [views[n] for n in muon_names], lr=MUON_KW["lr"] * mult, weight_decay=MUON_KW["weight_decay"] / mult,
            momentum=MUON_KW["momentum"], nesterov=True, adjust_lr_fn=adjust_lr_fn,
        )

    for t in range(STEPS):
        g = model_grads(model, t)
        for n, p in named.items():
            p.grad = g[n].clone()
        for n in adam_names:
            ref[n].grad = g[n].clone()
        for n in muon_names:
            views[n].grad = g[n].reshape(views[n].shape).clone()
        opt.step()
        adamw.step()
        if adjust_lr_fn == "spectral":
            for n in muon_names:
                oracles[n].step(views[n].grad)
        else:
            tmuon.step()

    for n in muon_names:
        assert set(tensor_state(opt.state[named[n]])) == {"momentum_buffer"}, n
    for n in adam_names:
        assert set(tensor_state(opt.state[named[n]])) == {"step", "exp_avg", "exp_avg_sq"}, n
        torch.testing.assert_close(named[n].detach(), ref[n].detach(), rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[named[n]][key], adamw.state[ref[n]][key], rtol=1e-6, atol=1e-7)
        assert opt.state[named[n]]["step"].item() == STEPS
    for n in muon_names:
        got = named[n].detach().reshape(views[n].shape)
        A, B = views[n].shape
        if adjust_lr_fn == "spectral":
            torch.testing.assert_close(got.double(), oracles[n].p, rtol=0, atol=MUON_KW["lr"] * 2e-4)
        else:
            tol = bf16_atol(MUON_KW["lr"] * mult, spec_shape_factor(adjust_lr_fn, A, B))
            torch.testing.assert_close(got, views[n].detach(), rtol=0, atol=tol)
    # Every tensor moved, so the comparisons above had something to compare.
    for n, p in named.items():
        assert (p.detach() - start[n]).abs().max() > 1e-4, n


def test_match_rms_adamw_multiplier_shrinks_the_hidden_step():
    """Same matrix, same gradients: with m_in = 4 the "match_rms_adamw" step is half the step
    without width info, while "original" is width-free (mult 1); no decay here."""
    moves = {}
    for fn in ("original", "match_rms_adamw"):
        for info in (None, WidthInfo("hidden", 4.0, 4.0)):
            p = leaves([(16, 16)], seed=3)[0]
            p0 = p.detach().clone()
            if info is not None:
                setattr(p, mupopt.mup.WIDTH_ATTR, info)
            opt = mupopt.Muon([p], lr=0.02, weight_decay=0.0, adjust_lr_fn=fn)
            run(opt, [p], 3, seed=3)
            moves[fn, info is None] = (p.detach() - p0).norm().item()
    assert moves["original", False] == pytest.approx(moves["original", True], rel=1e-6)
    assert moves["match_rms_adamw", False] == pytest.approx(0.5 * moves["match_rms_adamw", True], rel=1e-6)


# -------------------------------------------------------------------------------------------
# Routing, coefficients
# -------------------------------------------------------------------------------------------
def test_use_muon_group_key_forces_the_route():
    adam_kw = dict(adamw_lr=5e-3, adamw_betas=(0.85, 0.99), adamw_eps=1e-7, adamw_wd=0.02)
    forced_adam, default_muon = leaves([(8, 6), (8, 6)], seed=4)
    vec = leaves([(6,)], seed=5)[0]
    r_adam, r_muon, r_vec = clones([forced_adam, default_muon, vec])
    opt = mupopt.Muon(
        [{"params": [forced_adam], "use_muon": False}, {"params": [default_muon, vec]}],
        lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16, **adam_kw,
    )
    adamw = torch.optim.AdamW([r_adam, r_vec], lr=5e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.02)
    tmuon = torch.optim.Muon([r_muon], lr=0.02, weight_decay=0.1)
    for t in range(5):
        g = grads_at(t, [(8, 6), (8, 6), (6,)], seed=4)
        set_grads([forced_adam, default_muon, vec], g)
        set_grads([r_adam, r_muon, r_vec], g)
        opt.step(), adamw.step(), tmuon.step()
    assert set(tensor_state(opt.state[forced_adam])) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(tensor_state(opt.state[vec])) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(tensor_state(opt.state[default_muon])) == {"momentum_buffer"}
    torch.testing.assert_close(forced_adam, r_adam, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(vec, r_vec, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(default_muon, r_muon, rtol=0, atol=bf16_atol(0.02, 1.0, 5))


def test_use_muon_false_on_hidden_matrix_uses_adamw_multiplier():
    """A hidden matrix forced to AdamW follows AdamW's muP rule (1/m_in)."""
    p = leaves([(8, 8)], seed=6)[0]
    r = clones([p])[0]
    setattr(p, mupopt.mup.WIDTH_ATTR, WidthInfo("hidden", 4.0, 4.0))
    opt = mupopt.Muon([{"params": [p], "use_muon": False}], adamw_lr=4e-3, adamw_wd=0.1)
    ref = torch.optim.AdamW([r], lr=1e-3, weight_decay=0.4)  # lr*1/4, wd*4
    run(opt, [p], 4, seed=6)
    run(ref, [r], 4, seed=6)
    assert set(tensor_state(opt.state[p])) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_use_muon_true_on_vector_raises():
    v = torch.zeros(5, requires_grad=True)
    m = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="Muon needs matrices"):
        mupopt.Muon([{"params": [v], "use_muon": True}])
    opt = mupopt.Muon([m])
    with pytest.raises(ValueError, match="Muon needs matrices"):
        opt.add_param_group({"params": [v], "use_muon": True})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="use_muon"):
        mupopt.Muon([{"params": [m], "use_muon": "yes"}])


def test_use_muon_true_on_non_hidden_role_rejected_before_anything_moves():
    h, e = leaves([(8, 8), (8, 8)], seed=7)
    setattr(h, mupopt.mup.WIDTH_ATTR, WidthInfo("hidden", 2.0, 2.0))
    setattr(e, mupopt.mup.WIDTH_ATTR, WidthInfo("input", 1.0, 2.0))
    try:
        opt = mupopt.Muon([{"params": [h]}, {"params": [e], "use_muon": True}], lr=0.1)
    except mupopt.MupError:
        return  # rejected at construction: fine
    set_grads([h, e], grads_at(0, [(8, 8), (8, 8)]))
    snap = snapshot(opt, [h, e])
    with pytest.raises(mupopt.MupError, match="hidden"):
        opt.step()
    assert_unchanged(opt, [h, e], snap)


def test_polar_express_coefficients():
    coeffs = POLAR_EXPRESS_COEFFICIENTS[:5]
    shapes = [(16, 8), (8, 24), (12, 12)]
    params = leaves(shapes, seed=8)
    quintic = clones(params)
    oracles = [MuonOracle(p, lr=0.02, wd=0.1, mu=0.95, nesterov=True, schedule=coeffs, eps=1e-7,
                          adjust_lr_fn=None) for p in params]
    opt = mupopt.Muon(params, lr=0.02, ns_coefficients=coeffs, ns_steps=None, ns_dtype=torch.float32)
    qopt = mupopt.Muon(quintic, lr=0.02, ns_dtype=torch.float32)
    for t in range(5):
        g = grads_at(t, shapes, seed=8)
        set_grads(params, g), set_grads(quintic, g)
        opt.step(), qopt.step()
        for o, gi in zip(oracles, g):
            o.step(gi)
    for p, q, o in zip(params, quintic, oracles):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double(), o.p, rtol=0, atol=0.02 * 2e-4)
        # Different polynomials: clearly different results (far above the tolerance above).
        assert (p - q).abs().max().item() > 100 * 0.02 * 2e-4
    # The bf16 default also runs.
    bf = clones(params)
    run(mupopt.Muon(bf, lr=0.02, ns_coefficients=coeffs, ns_steps=None), bf, 2)
    assert all(torch.isfinite(p).all() for p in bf)


@pytest.mark.parametrize("kw", [
    dict(ns_coefficients=POLAR_EXPRESS_COEFFICIENTS[:4], ns_steps=5),  # list length != ns_steps
    dict(ns_coefficients=(3.4445, -4.775), ns_steps=5),  # not a triple
    dict(ns_coefficients=[(3.4445, -4.775, 2.0315), (1.0, 2.0)], ns_steps=None),  # bad element
    dict(ns_coefficients=[], ns_steps=None),  # empty list
    dict(ns_coefficients=(3.4445, -4.775, 2.0315), ns_steps=None),  # one triple needs ns_steps
    dict(ns_steps=0),
])
def test_bad_coefficients_raise_at_construction(kw):
    with pytest.raises(ValueError):
        mupopt.Muon([torch.zeros(4, 4, requires_grad=True)], **kw)


# -------------------------------------------------------------------------------------------
# state_dict
# -------------------------------------------------------------------------------------------
def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only=True (torch's default) must be enough


def test_load_own_state_dict_minimal():
    p = torch.zeros(4, 4, requires_grad=True)
    opt = mupopt.Muon([p])
    p.grad = torch.ones(4, 4)
    opt.step()
    mupopt.Muon([p.detach().clone().requires_grad_()]).load_state_dict(opt.state_dict())


def test_state_dict_round_trip_resumes_bitwise_without_base_model():
    model = mup_model(seed=1)
    opt = mupopt.Muon(model.parameters(), adjust_lr_fn="match_rms_adamw", **MUON_KW, **ADAMW_KW)
    params = list(model.parameters())
    run(opt, params, 3, seed=9)
    names = [n for n, _ in model.named_parameters()]
    for n, p in zip(names, params):
        want = {"momentum_buffer"} if n in ("h1.weight", "h2.weight", "conv.weight") else {"step", "exp_avg", "exp_avg_sq"}
        assert set(tensor_state(opt.state[p])) == want, n
    sd = roundtrip(opt.state_dict())
    # A fresh model without set_base_shapes: the saved muP records must restore the routing
    # and the multipliers (a resume needs no base model).
    fresh = Net(BASE_W * MULT)
    with torch.no_grad():
        for q, p in zip(fresh.parameters(), params):
            q.copy_(p)
    fparams = list(fresh.parameters())
    opt2 = mupopt.Muon(fresh.parameters(), adjust_lr_fn="match_rms_adamw", **MUON_KW, **ADAMW_KW)
    opt2.load_state_dict(sd)
    for n, p, q in zip(names, params, fparams):
        assert set(tensor_state(opt2.state[q])) == set(tensor_state(opt.state[p])), n
    run(opt, params, 4, seed=9, start=3)
    run(opt2, fparams, 4, seed=9, start=3)
    for n, p, q in zip(names, params, fparams):
        assert torch.equal(p, q), n
        for key in opt.state[p]:
            assert same_state_value(opt.state[p][key], opt2.state[q][key]), (n, key)


def test_state_dict_loads_into_torch_muon():
    lr = 0.02
    ours = leaves(SHAPES, seed=10)
    theirs = clones(ours)
    o = mupopt.Muon(ours, lr=lr, weight_decay=0.1, adjust_lr_fn="original", ns_dtype=torch.bfloat16)
    run(o, ours, 3, seed=10)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            b.copy_(a)
    r = torch.optim.Muon(theirs, lr=lr, weight_decay=0.1, adjust_lr_fn="original")
    r.load_state_dict(roundtrip(o.state_dict()))
    for a, b in zip(ours, theirs):
        assert torch.equal(o.state[a]["momentum_buffer"], r.state[b]["momentum_buffer"])
        assert o.state[a]["momentum_buffer"].abs().max() > 0
    run(o, ours, 4, seed=10, start=3)
    run(r, theirs, 4, seed=10, start=3)
    factor = max(spec_shape_factor("original", *s) for s in SHAPES)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=bf16_atol(lr, factor, 4))
        torch.testing.assert_close(o.state[a]["momentum_buffer"], r.state[b]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_torch_muon_state_dict_loads_into_mupopt():
    lr = 0.02
    theirs = leaves(SHAPES, seed=12)
    r = torch.optim.Muon(theirs, lr=lr, weight_decay=0.1)
    run(r, theirs, 3, seed=12)
    mine = clones(theirs)
    o = mupopt.Muon(mine, lr=lr, weight_decay=0.1, ns_dtype=torch.bfloat16)
    o.load_state_dict(roundtrip(r.state_dict()))
    for a, b in zip(mine, theirs):
        assert torch.equal(o.state[a]["momentum_buffer"], r.state[b]["momentum_buffer"])
    run(o, mine, 3, seed=12, start=3)
    run(r, theirs, 3, seed=12, start=3)
    factor = max(spec_shape_factor(None, *s) for s in SHAPES)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=bf16_atol(lr, factor, 3))


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------
def _trained():
    ps = leaves([(8, 8), (6,), (8, 8)], seed=11)
    opt = mupopt.Muon([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.02)
    run(opt, ps, 2, seed=11)
    return opt, ps


def test_sparse_grad_raises_and_touches_nothing():
    opt, ps = _trained()
    set_grads(ps, grads_at(5, [p.shape for p in ps]))
    ps[2].grad = ps[2].grad.to_sparse()  # in the last group: earlier groups must not move
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("key,value,match", [
    ("lr", float("nan"), "Learning rate"),
    ("momentum", -0.1, "momentum"),
    ("adamw_lr", float("nan"), "adamw_lr"),
])
def test_bad_hyperparameter_edit_raises_at_step_and_touches_nothing(key, value, match):
    opt, ps = _trained()
    set_grads(ps, grads_at(5, [p.shape for p in ps]))
    opt.param_groups[1][key] = value  # last group: the first one must not be stepped
    snap = snapshot(opt, ps)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("kw,match", [
    (dict(lr=float("nan")), "Learning rate"),
    (dict(lr=-1.0), "Learning rate"),
    (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-0.1), "weight decay"),
    (dict(adjust_lr_fn="bogus"), "Adjust learning rate"),
])
def test_bad_hyperparameters_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        mupopt.Muon([torch.zeros(4, 4, requires_grad=True)], **kw)


# -------------------------------------------------------------------------------------------
# The NS dtype default by device (issue 14, item 13)
# -------------------------------------------------------------------------------------------
def test_default_ns_dtype_follows_what_the_device_does_fast(monkeypatch):
    """ns_dtype=None (the default) resolves at each step by the params' device: bfloat16 on
    CUDA and on CPUs with AMX tiles (bf16 matmuls faster than float32 there), float32 on other
    CPUs (issue 22 item 9). Both CPU branches, by the capability the rule reads."""
    from mupopt.optim import muon

    assert muon.default_ns_dtype(torch.device("cuda", 0)) == torch.bfloat16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    assert muon.cpu_bf16_matmuls_fast() == (amx and torch.backends.mkldnn.is_available())
    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(muon, "cpu_bf16_matmuls_fast", lambda fast=fast: fast)
        assert muon.default_ns_dtype("cpu") == want
        p = leaves([(8, 6)], seed=2)[0]
        opt = mupopt.Muon([p], lr=0.02)
        assert opt.param_groups[0]["ns_dtype"] is None
        assert opt._hparams(opt.param_groups[0]).ns_dtype == want
        # Bit for bit what the explicit dtype computes, and not what the other one computes.
        runs = {}
        for dtype in (None, torch.float32, torch.bfloat16):
            q = leaves([(8, 6)], seed=2)[0]
            run(mupopt.Muon([q], lr=0.02, ns_dtype=dtype), [q], 2, seed=2)
            runs[dtype] = q.detach()
        other = torch.float32 if want == torch.bfloat16 else torch.bfloat16
        assert torch.equal(runs[None], runs[want])
        assert not torch.equal(runs[None], runs[other])
    with torch.device("meta"):
        m = torch.zeros(8, 6, requires_grad=True)
    meta_opt = mupopt.Muon([m])
    assert meta_opt._hparams(meta_opt.param_groups[0]).ns_dtype == torch.bfloat16
