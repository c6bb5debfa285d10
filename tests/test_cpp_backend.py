"""The C++ "cpu" backend (csrc/, mupopt/kernels/cpp) against the reference backend.

The library is built here on first use (skipped only when no C++ compiler exists: then the
build's own sentence is the skip reason). Contract: 10 steps through the optimizer classes with
``backend="cpu"`` and ``backend="reference"`` from identical tensors and gradients, on odd sizes
(1, 7, 33x65, 0 and 100003 elements), three param groups with different hyperparameters, muP
width information on every parameter (multipliers other than 1), float32, bfloat16, float16 and
float64 storage (float64 computed in float64), maximize, amsgrad; then the raw ops: GradScaler's found_inf and grad_scale, errors; then the
build's laziness and its fallback without a compiler.

Tolerances. The CPU loops follow ATen's rounding sequence (fused multiply-adds where ATen's
vector kernels use them), so most results are bit-identical. The exception is the square root:
torch's CPU sqrt on a contiguous float32 tensor calls MKL's vsSqrt, which is not correctly
rounded (torch 2.13 on this machine: 1 ulp off on 20% of random inputs), while ours is IEEE
sqrtf. So AdamW/ADOPT/LAMB parameters agree to a few float32 ulps (rtol 1e-6), Sophia (no sqrt)
and the first and second moments of AdamW exactly. In bfloat16 such a float32 ulp (or LAMB's
norm, summed in float64 here, in float32 by torch) can send a stored value to the neighbouring
bf16 value: at most one bf16 ulp, on at most 1% of the elements. float16 storage (params,
states, gradients) is held to the same rule with float16's ulp: the rounding to float16 is
exact (round to nearest even, as torch), only the float32 sqrt ulp can flip it. float64 is
computed in float64 by both backends: within float64 round-off (rtol 1e-12; torch's float64 sqrt
is MKL's too, and LAMB's norms are summed in another order), Sophia and AdamW's moments exactly.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mupopt
from mupopt import backends
from mupopt.mup import WidthInfo
import mupopt.kernels.cpp as cpp_backend
from models import tensor_state

SHAPES = [(1,), (7,), (33, 65), (0,), (100003,), (5, 3)]
WIDTHS = [
    WidthInfo("vector", 1.0, 2.0),
    WidthInfo("vector", 1.0, 1.0),
    WidthInfo("hidden", 4.0, 2.0),
    WidthInfo("output", 8.0, 1.0),
    WidthInfo("vector", 1.0, 4.0),
    WidthInfo("input", 1.0, 3.0),
]
STEPS = 10
HESSIAN_EVERY = 3
SOPHIA_BS = 64

CASES = {
    "adamw": (mupopt.AdamW, dict(lr=1e-2, weight_decay=0.1, scale_eps=True)),
    "adopt": (mupopt.ADOPT, dict(lr=1e-2, weight_decay=0.1, scale_eps=True)),
    "lamb": (mupopt.LAMB, dict(lr=1e-2, weight_decay=0.1, scale_eps=True, hidden_lr_exponent=-0.5)),
    "sophia": (mupopt.SophiaG, dict(lr=1e-2, weight_decay=0.1, rho=0.04)),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register the C++ backends for this module only (until the package init does it for
    everyone), so that other modules' tests keep the registry they expect."""
    before = {name: set(backends.names(name)) for name in cpp_backend.OPTIMIZERS}
    cpp_backend.register()
    yield
    for name, names in before.items():
        for added in set(backends.names(name)) - names:
            del backends._REGISTRY[name][added]


@pytest.fixture(scope="module", autouse=True)
def library(registered):
    """Build (or load the cached) library once; skip only without a C++ compiler."""
    from mupopt.kernels.cpp import build

    outcome = build.load_cpu()
    if outcome is not True:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(outcome)
        pytest.fail(f"a C++ compiler exists but the build failed: {outcome}")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def make_params(dtypes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape, width, dtype in zip(SHAPES, WIDTHS, dtypes):
        p = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
        p.mupopt_width = width
        params.append(p)
    return params


def twin(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.mupopt_width = p.mupopt_width
        out.append(q)
    return out


def groups(name, params):
    """Three groups with different hyperparameters (LAMB: a clamp_value in the last one)."""
    last = {"lr": 2e-2}
    if name == "lamb":
        last["clamp_value"] = 0.5
    elif name != "sophia":
        last["wd_mode"] = "coupled"
    return [
        {"params": params[0:2]},
        {"params": params[2:4], "lr": 5e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)},
        {"params": params[4:], **last},
    ]


def set_grads(step, params, grad_dtype=None):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        if grad_dtype is not None and grad_dtype != p.dtype and hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # torch >= 2.10 otherwise insists that p.grad has p's dtype
        p.grad = torch.randn(p.shape, generator=gen).to(grad_dtype or p.dtype)


def run(name, opt, params, steps=STEPS, grad_dtype=None, first=0):
    for t in range(first, first + steps):
        set_grads(t, params, grad_dtype)
        if name == "sophia":
            if t % HESSIAN_EVERY == 0:
                opt.update_hessian()
            opt.step(bs=SOPHIA_BS)
        else:
            opt.step()


def close(ours, ref, what):
    if ours.numel() == 0:
        assert ref.numel() == 0
        return
    assert ours.dtype == ref.dtype, what
    if ours.dtype in (torch.bfloat16, torch.float16):
        a, b = ours.float(), ref.float()
        ulp = 2**-7 if ours.dtype == torch.bfloat16 else 2**-10
        torch.testing.assert_close(a, b, rtol=ulp, atol=1e-6, msg=lambda m: f"{what}: {m}")
        assert (a != b).float().mean().item() <= 0.01, f"{what}: more than 1% of {ours.dtype} elements differ"
    elif ours.dtype == torch.float64:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")


def assert_same(name, o_opt, r_opt, ours, ref):
    for i, (a, b) in enumerate(zip(ours, ref)):
        close(a.detach(), b.detach(), f"{name} param {i} {tuple(a.shape)}")
        sa, sb = o_opt.state[a], r_opt.state[b]
        assert sa.keys() == sb.keys(), (name, i)
        for key in sb:
            if key == "mup":  # the width record: numbers
                assert sa[key] == sb[key], (name, i)
            elif key == "step":
                assert torch.equal(sa[key], sb[key]), (name, i)
            else:
                close(sa[key], sb[key], f"{name} state {key!r} of param {i}")


def contract(name, dtypes, grad_dtype=None, **extra):
    cls, kwargs = CASES[name]
    ours = make_params(dtypes)
    ref = twin(ours)
    o = cls(groups(name, ours), **kwargs, **extra, backend="cpu")
    r = cls(groups(name, ref), **kwargs, **extra, backend="reference")
    run(name, o, ours, grad_dtype=grad_dtype)
    run(name, r, ref, grad_dtype=grad_dtype)
    assert_same(name, o, r, ours, ref)
    return o, r, ours, ref


FP32 = [torch.float32] * len(SHAPES)
BF16 = [torch.bfloat16] * len(SHAPES)
MIXED = [torch.float32, torch.bfloat16] * (len(SHAPES) // 2)
FP16 = [torch.float16] * len(SHAPES)
MIXED16 = [torch.float16, torch.float32, torch.bfloat16] * (len(SHAPES) // 3)
FP64 = [torch.float64] * len(SHAPES)
MIXED64 = [torch.float64, torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float64]


# ---------------------------------------------------------------------------------------------
# The contract through the optimizer classes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [FP32, BF16, MIXED, FP16, MIXED16, FP64, MIXED64],
                         ids=["fp32", "bf16", "mixed", "fp16", "mixed16", "fp64", "mixed64"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, dtypes):
    o, *_ = contract(name, dtypes)
    assert o.backend == "cpu"
    assert all(v == "cpu" for g in o.selected_backends for v in g.values()), o.selected_backends


@pytest.mark.parametrize("dtypes", [FP32, BF16, FP64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("name", list(CASES))
def test_maximize(name, dtypes):
    contract(name, dtypes, maximize=True)


@pytest.mark.parametrize("dtypes", [FP32, BF16, FP64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("maximize", [False, True])
def test_adamw_amsgrad(dtypes, maximize):
    contract("adamw", dtypes, amsgrad=True, maximize=maximize)


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_grads_of_fp32_params(name):
    """Gradients stored in bf16 beside fp32 params and states (the grad's own dtype per launch)."""
    contract(name, FP32, grad_dtype=torch.bfloat16)


@pytest.mark.parametrize("grad_dtype", [torch.float16, torch.float32, torch.bfloat16], ids=["fp16", "fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_fp16_params(name, grad_dtype):
    """float16 params and states with float16, float32 or bfloat16 gradients, 10 steps, stepped
    by "cpu" (no fallback): SophiaG (no square root) bit for bit the reference; the others within
    one float16 ulp on at most 1% of the elements (the float32 sqrt ulp of the module docstring,
    measured with this seed: one element of 2.3M compared values differs, in ADOPT with bf16
    gradients; AdamW and LAMB are bit for bit here)."""
    cls, kwargs = CASES[name]
    ours = make_params(FP16)
    ref = twin(ours)
    o = cls(groups(name, ours), **kwargs, backend="cpu")
    r = cls(groups(name, ref), **kwargs, backend="reference")
    run(name, o, ours, grad_dtype=grad_dtype)
    run(name, r, ref, grad_dtype=grad_dtype)
    assert all(v == "cpu" for g in o.selected_backends for v in g.values()), o.selected_backends
    assert_same(name, o, r, ours, ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.float16
        tensors = [(a.detach(), b.detach())] + [(o.state[a][k], r.state[b][k]) for k in tensor_state(r.state[b])]
        for x, y in tensors:
            if name == "sophia":
                assert torch.equal(x, y), f"sophia param {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_lamb_blocks_and_large_tensors(dtype):
    """csrc/cpu/lamb.cpp runs both passes per block of at most 2**20 elements: here a block of
    two tensors (keeping u in the scratch), a tensor that starts the next block because the sum
    would exceed 2**20, a tensor above 2**20 (u recomputed from the stored moments) and small
    ones after it. Against the reference, two groups: 3 steps in float32, 1 in bfloat16 (after
    that, on these sizes, a one-ulp flip of the first step (module docstring) carried by a
    parameter crossing zero exceeds the relative tolerance: 41 of 1.2M elements after the second step)."""
    sizes = [400_000, 500_000, 300_000, 2**20 + 3, 7, 1]
    gen = torch.Generator().manual_seed(5)
    ours = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in sizes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    cls, kwargs = CASES["lamb"]

    def two_groups(ps):
        return [{"params": ps[:3]}, {"params": ps[3:], "lr": 3e-2, "clamp_value": 0.5}]

    o = cls(two_groups(ours), **kwargs, backend="cpu")
    r = cls(two_groups(ref), **kwargs, backend="reference")
    steps = 1 if dtype == torch.bfloat16 else 3
    run("lamb", o, ours, steps=steps)
    run("lamb", r, ref, steps=steps)
    assert_same("lamb", o, r, ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_lamb_results_do_not_depend_on_the_threads(dtype):
    """csrc/cpu/lamb.cpp runs blocks of at most 2**20 elements whole on one thread each when they
    share out evenly (with 2 threads here: two blocks of four 2**18-element tensors and a block of
    5 elements), else with every thread on every pass (3 threads here); the chunks and the order
    of their partial sums are the same either way, so every result is bit for bit one thread's."""
    sizes = [2**18] * 8 + [5]
    threads_before = torch.get_num_threads()

    def run_with(threads):
        gen = torch.Generator().manual_seed(3)
        p, m = [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for _ in range(2)]
        v = [torch.rand(n, generator=gen).to(dtype) for n in sizes]
        steps = [torch.tensor(float(i % 2)) for i in range(len(sizes))]
        mults = [1.0 + 0.5 * (i % 3) for i in range(len(sizes))]
        torch.set_num_threads(threads)
        try:
            for t in range(2):
                g = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
                torch.ops.mupopt.lamb_(p, g, m, v, steps, mults, mults, lr=1e-2, beta1=0.9, beta2=0.999,
                                       weight_decay=0.01, eps=1e-6, clamp_value=0.5 if t else None, maximize=False)
        finally:
            torch.set_num_threads(threads_before)
        return p + m + v

    one = run_with(1)
    for threads in (2, 3):
        for i, (a, b) in enumerate(zip(one, run_with(threads))):
            assert torch.equal(a, b), f"{threads} threads, tensor {i}"


TRAFFIC_PASSES = {"adamw": [15, 13], "sophia": [15, 5], "sophia_hessian": [6, 4], "lamb": [15, 12, 13, 1]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("name", list(TRAFFIC_PASSES))
def test_traffic_op_moves_the_bytes_of_each_pass(name, dtype):
    """The benchmarks' no-math bound (torch.ops.mupopt.traffic_, csrc/cpu/traffic.cpp): each pass
    stores into the lists of its store mask the sum of the lists of its load mask (in the compute
    type, rounded to the storage dtype) and leaves the others alone: every byte of the byte model
    (mupopt/bench/model.py) is read or written."""
    passes = TRAFFIC_PASSES[name]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(4)
    used = 0
    for k in range(0, len(passes), 2):
        used |= passes[k] | passes[k + 1]
    lists = [[torch.randn(n, generator=gen).to(dtype) for n in N_OP] if used >> s & 1 else [] for s in range(4)]
    expected = [[t.clone() for t in lst] for lst in lists]
    initial = [[t.clone() for t in lst] for lst in lists]
    for k in range(0, len(passes), 2):
        load, store = passes[k], passes[k + 1]
        for i in range(len(N_OP)):
            total = torch.zeros(N_OP[i], dtype=compute)
            for s in range(4):
                if load >> s & 1:
                    total = total + expected[s][i].to(compute)
            for s in range(4):
                if store >> s & 1:
                    expected[s][i] = total.to(dtype)
    torch.ops.mupopt.traffic_(*lists, passes)
    for s in range(4):
        for i, (a, b) in enumerate(zip(lists[s], expected[s])):
            assert torch.equal(a, b), f"list {s}, tensor {i}"
    stored = sum(passes[k + 1] for k in range(0, len(passes), 2))
    assert all(not torch.equal(a, b) for s in range(4) if stored >> s & 1 for a, b in zip(lists[s], initial[s]) if a.numel())


def test_traffic_op_refuses_other_patterns():
    ts = [[torch.zeros(3)] for _ in range(4)]
    with pytest.raises(RuntimeError, match=r"no traffic pattern \(load 1, store 1\); supported: AdamW/ADOPT \(15, 13\)"):
        torch.ops.mupopt.traffic_(*ts, [1, 1])
    with pytest.raises(RuntimeError, match="passes must hold \\(load mask, store mask\\) pairs, got 3 values"):
        torch.ops.mupopt.traffic_(*ts, [15, 13, 15])


def test_one_openmp_runtime():
    """The library is built with -fopenmp and torch ships its own libgomp: both must run on one
    OpenMP runtime (two would keep two thread pools spinning on the same cores). Linux: one
    libgomp mapped into this process."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    torch.ops.mupopt.cpu_isa()  # the library is loaded
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libiomp" in line or "libomp" in line}
    assert len(runtimes) <= 1, runtimes


def test_adopt_first_step_and_later_steps_in_one_call():
    """A group added after 3 steps: one call holds tensors at s == 0 (v = g*g only) and s == 3."""
    cls, kwargs = CASES["adopt"]
    ours = make_params(FP32)
    ref = twin(ours)
    o = cls(ours[:3], **kwargs, backend="cpu")
    r = cls(ref[:3], **kwargs, backend="reference")
    run("adopt", o, ours[:3], steps=3)
    run("adopt", r, ref[:3], steps=3)
    o.add_param_group({"params": ours[3:], "lr": 3e-3})
    r.add_param_group({"params": ref[3:], "lr": 3e-3})
    run("adopt", o, ours, steps=4, first=3)
    run("adopt", r, ref, steps=4, first=3)
    assert_same("adopt", o, r, ours, ref)


@pytest.mark.parametrize("dtypes", [FP32, FP64], ids=["fp32", "fp64"])
def test_rounding_follows_aten(dtypes):
    """Where no square root is involved the results are bit-identical to the reference: Sophia
    entirely, AdamW's moments. (Guards the FMA choice: without it 11% of lerp results differ;
    in float64, guards float64 arithmetic: float32 math would differ everywhere.)"""
    o, r, ours, ref = contract("sophia", dtypes)
    for a, b in zip(ours, ref):
        assert torch.equal(a.detach(), b.detach())
    o, r, ours, ref = contract("adamw", dtypes)
    for a, b in zip(ours, ref):
        assert torch.equal(o.state[a]["exp_avg"], r.state[b]["exp_avg"])
        assert torch.equal(o.state[a]["exp_avg_sq"], r.state[b]["exp_avg_sq"])


def test_auto_picks_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    for name in cpp_backend.OPTIMIZERS:
        assert backends.names(name)[0] == "cpu", backends.names(name)
        assert backends.select(name, "auto", [torch.zeros(3), torch.zeros(2, 2, dtype=torch.bfloat16)]).name == "cpu"
        assert backends.select(name, "auto", [torch.zeros(3, dtype=torch.float16)]).name == "cpu"
    p = torch.zeros(4, requires_grad=True)
    opt = mupopt.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    assert backends.select("adamw", opt.backend, [p]).name == "cpu"


def test_unsupported_layouts_fall_back(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    strided = torch.zeros(4, 4).t()
    reason = cpp_backend.cpu_unsupported_reason([strided])
    assert "not contiguous" in reason
    assert backends.select("adamw", "auto", [strided]).name != "cpu"
    with pytest.raises(RuntimeError, match="not contiguous"):
        backends.select("adamw", "cpu", [strided])
    assert cpp_backend.cpu_unsupported_reason([torch.zeros(3, dtype=torch.float64)]) is None
    assert "int32" in cpp_backend.cpu_unsupported_reason([torch.zeros(3, dtype=torch.int32)])
    if torch.device("meta").type == "meta":
        assert "backend 'cpu' steps CPU tensors" in cpp_backend.cpu_unsupported_reason([torch.zeros(3, device="meta")])


# ---------------------------------------------------------------------------------------------
# The ops themselves: GradScaler arguments, errors
# ---------------------------------------------------------------------------------------------
N_OP = [1, 7, 100003, 0, 33 * 65]


def op_tensors(seed=0, dtype=torch.float32, step=3.0):
    """params, grads, exp_avgs, exp_avg_sqs (>= 0), max_exp_avg_sqs (>= 0), steps."""
    gen = torch.Generator().manual_seed(seed)

    def rand(positive=False):
        out = [torch.randn(n, generator=gen).to(dtype) for n in N_OP]
        return [t.abs() for t in out] if positive else out

    steps = [torch.tensor(step) for _ in N_OP]
    return rand(), rand(), rand(), rand(positive=True), rand(positive=True), steps


MULTS = [0.5, 1.0, 0.25, 2.0, 1.0]  # per tensor of N_OP


def call_op(name, ts, **extra):
    p, g, m, v, vmax, steps = ts
    ops = torch.ops.mupopt
    if name == "adamw":
        ops.adamw_(p, g, m, v, vmax, steps, MULTS, MULTS, MULTS, lr=1e-2, beta1=0.9, beta2=0.999,
                   weight_decay=0.1, eps=1e-8, amsgrad=True, maximize=False, **extra)
    elif name == "adopt":
        ops.adopt_(p, g, m, v, steps, MULTS, MULTS, MULTS, lr=1e-2, beta1=0.9, beta2=0.9999, weight_decay=0.1,
                   eps=1e-6, maximize=False, **extra)
    elif name == "lamb":
        ops.lamb_(p, g, m, v, steps, MULTS, MULTS, lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-6,
                  clamp_value=None, maximize=False, **extra)
    elif name == "sophia":
        ops.sophia_(p, g, m, v, steps, MULTS, MULTS, lr=1e-2, beta1=0.965, rho=0.04, bs=64.0, weight_decay=0.1,
                    maximize=False, **extra)
    elif name == "sophia_hessian":
        ops.sophia_hessian_(g, v, beta2=0.99, **extra)
    else:
        raise AssertionError(name)


F32_F64 = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])


@F32_F64
@pytest.mark.parametrize("name", ["adamw", "adopt", "lamb", "sophia", "sophia_hessian"])
def test_found_inf_skips_the_whole_update(name, dtype):
    """found_inf != 0: params, states and step counts untouched; found_inf == 0: exactly the
    unguarded call."""
    ts = op_tensors(dtype=dtype)
    before = [[t.clone() for t in lst] for lst in ts]
    call_op(name, ts, found_inf=torch.tensor([1.0]))
    for lst, old in zip(ts, before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)
    guarded, plain = op_tensors(dtype=dtype), op_tensors(dtype=dtype)
    call_op(name, guarded, found_inf=torch.tensor([0.0]))
    call_op(name, plain)
    changed = False
    for lst_a, lst_b, old in zip(guarded, plain, before):
        for a, b, o in zip(lst_a, lst_b, old):
            assert torch.equal(a, b)
            changed |= not torch.equal(a, o)
    assert changed
    if name != "sophia_hessian":
        assert all(s.item() == 4.0 for s in plain[5])


@F32_F64
@pytest.mark.parametrize("name", ["adamw", "lamb", "sophia"])
def test_grad_scale_unscales_inside_the_kernel(name, dtype):
    scaled, plain = op_tensors(dtype=dtype), op_tensors(dtype=dtype)
    scaled[1][:] = [g * 1024 for g in scaled[1]]  # a power of two: unscaling is exact
    call_op(name, scaled, grad_scale=torch.tensor([1024.0]))
    call_op(name, plain)
    for k in (0, 2, 3):
        for a, b in zip(scaled[k], plain[k]):
            assert torch.equal(a, b)


def test_op_forms_the_reference_scalars():
    """The op's own per-tensor scalars (from steps and multipliers) equal the reference's: one
    call against adamw_reference on the same tensors, per-tensor step counts differing."""
    from mupopt.mup import Multipliers
    from mupopt.optim.adamw import AdamWHparams, adamw_reference

    ours = op_tensors(step=0.0)
    ours[5][:] = [torch.tensor(float(k)) for k in range(len(N_OP))]  # steps 0..4
    ref = [[t.clone() for t in lst] for lst in ours]
    hp = AdamWHparams(1e-2, 0.9, 0.999, 1e-8, 0.1, True, False)
    call_op("adamw", ours)
    states = [{"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vm, "step": s} for m, v, vm, s in zip(*ref[2:])]
    adamw_reference(ref[0], ref[1], states, [Multipliers(x, x, x) for x in MULTS], hp)
    for lst_a, lst_b in zip(ours, ref):
        for a, b in zip(lst_a, lst_b):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # sqrt: see the module docstring
    assert [s.item() for s in ours[5]] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_op_errors_name_the_tensor():
    p, g, m, v, vmax, steps = op_tensors()
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False, maximize=False)
    adamw_ = torch.ops.mupopt.adamw_
    with pytest.raises(RuntimeError, match=r"exp_avgs\[2\] is Half but params\[2\] is Float; states must have"):
        bad = list(m)
        bad[2] = bad[2].half()
        adamw_(p, g, bad, v, [], steps, MULTS, MULTS, MULTS, **kw)
    # bfloat16 states of a float32 param are state_bits=16, but all of a tensor's states or none
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[2\] is Float but exp_avgs\[2\] is BFloat16; a tensor's "
                                           r"states share one format"):
        bad = list(m)
        bad[2] = bad[2].bfloat16()
        adamw_(p, g, bad, v, [], steps, MULTS, MULTS, MULTS, **kw)
    with pytest.raises(RuntimeError, match="grads has 4 tensors but params has 5"):
        adamw_(p, g[:4], m, v, [], steps, MULTS, MULTS, MULTS, **kw)
    with pytest.raises(RuntimeError, match="wd_mults has 3 values for 5 tensors"):
        adamw_(p, g, m, v, [], steps, MULTS, MULTS[:3], MULTS, **kw)
    with pytest.raises(RuntimeError, match=r"state_steps\[1\] must be a float32 CPU tensor with one element"):
        adamw_(p, g, m, v, [], [steps[0], torch.tensor(3.0, dtype=torch.float64), *steps[2:]], MULTS, MULTS, MULTS, **kw)
    with pytest.raises(RuntimeError, match="not contiguous"):
        q = list(p)
        q[4] = torch.zeros(65, 33).t()
        adamw_(q, g, m, v, [], steps, MULTS, MULTS, MULTS, **kw)
    # float64 goes with float64: a float32 param with a float64 gradient, and the other way round.
    with pytest.raises(RuntimeError, match=r"grads\[1\] is Double but params\[1\] is Float; float64 gradients need"):
        adamw_(p, [g[0], g[1].double(), *g[2:]], m, v, [], steps, MULTS, MULTS, MULTS, **kw)
    p64, g64, m64, v64, _, _ = op_tensors(dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is Float but params\[0\] is Double"):
        adamw_(p64, [g64[0].float(), *g64[1:]], m64, v64, [], steps, MULTS, MULTS, MULTS, **kw)
    with pytest.raises(RuntimeError, match=r"params\[0\] is a Int tensor.*supported: float32, bfloat16, float16, float64"):
        adamw_([torch.zeros(1, dtype=torch.int32), *p[1:]], g, m, v, [], steps, MULTS, MULTS, MULTS, **kw)
    # Every failure above left everything as it was (checks come before any write).
    assert all(s.item() == 3.0 for s in steps)


def test_isa_follows_aten():
    isa = torch.ops.mupopt.cpu_isa()
    assert isa in ("avx512+fma", "avx2+fma", "fma", "plain")
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert isa == {"AVX2": "avx2+fma", "AVX512": "avx512+fma"}[torch.backends.cpu.get_cpu_capability()]
    elif torch.backends.cpu.get_cpu_capability() == "DEFAULT" and sys.platform.startswith("linux"):
        assert isa in ("plain", "fma")


# ---------------------------------------------------------------------------------------------
# Build behaviour (fresh interpreters)
# ---------------------------------------------------------------------------------------------
def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **env)
    full_env.pop(backends.ENV_VAR, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env["PYTHONPATH"] = root + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True, timeout=300)


def test_ahead_of_time_command(capsys):
    """`python -m mupopt.kernels.cpp.build` (here in-process: the library is already built, so
    this only checks the command's contract)."""
    from mupopt.kernels.cpp import build

    assert build.main(["--quiet"]) == 0
    assert "mupopt cpu library ready" in capsys.readouterr().out


def test_built_library_loads_in_every_process_without_building():
    """Once the library is built, every process of a job loads it from the cache as it is: no
    compiler, ninja or lock (build.loads records "cached"; torch's JIT build, which each
    process here is forbidden to call, would record "built"). Two processes at once, as two
    ranks start."""
    from mupopt.kernels.cpp import build

    assert build.load_cpu() is True
    code = textwrap.dedent(
        """
        from torch.utils import cpp_extension
        def forbidden(*args, **kwargs):
            raise AssertionError("torch's JIT build was called")
        cpp_extension.load = forbidden
        from mupopt.kernels.cpp import build
        assert build.load_cpu() is True, build.load_cpu()
        print([r["how"] for r in build.loads])
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ranks = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for rank in ranks:
        out, err = rank.communicate(timeout=300)
        assert rank.returncode == 0 and out.strip() == "['cached']", err[-2000:]


def test_import_and_register_build_nothing(tmp_path):
    res = _python(
        """
        import os, sys
        import mupopt, mupopt.kernels.cpp as c
        c.register()
        assert "mupopt.kernels.cpp.build" not in sys.modules, "imported the builder"
        root = os.environ["TORCH_EXTENSIONS_DIR"]
        assert not os.path.exists(root) or not os.listdir(root), os.listdir(root)
        print("ok")
        """,
        tmp_path,
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_without_compiler_auto_falls_back_and_explicit_raises(tmp_path):
    res = _python(
        """
        import torch, mupopt, mupopt.kernels.cpp as c
        from mupopt import backends
        c.register()
        t = [torch.zeros(3)]
        reason = c.cpu_unsupported_reason(t)
        assert reason.startswith("no C++ compiler"), reason
        assert backends.select("adamw", "auto", t).name != "cpu"
        p = torch.zeros(3, requires_grad=True); p.grad = torch.ones(3)
        mupopt.AdamW([p]).step()                       # auto: the next backend steps
        try:
            mupopt.AdamW([p], backend="cpu").step()
        except RuntimeError as exc:
            assert "no C++ compiler" in str(exc), exc
            print("ok")
        """,
        tmp_path,
        CXX="/nonexistent/c++",
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_a_wheel_carries_the_sources(tmp_path):
    """An installed wheel (not the editable checkout) carries csrc/ as package data, every source
    file byte for byte (the cache digest of its copy equals the checkout's), so the cpu library
    loads from the copy, from outside the checkout, without a second build: the build cache is
    shared by identical sources wherever they lie (mupopt/kernels/cpp/build.py). A file missing
    from the wheel changes the digest; the child then builds (or fails) and says so. The wheel is
    built from a copy of the checkout, so that setuptools writes nothing into the checkout."""
    from mupopt.kernels.cpp import build

    assert build.load_cpu() is True  # the checkout's library, in this process's cache
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("mupopt", "csrc"):
        shutil.copytree(os.path.join(root, name), src / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(root, name), src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("mupopt-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   timeout=300)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    env.pop("MUPOPT_CSRC", None)
    code = """
        import sys, torch, mupopt
        from mupopt.kernels.cpp import build
        site, digest = sys.argv[1], sys.argv[2]
        assert mupopt.__file__.startswith(site), mupopt.__file__
        assert str(build.csrc_dir()).startswith(site) and not build.csrc_dir().is_symlink(), build.csrc_dir()
        assert build._digest("cpu", build.CXX_FLAGS) == digest, "the wheel's sources differ from the checkout's"
        assert build.load_cpu() is True
        assert [ld["how"] for ld in build.loads] == ["cached"], build.loads
        p = torch.ones(5, requires_grad=True); p.grad = torch.ones(5)
        mupopt.AdamW([p], backend="cpu", lr=0.1).step()
        assert p.detach().lt(1).all()
        print("ok")
        """
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(tmp_path / "site"),
                          build._digest("cpu", build.CXX_FLAGS)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_a_build_prints_one_line_with_what_and_how_long(tmp_path, monkeypatch, capsys):
    """The first step that compiles the library says what is built and how long it took, in one
    line on stderr; loading it from the cache afterwards prints nothing."""
    import re

    from torch.utils import cpp_extension

    from mupopt.kernels.cpp import build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    calls = []

    def fake_load(name, **kwargs):  # what torch leaves behind: the library in the build folder
        calls.append(name)
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / f"{name}.so").write_bytes(b"")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    build._load("cpu", verbose=False)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(r"building the cpu C\+\+ library .* in \d+\.\d s$", err.strip()), err
    assert str(tmp_path) in err
    build._load("cpu", verbose=False)  # cached: silent
    assert capsys.readouterr().err == ""
    assert len(calls) == 2
