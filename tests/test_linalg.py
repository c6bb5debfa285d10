"""Tests for mupopt.linalg (CPU, a few seconds).

References are computed here in float64 from their definitions (SVD polar factor,
eigendecomposition), never copied from the implementation's output.
"""

import math

import pytest
import torch

from mupopt.linalg import (
    POLAR_EXPRESS_COEFFICIENTS,
    RootComputationError,
    inverse_root_eigh,
    inverse_root_newton,
    newton_schulz,
)
from mupopt import linalg as _linalg

JORDAN = (3.4445, -4.775, 2.0315)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def make_matrix(shape, spread, seed=0):
    """Random float64 matrix; with spread=True its singular values are log-spaced over
    [1e-3, 1] (a badly conditioned gradient)."""
    G = torch.randn(*shape, dtype=torch.float64, generator=_gen(seed))
    if spread:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        s = torch.logspace(0, -3, S.size(-1), dtype=torch.float64)
        G = (U * s) @ Vh
    return G


def polar_factor(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def rel_dist(X, Y):
    """Per-matrix relative Frobenius distance ||X - Y|| / ||Y||."""
    X, Y = X.double(), Y.double()
    return torch.linalg.matrix_norm(X - Y) / torch.linalg.matrix_norm(Y)


def make_spd(n, cond, batch=(), scale=1.0, seed=0):
    """Random SPD float64 matrix with eigenvalues log-spaced in [scale/cond, scale]."""
    Z = torch.randn(*batch, n, n, dtype=torch.float64, generator=_gen(seed))
    Q, _ = torch.linalg.qr(Z)
    lam = scale * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return (Q * lam) @ Q.mT


def ref_inverse_root(A, p, eps=0.0):
    """float64 (A + eps I)^(-1/p) from the definition, for full-rank A + eps I.
    eps may be a float or a per-matrix tensor of shape (..., 1)."""
    lam, Q = torch.linalg.eigh(A.double())
    return (Q * (lam + eps).pow(-1.0 / p).unsqueeze(-2)) @ Q.mT


def lam_max64(A):
    return torch.linalg.eigvalsh(A.double())[..., -1:]


# ---------------------------------------------------------------------------
# newton_schulz
# ---------------------------------------------------------------------------

NS_SHAPES = [(32, 32), (17, 64), (64, 17), (3, 48, 80)]


@pytest.mark.parametrize("shape", NS_SHAPES)
@pytest.mark.parametrize("spread", [False, True], ids=["well", "spread"])
def test_ns_singular_values_in_band_and_closer_to_polar(shape, spread):
    G = make_matrix(shape, spread).float()
    X = newton_schulz(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16

    s = torch.linalg.svdvals(X.double())
    # Jordan's quintic overshoots on purpose: measured [0.65, 1.14] for well-conditioned
    # inputs.  With singular values down to 1e-3 * s_max, 5 steps lift the smallest only
    # to ~0.2-0.5 (each step multiplies a small one by at most a = 3.4445, 3.4445^5 = 484,
    # from ~1e-3 / ||G||_F): measured [0.24, 1.2].
    lo = 0.15 if spread else 0.5
    assert s.min() >= lo and s.max() <= 1.25, (s.min().item(), s.max().item())

    P = polar_factor(G)
    d_ns = rel_dist(X, P)
    d_base = rel_dist(G / torch.linalg.matrix_norm(G, keepdim=True), P)
    # NS must get much closer to U V^T than plain normalisation (measured: <= 0.31 vs
    # >= 0.77).
    assert (d_ns < 0.5 * d_base).all(), (d_ns, d_base)


def test_ns_batched_equals_per_matrix():
    G = make_matrix((3, 2, 48, 80), spread=False, seed=1).float()
    for dtype, tol in [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)]:
        X = newton_schulz(G, dtype=dtype)
        for i in range(3):
            for j in range(2):
                single = newton_schulz(G[i, j], dtype=dtype)
                # Measured bit-identical on CPU; allow round-off of the dtype in case a
                # backend picks a different batched kernel.
                torch.testing.assert_close(X[i, j], single, rtol=tol, atol=tol)


def test_ns_batched_tall_matrices_equal_per_matrix():
    G = make_matrix((4, 64, 17), spread=True, seed=2).float()
    X = newton_schulz(G, dtype=torch.float32)
    for i in range(4):
        torch.testing.assert_close(X[i], newton_schulz(G[i], dtype=torch.float32))


def test_ns_fp32_option_runs_in_band_and_matches_bf16():
    G = make_matrix((48, 80), spread=False, seed=3).float()
    X32 = newton_schulz(G, dtype=torch.float32)
    X16 = newton_schulz(G)
    assert X32.dtype == torch.float32
    s = torch.linalg.svdvals(X32.double())
    assert s.min() >= 0.5 and s.max() <= 1.25
    # Same polynomial, different round-off: the two must be close (bf16 has 8 bits).
    assert rel_dist(X16, X32) < 0.05


def test_ns_polar_express_coefficients_converge():
    # Independent check of the transcribed coefficients: composing all 8 Polar Express
    # polynomials maps singular values in [1e-3, 1] to 1 (the paper's design interval),
    # so in float32 the result must be the polar factor itself.
    assert len(POLAR_EXPRESS_COEFFICIENTS) == 8
    G = make_matrix((3, 48, 80), spread=True, seed=4).float()
    X = newton_schulz(G, steps=None, coefficients=POLAR_EXPRESS_COEFFICIENTS, dtype=torch.float32)
    s = torch.linalg.svdvals(X.double())
    assert s.min() >= 0.99 and s.max() <= 1.01, (s.min().item(), s.max().item())
    assert (rel_dist(X, polar_factor(G)) < 1e-2).all()


def test_ns_polar_express_5_steps_beats_jordan():
    # The paper's claim for Muon's budget of 5 steps in bf16: closer to U V^T than
    # Jordan's quintic (measured 0.09 vs 0.21).
    G = make_matrix((64, 96), spread=False, seed=5).float()
    P = polar_factor(G)
    pe = newton_schulz(G, steps=None, coefficients=POLAR_EXPRESS_COEFFICIENTS[:5])
    jordan = newton_schulz(G, steps=5, coefficients=JORDAN)
    assert rel_dist(pe, P) < 0.7 * rel_dist(jordan, P)


def test_ns_per_iteration_list_equals_repeated_triple():
    G = make_matrix((20, 30), spread=False, seed=6).float()
    a = newton_schulz(G, steps=None, coefficients=[JORDAN] * 5)
    b = newton_schulz(G, steps=5, coefficients=JORDAN)
    c = newton_schulz(G, steps=5, coefficients=[list(JORDAN)] * 5)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "steps, coefficients, match",
    [
        (4, [JORDAN] * 5, "steps=4 but 5"),
        (None, JORDAN, "steps=None"),
        (0, JORDAN, "steps must be an integer >= 1"),
        (None, [], "empty"),
        (None, [(1.0, 2.0)], "element 0"),
        (None, [JORDAN, (1.0, "x", 2.0)], "element 1"),
        (5, "abc", "coefficients must be"),
    ],
)
def test_ns_coefficient_validation(steps, coefficients, match):
    with pytest.raises(ValueError, match=match):
        newton_schulz(torch.randn(4, 4), steps=steps, coefficients=coefficients)


def test_ns_rejects_vectors_and_non_finite():
    with pytest.raises(ValueError, match="rows, cols"):
        newton_schulz(torch.randn(8))
    G = torch.randn(8, 8)
    G[3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        newton_schulz(G)
    G[3, 4] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        newton_schulz(G)
    # Opting out of the check: no exception, and the NaN spreads as documented.
    G[3, 4] = float("nan")
    assert torch.isnan(newton_schulz(G, check_finite=False)).any()


def test_ns_zero_matrix_and_input_not_modified():
    Z = torch.zeros(6, 9)
    out = newton_schulz(Z)
    assert torch.equal(out, torch.zeros(6, 9, dtype=torch.bfloat16))
    # A bf16 input is already in the compute dtype; it must still not be overwritten.
    G = torch.randn(16, 24, generator=_gen(7)).bfloat16()
    before = G.clone()
    newton_schulz(G)
    assert torch.equal(G, before)


def test_ns_matches_torch_muon():
    muon = pytest.importorskip("torch.optim._muon", reason="this torch has no torch.optim._muon")
    ref_fn = getattr(muon, "_zeropower_via_newtonschulz", None)
    if ref_fn is None:
        pytest.skip("torch.optim._muon has no _zeropower_via_newtonschulz in this torch")
    for seed, shape in enumerate([(32, 32), (17, 64), (64, 17), (128, 96)]):
        G = torch.randn(*shape, generator=_gen(100 + seed))
        try:
            expected = ref_fn(G.clone(), JORDAN, 5, 1e-7)
        except TypeError as exc:  # private API: signature may change between releases
            pytest.skip(f"unexpected signature of torch's _zeropower_via_newtonschulz: {exc}")
        got = newton_schulz(G, steps=5, coefficients=JORDAN, eps=1e-7)
        assert got.dtype == expected.dtype
        # Same casts and the same fused addmm calls: bit-identical on CPU (measured).
        assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()


# ---------------------------------------------------------------------------
# inverse roots
# ---------------------------------------------------------------------------

ROOT_FUNCS = [inverse_root_eigh, inverse_root_newton]
ROOT_IDS = ["eigh", "newton"]


@pytest.mark.parametrize("fn", ROOT_FUNCS, ids=ROOT_IDS)
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize(
    "batch, n, cond",
    [((4,), 16, 1e3), ((), 1, 1.0), ((2, 3), 8, 10.0)],
    ids=["4x16x16", "1x1", "2x3x8x8"],
)
def test_inverse_root_matches_float64_reference(fn, p, batch, n, cond):
    A64 = make_spd(n, cond, batch, scale=7.0, seed=n + p)
    A = A64.float()
    R = fn(A, p)
    assert R.shape == A.shape and R.dtype == torch.float32
    assert torch.equal(R, R.mT)  # documented: symmetric to the last bit
    assert (rel_dist(R, ref_inverse_root(A64, p)) < 1e-3).all()
    # p-th power of the root times A is the identity (only meaningful for integer p).
    Rp = torch.linalg.matrix_power(R.double(), p)
    eye = torch.eye(n, dtype=torch.float64)
    assert (torch.linalg.matrix_norm(Rp @ A64 - eye) < 1e-2).all()


@pytest.mark.parametrize("p", [2, 4])
def test_eigh_and_newton_agree(p):
    # Matrices of different conditioning in one batch: Newton converges at different
    # speeds per matrix and must stop each one on its own.
    A = torch.cat([make_spd(16, 1.0, (1,), seed=10), make_spd(16, 1e3, (2,), seed=11)]).float()
    E = inverse_root_eigh(A, p)
    N = inverse_root_newton(A, p)
    assert (rel_dist(N, E) < 1e-3).all()
    for i in range(A.size(0)):
        torch.testing.assert_close(inverse_root_newton(A[i], p), N[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn", ROOT_FUNCS, ids=ROOT_IDS)
def test_absolute_and_relative_damping(fn):
    p, eps = 4, 1e-2
    # lam_max = 50 per matrix, so relative and absolute damping differ by a factor 50.
    A64 = make_spd(12, 1e3, (3,), scale=50.0, seed=12)
    A = A64.float()
    lmax = lam_max64(A64)
    abs_ref = ref_inverse_root(A64, p, eps)
    rel_ref = ref_inverse_root(A64, p, eps * lmax)

    got_abs = fn(A, p, eps=eps)
    got_rel = fn(A, p, eps=eps, relative_eps=True)
    assert (rel_dist(got_abs, abs_ref) < 1e-3).all()
    assert (rel_dist(got_rel, rel_ref) < 1e-3).all()
    # The two references are far apart, so the checks above can tell them apart.
    assert (rel_dist(abs_ref, rel_ref) > 0.1).all()


def test_lambda_max_upper_bound_is_tight():
    # Used by inverse_root_newton for scaling and relative damping: documented as an
    # upper bound within 0.1%.
    for A64 in [make_spd(16, 1e2, (3,), scale=3.0, seed=13), torch.eye(64, dtype=torch.float64)]:
        bound = _linalg._lambda_max_upper_bound(A64.float()).double()[..., 0]
        lmax = lam_max64(A64)
        assert (bound >= lmax * (1 - 1e-6)).all() and (bound <= lmax * 1.001).all()


def _rank_deficient(n=16, rank=5, seed=14):
    G = torch.randn(n, rank, dtype=torch.float64, generator=_gen(seed))
    return G @ G.T  # PSD, rank 5


@pytest.mark.parametrize("p", [2, 4])
def test_eigh_rank_deficient_is_pseudo_inverse_root(p):
    A64 = _rank_deficient()
    lam, Q = torch.linalg.eigh(A64)
    rank = 5
    Qr, lr = Q[:, -rank:], lam[-rank:]  # ascending order: the nonzero ones are last
    pinv_root = (Qr * lr.pow(-1.0 / p)) @ Qr.T

    R = inverse_root_eigh(A64.float(), p)
    assert rel_dist(R, pinv_root) < 1e-3
    # Null space maps to zero (a plain inverse root would blow it up).
    null = Q[:, : 16 - rank]
    assert torch.linalg.matrix_norm(R.double() @ null) < 1e-3 * torch.linalg.matrix_norm(R.double())

    # With damping the answer is the ordinary (A + eps I)^(-1/p): the null space gets
    # eps^(-1/p), not 0.
    eps = 1e-3 * lam_max64(A64).item()
    Rd = inverse_root_eigh(A64.float(), p, eps=eps)
    assert rel_dist(Rd, ref_inverse_root(A64, p, eps)) < 1e-3


U32 = torch.finfo(torch.float32).eps
# diag(4, 4e-3, 4e-9, 0): lam_max = 4, default floor sqrt(4) * u * 4 = 9.5e-7, so 4e-9 and 0 are
# below float32's resolution. eigh of a diagonal matrix is exact, so each rule is seen exactly.
_DIAG = (4.0, 4e-3, 4e-9, 0.0)
_FLOOR = 2 * U32 * 4.0


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        # Damped below the floor: unresolved eigenvalues count as 0, then raised to the floor
        # (the rule before gave them eps^(-1/4) = 1000).
        (dict(eps=1e-12), (4 + 1e-12, 4e-3 + 1e-12, _FLOOR, _FLOOR)),
        (dict(eps=1e-12 / 4, relative_eps=True), (4 + 1e-12, 4e-3 + 1e-12, _FLOOR, _FLOOR)),
        # Damped above the floor: (A' + eps I) with A' = A less its unresolved eigenvalues.
        (dict(eps=1e-4), (4 + 1e-4, 4e-3 + 1e-4, 1e-4, 1e-4)),
        # Undamped: the pseudo-inverse root (unresolved eigenvalues get 0).
        (dict(), (4.0, 4e-3, None, None)),
        # An explicit floor of 1e-2 * lam_max = 0.04: 4e-3 is now unresolved too.
        (dict(eps=1e-12, rank_rtol=1e-2), (4 + 1e-12, 0.04, 0.04, 0.04)),
        # rank_rtol=0: no floor, the exact formula; undamped, every positive eigenvalue.
        (dict(eps=1e-12, rank_rtol=0.0), (4 + 1e-12, 4e-3 + 1e-12, 4e-9 + 1e-12, 1e-12)),
        (dict(rank_rtol=0.0), (4.0, 4e-3, 4e-9, None)),
    ],
    ids=["eps-below-floor", "relative-eps-below-floor", "eps-above-floor", "pinv", "explicit-floor",
         "no-floor", "no-floor-pinv"],
)
def test_eigh_floor_rule_on_a_diagonal_matrix(kwargs, expected):
    """Each branch of inverse_root_eigh's documented rule, on a matrix whose eigenvalues float32
    eigh returns exactly; None = root 0."""
    A = torch.diag(torch.tensor(_DIAG))
    want = torch.tensor([0.0 if d is None else d ** -0.25 for d in expected], dtype=torch.float64)
    torch.testing.assert_close(inverse_root_eigh(A, 4, **kwargs).double(), torch.diag(want), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("eps, relative", [(1e-12, False), (0.0, False), (1e-12, True)])
def test_eigh_root_is_bounded_by_the_floor(eps, relative):
    """||R||_2 <= max(eps', floor)^(-1/p) whatever float32 eigh makes of the unresolved
    eigenvalues: rank-deficient matrices (zero eigenvalues come out as noise of +-1u*lam_max)
    and full-rank ones with eigenvalues down to 1e-8 * lam_max, in one batch."""
    n, p = 48, 4
    gen = _gen(21)
    low_rank = [(lambda G: G @ G.T)(torch.randn(n, r, dtype=torch.float64, generator=gen)) for r in (3, 20)]
    A64 = torch.stack(low_rank + [make_spd(n, 1e8, seed=22), make_spd(n, 1e8, scale=1e-3, seed=23)])
    lam_max = lam_max64(A64)[..., None]
    floor = math.sqrt(n) * U32 * lam_max
    damping = eps * lam_max if relative else torch.full_like(lam_max, eps)
    bound = torch.maximum(floor, damping).pow(-1.0 / p)
    R = inverse_root_eigh(A64.float(), p, eps=eps, relative_eps=relative).double()
    norm2 = torch.linalg.matrix_norm(R, ord=2)[..., None, None]
    assert (norm2 <= bound * (1 + 1e-4)).all()
    # The bound is attained (to eigh's accuracy): each matrix has eigenvalues below the floor.
    assert (norm2 >= bound * (1 - 1e-2)).all() or eps == 0.0


def test_eigh_float64_retry_keeps_the_float32_floor(monkeypatch):
    """The floor belongs to A's precision: a float32 matrix whose float32 eigh fails gets the
    same root from the float64 retry (before: the retry used float64's floor, and 4e-9 counted as
    resolved there but not in float32)."""
    A = torch.diag(torch.tensor(_DIAG))
    plain = inverse_root_eigh(A, 4, eps=1e-12)
    real_eigh = torch.linalg.eigh

    def float32_fails(S, *args, **kwargs):
        if S.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated float32 failure")
        return real_eigh(S, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    torch.testing.assert_close(inverse_root_eigh(A, 4, eps=1e-12), plain, rtol=1e-6, atol=0.0)


def test_eigh_zero_matrix_gives_zero():
    assert torch.equal(inverse_root_eigh(torch.zeros(2, 5, 5), 2), torch.zeros(2, 5, 5))


def test_newton_singular_without_damping_raises():
    with pytest.raises(RootComputationError):
        inverse_root_newton(_rank_deficient().float(), 2)
    with pytest.raises(RootComputationError, match="zero"):
        inverse_root_newton(torch.zeros(3, 3), 2)
    # ... and works once damped.
    A64 = _rank_deficient()
    eps = 1e-2 * lam_max64(A64).item()
    R = inverse_root_newton(A64.float(), 2, eps=eps)
    assert rel_dist(R, ref_inverse_root(A64, 2, eps)) < 1e-3


@pytest.mark.parametrize("fn", ROOT_FUNCS, ids=ROOT_IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(fn, bad):
    A = make_spd(6, 10.0, (2,), seed=15).float()
    A[1, 2, 3] = bad
    with pytest.raises(RootComputationError, match=r"\(2, 6, 6\)"):
        fn(A, 2)


@pytest.mark.parametrize("fn", ROOT_FUNCS, ids=ROOT_IDS)
def test_low_precision_input_returns_its_dtype(fn):
    A64 = make_spd(8, 10.0, (2,), seed=16)
    R = fn(A64.bfloat16(), 2)
    assert R.dtype == torch.bfloat16
    # bf16 input round-off (~0.4%) dominates; the root halves relative errors for p = 2.
    assert (rel_dist(R, ref_inverse_root(A64, 2)) < 2e-2).all()
    R64 = fn(A64, 2)
    assert R64.dtype == torch.float64
    # float64 input is computed in float64: eigh is exact to round-off; Newton stops at
    # its residual tol = 1e-6 (relative error ~ residual / p).
    limit = 1e-9 if fn is inverse_root_eigh else 1e-6
    assert (rel_dist(R64, ref_inverse_root(A64, 2)) < limit).all()


def test_eigh_retries_in_float64_then_raises(monkeypatch):
    A64 = make_spd(8, 10.0, (3,), seed=17)
    real_eigh = torch.linalg.eigh
    calls = []

    def float32_fails(S, *args, **kwargs):
        calls.append(S.dtype)
        if S.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated float32 failure")
        return real_eigh(S, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    R = inverse_root_eigh(A64.float(), 2)
    assert calls == [torch.float32, torch.float64]
    assert R.dtype == torch.float32
    assert (rel_dist(R, ref_inverse_root(A64, 2)) < 1e-5).all()

    def always_nan(S, *args, **kwargs):
        lam, Q = real_eigh(S, *args, **kwargs)
        return lam * float("nan"), Q

    monkeypatch.setattr(torch.linalg, "eigh", always_nan)
    with pytest.raises(RootComputationError, match=r"\(3, 8, 8\)"):
        inverse_root_eigh(A64.float(), 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: inverse_root_eigh(torch.eye(3), 0), "p must be"),
        (lambda: inverse_root_eigh(torch.ones(3, 4), 2), r"\(\.\.\., n, n\)"),
        (lambda: inverse_root_eigh(torch.eye(3), 2, eps=-1.0), "eps"),
        (lambda: inverse_root_eigh(torch.eye(3), 2, rank_rtol=-1.0), "rank_rtol"),
        (lambda: inverse_root_eigh(torch.eye(3), 2, rank_rtol=float("nan")), "rank_rtol"),
        (lambda: inverse_root_newton(torch.eye(3), 2.5), "integer"),
        (lambda: inverse_root_newton(torch.eye(3, dtype=torch.int64), 2), "floating"),
        (lambda: inverse_root_newton(torch.eye(3), 2, tol=0.0), "tol"),
    ],
)
def test_root_argument_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
