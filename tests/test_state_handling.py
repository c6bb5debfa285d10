"""What a user does to ``opt.state`` between steps, and state that does not fit (issue 22 items 5
and 7).

torch.optim reads ``opt.state`` at every step, so a reset (``opt.state[p] = {}``, ``.clear()``,
``del opt.state[p]``) or a replaced state tensor is what the next step uses. mupopt caches a step
plan per param group (tests/test_step_plan.py); these tests hold it to torch's behaviour for every
optimizer and CPU backend: the run with the edit equals a run that makes the same edit and then
rebuilds everything from a state_dict round trip (which shares no cached plan), and for AdamW
also torch.optim.AdamW itself.

State that does not fit the optimizer is refused before anything is written: a state_dict of
another optimizer in load_state_dict (all 30 ordered pairs of the six), a state with keys
removed at the step; a refused first step leaves no state behind.
"""
from __future__ import annotations

import copy
import itertools
from collections import defaultdict

import pytest
import torch
from torch import nn

import mupopt
from mupopt import backends

import triton_mode
from models import same_state_value

TRITON_ON_CPU = triton_mode.runs_on_cpu()

# (class, kwargs) of each optimizer; shapes below give Muon and Shampoo matrices and vectors.
OPTIMIZERS = {
    "adamw": (mupopt.AdamW, dict(lr=0.05, weight_decay=0.1)),
    "adopt": (mupopt.ADOPT, dict(lr=0.05, weight_decay=0.1)),
    "lamb": (mupopt.LAMB, dict(lr=0.05, weight_decay=0.1)),
    "sophia": (mupopt.SophiaG, dict(lr=0.05, weight_decay=0.1, rho=0.04)),
    "muon": (mupopt.Muon, dict(lr=0.05, weight_decay=0.1)),
    "shampoo": (mupopt.Shampoo, dict(lr=0.05, epsilon=1e-3)),
}
SHAPES = [(6, 4), (6,), (5, 3), (3,)]  # group 0: a matrix and a vector; group 1: the same
FORMS = ["assign_empty", "clear", "del", "replace_tensor", "replace_step"]
# The edits of one run, one per param of SHAPES: over the three runs every form meets a matrix
# and a vector (the interpreted Triton Muon takes about a second per step: three runs, not five).
EDITS = {
    "a": ("assign_empty", "clear", "replace_tensor", "del"),
    "b": ("del", "replace_step", "assign_empty", "replace_tensor"),
    "c": ("clear", "replace_tensor", "replace_step", "assign_empty"),
}


def cpu_backends(rule: str) -> list[str]:
    """The backends of ``rule`` that step CPU tensors here ("triton" in its interpreter)."""
    names = [n for n in backends.names(rule) if n in ("reference", "cpu") or (n == "triton" and TRITON_ON_CPU)]
    return [n for n in names if n != "cpu" or backends.get(rule, n).reason([torch.zeros(2)]) is None]


CASES = [(name, b) for name in OPTIMIZERS for b in cpu_backends(name)]


@pytest.fixture
def backend_env(monkeypatch):
    def use(backend):
        if backend == "triton":
            triton_mode.match_environment(monkeypatch, True)
    return use


def leaves(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def groups(ps):
    """Two param groups (a reset in one must not be lost in the other's bookkeeping)."""
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]


def make(name, backend, ps):
    cls, kw = OPTIMIZERS[name]
    return cls(groups(ps), backend=backend, **kw)


def step(opt, ps, t):
    gen = torch.Generator().manual_seed(100 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    if isinstance(opt, mupopt.SophiaG):
        opt.update_hessian()  # the Hessian EMA has its own plan over the same states
        opt.step(bs=16)
    else:
        opt.step()


def edit(opt, p, form) -> None:
    if form == "assign_empty":
        opt.state[p] = {}
    elif form == "clear":
        opt.state[p].clear()
    elif form == "del":
        del opt.state[p]
    elif form == "replace_tensor":
        # The first param-shaped entry, replaced by a new tensor of other values.
        key = next(k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape)
        opt.state[p][key] = opt.state[p][key] * 0.5 + 0.25
    elif form == "replace_step" and "step" in opt.state[p]:  # Muon's matrices have no step count
        opt.state[p]["step"] = torch.tensor(1.0)


def test_the_edit_runs_cover_every_form_on_matrices_and_vectors():
    for k, shape in enumerate(SHAPES):
        assert {run[k] for run in EDITS.values()} | {run[k ^ 2] for run in EDITS.values()} == set(FORMS), shape


@pytest.mark.parametrize("edits", list(EDITS))
@pytest.mark.parametrize("name,backend", CASES)
def test_a_state_edit_between_steps_is_what_the_next_step_uses(name, backend, edits, backend_env):
    """Edit the state of every param (EDITS), step twice: bitwise what the same edits give when
    the optimizer is then rebuilt from its state_dict."""
    backend_env(backend)
    ps, qs = leaves(), leaves()
    a, b = make(name, backend, ps), make(name, backend, qs)
    step(a, ps, 0), step(b, qs, 0)
    for k, form in enumerate(EDITS[edits]):
        edit(a, ps[k], form), edit(b, qs[k], form)
    b.load_state_dict(copy.deepcopy(b.state_dict()))  # the oracle: nothing cached survives this
    for t in range(1, 3):
        step(a, ps, t), step(b, qs, t)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q), f"max diff {(p - q).abs().max().item():.3g}"
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys() == set(range(len(SHAPES)))
    for i in sa:
        for key, value in sb[i].items():
            got = sa[i][key]
            assert same_state_value(got, value), (i, key)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", cpu_backends("adamw"))
def test_adamw_state_edits_match_torch(form, backend, backend_env):
    """The same edits on torch.optim.AdamW: the runs agree (bitwise on the reference backend) and
    the state_dicts carry the same step counts (a reset parameter saved with its new state)."""
    backend_env(backend)
    ps = leaves()
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    ours = mupopt.AdamW(groups(ps), lr=0.05, backend=backend)
    theirs = torch.optim.AdamW(groups(qs), lr=0.05, foreach=False)
    for t in range(3):
        step(ours, ps, t), step(theirs, qs, t)
    edit(ours, ps[0], form), edit(theirs, qs[0], form)
    for t in range(3, 5):
        step(ours, ps, t), step(theirs, qs, t)
    for p, q in zip(ps, qs):
        if backend == "reference":
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    steps = lambda opt: {k: st["step"].item() for k, st in opt.state_dict()["state"].items()}  # noqa: E731
    assert steps(ours) == steps(theirs)


@pytest.mark.parametrize("backend", cpu_backends("adamw"))
def test_plain_dicts_and_a_replaced_state_mapping_are_followed(backend, backend_env):
    """A plain dict put into opt.state stays that very object (as torch) and later edits of it
    are seen; so are edits of a whole new opt.state mapping."""
    backend_env(backend)
    ps, qs = leaves(), leaves()
    a, b = make("adamw", backend, ps), make("adamw", backend, qs)
    for t in range(2):
        step(a, ps, t), step(b, qs, t)
    mine = {}
    a.state[ps[0]] = mine
    b.state[qs[0]] = {}
    step(a, ps, 2), step(b, qs, 2)
    assert a.state[ps[0]] is mine and mine["step"].item() == 1
    mine["exp_avg"] = mine["exp_avg"] + 1.0
    b.state[qs[0]]["exp_avg"] = b.state[qs[0]]["exp_avg"] + 1.0
    b.load_state_dict(b.state_dict())
    step(a, ps, 3), step(b, qs, 3)
    a.state = defaultdict(dict, {p: dict(st) for p, st in a.state.items()})
    b.load_state_dict(b.state_dict())
    step(a, ps, 4), step(b, qs, 4)
    a.state[ps[2]]["exp_avg_sq"] = a.state[ps[2]]["exp_avg_sq"] * 2
    b.state[qs[2]]["exp_avg_sq"] = b.state[qs[2]]["exp_avg_sq"] * 2
    b.load_state_dict(b.state_dict())
    step(a, ps, 5), step(b, qs, 5)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)


def plans(opt):
    return dict(opt.__dict__.get("_plan_cache", {}))


def test_untouched_state_keeps_the_plan_and_a_change_elsewhere_does_not_rebuild_it():
    """The plan is reused while this optimizer's state is untouched, also when the state of
    another optimizer changes (the change counter is shared: the states are compared then)."""
    ps, qs = leaves(), leaves(1)
    a, other = make("adamw", "auto", ps), make("adamw", "auto", qs)
    step(a, ps, 0), step(other, qs, 0)
    before = plans(a)
    other.state[qs[0]] = {}
    for t in range(1, 3):
        step(a, ps, t)
    assert all(plans(a)[k] is v for k, v in before.items())
    a.state[ps[0]].clear()
    step(a, ps, 3)
    assert any(plans(a)[k] is not v for k, v in before.items())


def test_state_dict_holds_plain_dicts_that_load_weights_only():
    import io

    ps = leaves()
    opt = make("adamw", "auto", ps)
    step(opt, ps, 0)
    sd = opt.state_dict()
    assert all(type(st) is dict for st in sd["state"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    twin = copy.deepcopy(opt)  # pickling the optimizer itself keeps its state tracked
    step(twin, [p for g in twin.param_groups for p in g["params"]], 1)


# ---------------------------------------------------------------------------------------------
# State that does not fit: refused before anything is written
# ---------------------------------------------------------------------------------------------
def snapshot(opt, ps):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, ps, snap):
    before, sd = snap
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        assert now["state"][k].keys() == st.keys()
        for key, v in st.items():
            w = now["state"][k][key]
            assert same_state_value(w, v), (k, key)


@pytest.mark.parametrize("name,backend", CASES)
def test_a_state_with_keys_removed_is_refused_before_anything_is_written(name, backend, backend_env):
    backend_env(backend)
    ps = leaves()
    opt = make(name, backend, ps)
    step(opt, ps, 0)
    victim = ps[3]  # a vector of the second group (Muon: its AdamW part)
    key = next(k for k in opt.state[victim] if k != "step")
    del opt.state[victim][key]
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=rf"state of parameter of shape \(3,\) has no '{key}'.*nothing was changed"):
        step(opt, ps, 1)
    assert_unchanged(opt, ps, snap)
    opt.state[victim] = {}  # what the message says to do
    step(opt, ps, 1)
    assert opt.state[victim]["step" if "step" in opt.state[victim] else key] is not None


@pytest.mark.parametrize("plain", [False, True])
def test_a_renamed_state_key_is_seen(plain):
    """The last key renamed, its tensor kept (so the values are the same objects in the same
    order): the step refuses the state, whether the dict is the optimizer's or a plain one."""
    ps = leaves()
    opt = make("sophia", "auto", ps)
    if plain:
        opt.state[ps[1]] = {}
    step(opt, ps, 0)
    st = opt.state[ps[1]]
    st["hessian_saved"] = st.pop("hessian")
    with pytest.raises(RuntimeError, match="has no 'hessian'"):
        step(opt, ps, 1)


def test_muon_state_without_its_adamw_keys_steps_no_matrix():
    """Muon's AdamW part with a state of Muon's matrix part (as a state_dict of another
    model or a hand edit would leave it): refused before the matrices are stepped, so a retry
    after fixing the state steps them once."""
    ps = leaves()
    opt = make("muon", "reference", ps)
    step(opt, ps, 0)
    opt.state[ps[3]] = {"momentum_buffer": torch.zeros(3)}
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="has no 'step', 'exp_avg', 'exp_avg_sq'"):
        step(opt, ps, 1)
    assert_unchanged(opt, ps, snap)


@pytest.mark.parametrize("name,option,missing", [("adamw", "amsgrad", "'max_exp_avg_sq'"),
                                                  ("muon", "use_muon", "'step', 'exp_avg', 'exp_avg_sq'")])
def test_an_option_that_needs_more_state_set_after_the_first_step_is_refused(name, option, missing):
    """amsgrad turned on, or a Muon matrix moved to the AdamW part (use_muon=False), after the
    state was made: the step reads entries the state lacks. Refused before anything is written,
    with a message that names the option (torch.optim raises a KeyError from the step)."""
    ps = leaves()
    opt = make(name, "reference", ps)
    step(opt, ps, 0)
    opt.param_groups[0][option] = option == "amsgrad"
    snap = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match=f"has no {missing}.*{option}.*nothing was changed"):
        step(opt, ps, 1)
    assert_unchanged(opt, ps, snap)


SIX = {"AdamW": mupopt.AdamW, "ADOPT": mupopt.ADOPT, "LAMB": mupopt.LAMB, "SophiaG": mupopt.SophiaG,
       "Muon": mupopt.Muon, "Shampoo": mupopt.Shampoo}


@pytest.mark.parametrize("source,target", list(itertools.permutations(SIX, 2)))
def test_a_state_dict_of_another_optimizer_is_refused_at_load(source, target):
    ps = leaves()
    src = SIX[source](groups(ps))
    step(src, ps, 0)
    qs = leaves(1)
    dst = SIX[target](groups(qs))
    step(dst, qs, 0)
    snap = snapshot(dst, qs)
    groups_before = copy.deepcopy(dst.state_dict()["param_groups"])
    with pytest.raises(ValueError, match=rf"not a {target} state_dict.*{source}"):
        dst.load_state_dict(src.state_dict())
    assert_unchanged(dst, qs, snap)
    assert dst.state_dict()["param_groups"] == groups_before
    step(dst, qs, 1)


@pytest.mark.parametrize("target", list(SIX))
def test_a_state_dict_without_the_state_keys_is_refused_at_load(target):
    """A state_dict whose groups look right but whose states lack keys (hand-made, or of a
    library whose group keys mupopt does not know) is refused too, naming the keys."""
    ps = leaves()
    opt = SIX[target](groups(ps))
    step(opt, ps, 0)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1] = {"step": torch.tensor(1.0), "momentum": torch.zeros(6)}
    with pytest.raises(ValueError, match="state of parameter 1 .* has no"):
        opt.load_state_dict(sd)


def test_torch_state_dicts_of_the_counterparts_still_load():
    ps = leaves()
    theirs = torch.optim.AdamW(groups(ps), lr=0.05)
    step(theirs, ps, 0)
    mupopt.AdamW(groups(leaves())).load_state_dict(theirs.state_dict())
    if hasattr(torch.optim, "Muon"):
        ms = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5, 2))]
        tm = torch.optim.Muon(ms)
        step(tm, ms, 0)
        mupopt.Muon([nn.Parameter(m.detach().clone()) for m in ms]).load_state_dict(tm.state_dict())


@pytest.mark.parametrize("failure", ["nan", "root"])
def test_a_refused_first_shampoo_step_leaves_no_state(failure, monkeypatch):
    """A first step refused for a non-finite gradient or a failed root: the error says params
    and state were left unchanged, and they were: no zero state left behind; the next step is
    the first step of a fresh optimizer."""
    import mupopt.optim.shampoo as shampoo_module
    from mupopt.linalg import RootComputationError

    ps, qs = leaves(), leaves()
    opt, fresh = make("shampoo", "auto", ps), make("shampoo", "auto", qs)
    gen = torch.Generator().manual_seed(7)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    if failure == "nan":
        ps[2].grad[0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            opt.step()
    else:
        def failing_root(A, p, **kwargs):
            raise RootComputationError("root failed in float32 and float64")

        with monkeypatch.context() as m:
            m.setattr(shampoo_module, "inverse_root_eigh", failing_root)
            with pytest.raises(RootComputationError):
                opt.step()
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}
    step(opt, ps, 0), step(fresh, qs, 0)
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_keys_are_the_keys_the_state_is_created_with(name):
    """_state_keys (what the step reads, checked before it) agrees with _init_state, for every
    kind of param of each optimizer (Muon's matrices and its AdamW part, Shampoo's matrices and
    vectors) and AdamW's amsgrad."""
    ps = leaves()
    for extra in ({}, {"amsgrad": True}) if name == "adamw" else ({},):
        cls, kw = OPTIMIZERS[name]
        opt = cls(groups(ps), **kw, **extra)
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                assert set(opt._state_keys(group, i)) == set(opt._init_state(p, group)), (name, extra, p.shape)
