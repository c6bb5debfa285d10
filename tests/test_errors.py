"""Bad input gets a clear error and leaves params and optimizer state exactly as they were,
for every optimizer of tests/optimizer_table.CASES.

Each optimizer runs on two param groups and takes two good steps first, so that state exists;
the bad input then goes into group 0 or group 1 (group 1: group 0 must not have been stepped).
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch

import mupopt

from models import same_state_value
from optimizer_table import CASES

NAMES = list(CASES)
SHAPES = [(4, 3), (5,), (2, 6), (3,)]
NAN, INF = math.nan, math.inf


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def groups(case, params):
    return [{"params": params[:2]}, {"params": params[2:], "lr": case.kwargs["lr"] * 0.5}]


def set_grads(params, t):
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def good_step(case, opt, params, t):
    set_grads(params, t)
    if case.name == "sophia":
        opt.update_hessian()
    opt.step(**case.step_kwargs)


def started(case, **kwargs):
    """An optimizer of ``case`` over two groups, after two good steps, and its params."""
    params = make_params()
    opt = case.cls(groups(case, params), **{**case.kwargs, **kwargs})
    for t in range(2):
        good_step(case, opt, params, t)
    set_grads(params, 2)
    return opt, params


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


def assert_unchanged(snap, opt, params):
    saved_params, saved_state = snap
    for i, (p, q) in enumerate(zip(params, saved_params)):
        assert torch.equal(p.detach(), q), f"param {i} changed"
    state = opt.state_dict()["state"]
    assert state.keys() == saved_state.keys()
    for k in state:
        assert state[k].keys() == saved_state[k].keys()
        for key, value in state[k].items():
            assert same_state_value(value, saved_state[k][key]), f"state {k}[{key!r}] changed"


def assert_recovers(case, opt, params, snap):
    """After the error is fixed, the optimizer continues exactly like one that never saw it."""
    twin_params = [q.clone().requires_grad_() for q in snap[0]]
    twin = case.cls(groups(case, twin_params), **case.kwargs)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in (3, 4):
        good_step(case, opt, params, t)
        good_step(case, twin, twin_params, t)
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


# ---------------------------------------------------------------------------------------------
# Hyperparameters at construction
# ---------------------------------------------------------------------------------------------
def bad_hparams(name):
    """(key, bad value, torch-style message) for the optimizer's hyperparameters."""
    rows = []
    for v in (-1.0, NAN, INF):
        rows.append(("lr", v, f"Invalid learning rate: {v}"))
        rows.append(("weight_decay", v, f"Invalid weight_decay value: {v}"))
        if name == "sophia":
            rows.append(("rho", v, f"Invalid rho parameter: {v}"))
        else:
            rows.append(("eps", v, f"Invalid epsilon value: {v}"))
    for betas, index, value in [((-0.1, 0.99), 0, -0.1), ((0.9, 1.0), 1, 1.0), ((NAN, 0.99), 0, NAN), ((0.9, INF), 1, INF)]:
        rows.append(("betas", betas, f"Invalid beta parameter at index {index}: {value}"))
    return rows


CONSTRUCTION = [(n, k, v, msg) for n in NAMES for k, v, msg in bad_hparams(n)]


@pytest.mark.parametrize("name,key,value,message", CONSTRUCTION)
def test_bad_hyperparameter_at_construction(name, key, value, message):
    """Negative or non-finite lr / eps / rho / betas / weight_decay: torch's ValueError message."""
    case = CASES[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        case.cls(make_params(), **{**case.kwargs, key: value})


@pytest.mark.parametrize("name,key,value,message", CONSTRUCTION)
@pytest.mark.parametrize("bad_group", [0, 1])
def test_bad_hyperparameter_edited_into_group(name, key, value, message, bad_group):
    """A bad value edited into a param group after steps: step raises, params and state are
    untouched (also group 0's when group 1 is the bad one), and fixing it resumes cleanly."""
    case = CASES[name]
    opt, params = started(case)
    snap = snapshot(opt, params)
    good = opt.param_groups[bad_group][key]
    opt.param_groups[bad_group][key] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.step(**case.step_kwargs)
    assert_unchanged(snap, opt, params)
    opt.param_groups[bad_group][key] = good
    assert_recovers(case, opt, params, snap)


NO_SCALE_EPS = {"sophia": (mupopt.SophiaG, {"bs": 64}), "muon": (mupopt.Muon, {}), "shampoo": (mupopt.Shampoo, {})}


@pytest.mark.parametrize("name", NO_SCALE_EPS)
def test_scale_eps_where_it_would_do_nothing(name):
    """SophiaG, Muon and Shampoo take no scale_eps (docs/mup.md, Epsilon); their multipliers
    never read it. A group asking for it is refused, at construction and when edited in after
    a step (nothing changed), instead of being accepted and ignored."""
    cls, step_kwargs = NO_SCALE_EPS[name]
    with pytest.raises(ValueError, match="has no scale_eps"):
        cls([{"params": make_params(), "scale_eps": True}], lr=1e-2)
    params = make_params()
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    set_grads(params, 0)
    opt.step(**step_kwargs)
    set_grads(params, 1)
    snap = snapshot(opt, params)
    opt.param_groups[1]["scale_eps"] = True
    with pytest.raises(ValueError, match="has no scale_eps"):
        opt.step(**step_kwargs)
    assert_unchanged(snap, opt, params)
    opt.param_groups[1]["scale_eps"] = False
    opt.step(**step_kwargs)
    assert not torch.equal(params[0].detach(), snap[0][0])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad_group", [0, 1])
def test_bad_wd_mode_edited_into_group(name, bad_group):
    """A wd_mode typo edited into a group: ValueError naming wd_mode, nothing changed."""
    case = CASES[name]
    opt, params = started(case)
    snap = snapshot(opt, params)
    opt.param_groups[bad_group]["wd_mode"] = "indepndent"
    with pytest.raises(ValueError, match="wd_mode"):
        opt.step(**case.step_kwargs)
    assert_unchanged(snap, opt, params)


@pytest.mark.parametrize("name", NAMES)
def test_wd_mode_typo_at_construction(name):
    """A wd_mode typo is a ValueError naming wd_mode (LAMB has no wd_mode: any value in a group
    is refused, and the keyword does not exist)."""
    case = CASES[name]
    if name == "lamb":
        with pytest.raises(TypeError):
            case.cls(make_params(), **case.kwargs, wd_mode="independent")
        with pytest.raises(ValueError, match="wd_mode"):
            case.cls([{"params": make_params(), "wd_mode": "coupled"}], **case.kwargs)
        return
    with pytest.raises(ValueError, match="Invalid wd_mode: 'indepndent'"):
        case.cls(make_params(), **case.kwargs, wd_mode="indepndent")


@pytest.mark.parametrize("name", NAMES)
def test_unknown_backend_name(name):
    """An unknown backend name is a ValueError listing what is available."""
    case = CASES[name]
    with pytest.raises(ValueError, match=r"'no_such_backend'.*available.*'auto'"):
        case.cls(make_params(), **case.kwargs, backend="no_such_backend")


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("env", ["no_such_backend", "cpu"])
def test_environment_backend_named_in_error(name, env, monkeypatch):
    """A backend set by MUPOPT_BACKEND (no backend= passed) that does not exist, or does not exist
    for this optimizer (Muon has no cpu backend): the error says the environment variable chose
    it, so a user who set it in a shell sees where a backend they did not pass comes from.
    Nothing is changed."""
    ps = make_params()
    opt = {"adamw": mupopt.AdamW, "muon": mupopt.Muon}[name](ps, lr=1e-2)
    for p in ps:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in ps]
    monkeypatch.setenv(mupopt.backends.ENV_VAR, env)
    if env == "cpu" and name == "adamw":  # AdamW has a cpu backend: it steps
        opt.step()
        assert opt.selected_backends == [{"adamw": "cpu"}]
        return
    with pytest.raises(ValueError, match=f"'{env}' is not available.*environment variable MUPOPT_BACKEND='{env}'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps)) and not opt.state


# ---------------------------------------------------------------------------------------------
# Bad parameters and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad_param", [0, 1, 3])
def test_sparse_gradient(name, bad_param):
    """A sparse gradient: RuntimeError mentioning sparse; nothing changed (the bad tensor may be
    the first, the last of group 0, or in group 1)."""
    case = CASES[name]
    opt, params = started(case)
    snap = snapshot(opt, params)
    params[bad_param].grad = params[bad_param].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(**case.step_kwargs)
    assert_unchanged(snap, opt, params)


@pytest.mark.parametrize("name", ["sophia"])
def test_sparse_gradient_in_hessian_update(name):
    """SophiaG.update_hessian refuses a sparse gradient the same way, touching nothing."""
    case = CASES[name]
    opt, params = started(case)
    snap = snapshot(opt, params)
    params[3].grad = params[3].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.update_hessian()
    assert_unchanged(snap, opt, params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad_param", [1, 2])
def test_gradient_of_wrong_shape(name, bad_param):
    """A gradient whose shape differs from its parameter's (possible through .data): a
    RuntimeError naming both shapes (or, from a C++ backend, which checks sizes, both sizes),
    nothing changed."""
    case = CASES[name]
    opt, params = started(case)
    snap = snapshot(opt, params)
    params[bad_param].grad.data = torch.ones(7, 7)
    shape = SHAPES[bad_param]
    sizes = rf"49 elements but params\[\d+\] has {math.prod(shape)}\b"
    with pytest.raises(RuntimeError, match=r"\(7, 7\).*" + re.escape(str(tuple(shape))) + "|" + sizes):
        opt.step(**case.step_kwargs)
    assert_unchanged(snap, opt, params)


# ---------------------------------------------------------------------------------------------
# SophiaG's batch size
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, -64, NAN, INF, "64", None])
def test_sophia_bad_bs(bs):
    """SophiaG.step(bs=...) needs a positive finite number: ValueError naming bs, nothing changed."""
    case = CASES["sophia"]
    opt, params = started(case)
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="Invalid bs"):
        opt.step(bs=bs)
    assert_unchanged(snap, opt, params)
    assert_recovers(case, opt, params, snap)
