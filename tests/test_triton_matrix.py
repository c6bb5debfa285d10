"""The matrix parts of the "triton" backend: Newton–Schulz, Muon and Shampoo against the reference.

On a machine without CUDA the kernels run in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, set below before triton is imported); tests marked ``gpu`` run the same
checks compiled on CUDA tensors with bigger matrices and are skipped elsewhere. One more test
compiles the matmul kernels for sm_90 (no GPU needed) and checks they use wgmma.

The interpreter costs roughly 20-50 ms per program, so CPU sizes stay small (16 x 24, 32 x 32,
batch 3): one or two tiles per matrix.
"""
from __future__ import annotations

import importlib.util
import math
import textwrap

import pytest
import torch

# find_spec, not importorskip: importing triton here, before defining_kernels() sets
# TRITON_INTERPRET, makes triton's own library functions (tl.zeros) compiled-mode JITFunctions
# that the interpreter refuses to call (this module then failed when run on its own).
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton_mode  # noqa: E402

with triton_mode.defining_kernels():
    import mupopt
    from mupopt import backends, linalg
    from mupopt.kernels import triton as mt
    from mupopt.kernels.triton import _common  # decorates the kernels: mode fixed here
    from mupopt.kernels.triton import muon as tmuon
    from mupopt.kernels.triton import newton_schulz as tns
    from mupopt.kernels.triton import shampoo as tshampoo
    from mupopt.linalg import POLAR_EXPRESS_COEFFICIENTS, RootComputationError
    from mupopt.mup import Multipliers, WidthInfo
    from mupopt.optim.muon import MuonHparams, muon_reference

    # Our kernels are decorated lazily, in _common's mode: decorate them now, while the
    # environment says what _common was built with.
    tns.build()
    tmuon.build()
    tshampoo.build()

INTERPRET = _common.INTERPRET
JORDAN = (3.4445, -4.775, 2.0315)
BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture(autouse=True, scope="module")
def _registered():
    """Register the backends when these tests run (idempotent): AdamW's too, for Muon's AdamW part."""
    mt.register()
    tmuon.register()
    tshampoo.register()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    triton_mode.match_environment(monkeypatch, INTERPRET)


DEVICES = triton_mode.devices(INTERPRET)


def big(device: str) -> bool:
    return device == "cuda"


def randn(shape, seed, device, dtype=F32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The symmetric product kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_syrk_computes_the_lower_tiles_and_mirrors_them(device, dtype, monkeypatch):
    n, k = (300, 200) if big(device) else (40, 24)  # 40 rows: 2 x 2 tiles of 32 in the interpreter
    Y = randn((3, n, k), 0, device, dtype)
    C = randn((3, n, n), 1, device, dtype)
    C = (C + C.mT) / 2
    ref = Y.double() @ Y.double().mT

    grids = []
    launch = _common.launch

    def spy(kernel, grid, *args, **meta):
        grids.append((kernel.__name__, grid, meta))
        launch(kernel, grid, *args, **meta)

    monkeypatch.setattr(_common, "launch", spy)
    out = tns.syrk(Y, torch.empty((3, n, n), dtype=dtype, device=device))
    out2 = tns.syrk(Y, torch.empty((3, n, n), dtype=dtype, device=device), alpha=-0.5, C=C, beta=2.0)

    # Exactly symmetric (each off-diagonal tile is stored with its transpose) ...
    assert torch.equal(out, out.mT) and torch.equal(out2, out2.mT)
    # ... from the tiles on and below the diagonal only: T(T+1)/2 programs per matrix.
    name, grid, meta = grids[0]
    T = -(-n // meta["BLOCK"])
    assert name == "_ns_syrk_kernel" and grid == (T * (T + 1) // 2, 3) and T >= 2
    # fp32 accumulation, one rounding to the storage dtype.
    tol = dict(rtol=2**-8, atol=1e-3) if dtype == BF16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(out2.double(), 2.0 * C.double() - 0.5 * ref, **tol)


# ---------------------------------------------------------------------------------------------
# Newton–Schulz
# ---------------------------------------------------------------------------------------------
def ns_float64(G: torch.Tensor, schedule, eps: float = 1e-7) -> torch.Tensor:
    """Newton–Schulz in float64, transcribed from the Newton-Schulz iteration of torch.optim.Muon's documentation (not from linalg)."""
    X = G.double()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp(min=eps)
    for a, b, c in schedule:
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


NS_CASES = {
    "cpu": [(3, 16, 24), (3, 24, 16), (32, 32), (2, 1, 16, 24)],
    "cuda": [(4, 512, 768), (3, 768, 512), (1024, 1024), (2, 3, 100, 300)],
}


@pytest.mark.parametrize("device", DEVICES)
def test_newton_schulz_matches_linalg_in_bf16(device):
    for s, shape in enumerate(NS_CASES[device]):
        G = randn(shape, 10 + s, device)
        coeffs, steps = (JORDAN, 5) if s % 2 == 0 else (POLAR_EXPRESS_COEFFICIENTS[:5], None)
        X = tns.newton_schulz_triton(G, steps, coeffs)
        R = linalg.newton_schulz(G, steps, coeffs)
        assert X.shape == G.shape and X.dtype == BF16
        # Same algorithm, fp32 accumulation, different order of the sums: an element may differ
        # by a few bf16 roundings (entries are O(1/sqrt(min side)) <= 1; 2^-6 = 4 ulps at 1).
        torch.testing.assert_close(X.float(), R.float(), rtol=0, atol=2**-6, msg=f"shape {shape}")
        rel = torch.linalg.matrix_norm((X.float() - R.float()).reshape(-1, *shape[-2:])) / torch.linalg.matrix_norm(
            R.float().reshape(-1, *shape[-2:]))
        assert rel.max() < 1e-2, (shape, rel)


@pytest.mark.parametrize("device", DEVICES)
def test_newton_schulz_fp32_matches_a_float64_transcription(device):
    for s, shape in enumerate(NS_CASES[device][:2]):
        G = randn(shape, 20 + s, device)
        X = tns.newton_schulz_triton(G, 5, JORDAN, dtype=F32)
        assert X.dtype == F32
        torch.testing.assert_close(X.double(), ns_float64(G, [JORDAN] * 5), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_newton_schulz_lands_in_the_orthogonality_band(device):
    shape = (2, 256, 384) if big(device) else (2, 16, 24)
    G = randn(shape, 30, device)
    X = tns.newton_schulz_triton(G)
    # linalg's band for well-conditioned inputs (tests/test_linalg.py): Jordan's quintic
    # overshoots on purpose, singular values end in about [0.65, 1.14].
    s = torch.linalg.svdvals(X.double())
    assert s.min() >= 0.5 and s.max() <= 1.25, (s.min().item(), s.max().item())
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    P = U @ Vh
    d_ns = torch.linalg.matrix_norm(X.double() - P) / torch.linalg.matrix_norm(P)
    d_base = torch.linalg.matrix_norm(G.double() / torch.linalg.matrix_norm(G.double(), keepdim=True) - P) / torch.linalg.matrix_norm(P)
    assert (d_ns < 0.5 * d_base).all()


@pytest.mark.parametrize("device", DEVICES)
def test_newton_schulz_zero_input_validation_and_no_aliasing(device):
    Z = torch.zeros(16, 24, device=device, dtype=BF16)
    X = tns.newton_schulz_triton(Z, steps=1)
    assert X.dtype == BF16 and torch.equal(X, torch.zeros_like(X))  # eps clamp: 0, not NaN
    assert torch.equal(Z, torch.zeros_like(Z))  # the input is not overwritten
    G = torch.ones(16, 24, device=device)
    for kwargs, match in [
        (dict(steps=None, coefficients=JORDAN), "steps=None"),
        (dict(steps=0, coefficients=JORDAN), "steps must be"),
        (dict(steps=3, coefficients=POLAR_EXPRESS_COEFFICIENTS[:5]), "per-iteration"),
        (dict(steps=5, coefficients=JORDAN, dtype=torch.float16), "dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            tns.newton_schulz_triton(G, **kwargs)
    with pytest.raises(ValueError, match="non-finite"):
        tns.newton_schulz_triton(torch.full((16, 24), float("nan"), device=device))
    with pytest.raises(ValueError, match="rows, cols"):
        tns.newton_schulz_triton(torch.ones(5, device=device))


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------
MUON_SHAPES = {
    # two same-shape matrices (one stacked NS), a conv kernel whose (24, 16) view is tall
    # (the transposed NS path), and a vector that mupopt.Muon routes to AdamW
    "cpu": [(16, 24), (16, 24), (24, 2, 2, 4), (16,)],
    "cuda": [(256, 384), (256, 384), (384, 16, 4, 4), (256,)],
}
MUON_WIDTHS = [WidthInfo("hidden", 2.0, 2.0), WidthInfo("hidden", 4.0, 2.0), WidthInfo("hidden", 2.0, 4.0),
               WidthInfo("vector", 1.0, 2.0)]


def muon_pair(device, shapes, dtype=F32, **kwargs):
    gen = torch.Generator().manual_seed(7)
    init = [torch.randn(s, generator=gen) for s in shapes]
    pairs = []
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(x.to(device=device, dtype=dtype)) for x in init]
        for p, w in zip(params, MUON_WIDTHS):
            p.mupopt_width = w
        pairs.append((params, mupopt.Muon(params, backend=backend, **kwargs)))
    return pairs


def run_pair(pairs, shapes, steps, device, dtype=F32):
    for t in range(steps):
        gen = torch.Generator().manual_seed(100 + t)
        grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
        for params, opt in pairs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()


@pytest.mark.parametrize("device", DEVICES)
def test_muon_triton_matches_reference_over_10_steps(device):
    """bf16 NS, nesterov, muP multipliers (lr 1/sqrt(m_in) under match_rms_adamw, coupled decay)."""
    shapes, steps, lr = MUON_SHAPES[device], 10, 0.02
    pairs = muon_pair(device, shapes, lr=lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", wd_mode="coupled")
    (ref_p, ref_opt), (tri_p, tri_opt) = pairs
    mults = tri_opt.group_multipliers(tri_opt.param_groups[0])
    assert len({m.lr for m in mults[:3]}) > 1 and len({m.wd for m in mults[:3]}) > 1  # really per tensor
    run_pair(pairs, shapes, steps, device)
    for i, (a, b) in enumerate(zip(ref_p, tri_p)):
        # Momentum buffers see only gradients: equal to fp32 round-off.
        key = "momentum_buffer" if i < 3 else "exp_avg"
        torch.testing.assert_close(tri_opt.state[b][key], ref_opt.state[a][key], rtol=1e-6, atol=1e-7)
        if i < 3:
            rows, cols = a.shape[0], a.numel() // a.shape[0]
            factor = mults[i].lr * 0.2 * math.sqrt(max(rows, cols))
            # Per step an element of O may differ by a bf16 rounding or two (2^-7 relative);
            # gradients are fixed, so differences add up linearly over the steps.
            atol = steps * lr * factor * 2**-6
            torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=f"param {i}")
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_muon_triton_fp32_ns_without_nesterov(device):
    shapes, lr = MUON_SHAPES[device][:3], 0.02
    pairs = muon_pair(device, shapes, lr=lr, nesterov=False, ns_dtype=F32, ns_steps=None,
                      ns_coefficients=POLAR_EXPRESS_COEFFICIENTS[:5])
    run_pair(pairs, shapes, 4, device)
    (ref_p, ref_opt), (tri_p, tri_opt) = pairs
    for a, b in zip(ref_p, tri_p):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tri_opt.state[b]["momentum_buffer"], ref_opt.state[a]["momentum_buffer"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_muon_triton_bf16_storage(device):
    """bf16 params, gradients and momentum buffers: rounded to nearest even like the reference."""
    shape = (256, 384) if big(device) else (16, 24)
    hp = MuonHparams(0.02, 0.1, 0.95, True, JORDAN, 5, 1e-7, None, BF16)
    runs = []
    for fn in (muon_reference, tmuon.muon_triton):
        p = [randn(shape, 40, device, BF16)]
        st = [{"momentum_buffer": torch.zeros_like(p[0])}]
        for t in range(2):
            fn(p, [randn(shape, 41 + t, device, BF16)], st, [Multipliers(0.5, 2.0, 1.0)], hp)
        runs.append((p[0], st[0]["momentum_buffer"]))
    (pr, br), (pt, bt) = runs
    assert pt.dtype == BF16 and bt.dtype == BF16
    torch.testing.assert_close(bt, br, rtol=2**-8, atol=1e-6)  # at most one bf16 ulp
    torch.testing.assert_close(pt.float(), pr.float(), rtol=2**-7, atol=2 * 0.02 * 2**-6)


def test_muon_registration_and_refusals(monkeypatch):
    assert "triton" in backends.names("muon") and backends.names("muon")[0] == "triton"
    tmuon.register()  # idempotent
    b = backends._REGISTRY["muon"]["triton"]
    assert b.priority == 10
    assert "ndim >= 2" in b.unsupported_reason([torch.zeros(3)])
    assert "dtype" in b.unsupported_reason([torch.zeros(3, 3, dtype=torch.float64)])
    if INTERPRET:
        assert b.unsupported_reason([torch.zeros(4, 4)]) is None
        monkeypatch.delenv("TRITON_INTERPRET")
        p = torch.nn.Parameter(torch.zeros(4, 4))
        p.grad = torch.ones(4, 4)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mupopt.Muon([p], backend="triton").step()


# ---------------------------------------------------------------------------------------------
# Shampoo
# ---------------------------------------------------------------------------------------------
SHAMPOO_SHAPES = {
    # (40, 9) in row blocks 16, 16, 8 and (12, 20) in column blocks 16, 4 (max_preconditioner_dim
    # 16); a conv kernel (6, 12); a vector (the diagonal / Adam direction)
    "cpu": ([(40, 9), (12, 20), (6, 3, 2, 2), (7,)], 16),
    "cuda": ([(300, 90), (96, 200), (64, 16, 3, 3), (77,)], 128),
}
SHAMPOO_WIDTHS = [WidthInfo("hidden", 2.0, 2.0), WidthInfo("output", 4.0, 1.0), WidthInfo("input", 1.0, 2.0),
                  WidthInfo("vector", 1.0, 2.0)]


def shampoo_pair(device, shapes, **kwargs):
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(s, generator=gen) for s in shapes]
    pairs = []
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(x.to(device)) for x in init]
        for p, w in zip(params, SHAMPOO_WIDTHS):
            p.mupopt_width = w
        pairs.append((params, mupopt.Shampoo(params, backend=backend, **kwargs)))
    return pairs


def shampoo_tol(device: str) -> dict:
    """float32 tolerance. CPU (measured): every value within 5e-7 of the reference. CUDA (not yet
    measured, no GPU when written): 128-wide blocks sum 90..300 products in a different order
    than cuBLAS, and the smallest eigenvalues of L + eps I pass that round-off on to the roots
    amplified by the condition number, hence 10x looser."""
    return dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=1e-3, atol=1e-4)


def assert_shampoo_equal(pairs, rtol, atol):
    (ref_p, ref_opt), (tri_p, tri_opt) = pairs
    for i, (a, b) in enumerate(zip(ref_p, tri_p)):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        sa, sb = ref_opt.state[a], tri_opt.state[b]
        assert set(sa) == set(sb)
        for key, va in sa.items():
            vb = sb[key]
            for x, y in zip(va, vb) if isinstance(va, list) else [(va, vb)]:
                torch.testing.assert_close(y, x, rtol=rtol, atol=atol, msg=lambda m: f"param {i} {key}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "variant",
    [
        dict(grafting="adam", betas=(0.9, 0.99), weight_decay=0.1),
        dict(grafting=None, betas=(0.0, 1.0), relative_epsilon=True),
    ],
    ids=["adam-graft-ema", "no-graft-sum"],
)
def test_shampoo_triton_matches_reference_newton(device, variant):
    """Six steps, roots refreshed at t = 2, 4, 6 (Adam direction at t = 1), blocked matrices."""
    shapes, max_dim = SHAMPOO_SHAPES[device]
    eps = 1e-1 if variant.get("relative_epsilon") else 1e-2
    pairs = shampoo_pair(device, shapes, lr=1e-2, epsilon=eps, max_preconditioner_dim=max_dim, root_method="newton",
                         start_preconditioning_step=2, precondition_frequency=2, **variant)
    run_pair(pairs, shapes, 6, device)
    assert_shampoo_equal(pairs, **shampoo_tol(device))


@pytest.mark.parametrize("device", DEVICES)
def test_shampoo_triton_eigh_roots(device):
    shapes, max_dim = SHAMPOO_SHAPES[device]
    pairs = shampoo_pair(device, shapes[:2], lr=1e-2, epsilon=1e-2, max_preconditioner_dim=max_dim, root_method="eigh")
    run_pair(pairs, shapes[:2], 3, device)
    assert_shampoo_equal(pairs, **shampoo_tol(device))


@pytest.mark.parametrize("layout", ["one-group", "later-group"])
@pytest.mark.parametrize("device", DEVICES)
def test_shampoo_triton_failed_root_leaves_everything_untouched(device, layout):
    """A singular statistic without damping: Newton does not converge; the step raises before
    writing any parameter or state: of the well-conditioned tensor stepped in the same call
    ("one-group"), and of a first group (eigh, damped: it would step fine) when the failure is
    in the second ("later-group": every group is prepared before any is written). It is the
    first step, so no state is left behind either (issue 22 item 7)."""
    gen = torch.Generator().manual_seed(9)
    singular, fine = (torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in [(4, 30), (12, 20)])
    params = [singular, fine] if layout == "one-group" else [fine, singular]
    newton = {"epsilon": 0.0, "root_method": "newton"}
    if layout == "one-group":
        opt = mupopt.Shampoo(params, backend="triton", **newton)
    else:
        opt = mupopt.Shampoo([{"params": [fine], "epsilon": 1e-3}, {"params": [singular], **newton}], backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RootComputationError):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


def test_shampoo_registration():
    assert backends.names("shampoo")[0] == "triton"
    tshampoo.register()  # idempotent
    assert backends._REGISTRY["shampoo"]["triton"].priority == 10


# ---------------------------------------------------------------------------------------------
# The matmul kernels compile for the GPU (sm_90, no GPU needed) and use the tensor cores
# ---------------------------------------------------------------------------------------------
_COMPILE_LAUNCHES = textwrap.dedent(
    r"""
    from mupopt.kernels.triton import newton_schulz as ns
    # min side 600: the 128 x 128 x 64 bf16 tiles; one iteration is every kernel once
    ns.newton_schulz_triton(torch.zeros(2, 600, 700), steps=1, check_finite=False)
    """
)


def test_newton_schulz_kernels_compile_for_sm90_with_wgmma():
    results = triton_mode.compile_for_sm90(_COMPILE_LAUNCHES)
    assert [r["kernel"] for r in results] == ["_ns_normalize_kernel", "_ns_syrk_kernel", "_ns_syrk_kernel", "_ns_update_kernel"]
    for r in results[1:]:
        assert r["wgmma"] > 0, r  # Hopper tensor-core MMA for the three matmul kernels


# ---------------------------------------------------------------------------------------------
# Matrices of 2^31 or more elements: 64-bit element offsets (issue 13 item 12)
# ---------------------------------------------------------------------------------------------
_OFFSETS_LAUNCHES = textwrap.dedent(
    r"""
    from mupopt.kernels.triton import newton_schulz as ns
    from mupopt.kernels.triton import shampoo as sh
    ns.build(); sh.build()
    ns.newton_schulz_triton(torch.zeros(2, 600, 700), steps=1, check_finite=False)
    _common.LAUNCH_HOOK = None
    stats = {"G_BF16": True, "ROW": 6, "BLOCK": 64, "BLOCK_K": 32}
    compile_sm90(sh._shampoo_stats_kernel, {"table_ptr": "*i64", "out_ptr": "*fp32", "tiles_ptr": "*i32", "N": "i32",
                                       "decay": "fp32", "gain": "fp32", **{k: "constexpr" for k in stats}}, stats, 4)
    mm = {"B_BF16": True, "SUMSQ": True, "ROW": 9, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}
    compile_sm90(sh._shampoo_matmul_kernel, {"table_ptr": "*i64", "partial_ptr": "*fp32", "max_tiles": "i32",
                                        **{k: "constexpr" for k in mm}}, mm, 4)
    """
)


def test_matrix_kernels_use_64_bit_element_offsets():
    """Compiled for sm_90 with every size and stride an i32 argument (Triton's type for values
    below 2^31), each tensor of pointers is formed from int64 offsets: a row or column index times
    a stride never wraps at 2^31, so a 262144 x 8192 matrix is addressed correctly. (Before: i32
    offsets in the four Newton-Schulz kernels and in Shampoo's statistics tiles.)"""
    results = triton_mode.compile_for_sm90(_OFFSETS_LAUNCHES)
    assert [r["kernel"] for r in results] == ["_ns_normalize_kernel", "_ns_syrk_kernel", "_ns_syrk_kernel",
                                              "_ns_update_kernel", "_shampoo_stats_kernel", "_shampoo_matmul_kernel"]
    for r in results:
        assert r["offset_types"] == ["i64"], r


_FAR_SCRIPT = textwrap.dedent(
    r"""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, sys.argv[1])
    import torch
    from mupopt.kernels.triton import _common, newton_schulz as ns
    ns.build()
    assert _common.INTERPRET
    S, R = 2**28, 16  # row stride (elements) and rows of every view: rows 8..15 start past 2^31
    try:
        storage = torch.empty(S * (R - 1) + 1024, dtype=torch.bfloat16)  # 8 GiB of address space
    except (RuntimeError, MemoryError) as e:
        print(json.dumps({"skip": f"cannot reserve 8 GiB of address space: {e}"}))
        sys.exit(0)

    def far(cols, col0):
        # (1, R, cols) at column col0 of storage rows S elements apart: only these rows' pages
        # are ever touched
        return storage.as_strided((1, R, cols), (0, S, 1), col0)

    gen = torch.Generator().manual_seed(0)
    out = {}
    G = far(32, 0)
    G.copy_(torch.randn(1, R, 32, generator=gen).to(torch.bfloat16))
    got = ns.newton_schulz_triton(G, steps=5)  # bf16 in bf16: G itself is the normalize kernel's input
    out["newton_schulz"] = torch.equal(got, ns.newton_schulz_triton(G.contiguous(), steps=5))
    C = far(R, 64)
    C.copy_(torch.randn(1, R, R, generator=gen).to(torch.bfloat16))
    O = far(R, 128)
    ns.syrk(G, O, alpha=0.5, C=C, beta=2.0)
    O2 = torch.empty(1, R, R, dtype=torch.bfloat16)
    ns.syrk(G.contiguous(), O2, alpha=0.5, C=C.contiguous(), beta=2.0)
    out["syrk"] = torch.equal(O, O2)
    cfg = ns._tiles(R, 32, torch.bfloat16)

    def update(b, x, o):
        ns._launch(ns._ns_update_kernel, (-(-R // cfg["bm"]) * -(-32 // cfg["bn"]), 1), b, x, o, R, 32,
                   *b.stride(), *x.stride(), *o.stride(), 1.5, BF16=True, BLOCK_M=cfg["bm"],
                   BLOCK_N=cfg["bn"], BLOCK_K=cfg["bk"], GROUP_M=8, num_warps=4)

    OUT = far(32, 256)
    update(C, G, OUT)
    OUT2 = torch.empty(1, R, 32, dtype=torch.bfloat16)
    update(C.contiguous(), G.contiguous(), OUT2)
    out["update"] = torch.equal(OUT, OUT2)
    print(json.dumps(out))
    """
)


def test_matrix_kernels_address_views_past_2_31_elements():
    """The kernels run in the interpreter (which wraps int32 arithmetic as the GPU does) on views
    whose rows are 2^28 elements apart in one 8 GiB reservation that is never filled (only the
    touched pages are allocated): rows 8..15 start past element 2^31. Newton-Schulz reading such
    an input, syrk reading Y and C and writing its output there, and the update kernel reading B
    and X and writing there give the same bits as on contiguous copies. With int32 offsets the
    process died with SIGSEGV (a wrapped offset points 4 GiB before the storage): a subprocess."""
    if not INTERPRET:
        pytest.skip("CPU tensors in the interpreter (the GPU equivalent would need 8 GiB of device memory)")
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _FAR_SCRIPT, root], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit status {proc.returncode} (-11: SIGSEGV):\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result == {"newton_schulz": True, "syrk": True, "update": True}
