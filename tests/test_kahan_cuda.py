"""kahan_summation on the "cuda" backend (the kernel's compensated param format:
csrc/include/mupopt/storage.h load_param / store_param, multi_tensor.h load4_param /
store4_param), mirroring tests/test_kahan_cpu.py. Marked gpu: written without a GPU (the kernels
are compiled by tests/test_csrc_compiles.py; these tests have not run yet), they run in
benchmarks/gpu_check.sh's test stage (``pytest -m gpu``) and skip cleanly without CUDA.

Exact where the kernel's arithmetic is its own: a bf16 / fp16 step with the option equals the
same backend's step of a float32 param set to p + c (with bf16 states, state_bits=16, the states
a bf16 param keeps), rounded to nearest into p and the remainder into c. Against the reference
backend on the same GPU to the standard of tests/test_kahan_triton.py (the cuda kernel's float32
math is not torch's CUDA kernels' bit for bit, tests/test_contract.py: rtol 1e-6; the
compensation shows the float32 value's low bits): p + c within 4 float32 ulps plus one spacing
of c per step, and nearly every param and compensation bit for bit."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

from mupopt import storage
from mupopt.optim._base import BackendFallbackWarning
from test_lean_states import _fed_steps, _make

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = ("adamw", "adopt", "lamb", "sophia")
KEY = storage.COMPENSATION
DEV = "cuda"
# 1 element; 257 (no 4-wide access at its end); 40000 (three CUDA chunks of 16384, the last
# partial); 2-D; a float32 param in the same group (no compensation).
SHAPES = [(1,), (257,), (40000,), (33, 17)]
STEPS = 3


def _params(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device=DEV, dtype=dtype)) for s in SHAPES]
    return ps + [torch.nn.Parameter((torch.randn(50, generator=gen) * 0.1).to(DEV))]


def _grads(params, gen, dtype=None):
    return [(torch.randn(p.shape, generator=gen) * (1 + 3 * torch.rand(p.shape, generator=gen)))
            .to(device=DEV, dtype=dtype or p.dtype) for p in params]


def _run(name, backend, dtype=torch.bfloat16, bits=32, steps=STEPS, params=None, opt=None, seed=7, amp=False, **kw):
    ps = params if params is not None else _params(dtype)
    if opt is None:
        opt = _make(name, ps, bits, backend, kahan_summation=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    _fed_steps(opt, ps, lambda t: _grads(ps, gen), steps, amp)
    return ps, opt


def _bits(t):
    t = t.detach()
    return t if t.dtype == torch.uint8 else t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _on_cuda(opt):
    for step in opt.selected_backends:
        for used in step.values():
            assert used == "cuda", opt.selected_backends


@pytest.mark.parametrize("name", NAMES)
def test_step_is_its_float32_step_then_split(name):
    """Bit for bit: p = x rounded, c = x - p rounded, x the cuda step of a float32 param set to
    p + c before each step (bf16 states on both sides)."""
    ps = _params(torch.bfloat16)[:-1]
    qs = [torch.nn.Parameter(p.detach().float().clone()) for p in ps]
    opt = _make(name, ps, 32, "cuda", kahan_summation=True)
    ref = _make(name, qs, 16, "cuda")
    gen = torch.Generator().manual_seed(1)
    for t in range(STEPS):
        grads = _grads(ps, gen)
        for p, q, g in zip(ps, qs, grads):
            p.grad, q.grad = g, g.float()
        if name == "sophia":
            opt.step(bs=64), ref.step(bs=64)
            if t % 2 == 0:
                opt.update_hessian(), ref.update_hessian()
        else:
            opt.step(), ref.step()
        _on_cuda(opt)
        for p, q in zip(ps, qs):
            c = opt.state[p][KEY]
            assert torch.equal(_bits(p), _bits(q.detach().bfloat16()))
            assert torch.equal(_bits(c), _bits((q.detach() - p.detach().float()).bfloat16()))
            with torch.no_grad():
                q.copy_(p.float() + c.float())


@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_close_to_reference(name, dtype, bits):
    """Against the reference backend on the same GPU (module docstring). States of formats 32
    and 16: p + c per element within 4 float32 ulps plus one spacing of c per step, at least
    99.9% of params and 97% of compensations bit for bit (tests/test_kahan_triton.py measured
    1 in 9096 compensations off for its kernels). Format 8: a value at the edge of two codes may
    take the other one (tests/test_lean_states_cuda.py: at most 1% of codes), which moves that
    element's update by far more than round-off, so p + c to that file's param tolerance."""
    (pa, oa), (pb, ob) = _run(name, "reference", dtype, bits), _run(name, "cuda", dtype, bits)
    _on_cuda(ob)
    mant, tiny = (8, 0.0) if dtype == torch.bfloat16 else (11, 2.0**-24)
    for k, (a, b) in enumerate(zip(pa, pb)):
        sa, sb = oa.state[a], ob.state[b]
        assert set(sa) == set(sb)
        if a.dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            continue
        ca, cb = sa[KEY], sb[KEY]
        xa, xb = a.detach().double() + ca.double(), b.detach().double() + cb.double()
        if bits == 8:
            torch.testing.assert_close(xa, xb, rtol=1.6e-2, atol=1e-3, msg=lambda m: f"param {k}: {m}")
            continue
        ulp32 = torch.ldexp(torch.ones_like(xa), torch.frexp(xa.abs().float())[1] - 24).double()
        spacing = torch.ldexp(torch.ones_like(xa), torch.frexp(torch.maximum(ca.abs(), cb.abs()).float())[1] - mant)
        bound = 4 * ulp32 + STEPS * spacing.double().clamp(min=tiny)
        assert bool(((xa - xb).abs() <= bound).all()), f"param {k}"
        assert int((_bits(a) != _bits(b)).sum()) <= a.numel() // 1000, f"param {k}"
        assert int((_bits(ca) != _bits(cb)).sum()) <= max(1, 3 * a.numel() // 100), f"param {k}"


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "amp"])
def test_adamw_options(option):
    """amsgrad, maximize and GradScaler (scaled gradients, second step skipped): the cuda step
    runs with them (no fallback) and a skipped step writes nothing."""
    kw = {"amsgrad": dict(amsgrad=True), "maximize": dict(maximize=True), "amp": {}}[option]
    ps, opt = _run("adamw", "cuda", steps=4, amp=option == "amp", **kw)
    _on_cuda(opt)
    assert float(opt.state[ps[0]]["step"]) == (3.0 if option == "amp" else 4.0)
    assert any(bool(opt.state[p][KEY].ne(0).any()) for p in ps[:-1])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_bit_exact(name):
    ps, opt = _run(name, "cuda")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [p.detach().clone() for p in ps]
    _run(name, "cuda", params=ps, opt=opt, seed=11)
    qs = [torch.nn.Parameter(s.clone()) for s in saved]
    opt2 = _make(name, qs, 32, "cuda")
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _run(name, "cuda", params=qs, opt=opt2, seed=11)
    for p, q in zip(ps, qs):
        assert torch.equal(_bits(p), _bits(q))
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(_bits(v), _bits(opt2.state[q][key])), key


@pytest.mark.parametrize("name", NAMES)
def test_auto_takes_the_cuda_backend_without_a_warning(name):
    ps = _params(torch.bfloat16)
    opt = _make(name, ps, 32, "auto", kahan_summation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        _run(name, "auto", steps=2, params=ps, opt=opt)
    _on_cuda(opt)
    assert all(KEY in opt.state[p] for p in ps[:-1]) and KEY not in opt.state[ps[-1]]
