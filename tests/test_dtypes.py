"""Storage dtypes beyond float32/bfloat16 (issue 13 item 7).

float64: the reference backend computes float64 params in float64 (torch.optim does), so 10
steps of mupopt.AdamW equal torch.optim.AdamW on float64 params bit for bit, ADOPT torch-adopt's,
and every optimizer's float64 update is within float64 round-off of its float64 transcription
(mupopt/testing.py) where float32 math was 1e-7 off. The "cpu" backend computes float64 in
float64 too (issue 22 item 3; its bit-level statement against torch is in test_bitwise.py), so
``auto`` keeps float64 CPU params on it, bound steps included; the other fused backends compute
in float32 and refuse float64 tensors with a reason that says so (``auto`` then steps them with
the reference backend, per tensor).

float16: the "cpu" and "triton" backends' own fp16 tests live in test_cpp_backend.py,
test_cpp_bind.py and test_triton.py; here the registry's choice.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import mupopt
from mupopt import backends
from mupopt.testing import ORACLES
from mupopt.mup import WidthInfo

from optimizer_table import CASES

F64 = torch.float64
SHAPES = [(1,), (7,), (33, 65), (0,), (5000,), (5, 3)]
WIDTHS = [
    WidthInfo("vector", 1.0, 2.0),
    WidthInfo("vector", 1.0, 1.0),
    WidthInfo("hidden", 4.0, 2.0),
    WidthInfo("output", 8.0, 1.0),
    WidthInfo("vector", 1.0, 4.0),
    WidthInfo("input", 1.0, 3.0),
]
STEPS = 10


def make_params(shapes=SHAPES, dtype=F64, widths=None):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]
    if widths is not None:
        for p, w in zip(params, widths):
            setattr(p, mupopt.mup.WIDTH_ATTR, w)
    return params


def grads_for(step, params):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]


def groups(params, lr):
    half = len(params) // 2
    return [{"params": params[:half]}, {"params": params[half:], "lr": lr * 0.5, "weight_decay": 0.0}]


def train(opt, params, steps=STEPS, sophia=False):
    for t in range(steps):
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        if sophia and t % 3 == 0:
            opt.update_hessian()
        opt.step(**({"bs": 64} if sophia else {}))


def quiet(fn):
    """Run fn with auto's fallback warning (where a fused backend refuses float64) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mupopt.BackendFallbackWarning)
        return fn()


@pytest.mark.parametrize("variant", ["plain", "amsgrad", "maximize"])
@pytest.mark.parametrize("name", ["adamw", "adopt"])
def test_fp64_bitwise_with_named_reference(name, variant):
    """mupopt's AdamW/ADOPT on float64 params == torch.optim.AdamW / torch-adopt, bit for bit."""
    case = CASES[name]
    if variant == "amsgrad" and name != "adamw":
        pytest.skip("amsgrad exists for AdamW only")
    extra = {variant: True} if variant != "plain" else {}
    ours, theirs = make_params(), make_params()
    o = case.cls(groups(ours, case.kwargs["lr"]), **case.kwargs, **extra, backend="reference")
    r = case.reference(groups(theirs, case.kwargs["lr"]), **case.kwargs, **extra)
    quiet(lambda: train(o, ours))
    train(r, theirs)
    assert o.selected_backends == [{name: "reference"}] * 2
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == F64
        assert torch.equal(a, b), f"param {i}: max diff {(a - b).abs().max().item() if a.numel() else 0}"
        for key, value in r.state[b].items():
            if key in o.state[a]:
                assert torch.equal(o.state[a][key], value.reshape(o.state[a][key].shape)), f"{key} of param {i}"


def cpu_library_or_skip():
    if "cpu" not in backends.names("adamw"):
        pytest.skip("backend 'cpu' is not registered")
    from mupopt.kernels.cpp import build

    if build.load_cpu() is not True:
        pytest.skip("the cpu library cannot be built here")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia"])
def test_fp64_matches_float64_oracle(name, backend):
    """Every elementwise optimizer with muP multipliers other than 1 against its float64
    transcription: float64 round-off (1e-12 relative) where float32 math is ~1e-7 off."""
    if backend == "cpu":
        cpu_library_or_skip()
    case = CASES[name]
    params = make_params(widths=WIDTHS)
    shadow = [p.detach().clone() for p in params]
    kwargs = dict(case.kwargs, backend=backend)
    if name in ("adamw", "adopt", "lamb"):
        kwargs["scale_eps"] = True
    opt = case.cls(groups(params, kwargs["lr"]), **kwargs)
    states = [dict() for _ in params]
    extra = {"bs": 64} if name == "sophia" else {}
    for t in range(STEPS):
        grads = grads_for(t, params)
        for p, g in zip(params, grads):
            p.grad = g
        if name == "sophia" and t % 3 == 0:
            quiet(opt.update_hessian)
        quiet(lambda: opt.step(**extra))
        for group in opt.param_groups:
            hp = opt._hparams(group, **extra)
            for p, m in zip(group["params"], opt.group_multipliers(group)):
                i = next(k for k, q in enumerate(params) if q is p)
                if name == "sophia" and t % 3 == 0:
                    ORACLES["sophia_hessian"](shadow[i], grads[i], states[i], m, hp)
                ORACLES[name](shadow[i], grads[i], states[i], m, hp)
    assert all(v == backend for g in opt.selected_backends for v in g.values()), opt.selected_backends
    for p, s in zip(params, shadow):
        assert p.dtype == F64
        torch.testing.assert_close(p.detach(), s, rtol=1e-12, atol=1e-14)


def run_beside_oracle(opt, params, oracle):
    """STEPS steps of ``opt`` (one param group) on fresh gradients, with the float64 ``oracle``
    applied beside it to copies of the params: (the copies, the oracle's states)."""
    shadow = [p.detach().clone() for p in params]
    states = [dict() for _ in params]
    for t in range(STEPS):
        grads = grads_for(t, params)
        for p, g in zip(params, grads):
            p.grad = g
        quiet(opt.step)
        group = opt.param_groups[0]
        hp = opt._hparams(group)
        for i, m in enumerate(opt.group_multipliers(group)):
            oracle(shadow[i], grads[i], states[i], m, hp)
    return shadow, states


def test_fp64_muon_matches_float64_oracle():
    """Muon on float64 matrices with ns_dtype=float64: momentum, Newton-Schulz and update all in
    float64 (the momentum buffer within 1e-15 of the oracle's, the params within 1e-11)."""
    # Wide matrices: Muon's shape factor sqrt(max(1, rows/cols)) is 1, which group_multipliers
    # carries and the oracle applies (no double counting to undo).
    params = make_params([(33, 65), (8, 16)])
    opt = mupopt.Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=F64)
    shadow, states = run_beside_oracle(opt, params, ORACLES["muon"])
    for i, (p, s) in enumerate(zip(params, shadow)):
        assert opt.state[p]["momentum_buffer"].dtype == F64
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], states[i]["buf"], rtol=1e-15, atol=1e-15)
        torch.testing.assert_close(p.detach(), s, rtol=1e-11, atol=1e-13)


def test_fp64_shampoo_elementwise_parts_match_float64_oracle():
    """Shampoo's Adam graft, momentum and update in float64 for float64 params: vectors, and a
    matrix before its preconditioning starts (its statistics and roots stay float32)."""
    params = make_params([(7,), (33, 65), (5000,)])
    opt = mupopt.Shampoo(params, lr=1e-2, weight_decay=0.1, start_preconditioning_step=STEPS + 1)
    shadow, states = run_beside_oracle(opt, params, ORACLES["shampoo"])
    for p, s in zip(params, shadow):
        assert opt.state[p]["momentum_buffer"].dtype == F64
        torch.testing.assert_close(p.detach(), s, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia", "sophia_hessian"])
def test_fp64_backends(name, monkeypatch):
    """"cpu" steps float64 CPU tensors; every other fused backend refuses them saying why, and
    ``auto`` picks "cpu" for them (the reference where the library cannot be built)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    for backend in backends.names(name):
        if backend == "reference":
            continue
        refuse = backends._REGISTRY[name][backend].unsupported_reason
        if refuse([torch.zeros(3)]) is not None:
            continue  # cannot run here at all (triton without the interpreter, no compiler)
        reason = refuse([torch.zeros(3, dtype=F64)])
        if backend == "cpu":
            assert reason is None, reason
        else:
            assert reason is not None and "float64" in reason and "reference backend" in reason, (backend, reason)
    cpu = "cpu" in backends.names(name) and backends._REGISTRY[name]["cpu"].reason([torch.zeros(3)]) is None
    assert backends.select(name, "auto", [torch.zeros(3, dtype=F64)]).name == ("cpu" if cpu else "reference")


@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia"])
def test_auto_keeps_fp64_on_cpu(name, monkeypatch):
    """A group of float64 and float32 params (and a bfloat16 one) with ``auto``: one "cpu" call
    steps them all, each in its own arithmetic, with no fallback warning; the result equals
    the reference backend's on the same tensors (float64 to float64 round-off)."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    cpu_library_or_skip()
    case = CASES[name]
    dtypes = [F64, torch.float32, F64, F64, torch.bfloat16, F64]
    ours = [p.to(d).detach().requires_grad_() for p, d in zip(make_params(), dtypes)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    o = case.cls(ours, **case.kwargs)
    r = case.cls(ref, **case.kwargs, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mupopt.BackendFallbackWarning)
        train(o, ours, sophia=name == "sophia")
    train(r, ref, sophia=name == "sophia")
    assert o.selected_backends == [{k: "cpu" for k in o.selected_backends[0]}], o.selected_backends
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype
        if a.dtype == F64:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia", "sophia_hessian"])
def test_auto_selects_cpu_for_fp16(name, monkeypatch):
    """float16 tensors (params, grads) go to the fused "cpu" backend, no longer to the reference."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    if "cpu" not in backends.names(name):
        pytest.skip("backend 'cpu' is not registered")
    from mupopt.kernels.cpp import build

    if build.load_cpu() is not True:
        pytest.skip("the cpu library cannot be built here")
    assert backends.select(name, "auto", [torch.zeros(3, dtype=torch.float16)]).name == "cpu"
    p = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    assert backends.select(name, "auto", [p, torch.zeros(3, dtype=torch.float16), torch.zeros(3)]).name == "cpu"
