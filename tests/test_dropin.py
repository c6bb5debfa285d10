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

from models import MLP, fill_grads, tensor_state

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
        for key, va in tensor_state(sa).items():
            vb = sb[key]
            for x, y in zip(va if isinstance(va, list) else [va], vb if isinstance(vb, list) else [vb]):
                assert x.dtype == y.dtype and torch.equal(x, y), f"state {i}[{key!r}]"
        assert sa.get("mup") == sb.get("mup"), f"width record of param {i}"


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
    """Attributes named "_plan..." (private caches derived from the groups), GradScaler's
    found_inf / grad_scale and anything else set on the optimizer after construction are not
    copied (torch copies none of them either); what __init__ set is."""
    params = make_params()
    opt = make("adamw", params)
    step(opt, params, 0)  # the step plans exist (MupOptimizer._plan_cache)
    opt._plan_cache_extra = {"stale": True}
    opt.found_inf = torch.zeros(())
    opt.grad_scale = torch.ones(())
    plan_attrs = [k for k in opt.__dict__ if k.startswith("_plan")]
    assert len(plan_attrs) >= 1
    for how, fn in ROUND_TRIPS.items():
        twin = fn(opt)
        for attr in (*plan_attrs, "found_inf", "grad_scale"):
            assert attr not in twin.__dict__, (how, attr)
        assert twin.backend == "reference", how
        step(twin, params_of(twin), 1)  # plans are rebuilt
    assert opt._plan_cache_extra == {"stale": True}  # the original keeps its own


@pytest.mark.parametrize("name", NAMES)
def test_every_init_attribute_is_pickled(name):
    """Each attribute a mupopt __init__ sets, beyond torch.optim.Optimizer's own (which its
    __setstate__ recreates or does without), is in MupOptimizer._PICKLED: a new attribute that
    is not would be lost by deepcopy / pickle and fail after the copy."""
    torch_own = set(torch.optim.SGD([torch.zeros(1, requires_grad=True)]).__dict__)
    opt = make(name, make_params())
    extra = {k for k in opt.__dict__ if k not in torch_own and not k.startswith("_plan")}
    assert extra <= set(type(opt)._PICKLED), sorted(extra - set(type(opt)._PICKLED))
    twin = pickle.loads(pickle.dumps(opt))
    for k in extra:
        mine, its = getattr(opt, k), getattr(twin, k)
        if k == "_widths":  # keyed by the params: the copy's own
            mine, its = list(mine.values()), list(its.values())
        assert its == mine, k


@pytest.mark.parametrize("how", list(ROUND_TRIPS))
def test_copy_of_an_optimizer_with_a_scheduler_steps_itself(how):
    """An LR scheduler replaces ``opt.step`` by a wrapper that closes over the original
    optimizer: a copy must not take it (its step would step the original) and pickling must not
    fail on it."""
    params = make_params()
    opt = make("adamw", params)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    assert "step" in opt.__dict__  # the scheduler's wrapper, an instance attribute
    step(opt, params, 0)
    twin = ROUND_TRIPS[how](opt)
    twin_params = params_of(twin)
    before = [p.detach().clone() for p in params]
    twin_before = [q.detach().clone() for q in twin_params]
    step(twin, twin_params, 1)
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)  # the original did not move
    assert any(not torch.equal(q.detach(), b) for q, b in zip(twin_params, twin_before))


def test_load_state_dict_drops_plan_caches():
    """load_state_dict replaces the groups a "_plan" cache was derived from: the cache goes."""
    params = make_params()
    opt = make("adamw", params)
    step(opt, params, 0)
    opt._plan_steps = {"stale": True}
    opt.load_state_dict(opt.state_dict())
    assert "_plan_steps" not in opt.__dict__


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


# ---------------------------------------------------------------------------------------------
# 5. Muon edge cases; torch's distributed-checkpoint initialisation for every optimizer
# ---------------------------------------------------------------------------------------------
def test_muon_constructed_with_lr_zero():
    """lr=0 at construction: nothing moves in either part while lr is 0; later the AdamW part
    takes adamw_lr * lr / 1e-3 (Muon's default lr stands for the missing reference), exactly
    as an optimizer constructed at lr=1e-3 does after the same lr edit."""
    params = make_params()
    before = [p.detach().clone() for p in params]
    zero = make("muon", params, lr=0.0)
    step(zero, params, 0)
    for p, q in zip(params, before):
        assert torch.equal(p.detach(), q)
    # The same run from an optimizer whose lr_ref is 1e-3, its lr set to 0 for the first step.
    ref_params = [q.clone().requires_grad_() for q in before]
    ref = make("muon", ref_params, lr=1e-3)
    assert all(g["lr_ref"] == 1e-3 for g in ref.param_groups)
    for g in ref.param_groups:
        g["lr"] = 0.0
    step(ref, ref_params, 0)
    for opt in (zero, ref):
        for g in opt.param_groups:
            g["lr"] = 2e-2
    for t in range(1, 3):
        step(zero, params, t)
        step(ref, ref_params, t)
    assert_same_run(zero, params, ref, ref_params)
    assert not torch.equal(params[1].detach(), before[1])  # the AdamW part (a vector) moved


def test_muon_adamw_part_follows_lr_in_proportion_after_lr_zero():
    """The AdamW part's lr is proportional to the group's lr (zero at zero) for lr_ref 0."""
    params = make_params()
    opt = make("muon", params, lr=0.0, adamw_lr=3e-3)
    for lr, expected in ((0.0, 0.0), (1e-3, 3e-3), (2e-3, 6e-3)):
        opt.param_groups[0]["lr"] = lr
        assert opt._adamw_hparams(opt.param_groups[0]).lr == pytest.approx(expected, rel=1e-15, abs=0)


def _init_optim_state(opt):
    """torch.distributed.checkpoint's initialisation of an empty optimizer state: zero grads,
    every group's lr set to 0 (a tensor 0 where lr is a tensor), one step(), lrs restored. The
    function itself where this torch has it, else the same steps (torch 2.13's code)."""
    try:
        from torch.distributed.checkpoint.state_dict import _init_optim_state as init
    except ImportError:
        init = None
    if init is not None:
        init(opt)
        return
    for g in opt.param_groups:
        for p in g["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)


# DCP calls step() without SophiaG's bs, which warns once (harmless here: lr is 0).
@pytest.mark.filterwarnings("ignore:SophiaG.step\\(\\) without bs")
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("name,backend", NAME_BACKEND)
def test_distributed_checkpoint_state_init_moves_nothing(name, backend, tensor_lr):
    """DCP creates the state of an empty optimizer with one lr=0 step on zero gradients: no
    parameter may move, the state must exist, and the lrs come back."""
    params = make_params()
    lr = OPTIMIZERS[name][1]["lr"]
    opt = make(name, params, backend, lr=torch.tensor(lr) if tensor_lr else lr)
    before = [p.detach().clone() for p in params]
    _init_optim_state(opt)
    for i, (p, q) in enumerate(zip(params, before)):
        assert torch.equal(p.detach(), q), f"param {i} moved"
        assert p.grad is None
    assert all(len(opt.state[p]) > 0 for p in params)
    assert all(float(g["lr"]) == float(torch.tensor(lr) if tensor_lr else lr) for g in opt.param_groups)


@pytest.mark.parametrize("shape", [(4, 0), (0, 4), (2, 0, 3)])
def test_muon_empty_matrix(shape):
    """A matrix with no elements (an empty embedding, a (4, 0) layer) steps as a no-op beside
    the others instead of failing in reshape or dividing by zero in the shape factor."""
    empty = torch.zeros(shape, requires_grad=True)
    other = torch.randn(3, 3, requires_grad=True)
    lone = other.detach().clone().requires_grad_()
    with_empty = mupopt.Muon([empty, other], lr=2e-2, backend="reference")
    alone = mupopt.Muon([lone], lr=2e-2, backend="reference")
    for t in range(2):
        empty.grad = torch.zeros(shape)
        fill_grads([other], t)
        fill_grads([lone], t)
        with_empty.step()
        alone.step()
    assert torch.equal(other.detach(), lone.detach())
    assert with_empty.state[empty]["momentum_buffer"].shape == shape


@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw", "spectral"])
def test_shape_factor_of_an_empty_matrix(adjust_lr_fn):
    from mupopt.optim.muon import shape_factor

    assert shape_factor(adjust_lr_fn, 4, 0) == 1.0 and shape_factor(adjust_lr_fn, 0, 4) == 1.0
    with pytest.raises(ValueError, match="Adjust learning rate function bogus is not supported"):
        shape_factor("bogus", 4, 0)


@pytest.mark.parametrize("name", ["muon", "shampoo"])
def test_maximize_refused_by_muon_and_shampoo(name):
    """maximize=True used to be accepted and ignored: it is refused at construction, in
    add_param_group (groups left as they were) and in a loaded state_dict; False is fine."""
    cls_name = OPTIMIZERS[name][0].__name__
    message = f"{cls_name} does not support maximize=True"
    params = make_params()
    cls, hp = OPTIMIZERS[name]
    with pytest.raises(ValueError, match=message):
        cls([{"params": params[:2], "maximize": True}, {"params": params[2:]}], **hp)
    opt = cls(params[:2], **hp)
    opt.add_param_group({"params": params[2:3], "maximize": False})
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": params[3:], "maximize": True})
    assert len(opt.param_groups) == n
    sd = opt.state_dict()
    sd["param_groups"][0]["maximize"] = True
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
# 11. Validation parity with torch.optim
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_with_several_elements(name):
    with pytest.raises(ValueError, match="^Tensor lr must be 1-element$"):
        make(name, make_params(), lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("name,key", [("adamw", "betas"), ("adopt", "betas"), ("lamb", "betas"),
                                      ("sophia", "betas"), ("muon", "adamw_betas")])
def test_betas_mixing_float_and_tensor(name, key):
    """As torch.optim.Adam: a tensor beta beside a float is refused with torch's message; two
    tensors (1-element) are accepted and step as their values do (float32-rounded: torch takes
    them as .item() too)."""
    b1, b2 = (0.9, 0.99)
    for mixed in ((b1, torch.tensor(b2)), (torch.tensor(b1), b2)):
        with pytest.raises(ValueError, match="^betas must be either both floats or both Tensors$"):
            make(name, make_params(), **{key: mixed})
    with pytest.raises(ValueError, match=re.escape("Tensor betas[1] must be 1-element")):
        make(name, make_params(), **{key: (torch.tensor(b1), torch.tensor([b2, b2]))})
    a_params, b_params = make_params(), make_params()
    a = make(name, a_params, **{key: (torch.tensor(b1).item(), torch.tensor(b2).item())})
    b = make(name, b_params, **{key: (torch.tensor(b1), torch.tensor(b2))})
    for t in range(2):
        step(a, a_params, t)
        step(b, b_params, t)
    for p, q in zip(a_params, b_params):
        assert torch.equal(p.detach(), q.detach())


def _torch_counterpart(name, **flags):
    """The optimizer's named reference (torch.optim.AdamW, torch-adopt, sophia-opt) over one
    param, built with ``flags``."""
    p = [torch.zeros(2, requires_grad=True)]
    if name == "adamw":
        return torch.optim.AdamW(p, **flags)
    if name == "adopt":
        adopt = pytest.importorskip("adopt")
        return adopt.ADOPT(p, decouple=True, **flags)
    sophia_opt = pytest.importorskip("sophia_opt")
    return sophia_opt.SophiaG(p, **flags)


@pytest.mark.parametrize("name,flags", [
    ("adamw", {}), ("adamw", {"foreach": True}), ("adamw", {"fused": False}),
    ("adopt", {}), ("adopt", {"foreach": True}), ("adopt", {"fused": False}),
    ("sophia", {}),  # sophia-opt has capturable only
])
def test_group_keys_of_the_torch_counterpart(name, flags):
    """Every key the counterpart puts in a param group is in ours, with the same value (its
    defaults, or what was passed): code that reads group["fused"] finds it."""
    t_group = _torch_counterpart(name, **flags).param_groups[0]
    m_group = OPTIMIZERS[name][0]([torch.zeros(2, requires_grad=True)], **flags).param_groups[0]
    assert not set(t_group) - set(m_group)
    for key in set(t_group) - {"params"}:
        assert m_group[key] == t_group[key], key


@pytest.mark.parametrize("name,flag", [("adamw", "differentiable"), ("adopt", "differentiable")])
def test_implementation_flags_mupopt_does_not_provide_are_refused(name, flag):
    """differentiable changes what step() must support (autograd through the step); accepted as
    a key, it is refused as True rather than ignored. (capturable is supported:
    tests/test_capturable.py.)"""
    with pytest.raises(ValueError, match=flag):
        OPTIMIZERS[name][0]([torch.zeros(2, requires_grad=True)], **{flag: True})


def test_adamw_decoupled_weight_decay_stays_true_on_load():
    """As torch.optim.AdamW: a torch.optim.Adam state_dict (decoupled_weight_decay=False) loads,
    and the decay stays decoupled."""
    p = torch.zeros(3, requires_grad=True)
    opt = mupopt.AdamW([p])
    opt.load_state_dict(torch.optim.Adam([torch.zeros(3, requires_grad=True)]).state_dict())
    assert opt.param_groups[0]["decoupled_weight_decay"] is True


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_with_other_counts_names_both(name):
    """torch's messages, followed by both counts."""
    params = make_params()
    opt = make(name, params)
    one_group = OPTIMIZERS[name][0]([torch.randn(2, 2, requires_grad=True)], backend="reference")
    with pytest.raises(ValueError, match="different number of parameter groups: 1 in the state dict, 2 in this optimizer"):
        opt.load_state_dict(one_group.state_dict())
    sd = opt.state_dict()
    sd["param_groups"][1]["params"] = sd["param_groups"][1]["params"][:1]
    with pytest.raises(ValueError, match="group 1 has 1 params in the state dict, 2 in this optimizer"):
        opt.load_state_dict(sd)


def test_load_pre_hooks_run_first_and_once():
    """torch runs load_state_dict pre-hooks on the dict as given, before its checks: a hook
    that adapts a state_dict saved for other params (torch's documented use) must see it before
    mupopt's count checks and its muP validation, unwrapped (Shampoo's blocks as saved), once."""
    params = make_params()
    opt = make("shampoo", params)
    bigger = make_params()
    other = make("shampoo", bigger)
    other.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    for t in range(2):
        step(other, params_of(other), t)
    seen = []

    def trim(optimizer, sd):
        seen.append(sd["state"][0]["left"])
        extra = sd["param_groups"][2]["params"]
        return {"state": {k: v for k, v in sd["state"].items() if k not in extra}, "param_groups": sd["param_groups"][:2]}

    handle = opt.register_load_state_dict_pre_hook(trim)
    opt.load_state_dict(other.state_dict())
    assert len(seen) == 1 and isinstance(seen[0], dict) and all(isinstance(x, torch.Tensor) for x in seen[0].values())
    assert opt.state[params[0]]["step"].item() == 2
    handle.remove()
    assert len(opt._optimizer_load_state_dict_pre_hooks) == 0


def _layout(state: dict) -> dict:
    """Each state entry's kind: a tensor's dtype and shape, a list's or dict's length, or a type."""
    out = {}
    for key, v in state.items():
        if isinstance(v, torch.Tensor):
            out[key] = (v.dtype, tuple(v.shape))
        elif isinstance(v, (list, dict)):
            out[key] = (type(v).__name__, len(v))
        else:
            out[key] = type(v).__name__
    return out


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_hooks_see_what_the_optimizer_holds_and_returns(name):
    """torch runs state_dict post-hooks on the dict state_dict returns and load_state_dict
    post-hooks once the state is loaded. mupopt finishes both after torch's code (8-bit codes
    under their own key, width records, formats converted, Shampoo's blocks): a post-hook run
    from inside torch's code saw a dict other than the one returned, and, loading an 8-bit
    checkpoint into a 32-bit optimizer, uint8 codes where the optimizer then holds float32 values
    (a hook that zeroed the momentum there wrote code 0, which decodes to -0.993 * absmax)."""
    big = [torch.randn(64, 80, generator=torch.Generator().manual_seed(1)).requires_grad_(), *make_params()]
    opt = make(name, big, state_bits=8)
    for t in range(2):
        step(opt, big, t)
    plain = opt.state_dict()
    seen = []
    handle = opt.register_state_dict_post_hook(lambda o, sd: seen.append(sd))
    out = opt.state_dict()
    handle.remove()
    assert len(seen) == 1 and seen[0] is out
    assert {k: _layout(v) for k, v in out["state"].items()} == {k: _layout(v) for k, v in plain["state"].items()}
    replaced = {"state": {}, "param_groups": []}
    handle = opt.register_state_dict_post_hook(lambda o, sd: replaced)
    assert opt.state_dict() is replaced  # a hook's returned dict is what state_dict returns
    handle.remove()

    target_params = [p.detach().clone().requires_grad_() for p in big]
    target = make(name, target_params)  # 32-bit: the 8-bit checkpoint is dequantized
    momentum = "momentum_buffer" if name in ("muon", "shampoo") else "exp_avg"
    at_hook = []

    def post(o):
        at_hook.append({id(p): _layout(st) for p, st in o.state.items()})
        o.state[target_params[0]][momentum].zero_()  # e.g. a resume that resets the momentum

    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(plain)
    assert at_hook == [{id(p): _layout(st) for p, st in target.state.items()}]
    assert target.state[target_params[0]][momentum].dtype == torch.float32
    assert not target.state[target_params[0]][momentum].any()


@pytest.mark.parametrize("name,backend", NAME_BACKEND)
def test_a_param_replaced_in_its_group_list_is_the_one_stepped(name, backend):
    """``group["params"][i] = new`` (a layer re-initialised or resized, its Parameter swapped in
    the optimizer) between steps: the next step steps ``new``, as torch.optim, which reads the
    list at every step. The cached plan keyed the list by id and length only, so it stepped the
    old param (with its old gradient) and left the new one unchanged. Checked against the same
    replacement made by assigning a new list (a new id)."""
    runs = []
    for how in ("in place", "new list"):
        params = make_params()
        opt = make(name, params, backend=backend)
        for t in range(2):
            step(opt, params, t)
        old = params[2]
        new = (old.detach() * 0.5).requires_grad_()
        params[2] = new
        if how == "in place":
            opt.param_groups[1]["params"][0] = new
        else:
            opt.param_groups[1]["params"] = [new, *opt.param_groups[1]["params"][1:]]
        before, start = old.detach().clone(), new.detach().clone()
        old.grad = torch.ones_like(old)  # stale: must not be applied
        for t in range(2, 4):
            step(opt, params, t)
        assert torch.equal(old.detach(), before), how
        assert not torch.equal(new.detach(), start), how
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_a_param_replaced_after_set_base_shapes_keeps_its_width_info(name):
    """A muP model's hidden layer re-initialised as a new Parameter (``model.hidden.weight =
    nn.Parameter(...)``) and swapped into its group by hand: the next step takes the width
    information set_base_shapes recorded under that module and name, as add_param_group takes it
    for a param FSDP2 replaced, so its muP multipliers stay those of a hidden matrix (without it
    they silently became 1: lr x m_in for AdamW). A replacement of another shape raises, naming
    the parameter, before anything is written."""
    with torch.device("meta"):
        base, delta = MLP(8), MLP(16)
    model = MLP(32)
    mupopt.set_base_shapes(model, base, delta=delta)
    cls, hp = OPTIMIZERS[name]
    opt = cls(model.parameters(), **hp)
    params = list(model.parameters())
    step(opt, params, 0)
    group = opt.param_groups[0]
    index = next(i for i, p in enumerate(group["params"]) if p is model.hidden.weight)
    before = opt.group_multipliers(group)
    assert opt.width_infos(group)[index].role == "hidden"

    model.hidden.weight = torch.nn.Parameter(model.hidden.weight.detach() * 0.5)
    group["params"][index] = params[index] = model.hidden.weight
    step(opt, params, 1)
    assert opt.width_infos(group)[index].role == "hidden"
    assert opt.group_multipliers(group) == before

    model.hidden.weight = torch.nn.Parameter(torch.zeros(33, 32))
    group["params"][index] = params[index] = model.hidden.weight
    others = [p.detach().clone() for p in params]
    with pytest.raises(mupopt.MupError, match="'hidden.weight' now has shape"):
        step(opt, params, 2)
    assert all(torch.equal(p, q) for p, q in zip(params, others))


@pytest.mark.parametrize("name", NAMES)
def test_a_step_inside_autocast_is_the_step_outside(name):
    """A training iteration written as one ``torch.autocast`` block calls step() inside it.
    torch.optim's elementwise steps have no op autocast changes; mupopt's Muon (Newton-Schulz,
    here with ns_dtype=float32) and Shampoo (statistics and roots) have matmuls, which autocast
    ran in bfloat16, silently: the step turns autocast off. The closure, the forward pass, still
    runs under the caller's autocast."""
    runs = []
    for autocast in (False, True):
        params = make_params()
        params[0] = torch.randn(12, 9, generator=torch.Generator().manual_seed(5)).requires_grad_()
        opt = make(name, params, **({"precondition_frequency": 1, "start_preconditioning_step": 1}
                                    if name == "shampoo" else {}))
        seen = []

        def closure():
            seen.append((params[0] @ params[0].T).dtype)
            return torch.zeros(())

        for t in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                step(opt, params, t)
                opt.step(closure, **({"bs": 64} if name == "sophia" else {}))
        assert seen == [torch.bfloat16 if autocast else torch.float32] * 3
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
