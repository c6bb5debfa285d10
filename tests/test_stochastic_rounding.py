"""Stochastic rounding of bfloat16 / float16 param stores (mupopt/storage.py, docs/dtypes.md):
the rule against a float64 transcription, unbiasedness, the same random bits on every backend,
the bf16 stall gone, reproducibility, state_dict resume, copies, GradScaler skips, bad input."""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import pickle

import pytest
import torch

import mupopt
from mupopt import storage
from mupopt.optim import _lean_states as lean
from stochastic_steps import differing as _differing
from stochastic_steps import stepped as _stepped

SIX = {
    "adamw": (mupopt.AdamW, dict(lr=1e-4, weight_decay=0.0)),
    "adopt": (mupopt.ADOPT, dict(lr=1e-4, weight_decay=0.0)),
    "lamb": (mupopt.LAMB, dict(lr=1e-4, weight_decay=0.0)),
    "sophia": (mupopt.SophiaG, dict(lr=1e-4, weight_decay=0.0, rho=0.04)),
    # momentum 0, ns in float32: the same update O in the float32 and bfloat16 runs (a bfloat16
    # momentum buffer changes which noise directions NS keeps: 12% on the mean here, not a store).
    "muon": (mupopt.Muon, dict(lr=1e-3, weight_decay=0.0, momentum=0.0, ns_dtype=torch.float32)),
    "shampoo": (mupopt.Shampoo, dict(lr=1e-4, weight_decay=0.0, precondition_frequency=5)),
}


# -- the rule ---------------------------------------------------------------------------------
def _neighbours(x: torch.Tensor, dtype: torch.dtype):
    """float64 magnitudes of the dtype values just below-or-at and above |x| (round toward 0
    and one ulp up), from the dtype's own conversion (no bit tricks)."""
    a = x.double().abs()
    near = a.to(dtype).double()
    lo = torch.where(near > a, torch.nextafter(near.to(dtype), torch.zeros((), dtype=dtype)).double(), near)
    hi = torch.nextafter(lo.to(dtype), torch.full((), math.inf, dtype=dtype)).double()
    return a, lo, hi


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rule_matches_float64_transcription(dtype):
    """Rounds up exactly when k random bits plus the fraction (in units of 2^-k of the spacing)
    reach 2^k: k = 16 for bfloat16, 13 (the top 13 of the element's 16) for float16 normals;
    below 2^-14 (float16's fixed spacing) when the 16 random bits are below the fraction times
    2^16 (mupopt/storage.py)."""
    g = torch.Generator().manual_seed(0)
    mags = torch.exp2(torch.empty(20000).uniform_(-30 if dtype == torch.float16 else -140, 15, generator=g))
    x = (mags * torch.randn(20000, generator=g).sign()).float()
    bits = storage.random_bits(storage.step_key(77, 3), torch.arange(x.numel()))
    out = storage.round_stochastic(x, dtype, bits).double()
    a, lo, hi = _neighbours(x, dtype)
    if dtype == torch.bfloat16:
        k = torch.full_like(a, 16.0)
        r = bits.double()
    else:
        small = a < 2.0**-14
        k = torch.where(small, 16.0, 13.0)
        r = torch.where(small, bits.double(), (bits >> 3).double())
    frac = (a - lo) / (hi - lo)
    up = r + frac * torch.exp2(k) >= torch.exp2(k)
    if dtype == torch.float16:
        up = torch.where(small, r < torch.floor(frac * 2.0**16), up)
    want = torch.where(up, hi, lo) * x.double().sign()
    assert torch.equal(out.abs(), want.abs())
    assert torch.equal(out.sign() * (out != 0), want.sign() * (want != 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nonfinite_kept(dtype):
    """inf stays inf, NaN stays NaN (also NaNs whose payload would carry into the exponent or
    vanish under an added 16 bits: 0x7FFFFFFF, 0x7F800001), zeros keep their sign."""
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 0.0, 0.0])
    x.view(torch.int32)[5:] = torch.tensor([0x7FFFFFFF, 0x7F800001], dtype=torch.int32)
    for seed in range(20):
        bits = storage.random_bits(storage.step_key(seed, 1), torch.arange(7))
        out = storage.round_stochastic(x, dtype, bits)
        assert torch.equal(out[:2], x[:2].to(dtype)) and out[2].isnan() and out[5:].isnan().all()
        assert torch.equal(out[3:5].view(torch.int16), x[3:5].to(dtype).view(torch.int16))


@pytest.mark.parametrize("dtype,value", [
    (torch.bfloat16, 1.0 + 2.0**-9), (torch.bfloat16, -3.3e-3), (torch.bfloat16, 1e-40),
    (torch.float16, 1.0001), (torch.float16, -3.3e-3), (torch.float16, 1e-7), (torch.float16, 7e-9),
])
def test_unbiased(dtype, value):
    """Mean of 2^17 draws of one value: within 4 standard errors of the float32 value."""
    n = 1 << 17
    x = torch.full((n,), value, dtype=torch.float32)
    bits = storage.random_bits(storage.step_key(123, 7), torch.arange(n))
    out = storage.round_stochastic(x, dtype, bits).double()
    a, lo, hi = _neighbours(x[:1], dtype)
    f = float((a - lo) / (hi - lo))
    se = float(hi - lo) * math.sqrt(f * (1 - f) / n)
    assert set(out.abs().unique().tolist()) <= {float(lo), float(hi)}
    assert abs(float(out.mean()) - float(x[0])) <= 4 * se + 1e-300


def test_bits_are_uniform():
    """The 16 bits of each element over consecutive indices: each bit set in half the draws
    (within 5 standard errors), the two elements of a pair (halves of one word) unrelated, and
    consecutive keys give unrelated streams."""
    n = 1 << 16
    bits = storage.random_bits(storage.step_key(1, 1), torch.arange(n))
    assert int(bits.min()) >= 0 and int(bits.max()) < 1 << 16
    for b in range(16):
        share = float(((bits >> b) & 1).double().mean())
        assert abs(share - 0.5) < 5 * 0.5 / math.sqrt(n), b
    assert float((bits[0::2] == bits[1::2]).double().mean()) < 1e-3
    other = storage.random_bits(storage.step_key(1, 2), torch.arange(n))
    assert float((bits == other).double().mean()) < 1e-3


# -- the optimizers ---------------------------------------------------------------------------
def _drift(name, dtype, stochastic, backend="reference", steps=100, seed=0):
    """Signed change of each param near 1 after ``steps`` steps with gradients of mean 1 (float64
    tensor): the float32 update is about lr per step, far below half a bfloat16 spacing (2^-9 at
    1)."""
    cls, kw = SIX[name]
    torch.manual_seed(seed)
    p0 = 0.5 + 0.5 * torch.rand(64, 64)
    p = torch.nn.Parameter(p0.to(dtype))
    start = p.detach().double().clone()
    opt = cls([p], stochastic_rounding=stochastic, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # The same gradient values in every run (bfloat16-representable).
        p.grad = (1.0 + 0.5 * torch.randn(64, 64, generator=g)).to(torch.bfloat16).to(dtype)
        if name == "sophia" and _ % 10 == 0:
            opt.update_hessian()
        opt.step()
    return p.detach().double() - start


@pytest.mark.parametrize("name", list(SIX))
def test_bf16_stall_gone(name):
    """bfloat16 params, lr 1e-4, 100 steps: rounded to nearest they hardly move; rounded
    stochastically they move as the float32 params do: the mean of the per-element differences
    is zero within 4 standard errors, and those are small enough to tell a stall or a biased
    rounding (4 SE < half the float32 mean change). Muon's per-element update (about 1e-5 a
    step against a bfloat16 spacing of 2^-9..2^-8) leaves a noise whose mean over 4096 elements
    has a standard error near 9% of the mean change: a fixed 5% bound, as first written, failed
    on about one seed in two (32 seeds: spread 10-11% for both bit rules tried)."""
    fp32 = _drift(name, torch.float32, False)
    nearest = float(_drift(name, torch.bfloat16, False).mean())
    diff = _drift(name, torch.bfloat16, True) - fp32
    mean = float(fp32.mean())
    assert abs(mean) > 5e-4  # 100 steps of lr 1e-4: at most 1e-2
    assert abs(nearest) < 0.2 * abs(mean)
    se = float(diff.std()) / diff.numel() ** 0.5
    assert 4 * se < 0.5 * abs(mean), (mean, se)
    assert abs(float(diff.mean())) <= 4 * se, (mean, nearest, float(diff.mean()), se)


def _train(opt_factory, steps, p=None, opt=None, dtype=torch.bfloat16, gen_seed=1):
    if p is None:
        p = torch.nn.Parameter(torch.randn(32, 48).to(dtype))
    if opt is None:
        opt = opt_factory([p])
    g = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        p.grad = torch.randn(32, 48, generator=g).to(p.dtype)
        opt.step()
    return p, opt


@pytest.mark.parametrize("name", list(SIX))
def test_reproducible_from_manual_seed(name):
    cls, kw = SIX[name]
    kw = dict(kw, lr=1e-3)

    def run(seed):
        torch.manual_seed(seed)
        p, opt = _train(lambda ps: cls(ps, stochastic_rounding=True, backend="reference", **kw), 6)
        return p.detach().clone(), opt

    a, opt = run(0)
    b, _ = run(0)
    c, _ = run(1)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))
    assert isinstance(opt.state_dict()["state"][0]["sr_seed"], int)
    assert opt.param_groups[0]["stochastic_rounding"] is True


@pytest.mark.parametrize("name", list(SIX))
def test_state_dict_resume_bit_exact(name):
    """Save after 4 steps, continue 4: a fresh optimizer loading the save (its own seed draws
    differ: torch.manual_seed(99)) continues bit for bit, through torch.save/torch.load."""
    cls, kw = SIX[name]
    kw = dict(kw, lr=1e-3)
    factory = lambda ps: cls(ps, stochastic_rounding=True, backend="reference", **kw)  # noqa: E731
    torch.manual_seed(0)
    p, opt = _train(factory, 4)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved_p = p.detach().clone()
    _train(factory, 4, p, opt, gen_seed=2)

    torch.manual_seed(99)
    q = torch.nn.Parameter(saved_p.clone())
    opt2 = cls([q], backend="reference", **kw)  # option off: the loaded group turns it on
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["stochastic_rounding"] is True
    _train(factory, 4, q, opt2, gen_seed=2)
    assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))


@pytest.mark.parametrize("name", list(SIX))
def test_state_memory_before_first_step(name):
    """state_memory() before the first step counts what that step creates: with the option on, a
    bfloat16 param's state also holds a step count (Muon's matrices have none otherwise)."""
    cls, kw = SIX[name]
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 48).to(torch.bfloat16))
    opt = cls([p], stochastic_rounding=True, backend="reference", **kw)
    planned = opt.state_memory()
    _train(None, 1, p, opt)
    assert "step" in opt.state[p]
    assert planned == opt.state_memory() == lean.nbytes(opt.state[p])


def test_element_index_of_non_contiguous_tensors():
    """The index the random bits are drawn for: the memory offset of a dense but permuted
    tensor (as the fused backends count it through its flat view), the row-major index of a
    strided one (module docstring of mupopt/storage.py)."""
    base = torch.zeros(6, 10, dtype=torch.bfloat16)
    offsets = torch.arange(60).view(6, 10)
    assert torch.equal(storage.element_index(base.t()), offsets.t())
    assert torch.equal(storage.element_index(base[:, ::2]), torch.arange(30).view(6, 5))


@pytest.mark.parametrize("name", ["muon", "shampoo"])
def test_non_contiguous_matrix_param(name):
    """A transposed or sliced bfloat16 matrix is stepped with stochastic rounding by the
    reference (Muon's and Shampoo's matrix paths hand it to the store as it is), reproducibly."""
    cls, kw = SIX[name]
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(48, 32).to(torch.bfloat16).t()),
              torch.nn.Parameter(torch.randn(32, 96).to(torch.bfloat16)[:, ::2])]
        before = [p.detach().clone() for p in ps]
        opt = cls(ps, stochastic_rounding=True, backend="reference", **dict(kw, lr=1e-2))
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(before, ps))
        out.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(*out))


def test_deepcopy_steps_identically():
    torch.manual_seed(0)
    p, opt = _train(lambda ps: mupopt.AdamW(ps, lr=1e-3, stochastic_rounding=True, backend="reference"), 3)
    q, opt2 = copy.deepcopy((p, opt))
    r, opt3 = pickle.loads(pickle.dumps((p, opt)))
    for a, o in ((p, opt), (q, opt2), (r, opt3)):
        _train(None, 3, a, o, gen_seed=5)
    assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
    assert torch.equal(p.detach().view(torch.int16), r.detach().view(torch.int16))


@pytest.mark.parametrize("name", list(SIX))
def test_float32_params_unchanged_by_option(name):
    """A documented no-op for float32 params: same bits, no seed drawn, no state added."""
    cls, kw = SIX[name]
    out = []
    for sr in (False, True):
        torch.manual_seed(0)
        p, opt = _train(lambda ps: cls(ps, stochastic_rounding=sr, backend="reference", **dict(kw, lr=1e-3)), 3,
                        dtype=torch.float32)
        out.append((p.detach().clone(), set(opt.state[p]), torch.get_rng_state()))
    assert torch.equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1] and "sr_seed" not in out[1][1]
    assert torch.equal(out[0][2], out[1][2])


def test_skipped_step_draws_nothing():
    """GradScaler's skip (found_inf): no state, no seed, the default generator untouched."""
    p = torch.nn.Parameter(torch.randn(8, 8).to(torch.bfloat16))
    opt = mupopt.AdamW([p], stochastic_rounding=True, backend="reference")
    p.grad = torch.randn(8, 8).to(torch.bfloat16)
    rng = torch.get_rng_state()
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert not opt.state[p]
    assert torch.equal(rng, torch.get_rng_state())
    opt.step()
    assert "sr_seed" in opt.state[p]


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_value_refused(bad):
    p = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
    for cls, kw in SIX.values():
        with pytest.raises(ValueError, match="stochastic_rounding"):
            cls([p], stochastic_rounding=bad, **kw)


def test_toggled_on_later_adds_seed():
    torch.manual_seed(0)
    p, opt = _train(lambda ps: mupopt.AdamW(ps, lr=1e-3, backend="reference"), 2)
    assert "sr_seed" not in opt.state[p]
    opt.param_groups[0]["stochastic_rounding"] = True
    _train(None, 1, p, opt)
    assert "sr_seed" in opt.state[p]


# -- the fused backends: the same random bits as the reference ----------------------------------
ELEMENTWISE = {
    "adamw": (mupopt.AdamW, {}),
    "adopt": (mupopt.ADOPT, {}),
    "lamb": (mupopt.LAMB, {}),
    "sophia": (mupopt.SophiaG, dict(rho=0.04)),
}


def _cpu_available():
    from mupopt.kernels.cpp import cpu_unsupported_reason

    reason = cpu_unsupported_reason([torch.zeros(1)])
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_cpu_same_bits_as_reference(name, dtype):
    """The cpu backend (bound steps, several threads over several chunks) stores what the
    reference stores, bit for bit (measured: 0 of 70567 values differ for all four, both dtypes).
    Its float32 math equals the reference's here; a 1-ulp float32 difference (MKL's square root,
    docs/dtypes.md) could flip one rounding on another machine, as it can round to nearest."""
    _cpu_available()
    cls, kw = ELEMENTWISE[name]
    ref, _ = _stepped(cls, kw, "reference", dtype)
    cpu, opt = _stepped(cls, kw, "cpu", dtype)
    assert opt.selected_backends == [{name: "cpu"}]
    assert _differing(ref, cpu) == 0


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_cpu_per_call_op_same_bits(name):
    """The per-call op (not bound: what capturable groups, GradScaler and LAMB's norm_reduce
    use) with the registry's functional signature, against the reference's function."""
    _cpu_available()
    from mupopt import backends

    cls, kw = ELEMENTWISE[name]
    out = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        ps = [torch.randn(s).to(torch.bfloat16) for s in [(40000,), (7, 3)]]
        opt = cls([torch.nn.Parameter(p) for p in ps], lr=1e-3, stochastic_rounding=True, **kw)
        group = opt.param_groups[0]
        states = [opt._init_state(p, group) | {"sr_seed": 1234 + i} for i, p in enumerate(group["params"])]
        hp = dataclasses.replace(opt._hparams(group), stochastic_rounding=True)
        mults = opt.group_multipliers(group)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in group["params"]]
            with torch.no_grad():
                backends.get(name, backend).fn(group["params"], grads, states, mults, hp)
        out.append([p.detach().clone() for p in group["params"]])
    assert _differing(*out) == 0


def test_cpu_option_switched_off_rounds_to_nearest():
    """Seeds stay in the states when the option is switched off; the bound plan (bound with
    them) then steps through the per-call op, to nearest, as the reference does."""
    _cpu_available()
    out = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
        opt = mupopt.AdamW([p], lr=1e-3, stochastic_rounding=True, backend=backend)
        g = torch.Generator().manual_seed(1)
        for k in range(4):
            if k == 2:
                opt.param_groups[0]["stochastic_rounding"] = False
            p.grad = torch.randn(1000, generator=g).to(torch.bfloat16)
            opt.step()
        assert "sr_seed" in opt.state[p]
        out.append([p.detach().clone()])
    assert _differing(*out) == 0


def test_cpu_seeds_checked():
    _cpu_available()
    p = torch.zeros(4, dtype=torch.bfloat16)
    args = ([p], [p.clone()], [torch.zeros_like(p)], [torch.zeros_like(p)], [], [torch.zeros(())],
            [1.0], [1.0], [1.0])
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    with pytest.raises(RuntimeError, match="sr_seeds has 2 values for 1 tensors"):
        torch.ops.mupopt.adamw_(*args, **kw, sr_seeds=[1, 2])
    with pytest.raises(RuntimeError, match="not a 32-bit seed"):
        torch.ops.mupopt.adamw_(*args, **kw, sr_seeds=[1 << 32])
    assert torch.equal(p, torch.zeros(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_capturable_found_inf_on_device(backend):
    """capturable=True with GradScaler's found_inf handed to the backend (no host read): a step
    with found_inf = 0 rounds as the reference's host path does, one with found_inf = 1 changes
    nothing (params, states, step counts; the seeds exist: states are created before the device
    decides)."""
    if backend == "cpu":
        _cpu_available()

    def run(capturable, skip_second):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40000).to(torch.bfloat16))
        opt = mupopt.AdamW([p], lr=1e-3, stochastic_rounding=True, capturable=capturable,
                           backend=backend if capturable else "reference")
        g = torch.Generator().manual_seed(1)
        for k in range(3):
            p.grad = torch.randn(40000, generator=g).to(torch.bfloat16)
            if capturable:
                opt.found_inf = torch.tensor(1.0 if (skip_second and k == 1) else 0.0)
            before = p.detach().clone()
            opt.step()
            if capturable and skip_second and k == 1:
                assert torch.equal(p.detach().view(torch.int16), before.view(torch.int16))
        return p.detach().clone(), float(opt.state[p]["step"])

    host, steps = run(False, False)
    device, dsteps = run(True, False)
    assert steps == dsteps == 3.0
    # The capturable reference forms its step sizes as tensors (another float32 rounding
    # sequence than the host path), which can move a value across a rounding threshold:
    # measured 1 of 40000. The cpu op forms them as the host reference: 0.
    assert _differing([host], [device]) <= (0 if backend == "cpu" else 4)
    _, skipped_steps = run(True, True)
    assert skipped_steps == 2.0


def test_lamb_norm_reduce_same_bits():
    """LAMB's split form (norm_reduce: lamb_partials_ then lamb_apply_, whose step counts are
    already incremented when the params are stored) against the reference's."""
    from mupopt import backends

    _cpu_available()
    out = []
    for name in ("reference", "cpu"):
        torch.manual_seed(0)
        opt = mupopt.LAMB([torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(40000,), (9, 4)]],
                          lr=1e-3, stochastic_rounding=True)
        group = opt.param_groups[0]
        states = [opt._init_state(p, group) | {"sr_seed": 99 + i} for i, p in enumerate(group["params"])]
        hp = dataclasses.replace(opt._hparams(group), stochastic_rounding=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in group["params"]]
            with torch.no_grad():
                backends.get("lamb", name).fn(group["params"], grads, states, opt.group_multipliers(group), hp,
                                              norm_reduce=lambda sums: sums)
        out.append([p.detach().clone() for p in group["params"]])
    assert _differing(*out) == 0


def test_state_dict_loads_into_torch_adamw():
    """The seeds and the group key are extra entries torch.optim.AdamW carries along and ignores."""
    torch.manual_seed(0)
    p, opt = _train(lambda ps: mupopt.AdamW(ps, lr=1e-3, stochastic_rounding=True, backend="reference"), 2)
    q = torch.nn.Parameter(p.detach().clone())
    theirs = torch.optim.AdamW([q], lr=1e-3)
    theirs.load_state_dict(opt.state_dict())
    q.grad = torch.randn_like(q)
    theirs.step()
    assert theirs.state[q]["step"].item() == 3.0 and "sr_seed" in theirs.state[q]
