"""The "triton" backend against the reference backend, for the five registry functions.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set below before triton is imported); tests marked ``gpu`` run the same
checks compiled on CUDA tensors and are skipped elsewhere. A further test compiles every kernel
variant for sm_90 (no GPU needed) and checks the full-chunk path is vectorised.

The interpreter is slow (a few ms per program): sizes stay small, one of BLOCK + 904 elements so
a tensor spans two chunks (a full one and a masked tail).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import textwrap

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton_mode
from models import tensor_state

with triton_mode.defining_kernels():
    import mupopt
    from mupopt import backends
    from mupopt.kernels import triton as mt
    from mupopt.kernels.triton import _common  # defines the kernels: their mode is fixed here
    from mupopt.kernels.triton.adamw import adamw_triton
    from mupopt.kernels.triton.adopt import adopt_triton
    from mupopt.kernels.triton.lamb import lamb_triton
    from mupopt.kernels.triton.sophia import sophia_hessian_triton, sophia_triton
    from mupopt.mup import Multipliers, WidthInfo
    from mupopt.optim.adamw import AdamWHparams, adamw_reference
    from mupopt.optim.adopt import ADOPTHparams, adopt_reference
    from mupopt.optim.lamb import LAMBHparams, lamb_reference
    from mupopt.optim.sophia import SophiaHparams, sophia_hessian_reference, sophia_reference

INTERPRET = _common.INTERPRET
STEPS = 10
SHAPES = [(1,), (7,), (33, 65), (0,), (_common.BLOCK + 904,), (5, 3)]
# muP multipliers other than 1 and different per tensor: (lr, wd, eps).
MULTS = [
    Multipliers(2.0, 1.0, 0.5),
    Multipliers(1.0, 1.0, 1.0),
    Multipliers(0.25, 0.25, 2.0),
    Multipliers(1.0, 1.0, 1.0),
    Multipliers(0.5, 2.0, 1.0),
    Multipliers(4.0, 1.0, 0.25),
]
WIDTHS = [
    WidthInfo("vector", 1.0, 2.0),
    WidthInfo("vector", 1.0, 1.0),
    WidthInfo("hidden", 4.0, 2.0),
    WidthInfo("output", 8.0, 1.0),
    WidthInfo("vector", 1.0, 4.0),
    WidthInfo("input", 1.0, 3.0),
]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """Register the backend when these tests run, not when this file is collected (idempotent:
    the package init may have done it already)."""
    mt.register()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only contend (30 ms instead of 0.3 ms per reference step on
    a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    triton_mode.match_environment(monkeypatch, INTERPRET)


DEVICES = triton_mode.devices(INTERPRET)

# ---------------------------------------------------------------------------------------------
# The functional contract: triton == reference over 10 steps
# ---------------------------------------------------------------------------------------------
FUNCTIONS = {
    "adamw": (adamw_reference, adamw_triton, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "adopt": (adopt_reference, adopt_triton, ("exp_avg", "exp_avg_sq")),
    "lamb": (lamb_reference, lamb_triton, ("exp_avg", "exp_avg_sq")),
    "sophia": (sophia_reference, sophia_triton, ("exp_avg", "hessian")),
    "sophia_hessian": (sophia_hessian_reference, sophia_hessian_triton, ("exp_avg", "hessian")),
}


def hparams(name: str, **variant):
    if name == "adamw":
        return AdamWHparams(1e-2, 0.9, 0.999, 1e-8, 0.1, variant.get("amsgrad", False), variant.get("maximize", False))
    if name == "adopt":
        return ADOPTHparams(1e-2, 0.9, 0.9999, 1e-6, 0.1, variant.get("maximize", False))
    if name == "lamb":
        return LAMBHparams(1e-2, 0.9, 0.999, 1e-6, 0.1, variant.get("clamp_value"), variant.get("maximize", False))
    return SophiaHparams(1e-2, 0.965, 0.99, 0.04, 0.1, 64.0, variant.get("maximize", False))


def make(name, p_dtype, s_dtype, device, seed=0):
    """Params and fresh state dicts as the optimizers' _init_state makes them."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=p_dtype) for s in SHAPES]
    keys = FUNCTIONS[name][2]
    states = [
        {"step": torch.tensor(0.0, dtype=torch.float32), **{k: torch.zeros_like(p, dtype=s_dtype) for k in keys}}
        for p in params
    ]
    return params, states


def grads_for(step, params, dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=dtype) for p in params]


def tolerance(p_dtype, s_dtype):
    if p_dtype == F32 and s_dtype == F32:
        return dict(rtol=1e-5, atol=1e-6)
    if F16 in (p_dtype, s_dtype) and BF16 not in (p_dtype, s_dtype):
        # One float16 ulp (2^-11 relative) at most, from a float32 round-off difference.
        return dict(rtol=2e-3, atol=1e-4)
    # A float32 round-off difference may flip one bf16 rounding, one bf16 ulp (2^-8 relative).
    return dict(rtol=1.6e-2, atol=1e-3)


def assert_same(name, ref, tri, p_dtype, s_dtype):
    (pr, sr), (pt, st) = ref, tri
    tol = tolerance(p_dtype, s_dtype)
    for i, (a, b) in enumerate(zip(pr, pt)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), **tol, msg=lambda m: f"param {i}: {m}")
        for k, v in sr[i].items():
            assert st[i][k].dtype == v.dtype, k
            torch.testing.assert_close(st[i][k].float(), v.float(), **tol, msg=lambda m: f"state {k} {i}: {m}")


def run_functional(name, p_dtype, s_dtype, device, g_dtype=None, hessian_every=3, **variant):
    """10 steps of reference and triton on identical copies; the first two steps only touch the
    first half of the tensors, so tensors sit at different steps in one launch (and ADOPT's
    first step happens mid-run for the other half)."""
    ref_fn, tri_fn, _ = FUNCTIONS[name]
    g_dtype = g_dtype or p_dtype
    hp = hparams(name, **variant)
    ref, tri = make(name, p_dtype, s_dtype, device), make(name, p_dtype, s_dtype, device)
    for t in range(STEPS + 2):
        idx = range(len(SHAPES) // 2) if t < 2 else range(len(SHAPES))
        grads = grads_for(t, ref[0], g_dtype)
        for fn, (params, states) in ((ref_fn, ref), (tri_fn, tri)):
            args = ([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx], [MULTS[i] for i in idx])
            if name == "sophia" and hessian_every and t % hessian_every == 0:
                (sophia_hessian_reference if fn is ref_fn else sophia_hessian_triton)(*args, hp)
            fn(*args, hp)
    assert_same(name, ref, tri, p_dtype, s_dtype)
    for a, b in zip(ref[1], tri[1]):
        assert a["step"].item() == b["step"].item()
    return ref, tri


CASES = [
    # name, p dtype, state dtype, variant
    ("adamw", F32, F32, {}),
    ("adamw", BF16, BF16, {}),
    ("adamw", F32, BF16, {}),
    ("adamw", F32, F32, {"maximize": True}),
    ("adamw", F32, F32, {"amsgrad": True}),
    ("adamw", F32, BF16, {"amsgrad": True, "maximize": True}),
    ("adopt", F32, F32, {}),
    ("adopt", BF16, BF16, {}),
    ("adopt", F32, BF16, {}),
    ("adopt", F32, F32, {"maximize": True}),
    ("lamb", F32, F32, {}),
    ("lamb", BF16, BF16, {}),
    ("lamb", F32, BF16, {}),
    ("lamb", F32, F32, {"maximize": True, "clamp_value": 2.0}),
    ("sophia", F32, F32, {}),
    ("sophia", BF16, BF16, {}),
    ("sophia", F32, BF16, {}),
    ("sophia", F32, F32, {"maximize": True}),
    ("sophia", F32, F32, {"hessian_every": 0}),  # h == 0 throughout: ratio saturates, step sign(m)
    ("sophia_hessian", F32, F32, {}),
    ("sophia_hessian", BF16, BF16, {}),
    ("sophia_hessian", F32, BF16, {}),
]


def _case_id(case):
    name, p, s, variant = case
    short = {F32: "fp32", BF16: "bf16", F16: "fp16"}
    return "-".join([name, f"p{short[p]}", f"s{short[s]}", *sorted(variant)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_functional_matches_reference(case, device):
    name, p_dtype, s_dtype, variant = case
    run_functional(name, p_dtype, s_dtype, device, **variant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("g_dtype", [F16, F32], ids=["gfp16", "gfp32"])
@pytest.mark.parametrize("s_dtype", [F16, F32], ids=["sfp16", "sfp32"])
@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia", "sophia_hessian"])
def test_fp16_matches_reference(name, s_dtype, g_dtype, device):
    """float16 params (states float16 or float32) with float16 or float32 gradients, 10 steps.
    The float16 conversions are exact (round to nearest even, as torch's copy_; under the
    interpreter numpy's conversion), but the float32 math is not bit for bit the reference's
    (the fp32 cases above allow rtol 1e-5: ATen's fused lerp/addcmul and MKL's sqrt), and such a
    float32 ulp can flip a float16 rounding. So: within float16 round-off (tolerance()), and at
    most 1% of the stored float16 values differ (measured: at most 14 of 9096 in one tensor,
    SophiaG's exp_avg; most tensors bit for bit)."""
    variant = {"amsgrad": True} if name == "adamw" else {}
    ref, tri = run_functional(name, F16, s_dtype, device, g_dtype=g_dtype, **variant)
    for i, (a, b) in enumerate(zip(ref[0], tri[0])):
        assert a.dtype == b.dtype == F16
        for k, v in [("param", a)] + list(ref[1][i].items()):
            w = b if k == "param" else tri[1][i][k]
            if v.dtype == F16 and v.numel():
                assert (v != w).float().mean().item() <= 0.01, f"{k} {i}: more than 1% of fp16 values differ"


with triton_mode.defining_kernels():
    import triton
    import triton.language as tl
    from mupopt.kernels.triton._common import _store

    @triton.jit
    def _store_kernel(src_ptr, addr_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src_ptr + offs, mask=mask, other=0.0)
        _store(tl.load(addr_ptr), offs.to(tl.int64), x, mask, KIND, False, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
def test_stores_round_to_nearest_even(dtype, device):
    """_common._store's float32 -> float16/bfloat16 conversion is torch's (nearest, ties to
    even, overflow to inf, subnormals): random values over the whole range, exact ties between
    neighbouring 16-bit values, the largest finite values and their overflow boundary."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = x[torch.isfinite(x)]
    scaled = torch.randn(20000, generator=gen) * torch.exp2(torch.randint(-30, 20, (20000,), generator=gen).float())
    h = torch.randint(0, 2**15 - 1024, (20000,), generator=gen, dtype=torch.int64).to(torch.int16).view(dtype)
    lo, hi = h.float(), (h.view(torch.int16) + 1).view(dtype).float()
    ties = (lo + hi) / 2  # exact in float32: the midpoint of two neighbours
    big = torch.tensor([65504.0, 65519.0, 65520.0, 65536.0, 1e5, 6e-8, 3e-8, 2.9e-8, 1e-45, -0.0])
    src = torch.cat([x, scaled, ties, -ties, big]).to(device)
    dst = torch.empty(src.shape, dtype=dtype, device=device)
    addr = torch.tensor([dst.data_ptr()], dtype=torch.int64, device=device)
    block = 1024
    _store_kernel[(triton.cdiv(src.numel(), block),)](src, addr, src.numel(), KIND=_common.storage_kind(dtype), BLOCK=block)
    expected = src.to(dtype)
    same = (dst.view(torch.int16) == expected.view(torch.int16)) | (dst.isnan() & expected.isnan())
    assert bool(same.all()), (src[~same][:5], dst[~same][:5], expected[~same][:5])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_grads_with_fp32_params(device):
    """Gradient and parameter dtypes may differ (a bf16 autocast-style gradient)."""
    run_functional("adamw", F32, F32, device, g_dtype=BF16)


@pytest.mark.parametrize("device", DEVICES)
def test_adopt_first_step_only_initialises_v(device):
    params, states = make("adopt", F32, F32, device)
    before = [p.clone() for p in params]
    grads = grads_for(0, params, F32)
    adopt_triton(params, grads, states, MULTS, hparams("adopt"))
    for p, b, g, st in zip(params, before, grads, states):
        assert torch.equal(p, b)
        assert torch.equal(st["exp_avg"], torch.zeros_like(p))
        torch.testing.assert_close(st["exp_avg_sq"], g * g, rtol=0, atol=0)
        assert st["step"].item() == 1


@pytest.mark.parametrize("device", DEVICES)
def test_sophia_zero_hessian_steps_by_sign(device):
    """h == 0: |m| / (0 + 1e-15) saturates, so p moves by exactly lr*lr_mult*sign(m) (wd = 0)."""
    params, states = make("sophia", F32, F32, device)
    hp = SophiaHparams(1e-2, 0.965, 0.99, 0.04, 0.0, 64.0, False)
    before = [p.clone() for p in params]
    grads = grads_for(0, params, F32)
    sophia_triton(params, grads, states, MULTS, hp)
    for p, b, g, m in zip(params, before, grads, MULTS):
        torch.testing.assert_close(p, b - hp.lr * m.lr * torch.sign(g), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Through the optimizer classes (param groups, muP width info, backend selection)
# ---------------------------------------------------------------------------------------------
OPTIMIZERS = {
    "adamw": (mupopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adopt": (mupopt.ADOPT, dict(lr=1e-2, weight_decay=0.1)),
    "lamb": (mupopt.LAMB, dict(lr=1e-2, weight_decay=0.1, hidden_lr_exponent=-0.5)),
    "sophia": (mupopt.SophiaG, dict(lr=1e-2, weight_decay=0.1, rho=0.04)),
}


def _model(device, dtype):
    gen = torch.Generator().manual_seed(0)
    params = []
    for s, w in zip(SHAPES, WIDTHS):
        p = torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_()
        setattr(p, mupopt.mup.WIDTH_ATTR, w)
        params.append(p)
    return params


def _groups(params, kwargs):
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": kwargs["lr"] * 0.5, "weight_decay": 0.0}]


def _train(opt, params, sophia):
    for t in range(STEPS):
        for p, g in zip(params, grads_for(t, params, params[0].dtype)):
            p.grad = g
        if sophia and t % 3 == 0:
            opt.update_hessian()
        opt.step(**({"bs": 64} if sophia else {}))


# Storage dtypes are covered by the functional tests above; here: every class in fp32, and bf16
# through one class.
CLASS_CASES = [(name, F32) for name in OPTIMIZERS] + [("adamw", BF16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,dtype", CLASS_CASES, ids=[f"{n}-{'fp32' if d == F32 else 'bf16'}" for n, d in CLASS_CASES])
def test_optimizer_class_backend_triton(name, dtype, device):
    cls, kwargs = OPTIMIZERS[name]
    extra = {"amsgrad": True} if name == "adamw" else {}
    ours, theirs = _model(device, dtype), _model(device, dtype)
    o = cls(_groups(ours, kwargs), **kwargs, **extra, backend="triton")
    r = cls(_groups(theirs, kwargs), **kwargs, **extra, backend="reference")
    assert backends._REGISTRY[name]["triton"].unsupported_reason(ours) is None
    _train(o, ours, name == "sophia")
    _train(r, theirs, name == "sophia")
    tol = tolerance(dtype, dtype)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), **tol)
        for key, value in tensor_state(r.state[b]).items():
            torch.testing.assert_close(o.state[a][key].float(), value.float(), **tol)


# ---------------------------------------------------------------------------------------------
# What the backend refuses, and the registry's fallback
# ---------------------------------------------------------------------------------------------
def _noncontiguous_model(device):
    gen = torch.Generator().manual_seed(0)
    # Every other column of a matrix: not dense, so no flat view of its storage exists (a
    # transposed or channels_last leaf is stepped as its flat storage: tests/test_layouts.py).
    w = torch.randn(5, 14, generator=gen).to(device)[:, ::2].requires_grad_()
    b = torch.randn(7, generator=gen).to(device).requires_grad_()
    assert not w.is_contiguous()
    return [w, b]


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_param_steps_through_the_plans_buffer(device):
    """The kernels take flat tensors only (the registry sends a strided tensor to the reference),
    so the optimizer steps a param that is not dense through a contiguous buffer of its plan
    (issue 22): backend="triton" steps it, as the reference does, within float32 round-off."""
    assert backends.select("adamw", "auto", _noncontiguous_model(device)).name == "reference"
    ours, ref = _noncontiguous_model(device), _noncontiguous_model(device)
    for params, backend in ((ours, "triton"), (ref, "reference")):
        opt = mupopt.AdamW(params, lr=1e-2, backend=backend)
        for t in range(2):
            for p in params:
                p.grad = torch.full_like(p, 0.5 + t)
            opt.step()
        assert opt.selected_backends == [{"adamw": backend}]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_grad_or_state_raises_clearly(device):
    params, states = make("adamw", F32, F32, device)
    grads = grads_for(0, params, F32)
    grads[2] = grads[2].t().contiguous().t()  # same shape, transposed strides
    with pytest.raises(RuntimeError, match=r"gradient 2 \(shape \(33, 65\).*not contiguous"):
        adamw_triton(params, grads, states, MULTS, hparams("adamw"))
    assert all(st["step"].item() == 0 for st in states)  # refused before anything moved

    grads = grads_for(0, params, F32)
    states[2]["exp_avg_sq"] = states[2]["exp_avg_sq"].t().contiguous().t()
    with pytest.raises(RuntimeError, match=r"exp_avg_sq 2 .*not contiguous"):
        adamw_triton(params, grads, states, MULTS, hparams("adamw"))


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_reasons(device, monkeypatch):
    ok = [torch.zeros(3, device=device), torch.zeros(2, 2, device=device, dtype=BF16)]
    assert mt.unsupported_reason(ok) is None
    assert mt.unsupported_reason([torch.zeros(3, device=device, dtype=F16)]) is None
    f64 = mt.unsupported_reason([torch.zeros(3, device=device, dtype=torch.float64)])
    assert "float32, bfloat16 and float16" in f64 and "float64 params are stepped in float64" in f64
    # Muon's and Shampoo's matrix kernels: float32 and bfloat16 only.
    from mupopt.kernels.triton import muon as muon_triton_module, shampoo as shampoo_triton_module
    for module in (muon_triton_module, shampoo_triton_module):
        assert "float32 and bfloat16" in module.unsupported_reason([torch.zeros(3, 3, device=device, dtype=F16)])
    assert "not contiguous" in mt.unsupported_reason([torch.zeros(3, 4, device=device).t()])
    assert "CUDA" in mt.unsupported_reason([torch.zeros(3, device="meta")])
    if device == "cuda":
        assert "CPU" in mt.unsupported_reason([torch.zeros(3, device="cuda"), torch.zeros(3)])
    else:
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "TRITON_INTERPRET=1" in mt.unsupported_reason(ok)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # triton missing: the reason says so
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setattr(mt, "_import_checked", False)
    monkeypatch.setattr(mt, "_import_error", None)
    assert "triton is not importable" in mt.unsupported_reason(ok)


def test_registered_for_every_optimizer():
    for name in mt.OPTIMIZERS:
        backend = backends._REGISTRY[name]["triton"]
        assert backend.priority == 10 and backend.unsupported_reason is mt.unsupported_reason
    mt.register()  # idempotent


# ---------------------------------------------------------------------------------------------
# Launch structure and the table cache
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_dtype_combination_and_cached_tables(device, monkeypatch):
    launches = []
    real = _common.launch

    def counting(kernel, grid, *args, **meta):
        launches.append((kernel, grid, meta))
        real(kernel, grid, *args, **meta)

    monkeypatch.setattr(_common, "launch", counting)
    params, states = make("adamw", F32, F32, device)
    params[1] = params[1].to(BF16)  # a second dtype combination
    states[1] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(params[1]), "exp_avg_sq": torch.zeros_like(params[1])}
    _common.clear_cache()
    for t in range(2):
        grads = [g.to(p.dtype) for g, p in zip(grads_for(t, params, F32), params)]
        adamw_triton(params, grads, states, MULTS, hparams("adamw"))
    # 2 dtype combinations x 2 steps, whatever the tensor count and the per-tensor multipliers
    assert len(launches) == 4
    assert len(_common._CACHE) == 1  # the second step (new grads) reused the tables
    # LAMB: norms, trust, update
    launches.clear()
    params, states = make("lamb", F32, F32, device)
    lamb_triton(params, grads_for(0, params, F32), states, MULTS, hparams("lamb"))
    assert [k.__name__ if hasattr(k, "__name__") else k.fn.__name__ for k, _, _ in launches] == [
        "_lamb_norms_kernel", "_lamb_trust_kernel", "_lamb_update_kernel"
    ]
    assert len(_common._CACHE) == 2


def test_unaligned_views_are_stepped_without_the_alignment_hint():
    """Views at odd offsets (e.g. slices of one flat buffer) are correct, just not vectorised."""
    if not INTERPRET:
        pytest.skip("CPU check")
    flat = torch.randn(1 + 7 + _common.BLOCK + 904)  # a full chunk and a tail, both unaligned
    params = [flat[1:8], flat[8:]]  # 4-byte aligned only
    states = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for p in params]
    ref_p = [p.clone() for p in params]
    ref_s = [{k: v.clone() for k, v in st.items()} for st in states]
    grads = [torch.randn(p.shape) for p in params]
    hp = hparams("adamw")
    adamw_reference(ref_p, grads, ref_s, MULTS[:2], hp)
    adamw_triton(params, grads, states, MULTS[:2], hp)
    plan = next(reversed(_common._CACHE.values()))
    assert not plan.launches[0].aligned
    for a, b in zip(params, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every kernel variant compiles for the GPU (sm_90, no GPU needed) and is vectorised
# ---------------------------------------------------------------------------------------------
_COMPILE_LAUNCHES = textwrap.dedent(
    r"""
    from mupopt.kernels.triton.adamw import adamw_triton
    from mupopt.kernels.triton.adopt import adopt_triton
    from mupopt.kernels.triton.lamb import lamb_triton
    from mupopt.kernels.triton.sophia import sophia_triton, sophia_hessian_triton
    from mupopt.optim.adamw import AdamWHparams
    from mupopt.optim.adopt import ADOPTHparams
    from mupopt.optim.lamb import LAMBHparams
    from mupopt.optim.sophia import SophiaHparams
    from mupopt.mup import Multipliers
    M = [Multipliers(1.0, 1.0, 1.0)] * 2
    def make(keys, p_dtype, s_dtype):
        ps = [torch.zeros(5000, dtype=p_dtype), torch.zeros(7, dtype=p_dtype)]
        return ps, [torch.zeros_like(p) for p in ps], [
            {"step": torch.tensor(0.0), **{k: torch.zeros_like(p, dtype=s_dtype) for k in keys}} for p in ps]
    # fp32 everywhere for every kernel; bf16 storage (other code paths) for AdamW with amsgrad
    # and maximize, fp16 storage for AdamW, and LAMB with bf16 moments (its recompute-in-pass-3 path) and a clamp.
    F32, BF16 = torch.float32, torch.bfloat16
    p, g, s = make(("exp_avg", "exp_avg_sq"), F32, F32)
    adamw_triton(p, g, s, M, AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.1, False, False))
    p, g, s = make(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), BF16, BF16)
    adamw_triton(p, g, s, M, AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.1, True, True))
    p, g, s = make(("exp_avg", "exp_avg_sq"), torch.float16, torch.float16)  # fp16 storage
    adamw_triton(p, g, s, M, AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.1, False, False))
    # stochastic rounding of bf16 and fp16 params (param storage codes 3 and 4)
    for dtype in (BF16, torch.float16):
        p, g, s = make(("exp_avg", "exp_avg_sq"), dtype, dtype)
        for st in s:
            st["sr_seed"] = 12345
        adamw_triton(p, g, s, M, AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.1, False, False, stochastic_rounding=True))
    p, g, s = make(("exp_avg", "exp_avg_sq"), F32, F32)
    adopt_triton(p, g, s, M, ADOPTHparams(1e-3, 0.9, 0.9999, 1e-6, 0.0, False))
    for s_dtype in (F32, BF16):
        p, g, s = make(("exp_avg", "exp_avg_sq"), F32, s_dtype)
        lamb_triton(p, g, s, M, LAMBHparams(1e-3, 0.9, 0.999, 1e-6, 0.01, 10.0 if s_dtype == BF16 else None, False))
    # LAMB with norm_reduce: the trust kernel's other two forms (sums out, trust from sums)
    p, g, s = make(("exp_avg", "exp_avg_sq"), F32, F32)
    lamb_triton(p, g, s, M, LAMBHparams(1e-3, 0.9, 0.999, 1e-6, 0.01, None, False), norm_reduce=lambda x: x)
    p, g, s = make(("exp_avg", "hessian"), F32, F32)
    sophia_triton(p, g, s, M, SophiaHparams(1e-4, 0.965, 0.99, 0.04, 0.1, 64.0, False))
    sophia_hessian_triton(p, g, s, M, SophiaHparams(1e-4, 0.965, 0.99, 0.04, 0.1, 64.0, False))
    # 8-bit states (state_bits=8: storage codes 5 and 6, _common._store_q8 / _load_q8)
    def make8(keys, p_dtype):
        ps, gs, ss = make((), p_dtype, F32)
        for q, st in zip(ps, ss):
            for k in keys:
                st[k] = torch.zeros(q.shape, dtype=torch.uint8)
                st[k + "_absmax"] = torch.zeros(-(-q.numel() // 256))
        return ps, gs, ss
    p, g, s = make8(("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), F32)
    adamw_triton(p, g, s, M, AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.1, True, True))
    p, g, s = make8(("exp_avg", "exp_avg_sq"), BF16)
    adopt_triton(p, g, s, M, ADOPTHparams(1e-3, 0.9, 0.9999, 1e-6, 0.0, False))
    p, g, s = make8(("exp_avg", "exp_avg_sq"), F32)
    lamb_triton(p, g, s, M, LAMBHparams(1e-3, 0.9, 0.999, 1e-6, 0.01, None, False))
    p, g, s = make8(("exp_avg", "hessian"), F32)
    sophia_triton(p, g, s, M, SophiaHparams(1e-4, 0.965, 0.99, 0.04, 0.1, 64.0, False))
    sophia_hessian_triton(p, g, s, M, SophiaHparams(1e-4, 0.965, 0.99, 0.04, 0.1, 64.0, False))
    """
)


def test_kernels_compile_for_sm90_and_vectorise():
    results = triton_mode.compile_for_sm90(_COMPILE_LAUNCHES)
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_adamw_kernel", "_adopt_kernel", "_lamb_norms_kernel", "_lamb_trust_kernel", "_lamb_update_kernel",
        "_sophia_kernel", "_sophia_hessian_kernel",
    }
    assert {r["constexprs"]["SUMS"] for r in results if r["kernel"] == "_lamb_trust_kernel"} == {"0", "1", "2"}
    assert {"3", "4"} <= {r["constexprs"]["P_BF16"] for r in results if r["kernel"] == "_adamw_kernel"}
    for kernel, role in (("_adamw_kernel", "M_BF16"), ("_adamw_kernel", "VMAX_BF16"), ("_adopt_kernel", "V_BF16"),
                         ("_lamb_update_kernel", "M_BF16"), ("_sophia_kernel", "H_BF16"), ("_sophia_hessian_kernel", "H_BF16")):
        assert {r["constexprs"][role] for r in results if r["kernel"] == kernel} & {"5", "6"}, (kernel, role)
    for r in results:
        if r["kernel"] == "_lamb_trust_kernel" or r["constexprs"].get("ALIGNED") != "True":
            continue
        assert r["v4_loads"] > 0, r  # 16-byte accesses on the full-chunk path
        # The Hessian EMA with 8-bit h stores only codes and block scales: its byte stores, after
        # the [BLOCK/256, 256] reshape, compile to no v4 store (their speed waits for a GPU).
        only_codes = r["kernel"] == "_sophia_hessian_kernel" and r["constexprs"]["H_BF16"] in ("5", "6")
        if (r["kernel"] != "_lamb_norms_kernel" or r["constexprs"].get("MOMENTS_IN_PASS_1") == "True") and not only_codes:
            assert r["v4_stores"] > 0, r


def test_tuning_sweep_checks_and_restores_the_configuration(capsys):
    """benchmarks/tune_triton.py, under the interpreter on CPU tensors (machinery only): every
    configuration is checked against the reference before it is timed, one row per (config,
    optimizer), and BLOCK / NUM_WARPS are as before afterwards."""
    if not INTERPRET:
        pytest.skip("the smoke sweep runs the interpreted kernels on CPU tensors")
    import benchmark_scripts

    tune = benchmark_scripts.load("tune_triton")
    before = (_common.BLOCK, _common.NUM_WARPS)
    launched = []
    real_launch = _common.launch

    def spy(kernel, grid, *args, **meta):
        launched.append((meta.get("BLOCK"), meta.get("num_warps", _common.NUM_WARPS)))
        real_launch(kernel, grid, *args, **meta)

    _common.launch = spy
    try:
        assert tune.main(["--device", "cpu", "--mode", "smoke", "--case", "smoke", "--configs", "256x4,1024x8",
                          "--optimizers", "adamw,lamb"]) == 0
    finally:
        _common.launch = real_launch
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["adamw", "triton"], ["lamb", "triton"])]
    assert sorted((r[0], r[2], r[3]) for r in rows) == sorted(
        (o, b, w) for o in ("adamw", "lamb") for b, w in (("256", "4"), ("1024", "8")))
    assert (256, 4) in launched and (1024, 8) in launched
    assert (_common.BLOCK, _common.NUM_WARPS) == before
    with pytest.raises(SystemExit, match="powers of two"):
        tune.parse_configs("1000x8")
