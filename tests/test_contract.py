"""Every optimizer x every backend against its named reference and against float64 oracles.

Sizes follow issue 2: 1, 7 and 1000003 elements, a 33x65 matrix, a 0-element tensor; two param
groups with different hyperparameters; 10 steps; fp32 and bf16 storage.
"""
from __future__ import annotations

import pytest
import torch

import mupopt
from mupopt import backends
from mupopt.mup import WidthInfo, multipliers

from optimizer_table import CASES

SHAPES = [(1,), (7,), (1000003,), (33, 65), (0,), (5, 3)]
# Roles and width multipliers other than 1 for the muP contract (one per shape above).
WIDTHS = [
    WidthInfo("vector", 1.0, 2.0),
    WidthInfo("vector", 1.0, 1.0),
    WidthInfo("vector", 1.0, 4.0),
    WidthInfo("hidden", 4.0, 2.0),
    WidthInfo("output", 8.0, 1.0),
    WidthInfo("input", 1.0, 3.0),
]
STEPS = 10


# The oracle test runs on CUDA too, where the "triton" and "cuda" backends run compiled.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


def make_params(dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]


def grads_for(step, params):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype) for p in params]


def two_groups(params, case):
    """Two groups: the second with half the lr and no weight decay."""
    half = len(params) // 2
    return [
        {"params": params[:half]},
        {"params": params[half:], "lr": case.kwargs["lr"] * 0.5, "weight_decay": 0.0},
    ]


def run(opt, params, steps=STEPS, hessian_every=3):
    sophia = isinstance(opt, (mupopt.SophiaG,)) or type(opt).__name__ == "SophiaG"
    for t in range(steps):
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        if sophia and t % hessian_every == 0:
            opt.update_hessian()
        opt.step(**({"bs": 64} if sophia else {}))


def backend_names(name):
    return backends.names(name)


ALL = [(name, b) for name in CASES for b in backend_names(name)]


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].reference is not None])
@pytest.mark.parametrize("variant", ["plain", "maximize", "amsgrad"])
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_matches_named_reference(name, variant, device):
    """backend="auto": on CUDA the fastest registered backend, compiled, against the reference
    running on the same device."""
    case = CASES[name]
    if variant == "amsgrad" and name != "adamw":
        pytest.skip("amsgrad exists for AdamW only")
    extra = {variant: True} if variant != "plain" else {}
    if name == "sophia" and variant != "plain":
        extra = {"maximize": True} if variant == "maximize" else None
        if extra is None:
            pytest.skip("amsgrad exists for AdamW only")
    ours, theirs = make_params(torch.float32, device=device), make_params(torch.float32, device=device)
    for p in ours + theirs:
        p.requires_grad_()
    o = case.cls(two_groups(ours, case), **case.kwargs, **extra)
    r = case.reference(two_groups(theirs, case), **case.kwargs, **extra)
    run(o, ours)
    run(r, theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ours, theirs):
        for key, value in r.state[b].items():
            torch.testing.assert_close(o.state[a][key], value.reshape(o.state[a][key].shape), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].reference is not None])
def test_bf16_no_farther_from_fp32_than_named_reference(name):
    """bf16 storage: our fp32 math stays at least as close to the fp32 trajectory as the
    reference's bf16 arithmetic does (a few bf16 ulps after 10 steps)."""
    case = CASES[name]
    start = make_params(torch.bfloat16)
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    exact = [p.float().requires_grad_() for p in start]
    o = case.cls(two_groups(ours, case), **case.kwargs)
    r = case.reference(two_groups(theirs, case), **case.kwargs)
    e = case.reference(two_groups(exact, case), **case.kwargs)
    run(o, ours), run(r, theirs), run(e, exact)
    err_ours = max(((a.float() - x).abs().max().item() for a, x in zip(ours, exact) if x.numel()))
    err_ref = max(((b.float() - x).abs().max().item() for b, x in zip(theirs, exact) if x.numel()))
    assert all(a.dtype == torch.bfloat16 for a in ours)
    assert err_ours <= max(err_ref, 2**-7) * 1.05, (err_ours, err_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("wd_mode", ["independent", "coupled"])
@pytest.mark.parametrize("name,backend", ALL)
def test_mup_multipliers_match_float64_oracle(name, backend, wd_mode, dtype, device):
    case = CASES[name]
    params = make_params(dtype, device=device)
    shadow = [p.double() for p in params]
    for p, w in zip(params, WIDTHS):
        p.requires_grad_()
        setattr(p, mupopt.mup.WIDTH_ATTR, w)
    kwargs = dict(case.kwargs, backend=backend)
    if name != "lamb":
        kwargs["wd_mode"] = wd_mode
    elif wd_mode == "coupled":
        pytest.skip("LAMB's decay is inside its update: no wd_mode")
    if name in ("adamw", "adopt", "lamb"):
        kwargs["scale_eps"] = True
    if name == "lamb":
        kwargs["hidden_lr_exponent"] = -0.5
    reason = backends._REGISTRY[name][backend].unsupported_reason(params)
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    opt = case.cls(two_groups(params, case), **kwargs)
    states = [dict() for _ in params]
    extra = {"bs": 64} if name == "sophia" else {}
    for t in range(STEPS):
        grads = grads_for(t, params)
        for p, g in zip(params, grads):
            p.grad = g
        if name == "sophia" and t % 3 == 0:
            opt.update_hessian()
        opt.step(**extra)
        for group in opt.param_groups:
            hp = opt._hparams(group, **extra)
            mults = opt.group_multipliers(group)
            for p, m in zip(group["params"], mults):
                i = next(k for k, q in enumerate(params) if q is p)
                g64 = grads[i].double()
                if name == "sophia" and t % 3 == 0:
                    case_h = mupopt.testing.ORACLES["sophia_hessian"]
                    case_h(shadow[i], g64, states[i], m, hp)
                case.oracle(shadow[i], g64, states[i], m, hp)
                if dtype != torch.float32:  # model the storage: round p and states as the backend stores them
                    shadow[i].copy_(shadow[i].to(dtype))
                    for k, v in states[i].items():
                        if isinstance(v, torch.Tensor):
                            v.copy_(v.to(dtype))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for p, s in zip(params, shadow):
        torch.testing.assert_close(p.double(), s, **tol)


@pytest.mark.parametrize("name", list(CASES))
def test_multipliers_change_the_step(name):
    """The oracle test above would pass if multipliers were ignored by both sides; check that a
    hidden tensor at m_in = 4 moves less than the same tensor without width info (Adam-like:
    1/m_in; LAMB with exponent -1/2) while a vector moves the same."""
    case = CASES[name]
    kwargs = dict(case.kwargs, weight_decay=0.0)
    if name == "lamb":
        kwargs["hidden_lr_exponent"] = -0.5
    moved = []
    for info in (WidthInfo("hidden", 1.0, 1.0), WidthInfo("hidden", 4.0, 4.0)):
        p = torch.ones(8, 8, requires_grad=True)
        setattr(p, mupopt.mup.WIDTH_ATTR, info)
        opt = case.cls([p], **kwargs)
        run(opt, [p], steps=3)
        moved.append((p.detach() - 1).abs().mean().item())
    expected = multipliers(name, WidthInfo("hidden", 4.0, 4.0), lamb_hidden_exponent=kwargs.get("hidden_lr_exponent", 0.0)).lr
    assert expected < 1
    assert moved[1] == pytest.approx(moved[0] * expected, rel=1e-3)
