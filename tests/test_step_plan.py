"""The cached per-group step plan (issue 15 item 1) and what the step path guarantees with it
(issue 13 items 4 and 6, issue 14 items 6 and 7): a plan is reused while nothing it depends on
changes and rebuilt when something does; hyperparameters are read at every step; nothing is
written before everything that can fail has been checked; auto falls back per tensor and says so.
"""
from __future__ import annotations

import importlib.util
import re
import warnings

import pytest
import torch
from torch import nn

import mupopt
from mupopt import backends
from mupopt.mup import WidthInfo, width_record


def params(seed=0, shapes=((4, 3), (3,), (2, 5))):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def set_grads(ps, t):
    gen = torch.Generator().manual_seed(100 + t)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


def plans(opt):
    return dict(opt.__dict__.get("_plan_cache", {}))


def test_plan_is_reused_across_steps_with_new_gradient_tensors():
    ps = params()
    opt = mupopt.AdamW(ps, lr=1e-2)
    set_grads(ps, 0)
    opt.step()
    first = plans(opt)
    for t in range(1, 4):
        set_grads(ps, t)  # new gradient tensors every step, as zero_grad(set_to_none=True)
        opt.step()
    assert plans(opt) == first and all(plans(opt)[k] is first[k] for k in first)


@pytest.mark.parametrize("change", ["add_param_group", "load_state_dict", "data", "no_grad", "env", "wd_mode", "mup"])
def test_a_real_change_rebuilds_the_plan_and_the_result_follows_it(change, monkeypatch):
    """Each change that a plan depends on gives a new plan, and the step equals what a fresh
    optimizer in the changed situation computes (so nothing stale was used)."""
    ps, qs = params(), params()
    opt = mupopt.AdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = mupopt.AdamW(qs, lr=1e-2, weight_decay=0.1, backend="reference")
    for o, xs in ((opt, ps), (ref, qs)):
        set_grads(xs, 0)
        o.step()
    before = plans(opt)
    for o, xs in ((opt, ps), (ref, qs)):
        if change == "add_param_group":
            extra = nn.Parameter(torch.ones(6))
            xs.append(extra)
            o.add_param_group({"params": [extra]})
        elif change == "load_state_dict":
            o.load_state_dict(o.state_dict())
        elif change == "data":
            xs[0].data = xs[0].data.clone() * 2  # new storage under the same Parameter
        elif change == "no_grad":
            pass  # below: one param without a gradient
        elif change == "wd_mode":
            o.param_groups[0]["wd_mode"] = "coupled"
        elif change == "mup":  # new width records, loaded with the state (where they live)
            sd = o.state_dict()
            for pid, p in zip(sd["param_groups"][0]["params"], o.param_groups[0]["params"]):
                info = WidthInfo("hidden", 2.0, 2.0) if p.ndim == 2 else WidthInfo("vector", 1.0, 1.0)
                sd["state"][pid]["mup"] = width_record(info, p.shape)
            o.load_state_dict(sd)
    if change == "env":
        monkeypatch.setenv(backends.ENV_VAR, "reference")
    for o, xs in ((opt, ps), (ref, qs)):
        set_grads(xs, 1)
        if change == "no_grad":
            xs[1].grad = None
        o.step()
    after = plans(opt)
    assert any(after.get(k) is not v for k, v in before.items()) or after.keys() != before.keys()
    tol = {} if change == "env" else {"rtol": 1e-6, "atol": 1e-7}  # cpu vs reference: within an ulp
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, **tol) if tol else torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_hyperparameter_edits_need_no_new_plan_and_are_honoured():
    ps, qs = params(), params()
    opt = mupopt.AdamW(ps, lr=1e-2, backend="reference")
    ref = mupopt.AdamW(qs, lr=1e-2, backend="reference")
    set_grads(ps, 0), set_grads(qs, 0)
    opt.step(), ref.step()
    plan = plans(opt)
    opt.param_groups[0]["lr"] = 0.5
    opt.param_groups[0]["betas"] = (0.5, 0.9)
    ref2 = mupopt.AdamW(qs, lr=0.5, betas=(0.5, 0.9), backend="reference")
    ref2.load_state_dict({**ref.state_dict(), "param_groups": ref2.state_dict()["param_groups"]})
    set_grads(ps, 1), set_grads(qs, 1)
    opt.step(), ref2.step()
    assert all(plans(opt)[k] is v for k, v in plan.items())
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.step()


def test_auto_falls_back_per_tensor_warns_once_and_reports(monkeypatch):
    """A tensor the fastest backend refuses (here: made to refuse (7, 5) tensors) goes to the
    reference alone; the rest stays on the fastest backend; one BackendFallbackWarning names the
    reason; selected_backends and mup_summary say what ran."""
    w = nn.Parameter(torch.randn(7, 5))
    b = nn.Parameter(torch.randn(3))
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    best = backends.names("adamw")[0]
    if best == "reference" or backends.get("adamw", best).reason([torch.zeros(2)]) is not None:
        pytest.skip("no faster backend than the reference here")
    reason = refusing(monkeypatch, best, (7, 5))
    opt = mupopt.AdamW([w, b], lr=1e-2)
    ref = mupopt.AdamW([w2, b2], lr=1e-2, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(3):
            for p in (w, b, w2, b2):
                p.grad = torch.full_like(p, 0.1 * (t + 1))
            opt.step(), ref.step()
    fallback = [c for c in caught if issubclass(c.category, mupopt.BackendFallbackWarning)]
    assert len(fallback) == 1 and reason in str(fallback[0].message)
    assert fallback[0].filename == __file__  # points at the caller's step(), not into mupopt
    assert opt.selected_backends == [{"adamw": f"{best} (1) + reference (1)"}]
    assert f"adamw on {best} (1) + reference (1)" in opt.mup_summary()
    torch.testing.assert_close(w, w2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b2, rtol=1e-6, atol=1e-7)


def refusing(monkeypatch, name: str, shape: tuple) -> str:
    """Make backend ``name`` of adamw refuse tensors of ``shape`` (what it refuses for real,
    layouts and dtypes, changes as the backends grow); returns the reason it gives."""
    import dataclasses

    backend = backends.get("adamw", name)
    reason = f"a test refusal of {shape} tensors"

    def unsupported(tensors):
        return reason if any(tuple(t.shape) == shape for t in tensors) else backend.unsupported_reason(tensors)

    monkeypatch.setitem(backends._REGISTRY["adamw"], name, dataclasses.replace(backend, unsupported_reason=unsupported))
    return reason


def test_explicit_backend_refusal_creates_no_state(monkeypatch):
    if backends.get("adamw", "cpu").reason([torch.zeros(2)]) is not None:
        pytest.skip("backend cpu cannot run here")
    reason = refusing(monkeypatch, "cpu", (7, 5))
    w = nn.Parameter(torch.randn(7, 5))
    w.grad = torch.ones_like(w)
    opt = mupopt.AdamW([w], backend="cpu")
    with pytest.raises(RuntimeError, match=f"backend 'cpu' cannot step.*{re.escape(reason)}"):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_state_of_the_wrong_shape_raises_before_anything_is_written(backend):
    """A state_dict of another model loaded by hand: the step refuses it, params and step counts
    untouched (the reference used to decay p and count the step first)."""
    ps = params()
    opt = mupopt.AdamW(ps, lr=1e-2, backend=backend)
    set_grads(ps, 0)
    opt.step()
    opt.state[ps[2]]["exp_avg"] = torch.zeros(3, 3)
    before = [p.detach().clone() for p in ps]
    steps = [opt.state[p]["step"].item() for p in ps]
    set_grads(ps, 1)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' .* shape \(3, 3\)"):
        opt.load_state_dict(opt.state_dict())  # plans are rebuilt: the bad state is seen
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert [opt.state[p]["step"].item() for p in ps] == steps


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter)")
def test_muon_refused_adamw_part_leaves_the_matrices_unstepped(monkeypatch):
    """Muon's AdamW part refused (the triton backend takes no float64 bias): the Muon matrices are
    not stepped either (they used to be written before the AdamW part was checked)."""
    import triton_mode

    with triton_mode.defining_kernels():
        from mupopt.kernels.triton import _common  # noqa: F401  (defines the kernels' mode)
    if not _common.INTERPRET:
        pytest.skip("compiled kernels: this CPU test needs the interpreter")
    triton_mode.match_environment(monkeypatch, True)
    w = nn.Parameter(torch.randn(8, 8))
    b = nn.Parameter(torch.randn(8, dtype=torch.float64))
    opt = mupopt.Muon([{"params": [w]}, {"params": [b], "use_muon": False}], lr=1e-2, backend="triton")
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert torch.equal(w, before) and len(opt.state) == 0
