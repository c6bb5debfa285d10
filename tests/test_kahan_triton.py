"""kahan_summation in the "triton" backend (under TRITON_INTERPRET=1 on CPU tensors where there
is no CUDA): the storage layer's compensated codes 7 and 8 (_common._load / _store) and the
four elementwise optimizers' steps, and Muon's and Shampoo's, equal the backend's own float32
step on p + c followed by the split, bit for bit, and the reference backend's within the
documented float32 gap."""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton_mode

with triton_mode.defining_kernels():
    import mupopt
    from mupopt import storage
    from mupopt.kernels.triton import _common

pytestmark = pytest.mark.skipif(not _common.INTERPRET, reason="CPU tensors need the interpreter (no CUDA here)")

KEY = storage.COMPENSATION
# One tensor over two chunks (with a masked tail), one 2-D, one shorter than a vector; a float32
# one in the same list (code 0: no compensation, its store as without the option).
SHAPES = [(_common.BLOCK + 904,), (33, 17), (5,)]


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    triton_mode.match_environment(monkeypatch, _common.INTERPRET)


STEPS = 2  # the interpreter is slow


def _stepped(cls, kw, backend, dtype, steps=STEPS):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES] + [torch.nn.Parameter(torch.randn(7))]
    opt = cls(ps, lr=1e-3, kahan_summation=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return ps, opt


FOUR = [("adamw", mupopt.AdamW, {}), ("adopt", mupopt.ADOPT, {}), ("lamb", mupopt.LAMB, {}),
        ("sophia", mupopt.SophiaG, dict(rho=0.04))]


@pytest.mark.parametrize("name,cls,kw", FOUR)
def test_step_is_its_float32_step_then_split(name, cls, kw):
    """The kernels' compensated load and store, bit for bit: a bf16 step with the option equals
    the same backend's step of a float32 param set to p + c (with bf16 states, state_bits=16),
    rounded to nearest into p and the remainder into c; 2 steps (the interpreter is slow)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in SHAPES]
    qs = [torch.nn.Parameter(p.detach().float().clone()) for p in ps]
    opt = cls(ps, lr=1e-2, kahan_summation=True, backend="triton", **kw)
    ref = cls(qs, lr=1e-2, state_bits=16, backend="triton", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p, q in zip(ps, qs):
            p.grad = torch.randn(p.shape, generator=g).bfloat16()
            q.grad = p.grad.float()
        opt.step()
        ref.step()
        assert opt.selected_backends == [{name: "triton"}]
        for p, q in zip(ps, qs):
            c = opt.state[p][KEY]
            assert torch.equal(p.detach().view(torch.int16), q.detach().bfloat16().view(torch.int16))
            assert torch.equal(c.view(torch.int16), (q.detach() - p.detach().float()).bfloat16().view(torch.int16))
            with torch.no_grad():
                q.copy_(p.float() + c.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,cls,kw", [f for f in FOUR if f[0] != "lamb"])
def test_elementwise_same_as_reference(name, cls, kw, dtype):
    """Params and compensations as the reference stores them. Not every bit: the reference's
    float32 sqrt on the CPU is MKL's, 1 ulp off on ~0.7% of inputs, the kernels' the IEEE one
    (docs/backends.md), and the compensation shows the float32 value's low bits that the
    rounded param hides: a last-bit difference of x at a rounding boundary of c moves c by one
    of its spacings (about 2^-16 of p, far more than x's ulp), which the next step carries. So
    per element p + c within 4 float32 ulps of the largest |p| plus one spacing of c per step, and at
    least 99.5% of the compensations and 99.9% of the params bit for bit (measured: 1 of 9096
    compensations differs in AdamW bf16). Not LAMB: its float32 step differs from the
    reference's in the last bit on 39 of 9096 elements without the option (its trust ratio),
    and on the compensation of a small element by more than that bound (8 ulps measured); the
    test above checks its compensated load and store against its own float32 step."""
    ref, ref_opt = _stepped(cls, kw, "reference", dtype)
    tri, opt = _stepped(cls, kw, "triton", dtype)
    assert opt.selected_backends == [{name: "triton"}]
    assert torch.equal(ref[-1].detach(), tri[-1].detach()) or torch.allclose(ref[-1], tri[-1], rtol=2e-6, atol=0)
    assert KEY not in opt.state[tri[-1]]
    n = same_p = same_c = nonzero = 0
    torch.manual_seed(0)
    starts = [torch.randn(shape).to(dtype) for shape in SHAPES]  # _stepped's params before the steps
    for a, b, p0 in zip(ref[:-1], tri[:-1], starts):
        ca, cb = ref_opt.state[a][KEY], opt.state[b][KEY]
        xa = a.detach().double() + ca.double()
        xb = b.detach().double() + cb.double()
        # ulps of the largest |p| the element took (docs/backends.md's measure): start or end.
        largest = torch.maximum(xa.abs(), p0.double().abs())
        ulp32 = torch.ldexp(torch.ones_like(xa), torch.frexp(largest.float())[1] - 24).double()
        c_spacing = torch.ldexp(torch.ones_like(xa), torch.frexp(torch.maximum(ca.abs(), cb.abs()).float())[1]
                                - (8 if dtype == torch.bfloat16 else 11))
        bound = 4 * ulp32 + STEPS * c_spacing.double()
        worst = int(((xa - xb).abs() / bound).flatten().argmax())
        assert bool(((xa - xb).abs() <= bound).all()), (a.shape, worst, xa.flatten()[worst], xb.flatten()[worst],
                                                        p0.flatten()[worst], ca.flatten()[worst], cb.flatten()[worst])
        n += a.numel()
        same_p += int((a.detach().view(torch.int16) == b.detach().view(torch.int16)).sum())
        same_c += int((ca.view(torch.int16) == cb.view(torch.int16)).sum())
        nonzero += int((cb != 0).sum())
    assert same_p >= 0.999 * n and same_c >= 0.995 * n, (n, same_p, same_c)
    assert nonzero > n // 2


def test_missing_compensation_refused():
    """A bf16 param whose compensation was removed behind the optimizer's back: the kernel would
    read address 0; the plan refuses it with a clear error instead."""
    from mupopt.kernels.triton.adamw import adamw_triton
    from mupopt.optim.adamw import AdamWHparams

    p = torch.randn(16).bfloat16()
    st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    hp = AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, kahan_summation=True)
    with pytest.raises(RuntimeError, match="param_compensation"):
        adamw_triton([p], [torch.randn(16).bfloat16()], [st], [mupopt.mup.Multipliers(1.0, 1.0, 1.0)], hp)


# Muon (its AdamW part: the vector, through the adamw kernel) and Shampoo (blocks of 8: the
# (12, 8) and (6, 10) matrices are cut into blocks whose update rows start at offsets inside the
# tensor, where p and c are addressed alike).
MATRIX = {"muon": (mupopt.Muon, dict(ns_dtype=torch.float32)),
          "shampoo": (mupopt.Shampoo, dict(max_preconditioner_dim=8))}
MATRIX_SHAPES = [(12, 8), (6, 10), (5,)]


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_step_is_its_float32_step_then_split(name):
    """Muon's and Shampoo's kernels with the compensated param codes, bit for bit: a bf16 step
    with the option equals the same backend's step of a float32 param set to p + c (bf16 states,
    state_bits=16), rounded to nearest into p and the remainder into c. Gradients are multiples
    of 1/8 in [-3/8, 3/8]: Shampoo's statistics of bf16 gradients take another MMA path than
    those of float32 ones (tensor-core operands), whose sums of products agree in every bit
    only where they are exact. And within the float32 sqrt / Newton-Schulz gap of the reference
    backend (as test_elementwise_same_as_reference): p + c within 4 float32 ulps of the largest
    |p| plus one spacing of c per step."""
    cls, kw = MATRIX[name]
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).bfloat16()) for s in MATRIX_SHAPES]
    qs = [torch.nn.Parameter(p.detach().float().clone()) for p in ps]
    rs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = cls(ps, lr=1e-2, kahan_summation=True, backend="triton", **kw)
    f32 = cls(qs, lr=1e-2, state_bits=16, backend="triton", **kw)
    ref = cls(rs, lr=1e-2, kahan_summation=True, backend="reference", **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p, q, r in zip(ps, qs, rs):
            p.grad = (torch.randint(-3, 4, p.shape, generator=g) * 0.125).bfloat16()
            q.grad, r.grad = p.grad.float(), p.grad.clone()
        for o in (opt, f32, ref):
            o.step()
        assert opt.selected_backends == ([{"muon": "triton (2)", "adamw": "triton (1)"}] if name == "muon"
                                         else [{"shampoo": "triton"}])
        for p, q in zip(ps, qs):
            c = opt.state[p][KEY]
            assert torch.equal(p.detach().view(torch.int16), q.detach().bfloat16().view(torch.int16)), p.shape
            assert torch.equal(c.view(torch.int16), (q.detach() - p.detach().float()).bfloat16().view(torch.int16)), p.shape
            with torch.no_grad():
                q.copy_(p.float() + c.float())
    for p, r in zip(ps, rs):
        c, cr = opt.state[p][KEY], ref.state[r][KEY]
        assert bool((c != 0).any()), p.shape
        x, y = p.detach().double() + c.double(), r.detach().double() + cr.double()
        ulp32 = torch.ldexp(torch.ones_like(y), torch.frexp(y.abs().max().float())[1] - 24)
        c_spacing = torch.ldexp(torch.ones_like(y), torch.frexp(torch.maximum(c.abs(), cr.abs()).float())[1] - 8)
        assert bool(((x - y).abs() <= 4 * ulp32 + STEPS * c_spacing.double()).all()), p.shape


@pytest.mark.parametrize("name", MATRIX)
def test_matrix_missing_compensation_refused(name):
    """A bf16 param whose compensation is missing (the kernel would address 0): Muon's and
    Shampoo's kernels refuse it before anything is written."""
    from mupopt.kernels.triton.muon import muon_triton
    from mupopt.kernels.triton.shampoo import shampoo_triton
    from mupopt.optim.muon import MuonHparams
    from mupopt.optim.shampoo import ShampooHparams, init_shampoo_state

    p = torch.randn(8, 8).bfloat16()
    before = p.clone()
    if name == "muon":
        fn, st = muon_triton, {"momentum_buffer": torch.zeros_like(p)}
        hp = MuonHparams(0.02, 0.1, 0.95, True, ((3.4445, -4.775, 2.0315),), 1, 1e-7, None, torch.float32,
                         kahan_summation=True)
    else:
        fn, st = shampoo_triton, dict(init_shampoo_state(p, 8), step=torch.tensor(0.0))
        hp = ShampooHparams(1e-3, 0.9, 0.999, 1e-2, False, 0.0, 8, 1, 1, "adam", 0.999, 1e-8, "newton",
                            kahan_summation=True)
    with pytest.raises(RuntimeError, match="param_compensation"):
        fn([p], [torch.randn(8, 8).bfloat16()], [st], [mupopt.mup.Multipliers(1.0, 1.0, 1.0)], hp)
    assert torch.equal(p.view(torch.int16), before.view(torch.int16))


# -- compiled for the GPU (sm_90, no GPU needed) -------------------------------------------------
_COMPILE_LAUNCHES = r"""
from mupopt import storage
from mupopt.kernels.triton.adamw import adamw_triton
from mupopt.kernels.triton.adopt import adopt_triton
from mupopt.kernels.triton.lamb import lamb_triton
from mupopt.kernels.triton.sophia import sophia_triton
from mupopt.optim.adamw import AdamWHparams
from mupopt.optim.adopt import ADOPTHparams
from mupopt.optim.lamb import LAMBHparams
from mupopt.optim.sophia import SophiaHparams
from mupopt.mup import Multipliers
M = [Multipliers(1.0, 1.0, 1.0)] * 2
def make(keys, dtype):
    ps = [torch.zeros(5000, dtype=dtype), torch.zeros(7, dtype=dtype)]
    return ps, [torch.zeros_like(p) for p in ps], [
        {"step": torch.tensor(0.0), storage.COMPENSATION: torch.zeros_like(p),
         **{k: torch.zeros_like(p) for k in keys}} for p in ps]
for dtype in (torch.bfloat16, torch.float16):  # param storage codes 7 and 8
    p, g, s = make(("exp_avg", "exp_avg_sq"), dtype)
    adamw_triton(p, g, s, M, AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.1, False, False, kahan_summation=True))
p, g, s = make(("exp_avg", "exp_avg_sq"), torch.bfloat16)
adopt_triton(p, g, s, M, ADOPTHparams(1e-3, 0.9, 0.9999, 1e-6, 0.0, False, kahan_summation=True))
p, g, s = make(("exp_avg", "exp_avg_sq"), torch.bfloat16)
lamb_triton(p, g, s, M, LAMBHparams(1e-3, 0.9, 0.999, 1e-6, 0.01, None, False, kahan_summation=True))
p, g, s = make(("exp_avg", "hessian"), torch.bfloat16)
sophia_triton(p, g, s, M, SophiaHparams(1e-4, 0.965, 0.99, 0.04, 0.1, 64.0, False, kahan_summation=True))
from mupopt.kernels.triton.muon import muon_triton
from mupopt.kernels.triton.shampoo import shampoo_triton
from mupopt.optim.muon import MuonHparams
from mupopt.optim.shampoo import ShampooHparams, init_shampoo_state
w = torch.zeros(70, 70, dtype=torch.bfloat16)
muon_triton([w], [torch.zeros_like(w)], [{"momentum_buffer": torch.zeros_like(w), storage.COMPENSATION: torch.zeros_like(w)}],
            M[:1], MuonHparams(0.02, 0.1, 0.95, True, ((3.4445, -4.775, 2.0315),), 1, 1e-7, None, torch.bfloat16,
                               kahan_summation=True))
ps = [w, torch.zeros(5000, dtype=torch.bfloat16)]
states = [dict(init_shampoo_state(p, 64), step=torch.tensor(0.0), **{storage.COMPENSATION: torch.zeros_like(p)}) for p in ps]
# start_preconditioning_step 100: no roots to take from the (uncomputed) statistics
shampoo_triton(ps, [torch.zeros_like(p) for p in ps], states, M,
               ShampooHparams(1e-3, 0.9, 0.999, 1e-2, False, 0.0, 64, 1, 100, "adam", 0.999, 1e-8, "newton",
                              kahan_summation=True))
"""


def test_compensated_kernels_compile_for_sm90():
    """The compensated load and store (codes 7 and 8) compile for the GPU, in the elementwise
    kernels and in Muon's and Shampoo's updates, and the full-chunk path still moves the param
    with 16-byte accesses: the interpreter accepts code the compiler may not."""
    results = triton_mode.compile_for_sm90(_COMPILE_LAUNCHES)
    codes = {(r["kernel"], r["constexprs"].get("P_BF16")) for r in results}
    assert {("_adamw_kernel", "7"), ("_adamw_kernel", "8"), ("_adopt_kernel", "7"), ("_lamb_norms_kernel", "7"),
            ("_lamb_update_kernel", "7"), ("_sophia_kernel", "7"), ("_muon_update_kernel", "7"),
            ("_shampoo_update_kernel", "7")} <= codes
    # The vector-access check is the elementwise kernels' (Muon's and Shampoo's are asserted to
    # compile only: their bf16 accesses are not 16-byte vectors with or without the option).
    elementwise = {"_adamw_kernel", "_adopt_kernel", "_lamb_norms_kernel", "_lamb_update_kernel", "_sophia_kernel"}
    for r in results:
        if r["constexprs"].get("ALIGNED") == "True" and r["kernel"] in elementwise:
            assert r["v4_loads"] > 0, r


def test_compiled_step_writes_the_compensation():
    """torch.compile(opt.step): the Triton custom op (in the graph) lists the compensation among
    the entries it writes, so 3 compiled steps leave params and compensations as 3 eager ones.
    Each group mixes float32 params (no compensation: an empty placeholder in the op's list)
    with bf16 ones, a float32 param first in one group and last in the other: the op once
    took its entries from the first param's state (an InterpreterError of a fake tensor when a
    bf16 param came first, a missing compensation when a float32 one did)."""
    import torch._dynamo

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)).bfloat16()
        scales = [torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(3))]  # float32
        (w1, b1), (w2, b2) = model[0].parameters(), model[1].parameters()
        groups = [{"params": [scales[0], w1, b1]}, {"params": [w2, b2, scales[1]]}]
        opt = mupopt.AdamW(groups, lr=1e-2, backend="triton", kahan_summation=True)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3)).bfloat16()
        step = torch.compile(opt.step, backend=recording) if compiled else opt.step
        for _ in range(3):
            opt.zero_grad()
            h = model[0](x).float() * scales[0]
            (model[1](h.bfloat16()).float() * scales[1]).pow(2).mean().backward()
            step()
        assert all(KEY not in opt.state[s] for s in scales)
        return ([t.detach().clone() for p in model.parameters() for t in (p, opt.state[p][KEY])],
                [s.detach().clone() for s in scales])

    (eager, eager32), (compiled, compiled32) = run(False), run(True)
    assert sum("torch.ops.mupopt.adamw_triton_" in g for g in graphs) >= 1
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(eager, compiled))
    assert all(torch.equal(a, b) for a, b in zip(eager32, compiled32))
    assert any(bool(c.ne(0).any()) for c in compiled[1::2])
    assert all(bool(s.ne(1).all()) for s in compiled32)  # the float32 params were stepped
