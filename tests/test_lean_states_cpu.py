"""state_bits=8 and 16 on the C++ "cpu" backend (issue 20 items 2, 3, 6): the loops decode and
encode the block-quantized format (csrc/include/mupopt/multi_tensor.h, storage.h) and store
bfloat16 states of float32 / float16 params, and must store exactly what the reference backend
stores (mupopt/optim/_lean_states.py, the executable spec): codes, block scales, bfloat16
states and params, bit for bit, step after step. The reference runs with a correctly rounded
square root, as in tests/test_bitwise.py (torch's float32 sqrt is MKL's, 1 ulp off at times;
the C++ loops' is IEEE)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mupopt
from mupopt import backends
from mupopt.optim import _lean_states as lean
from test_bitwise import correctly_rounded_sqrt
from test_lean_states import _auto_step_without_fallback, _fed_steps, _make

NAMES = ("adamw", "adopt", "lamb", "sophia")


@pytest.fixture(autouse=True)
def _cpu_available():
    from mupopt.kernels.cpp import cpu_unsupported_reason

    reason = cpu_unsupported_reason([torch.zeros(1)])
    if reason is not None:
        pytest.skip(reason)


def _params(dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    # 5000 elements: 19 full blocks and a partial one; a bias below MIN_8BIT_SIZE (format 32 in
    # the same group); 40000 elements: two CPU chunks of 32768, the second one partial.
    shapes = [(100, 50), (50,), (40000,)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


def _grads(params, gen, poison=None):
    out = []
    for k, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (1 + 3 * torch.rand(p.shape, generator=gen))
        if poison is not None and k == 0:
            flat = g.view(-1)
            flat[300] = poison  # block 1 of the first tensor
            flat[4999] = -poison if poison == poison else poison  # the partial last block
        out.append(g.to(p.dtype))
    return out


def _run(name, bits, backend, steps=3, dtype=torch.float32, poison_at=None, poison=float("inf"), amp=False, **kw):
    if backend == "reference":
        with correctly_rounded_sqrt():
            return _run_on(name, bits, backend, steps, dtype, poison_at, poison, amp, **kw)
    return _run_on(name, bits, backend, steps, dtype, poison_at, poison, amp, **kw)


def _run_on(name, bits, backend, steps, dtype, poison_at, poison, amp, **kw):
    torch.manual_seed(0)  # stochastic rounding's seeds
    ps = _params(dtype)
    opt = _make(name, ps, bits, backend, **kw)
    gen = torch.Generator().manual_seed(7)
    _fed_steps(opt, ps, lambda t: _grads(ps, gen, poison if t is not None and t == poison_at else None), steps, amp)
    return ps, opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN payloads included)."""
    t = t.detach()
    if t.dtype == torch.uint8:
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _close_params(a, b, what):
    """LAMB's params: its trust ratio comes from float64 sums in the C++ loops and from torch's
    float32 norm in the reference, which differ in the last bit at times (as for format 32:
    tests/test_cpp_backend.py); its states depend on the gradients only and stay bit for bit."""
    dtype = a.dtype
    a, b = a.detach().float(), b.detach().float()
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_same(run_a, run_b, exact_params=True):
    (pa, oa), (pb, ob) = run_a, run_b
    for k, (a, b) in enumerate(zip(pa, pb)):
        if exact_params:
            assert torch.equal(_bits(a), _bits(b)), f"param {k}: {int((_bits(a) != _bits(b)).sum())} differ"
        else:
            _close_params(a, b, f"param {k}")
        sa, sb = oa.state[a], ob.state[b]
        assert set(sa) == set(sb)
        for key, va in sa.items():
            if isinstance(va, torch.Tensor) and key != "sr_seed":
                vb = sb[key]
                assert va.dtype == vb.dtype, (k, key)
                assert torch.equal(_bits(va), _bits(vb)), f"param {k} state {key!r}: {int((_bits(va) != _bits(vb)).sum())} differ"


def _formats(opt, ps):
    return [(opt.state[p]["exp_avg"].dtype) for p in ps]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", NAMES)
def test_cpu_equals_reference_bit_for_bit(name, bits):
    ref = _run(name, bits, "reference")
    cpu = _run(name, bits, "cpu")
    assert cpu[1].selected_backends[0][name] == "cpu"
    want = [torch.uint8, torch.float32, torch.uint8] if bits == 8 else [torch.bfloat16] * 3
    assert _formats(cpu[1], cpu[0]) == want
    _assert_same(ref, cpu, exact_params=name != "lamb")


@pytest.mark.parametrize("name", NAMES)
def test_8bit_states_step_through_the_bound_plans(name, monkeypatch):
    """The cached step plans (bind_<name>, <name>_bound_) bind format 8's block scales and
    maps: an 8-bit group steps through its plan (SophiaG's Hessian EMA too), never the per-call
    op (before: every step, its lists rebuilt and checked: over 300 tensors of 4096 elements
    5.5 -> 4.5 ms per AdamW step, under load), bit for bit as the reference
    (test_cpu_equals_reference_bit_for_bit runs the same plans)."""
    from mupopt.kernels.cpp import ops

    calls = []
    for fn in (name, "sophia_hessian") if name == "sophia" else (name,):
        per_call = getattr(ops, fn)
        monkeypatch.setattr(ops, fn, lambda *a, _f=per_call, **k: (calls.append(1), _f(*a, **k))[1])
    ps, opt = _run(name, 8, "cpu", steps=4)
    assert _formats(opt, ps)[0] == torch.uint8 and not calls, f"{len(calls)} per-call steps of an 8-bit group"
    _assert_same(_run(name, 8, "reference", steps=4), (ps, opt), exact_params=name != "lamb")


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_with_and_without_stochastic_rounding(name, bits, stochastic):
    """bfloat16 params (format 16 is their own dtype, so the cpu backend's format 32 loops)."""
    runs = [_run(name, bits, b, dtype=torch.bfloat16, stochastic_rounding=stochastic) for b in ("reference", "cpu")]
    assert runs[1][1].selected_backends[0][name] == "cpu"
    _assert_same(*runs, exact_params=name != "lamb")


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_float16_and_float64_params(dtype, bits):
    runs = [_run("adamw", bits, b, dtype=dtype, stochastic_rounding=dtype == torch.float16) for b in ("reference", "cpu")]
    assert runs[1][1].selected_backends[0]["adamw"] == "cpu"
    _assert_same(*runs)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("option", ["amsgrad", "maximize", "amp"])
def test_adamw_options(option, bits):
    kw = {"amp": True} if option == "amp" else {option: True}
    _assert_same(*[_run("adamw", bits, b, steps=4, **kw) for b in ("reference", "cpu")])


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_blocks(name, poison):
    """A non-finite gradient in two blocks: the codes and scales of those blocks (NaN or inf
    scales, the spec's codes) and every other block match the reference's, bit for bit."""
    runs = [_run(name, 8, b, steps=3, poison_at=1, poison=poison) for b in ("reference", "cpu")]
    _assert_same(*runs, exact_params=name != "lamb")
    ps, opt = runs[1]
    assert not torch.isfinite(opt.state[ps[0]]["exp_avg" + lean.ABSMAX][1])  # the poisoned block
    assert torch.isfinite(opt.state[ps[0]]["exp_avg" + lean.ABSMAX][2:-1]).all()


def lamb_split_steps(backend, ps, states, mults, hp, steps=3):
    """``steps`` LAMB steps of ``backend`` in the split form (the ``norm_reduce`` hook of sharded
    params, here the identity), gradients from seed 3, under a correctly rounded sqrt; the hook
    must run once per step."""
    gen = torch.Generator().manual_seed(3)
    calls = []

    def reduce(sums):
        calls.append(1)
        return sums

    for _ in range(steps):
        with torch.no_grad(), correctly_rounded_sqrt():
            backends.get("lamb", backend).fn(ps, _grads(ps, gen), states, mults, hp, norm_reduce=reduce)
    assert len(calls) == steps


@pytest.mark.parametrize("bits", [8, 16])
def test_lamb_split_passes_with_norm_reduce(bits):
    """lamb_partials_ / lamb_apply_ (the form for sharded params): the states are stored once,
    by the second pass, from the same decoded blocks; the result equals the reference's."""
    out = []
    for backend in ("reference", "cpu"):
        ps = _params()
        opt = _make("lamb", ps, bits, backend)
        group = opt.param_groups[0]
        states = [opt._init_state(p, group) for p in ps]
        hp = opt._hparams(group)
        mults = opt.group_multipliers(group)
        lamb_split_steps(backend, ps, states, mults, hp)
        out.append((ps, states))
    (pa, sa), (pb, sb) = out
    for a, b, x, y in zip(pa, pb, sa, sb):
        _close_params(a, b, "param")
        for key in x:
            assert torch.equal(_bits(x[key]), _bits(y[key])), key


@pytest.mark.parametrize("name", NAMES)
def test_auto_takes_the_cpu_backend_without_a_warning(name):
    ps = _params()
    opt = _auto_step_without_fallback(name, ps, _grads(ps, torch.Generator().manual_seed(0)))
    assert opt.selected_backends[0][name] == "cpu"
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.uint8 and opt.state[ps[1]]["exp_avg"].dtype == torch.float32


@pytest.fixture
def format32_backend():
    """A backend that steps format 32 only (the cpu backend's function, state_bits=(32,))."""
    cpu = backends.get("adamw", "cpu")
    b = backends.register(dataclasses.replace(cpu, name="only32", state_bits=(32,), bind=None))
    yield b
    del backends._REGISTRY["adamw"]["only32"]


def test_explicit_backend_without_the_format_still_raises(format32_backend):
    with pytest.raises(ValueError, match="backend 'only32' does not implement 8-bit"):
        _make("adamw", _params(), 8, "only32")  # at construction
    ps = _params()
    opt = _make("adamw", ps, 16, "only32")  # float32 params: format 16, known at the first step
    for p, g in zip(ps, _grads(ps, torch.Generator().manual_seed(0))):
        p.grad = g
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="state_bits=16"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ps)) and not opt.state


def test_bad_block_scales_are_refused_and_change_nothing():
    ps = _params()
    opt = _make("adamw", ps, 8, "cpu")
    group = opt.param_groups[0]
    states = [opt._init_state(p, group) for p in ps]
    hp, mults = opt._hparams(group), opt.group_multipliers(group)
    grads = _grads(ps, torch.Generator().manual_seed(0))
    fn = backends.get("adamw", "cpu").fn
    before = [p.detach().clone() for p in ps]
    states[0]["exp_avg" + lean.ABSMAX] = torch.zeros(5)  # 20 blocks needed
    with pytest.raises(RuntimeError, match=r"absmax\[0\].*shape \[20\]"):
        fn(ps, grads, states, mults, hp)
    states[0]["exp_avg" + lean.ABSMAX] = torch.zeros(20, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        fn(ps, grads, states, mults, hp)
    states[0]["exp_avg" + lean.ABSMAX] = torch.zeros(20)
    del states[0]["exp_avg_sq" + lean.ABSMAX]
    with pytest.raises(RuntimeError, match="absmax"):
        fn(ps, grads, states, mults, hp)
    with pytest.raises(RuntimeError, match="absmax"):  # the bound plans check them alike
        backends.get("adamw", "cpu").bind(ps, states, mults)
    assert all(torch.equal(a, b) for a, b in zip(before, ps))
    assert all(float(st["step"]) == 0 for st in states)


def _table_codes(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The lookup of csrc/include/mupopt/storage.h's q8_bucket and q8_code, transcribed (int64 arithmetic)."""
    lo, count = int(table[256]), int(table[257])
    entry = table[258:].long() & 0xFFFFFFFF
    u = y.view(torch.int32).long() & 0xFFFFFFFF
    body = u & 0x7FFFFFFF
    neg = ((u >> 31) == 1) & (body <= 0x7F800000)
    mag = (body >> 16).clamp(lo, lo + count - 1)
    e = entry[(mag - lo) + torch.where(neg, count, 0)]
    key = (u & 0xFFFF) ^ torch.where(neg, 0xFFFF, 0)
    return (e >> 16) + (key > (e & 0xFFFF)).long()


@pytest.mark.parametrize("kind", [lean.SIGNED, lean.UNSIGNED])
@pytest.mark.parametrize("name", lean.MAP_NAMES)
def test_kernel_table_equals_the_spec_search(name, kind, monkeypatch):
    """The compact table the loops read gives the spec's code for every midpoint and its float32
    neighbours, the map values, 0, +-0, tiny and non-finite y (as the spec's nearest_codes)."""
    from mupopt.kernels.cpp.ops import map_table

    monkeypatch.setattr(lean, "maps", name)
    values, mid = lean.map_tensor(kind, name=name)
    assert torch.equal(map_table(kind, name)[:256].view(torch.float32), values)
    ys = [mid, values, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 1.0, -1.0,
                                     float("nan"), -float("nan")])]
    for d in (1, 2, 3):
        ys += [torch.nextafter(mid, mid + d), torch.nextafter(mid, mid - d)]
    bits = mid.view(torch.int32)
    ys += [(bits + d).view(torch.float32) for d in (-2, -1, 1, 2)]
    y = torch.cat(ys)
    y = y[(y.abs() <= 1) | y.isnan()]
    want = lean.nearest_codes(y, kind).long()
    assert torch.equal(_table_codes(y, map_table(kind, name)), want)


def test_the_256_bit_loops_in_a_subprocess():
    """Where this process runs the 512-bit copy of the loops (csrc/cpu/driver.h: ATen's AVX512
    capability), the equality tests above again under ATEN_CPU_CAPABILITY=avx2, which runs the
    256-bit copy: both copies store the reference's bits."""
    import os
    import subprocess
    import sys

    if torch.ops.mupopt.cpu_isa() != "avx512+fma":
        pytest.skip(f"this process runs the {torch.ops.mupopt.cpu_isa()} loops already")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    code = ("import sys, torch, pytest; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[1], '-k',"
            " 'equals_reference or bf16_params or float16_and_float64 or nonfinite']))")
    proc = subprocess.run([sys.executable, "-c", code, __file__], env=env, capture_output=True, text=True,
                          timeout=900, cwd=os.path.dirname(__file__))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "avx2+fma" in subprocess.run(
        [sys.executable, "-c", "import mupopt.kernels.cpp.build as b; b.load_cpu(); import torch; "
         "print(torch.ops.mupopt.cpu_isa())"], env=env, capture_output=True, text=True, timeout=300).stdout


def _codec_values(name, kind):
    """Values for format 8's block codec: every midpoint of the map, its float32 neighbours (1 to
    3 ulps and 1-2 patterns away), the map values, 0, -0, +-1, the smallest magnitudes, in blocks
    of absmax 1 (each block led by 1.0, so y = x exactly), the same blocks scaled by 2^-100 and
    2^100 (y exact again) and by 3.7 (y rounded by the division); blocks with NaN, inf, -inf,
    both infinities, all zeros, subnormal and huge absmax; a random sample of several scales;
    blocks whose y falls next to a midpoint at scales from 2^-90 to 2^110; and a partial last block (a tensor tail of 77 elements). For the VBMI codec's rank lines
    (mupopt/kernels/cpp/ops.py's _rank_lines: one line per decade of the dynamic map, picked by
    binade): the powers of two and the decades' ends 10^-e with their neighbours, and every
    4099th float32 pattern of [0, 1] (the whole range at about 250 points per binade;
    benchmarks/bench_q8_codec.py --check 1 takes all of them)."""
    values, mid = lean.map_tensor(kind, name=name)
    ys = [mid, values, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 1e-45, -1e-45, 2**-126, -2**-126])]
    for d in (1, 2, 3):
        ys += [torch.nextafter(mid, mid + d), torch.nextafter(mid, mid - d)]
    bits = mid.view(torch.int32)
    ys += [(bits + d).view(torch.float32) for d in (-2, -1, 1, 2)]
    ends = torch.tensor([2.0**-e for e in range(40)] + [10.0**-e for e in range(9)]).view(torch.int32)
    ys += [(ends + d).view(torch.float32) for d in range(-2, 3)]
    ys += [torch.arange(0, 0x3F800001, 4099, dtype=torch.int32).view(torch.float32)]
    ys += [-y for y in ys]
    y = torch.cat(ys)
    y = y[y.abs() <= 1]
    y = torch.cat([y, y.new_zeros(-y.numel() % 255)]).view(-1, 255)
    unit = torch.cat([torch.ones(y.shape[0], 1), y], dim=1)  # blocks of absmax 1
    gen = torch.Generator().manual_seed(3)
    special = torch.randn(8, 256, generator=gen)
    special[0, 5] = float("nan")
    special[1, 17] = float("inf")
    special[2, 200] = -float("inf")
    special[3, 0], special[3, 255] = float("inf"), -float("inf")
    special[4] = 0.0
    special[5] *= 1e-41  # subnormal absmax
    special[6] *= 1e37
    special[7, 100] = -float("nan")
    sample = torch.randn(400, 256, generator=gen) * torch.logspace(-30, 30, 400).view(-1, 1)
    heavy = torch.randn(100, 256, generator=gen) ** 5  # many values far below their block's absmax
    tail = torch.randn(77, generator=gen)
    # y = x / absmax lands next to a midpoint: x = the midpoint times a scale s, and its float32
    # neighbours, in blocks led by s (their absmax), for scales of random mantissa (and mantissas
    # near 1 and 2) from 2^-90 to 2^110: a quotient one ulp off moves codes here (measured: a codec
    # that multiplied by 1/s instead of dividing got 10934 codes wrong, 10413 of them here).
    near = torch.cat([(mid.view(torch.int32) + d).view(torch.float32) for d in (-2, -1, 0, 1, 2)])
    near = torch.cat([near, -near]) if kind == lean.SIGNED else near
    mantissas = torch.cat([torch.rand(6, generator=gen) + 1, torch.tensor([1.0, 1 + 2**-23, 2 - 2**-23, 2 - 2**-22])])
    scaled = []
    for e in range(-90, 111, 20):
        for m in mantissas.tolist():
            s = torch.tensor(m * 2.0**e, dtype=torch.float32)
            x = near * s
            x = x[x.abs() <= s]
            x = torch.cat([x, x.new_zeros(-x.numel() % 255)]).view(-1, 255)
            scaled.append(torch.cat([s.expand(x.shape[0], 1), x], dim=1))
    blocks = torch.cat([unit, unit * 2.0**-100, unit * 2.0**100, unit * 3.7, special, sample, heavy, *scaled])
    return torch.cat([blocks.reshape(-1), tail])


@pytest.mark.parametrize("codec", ["vbmi", "scalar"])
@pytest.mark.parametrize("kind", [lean.SIGNED, lean.UNSIGNED])
@pytest.mark.parametrize("name", lean.MAP_NAMES)
def test_block_codec_equals_the_spec(name, kind, codec, monkeypatch):
    """Format 8's block codec alone (torch.ops.mupopt.q8_codec_test, a test-only binding of the
    loops' codec: csrc/cpu/q8_vbmi.h, or the plain one of multi_tensor.h) stores the spec's codes
    and block scales (_lean_states.quantized) and decodes the spec's values (dequantize), bit
    for bit, on every midpoint and its neighbours, special blocks and a partial last block."""
    from mupopt.kernels.cpp.ops import map_table

    monkeypatch.setattr(lean, "maps", name)
    x = _codec_values(name, kind)
    try:
        codes, absmax, decoded = torch.ops.mupopt.q8_codec_test(x, map_table(kind, name), codec)
    except RuntimeError as e:
        if "no AVX-512 VBMI" not in str(e):
            raise
        pytest.skip("this CPU has no AVX-512 VBMI")
    want_codes, want_absmax = lean.quantized(x, kind)
    assert torch.equal(_bits(absmax), _bits(want_absmax))
    wrong = (codes != want_codes).nonzero().view(-1)
    assert wrong.numel() == 0, f"{wrong.numel()} codes differ, first at {wrong[:5].tolist()}: x={x[wrong[:5]].tolist()}"
    assert torch.equal(_bits(decoded), _bits(lean.dequantize(want_codes, want_absmax, kind)))


@pytest.mark.parametrize("kind", [lean.SIGNED, lean.UNSIGNED])
@pytest.mark.parametrize("name", lean.MAP_NAMES)
def test_rank_lines_where_the_map_is_linear_per_decade(name, kind):
    """The VBMI codec's closed-form search (ops.py's _rank_lines) is on for the dynamic maps and
    the signed linear one, off for the square-root map (no lines: the rank search), and its
    lines (in float64 here) place every midpoint c within 0.3 of rho = c + 1/2 (0.25 off at the
    top one, between the map's last value and 1.0): rho rises with y, so trunc(rho(y)) is the
    code or one below it wherever rho's float32 error is below 0.2. The map values sit within
    0.5 of their codes (0 is 0.28-0.39 above: no decade's line runs through it). The codec's
    exactness is test_block_codec_equals_the_spec's."""
    from mupopt.kernels.cpp.ops import map_table

    words = map_table(kind, name)[-132:]
    values, mid = lean.map_tensor(kind, name=name)
    on = not (name == "linear-sqrt" and kind == lean.UNSIGNED)
    assert int(words[130]) == int(on)
    if not on:
        return
    assert int(words[129]) == int(kind == lean.SIGNED)
    lines = words[:128].view(torch.float32).double().view(4, 32)

    def rho(y):
        t = y.double().abs() if kind == lean.SIGNED else y.double().clamp(min=0)
        b = (t.clamp(min=2.0**-31).float().view(torch.int32) >> 23).long() & 31
        r = torch.minimum(t * lines[0, b] + lines[1, b], t * lines[2, b] + lines[3, b])
        return torch.where(y < 0, 254 - r, r) if kind == lean.SIGNED else r

    used = lean.used_codes(name, kind)
    codes = torch.arange(used - (name == "dynamic"), dtype=torch.float64)  # 1.0 at 255: no line
    assert (rho(values[:codes.numel()]) - codes).abs().max() < 0.5
    assert (rho(mid) - torch.arange(mid.numel()) - 0.5).abs().max() < 0.3
    assert (rho(mid).diff() > 0).all()


def test_block_codec_in_the_loops_on_midpoints():
    """The same values through the loops: AdamW with beta1 = 0 stores m = g exactly, so a step
    quantizes the gradient; the codes and scales equal the reference backend's, and the
    reference's are the spec's (the step of format 8 is _lean_states' quantize)."""
    values, mid = lean.map_tensor(lean.SIGNED)
    y = torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1), values, -mid])
    y = torch.cat([y, y.new_zeros(-y.numel() % 255)]).view(-1, 255)
    g = torch.cat([torch.ones(y.shape[0], 1), y], dim=1).reshape(-1)[:-3]  # a partial last block
    g = torch.cat([g, torch.randn(8192 - g.numel() % 256 + 100)])
    runs = []
    for backend in ("reference", "cpu"):
        p = torch.nn.Parameter(torch.zeros_like(g))
        opt = mupopt.AdamW([p], lr=1e-3, betas=(0.0, 0.999), state_bits=8, backend=backend)
        p.grad = g.clone()
        with correctly_rounded_sqrt():
            opt.step()
        runs.append(([p], opt))
    _assert_same(*runs)
    st = runs[1][1].state[runs[1][0][0]]
    want_codes, want_absmax = lean.quantized(g, lean.SIGNED)
    assert torch.equal(st["exp_avg"], want_codes) and torch.equal(st["exp_avg" + lean.ABSMAX], want_absmax)
