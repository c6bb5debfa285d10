"""torch.amp.GradScaler with every mupopt optimizer and backend (the contract of mupopt.optim._base).

GradScaler.step(opt) on an optimizer with ``_step_supports_amp_scaling`` neither unscales nor
skips: it sets ``opt.grad_scale`` (None after ``scaler.unscale_(opt)``) and ``opt.found_inf`` for
the duration of ``opt.step()``. Checked here, on the CPU (``torch.amp.GradScaler("cpu")``):

(a) finite scaled gradients give the trajectory of an unscaled run, and p.grad is left unscaled
    (as torch's fused AdamW leaves it);
(b) an inf or nan in one gradient skips the step: params, every state tensor and the step counts
    unchanged, no state created on a first step, and the scaler backs off;
(c) scaler.unscale_(opt) then scaler.step(opt) (stage UNSCALED, grad_scale None);
(d) the same for Muon and Shampoo (generic path; Muon with backend="auto" steps its AdamW part
    with the triton kernels when they can run);
plus SophiaG.update_hessian with the attributes set by hand, a scale that is not a power of two,
and that the triton backend unscales inside its kernels.

The triton backend runs in the interpreter on CPU tensors (TRITON_INTERPRET=1, set only while
the kernels are imported and while these tests run, as tests/test_triton.py does); tests marked
``gpu`` run on CUDA and are skipped elsewhere.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import mupopt
import triton_mode
from mupopt import backends
from mupopt.optim import _base

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = False
if HAVE_TRITON:
    with triton_mode.defining_kernels():
        from mupopt.kernels import triton as mt
        from mupopt.kernels.triton import _common  # defines the kernels: their mode is fixed here

    INTERPRET = _common.INTERPRET

STEPS = 4
INIT_SCALE = 2.0**10
# 5000 elements: two 4096-element chunks in the triton kernels (a full one and a masked tail).
SHAPES = [(7,), (16, 8), (5000,), (4, 12)]
F32, BF16 = torch.float32, torch.bfloat16

# name: (class, constructor kwargs, step kwargs, backends to run)
OPTIMIZERS = {
    "adamw": (mupopt.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True), {}, ("reference", "triton")),
    "adopt": (mupopt.ADOPT, dict(lr=1e-2, weight_decay=0.1), {}, ("reference", "triton")),
    "lamb": (mupopt.LAMB, dict(lr=1e-2, weight_decay=0.1), {}, ("reference", "triton")),
    "sophia": (mupopt.SophiaG, dict(lr=1e-2, weight_decay=0.1, rho=0.04), {"bs": 64}, ("reference", "triton")),
    # Generic path. Muon under "auto": its AdamW part takes the triton kernels where they run.
    "muon": (mupopt.Muon, dict(lr=2e-2, ns_dtype=torch.float32, adamw_lr=1e-2), {}, ("reference", "auto")),
    "shampoo": (mupopt.Shampoo, dict(lr=1e-2, weight_decay=0.1), {}, ("reference",)),
}


def _triton_can_run(device: str) -> bool:
    if not HAVE_TRITON:
        return False
    return INTERPRET if device == "cpu" else (torch.cuda.is_available() and not INTERPRET)


def _params(name):
    gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    out = []
    for backend in OPTIMIZERS[name][3]:
        for dev, marks in (("cpu", []), ("cuda", gpu)):
            marks = list(marks)
            if backend == "triton" and not _triton_can_run(dev):
                marks.append(pytest.mark.skip(reason=f"the triton kernels cannot run on {dev} here"))
            out.append(pytest.param(name, backend, dev, marks=marks, id=f"{name}-{backend}-{dev}"))
    return out


ALL = [p for name in OPTIMIZERS for p in _params(name)]


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    """While these tests run: the environment agrees with the kernels' mode, one thread (tiny
    tensors: intra-op threads only contend on a loaded machine)."""
    if HAVE_TRITON:
        mt.register()
        triton_mode.match_environment(monkeypatch, INTERPRET)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def leaves(device, dtype=F32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]


def grads_for(step, params, dtype=None):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=dtype or p.dtype) for p in params]


def make(name, backend, params):
    cls, kwargs, step_kwargs, _ = OPTIMIZERS[name]
    return cls(params, **kwargs, backend=backend), step_kwargs


def scale_of(scaler, device):
    """The scaler's current scale as a tensor: scaling a 1, as scaler.scale(loss) would (which
    is also what creates the scale on its first call)."""
    return scaler.scale(torch.ones((), device=device))


def run(name, backend, params, mode, steps=STEPS, grad_dtype=None, scaler=None):
    """``steps`` steps on fixed gradients. mode "plain": opt.step(); "scaler": the gradients
    times the scale, then scaler.step; "unscale": the same with scaler.unscale_(opt) first;
    "direct": the scaled gradients, and opt.grad_scale / opt.found_inf set by hand around
    opt.step(), as GradScaler.step sets them for an optimizer that unscales itself."""
    opt, step_kwargs = make(name, backend, params)
    device = params[0].device.type
    if grad_dtype is not None and hasattr(params[0], "grad_dtype"):
        for p in params:  # torch >= 2.10 refuses a gradient of another dtype unless told
            p.grad_dtype = None
    if mode != "plain" and scaler is None:
        scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    for t in range(steps):
        grads = grads_for(t, params, grad_dtype)
        if name == "sophia" and t == 0:  # the Hessian EMA on unscaled gradients, in every mode
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.update_hessian()
        if mode == "plain":
            for p, g in zip(params, grads):
                p.grad = g
            opt.step(**step_kwargs)
            continue
        scale = scale_of(scaler, device)
        for p, g in zip(params, grads):
            p.grad = (g.float() * scale).to(g.dtype)  # a power of two: exact
        if mode == "direct":
            opt.grad_scale, opt.found_inf = scale, torch.zeros((), device=device)
            try:
                opt.step(**step_kwargs)
            finally:
                del opt.grad_scale, opt.found_inf
        else:
            if mode == "unscale":
                scaler.unscale_(opt)
            scaler.step(opt, **step_kwargs)
            scaler.update()
        for p, g in zip(params, grads):  # p.grad holds the unscaled gradient afterwards
            assert torch.equal(p.grad, g), "p.grad should hold the unscaled gradient after the step"
    return opt, scaler


def state_tensors(opt, params):
    """Every state tensor of every param, flattened in a fixed order (Shampoo keeps lists)."""
    out = []
    for p in params:
        for key, value in sorted(opt.state[p].items()):
            values = value if isinstance(value, list) else [value]
            out += [(f"{key}", v) for v in values if isinstance(v, torch.Tensor)]
    return out


def assert_same_run(opt_a, params_a, opt_b, params_b, **tol):
    tol = tol or dict(rtol=1e-6, atol=1e-7)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
    sa, sb = state_tensors(opt_a, params_a), state_tensors(opt_b, params_b)
    assert [k for k, _ in sa] == [k for k, _ in sb]
    for (key, a), (_, b) in zip(sa, sb):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"state {key}: {m}")


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_unchanged(opt, params, snap):
    before_params, before_state = snap
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    after = opt.state_dict()["state"]
    assert after.keys() == before_state.keys()
    for i, st in after.items():
        assert st.keys() == before_state[i].keys()
        for key, value in st.items():
            old = before_state[i][key]
            if isinstance(value, dict):  # Shampoo's blocks, by block number
                assert value.keys() == old.keys()
                value, old = list(value.values()), list(old.values())
            values, olds = (value, old) if isinstance(value, list) else ([value], [old])
            for v, o in zip(values, olds):
                assert torch.equal(v, o), f"state {i} {key} changed"


# ---------------------------------------------------------------------------------------------
# (a), (c), (d): scaled gradients give the unscaled trajectory
# ---------------------------------------------------------------------------------------------
def test_every_optimizer_declares_amp_support():
    for cls, *_ in OPTIMIZERS.values():
        assert cls._step_supports_amp_scaling is True


@pytest.mark.parametrize("name,backend,device", ALL)
@pytest.mark.parametrize("mode", ["scaler", "unscale"])
def test_scaled_run_matches_unscaled_run(name, backend, device, mode):
    plain_params, amp_params = leaves(device), leaves(device)
    plain, _ = run(name, backend, plain_params, "plain")
    amp, scaler = run(name, backend, amp_params, mode)
    assert scaler.get_scale() == INIT_SCALE  # nothing was skipped
    assert not hasattr(amp, "grad_scale") and not hasattr(amp, "found_inf")  # GradScaler removed them
    assert_same_run(plain, plain_params, amp, amp_params)


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif(not _triton_can_run("cpu"), reason="no triton on the CPU")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not _triton_can_run("cuda"), reason="needs CUDA")]),
])
def test_bf16_gradients_triton_matches_reference(device):
    """fp32 params with bf16 gradients: the kernels unscale in registers; with a power-of-two
    scale that is exact, so the scaled run equals the reference run on the unscaled gradients.
    On CUDA GradScaler itself cannot take bf16 gradients (torch 2.11, in its found-inf check,
    before our step runs: "_amp_foreach_non_finite_check_and_unscale_cuda" not implemented for
    'BFloat16'), so there the scale reaches the step as GradScaler would hand it ("direct")."""
    ref_params, tri_params = leaves(device), leaves(device)
    ref, _ = run("adamw", "reference", ref_params, "plain", grad_dtype=BF16)
    tri, _ = run("adamw", "triton", tri_params, "scaler" if device == "cpu" else "direct", grad_dtype=BF16)
    assert_same_run(ref, ref_params, tri, tri_params, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (b): an inf or nan skips the whole step
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,backend,device", ALL)
@pytest.mark.parametrize("mode,bad", [("scaler", float("inf")), ("unscale", float("nan"))])
def test_non_finite_gradient_skips_the_step(name, backend, device, mode, bad):
    params = leaves(device)
    opt, scaler = run(name, backend, params, mode, steps=2)
    snap = snapshot(opt, params)
    steps_before = [opt.state[p].get("step") for p in params]
    steps_before = [None if s is None else s.clone() for s in steps_before]
    scale = scaler.get_scale()
    grads = grads_for(2, params)
    grads[1][3, 2] = bad  # one element of one gradient
    for p, g in zip(params, grads):
        p.grad = g * scale
    scaled = [p.grad.clone() for p in params]
    if mode == "unscale":
        scaler.unscale_(opt)
    scaler.step(opt, **OPTIMIZERS[name][2])
    assert_unchanged(opt, params, snap)
    for p, s in zip(params, steps_before):
        if s is not None:
            assert torch.equal(opt.state[p]["step"], s)
    if mode == "scaler":  # skipped before anything read them: the gradients are left as they were
        for p, g in zip(params, scaled):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    scaler.update()
    assert scaler.get_scale() == scale * 0.5
    # and training goes on: the next finite step is applied
    for p, g in zip(params, grads_for(3, params)):
        p.grad = g * scale_of(scaler, device)
    scaler.step(opt, **OPTIMIZERS[name][2])
    scaler.update()
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, snap[0]))


@pytest.mark.parametrize("name,backend,device", ALL)
def test_skipped_first_step_creates_no_state(name, backend, device):
    params = leaves(device)
    opt, step_kwargs = make(name, backend, params)
    scaler = torch.amp.GradScaler(device, init_scale=INIT_SCALE)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g * scale_of(scaler, device)
    params[0].grad[0] = float("inf")
    scaler.step(opt, **step_kwargs)
    scaler.update()
    assert len(opt.state) == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert scaler.get_scale() == INIT_SCALE / 2


# ---------------------------------------------------------------------------------------------
# The contract driven directly, as GradScaler would
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,backend,device", ALL)
def test_contract_set_by_hand_with_a_scale_that_is_not_a_power_of_two(name, backend, device):
    """grad_scale = 3: not exact, so the trajectory agrees to float32 rounding only."""
    plain_params, amp_params = leaves(device), leaves(device)
    plain, step_kwargs = make(name, backend, plain_params)
    amp, _ = make(name, backend, amp_params)
    for t in range(STEPS):
        grads = grads_for(t, plain_params)
        for p, q, g in zip(plain_params, amp_params, grads):
            p.grad, q.grad = g, g * 3.0
        plain.step(**step_kwargs)
        amp.grad_scale = torch.tensor(3.0, device=device)
        amp.found_inf = torch.tensor(0.0, device=device)
        amp.step(**step_kwargs)
        for q, g in zip(amp_params, grads):
            torch.testing.assert_close(q.grad, g, rtol=1e-6, atol=1e-7)
    del amp.grad_scale, amp.found_inf
    # Sign-based or normalised updates (Sophia's sign, Muon's orthogonalisation, LAMB's trust
    # ratio) amplify a 1-ulp gradient difference more than AdamW does; Shampoo's inverse fourth
    # roots of the first, nearly singular statistics most (measured after 4 steps: 3e-5 absolute
    # in a param, 2e-4 in the momentum of the preconditioned direction).
    tol = dict(rtol=1e-2, atol=1e-3) if name == "shampoo" else dict(rtol=1e-4, atol=1e-5)
    assert_same_run(plain, plain_params, amp, amp_params, **tol)


@pytest.mark.parametrize("backend,device", [
    pytest.param("reference", "cpu"),
    pytest.param("triton", "cpu", marks=pytest.mark.skipif(not _triton_can_run("cpu"), reason="no triton on the CPU")),
])
def test_found_inf_alone_skips_and_grad_scale_alone_unscales(backend, device):
    params = leaves(device)
    opt, _ = make("adamw", backend, params)
    for p, g in zip(params, grads_for(0, params)):
        p.grad = g
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert len(opt.state) == 0
    del opt.found_inf
    ref_params = leaves(device)
    ref, _ = make("adamw", backend, ref_params)
    for p, q, g in zip(params, ref_params, grads_for(0, params)):
        p.grad, q.grad = g * 8.0, g
    opt.grad_scale = torch.tensor(8.0)  # no found_inf: unscale only
    opt.step()
    ref.step()
    assert_same_run(ref, ref_params, opt, params)


@pytest.mark.parametrize("backend,device", [
    pytest.param("reference", "cpu"),
    pytest.param("triton", "cpu", marks=pytest.mark.skipif(not _triton_can_run("cpu"), reason="no triton on the CPU")),
])
def test_sophia_update_hessian_honours_the_attributes(backend, device):
    """GradScaler sets them only around step(); set by hand they drive update_hessian too."""
    plain_params, amp_params = leaves(device), leaves(device)
    plain, _ = make("sophia", backend, plain_params)
    amp, _ = make("sophia", backend, amp_params)
    grads = grads_for(0, plain_params)
    for p, q, g in zip(plain_params, amp_params, grads):
        p.grad, q.grad = g, g * 64.0
    plain.update_hessian()
    amp.grad_scale, amp.found_inf = torch.tensor(64.0), torch.tensor(0.0)
    amp.update_hessian()
    assert_same_run(plain, plain_params, amp, amp_params)
    snap = snapshot(amp, amp_params)
    amp.found_inf = torch.tensor(1.0)
    amp.update_hessian()
    assert_unchanged(amp, amp_params, snap)


@pytest.mark.skipif(not _triton_can_run("cpu"), reason="no triton on the CPU")
def test_triton_unscales_in_its_kernels(monkeypatch):
    """The triton backend takes the scale itself: the base class's generic unscale never runs
    for it (it still does for the reference backend)."""
    calls = []
    real = _base.unscale_
    monkeypatch.setattr(_base, "unscale_", lambda grads, inv: (calls.append(len(grads)), real(grads, inv)))
    for name in ("adamw", "adopt", "lamb", "sophia"):
        assert backends._REGISTRY[name]["triton"].amp_scaling
        run(name, "triton", leaves("cpu"), "scaler", steps=2)
    assert calls == []
    run("adamw", "reference", leaves("cpu"), "scaler", steps=1)
    assert calls == [len(SHAPES)]


def test_end_to_end_with_autocast_style_loop():
    """A model, scaler.scale(loss).backward(), scaler.step, scaler.update: same parameters as the
    unscaled loop (CPU, fp32 math; the power-of-two scale passes exactly through backward)."""
    def train(use_scaler):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = mupopt.AdamW(model.parameters(), lr=1e-2, backend="reference")
        scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=use_scaler)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return list(model.parameters())

    for a, b in zip(train(False), train(True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
