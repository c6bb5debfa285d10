"""Complex parameters and non-contiguous layouts (issue 13 items 8 and 9).

Elementwise optimizers (AdamW, ADOPT, LAMB, SophiaG) step a complex tensor as its real view (as
torch.optim does) and a dense non-overlapping tensor that is not contiguous (channels_last, a
transposed leaf) as its flat storage, on the fused backends; only a truly strided tensor falls
back to the reference, alone. Muon and Shampoo refuse complex parameters with a clear error.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mupopt
from mupopt import backends

ELEMENTWISE = {
    "adamw": (mupopt.AdamW, dict(lr=0.1, weight_decay=0.1)),
    "adopt": (mupopt.ADOPT, dict(lr=0.1, weight_decay=0.1)),
    "lamb": (mupopt.LAMB, dict(lr=0.1, weight_decay=0.1)),
    "sophia": (mupopt.SophiaG, dict(lr=0.1, weight_decay=0.1, rho=0.04)),
}


def fused() -> str | None:
    best = backends.names("adamw")[0]
    ok = backends.get("adamw", best).reason([torch.zeros(2)]) is None
    return best if ok and best != "reference" else None


def run(opt, ps, steps=4):
    for t in range(steps):
        gen = torch.Generator().manual_seed(t)
        for p in ps:
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.grad = torch.empty_like(p).copy_(g)  # the param's layout, as autograd leaves it
        if isinstance(opt, mupopt.SophiaG):
            opt.update_hessian()
            opt.step(bs=16)
        else:
            opt.step()


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_complex_params_step_as_their_real_view(name, backend):
    """A complex tensor steps exactly as a real tensor holding its real view does (bitwise)."""
    cls, kw = ELEMENTWISE[name]
    gen = torch.Generator().manual_seed(0)
    z = nn.Parameter(torch.randn(6, 5, dtype=torch.complex64, generator=gen))
    r = nn.Parameter(torch.view_as_real(z.detach()).clone())
    oz, orl = cls([z], backend=backend, **kw), cls([r], backend=backend, **kw)
    for t in range(4):
        g = torch.randn(6, 5, dtype=torch.complex64, generator=torch.Generator().manual_seed(t))
        z.grad, r.grad = g.clone(), torch.view_as_real(g).clone()
        for o in (oz, orl):
            if name == "sophia":
                o.update_hessian()
                o.step(bs=16)
            else:
                o.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert oz.state[z]["exp_avg"].dtype == torch.complex64  # torch's state layout, loadable by torch
    if backend == "auto" and fused():
        assert oz.selected_backends[0][name] == fused()


def test_complex_adamw_matches_torch():
    z = nn.Parameter(torch.randn(4, 7, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)))
    w = nn.Parameter(z.detach().clone())
    a, b = mupopt.AdamW([z], lr=0.1, backend="reference"), torch.optim.AdamW([w], lr=0.1, foreach=False)
    for t in range(5):
        g = torch.randn(4, 7, dtype=torch.complex64, generator=torch.Generator().manual_seed(t))
        z.grad, w.grad = g.clone(), g.clone()
        a.step(), b.step()
    assert torch.equal(z, w)


def _layouts():
    gen = torch.Generator().manual_seed(2)
    conv = torch.randn(8, 4, 3, 3, generator=gen).to(memory_format=torch.channels_last)
    leaf_t = torch.randn(5, 7, generator=gen).t()
    return [conv, leaf_t]


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_dense_layouts_run_on_the_fused_backend(name):
    """channels_last and transposed leaves are stepped by the fused backend as flat storage,
    and equal the same optimizer on contiguous copies (elementwise math does not depend on the
    order of the elements; LAMB's norms do, within float64 sums rounded once)."""
    if fused() is None:
        pytest.skip("no fused backend here")
    cls, kw = ELEMENTWISE[name]
    ps = [nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in _layouts()]
    qs = [nn.Parameter(x.contiguous()) for x in _layouts()]
    assert not any(p.is_contiguous() for p in ps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mupopt.BackendFallbackWarning)
        a = cls(ps, **kw)
        run(a, ps)
    b = cls(qs, **kw)
    run(b, qs)
    assert a.selected_backends[0][name] == fused()
    for p, q in zip(ps, qs):
        if name == "lamb":
            torch.testing.assert_close(p, q, rtol=2e-7, atol=1e-7)
        else:
            assert torch.equal(p, q)
        assert p.stride() == a.state[p]["exp_avg"].stride()  # state keeps the param's layout


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_truly_strided_param_steps_on_the_fused_backend_through_a_copy(name):
    """A param that is not dense (every other column of a larger tensor, as torch's
    test_forloop_goes_right_direction makes them) is stepped by the fused backend through a
    contiguous buffer (copied in, written back): equal to the same optimizer on a contiguous
    copy, no fallback, the other columns of its storage untouched."""
    if fused() is None:
        pytest.skip("no fused backend here")
    cls, kw = ELEMENTWISE[name]
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(4))
    strided = nn.Parameter(base[:, ::2])
    plain = nn.Parameter(torch.randn(5))
    qs = [nn.Parameter(strided.detach().clone()), nn.Parameter(plain.detach().clone())]
    others = base[:, 1::2].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", mupopt.BackendFallbackWarning)
        opt = cls([strided, plain], **kw)
        run(opt, [strided, plain], steps=3)
    ref = cls(qs, **kw)
    run(ref, qs, steps=3)
    assert opt.selected_backends[0][name] == fused()
    assert torch.equal(strided, qs[0]) and torch.equal(plain, qs[1])
    assert torch.equal(base[:, 1::2], others)


@pytest.mark.parametrize("cls", [mupopt.Muon, mupopt.Shampoo])
def test_muon_and_shampoo_refuse_complex_params(cls):
    z = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=f"{cls.__name__} does not support complex parameters"):
        cls([z])


# ---------------------------------------------------------------------------------------------
# Gradients of another layout than their param's (issue 22 item 1)
# ---------------------------------------------------------------------------------------------
import triton_mode  # noqa: E402

TRITON_ON_CPU = triton_mode.runs_on_cpu()
ALL_SIX = {
    **ELEMENTWISE,
    "muon": (mupopt.Muon, dict(lr=0.05, weight_decay=0.1)),
    "shampoo": (mupopt.Shampoo, dict(lr=0.05, epsilon=1e-3)),
}


def _cpu_backends(rule):
    names = [n for n in backends.names(rule) if n in ("reference", "cpu") or (n == "triton" and TRITON_ON_CPU)]
    return [n for n in names if n != "cpu" or backends.get(rule, n).reason([torch.zeros(2)]) is None]


def _param_layouts(name="adamw"):
    """A contiguous matrix, a contiguous 4-D tensor, a channels_last 4-D tensor (a flat view for
    the elementwise kernels; Muon and Shampoo get it contiguous: their kernels take matrices as
    they are laid out) and a vector."""
    gen = torch.Generator().manual_seed(3)
    last = torch.channels_last if name in ELEMENTWISE else torch.contiguous_format
    return [
        torch.randn(6, 4, generator=gen),
        torch.randn(4, 3, 2, 2, generator=gen),
        torch.randn(5, 3, 2, 2, generator=gen).to(memory_format=last),
        torch.randn(6, generator=gen),
    ]


def _odd_layout(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The values of g in a layout other than its param's: transposed storage for a matrix,
    channels_last for a contiguous 4-D param and contiguous for a channels_last one, every
    other element of a larger buffer (not dense) for a vector."""
    if p.ndim == 2:
        return g.t().contiguous().t()
    if p.ndim == 4:
        return g.contiguous() if not p.is_contiguous() else g.contiguous(memory_format=torch.channels_last)
    return torch.zeros(2 * g.numel())[::2].view(g.shape).copy_(g)


@pytest.mark.parametrize("name,backend", [(n, b) for n in ALL_SIX for b in _cpu_backends(n)])
def test_gradients_of_any_layout_step_like_contiguous_ones(name, backend, monkeypatch):
    """Gradients whose strides differ from their param's step exactly as gradients in the
    param's layout do (torch's fused AdamW steps them too), on every backend: on the first step
    (the plan is built with them) and on later steps (a plan built for the usual layout),
    without falling back to another backend."""
    if backend == "triton":
        triton_mode.match_environment(monkeypatch, True)
    cls, kw = ALL_SIX[name]
    ps = [nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in _param_layouts(name)]
    qs = [nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in _param_layouts(name)]
    a, b = cls(ps, backend=backend, **kw), cls(qs, backend=backend, **kw)
    odd_steps = {0, 2, 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", mupopt.BackendFallbackWarning)
        for t in range(4):
            gen = torch.Generator().manual_seed(t)
            for k, (p, q) in enumerate(zip(ps, qs)):
                g = torch.randn(p.shape, generator=gen)
                q.grad = torch.empty_like(q).copy_(g)  # the param's layout
                p.grad = _odd_layout(g, p) if t in odd_steps else torch.empty_like(p).copy_(g)
                assert t not in odd_steps or p.grad.stride() != p.stride()
            for o in (a, b):
                if name == "sophia":
                    o.update_hessian()
                    o.step(bs=16)
                else:
                    o.step()
    assert a.selected_backends == b.selected_backends
    for p, q in zip(ps, qs):
        assert torch.equal(p, q), f"max diff {(p - q).abs().max().item():.3g}"


@pytest.mark.parametrize("backend", _cpu_backends("adamw"))
def test_unscaled_gradient_of_another_layout_is_stored_back(backend, monkeypatch):
    """With GradScaler's grad_scale set, p.grad holds the unscaled gradient after the step (as
    torch's fused AdamW leaves it), also where the step worked on a copy in the param's layout;
    p.grad stays the same tensor object."""
    if backend == "triton":
        triton_mode.match_environment(monkeypatch, True)
    ps = [nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in _param_layouts()]
    qs = [nn.Parameter(x.clone(memory_format=torch.preserve_format)) for x in _param_layouts()]
    a, b = mupopt.AdamW(ps, lr=0.1, backend=backend), mupopt.AdamW(qs, lr=0.1, backend=backend)
    for t in range(2):
        gen = torch.Generator().manual_seed(t)
        grads = []
        for k, (p, q) in enumerate(zip(ps, qs)):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = _odd_layout(g * 4, p), torch.empty_like(q).copy_(g)
            grads.append((p.grad, g))
        a.grad_scale, a.found_inf = torch.tensor(4.0), torch.tensor(0.0)
        a.step(), b.step()
        del a.grad_scale, a.found_inf
        for p, (held, g) in zip(ps, grads):
            assert p.grad is held and torch.equal(held, g)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
