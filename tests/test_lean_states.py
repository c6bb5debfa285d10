"""state_bits (16-bit and 8-bit optimizer states; mupopt.optim._lean_states, docs/lean-states.md):
the format against a float64 transcription of its spec, every optimizer with 8 and 16 against
32, state_dict / pickle / GradScaler / width records with 8-bit states, state_memory(), errors."""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch

import mupopt
from mupopt.mup import RECORD_KEY
from mupopt.optim import _lean_states as lean
from mupopt.optim._base import BackendFallbackWarning
from mupopt.testing import lean_roundtrip_f64

from models import same_state_value

KINDS = (lean.SIGNED, lean.UNSIGNED)


# -- the format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", lean.MAP_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_maps(name, kind):
    values = lean.build_map(name, kind)
    used = values[:lean.used_codes(name, kind)]
    assert len(values) == 256 and all(a < b for a, b in zip(used, used[1:]))
    assert used[-1] == 1.0  # the block's absmax element is stored exactly
    if kind == lean.SIGNED:
        assert 0.0 in used  # a zero momentum stays zero (unused embedding rows do not drift)
    if name == "linear-sqrt" and kind == lean.UNSIGNED:
        # Li et al. 2023: no zero in the second moment's map (a v stored as 0 makes m/eps).
        assert used[0] == 1 / 65536 and 0.0 not in used


def _sample(kind, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Values over 8 decades, as second moments are, and blocks of very different scales.
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    x = x * torch.repeat_interleave(torch.logspace(-6, 2, lean.blocks_of(n)), lean.BLOCK)[:n]
    return x.abs() if kind == lean.UNSIGNED else x


@pytest.mark.parametrize("name", lean.MAP_NAMES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [4096, 5000, 256 * 7 + 1])
def test_quantize_matches_float64_spec(name, kind, n, monkeypatch):
    """Codes equal the float64 transcription's nearest-value codes except where y lies within
    float32 rounding of a midpoint between two map values; every stored value is within the
    map's bound (half the largest gap, lean.relative_error_bound) times the block's absmax."""
    monkeypatch.setattr(lean, "maps", name)
    x = _sample(kind, n).reshape(-1, 1) if n % 2 else _sample(kind, n).reshape(2, -1)
    codes, absmax = lean.quantized(x, kind)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape and absmax.shape == (lean.blocks_of(n),)
    ref_codes, ref_values = lean_roundtrip_f64(x, lean.build_map(name, kind), lean.used_codes(name, kind), lean.BLOCK)
    got = lean.dequantize(codes, absmax, kind).reshape(-1).double()
    differ = codes.reshape(-1).long() != ref_codes
    if differ.any():
        # Only float32 ties: both codes are (nearly) equally near.
        table = torch.tensor(lean.build_map(name, kind), dtype=torch.float64)
        amax = torch.repeat_interleave(absmax.double(), lean.BLOCK)[:n]
        y = x.reshape(-1).double() / amax
        gap = ((y - table[codes.reshape(-1).long()]).abs() - (y - table[ref_codes]).abs())[differ]
        assert gap.abs().max() < 1e-6, gap.abs().max()
        assert differ.sum() <= 2
    bound = lean.relative_error_bound(kind, name)
    amax = torch.repeat_interleave(absmax.double(), lean.BLOCK)[:n]
    err = (got - x.reshape(-1).double()).abs()
    # + 2^-22: the float32 division and product, each rounding by at most 2^-24 of absmax
    assert (err <= amax * (bound + 2**-22)).all(), (err / amax).max()
    assert torch.equal(absmax.double(), torch.stack([x.reshape(-1)[i:i + lean.BLOCK].abs().max().double()
                                                       for i in range(0, n, lean.BLOCK)]))
    # the float64 transcription's values agree with the dequantized ones to float32 rounding
    same = ~differ
    assert torch.allclose(got[same], ref_values[same], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", lean.MAP_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_bucket_search_equals_bucketize(name, kind, monkeypatch):
    """The two-lookup nearest-code search (lean.nearest_codes) against torch.bucketize over the
    midpoints, the spec's rule, on every midpoint, its float32 neighbours, and random values."""
    monkeypatch.setattr(lean, "maps", name)
    _, mid = lean.map_tensor(kind, name=name)
    near = [mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))]
    gen = torch.Generator().manual_seed(0)
    rand = torch.rand(100_000, generator=gen) * torch.exp(-20 * torch.rand(100_000, generator=gen))
    y = torch.cat([*near, rand, -rand, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-45])])
    if kind == lean.UNSIGNED:
        y = y.abs()
    assert torch.equal(lean.nearest_codes(y, kind).long(), torch.bucketize(y, mid))


def test_zero_and_nonfinite_blocks():
    x = torch.zeros(3 * lean.BLOCK)
    x[lean.BLOCK + 5] = float("nan")
    x[2 * lean.BLOCK:] = torch.linspace(-1, 1, lean.BLOCK)
    codes, absmax = lean.quantized(x, lean.SIGNED)
    out = lean.dequantize(codes, absmax, lean.SIGNED)
    assert torch.equal(out[:lean.BLOCK], torch.zeros(lean.BLOCK))  # an all-zero block is exactly zero
    assert out[lean.BLOCK:2 * lean.BLOCK].isnan().all()  # NaN poisons its own block only
    lowest = torch.tensor(lean.build_map(lean.maps, lean.SIGNED)[0], dtype=torch.float32)  # -1, or dynamic's -0.993
    assert out[2 * lean.BLOCK:].isfinite().all() and out[-1] == 1.0 and out[2 * lean.BLOCK] == lowest
    z = lean.zeros(torch.empty(64, 64), {"state_bits": 8}, "m")
    assert torch.equal(lean.dequantize(z["m"], z["m_absmax"], lean.SIGNED), torch.zeros(64, 64))


def test_state_format_rules():
    g8 = {"state_bits": 8}
    assert lean.state_format(torch.empty(64, 64), g8) == 8
    assert lean.state_format(torch.empty(4095), g8) == 32  # below MIN_8BIT_SIZE (bitsandbytes' min_8bit_size)
    assert lean.state_format(torch.empty(64, 128).t(), g8) == 32  # not contiguous: kept in 32 bits
    assert lean.state_format(torch.empty(64, 64), {"state_bits": 16}) == 16
    assert lean.zeros(torch.empty(10, dtype=torch.float16), {"state_bits": 16}, "m")["m"].dtype == torch.bfloat16
    assert lean.zeros(torch.empty(10, dtype=torch.float16), {}, "m")["m"].dtype == torch.float16
    for bits in (8, 16):  # complex params keep their dtype
        assert lean.zeros(torch.empty(80, 80, dtype=torch.complex64), {"state_bits": bits}, "m")["m"].dtype == torch.complex64


def test_8bit_says_once_which_large_params_keep_32_bit_states():
    """A param of at least MIN_8BIT_SIZE elements that format 8 cannot cut into blocks (here a
    channels_last conv weight and a complex matrix) keeps 32-bit states; the first step warns,
    naming them, once per optimizer. Small params (bitsandbytes' rule) and blockable ones: no
    warning."""
    conv = torch.nn.Parameter(torch.randn(32, 16, 3, 3).to(memory_format=torch.channels_last))
    cplx = torch.nn.Parameter(torch.randn(64, 64, dtype=torch.complex64))
    plain, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(100))
    assert not conv.is_contiguous() and conv.numel() >= lean.MIN_8BIT_SIZE
    opt = mupopt.AdamW([conv, cplx, plain, small], lr=1e-2, state_bits=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for p in (conv, cplx, plain, small):
                p.grad = torch.randn_like(p)
            opt.step()
    said = [str(w.message) for w in caught if "state_bits=8 keeps 32-bit states" in str(w.message)]
    assert len(said) == 1 and "for 2 param(s)" in said[0], said
    assert "(32, 16, 3, 3) torch.float32 not contiguous" in said[0] and "(64, 64) torch.complex64" in said[0]
    assert opt.state[conv]["exp_avg"].dtype == torch.float32 and opt.state[plain]["exp_avg"].dtype == torch.uint8
    quiet = mupopt.AdamW([plain, small], lr=1e-2, state_bits=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.step()


# -- the optimizers ------------------------------------------------------------------------------
SIX = ("adamw", "adopt", "lamb", "sophia", "muon", "shampoo")


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    # 5000 elements: 19 full blocks and a partial one; 70 x 70 = 4900; a bias below the threshold.
    shapes = [(100, 50), (50,), (70, 70)]
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]


def _make(name, params, bits, backend="reference", **kw):
    kw = dict(state_bits=bits, backend=backend, **kw)
    if name == "adamw":
        return mupopt.AdamW(params, lr=1e-2, weight_decay=0.1, **kw)
    if name == "adopt":
        return mupopt.ADOPT(params, lr=1e-2, weight_decay=0.1, **kw)
    if name == "lamb":
        return mupopt.LAMB(params, lr=1e-2, weight_decay=0.1, **kw)
    if name == "sophia":
        return mupopt.SophiaG(params, lr=1e-2, weight_decay=0.1, rho=0.04, **kw)
    if name == "muon":  # no width info: matrices to Muon, the bias to the AdamW part
        return mupopt.Muon(params, lr=2e-2, adamw_lr=1e-2, ns_dtype=torch.float32, **kw)
    return mupopt.Shampoo(params, lr=1e-2, precondition_frequency=1, max_preconditioner_dim=64, **kw)


def _fed_steps(opt, ps, draw, steps, amp=False):
    """``steps`` steps of ``opt`` over ``ps``, gradients from ``draw(t)`` at step t and
    ``draw(None)`` for SophiaG's Hessian (every other step). ``amp``: what GradScaler hands a
    fused optimizer, scaled gradients and its scale; the second step has found_inf set and
    changes nothing. (tests/test_lean_states_cpu.py, tests/test_lean_states_cuda.py.)"""
    device = ps[0].device
    for t in range(steps):
        for p, g in zip(ps, draw(t)):
            p.grad = g
        if amp:
            for p in ps:
                p.grad = p.grad * 4
            opt.grad_scale = torch.tensor(4.0, device=device)
            opt.found_inf = torch.tensor(1.0 if t == 1 else 0.0, device=device)
        if isinstance(opt, mupopt.SophiaG):
            opt.step(bs=64)
            if t % 2 == 0:
                for p, g in zip(ps, draw(None)):
                    p.grad = g
                opt.update_hessian()
        else:
            opt.step()
        if amp:
            del opt.grad_scale, opt.found_inf


def _same_floats(a, b, tol, what):
    """Equal NaN positions; elsewhere within ``tol`` (assert_close), and for 16-bit storage at
    most 1% of the values differ (a float32 last bit can flip a rounding: tests/test_triton.py).
    (tests/test_lean_states_triton.py, tests/test_lean_states_cuda.py.)"""
    assert a.dtype == b.dtype, what
    assert torch.equal(a.isnan(), b.isnan()), what
    fin = ~a.isnan()
    torch.testing.assert_close(a[fin].float(), b[fin].float(), msg=what, **tol)
    if a.dtype in (torch.bfloat16, torch.float16) and fin.any():
        assert (a[fin] != b[fin]).float().mean() <= 0.01, what


def _hard_values(n, seed, kind, negative_zero_at):
    """n values for a quantizer: blocks of scales from 1e-30 to 1e30, a zero block (256-511), a
    NaN (600), -inf next to 3.0 (1000, 1001), -0.0 at ``negative_zero_at``; magnitudes for the
    unsigned kind. (tests/test_lean_states_triton.py, tests/test_lean_states_cuda.py.)"""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 4)
    x = x * torch.repeat_interleave(torch.logspace(-30, 30, lean.blocks_of(n)), lean.BLOCK)[:n]
    x[256:512] = 0.0
    x[600] = float("nan")
    x[1000] = -float("inf")
    x[1001] = 3.0
    x[negative_zero_at] = -0.0
    return x.abs() if kind == lean.UNSIGNED else x


def _auto_step_without_fallback(name, ps, grads):
    """One step of ``name`` with 8-bit states and backend "auto" over ``ps``; a
    BackendFallbackWarning fails it. (tests/test_lean_states_cpu.py, _cuda.py.)"""
    opt = _make(name, ps, 8, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackendFallbackWarning)
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step(**({"bs": 64} if name == "sophia" else {}))
    return opt


def _drive(opt, params, steps, seed=0, start=0):
    gen = torch.Generator().manual_seed(seed)
    for t in range(start + steps):
        grads = [torch.randn(p.shape, generator=gen) * (1 + 3 * torch.rand(p.shape, generator=gen)) for p in params]
        if t < start:
            continue
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        if isinstance(opt, mupopt.SophiaG):
            opt.step(bs=64)
            if t % 2 == 1:
                opt.update_hessian()
        else:
            opt.step()


def _lean_entries(opt, p):
    return {k: v for k, v in opt.state[p].items() if k in opt._lean_keys}


@pytest.mark.parametrize("name", SIX)
def test_first_step_stores_the_quantized_32bit_state(name):
    """After one step from zero state both runs computed the same float32 states from the same
    inputs; the 8-bit run stores exactly their quantization (bit for bit), the 16-bit run their
    bfloat16 rounding, and the parameters are equal."""
    p32, p16, p8 = _params(), _params(), _params()
    runs = [(_make(name, ps, bits), ps) for bits, ps in ((32, p32), (16, p16), (8, p8))]
    for opt, ps in runs:
        _drive(opt, ps, 1)
    (o32, _), (o16, _), (o8, _) = runs
    for a, b, c in zip(p32, p16, p8):
        assert torch.equal(a, b) and torch.equal(a, c)
        ref = _lean_entries(o32, a)
        assert ref and set(ref) == set(_lean_entries(o8, c)) == set(_lean_entries(o16, b))
        for key, value in ref.items():
            assert o16.state[b][key].dtype == torch.bfloat16
            assert torch.equal(o16.state[b][key], value.to(torch.bfloat16))
            st8 = o8.state[c]
            if c.numel() >= lean.MIN_8BIT_SIZE and name == "adopt" and key == "exp_avg":
                # not written by ADOPT's first step (v = g*g only): still the zero state
                assert not st8[key].any() and not st8[key + lean.ABSMAX].any()
            elif c.numel() >= lean.MIN_8BIT_SIZE:
                codes, absmax = lean.quantized(value, o8._lean_keys[key])
                assert torch.equal(st8[key], codes) and torch.equal(st8[key + lean.ABSMAX], absmax), key
            else:
                assert lean.ABSMAX not in "".join(st8) or key + lean.ABSMAX not in st8
                assert torch.equal(st8[key], value)  # kept in 32 bits


# Largest param difference after 20 steps of these gradients (lr 1e-2), relative to the largest
# param movement of the 32-bit run: the tolerance is about twice the worst tensor measured
# (in the comments: 8-bit with the default maps, 16-bit). SophiaG's update is clipped to +-1 per
# element, so where m is tiny its sign decides a whole lr step and any rounding of m or h can
# move an element by up to 2 lr per step: its max-norm difference is larger for 16 bits too.
TOL = {  # name: (16-bit, 8-bit)
    "adamw": (0.01, 0.07),  # measured 0.0045, 0.035
    "adopt": (0.01, 0.05),  # 0.0040, 0.025
    "lamb": (0.01, 0.08),  # 0.0051, 0.038
    "sophia": (0.2, 0.25),  # 0.099, 0.118
    "muon": (0.01, 0.055),  # 0.0047, 0.027
    "shampoo": (0.01, 0.035),  # 0.0035, 0.017
}


@pytest.mark.parametrize("name", SIX)
def test_8_and_16_bit_track_32_bit(name):
    start = _params()
    runs = {}
    for bits in (32, 16, 8):
        ps = _params()
        _drive(_make(name, ps, bits), ps, 20)
        runs[bits] = ps
    for k, p0 in enumerate(start):
        moved = (runs[32][k] - p0).abs().max()
        assert moved > 0
        for bits, tol in zip((16, 8), TOL[name]):
            diff = (runs[bits][k] - runs[32][k]).abs().max()
            assert diff <= tol * moved, (name, bits, k, float(diff / moved))
        if p0.numel() < lean.MIN_8BIT_SIZE:
            # kept in 32 bits, and every update here depends on its own tensor's state only
            assert torch.equal(runs[8][k], runs[32][k])


@pytest.fixture
def fast32():
    """A backend "fast32" ahead of every other for AdamW and SophiaG that steps format 32 only
    (the reference's function, state_bits=(32,)): how auto and explicit requests treat a
    backend without a format, whichever backends implement them."""
    import dataclasses

    from mupopt import backends

    added = []
    for name in ("adamw", "sophia", "sophia_hessian"):
        ref = backends.get(name, "reference")
        added.append(backends.register(dataclasses.replace(ref, name="fast32", priority=1000, state_bits=(32,))))
    yield
    for b in added:
        del backends._REGISTRY[b.optimizer]["fast32"]


@pytest.mark.parametrize("name", ("adamw", "sophia"))
def test_auto_falls_back_per_tensor_and_explicit_refuses(name, fast32):
    ps = _params()
    opt = _make(name, ps, 8, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _drive(opt, ps, 2)
    used = opt.selected_backends[0][name]
    # the small bias on the fastest backend, the 8-bit tensors on the next one that steps them,
    # with the reason
    assert used.startswith("fast32 (1) + ") and used.endswith(" (2)"), used
    assert any(issubclass(w.category, BackendFallbackWarning) and "state_bits=8" in str(w.message) for w in caught)
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.uint8
    with pytest.raises(ValueError, match="does not implement 8-bit optimizer states"):
        _make(name, _params(), 8, backend="fast32")


def test_bf16_states_of_fp32_params_refused_with_a_reason(fast32):
    ps = _params()
    opt = _make("adamw", ps, 16, backend="fast32")
    with pytest.raises(RuntimeError, match="bfloat16 states of non-bfloat16 params"):
        _drive(opt, ps, 1)
    assert not opt.state  # nothing created
    bf = _params(torch.bfloat16)  # bf16 params: 16-bit states are their own dtype, the fast path
    opt = _make("adamw", bf, 16, backend="auto")
    _drive(opt, bf, 1)
    assert opt.state[bf[0]]["exp_avg"].dtype == torch.bfloat16
    assert opt.selected_backends[0]["adamw"] == "fast32"


@pytest.mark.parametrize("bad", [7, 0, 64, "8", 8.0, 8.5, True, None])
def test_bad_state_bits(bad):
    with pytest.raises(ValueError, match="Invalid state_bits"):
        mupopt.AdamW(_params(), state_bits=bad)
    ps = _params()
    opt = _make("adopt", ps, 8)
    _drive(opt, ps, 1)
    before = copy.deepcopy(opt.state_dict())
    opt.param_groups[0]["state_bits"] = bad
    for p in ps:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="Invalid state_bits"):
        opt.step()
    opt.param_groups[0]["state_bits"] = 8
    after = opt.state_dict()
    for k, st in before["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, after["state"][k][key])


@pytest.mark.parametrize("name", SIX)
def test_state_memory(name):
    mem = {}
    for bits in (32, 16, 8):
        ps = _params()
        opt = _make(name, ps, bits)
        before = opt.state_memory()
        _drive(opt, ps, 1)
        actual = sum(lean.nbytes(st) for st in opt.state.values())
        assert before == opt.state_memory() == actual, (bits, before, actual)
        mem[bits] = actual
    assert mem[8] < mem[16] < mem[32]
    if name == "adamw":
        # 2 entries: 4 + 4 bytes per element in 32 bits, 1 + 1 plus 4 bytes per 256 in 8 bits
        assert mem[32] - mem[8] == sum(2 * (4 * p.numel() - p.numel() - 4 * lean.blocks_of(p.numel()))
                                       for p in _params() if p.numel() >= lean.MIN_8BIT_SIZE)


def test_shampoo_preconditioner_memory_counts_the_8bit_buffers():
    ps = _params()
    opt = _make("shampoo", ps, 8)
    before = opt.preconditioner_memory()
    _drive(opt, ps, 1)
    assert before == opt.preconditioner_memory()
    assert before["total"] + sum(4 for _ in ps) == opt.state_memory()  # + the step counts


# -- state_dict, copies, GradScaler, width records ------------------------------------------------
@pytest.mark.parametrize("name", SIX)
def test_state_dict_round_trip_is_bit_exact(name):
    ps = _params()
    opt = _make(name, ps, 8)
    _drive(opt, ps, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_params = [p.detach().clone() for p in ps]
    _drive(opt, ps, 3, start=3)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    st0 = sd["state"][0]
    key = next(k for k in opt._lean_keys if k + lean.CODES in st0)  # codes under their own name
    assert st0[key + lean.CODES].dtype == torch.uint8 and key not in st0
    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt2 = _make(name, resumed, 8)
    opt2.load_state_dict(sd)
    _drive(opt2, resumed, 3, start=3)
    for a, b in zip(ps, resumed):
        assert torch.equal(a, b)
    for a, b in zip(ps, resumed):
        for key, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, opt2.state[b][key]), key


def test_scales_keep_float32_for_bf16_params_through_load():
    ps = _params(torch.bfloat16)
    opt = _make("adamw", ps, 8)
    _drive(opt, ps, 2)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = _make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in ps], 8)
    opt2.load_state_dict(sd)
    st = opt2.state[opt2.param_groups[0]["params"][0]]
    assert st["exp_avg_absmax"].dtype == torch.float32
    assert torch.equal(st["exp_avg_absmax"], opt.state[ps[0]]["exp_avg_absmax"])
    # 16-bit states of float16 params load as bfloat16 (torch alone would cast them to float16)
    hs = _params(torch.float16)
    opt = _make("adamw", hs, 16)
    _drive(opt, hs, 2)
    opt2 = _make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in hs], 16)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    st2 = opt2.state[opt2.param_groups[0]["params"][0]]
    assert st2["exp_avg"].dtype == torch.bfloat16 and torch.equal(st2["exp_avg"], opt.state[hs[0]]["exp_avg"])


@pytest.mark.parametrize("name", ("adamw", "muon", "shampoo"))
def test_32bit_checkpoint_into_8bit_and_back(name):
    ps = _params()
    o32 = _make(name, ps, 32)
    _drive(o32, ps, 3)
    sd32 = copy.deepcopy(o32.state_dict())
    o8 = _make(name, [torch.nn.Parameter(p.detach().clone()) for p in ps], 8)
    o8.load_state_dict(sd32)
    q = o8.param_groups[0]["params"]
    for a, b in zip(ps, q):
        for key, value in _lean_entries(o32, a).items():
            if a.numel() >= lean.MIN_8BIT_SIZE:
                codes, absmax = lean.quantized(value, o8._lean_keys[key])
                assert torch.equal(o8.state[b][key], codes) and torch.equal(o8.state[b][key + lean.ABSMAX], absmax)
            else:
                assert torch.equal(o8.state[b][key], value)
    # and back: the 32-bit optimizer gets the dequantized values
    o32b = _make(name, [torch.nn.Parameter(p.detach().clone()) for p in ps], 32)
    o32b.load_state_dict(copy.deepcopy(o8.state_dict()))
    for a, b in zip(q, o32b.param_groups[0]["params"]):
        for key in _lean_entries(o32, ps[0]):
            if key not in o8.state[a]:
                continue
            assert o32b.state[b][key].dtype == torch.float32 and lean.ABSMAX not in "".join(o32b.state[b])
            assert torch.equal(o32b.state[b][key], lean.decoded(o8.state[a], key, o8._lean_keys[key]))
    # both continue
    _drive(o8, q, 1, start=3)
    _drive(o32b, o32b.param_groups[0]["params"], 1, start=3)


@pytest.mark.parametrize("bits_from,bits_to", [(32, 8), (8, 16), (16, 32)])
@pytest.mark.parametrize("name", SIX)
def test_changing_state_bits_converts_at_the_next_step(name, bits_from, bits_to):
    """Changing group["state_bits"] between steps converts the states at the next step: the
    step equals that of an optimizer made with the new state_bits that loaded the state_dict
    (params and every state entry bit for bit). LAMB, Muon and Shampoo once kept stepping the
    old format: their plan's key left state_bits out."""
    ps = _params()
    opt = _make(name, ps, bits_from)
    _drive(opt, ps, 2)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    loaded = _make(name, qs, bits_to)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.param_groups[0]["state_bits"] = bits_to
    _drive(opt, ps, 1, start=2)
    _drive(loaded, qs, 1, start=2)
    entries = _lean_entries(opt, ps[0])
    assert entries and all(v.dtype == {32: torch.float32, 16: torch.bfloat16, 8: torch.uint8}[bits_to]
                           for v in entries.values())
    assert any(k.endswith(lean.ABSMAX) for k in opt.state[ps[0]]) == (bits_to == 8)
    for k, (p, q) in enumerate(zip(ps, qs)):
        assert torch.equal(p, q), k
        assert opt.state[p].keys() == loaded.state[q].keys(), k
        assert all(same_state_value(v, loaded.state[q][key]) for key, v in opt.state[p].items()), k


def test_a_checkpoint_with_codes_but_no_scales_is_refused():
    ps = _params()
    opt = _make("adamw", ps, 8)
    _drive(opt, ps, 1)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["exp_avg_absmax"]
    opt2 = _make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in ps], 8)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt2.load_state_dict(sd)
    assert not opt2.state


def test_codes_saved_under_the_entry_name_still_load():
    # checkpoints written before the codes had a key of their own: uint8 under the entry's name
    ps = _params()
    opt = _make("adamw", ps, 8)
    _drive(opt, ps, 2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"] = {i: {k.removesuffix(lean.CODES): v for k, v in st.items()} for i, st in sd["state"].items()}
    assert sd["state"][0]["exp_avg"].dtype == torch.uint8
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = _make("adamw", qs, 8)
    opt2.load_state_dict(sd)
    for a, b in zip(ps, qs):
        for key, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, opt2.state[b][key]), key
    # a state with both names for one entry is not a state_dict of this format: refused whole
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg"] = torch.zeros(ps[0].shape)
    opt3 = _make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in ps], 8)
    with pytest.raises(ValueError, match="exp_avg_codes"):
        opt3.load_state_dict(sd)
    assert not opt3.state


def test_dcp_format_mismatch_is_an_error_not_codes_cast_to_values(tmp_path):
    # DCP loads into the loading optimizer's entries, casting to their dtype: were the 8-bit
    # codes saved under "exp_avg", a 32-bit optimizer would load the numbers 0..255 as its
    # momentum. Under "exp_avg_codes" the mismatch is a missing key; the same format resumes.
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    # DCP wraps a rank's error in CheckpointException, a BaseException (torch 2.13)
    failed = (RuntimeError, dcp.api.CheckpointException)
    ps = _params()
    o8 = _make("adamw", ps, 8)
    _drive(o8, ps, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is ... uninitialized"
        dcp.save({"opt": o8.state_dict()}, checkpoint_id=str(tmp_path / "8"))
        for bits in (32, 8):
            qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
            dest = _make("adamw", qs, bits)
            _drive(dest, qs, 1)  # states exist, as get_optimizer_state_dict makes them
            sd = {"opt": dest.state_dict()}
            if bits == 32:
                with pytest.raises(failed, match=r"Missing key in checkpoint state_dict: opt\.state\.0\.exp_avg\b"):
                    dcp.load(sd, checkpoint_id=str(tmp_path / "8"))
                continue
            dcp.load(sd, checkpoint_id=str(tmp_path / "8"))
            dest.load_state_dict(sd["opt"])
            for a, b in zip(ps, qs):
                for key, v in o8.state[a].items():
                    if isinstance(v, torch.Tensor) and key != "step":
                        assert torch.equal(v, dest.state[b][key]), key
        # and a 32-bit checkpoint into an 8-bit optimizer: missing codes, reported
        o32 = _make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in ps], 32)
        _drive(o32, o32.param_groups[0]["params"], 1)
        dcp.save({"opt": o32.state_dict()}, checkpoint_id=str(tmp_path / "32"))
        with pytest.raises(failed, match=r"Missing key in checkpoint state_dict: opt\.state\.0\.exp_avg_codes"):
            dcp.load({"opt": o8.state_dict()}, checkpoint_id=str(tmp_path / "32"))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle(how):
    ps = _params()
    opt = _make("adamw", ps, 8)
    _drive(opt, ps, 2)
    clone = copy.deepcopy((ps, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((ps, opt)))
    qs, opt2 = clone
    _drive(opt, ps, 2, start=2)
    _drive(opt2, qs, 2, start=2)
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["exp_avg"], opt2.state[b]["exp_avg"])


def test_found_inf_skips_and_changes_nothing():
    ps = _params()
    opt = _make("adamw", ps, 8)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.tensor(1.0)
    opt.grad_scale = torch.tensor(8.0)
    opt.step()
    assert not opt.state  # nothing created
    del opt.found_inf, opt.grad_scale
    _drive(opt, ps, 1)
    before = {k: v.clone() for k, v in opt.state[ps[0]].items() if isinstance(v, torch.Tensor)}
    params_before = [p.detach().clone() for p in ps]
    opt.found_inf = torch.tensor(1.0)
    opt.grad_scale = torch.tensor(8.0)
    for p in ps:
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    del opt.found_inf, opt.grad_scale
    for k, v in before.items():
        assert torch.equal(opt.state[ps[0]][k], v)
    assert all(torch.equal(a, b) for a, b in zip(ps, params_before))


@pytest.mark.parametrize("name", ("adamw", "muon"))
def test_width_records_untouched(name):
    """The muP width record in each state ("mup") is the same with 8-bit states, survives a
    round trip and a 32-bit checkpoint loaded into 8 bits; the multipliers are the same."""
    from models import MLP

    def model():
        torch.manual_seed(0)
        net = MLP(128)
        with torch.device("meta"):
            base = MLP(32)
        mupopt.set_base_shapes(net, base)
        return net

    nets = {bits: model() for bits in (32, 8)}
    opts = {bits: _make(name, list(net.parameters()), bits) for bits, net in nets.items()}
    for bits, net in nets.items():
        _drive(opts[bits], list(net.parameters()), 2)
    for p32, p8 in zip(nets[32].parameters(), nets[8].parameters()):
        assert opts[32].state[p32][RECORD_KEY] == opts[8].state[p8][RECORD_KEY]
    assert [m for g in opts[32].param_groups for m in opts[32].group_multipliers(g)] == \
        [m for g in opts[8].param_groups for m in opts[8].group_multipliers(g)]
    sd = copy.deepcopy(opts[32].state_dict())
    fresh = model()
    opt = _make(name, list(fresh.parameters()), 8)
    opt.load_state_dict(sd)
    for p, q in zip(nets[32].parameters(), fresh.parameters()):
        assert opt.state[q][RECORD_KEY] == opts[32].state[p][RECORD_KEY]


def test_amsgrad_and_capturable_with_8bit_states():
    """AdamW's max_exp_avg_sq is quantized with the unsigned map; capturable=True (step counts
    as tensors, found_inf skipped on the device) steps 8-bit states and skips without a write."""
    ps, qs = _params(), _params()
    o32, o8 = _make("adamw", ps, 32, amsgrad=True), _make("adamw", qs, 8, amsgrad=True)
    _drive(o32, ps, 1)
    _drive(o8, qs, 1)
    codes, absmax = lean.quantized(o32.state[ps[0]]["max_exp_avg_sq"], lean.UNSIGNED)
    assert torch.equal(o8.state[qs[0]]["max_exp_avg_sq"], codes)
    assert torch.equal(o8.state[qs[0]]["max_exp_avg_sq_absmax"], absmax)
    cs = _params()
    opt = _make("adamw", cs, 8, capturable=True)
    _drive(opt, cs, 2)
    before = {k: v.clone() for k, v in opt.state[cs[0]].items() if isinstance(v, torch.Tensor)}
    opt.found_inf = torch.tensor(1.0)
    _drive(opt, cs, 1, start=2)
    del opt.found_inf
    assert all(torch.equal(opt.state[cs[0]][k], v) for k, v in before.items())
    _drive(opt, cs, 1, start=3)
    assert not torch.equal(opt.state[cs[0]]["exp_avg"], before["exp_avg"])


def test_mupcheck_tools_pass_state_bits():
    """`mupopt transfer` / `coord-check --state-bits N` build every optimizer with it."""
    from mupopt.mupcheck.train import OPTIMIZERS, make_optimizer
    from mupopt.mupcheck.transfer import build_parser

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    for name in OPTIMIZERS:
        opt = make_optimizer(name, net, 1e-3, state_bits=8)
        assert all(g["state_bits"] == 8 for g in opt.param_groups), name
    assert build_parser().parse_args(["--state-bits", "16"]).state_bits == 16
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--state-bits", "4"])


def test_torch_adamw_checkpoint_into_8bit():
    """A torch.optim.AdamW state_dict (no state_bits in its groups) loads into an 8-bit
    mupopt.AdamW quantized, and both continue alike."""
    ps = _params()
    ref = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
    _drive(ref, ps, 3)
    opt = _make("adamw", [torch.nn.Parameter(p.detach().clone()) for p in ps], 8)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    q = opt.param_groups[0]["params"]
    assert opt.param_groups[0]["state_bits"] == 8
    codes, absmax = lean.quantized(ref.state[ps[0]]["exp_avg"], lean.SIGNED)
    assert torch.equal(opt.state[q[0]]["exp_avg"], codes) and torch.equal(opt.state[q[0]]["exp_avg_absmax"], absmax)
    before = [p.detach().clone() for p in ps]
    _drive(ref, ps, 3, start=3)
    _drive(opt, q, 3, start=3)
    for a, b, s in zip(ps, q, before):  # the 8-bit tolerance of test_8_and_16_bit_track_32_bit
        assert (a - b).abs().max() <= TOL["adamw"][1] * (a - s).abs().max()


def test_8bit_states_with_stochastic_rounding_of_bf16_params():
    """Both memory savings together (bf16 params rounded stochastically, 8-bit states): the
    bias, whose states stay 32-bit, takes the same random bits and so the same values as in a
    run with 32-bit states; the 8-bit matrices move as in that run, within the 8-bit tolerance."""
    runs = {}
    for bits in (32, 8):
        torch.manual_seed(0)
        ps = _params(torch.bfloat16)
        opt = _make("adamw", ps, bits, stochastic_rounding=True)
        _drive(opt, ps, 10)
        runs[bits] = ps
    start = _params(torch.bfloat16)
    assert torch.equal(runs[8][1], runs[32][1])
    for k in (0, 2):
        moved = (runs[32][k].float() - start[k].float()).abs().max()
        assert (runs[8][k].float() - runs[32][k].float()).abs().max() <= TOL["adamw"][1] * moved + 2**-8 * start[k].abs().max()


def test_hessian_update_leaves_the_8bit_momentum_alone():
    """SophiaG's Hessian EMA writes h only: exp_avg's codes and absmax stay as they are (a
    re-quantization of decoded values is not the identity: a block whose largest |m| is
    negative decodes as -0.993*absmax with the signed dynamic map)."""
    ps = _params()
    opt = _make("sophia", ps, 8)
    _drive(opt, ps, 1)
    before = {k: v.clone() for k, v in opt.state[ps[0]].items() if k.startswith("exp_avg")}
    opt.update_hessian()
    for k, v in before.items():
        assert torch.equal(opt.state[ps[0]][k], v), k


@pytest.mark.parametrize("name", ("AdamW", "SophiaG"))
def test_compiled_reference_step_stores_its_8bit_states(name):
    """torch.compile(opt.step) on the reference backend with state_bits=8: the codes and block
    scales after 2 compiled steps are the eager steps' (the decoded entries fn wrote were found
    by their version counters, which a traced graph does not advance: compiled, nothing was
    stored back, every block scale stayed 0 and the params drifted 2e-3 from eager in 2 steps).
    The decode runs eagerly inside the compiled step; params agree to the compiled step's
    float32 round-off outside it (bias corrections)."""
    import torch._dynamo

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        p = torch.randn(64, 80, requires_grad=True)
        opt = getattr(mupopt, name)([p], lr=1e-2, backend="reference", state_bits=8)
        step = torch.compile(opt.step) if compiled else opt.step
        for i in range(2):
            p.grad = torch.full_like(p, 0.1 * (i + 1))
            step()
        return p.detach(), opt.state[p]

    (p_e, st_e), (p_c, st_c) = run(False), run(True)
    assert st_c["exp_avg"].dtype == torch.uint8 and st_c["exp_avg_absmax"].gt(0).all()
    for key in ("exp_avg", "exp_avg_absmax") + (("exp_avg_sq", "exp_avg_sq_absmax") if name == "AdamW" else ()):
        assert torch.equal(st_e[key], st_c[key]), key
    torch.testing.assert_close(p_c, p_e, rtol=0, atol=1e-6)
