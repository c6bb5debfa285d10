"""state_bits=8 and 16 in the "triton" backend (under TRITON_INTERPRET=1 on CPU tensors where there
is no CUDA): its storage layer (_common._store / _load with the format-8 codes) stores and reads
exactly what mupopt/optim/_lean_states.py stores and reads, and the six optimizers step formats
8 and 16 as the reference backend does, to the standard their format-32 kernels meet (bit for
bit where those are; within float32 round-off where the kernels' float32 math is not the
reference's bit for bit: tests/test_triton.py's tolerance())."""
from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton_mode
from test_lean_states import _hard_values, _make as make_lean, _same_floats

with triton_mode.defining_kernels():
    import triton
    import triton.language as tl

    import mupopt
    from mupopt.kernels.triton import _common
    from mupopt.optim import _lean_states as lean

    @triton.jit
    def _roundtrip_kernel(x_ptr, codes_addr, absmax_addr, out_ptr, lut, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
        # store x in format 8, then read it back (one program per BLOCK elements, as the kernels)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        _common._store(codes_addr, offs, x, mask, KIND, False, True, 0, absmax_addr, lut)
        y = _common._load(codes_addr, offs, mask, KIND, False, True, absmax_addr, lut)
        tl.store(out_ptr + offs, y, mask=mask)


pytestmark = pytest.mark.skipif(not _common.INTERPRET, reason="CPU tensors need the interpreter (no CUDA here)")

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    triton_mode.match_environment(monkeypatch, _common.INTERPRET)


# -- the storage layer ---------------------------------------------------------------------------
@pytest.mark.parametrize("maps", lean.MAP_NAMES)
@pytest.mark.parametrize("kind", (lean.SIGNED, lean.UNSIGNED))
def test_store_and_load_same_bits_as_reference(kind, maps, monkeypatch):
    """Codes and absmax equal lean.quantize_'s, the values read equal lean.dequantize's, bit for
    bit: blocks of very different scales, a zero block, a NaN block, an inf block, a partial
    last block, and 2048-element programs (8 blocks each; the last one masked)."""
    monkeypatch.setattr(lean, "maps", maps)
    n = 5 * 2048 + 300  # 41 blocks, the last of 44 elements
    x = _hard_values(n, 0, kind, negative_zero_at=2048 * 2 + 7)
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.full((lean.blocks_of(n),), 7.0)
    out = torch.empty(n)
    _roundtrip_kernel[(triton.cdiv(n, 2048),)](x, codes.data_ptr(), absmax.data_ptr(), out, _common.lut(x.device), n,
                                               KIND=_common._Q8_KIND[kind], BLOCK=2048)
    want_codes, want_absmax = lean.quantized(x, kind)
    assert torch.equal(codes, want_codes)
    assert torch.equal(absmax.view(torch.int32), want_absmax.view(torch.int32)) or (
        torch.equal(absmax.isnan(), want_absmax.isnan())
        and torch.equal(absmax[~absmax.isnan()], want_absmax[~want_absmax.isnan()]))
    assert absmax[2].isnan() and absmax[3].isinf() and absmax[1] == 0
    want = lean.dequantize(want_codes, want_absmax, kind)
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(out[~out.isnan()], want[~want.isnan()])


# -- the optimizers ------------------------------------------------------------------------------
SIX = ("adamw", "adopt", "lamb", "sophia", "muon", "shampoo")
# 70 x 70: 19 blocks and a partial one (Shampoo: preconditioner blocks of 64 that cut across the
# format's blocks); 50: below MIN_8BIT_SIZE, format 32 beside the others; 41 x 200 = 8200: two
# chunks of the elementwise kernels (8192), the second of 8 elements.
SHAPES = [(70, 70), (50,), (41, 200)]
# Muon and Shampoo (their matrix kernels are slow in the interpreter): 65 x 64 = 4160, two
# programs of Muon's 4096, the last block partial; Shampoo's 48-wide preconditioner blocks cut
# across the format's 256-element blocks.
MATRIX_SHAPES = [(65, 64), (50,)]


def _make(name, params, bits, backend, **kw):
    """tests/test_lean_states.py's optimizers, but Shampoo with epsilon 1e-2 as
    tests/test_triton_matrix.py: the roots of nearly singular statistics amplify the matmuls'
    round-off beyond its tolerance in any format."""
    if name == "shampoo":
        return mupopt.Shampoo(params, lr=1e-2, epsilon=1e-2, precondition_frequency=1, max_preconditioner_dim=48,
                              state_bits=bits, backend=backend, **kw)
    return make_lean(name, params, bits, backend, **kw)


def _run(name, backend, bits, dtype=F32, steps=3, poison=False, **kw):
    torch.manual_seed(0)  # stochastic rounding's seeds come from torch's generator
    gen = torch.Generator().manual_seed(1)
    shapes = MATRIX_SHAPES if name in ("muon", "shampoo") else SHAPES
    ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in shapes]
    opt = _make(name, ps, bits, backend, **kw)
    for t in range(steps):
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + 3 * torch.rand(p.shape, generator=gen))).to(dtype)
        if poison and t == steps - 1:
            ps[0].grad.view(-1)[300] = float("nan")  # block 1 of the first tensor
            ps[-1].grad.view(-1)[-5] = float("inf")  # the last block of the last tensor
        if name == "sophia":
            opt.step(bs=64)
            if t % 2 == 0:
                opt.update_hessian()
        else:
            opt.step()
    return ps, opt


def _tolerance(dtype, name=""):
    # tests/test_triton.py's tolerance(): float32 round-off; one bf16 ulp. Shampoo:
    # tests/test_triton_matrix.py's shampoo_tol("cpu") (its roots amplify the matmuls' round-off).
    if dtype == F32:
        return dict(rtol=1e-4, atol=1e-5) if name == "shampoo" else dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=1.6e-2, atol=1e-3)


def _compare(name, ref, tri, dtype, param_tol=None):
    """Triton's run against the reference's, to the standard of the format-32 kernels: their
    float32 math is not the reference's bit for bit (ATen's vectorised lerp and addcmul, MKL's
    sqrt: tests/test_triton.py; Shampoo's matmuls: tests/test_triton_matrix.py), so a float32
    state may differ in its last bits and a block's absmax with it, a value near the edge
    between two codes may take the other one (at most 1% of the codes; the decoded values then
    within the map's rounding bound of each other), a bf16 rounding may flip (one ulp, at most 1%
    of the values)."""
    (pr, orf), (pt, ot) = ref, tri
    # every kernel of the step on "triton" (Muon: its AdamW part too; SophiaG: the Hessian EMA)
    assert all(used.split(" ")[0] == "triton" and "+" not in used for step in ot.selected_backends
               for used in step.values()), ot.selected_backends
    for k, (a, b) in enumerate(zip(pr, pt)):
        _same_floats(a.detach(), b.detach(), param_tol or _tolerance(dtype, name), f"param {k}")
        sa, sb = orf.state[a], ot.state[b]
        assert set(sa) == set(sb)
        for key, v in sa.items():
            w = sb[key]
            if not isinstance(v, torch.Tensor) or key not in orf._lean_keys and not key.endswith(lean.ABSMAX):
                continue
            what = f"param {k} {key}"
            if v.dtype == torch.uint8:
                assert lean.is_quantized(sa, key) and lean.is_quantized(sb, key), what
                assert (v != w).float().mean() <= 0.01, what
                kind = orf._lean_keys[key]
                da, db = lean.decoded(sa, key, kind), lean.decoded(sb, key, kind)
                scale = torch.repeat_interleave(sa[key + lean.ABSMAX], lean.BLOCK)[:v.numel()].view(v.shape)
                fin = da.isfinite() & db.isfinite()
                assert torch.equal(da.isnan(), db.isnan()), what
                bound = 2 * lean.relative_error_bound(kind) + _tolerance(F32, name)["rtol"]
                assert ((da - db)[fin].abs() <= bound * scale[fin]).all(), what
            elif key.endswith(lean.ABSMAX):
                # the largest |value|, to the values' float32 round-off
                _same_floats(v, w, dict(rtol=_tolerance(F32, name)["rtol"], atol=0), what)
            else:
                _same_floats(v, w, _tolerance(v.dtype, name), what)


def _formats_used(opt, bits):
    got = {lean.state_format(p, opt.param_groups[0]) for p in opt.param_groups[0]["params"]}
    assert got == ({8, 32} if bits == 8 else {16}), got


def _lean_entries(opt, p):
    return {k: v for k, v in opt.state[p].items() if k in opt._lean_keys}


@pytest.mark.parametrize("name", SIX)
def test_first_step_stores_the_quantized_32bit_state(name):
    """One step from zero states: the float32 states the kernels compute are the same whatever
    the format (a zero state reads as 0 in each), so the 8-bit run stores exactly the
    quantization (lean.quantized) of the 32-bit run's states, the 16-bit run their bfloat16
    rounding, bit for bit, and the params are equal bit for bit."""
    runs = {bits: _run(name, "triton", bits, steps=1) for bits in (32, 16, 8)}
    (p32, o32), (p16, o16), (p8, o8) = runs[32], runs[16], runs[8]
    for a, b, c in zip(p32, p16, p8):
        assert torch.equal(a, b) and torch.equal(a, c)
        ref = _lean_entries(o32, a)
        assert ref and set(ref) == set(_lean_entries(o16, b)) == set(_lean_entries(o8, c))
        for key, value in ref.items():
            assert torch.equal(o16.state[b][key], value.to(BF16)), key
            st8 = o8.state[c]
            if c.numel() >= lean.MIN_8BIT_SIZE:
                codes, absmax = lean.quantized(value, o8._lean_keys[key])
                assert torch.equal(st8[key], codes) and torch.equal(st8[key + lean.ABSMAX], absmax), key
            else:
                assert key + lean.ABSMAX not in st8 and torch.equal(st8[key], value)  # kept in 32 bits


@pytest.mark.parametrize("name", SIX)
def test_bf16_params_stochastic_rounding_maximize_nonfinite(name):
    """bf16 params rounded stochastically, maximize (where the optimizer has it), 8-bit states,
    three steps, the last with a NaN and an inf gradient (not for Shampoo, whose roots refuse
    non-finite statistics): their blocks turn NaN in both backends alike, the rest as the
    reference (_compare)."""
    kw = dict(stochastic_rounding=True) if name in ("muon", "shampoo") else dict(stochastic_rounding=True, maximize=True)
    poison = name != "shampoo"
    ref = _run(name, "reference", 8, BF16, poison=poison, **kw)
    tri = _run(name, "triton", 8, BF16, poison=poison, **kw)
    _formats_used(tri[1], 8)
    _compare(name, ref, tri, BF16)
    if poison:
        key = "momentum_buffer" if name == "muon" else "exp_avg"
        absmax = tri[1].state[tri[0][0]][key + lean.ABSMAX]
        assert absmax[1].isnan() and not absmax[0].isnan()


@pytest.mark.parametrize("bits", (8, 16))
@pytest.mark.parametrize("name", SIX)
def test_fp32_params_match_reference(name, bits):
    """float32 params (format 16: bfloat16 states of float32 params), three steps."""
    ref = _run(name, "reference", bits)
    tri = _run(name, "triton", bits)
    _formats_used(tri[1], bits)
    # Shampoo's D differs from the reference's by round-off that its roots amplify (1e-6
    # relative), enough to flip a bf16 rounding or an 8-bit code of the momentum it feeds (|m| <
    # 1 here): a flip of one step's momentum by one bf16 ulp (2^-8) or one code (twice the map's
    # rounding bound) moves a param by lr times that, carried by beta1 into the later steps: at
    # most 1 + 2 + 3 = 6 times over 3 steps. Measured: 7.6e-5 (16 bits), 5.9e-5 (8 bits; 4.0e-4
    # on a 70 x 70 matrix in 64-blocks); format 32 alone 2.9e-6.
    flip = 2**-8 if bits == 16 else 2 * lean.relative_error_bound(lean.SIGNED)
    param_tol = dict(rtol=1e-4, atol=6 * 1e-2 * flip) if name == "shampoo" else None
    _compare(name, ref, tri, F32, param_tol)


# -- compiled for the GPU (sm_90, no GPU needed) -------------------------------------------------
_COMPILE_LAUNCHES = r"""
from mupopt.kernels.triton.muon import muon_triton
from mupopt.kernels.triton.shampoo import shampoo_triton
from mupopt.mup import Multipliers
from mupopt.optim import _lean_states as lean
from mupopt.optim.muon import MuonHparams
from mupopt.optim.shampoo import ShampooHparams, init_shampoo_state
group = {"state_bits": 8}
ps = [torch.zeros(70, 70), torch.zeros(5000)]
M = [Multipliers(1.0, 1.0, 1.0)] * 2
muon_states = [dict(lean.zeros(ps[0], group, "momentum_buffer"))]
muon_triton(ps[:1], [torch.zeros(70, 70)], muon_states, M[:1],
            MuonHparams(0.02, 0.1, 0.95, True, ((3.4445, -4.775, 2.0315),), 1, 1e-7, None, torch.bfloat16))
states = [dict(init_shampoo_state(p, 64, group=group), step=torch.tensor(0.0)) for p in ps]
assert states[0]["momentum_buffer"].dtype == torch.uint8
# start_preconditioning_step 100: no roots to take from the (uncomputed) statistics
shampoo_triton(ps, [torch.zeros_like(p) for p in ps], states, M,
               ShampooHparams(1e-3, 0.9, 0.999, 1e-2, False, 0.0, 64, 1, 100, "adam", 0.999, 1e-8, "newton"))
"""


def test_muon_and_shampoo_8bit_kernels_compile_for_sm90():
    """The Muon momentum and Shampoo update kernels with 8-bit states (codes 5 and 6) compile
    for the GPU: the interpreter accepts code the compiler may not."""
    results = triton_mode.compile_for_sm90(_COMPILE_LAUNCHES)
    by_kernel = {}
    for r in results:
        by_kernel.setdefault(r["kernel"], []).append(r["constexprs"])
    assert any(c["BUF_BF16"] == "5" for c in by_kernel["_muon_momentum_kernel"])
    assert any(c["M_BF16"] == "5" and c["V_BF16"] == "6" for c in by_kernel["_shampoo_update_kernel"])


# -- state_dict resume and GradScaler -------------------------------------------------------------
def _scaled_steps(opt, ps, gen, n, scale):
    """n steps with gradients multiplied by ``scale`` and GradScaler's grad_scale handed to the
    optimizer (the kernels unscale in float32: mupopt.backends)."""
    for _ in range(n):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf


@pytest.mark.parametrize("name", ("adamw", "lamb"))
def test_resume_bit_exact_and_grad_scale(name):
    """8-bit states on "triton": a state_dict saved after 2 steps and loaded into a new
    optimizer continues bit for bit as the original does; with GradScaler's scale (8) the steps
    match the reference backend's (_compare)."""
    import copy

    runs = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
        opt = _make(name, ps, 8, backend)
        _scaled_steps(opt, ps, gen, 2, 8.0)
        saved = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in ps], gen.get_state())
        _scaled_steps(opt, ps, gen, 2, 8.0)
        runs[backend] = (ps, opt, saved)
    _compare(name, runs["reference"][:2], runs["triton"][:2], F32)
    ps, opt, (sd, values, gen_state) = runs["triton"]
    qs = [torch.nn.Parameter(v.clone()) for v in values]
    opt2 = _make(name, qs, 8, "triton")
    opt2.load_state_dict(sd)
    gen = torch.Generator()
    gen.set_state(gen_state)
    _scaled_steps(opt2, qs, gen, 2, 8.0)
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
        for key, v in opt.state[a].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, opt2.state[b][key]), key
    assert opt2.state[qs[0]]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("bits", (8, 16))
@pytest.mark.parametrize("name", ("adamw", "lamb", "sophia"))
def test_compiled_step_mixes_8bit_and_small_32bit_tensors(name, bits):
    """torch.compile(opt.step) with state_bits 8 or 16: one param group holds a tensor below
    MIN_8BIT_SIZE (with 8 its states stay 32-bit, no block scales) beside large ones, the small
    one first (its state has no "exp_avg_absmax"): the custom op passes each 8-bit state's block
    scales and a placeholder for the small tensor's, and 3 compiled steps equal 3 eager ones bit
    for bit. (The op once passed only the entries of _OP_SPECS taken from the first state: every
    compiled 8-bit step on triton raised "exp_avg 0 has dtype torch.uint8 and no exp_avg_absmax
    entry".)"""
    import torch._dynamo

    shapes = [(10,), (lean.MIN_8BIT_SIZE + 900,), (40, 128)]
    cls = {"adamw": mupopt.AdamW, "lamb": mupopt.LAMB, "sophia": mupopt.SophiaG}[name]

    def run(compiled):
        torch._dynamo.reset()
        gen = torch.Generator().manual_seed(5)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = cls(params, lr=1e-2, backend="triton", state_bits=bits)
        step = torch.compile(opt.step) if compiled else opt.step
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step()
        return params, opt

    (eager, opt_e), (comp, opt_c) = run(False), run(True)
    for p_e, p_c in zip(eager, comp):
        assert torch.equal(p_e, p_c)
        for key, v in opt_e.state[p_e].items():
            if torch.is_tensor(v):
                assert torch.equal(v, opt_c.state[p_c][key]), key
    small, large = opt_c.state[comp[0]], opt_c.state[comp[1]]
    assert small["exp_avg"].dtype == (torch.float32 if bits == 8 else torch.bfloat16) and "exp_avg_absmax" not in small
    assert large["exp_avg"].dtype == (torch.uint8 if bits == 8 else torch.bfloat16)
    assert ("exp_avg_absmax" in large) == (bits == 8)
