"""The drop-in contract where torch.optim users fall into holes (issue 13): copies and pickles,
step counts of other types, Shampoo resumed in bf16, Muon's edge cases, torch's distributed
checkpoint initialisation, and validation parity with torch.optim.

Every optimizer runs with the backends available on the CPU here (``reference`` and, where one is
registered for the rule, ``cpu``); the Triton variants of the Muon edge cases are in
tests/test_dropin_triton.py.
"""
from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch

import mupopt
from mupopt import backends

from models import fill_grads

SHAPES = [(4, 3), (3,), (2, 5), (5,)]
# name -> (class, hyperparameters chosen so that every part of the optimizer moves)
OPTIMIZERS = {
    "adamw": (mupopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adopt": (mupopt.ADOPT, dict(lr=1e-2, weight_decay=0.1)),
    "lamb": (mupopt.LAMB, dict(lr=1e-2, weight_decay=0.1)),
    "sophia": (mupopt.SophiaG, dict(lr=1e-2, weight_decay=0.1, rho=0.04)),
    # Matrices by Muon, vectors by the AdamW part (no width information).
    "muon": (mupopt.Muon, dict(lr=2e-2, adamw_lr=1e-2, weight_decay=0.1, ns_dtype=torch.float32)),
    "shampoo": (mupopt.Shampoo, dict(lr=1e-2, weight_decay=0.1)),
}
NAMES = list(OPTIMIZERS)


def cpu_backends(name: str) -> list[str]:
    """The backends of ``name`` that run on CPU tensors without Triton's interpreter."""
    return [b for b in ("reference", "cpu") if b in backends.names(name)]


NAME_BACKEND = [(n, b) for n in NAMES for b in cpu_backends(n)]


def make_params(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]


def groups(params):
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]


def make(name, params, backend="reference", **kw):
    cls, hp = OPTIMIZERS[name]
    return cls(groups(params), **{**hp, **kw}, backend=backend)


def step(opt, params, t):
    fill_grads(params, t)
    if isinstance(opt, mupopt.SophiaG):
        if t % 2 == 0:
            opt.update_hessian()
        opt.step(bs=64)
    else:
        opt.step()


def params_of(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def save_load(obj, weights_only=True):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def assert_same_run(a_opt, a_params, b_opt, b_params):
    """Params and every state tensor bit for bit equal."""
    for i, (p, q) in enumerate(zip(a_params, b_params)):
        assert torch.equal(p.detach(), q.detach()), f"param {i}"
        sa, sb = a_opt.state[p], b_opt.state[q]
        assert sa.keys() == sb.keys(), f"state keys of param {i}"
        for key, va in sa.items():
            vb = sb[key]
            for x, y in zip(va if isinstance(va, list) else [va], vb if isinstance(vb, list) else [vb]):
                assert x.dtype == y.dtype and torch.equal(x, y), f"state {i}[{key!r}]"


# ---------------------------------------------------------------------------------------------
# 1. Copy and pickle
# ---------------------------------------------------------------------------------------------
ROUND_TRIPS = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda opt: pickle.loads(pickle.dumps(opt)),
    "torch.save": lambda opt: save_load(opt, weights_only=False),
}


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
@pytest.mark.parametrize("name,backend", NAME_BACKEND)
def test_copy_continues_like_the_original(name, backend, how):
    """A copied optimizer (over copied params, as deepcopy and pickle make them) keeps its
    backend and every attribute of its __init__, and its next steps equal the original's."""
    params = make_params()
    opt = make(name, params, backend)
    for t in range(2):
        step(opt, params, t)
    twin = ROUND_TRIPS[how](opt)
    twin_params = params_of(twin)
    assert type(twin) is type(opt) and twin.backend == backend
    assert all(q is not p for p, q in zip(params, twin_params))
    for t in range(2, 4):
        step(opt, params, t)
        step(twin, twin_params, t)
    assert_same_run(opt, params, twin, twin_params)


def test_copy_drops_plan_caches_and_transient_attributes():
    """Attributes named "_plan..." (private caches derived from the groups) and GradScaler's
    found_inf / grad_scale are not copied; everything else set on the optimizer is."""
    params = make_params()
    opt = make("adamw", params)
    opt._plan_steps = {"stale": True}
    opt._plan = ["stale"]
    opt.found_inf = torch.zeros(())
    opt.grad_scale = torch.ones(())
    opt.custom_attribute = 3
    for how, fn in ROUND_TRIPS.items():
        twin = fn(opt)
        for attr in ("_plan_steps", "_plan", "found_inf", "grad_scale"):
            assert not hasattr(twin, attr), (how, attr)
        assert twin.custom_attribute == 3 and twin.backend == "reference", how
    assert opt._plan == ["stale"]  # the original keeps its own


def test_load_state_dict_drops_plan_caches():
    """load_state_dict replaces the groups a "_plan" cache was derived from: the cache goes."""
    params = make_params()
    opt = make("adamw", params)
    step(opt, params, 0)
    opt._plan_steps = {"stale": True}
    opt.load_state_dict(opt.state_dict())
    assert not hasattr(opt, "_plan_steps")


def test_copy_keeps_hooks_out_as_torch_does():
    """Step hooks are not state: torch's copies have none, and neither do ours (a hook closing
    over a lambda would not even pickle)."""
    params = make_params()
    opt = make("adamw", params)
    opt.register_step_post_hook(lambda *a: None)
    twin = pickle.loads(pickle.dumps(opt))
    assert len(twin._optimizer_step_post_hooks) == 0
    step(twin, params_of(twin), 0)  # the step wrapper still works after unpickling


# ---------------------------------------------------------------------------------------------
# 2. Step counts of other types
# ---------------------------------------------------------------------------------------------
STEP_TYPES = {
    "int": lambda s: int(s.item()),
    "float": lambda s: float(s.item()),
    "int64 tensor": lambda s: s.to(torch.int64),
    "float64 tensor": lambda s: s.to(torch.float64),
}


@pytest.mark.parametrize("kind", list(STEP_TYPES))
@pytest.mark.parametrize("name,backend", NAME_BACKEND)
def test_step_count_of_any_type_loads(name, backend, kind):
    """A state_dict whose "step" is a Python int or float (torch <= 1.11), or an int64 / float64
    tensor, loads as a float32 CPU tensor and the run continues exactly as an uninterrupted one."""
    a_params = make_params()
    a = make(name, a_params, backend)
    for t in range(2):
        step(a, a_params, t)
    sd = save_load(a.state_dict())
    converted = 0
    for st in sd["state"].values():
        if "step" in st:
            st["step"] = STEP_TYPES[kind](st["step"])
            converted += 1
    assert converted > 0  # every optimizer here has a step count (Muon: its AdamW part)
    b_params = [p.detach().clone().requires_grad_() for p in a_params]
    b = make(name, b_params, backend)
    b.load_state_dict(sd)
    for st in b.state.values():
        if "step" in st:
            assert isinstance(st["step"], torch.Tensor)
            assert st["step"].dtype == torch.float32 and st["step"].device.type == "cpu"
    for t in range(2, 4):
        step(a, a_params, t)
        step(b, b_params, t)
    assert_same_run(a, a_params, b, b_params)


# ---------------------------------------------------------------------------------------------
# 3. Shampoo in bf16 resumes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference"])
def test_shampoo_bf16_resume_equals_uninterrupted_run(backend):
    """torch's load_state_dict would cast L, R and their roots to bf16 (the param's dtype);
    Shampoo keeps them float32, so a resumed bf16 run is the uninterrupted one, bit for bit."""
    a_params = make_params(torch.bfloat16)
    a = make("shampoo", a_params, backend)
    for t in range(2):
        step(a, a_params, t)
    b_params = [p.detach().clone().requires_grad_() for p in a_params]
    b = make("shampoo", b_params, backend)
    b.load_state_dict(save_load(a.state_dict()))
    for q in b_params:
        st = b.state[q]
        for key in ("left", "right", "left_root", "right_root"):
            assert all(x.dtype == torch.float32 for x in st.get(key, [])), key
        # Param-shaped buffers follow the param's dtype, as torch casts them.
        assert st["momentum_buffer"].dtype == torch.bfloat16
    for t in range(2, 5):
        step(a, a_params, t)
        step(b, b_params, t)
    assert_same_run(a, a_params, b, b_params)


def test_shampoo_load_does_not_touch_the_callers_state_dict():
    params = make_params(torch.bfloat16)
    opt = make("shampoo", params)
    step(opt, params, 0)
    sd = save_load(opt.state_dict())
    before = {k: dict(v) for k, v in sd["state"].items()}
    opt.load_state_dict(sd)
    for k, v in sd["state"].items():
        assert v.keys() == before[k].keys()
        assert all(v[key] is before[k][key] for key in v)
