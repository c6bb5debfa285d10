"""state_dict, param groups and the rest of the torch.optim.Optimizer surface.

Round trips through torch.save/torch.load (what a checkpoint does), interchange with the named
reference implementations, muP records in the state_dict, add_param_group, named parameters,
zero_grad, closures and step hooks.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import mupopt
from mupopt.mup import WidthInfo

from models import MLP, fill_grads, same_state_value, tensor_state
from optimizer_table import CASES

NAMES = list(CASES)
BASE, WIDTH = 32, 128
# docs/mup.md, Adam-like rules on MLP(128) over MLP(32); LAMB (exponent 0): 1 everywhere.
ADAM_LIKE_MULT = {"inp.weight": 1.0, "inp.bias": 1.0, "hidden.weight": 0.25, "hidden.bias": 1.0, "readout.weight": 0.25, "readout.bias": 1.0}


def expected_lr_mult(name, param_name):
    return 1.0 if name == "lamb" else ADAM_LIKE_MULT[param_name]


def mup_mlp(seed=0):
    """MLP(128) with width info from a meta MLP(32): multipliers other than 1."""
    torch.manual_seed(seed)
    model = MLP(WIDTH)
    with torch.device("meta"):
        base = MLP(BASE)
    mupopt.set_base_shapes(model, base)
    return model


def plain_clone(params):
    """Leaf copies without width info (as a fresh process would build them)."""
    return [p.detach().clone().requires_grad_() for p in params]


def groups(params, lr):
    return [{"params": params[:3]}, {"params": params[3:], "lr": lr * 0.5, "weight_decay": 0.0}]


def run(opt, params, steps, *, sophia_like=False, bs=64):
    """Steps with deterministic gradients; Hessian updates on even steps for Sophia."""
    for t in steps:
        fill_grads(params, t)
        if sophia_like and t % 2 == 0:
            opt.update_hessian()
        opt.step(**({"bs": bs} if sophia_like else {}))


def save_load(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def assert_same(a_params, b_params, exact=True):
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        if exact:
            assert torch.equal(a.detach(), b.detach()), f"param {i}"
        else:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=f"param {i}")


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_continues_bitwise(name):
    """Save after 3 steps, load into a fresh instance over cloned params (no width info), both
    continue 3 steps: bitwise equal (multipliers other than 1 included)."""
    case = CASES[name]
    sophia = name == "sophia"
    params = list(mup_mlp().parameters())
    opt = case.cls(groups(params, case.kwargs["lr"]), **case.kwargs)
    run(opt, params, range(3), sophia_like=sophia)
    clones = plain_clone(params)
    fresh = case.cls(groups(clones, case.kwargs["lr"]), **case.kwargs)
    fresh.load_state_dict(save_load(opt.state_dict()))
    run(opt, params, range(3, 6), sophia_like=sophia)
    run(fresh, clones, range(3, 6), sophia_like=sophia)
    assert_same(params, clones)
    for p, q in zip(params, clones):
        for key, value in opt.state[p].items():
            assert same_state_value(value, fresh.state[q][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_mup_records_survive_round_trip(name):
    """Loaded into an optimizer built on a model without width info, the saved muP records win:
    the multipliers are the saved ones (the rules' values), and the continuation matches."""
    case = CASES[name]
    sophia = name == "sophia"
    model = mup_mlp()
    opt = case.cls(model.named_parameters(), **case.kwargs)
    run(opt, list(model.parameters()), range(2), sophia_like=sophia)

    plain = MLP(WIDTH)
    plain.load_state_dict(model.state_dict())
    assert all(mupopt.width_info(p) is None for p in plain.parameters())
    fresh = case.cls(plain.named_parameters(), **case.kwargs)
    assert all(m.lr == 1.0 for m in fresh.group_multipliers(fresh.param_groups[0]))
    fresh.load_state_dict(save_load(opt.state_dict()))
    (group,) = fresh.param_groups
    assert fresh.width_infos(group) == [mupopt.width_info(p) for p in model.parameters()]
    for pname, m in zip(group["param_names"], fresh.group_multipliers(group)):
        assert m.lr == pytest.approx(expected_lr_mult(name, pname)), pname
    run(opt, list(model.parameters()), range(2, 5), sophia_like=sophia)
    run(fresh, list(plain.parameters()), range(2, 5), sophia_like=sophia)
    assert_same(model.parameters(), plain.parameters())


def test_loading_torch_state_keeps_current_mup_records():
    """A torch.optim.AdamW state_dict has no muP records: loading it into a mupopt.AdamW over a
    muP model keeps that model's multipliers."""
    model = mup_mlp()
    torch_opt = torch.optim.AdamW(plain_clone(model.parameters()), lr=1e-2)
    run(torch_opt, torch_opt.param_groups[0]["params"], range(2))
    ours = mupopt.AdamW(model.named_parameters(), lr=1e-2)
    ours.load_state_dict(save_load(torch_opt.state_dict()))
    (group,) = ours.param_groups
    for pname, m in zip(group["param_names"], ours.group_multipliers(group)):
        assert m.lr == pytest.approx(ADAM_LIKE_MULT[pname]), pname


# ---------------------------------------------------------------------------------------------
# Interchange with the named references
# ---------------------------------------------------------------------------------------------
def _interchange(ours_factory, ref_factory, direction, sophia_like=False):
    torch.manual_seed(0)
    start = list(MLP(16).parameters())
    a_params, b_params = plain_clone(start), plain_clone(start)
    first, second = (ours_factory, ref_factory) if direction == "ours->ref" else (ref_factory, ours_factory)
    a = first(groups(a_params, 1e-2))
    run(a, a_params, range(3), sophia_like=sophia_like)
    with torch.no_grad():
        for p, q in zip(a_params, b_params):
            q.copy_(p)
    b = second(groups(b_params, 1e-2))
    b.load_state_dict(save_load(a.state_dict()))
    run(a, a_params, range(3, 6), sophia_like=sophia_like)
    run(b, b_params, range(3, 6), sophia_like=sophia_like)
    assert_same(a_params, b_params, exact=False)
    for p, q in zip(a_params, b_params):
        for key, value in tensor_state(a.state[p]).items():
            torch.testing.assert_close(b.state[q][key].reshape(value.shape), value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("direction", ["ours->ref", "ref->ours"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_state_interchanges_with_torch(direction, amsgrad):
    """mupopt.AdamW and torch.optim.AdamW load each other's state_dict and continue alike."""
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    _interchange(lambda g: mupopt.AdamW(g, **kw), lambda g: torch.optim.AdamW(g, **kw), direction)


def _adopt_ref(g):
    adopt = pytest.importorskip("adopt")
    return adopt.ADOPT(g, lr=1e-2, weight_decay=0.1, decouple=True)


@pytest.mark.parametrize("direction", ["ours->ref", "ref->ours"])
def test_adopt_state_interchanges_with_torch_adopt(direction):
    """mupopt.ADOPT and adopt.ADOPT(decouple=True) load each other's state_dict and continue alike."""
    _interchange(lambda g: mupopt.ADOPT(g, lr=1e-2, weight_decay=0.1), _adopt_ref, direction)


def test_adopt_state_layout_matches_torch_adopt():
    """Narrows the interchange: with the group key adopt.ADOPT needs ('decouple') added by hand,
    mupopt.ADOPT's state tensors and step counts continue exactly in adopt.ADOPT."""

    class Patched:
        def __init__(self, opt):
            self.opt = opt

        def __getattr__(self, k):
            return getattr(self.opt, k)

        def state_dict(self):
            sd = self.opt.state_dict()
            return {**sd, "param_groups": [{**g, "decouple": True} for g in sd["param_groups"]]}

    _interchange(lambda g: Patched(mupopt.ADOPT(g, lr=1e-2, weight_decay=0.1)), _adopt_ref, "ours->ref")


def _sophia_ref(g):
    sophia_opt = pytest.importorskip("sophia_opt")
    return sophia_opt.SophiaG(g, lr=1e-2, weight_decay=0.1, rho=0.04)


@pytest.mark.parametrize("direction", ["ours->ref", "ref->ours"])
def test_sophia_state_interchanges_with_sophia_opt(direction):
    """mupopt.SophiaG and sophia_opt.SophiaG load each other's state_dict and continue alike."""
    _interchange(lambda g: mupopt.SophiaG(g, lr=1e-2, weight_decay=0.1, rho=0.04), _sophia_ref, direction, sophia_like=True)


# ---------------------------------------------------------------------------------------------
# Param groups, named parameters
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_gets_width_info(name):
    """add_param_group after construction records width info and steps like an optimizer built
    with both groups at once."""
    case = CASES[name]
    sophia = name == "sophia"
    model = mup_mlp()
    names, params = zip(*model.named_parameters())
    params = list(params)
    opt = case.cls(params[:2], **case.kwargs)
    opt.add_param_group({"params": params[2:], "lr": case.kwargs["lr"] * 0.5})
    group = opt.param_groups[1]
    assert opt.width_infos(group) == [mupopt.width_info(p) for p in params[2:]]
    for pname, m in zip(names[2:], opt.group_multipliers(group)):
        assert m.lr == pytest.approx(expected_lr_mult(name, pname)), pname

    clones = plain_clone(params)
    for c, p in zip(clones, params):
        setattr(c, mupopt.mup.WIDTH_ATTR, mupopt.width_info(p))
    both = case.cls([{"params": clones[:2]}, {"params": clones[2:], "lr": case.kwargs["lr"] * 0.5}], **case.kwargs)
    run(opt, params, range(3), sophia_like=sophia)
    run(both, clones, range(3), sophia_like=sophia)
    assert_same(params, clones)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_refuses_bad_groups(name):
    """add_param_group: a param without width info next to muP params (MupError) or a bad lr
    (ValueError) is refused and leaves param_groups as they were."""
    case = CASES[name]
    model = mup_mlp()
    params = list(model.parameters())
    opt = case.cls(params[:2], **case.kwargs)
    with pytest.raises(mupopt.MupError):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    with pytest.raises(ValueError, match="Invalid learning rate: -1.0"):
        opt.add_param_group({"params": params[2:], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:]})  # the params were not left registered
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_accepted(name):
    """model.named_parameters() works as params: names recorded, same steps as unnamed."""
    case = CASES[name]
    sophia = name == "sophia"
    model = mup_mlp()
    named = case.cls(model.named_parameters(), **case.kwargs)
    assert named.param_groups[0]["param_names"] == [n for n, _ in model.named_parameters()]
    clones = plain_clone(model.parameters())
    for c, p in zip(clones, model.parameters()):
        setattr(c, mupopt.mup.WIDTH_ATTR, mupopt.width_info(p))
    unnamed = case.cls(clones, **case.kwargs)
    run(named, list(model.parameters()), range(3), sophia_like=sophia)
    run(unnamed, clones, range(3), sophia_like=sophia)
    assert_same(model.parameters(), clones)
    assert "hidden.weight" in named.mup_summary()
    assert named.state_dict()["param_groups"][0]["param_names"][2] == "hidden.weight"


# ---------------------------------------------------------------------------------------------
# zero_grad, closure, hooks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad(name):
    """zero_grad() sets grads to None; zero_grad(set_to_none=False) zeroes them in place."""
    case = CASES[name]
    params = list(MLP(16).parameters())
    opt = case.cls(params, **case.kwargs)
    fill_grads(params, 0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in params)
    fill_grads(params, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_step_with_closure_returns_loss(name):
    """step(closure) evaluates the closure with grad enabled, steps on its gradients and returns
    its loss; the result equals a step after a manual backward."""
    case = CASES[name]
    torch.manual_seed(0)
    model = MLP(16)
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 10), torch.randn(8, 3)
    opt = case.cls(model.parameters(), **case.kwargs)
    twin_opt = case.cls(twin.parameters(), **case.kwargs)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure, **case.step_kwargs)
    assert isinstance(loss, torch.Tensor)
    expected = F.mse_loss(twin(x), y)
    torch.testing.assert_close(loss, expected.detach())
    expected.backward()
    twin_opt.step(**case.step_kwargs)
    assert_same(model.parameters(), twin.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), MLP(16).parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_step_hooks_are_called(name):
    """register_step_pre_hook / register_step_post_hook: called once per step, before and after
    the parameters change; removing the handles stops the calls."""
    case = CASES[name]
    params = list(MLP(16).parameters())
    opt = case.cls(params, **case.kwargs)
    fill_grads(params, 0)
    opt.step(**case.step_kwargs)  # ADOPT's first step only initialises v
    calls = []

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append(("pre", params[0].detach().clone()))

    def post(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append(("post", params[0].detach().clone()))

    h_pre, h_post = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    before = params[0].detach().clone()
    fill_grads(params, 1)
    opt.step(**case.step_kwargs)
    assert [c[0] for c in calls] == ["pre", "post"]
    assert torch.equal(calls[0][1], before)
    assert torch.equal(calls[1][1], params[0].detach())
    assert not torch.equal(calls[1][1], before)
    h_pre.remove(), h_post.remove()
    opt.step(**case.step_kwargs)
    assert len(calls) == 2
