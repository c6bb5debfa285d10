"""kahan_summation on the C++ "cpu" backend (issue 20 item 1, compensated mode): the storage
layer's compensated param format (csrc/include/mupopt/storage.h, load_param / store_param;
mupopt/storage.py, "Compensated stores", is the spec) in AdamW, ADOPT, LAMB (one call and the
split partials / apply form) and SophiaG must store what the reference backend stores, bit for
bit: params, compensations and states, step after step, for bfloat16 and float16 params with
state_bits 32, 16 and 8, over tensors of 1, 257 and 70000 elements (three CPU chunks of 32768)
beside a float32 param in the same group. The reference runs with a correctly rounded square
root, as in tests/test_lean_states_cpu.py: torch's float32 sqrt is MKL's, 1 ulp off at times,
the C++ loops' is IEEE, and a compensation shows the float32 value's low bits that a rounded
param hides."""
from __future__ import annotations

import dataclasses
import io
import warnings

import pytest
import torch

import mupopt
from mupopt import backends, storage
from mupopt.optim._base import BackendFallbackWarning
from test_bitwise import correctly_rounded_sqrt
from test_lean_states_cpu import _grads, lamb_split_steps
from test_lean_states import _fed_steps, _make

NAMES = ("adamw", "adopt", "lamb", "sophia")
KEY = storage.COMPENSATION
# 1 element; 257 (a 256-block and one more, odd: no pairs); 70000 (two full CPU chunks and a
# partial third); 2-D; and a float32 param (no compensation) in the same group.
SHAPES = [(1,), (257,), (70000,), (33, 17)]


@pytest.fixture(autouse=True)
def _cpu_available():
    from mupopt.kernels.cpp import cpu_unsupported_reason

    reason = cpu_unsupported_reason([torch.zeros(1)])
    if reason is not None:
        pytest.skip(reason)


def _params(dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in SHAPES]
    return ps + [torch.nn.Parameter(torch.randn(50, generator=gen) * 0.1)]


def _run(name, backend, dtype=torch.bfloat16, bits=32, steps=3, amp=False, params=None, opt=None, seed=7, **kw):
    """(params, optimizer) after ``steps`` steps with kahan_summation=True (tests/test_lean_states'
    _make: lr 1e-2, weight decay 0.1)."""
    ps = params if params is not None else _params(dtype)
    if opt is None:
        opt = _make(name, ps, bits, backend, kahan_summation=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    if backend == "reference":
        with correctly_rounded_sqrt():
            _fed_steps(opt, ps, lambda t: _grads(ps, gen), steps, amp)
    else:
        _fed_steps(opt, ps, lambda t: _grads(ps, gen), steps, amp)
    return ps, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dtype == torch.uint8:
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _differing(a, b) -> int:
    return int((_bits(a) != _bits(b)).sum())


def _close_lamb(a, b, ca, cb, what):
    """LAMB's p + c: its trust ratio comes from float64 sums added per chunk in the C++ loops and
    by torch's reduction in the reference, which differ in the last bit at times (as without the
    option: tests/test_lean_states_cpu.py, tests/test_cpp_backend.py), and the compensation shows
    that float32 difference where a rounded param hides it. So per element within 4 float32
    ulps of |x| plus one spacing of c per step (3 steps), and all but 0.1% of params and 1% of
    compensations bit for bit (measured, float16, 70000 elements: 1 param and 3 compensations
    differ, the compensations by float16's 2^-24)."""
    xa = a.detach().double() + (ca.double() if ca is not None else 0.0)
    xb = b.detach().double() + (cb.double() if cb is not None else 0.0)
    ulp32 = torch.ldexp(torch.ones_like(xa), torch.frexp(xa.abs().float())[1] - 24).double()
    bound = 4 * ulp32
    if ca is not None:
        # c's spacing: 8 (bfloat16) or 11 (float16) bits below its leading one; float16's
        # subnormals (below 2^-14, where small compensations live) have the fixed 2^-24.
        mant, tiny = (8, 0.0) if a.dtype == torch.bfloat16 else (11, 2.0**-24)
        c_spacing = torch.ldexp(torch.ones_like(xa), torch.frexp(torch.maximum(ca.abs(), cb.abs()).float())[1] - mant)
        bound = bound + 3 * c_spacing.double().clamp(min=tiny)
    assert bool(((xa - xb).abs() <= bound).all()), what
    assert _differing(a, b) <= a.numel() // 1000, what
    if ca is not None:
        assert _differing(ca, cb) <= max(1, ca.numel() // 100), what


def _assert_same(ref, cpu, exact=True):
    """Params, compensations and every state tensor bit for bit (``exact`` False, LAMB: p + c by
    _close_lamb); the same state entries."""
    (pa, oa), (pb, ob) = ref, cpu
    for k, (a, b) in enumerate(zip(pa, pb)):
        sa, sb = oa.state[a], ob.state[b]
        assert set(sa) == set(sb), (k, set(sa) ^ set(sb))
        assert (KEY in sb) == (a.dtype != torch.float32)
        if exact:
            assert _differing(a, b) == 0, f"param {k} ({a.dtype}, {a.numel()}): {_differing(a, b)} differ"
        else:
            _close_lamb(a, b, sa.get(KEY), sb.get(KEY), f"param {k} ({a.dtype}, {a.numel()})")
        for key, va in sa.items():
            if isinstance(va, torch.Tensor) and (exact or key != KEY):
                assert va.dtype == sb[key].dtype, (k, key)
                assert _differing(va, sb[key]) == 0, f"param {k} state {key!r}: {_differing(va, sb[key])} differ"


def _on_cpu(opt, name):
    assert opt.selected_backends == [{name: "cpu"}] or all(
        used == "cpu" for step in opt.selected_backends for used in step.values()), opt.selected_backends


@pytest.mark.parametrize("bits", [32, 16, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_equals_reference_bit_for_bit(name, dtype, bits):
    ref = _run(name, "reference", dtype, bits)
    cpu = _run(name, "cpu", dtype, bits)
    _on_cpu(cpu[1], name)
    _assert_same(ref, cpu, exact=name != "lamb")
    ps, opt = cpu
    assert sum(int(opt.state[p][KEY].ne(0).sum()) for p in ps[:-1]) > 0.5 * sum(p.numel() for p in ps[:-1])
    if bits == 8:
        assert opt.state[ps[2]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("name", NAMES)
def test_bound_plan_keeps_the_compensations(name, monkeypatch):
    """The cached step plans (bind_<name>, <name>_bound_) bind the compensations: a kahan
    group steps through its plan, never the per-call op (before: every step, about 2.7x the
    bound step's Python and checks over 300 small tensors), bit for bit as the reference; a
    switch of the option goes through the per-call op or a new plan, bit for bit too."""
    from mupopt.kernels.cpp import ops

    calls = []
    per_call = getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *a, **k: (calls.append(1), per_call(*a, **k))[1])
    out = []
    for backend in ("reference", "cpu"):
        ps, opt = _run(name, backend, steps=3)
        assert backend == "reference" or not calls, f"{len(calls)} per-call steps of a kahan group"
        for on in (False, True):  # switched off (the compensation dropped), then on (from zero)
            opt.param_groups[0]["kahan_summation"] = on
            _run(name, backend, steps=2, params=ps, opt=opt, seed=11 + on)
        out.append((ps, opt))
    (ref, ref_opt), (cpu, cpu_opt) = out
    for a, b in zip(ref, cpu):
        if name == "lamb":  # its trust ratio's last bit: _close_lamb
            _close_lamb(a, b, ref_opt.state[a].get(KEY, torch.zeros_like(a)), cpu_opt.state[b].get(KEY, torch.zeros_like(b)),
                        name)
        else:
            assert _differing(a, b) == 0 and _differing(ref_opt.state[a].get(KEY, a), cpu_opt.state[b].get(KEY, b)) == 0


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "no_decay", "amp"])
def test_adamw_options(option):
    """amsgrad (five streams and the compensation), maximize, weight decay 0, and GradScaler's
    scaled gradients with a skipped second step (nothing written by it)."""
    kw = {"amsgrad": dict(amsgrad=True), "maximize": dict(maximize=True), "no_decay": {}, "amp": {}}[option]
    runs = []
    for backend in ("reference", "cpu"):
        ps = _params(torch.bfloat16)
        opt = _make("adamw", ps, 32, backend, kahan_summation=True, **kw)
        if option == "no_decay":
            opt.param_groups[0]["weight_decay"] = 0.0
        runs.append(_run("adamw", backend, steps=4, amp=option == "amp", params=ps, opt=opt))
    _on_cpu(runs[1][1], "adamw")
    _assert_same(*runs)
    if option == "amp":
        assert float(runs[1][1].state[runs[1][0][0]]["step"]) == 3.0  # step 2 skipped


def test_gradscaler_skip_creates_nothing():
    """found_inf at the first step: no state (no compensation) is created; the next step creates
    it on the cpu backend."""
    p = torch.nn.Parameter(torch.randn(300).bfloat16())
    opt = mupopt.AdamW([p], kahan_summation=True, backend="cpu")
    p.grad = torch.randn(300).bfloat16()
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert not opt.state[p]
    opt.step()
    assert KEY in opt.state[p] and opt.selected_backends == [{"adamw": "cpu"}]


@pytest.mark.parametrize("bits", [32, 8])
def test_lamb_split_form(bits):
    """lamb_partials_ (which reads p + c for the norm of p) and lamb_apply_ (the compensated
    store), the form for sharded params (norm_reduce), against the reference's split form."""
    out = []
    for backend in ("reference", "cpu"):
        ps = _params(torch.bfloat16)
        opt = _make("lamb", ps, bits, backend, kahan_summation=True)
        group = opt.param_groups[0]
        states = [opt._init_state(p, group) for p in ps]
        for p, st in zip(ps, states):
            if storage.compensates(p):
                st[KEY] = torch.zeros_like(p)
        hp = dataclasses.replace(opt._hparams(group), kahan_summation=True)
        mults = opt.group_multipliers(group)
        lamb_split_steps(backend, ps, states, mults, hp)
        out.append((ps, states))
    (pa, sa), (pb, sb) = out
    for a, b, x, y in zip(pa, pb, sa, sb):
        assert _differing(a, b) == 0
        assert set(x) == set(y)
        for key in x:
            assert _differing(x[key], y[key]) == 0, key


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resume_bit_exact(name):
    """3 steps, save (torch.save / torch.load), 3 more; a fresh optimizer (option off: the loaded
    group turns it on) from the save continues bit for bit, compensation included."""
    ps, opt = _run(name, "cpu", steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = [p.detach().clone() for p in ps]
    _run(name, "cpu", steps=3, params=ps, opt=opt, seed=11)
    qs = [torch.nn.Parameter(s.clone()) for s in saved]
    opt2 = _make(name, qs, 32, "cpu")
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["kahan_summation"] is True
    _run(name, "cpu", steps=3, params=qs, opt=opt2, seed=11)
    _on_cpu(opt2, name)
    _assert_same((ps, opt), (qs, opt2))


@pytest.mark.parametrize("name", NAMES)
def test_auto_takes_the_cpu_backend_without_a_warning(name):
    ps = _params(torch.bfloat16)
    opt = _make(name, ps, 32, "auto", kahan_summation=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        _run(name, "auto", steps=2, params=ps, opt=opt)
    _on_cpu(opt, name)
    assert all(KEY in opt.state[p] for p in ps[:-1]) and KEY not in opt.state[ps[-1]]


# -- bad input: clear errors, nothing written -------------------------------------------------
def _op_args(p, c=None):
    st = [torch.zeros_like(p), torch.zeros_like(p)]
    return ([p], [torch.ones_like(p)], [st[0]], [st[1]], [], [torch.zeros(())], [1.0], [1.0], [1.0])


_KW = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)


@pytest.mark.parametrize("bad,match", [
    ([], "compensations has only 0 tensors"),
    ([torch.zeros(16)], r"compensations\[0\] \(the compensation of params\[0\]\) must be a contiguous BFloat16"),
    ([torch.zeros(15, dtype=torch.bfloat16)], "must be a contiguous BFloat16 tensor of 16 elements"),
    ([torch.zeros(32, dtype=torch.bfloat16)[::2]], "must be a contiguous"),
    ([torch.zeros(16, dtype=torch.bfloat16)] * 2, "compensations has 2 tensors but the lists hold 1"),
])
def test_op_checks_compensations(bad, match):
    p = torch.zeros(16, dtype=torch.bfloat16)
    args = _op_args(p)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mupopt.adamw_(*args, **_KW, compensations=bad)
    assert torch.equal(p, torch.zeros(16, dtype=torch.bfloat16)) and float(args[5][0]) == 0.0
    with pytest.raises(RuntimeError, match=match):  # the bound plans check them alike
        torch.ops.mupopt.bind_adamw(args[0], *args[2:], [], compensations=bad)


def test_op_refuses_seeds_with_compensations():
    p = torch.zeros(16, dtype=torch.bfloat16)
    args = _op_args(p)
    with pytest.raises(RuntimeError, match="two ways to store"):
        torch.ops.mupopt.adamw_(*args, **_KW, sr_seeds=[1], compensations=[torch.zeros_like(p)])
    assert float(args[5][0]) == 0.0
    with pytest.raises(RuntimeError, match="two ways to store"):
        torch.ops.mupopt.bind_adamw(args[0], *args[2:], [1], compensations=[torch.zeros_like(p)])


def test_float32_params_take_no_compensation():
    """A float32 param with compensations given (the option on, nothing to compensate): stepped
    as without it."""
    out = []
    for comps in (None, []):
        p = torch.ones(16)
        torch.ops.mupopt.adamw_(*_op_args(p), **_KW, compensations=comps)
        out.append(p)
    assert torch.equal(*out)


def test_missing_compensation_refused():
    """A bf16 param whose compensation was removed behind the optimizer's back: the backend
    function refuses it, naming the entry (the op would otherwise take the next param's)."""
    from mupopt.optim.adamw import AdamWHparams

    p = torch.randn(16).bfloat16()
    st = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    hp = AdamWHparams(1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, kahan_summation=True)
    before = p.clone()
    with pytest.raises(RuntimeError, match="param_compensation"):
        backends.get("adamw", "cpu").fn([p], [torch.randn(16).bfloat16()], [st], [mupopt.mup.Multipliers(1.0, 1.0, 1.0)], hp)
    assert torch.equal(p, before)


def test_compiled_step_writes_the_compensation():
    """torch.compile(opt.step): the op's schema marks ``compensations`` written, so 3 compiled
    steps leave params and compensations as 3 eager ones."""
    import torch._dynamo

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)).bfloat16()
        opt = mupopt.AdamW(model.parameters(), lr=1e-2, backend="cpu", kahan_summation=True)
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3)).bfloat16()
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        for _ in range(3):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            step()
        return [t.detach().clone() for p in model.parameters() for t in (p, opt.state[p][KEY])]

    eager, compiled = run(False), run(True)
    assert all(_differing(a, b) == 0 for a, b in zip(eager, compiled))
    assert any(bool(c.ne(0).any()) for c in compiled[1::2])


def test_transposed_and_strided_params():
    """A transposed bf16 param (dense, stepped in its memory order: its compensation has its
    strides) and a non-dense one (every other column, stepped through the plan's contiguous
    buffer, its compensation contiguous): on cpu, no fallback, bit for bit the reference's."""
    def run(backend):
        torch.manual_seed(0)
        t = torch.nn.Parameter(torch.randn(64, 48).bfloat16().t())
        nd = torch.nn.Parameter(torch.randn(40, 64).bfloat16()[:, ::2])
        opt = mupopt.AdamW([t, nd], lr=1e-2, weight_decay=0.1, kahan_summation=True, backend=backend)
        _run("adamw", backend, params=[t, nd], opt=opt)
        return [t, nd], opt

    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        ref, cpu = run("reference"), run("cpu")
    assert cpu[1].selected_backends == [{"adamw": "cpu"}]
    assert cpu[1].state[cpu[0][0]][KEY].stride() == cpu[0][0].stride()
    _assert_same(ref, cpu)
