"""Tensor learning rates, no Triton re-specialisation, the custom ops, torch.compile.

1. A ``torch.tensor(lr)`` group lr, changed in place as schedulers do for tensor lrs
   (``group["lr"].fill_(...)``), gives the trajectory of the same float lrs, on every backend.
2. Changing lr (or GradScaler's scale) changes no Triton specialisation: every per-tensor scalar
   is runtime data in the scalar table, so each kernel keeps one specialisation key (computed
   with Triton's own binder for sm_90, no GPU needed) and the launch tables stay cached. On a GPU
   the count of compiled kernels is checked directly.
3. The triton step functions are ``torch.library`` custom ops with exact mutation annotations
   (``torch.library.opcheck``, and a direct check of what each op writes).
4. ``torch.compile`` of a training step (forward, backward, ``opt.step()``, ``zero_grad``) gives
   eager's parameters over 3 steps: mupopt.AdamW with backend="reference" under inductor on the
   CPU, backend="triton" through its custom op (CPU interpreter here; compiled on a GPU, marked
   ``gpu``). A whole training step may break the graph (backward, Triton's host tables); the
   result is what is checked there.
5. ``torch.compile(opt.step, fullgraph=True)`` traces the optimizer step without a graph break
   for the optimizers and backends of FULLGRAPH, and matches eager.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mupopt
import triton_mode

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = False
if HAVE_TRITON:
    with triton_mode.defining_kernels():
        from mupopt.kernels import triton as mt
        from mupopt.kernels.triton import _common  # defines the kernels: their mode is fixed here

    INTERPRET = _common.INTERPRET

TRITON_CPU = HAVE_TRITON and INTERPRET
TRITON_GPU = HAVE_TRITON and torch.cuda.is_available() and not INTERPRET
SHAPES = [(7,), (16, 8), (5000,), (4, 12)]


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    if HAVE_TRITON:
        mt.register()
        triton_mode.match_environment(monkeypatch, INTERPRET)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def leaves(device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device).requires_grad_() for s in SHAPES]


def grads_for(step, params):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.device) for p in params]


# ---------------------------------------------------------------------------------------------
# 1. Tensor lr
# ---------------------------------------------------------------------------------------------
ELEMENTWISE = {
    "adamw": (mupopt.AdamW, dict(weight_decay=0.1), {}),
    "adopt": (mupopt.ADOPT, dict(weight_decay=0.1), {}),
    "lamb": (mupopt.LAMB, dict(weight_decay=0.1), {}),
    "sophia": (mupopt.SophiaG, dict(weight_decay=0.1), {"bs": 64}),
}
OTHERS = {
    "muon": (mupopt.Muon, dict(ns_dtype=torch.float32), {}),
    "shampoo": (mupopt.Shampoo, dict(), {}),
}
LRS = [1e-2, 1e-2, 5e-3, 2.5e-3]  # per step: changed twice after construction

TENSOR_LR_CASES = [
    *[pytest.param(n, "reference", id=f"{n}-reference") for n in (*ELEMENTWISE, *OTHERS)],
    *[pytest.param(n, "triton", id=f"{n}-triton", marks=pytest.mark.skipif(not TRITON_CPU, reason="no triton on the CPU"))
      for n in ELEMENTWISE],
]


@pytest.mark.parametrize("name,backend", TENSOR_LR_CASES)
def test_tensor_lr_matches_float_lr(name, backend):
    cls, kwargs, step_kwargs = {**ELEMENTWISE, **OTHERS}[name]
    float_params, tensor_params = leaves(), leaves()
    a = cls(float_params, lr=float(torch.tensor(LRS[0])), **kwargs, backend=backend)
    b = cls(tensor_params, lr=torch.tensor(LRS[0]), **kwargs, backend=backend)
    for t, lr in enumerate(LRS):
        # A float32 tensor holds lr rounded to float32 (5e-3 -> 0.004999999888...): the float
        # run uses that same value, as torch.optim would read it.
        a.param_groups[0]["lr"] = float(torch.tensor(lr))
        b.param_groups[0]["lr"].fill_(lr)  # what schedulers do with a tensor lr
        for p, q, g in zip(float_params, tensor_params, grads_for(t, float_params)):
            p.grad, q.grad = g, g.clone()
        a.step(**step_kwargs)
        b.step(**step_kwargs)
    assert isinstance(b.param_groups[0]["lr"], torch.Tensor)
    for p, q in zip(float_params, tensor_params):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# 2. No re-specialisation of the Triton kernels
# ---------------------------------------------------------------------------------------------
_SPECIALISATION_SCRIPT = textwrap.dedent(
    r"""
    import dataclasses, json, os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    sys.path.insert(0, sys.argv[1])
    import mupopt
    from mupopt import backends
    from mupopt.kernels.triton import _common
    assert not _common.INTERPRET
    target = make_backend(GPUTarget("cuda", 90, 32))
    binders, launches = {}, []

    def hook(kernel, grid, args, meta):
        # Triton's own binder: the specialisation key under which it caches a compiled kernel
        # (argument types, pointer alignment, integer specialisations, constexprs, options).
        binder = binders.setdefault(kernel, create_function_from_signature(kernel.signature, kernel.params, target))
        _, specialization, options = binder(*args, **meta)
        launches.append((kernel.__name__, repr(specialization) + repr(options)))

    _common.LAUNCH_HOOK = hook  # the kernels are specialised, not run: CPU tensors are fine
    for name in ("adamw", "adopt", "lamb", "sophia", "sophia_hessian"):
        b = backends._REGISTRY[name]["triton"]
        backends._REGISTRY[name]["triton"] = dataclasses.replace(b, unsupported_reason=lambda ts: None)

    out = {}
    cases = {"adamw": mupopt.AdamW, "adopt": mupopt.ADOPT, "lamb": mupopt.LAMB, "sophia": mupopt.SophiaG}
    for name, cls in cases.items():
        launches.clear()
        params = [torch.zeros(5000, requires_grad=True), torch.zeros(7, requires_grad=True)]
        opt = cls(params, lr=torch.tensor(1e-2), backend="triton")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        kw = {"bs": 64} if name == "sophia" else {}
        sizes = []
        for t, lr in enumerate([1e-2, 3e-3, 7e-4, 1e-1]):
            opt.param_groups[0]["lr"].fill_(lr)
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            if name == "sophia":
                opt.update_hessian()
            opt.step(**kw)
            for p in params:  # GradScaler, its scale growing every step (growth_interval=1)
                p.grad = scaler.scale(torch.full_like(p, 0.5))
            scaler.step(opt, **kw)
            scaler.update()
            sizes.append(len(_common._CACHE))
        keys = {}
        for kernel, key in launches:
            keys.setdefault(kernel, set()).add(key)
        out[name] = {"launches": len(launches), "keys": {k: len(v) for k, v in keys.items()},
                     "cache_sizes": sizes, "final_scale": scaler.get_scale()}
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_changing_lr_and_scale_never_respecialise_the_kernels():
    """4 steps with a tensor lr changed in place every step, each followed by a GradScaler step
    whose scale doubles every step: each kernel has exactly 2 specialisation keys (without and
    with a grad scale; 1 for kernels that never see a scale), whatever the lr and scale values,
    and the launch tables are built once (the cache holds one plan per op)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no binder API to compute specialisation keys")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _SPECIALISATION_SCRIPT, root], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_kernels = {
        "adamw": {"_adamw_kernel"},
        "adopt": {"_adopt_kernel"},
        "lamb": {"_lamb_norms_kernel", "_lamb_trust_kernel", "_lamb_update_kernel"},
        "sophia": {"_sophia_kernel", "_sophia_hessian_kernel"},
    }
    for name, result in out.items():
        assert set(result["keys"]) == expected_kernels[name], result
        for kernel, count in result["keys"].items():
            # One key without and one with a grad scale; LAMB's trust kernel reads no gradient
            # and update_hessian is never given a scale here: one key each.
            single = kernel in ("_lamb_trust_kernel", "_sophia_hessian_kernel")
            assert count == (1 if single else 2), (name, kernel, result)
        assert result["launches"] >= 8
        assert result["final_scale"] == 2.0**14  # the scale did change: 2^10 doubled 4 times
        # one plan per op (Sophia: step and Hessian EMA), built at the first step, then hit
        first = result["cache_sizes"][0]
        assert result["cache_sizes"] == [first] * 4


@pytest.mark.skipif(not TRITON_CPU, reason="no triton on the CPU")
def test_tensor_lr_keeps_the_launch_tables_cached():
    params = leaves()
    opt = mupopt.AdamW(params, lr=torch.tensor(1e-2), backend="triton")
    _common.clear_cache()
    plans = []
    for t, lr in enumerate(LRS):
        opt.param_groups[0]["lr"].fill_(lr)
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        opt.step()
        plans.append(next(reversed(_common._CACHE.values())))
    assert len(_common._CACHE) == 1 and all(p is plans[0] for p in plans)


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_GPU, reason="needs CUDA and compiled kernels")
def test_gpu_compiled_kernel_count_is_constant_under_changing_lr():
    from mupopt.kernels.triton.adamw import _adamw_kernel

    if not hasattr(_adamw_kernel, "device_caches"):
        pytest.skip("this triton keeps its kernel cache elsewhere")

    def compiled():
        return sum(len(cache[0]) for cache in _adamw_kernel.device_caches.values())

    params = leaves("cuda")
    opt = mupopt.AdamW(params, lr=torch.tensor(1e-2), backend="triton")
    counts = []
    for t, lr in enumerate([1e-2, 3e-3, 7e-4, 1e-1, 2e-2]):
        opt.param_groups[0]["lr"].fill_(lr)
        for p, g in zip(params, grads_for(t, params)):
            p.grad = g
        opt.step()
        counts.append(compiled())
    assert counts == [counts[0]] * len(counts)


# ---------------------------------------------------------------------------------------------
# 3. The custom ops
# ---------------------------------------------------------------------------------------------
_HPARAMS = {
    "adamw": [1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, 0.0],  # lr b1 b2 eps wd amsgrad maximize
    "adopt": [1e-2, 0.9, 0.9999, 1e-6, 0.1, 0.0],
    "lamb": [1e-2, 0.9, 0.999, 1e-6, 0.1, float("nan"), 0.0],  # clamp_value None
    "sophia": [1e-2, 0.965, 0.99, 0.04, 0.1, 64.0, 0.0],
    "sophia_hessian": [1e-2, 0.965, 0.99, 0.04, 0.1, 64.0, 0.0],
}


def op_args(name, unscale):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5000, generator=gen), torch.randn(3, 4, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    written, read, _, counts_steps = mt._OP_SPECS[name]
    keys = [k for k in written if k != "max_exp_avg_sq"]
    states = [torch.rand(p.shape, generator=gen) for _ in keys for p in params]
    read_states = [torch.rand(p.shape, generator=gen) for _ in read for p in params]
    steps = [torch.tensor(1.0) for _ in params] if counts_steps else []
    args = [params, grads, states, read_states, steps, keys, list(read), [1.0, 2.0, 0.5] * 2, _HPARAMS[name]]
    if unscale:
        args.append(torch.tensor(0.25))
    return args


OPS = [pytest.param(n, u, id=f"{mt.op_name(n, u) if HAVE_TRITON else n}") for n in ELEMENTWISE.keys() | {"sophia_hessian"}
       for u in (False, True)] if HAVE_TRITON else []


@pytest.mark.skipif(not TRITON_CPU, reason="no triton on the CPU")
@pytest.mark.parametrize("name,unscale", sorted(OPS, key=lambda p: p.id))
def test_custom_op_opcheck_and_exact_mutations(name, unscale):
    op = getattr(torch.ops.mupopt, mt.op_name(name, unscale)).default
    torch.library.opcheck(op, op_args(name, unscale))  # schema (declared mutations), fake, aot

    args = op_args(name, unscale)
    before = [[t.clone() for t in arg] if isinstance(arg, list) and arg and isinstance(arg[0], torch.Tensor) else None
              for arg in args[:5]]
    op(*args)
    _, _, writes_params, counts_steps = mt._OP_SPECS[name]
    expected = {"params": writes_params, "grads": unscale, "states": True, "read_states": False, "steps": counts_steps}
    for (arg_name, writes), now, old in zip(expected.items(), args[:5], before):
        if old is None:
            continue
        changed = any(not torch.equal(a, b) for a, b in zip(now, old))
        assert changed == writes, f"{arg_name}: written {changed}, declared {writes}"
        declared = any(a.name == arg_name and a.alias_info is not None and a.alias_info.is_write
                       for a in op._schema.arguments)
        assert declared == writes


# ---------------------------------------------------------------------------------------------
# 4. torch.compile of a training step
# ---------------------------------------------------------------------------------------------
def _train(backend, device, compile_backend, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    opt = mupopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen).to(device), torch.randn(32, 4, generator=gen).to(device)

    def train_step():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    step = train_step if compile_backend is None else torch.compile(train_step, backend=compile_backend)
    for _ in range(steps):
        step()
    return model, opt


def _assert_same_training(eager, compiled):
    (m_e, o_e), (m_c, o_c) = eager, compiled
    for a, b in zip(m_e.parameters(), m_c.parameters()):
        # inductor fuses forward and backward differently: float32 rounding, not bits
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for key, value in o_e.state[a].items():
            torch.testing.assert_close(o_c.state[b][key], value, rtol=1e-5, atol=1e-6)
    assert all(o_c.state[p]["step"].item() == 3 for p in m_c.parameters())


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_reference_backend_inductor(_fresh_dynamo):
    """Inductor on the CPU (needs a C++ compiler; about 10 s here)."""
    _assert_same_training(_train("reference", "cpu", None), _train("reference", "cpu", "inductor"))


@pytest.mark.skipif(not TRITON_CPU, reason="no triton on the CPU")
def test_compiled_training_step_triton_backend_puts_the_op_in_the_graph(_fresh_dynamo):
    """Triton kernels in the interpreter: the graph holds the custom op, and inductor's result
    matches eager."""
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    _assert_same_training(_train("triton", "cpu", None), _train("triton", "cpu", recording))
    assert any("torch.ops.mupopt.adamw_triton_" in g for g in graphs)
    torch._dynamo.reset()
    _assert_same_training(_train("triton", "cpu", None), _train("triton", "cpu", "inductor"))


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_GPU, reason="needs CUDA and compiled kernels")
def test_compiled_training_step_triton_backend_gpu(_fresh_dynamo):
    _assert_same_training(_train("triton", "cuda", None), _train("triton", "cuda", "inductor"))


def _compiled_against_eager(make, x, *, fullgraph=True, eager_first=False, step_kwargs=None):
    """(compiled, eager): the models of two ``make()`` (model, optimizer) pairs after 3 steps on
    the loss mean(model(x)^2), one optimizer's step through torch.compile(opt.step) (its first
    step eager when ``eager_first``), the other's eager; in each round the compiled one first,
    torch's generator seeded alike before each (stochastic rounding draws its seeds there)."""
    kw = step_kwargs or {}
    (eager_model, eager_opt), (model, opt) = make(), make()
    compiled = torch.compile(lambda: opt.step(**kw), fullgraph=fullgraph)
    for i in range(3):
        for m, o, step in ((model, opt, (lambda: opt.step(**kw)) if i == 0 and eager_first else compiled),
                           (eager_model, eager_opt, lambda: eager_opt.step(**kw))):
            torch.manual_seed(42 + i)
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            step()
    return model, eager_model


FULLGRAPH = [
    ("adamw", "reference"), ("adamw", "auto"), ("adopt", "reference"), ("adopt", "auto"), ("lamb", "reference"),
    ("sophia", "reference"), ("muon", "reference"),
]


@pytest.mark.parametrize("name,backend", FULLGRAPH)
def test_compiled_step_has_no_graph_break_and_matches_eager(name, backend):
    """torch.compile(opt.step, fullgraph=True) traces the whole step (issue 15 item 4): the plan
    is built in the trace (no cache, no storage fingerprints), the C++ backends' ops go into the
    graph through their fake kernels, and 3 compiled steps equal 3 eager ones (ADOPT's reference
    traces its capturable form, which selects the first step on the device). Not here: Shampoo
    (non-finite and root checks read values), which breaks the graph and still runs."""
    import torch._dynamo

    torch._dynamo.reset()
    cls = {"adamw": mupopt.AdamW, "adopt": mupopt.ADOPT, "lamb": mupopt.LAMB, "sophia": mupopt.SophiaG,
           "muon": mupopt.Muon}[name]
    kw = {"ns_dtype": torch.float32} if name == "muon" else {}
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        return model, cls(model.parameters(), lr=1e-2, backend=backend, **kw)

    model, eager_model = _compiled_against_eager(make, x, step_kwargs={"bs": 64} if name == "sophia" else {})
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_compiled_step_with_width_and_depth_information_has_no_graph_break():
    """The fullgraph trace of a muP model (set_base_shapes names every parameter, set_base_depth
    adds depth records): the plan reads each parameter's record, whose name check took the
    CRC-32 of the name, which dynamo cannot trace (graph break, so fullgraph=True failed for
    every muP model, the case the library is for). 3 compiled steps equal 3 eager ones."""
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))

    def mlp(width):
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Linear(width, width),
                                   torch.nn.Linear(width, width), torch.nn.Linear(width, 3))

    def make():
        torch.manual_seed(0)
        model = mlp(32)
        with torch.device("meta"):
            base, delta = mlp(8), mlp(16)
        mupopt.set_base_shapes(model, base, delta=delta)
        mupopt.set_base_depth(model, [model[1], model[2]], base_depth=1, alpha=0.5)
        opt = mupopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, backend="reference")
        assert len({m.lr for m in opt.group_multipliers(opt.param_groups[0])}) > 2  # muP and depth at work
        return model, opt

    model, eager_model = _compiled_against_eager(make, x)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


_FIRST_STEP_COMPILED = textwrap.dedent(
    """
    import json, torch, mupopt

    out = {}
    graphs = []

    def record(gm, example_inputs):  # a dynamo backend that keeps the graph's code and runs it
        graphs.append(gm.code)
        return gm.forward

    for bits in (32, 8):
        x = torch.randn(8, 128, generator=torch.Generator().manual_seed(3))

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 3))
            return model, mupopt.AdamW(model.parameters(), lr=1e-2, state_bits=bits)

        (eager_model, eager_opt), (model, opt) = make(), make()
        compiled = torch.compile(opt.step, fullgraph=True, backend=record)
        for _ in range(3):
            for m, o, step in ((model, opt, compiled), (eager_model, eager_opt, eager_opt.step)):  # compiled first
                o.zero_grad()
                m(x).pow(2).mean().backward()
                step()
        out[bits] = {"selected": eager_opt.selected_backends, "graph_calls_the_op": "mupopt.adamw" in graphs[-1],
                     "max_diff": max((p - q).abs().max().item()
                                     for p, q in zip(model.parameters(), eager_model.parameters()))}
    print(json.dumps(out))
    """
)


def test_first_step_of_a_fresh_process_compiles_with_fullgraph():
    """In a fresh process, the first step of the default (auto -> cpu) backend traced with
    fullgraph=True: the C++ library is loaded when the optimizer is made and format 8's map tables
    with it, since neither can be made inside a trace (both failed before: a lock, then
    data-dependent checks; the other tests of this file found them made by earlier tests). With
    32- and 8-bit states, the traced graph calls the cpu backend's op (the eager optimizer chose
    it; a compiled step keeps no plan, so its selected_backends stays empty) and the compiled
    steps equal the eager ones."""
    from mupopt.kernels import cpp

    cpp.register()
    if cpp.cpu_unsupported_reason([torch.zeros(4)]) is not None:
        pytest.skip("the cpu backend is not built here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _FIRST_STEP_COMPILED], capture_output=True, text=True, timeout=600,
                          cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for bits in ("32", "8"):
        assert out[bits]["selected"] == [{"adamw": "cpu"}] and out[bits]["graph_calls_the_op"], out
        assert out[bits]["max_diff"] <= 1e-6, out


def _sr_runs(backend: str, fullgraph: bool, eager_first: bool) -> float:
    """Largest |compiled - eager| of bf16 params after 3 AdamW steps with stochastic rounding,
    the compiled optimizer's first step eager when ``eager_first``."""
    torch._dynamo.reset()
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(3)).bfloat16()

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 3)).bfloat16()
        return model, mupopt.AdamW(model.parameters(), lr=1e-2, backend=backend, stochastic_rounding=True)

    model, eager_model = _compiled_against_eager(make, x, fullgraph=fullgraph, eager_first=eager_first)
    return max((p.float() - q.float()).abs().max().item() for p, q in zip(model.parameters(), eager_model.parameters()))


def test_compiled_stochastic_rounding_draws_its_seeds_eagerly():
    """stochastic_rounding under torch.compile. Each param's seed is drawn at its first step,
    outside the graph (a graph break): traced, it was a symbolic integer, which the cpu op's int
    list refused and inductor's C++ code for the reference backend's hash failed to build. The
    reference backend's stochastic store runs eagerly as well. Compiled from the first step
    (fullgraph=False), both backends equal eager bit for bit; with fullgraph=True the first step
    says to take it eagerly, and the compiled steps after it equal eager bit for bit."""
    from mupopt.kernels import cpp

    assert _sr_runs("reference", fullgraph=False, eager_first=False) == 0.0
    cpp.register()
    if cpp.cpu_unsupported_reason([torch.zeros(4)]) is None:
        assert _sr_runs("cpu", fullgraph=False, eager_first=False) == 0.0
        assert _sr_runs("cpu", fullgraph=True, eager_first=True) == 0.0
    with pytest.raises(Exception, match="take that step eagerly"):
        _sr_runs("reference", fullgraph=True, eager_first=False)


def _well_conditioned(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix, rows <= cols, with singular values in [0.5, 1]."""
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=gen))
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    return (u * (0.5 + 0.5 * torch.rand(rows, generator=gen))) @ q.T


def test_compiled_muon_with_its_default_ns_dtype_has_no_graph_break():
    """Muon(ns_dtype=None) picks its Newton-Schulz dtype from the CPU (cpu_bf16_matmuls_fast),
    which read torch.backends.mkldnn.is_available inside the trace, a function dynamo refuses:
    fullgraph=True failed. torch.compile now takes the answer as a constant; 3 compiled steps
    equal eager ones. float32 NS (CPUs without AMX): within 1e-6. bf16 NS (CPUs with AMX): the
    quintic iteration amplifies a rounding difference in the directions of small singular values
    (about 3.4x per iteration), so compiled and eager differ as much as bf16 and float32 NS do
    (measured 0.9-1.7x of that, 2-3% of the params' movement, with these well-conditioned
    gradients; a rank-deficient gradient's null space fills with rounding noise, 25% of the
    elements apart). Bound: 2.5x the bf16-float32 distance and 10% of the movement."""
    from mupopt.optim import muon

    torch._dynamo.reset()

    def make(**kw):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(64, 128) * 0.05), torch.nn.Parameter(torch.randn(32, 64) * 0.05)]
        return ps, mupopt.Muon(ps, lr=1e-2, **kw)

    (compiled_ps, compiled_opt), (eager_ps, eager_opt), (f32_ps, f32_opt) = make(), make(), make(ns_dtype=torch.float32)
    start = [p.detach().clone() for p in eager_ps]
    compiled = torch.compile(lambda: compiled_opt.step(), fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads = [_well_conditioned(64, 128, gen), _well_conditioned(32, 64, gen)]
        for ps in (compiled_ps, eager_ps, f32_ps):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        compiled()
        eager_opt.step()
        f32_opt.step()
    for p, q, r, p0 in zip(compiled_ps, eager_ps, f32_ps, start):
        apart = float((p - q).abs().max())
        if muon.default_ns_dtype("cpu") == torch.float32:
            assert apart <= 1e-6
        else:
            assert apart <= min(2.5 * float((q - r).abs().max()), 0.1 * float((q - p0).abs().max())), apart


@pytest.mark.skipif(not TRITON_CPU, reason="needs triton's interpreter (CPU tensors)")
def test_fullgraph_with_a_backend_that_is_not_capturable_says_that_compile_asked_for_it(_fresh_dynamo):
    """torch.compile sets capturable=True in every param group of an optimizer it traces
    (dynamo's OptimizerVariable), so an explicit backend without it cannot step a fullgraph
    trace. The error says that compile, not the user, asked for capturable."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8)
    opt = mupopt.AdamW(model.parameters(), lr=1e-2, backend="triton")
    model(torch.randn(4, 16)).pow(2).mean().backward()
    with pytest.raises(Exception, match="torch.compile sets capturable=True in every param group"):
        torch.compile(opt.step, fullgraph=True)()
    assert not opt.state and opt.param_groups[0]["capturable"] is False  # nothing stepped or kept
