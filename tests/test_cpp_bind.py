"""Bound steps of the C++ "cpu" backend (``Backend.bind``; csrc/bound.h, mupopt/kernels/cpp/ops.py).

``bind(params, states, mults)`` returns ``step(grads, hp)``; it must do exactly what
``fn(params, grads, states, mults, hp)`` does: the same kernels on the same tensors, so every
result is compared bit for bit (params, every state tensor, the step counts) over several steps,
with new gradient tensors every step, a learning rate that changes every step, float32,
bfloat16, float16, float64 and mixed storage, gradient dtypes that change between steps, empty tensors and muP
multipliers other than 1. A bad gradient raises before anything is written.
"""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

import mupopt  # noqa: F401  (registers the backends)
from mupopt import backends
from mupopt.kernels.cpp import ops
from mupopt.mup import Multipliers
from mupopt.optim.adamw import AdamWHparams
from mupopt.optim.adopt import ADOPTHparams
from mupopt.optim.lamb import LAMBHparams
from mupopt.optim.sophia import SophiaHparams

SHAPES = [(1,), (7,), (33, 65), (0,), (40000,), (5, 3)]
MULTS = [
    Multipliers(1.0, 1.0, 1.0),
    Multipliers(2.0, 0.5, 1.0),
    Multipliers(0.25, 1.0, 0.5),
    Multipliers(1.0, 1.0, 1.0),
    Multipliers(0.125, 2.0, 0.25),
    Multipliers(4.0, 1.0, 2.0),
]
NAMES = ("adamw", "adopt", "lamb", "sophia")


@pytest.fixture(scope="module", autouse=True)
def library():
    from mupopt.kernels.cpp import build

    outcome = build.load_cpu()
    if outcome is not True:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(outcome)
        pytest.fail(f"a C++ compiler exists but the build failed: {outcome}")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def hparams(name, step=0, *, amsgrad=False, maximize=False, lr=None):
    lr = 1e-2 * (1.0 + 0.25 * step) if lr is None else lr  # a scheduler: a new lr every step
    if name == "adamw":
        return AdamWHparams(lr, 0.9, 0.99, 1e-8, 0.1, amsgrad, maximize)
    if name == "adopt":
        return ADOPTHparams(lr, 0.9, 0.9999, 1e-6, 0.1, maximize)
    if name == "lamb":
        return LAMBHparams(lr, 0.9, 0.999, 1e-6, 0.01, 0.5 if step % 2 else None, maximize)
    return SophiaHparams(lr, 0.965, 0.99, 0.04, 0.1, 64.0, maximize)


def make_case(name, dtypes, *, amsgrad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(SHAPES, dtypes)]
    states = []
    for p in params:
        st = {"step": torch.tensor(0.0, dtype=torch.float32), "exp_avg": torch.zeros_like(p)}
        if name == "sophia":
            st["hessian"] = torch.rand(p.shape, generator=gen).to(p.dtype)
        else:
            st["exp_avg_sq"] = torch.zeros_like(p)
        if amsgrad:
            st["max_exp_avg_sq"] = torch.zeros_like(p)
        states.append(st)
    return params, states


def grads_for(step, params, grad_dtypes=None):
    gen = torch.Generator().manual_seed(1000 + step)
    dtypes = grad_dtypes or [p.dtype for p in params]
    return [torch.randn(p.shape, generator=gen).to(d) for p, d in zip(params, dtypes)]


def snapshot(params, states):
    return [p.clone() for p in params], copy.deepcopy(states)


def assert_identical(a_params, a_states, b_params, b_states):
    for i, (a, b) in enumerate(zip(a_params, b_params)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"params[{i}] differ"
    for i, (sa, sb) in enumerate(zip(a_states, b_states)):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"states[{i}][{k!r}] differ"


def fn_of(name):
    return ops.FUNCTIONS[name]


def twin_run(name, dtypes, steps=4, *, grad_dtypes=None, amsgrad=False, maximize=False, mults=MULTS):
    """fn and the bound step from identical tensors; compared after every step."""
    params, states = make_case(name, dtypes, amsgrad=amsgrad)
    b_params, b_states = snapshot(params, states)
    step = ops.BIND[name](b_params, b_states, mults)
    hess = ops.BIND["sophia_hessian"](b_params, b_states, mults) if name == "sophia" else None
    for t in range(steps):
        g_dtypes = grad_dtypes(t) if callable(grad_dtypes) else grad_dtypes
        grads = grads_for(t, params, g_dtypes)
        hp = hparams(name, t, amsgrad=amsgrad, maximize=maximize)
        if name == "sophia" and t % 2 == 0:
            ops.sophia_hessian(params, grads, states, mults, hp)
            hess([g.clone() for g in grads], hp)
        fn_of(name)(params, grads, states, mults, hp)
        step([g.clone() for g in grads], hp)  # new gradient objects every step
        assert_identical(params, states, b_params, b_states)
    assert all(st["step"].item() == steps for st in b_states)
    return params, states


FP32 = [torch.float32] * len(SHAPES)
BF16 = [torch.bfloat16] * len(SHAPES)
MIXED = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
FP16 = [torch.float16] * len(SHAPES)
MIXED16 = [torch.float16, torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float32]
FP64 = [torch.float64] * len(SHAPES)
MIXED64 = [torch.float64, torch.float32, torch.float64, torch.bfloat16, torch.float64, torch.float16]


# ---------------------------------------------------------------------------------------------
# Bound step == fn, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtypes", [FP32, BF16, MIXED, FP16, MIXED16, FP64, MIXED64],
                         ids=["fp32", "bf16", "mixed", "fp16", "mixed16", "fp64", "mixed64"])
def test_bound_step_is_fn(name, dtypes):
    twin_run(name, dtypes)


@pytest.mark.parametrize("name", NAMES)
def test_maximize(name):
    twin_run(name, MIXED, steps=3, maximize=True)


@pytest.mark.parametrize("dtypes", [FP32, MIXED, MIXED64], ids=["fp32", "mixed", "mixed64"])
def test_adamw_amsgrad(dtypes):
    twin_run("adamw", dtypes, steps=4, amsgrad=True)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_dtypes_change_between_steps(name):
    """bf16 gradients on some steps, float32 on others: the plan regroups its rows."""
    def grad_dtypes(t):
        return [torch.bfloat16 if (i + t) % 2 else torch.float32 for i in range(len(SHAPES))]

    twin_run(name, MIXED, steps=4, grad_dtypes=grad_dtypes)


@pytest.mark.parametrize("name", NAMES)
def test_fp16_gradient_dtypes_change_between_steps(name):
    """float16, bfloat16 and float32 gradients in turn on float16/bfloat16/float32 params."""
    kinds = (torch.float16, torch.bfloat16, torch.float32)

    def grad_dtypes(t):
        return [kinds[(i + t) % 3] for i in range(len(SHAPES))]

    twin_run(name, MIXED16, steps=4, grad_dtypes=grad_dtypes)


def test_multipliers_of_one():
    twin_run("adamw", FP32, steps=2, mults=[Multipliers()] * len(SHAPES))


def test_many_steps_with_new_gradient_objects():
    """The plan lives across many steps; the gradients are new tensors every step, as after
    zero_grad(set_to_none=True), and the caller drops them at once."""
    shapes = [(64,)] * 50
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen) for s in shapes]
    states = [{"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
              for p in params]
    mults = [Multipliers(1.0 + i % 3, 1.0, 1.0) for i in range(len(params))]
    b_params, b_states = snapshot(params, states)
    step = ops.bind_adamw(b_params, b_states, mults)
    for t in range(100):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        hp = hparams("adamw", t)
        ops.adamw(params, grads, states, mults, hp)
        step([g.clone() for g in grads], hp)
    assert_identical(params, states, b_params, b_states)
    assert b_states[0]["step"].item() == 100


def test_lr_change_between_steps_is_honoured():
    params, states = make_case("adamw", FP32)
    step = ops.bind_adamw(params, states, MULTS)
    before = [p.clone() for p in params]
    step(grads_for(0, params), hparams("adamw", lr=0.0))  # lr 0: the decay 1 - 0*wd and the update vanish
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    step(grads_for(1, params), hparams("adamw", lr=1e-2))
    assert not torch.equal(before[2], params[2])


def test_sophia_hessian_touches_only_the_hessian():
    params, states = make_case("sophia", FP32)
    before_p, before_s = snapshot(params, states)
    ops.bind_sophia_hessian(params, states, MULTS)(grads_for(0, params), hparams("sophia"))
    assert_identical(before_p, [{k: v for k, v in st.items() if k != "hessian"} for st in before_s],
                     params, [{k: v for k, v in st.items() if k != "hessian"} for st in states])
    assert not torch.equal(before_s[2]["hessian"], states[2]["hessian"])


def test_tensor_changed_in_place_is_rebound():
    """p.data = ... keeps the Python object but moves its storage: the plan notices (before
    writing anything) and the step binds anew, so the new storage is stepped."""
    params, states = make_case("adamw", FP32)
    b_params, b_states = snapshot(params, states)
    step = ops.bind_adamw(b_params, b_states, MULTS)
    for t in range(3):
        if t == 1:
            for ps in (params, b_params):
                ps[2].data = ps[2].data.clone()
            b_states[4]["exp_avg"].data = b_states[4]["exp_avg"].data.clone()
        grads = grads_for(t, params)
        ops.adamw(params, grads, states, MULTS, hparams("adamw", t))
        step(grads, hparams("adamw", t))
        assert_identical(params, states, b_params, b_states)


def test_empty_list():
    step = ops.bind_adamw([], [], [])
    step([], hparams("adamw"))
    step.from_param_grads(hparams("adamw"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtypes", [FP32, MIXED, MIXED64], ids=["fp32", "mixed", "mixed64"])
def test_from_param_grads_is_fn(name, dtypes):
    """step.from_param_grads(hp): the C++ op reads each bound param's .grad itself."""
    params, states = make_case(name, dtypes)
    b_params, b_states = snapshot(params, states)
    step = ops.BIND[name](b_params, b_states, MULTS)
    hess = ops.BIND["sophia_hessian"](b_params, b_states, MULTS) if name == "sophia" else None
    for t in range(3):
        grads = grads_for(t, params)
        for p, g in zip(b_params, grads):
            p.grad = g.clone()  # a new gradient object every step
        hp = hparams(name, t)
        if name == "sophia" and t % 2 == 0:
            ops.sophia_hessian(params, grads, states, MULTS, hp)
            hess.from_param_grads(hp)
        fn_of(name)(params, grads, states, MULTS, hp)
        step.from_param_grads(hp)
        assert_identical(params, states, b_params, b_states)


def test_from_param_grads_without_a_grad_raises_before_writing():
    params, states = make_case("adamw", FP32)
    for p in params:
        p.grad = torch.randn_like(p)
    params[3].grad = None
    step = ops.bind_adamw(params, states, MULTS)
    before_p, before_s = snapshot(params, states)
    with pytest.raises(RuntimeError, match=r"params\[3\]\.grad is None"):
        step.from_param_grads(hparams("adamw"))
    assert_identical(before_p, before_s, params, states)


def test_amsgrad_without_bound_max_state_behaves_as_fn():
    """Bound without max_exp_avg_sq (amsgrad was off): an amsgrad step goes to fn, which needs
    that state and raises as it always did."""
    params, states = make_case("adamw", FP32)
    step = ops.bind_adamw(params, states, MULTS)
    with pytest.raises(KeyError):
        ops.adamw(params, grads_for(0, params), states, MULTS, hparams("adamw", amsgrad=True))
    with pytest.raises(KeyError):
        step(grads_for(0, params), hparams("adamw", amsgrad=True))


def test_registered_for_the_cpu_backend():
    for name in ("adamw", "adopt", "lamb", "sophia", "sophia_hessian"):
        assert backends._REGISTRY[name]["cpu"].bind is ops.BIND[name]
        assert backends._REGISTRY[name]["reference"].bind is None


# ---------------------------------------------------------------------------------------------
# Bad gradients: a clear error, nothing written
# ---------------------------------------------------------------------------------------------
class NotPlain(torch.Tensor):
    pass


BAD = {
    "shape": (lambda g: g.reshape(65, 33), r"grads\[2\] is a Float tensor of shape \[65, 33\].*params\[2\] has shape \[33, 65\]"),
    "numel": (lambda g: g[:-1], r"grads\[2\].*shape \[32, 65\]"),
    "dtype": (lambda g: g.to(torch.int32), r"grads\[2\] is a Int tensor.*supported: float32, bfloat16, float16, float64"),
    "float64": (lambda g: g.double(), r"grads\[2\] is Double but params\[2\] is Float; float64 gradients need float64"),
    "non-contiguous": (lambda g: g.t().contiguous().t(), r"grads\[2\].*is not contiguous"),
    "subclass": (lambda g: g.as_subclass(NotPlain), r"tensor 2 is a NotPlain, a tensor subclass"),
}


@pytest.mark.parametrize("name", NAMES + ("sophia_hessian",))
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_gradient_raises_before_writing(name, bad):
    make, message = BAD[bad]
    kind = "sophia" if name == "sophia_hessian" else name
    params, states = make_case(kind, FP32)
    step = ops.BIND[name](params, states, MULTS)
    step(grads_for(0, params), hparams(kind, 0))  # a good step first: the plan has a table
    before_p, before_s = snapshot(params, states)
    grads = grads_for(1, params)
    grads[2] = make(grads[2])
    with pytest.raises(RuntimeError, match=message):
        step(grads, hparams(kind, 1))
    assert_identical(before_p, before_s, params, states)
    # The plan still works afterwards, as fn would from the same tensors.
    ref_p, ref_s = snapshot(params, states)
    good = grads_for(2, params)
    ops.FUNCTIONS[name](ref_p, good, ref_s, MULTS, hparams(kind, 2))
    step(good, hparams(kind, 2))
    assert_identical(ref_p, ref_s, params, states)


def test_wrong_number_of_gradients():
    params, states = make_case("adamw", FP32)
    step = ops.bind_adamw(params, states, MULTS)
    with pytest.raises(RuntimeError, match="5 gradients for 6 bound parameters"):
        step(grads_for(0, params)[:5], hparams("adamw"))


def test_bind_checks_the_tensors():
    params, states = make_case("adamw", FP32)
    states[3]["exp_avg"] = torch.zeros(2)
    with pytest.raises(RuntimeError, match=r"exp_avgs\[3\] has 2 elements but params\[3\] has 0"):
        ops.bind_adamw(params, states, MULTS)
    params, states = make_case("adamw", FP32)
    states[1]["step"] = torch.tensor(0.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"state_steps\[1\] must be a float32 CPU tensor"):
        ops.bind_adamw(params, states, MULTS)


def test_found_inf_skips_everything():
    """The raw step op takes GradScaler's tensors as the per-call op does."""
    params, states = make_case("adamw", FP32)
    plan = torch.ops.mupopt.bind_adamw(
        params, *ops._lists(states, "exp_avg", "exp_avg_sq"), [], ops._lists(states, "step")[0],
        *ops._mults(MULTS, "lr", "wd", "eps"),
    )
    before_p, before_s = snapshot(params, states)
    hp = hparams("adamw")
    kw = dict(lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, weight_decay=hp.weight_decay, eps=hp.eps, amsgrad=False,
              maximize=False)
    assert torch.ops.mupopt.adamw_bound_(plan, grads_for(0, params), **kw, found_inf=torch.tensor([1.0]))
    assert_identical(before_p, before_s, params, states)
    assert plan.size() == len(SHAPES) and plan.op() == "adamw_"
