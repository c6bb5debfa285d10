"""state_bits=8 in the "cuda" backend's kernel (csrc/include/mupopt/multi_tensor.h, q8_chunk):
codes and block scales stored as mupopt/optim/_lean_states.py (the executable spec) stores them,
and AdamW, ADOPT, LAMB and SophiaG stepping 8-bit states as the reference backend does on the
same GPU. Marked gpu: written without a GPU (the kernel is compiled by
tests/test_csrc_compiles.py; these tests have not run yet), they run in benchmarks/gpu_check.sh's
test stage (``pytest -m gpu``) and skip cleanly without CUDA.

Exact where the kernel's arithmetic is the spec's: a state written from a zero state is exactly
the quantization of what the 32-bit kernel stores (the same float32 math in both formats), and a
gradient written straight into a state (betas 0) is exactly ``lean.quantized`` of it. Against the
reference backend, to the standard of the format-32 cuda kernel (tests/test_contract.py: its
float32 math is not torch's CUDA kernels' bit for bit, rtol 1e-6) and of the Triton kernels'
format 8 (tests/test_lean_states_triton.py): a value within float32 round-off of the edge between
two codes may take the other one (at most 1% of the codes), a bf16 rounding may flip."""
from __future__ import annotations

import pytest
import torch

from mupopt import backends
from mupopt.optim import _lean_states as lean
from test_lean_states import _auto_step_without_fallback, _fed_steps, _hard_values, _make, _same_floats

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NAMES = ("adamw", "adopt", "lamb", "sophia")
F32, BF16 = torch.float32, torch.bfloat16
DEV = BACKEND = "cuda"
# 5000 elements: 19 full blocks and one of 136; 50: below MIN_8BIT_SIZE (format 32 in the same
# launch list); 40000: three CUDA chunks of 16384, the last of 7232 elements (its last block 64).
SHAPES = [(100, 50), (50,), (40000,)]


def _grads(params, gen, poison=False):
    out = []
    for k, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen) * (1 + 3 * torch.rand(p.shape, generator=gen))
        if poison and k == 0:
            g.view(-1)[300] = float("nan")  # block 1 of the first tensor
            g.view(-1)[4999] = float("inf")  # its partial last block
        out.append(g.to(device=p.device, dtype=p.dtype))
    return out


def _run(name, bits, backend, steps=3, dtype=F32, poison_at=None, amp=False, **kw):
    torch.manual_seed(0)  # stochastic rounding's seeds
    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device=DEV, dtype=dtype)) for s in SHAPES]
    opt = _make(name, ps, bits, backend, **kw)
    gen = torch.Generator().manual_seed(7)
    _fed_steps(opt, ps, lambda t: _grads(ps, gen, poison=t is not None and t == poison_at), steps, amp)
    return ps, opt


def _on_cuda_backend(opt, name):
    """Every step's kernels on "cuda" (the 8-bit tensors and the small one alike: no fallback)."""
    for step in opt.selected_backends:
        for used in step.values():
            assert used.split(" ")[0] == BACKEND and "+" not in used, opt.selected_backends


def _tolerance(dtype):
    # tests/test_triton.py's tolerance(): float32 round-off; one bf16 ulp
    return dict(rtol=1e-5, atol=1e-6) if dtype == F32 else dict(rtol=1.6e-2, atol=1e-3)


def _compare(ref, got, dtype):
    """The cuda run against the reference's (module docstring): params and format-32 states to
    float32 (bf16) round-off; codes equal but for at most 1%, the decoded values then within two
    map errors of each other; block scales to float32 round-off, NaN where the reference's are."""
    (pr, orf), (pc, oc) = ref, got
    for k, (a, b) in enumerate(zip(pr, pc)):
        _same_floats(a.detach(), b.detach(), _tolerance(dtype), f"param {k}")
        sa, sb = orf.state[a], oc.state[b]
        assert set(sa) == set(sb)
        for key, v in sa.items():
            w = sb[key]
            if not isinstance(v, torch.Tensor) or key == "sr_seed" or v.ndim == 0:
                continue
            what = f"param {k} {key}"
            if v.dtype == torch.uint8:
                assert (v != w).float().mean() <= 0.01, what
                kind = orf._lean_keys[key]
                da, db = lean.decoded(sa, key, kind), lean.decoded(sb, key, kind)
                assert torch.equal(da.isnan(), db.isnan()), what
                scale = torch.repeat_interleave(sa[key + lean.ABSMAX], lean.BLOCK)[:v.numel()].view(v.shape)
                fin = da.isfinite() & db.isfinite()
                bound = 2 * lean.relative_error_bound(kind) + _tolerance(F32)["rtol"]
                assert ((da - db)[fin].abs() <= bound * scale[fin]).all(), what
            elif key.endswith(lean.ABSMAX):
                _same_floats(v, w, dict(rtol=_tolerance(F32)["rtol"], atol=0), what)
            else:
                _same_floats(v, w, _tolerance(v.dtype), what)


# -- the storage layer: codes and scales as the spec ----------------------------------------------
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_stores_equal_the_spec_bit_for_bit(offset):
    """One adamw_ call with betas 0 from zero states writes m = g (the lerp with weight 1 returns
    g exactly) and v = g*g (one rounding) into 8-bit states: their codes and block scales equal
    lean.quantized of g and g*g, bit for bit (NaN scales: NaN, their payload aside). Sizes: a
    partial last block, a partial last chunk; ``offset`` 1 puts every tensor one element off its
    allocation, so the kernel takes its one-element path instead of 4-wide accesses."""
    from mupopt.kernels.cpp.ops import _require, map_table

    sizes = (5000, 40000)
    store = [torch.zeros(n + offset, device=DEV)[offset:] for n in sizes]
    params = [s.copy_(torch.full_like(s, 0.5)) for s in store]
    grads = [_hard_values(n, k, lean.SIGNED, negative_zero_at=1500).to(DEV) for k, n in enumerate(sizes)]
    codes = [[torch.zeros(n + offset, dtype=torch.uint8, device=DEV)[offset:] for n in sizes] for _ in range(2)]
    absmax = [torch.full((lean.blocks_of(n),), 7.0, device=DEV) for n in sizes for _ in range(2)]
    steps = [torch.zeros(()) for _ in sizes]
    ones = [1.0] * len(sizes)
    _require(params)  # builds or loads the library (raises with the build's reason)
    torch.ops.mupopt.adamw_(params, grads, codes[0], codes[1], [], steps, ones, ones, ones, lr=1e-3, beta1=0.0,
                            beta2=0.0, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                            absmax=absmax, maps=[map_table(lean.SIGNED), map_table(lean.UNSIGNED)])
    for k, g in enumerate(grads):
        # m = fma(0, g - 0, g) (csrc/include/mupopt/common.h's Lerp, weight 1): g, and NaN where g
        # is infinite (0 * inf), as torch.lerp; v = fma(g, g, 0) = g*g
        m = torch.where(g.isinf(), float("nan"), g)
        for j, (value, kind) in enumerate(((m, lean.SIGNED), (g * g, lean.UNSIGNED))):
            want_codes, want_absmax = lean.quantized(value, kind)
            got_absmax = absmax[2 * k + j]
            assert torch.equal(codes[j][k], want_codes), (k, kind, int((codes[j][k] != want_codes).sum()))
            assert torch.equal(got_absmax.isnan(), want_absmax.isnan()), (k, kind)
            fin = ~want_absmax.isnan()
            assert torch.equal(got_absmax[fin].view(torch.int32), want_absmax[fin].view(torch.int32)), (k, kind)
    assert absmax[0][2].isnan() and absmax[0][3].isnan() and absmax[1][3].isinf() and absmax[0][1] == 0


@pytest.mark.parametrize("name", NAMES)
def test_first_step_stores_the_quantized_32bit_state(name):
    """One step from zero states on "cuda": the float32 states its kernel computes are the same
    in formats 32 and 8 (a zero state reads as 0 in both; LAMB's format-8 passes recompute the
    moments, bit-identical), so the 8-bit run stores exactly lean.quantized of the 32-bit run's
    states and the params are equal, bit for bit."""
    (p32, o32), (p8, o8) = _run(name, 32, BACKEND, steps=1), _run(name, 8, BACKEND, steps=1)
    _on_cuda_backend(o8, name)
    for a, c in zip(p32, p8):
        assert torch.equal(a.view(torch.int32), c.view(torch.int32))
        for key, kind in o8._lean_keys.items():
            if key not in o32.state[a]:
                continue
            value, st8 = o32.state[a][key], o8.state[c]
            if c.numel() >= lean.MIN_8BIT_SIZE and not value.any():
                # not written by the step (ADOPT's first sets v only): the zero state, all zeros
                assert not st8[key].any() and not st8[key + lean.ABSMAX].any(), key
            elif c.numel() >= lean.MIN_8BIT_SIZE:
                codes, absmax = lean.quantized(value, kind)
                assert torch.equal(st8[key], codes), key
                assert torch.equal(st8[key + lean.ABSMAX].view(torch.int32), absmax.view(torch.int32)), key
            else:
                assert key + lean.ABSMAX not in st8 and torch.equal(st8[key], value)  # kept in 32 bits


@pytest.mark.parametrize("name", NAMES)
def test_bf16_stochastic_params_equal_across_formats_at_the_first_step(name):
    """bf16 params rounded stochastically: the first step's params depend on the float32 states
    the kernel computes, not on how it stores them, and on the same random bits, so the 8-bit
    run's params equal the 32-bit run's (bf16 states) bit for bit."""
    (p32, _), (p8, o8) = (_run(name, bits, BACKEND, steps=1, dtype=BF16, stochastic_rounding=True)
                          for bits in (32, 8))
    _on_cuda_backend(o8, name)
    assert o8.state[p8[0]]["exp_avg"].dtype == torch.uint8
    for a, c in zip(p32, p8):
        assert torch.equal(a.view(torch.int16), c.view(torch.int16))


# -- the optimizers against the reference backend ---------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fp32_params_match_reference(name):
    ref, got = _run(name, 8, "reference"), _run(name, 8, BACKEND)
    _on_cuda_backend(got[1], name)
    assert [got[1].state[p]["exp_avg"].dtype for p in got[0]] == [torch.uint8, F32, torch.uint8]
    _compare(ref, got, F32)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_match_reference(name, stochastic):
    """bf16 params with 8-bit states, rounded to nearest or stochastically (the same random bits
    in both backends: a difference is a flipped rounding of a value within float32 round-off)."""
    kw = dict(dtype=BF16, stochastic_rounding=stochastic)
    ref, got = _run(name, 8, "reference", **kw), _run(name, 8, BACKEND, **kw)
    _on_cuda_backend(got[1], name)
    _compare(ref, got, BF16)


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "amp"])
def test_adamw_options(option):
    """amsgrad (a third 8-bit state sharing the unsigned map with exp_avg_sq: one table in shared
    memory), maximize, and GradScaler's grad_scale and found_inf (the skipped step changes no
    code and no scale)."""
    kw = {"amp": True} if option == "amp" else {option: True}
    ref, got = _run("adamw", 8, "reference", steps=4, **kw), _run("adamw", 8, BACKEND, steps=4, **kw)
    _on_cuda_backend(got[1], "adamw")
    _compare(ref, got, F32)


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_blocks(name):
    """A NaN and an inf gradient in two blocks: those blocks' scales turn NaN in both backends,
    the other blocks stay finite and match the reference."""
    ref, got = _run(name, 8, "reference", poison_at=1), _run(name, 8, BACKEND, poison_at=1)
    _compare(ref, got, F32)
    ps, opt = got
    absmax = opt.state[ps[0]]["exp_avg" + lean.ABSMAX]
    assert absmax[1].isnan() and torch.isfinite(absmax[2:-1]).all()


def test_lamb_split_passes_with_norm_reduce():
    """lamb_partials_ / lamb_apply_ (sharded params' form) with 8-bit states on "cuda": the second
    pass stores the states once, from the same decoded blocks; the result is the reference's."""
    out = []
    for backend in ("reference", BACKEND):
        gen = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(DEV)) for s in SHAPES]
        opt = _make("lamb", ps, 8, backend)
        group = opt.param_groups[0]
        states = [opt._init_state(p, group) for p in ps]
        hp, mults = opt._hparams(group), opt.group_multipliers(group)
        calls = []

        def reduce(sums):
            calls.append(sums.device.type)
            return sums

        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            with torch.no_grad():
                backends.get("lamb", backend).fn(ps, _grads(ps, gen), states, mults, hp, norm_reduce=reduce)
        assert len(calls) == 3
        out.append((ps, states))
    (pa, sa), (pb, sb) = out
    for a, b, x, y in zip(pa, pb, sa, sb):
        _same_floats(a, b, _tolerance(F32), "param")
        for key in x:
            if x[key].dtype == torch.uint8:
                assert (x[key] != y[key]).float().mean() <= 0.01, key
            elif x[key].ndim:
                _same_floats(x[key], y[key], dict(rtol=1e-5, atol=0 if key.endswith(lean.ABSMAX) else 1e-6), key)


@pytest.mark.parametrize("name", NAMES)
def test_auto_takes_the_cuda_backend_without_a_warning(name):
    """backend="auto" on CUDA tensors with 8-bit states: "cuda" steps them all (it lists format 8),
    with no BackendFallbackWarning."""
    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(DEV)) for s in SHAPES]
    opt = _auto_step_without_fallback(name, ps, _grads(ps, torch.Generator().manual_seed(0)))
    _on_cuda_backend(opt, name)
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.uint8 and opt.state[ps[1]]["exp_avg"].dtype == F32
