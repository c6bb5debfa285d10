"""The drop-in cases of tests/test_dropin.py that concern the "triton" backend of Muon and
Shampoo: empty matrices, bf16 Shampoo resumed from a state_dict, torch's distributed-checkpoint
state initialisation (lr=0 step). On a machine without CUDA the kernels run in Triton's
interpreter on CPU tensors (set up as in tests/test_triton_matrix.py); sizes stay tiny.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton_mode  # noqa: E402

with triton_mode.defining_kernels():
    import mupopt
    from mupopt.kernels import triton as mt
    from mupopt.kernels.triton import _common
    from mupopt.kernels.triton import muon as tmuon
    from mupopt.kernels.triton import newton_schulz as tns
    from mupopt.kernels.triton import shampoo as tshampoo

    tns.build()
    tmuon.build()
    tshampoo.build()

from models import fill_grads  # noqa: E402
from test_dropin import _init_optim_state, assert_same_run, save_load  # noqa: E402

INTERPRET = _common.INTERPRET
DEVICES = triton_mode.devices(INTERPRET)


@pytest.fixture(autouse=True, scope="module")
def _registered():
    mt.register()
    tmuon.register()
    tshampoo.register()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    triton_mode.match_environment(monkeypatch, INTERPRET)


def leaf(shape, seed, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 0), (0, 4)])
def test_muon_triton_empty_matrix(device, shape):
    """An empty matrix beside a normal one: no ZeroDivisionError in the shape factor or reshape
    error in matrix_view; the other matrix steps exactly as without it."""
    empty = torch.zeros(shape, device=device, requires_grad=True)
    other = leaf((16, 24), 0, device)
    lone = other.detach().clone().requires_grad_()
    with_empty = mupopt.Muon([empty, other], lr=2e-2, backend="triton")
    alone = mupopt.Muon([lone], lr=2e-2, backend="triton")
    for t in range(2):
        empty.grad = torch.zeros(shape, device=device)
        fill_grads([other], t)
        fill_grads([lone], t)
        other.grad, lone.grad = other.grad.to(device), lone.grad.to(device)
        with_empty.step()
        alone.step()
    assert torch.equal(other.detach(), lone.detach())
    assert with_empty.state[empty]["momentum_buffer"].shape == shape


def _shampoo_params(device, dtype):
    return [leaf((16, 24), 0, device, dtype), leaf((7,), 1, device, dtype)]


def _step(opt, params, t):
    fill_grads(params, t)
    for p in params:
        p.grad = p.grad.to(p.device)
    opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_shampoo_triton_bf16_resume_equals_uninterrupted_run(device):
    """bf16 params: L, R and roots stay float32 through load_state_dict (tests/test_dropin.py
    checks the reference backend), so the triton backend resumes bit for bit."""
    a_params = _shampoo_params(device, torch.bfloat16)
    a = mupopt.Shampoo(a_params, lr=1e-2, backend="triton")
    for t in range(2):
        _step(a, a_params, t)
    b_params = [p.detach().clone().requires_grad_() for p in a_params]
    b = mupopt.Shampoo(b_params, lr=1e-2, backend="triton")
    b.load_state_dict(save_load(a.state_dict()))
    for t in range(2, 4):
        _step(a, a_params, t)
        _step(b, b_params, t)
    assert_same_run(a, a_params, b, b_params)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["muon", "shampoo"])
def test_triton_distributed_checkpoint_state_init_moves_nothing(device, name):
    """torch's DCP state initialisation (zero grads, lr=0, one step) moves no parameter."""
    params = [leaf((16, 24), 0, device), leaf((7,), 1, device)]
    cls = mupopt.Muon if name == "muon" else mupopt.Shampoo
    opt = cls(params, lr=2e-2, weight_decay=0.1, backend="triton")
    before = [p.detach().clone() for p in params]
    _init_optim_state(opt)
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
    assert all(len(opt.state[p]) > 0 for p in params)
