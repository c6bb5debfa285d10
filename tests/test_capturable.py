"""capturable=True (issue 15 item 3): step counts on the params' device, bias corrections as
device tensors, GradScaler's found_inf applied on the device, so that a step reads nothing on
the host (what CUDA graph capture needs); backends that support it: reference and cpu
(``Backend.capturable``); auto never picks another for a capturable group.

On the CPU the test makes every host read of a tensor fail (item, bool, float, int, tolist,
numpy) while the step runs. On a GPU (marked gpu) a whole training step is captured in a CUDA
graph and replayed against eager steps.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import mupopt
from mupopt import backends

CASES = {
    "adamw": (mupopt.AdamW, dict(lr=0.05, weight_decay=0.1)),
    "adamw-amsgrad": (mupopt.AdamW, dict(lr=0.05, weight_decay=0.1, amsgrad=True)),
    "adopt": (mupopt.ADOPT, dict(lr=0.05, weight_decay=0.1)),
    "lamb": (mupopt.LAMB, dict(lr=0.05, weight_decay=0.1)),
    "sophia": (mupopt.SophiaG, dict(lr=0.05, weight_decay=0.1, rho=0.04)),
    "muon": (mupopt.Muon, dict(lr=0.05, ns_dtype=torch.float32)),
}


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Every way Python reads a tensor's value on the host raises HostRead inside."""
    names = ["item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostRead(f"host read: Tensor.{name}")
        return method

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


# capturable forms the bias corrections from the float32 step tensor, as torch's capturable=True
# does: 1 - 0.999**t in float32 is 1.3e-5 off at t=1 (0.999 is not a float32), so AdamW's update
# moves by up to ~7e-6 relative against the float64 corrections of the host path.
TOL = dict(rtol=2e-5, atol=1e-6)


def model_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 4), (4,), (3, 6))]


def grads(ps, t):
    gen = torch.Generator().manual_seed(50 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


def do_step(opt, name):
    if name == "sophia":
        if not opt.state:
            opt.update_hessian()
        opt.step(bs=16)
    else:
        opt.step()


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_capturable_steps_read_nothing_on_the_host_and_match(name, backend):
    cls, kw = CASES[name]
    ps, qs = model_params(), model_params()
    cap = cls(ps, capturable=True, backend=backend, **kw)
    ref = cls(qs, backend=backend, **kw)
    for t in range(4):
        grads(ps, t), grads(qs, t)
        do_step(ref, name)
        if t == 0:
            do_step(cap, name)  # the first step builds the plan (and may build the C++ library)
            continue
        with no_host_reads():
            do_step(cap, name)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **TOL)
    steps = [st["step"] for st in cap.state.values() if "step" in st]
    assert steps and all(s.device == ps[0].device and s.dtype == torch.float32 for s in steps)
    if backend == "auto" and name != "muon":
        assert "reference" not in str(cap.selected_backends) or backends.names(cls.rule)[0] == "reference"


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia", "muon"])
def test_found_inf_skips_on_the_device(name, backend):
    """GradScaler's found_inf and grad_scale set (as GradScaler.step sets them): nonzero, nothing
    changes, step counts included; zero, the step is the unscaled one; no host read either way."""
    cls, kw = CASES[name]
    ps, qs = model_params(), model_params()
    cap = cls(ps, capturable=True, backend=backend, **kw)
    ref = cls(qs, backend=backend, **kw)
    for opt, xs in ((cap, ps), (ref, qs)):
        grads(xs, 0)
        do_step(opt, name)
    before = [p.detach().clone() for p in ps]
    steps = {k: v.clone() for k, st in enumerate(cap.state.values()) for v in [st.get("step")] if v is not None}
    grads(ps, 1)
    cap.grad_scale, cap.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    with no_host_reads():
        do_step(cap, name)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(torch.equal(list(cap.state.values())[k]["step"], v) for k, v in steps.items())
    # found_inf 0: the scaled gradients are unscaled and stepped, as the unscaled ones.
    grads(ps, 1), grads(qs, 1)
    for p in ps:
        p.grad.mul_(4.0)
    cap.grad_scale, cap.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    with no_host_reads():
        do_step(cap, name)
    del cap.grad_scale, cap.found_inf
    do_step(ref, name)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **TOL)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_warmup_from_lr_zero_leaves_params_unchanged(name, backend):
    """lr = 0 (the first steps of a warmup) with gradients that are zero in places: params stay
    exactly as they were, no NaN (torch's capturable AdamW divides by the step size and writes
    0/0 = NaN where v = 0; on CUDA every capturable step runs the reference backend), and the
    run then goes on as the host path's does."""
    cls, kw = CASES[name]
    ps, qs = model_params(), model_params()
    cap = cls(ps, capturable=True, backend=backend, **{**kw, "lr": 0.0})
    ref = cls(qs, backend=backend, **{**kw, "lr": 0.0})
    before = [p.detach().clone() for p in ps]
    for t in range(5):
        if t == 2:
            for opt in (cap, ref):
                for group in opt.param_groups:
                    group["lr"] = kw["lr"]
        for xs in (ps, qs):
            grads(xs, t)
            for x in xs:
                x.grad.view(-1)[::2] = 0.0  # v = 0 there while lr is 0
        do_step(ref, name)
        if t:
            with no_host_reads():
                do_step(cap, name)
        else:
            do_step(cap, name)
        if t < 2:
            assert all(torch.equal(p, b) for p, b in zip(ps, before)), t
    assert all(torch.isfinite(p).all() for p in ps)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **TOL)


def test_auto_skips_backends_without_capturable_and_explicit_ones_raise():
    """A faster backend that cannot take capturable=True is passed over by auto and refused when
    asked for by name."""
    calls = []
    fake = backends.Backend("adamw", "fake-fast", lambda *a, **k: calls.append(1), priority=100)
    backends.register(fake)
    try:
        ps = model_params()
        grads(ps, 0)
        mupopt.AdamW(ps, capturable=True).step()
        assert not calls
        qs = model_params()
        grads(qs, 0)
        with pytest.raises(RuntimeError, match="does not support capturable=True.*reference"):
            mupopt.AdamW(qs, capturable=True, backend="fake-fast").step()
        opt = mupopt.AdamW(ps)
        opt.step()
        assert calls  # without capturable the fast one runs
    finally:
        del backends._REGISTRY["adamw"]["fake-fast"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia"])
def test_cuda_graph_replays_a_whole_training_step(name):
    """forward, backward and opt.step() captured once in a CUDA graph; replays equal eager steps
    (torch's recipe: warm up on a side stream, capture, replay with new data copied in)."""
    cls, kw = CASES[name]
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).cuda()
        return model, cls(model.parameters(), capturable=True, **kw)

    (model, opt), (eager_model, eager_opt) = make(), make()
    data = [torch.randn(32, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(t)) for t in range(6)]
    static_x = data[0].clone()

    def train_step(m, o, x):
        o.zero_grad(set_to_none=False)
        m(x).pow(2).mean().backward()
        o.step(bs=32) if name == "sophia" else o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: state, plans
            train_step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        train_step(eager_model, eager_opt, data[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x)
    for x in data[1:]:
        static_x.copy_(x)
        graph.replay()
        train_step(eager_model, eager_opt, x)
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
