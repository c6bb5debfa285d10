"""Pure matrix functions used by the optimizers (no state, no classes with state).

* :func:`newton_schulz` -- approximate polar factor ``U V^T`` (Muon, Polar Express).
* :func:`inverse_root_eigh` -- ``(A + eps I)^(-1/p)`` through an eigendecomposition.
* :func:`inverse_root_newton` -- the same root through a matmul-only coupled Newton
  iteration (Shampoo).

All functions are batched over leading dimensions: an input of shape
``(..., rows, cols)`` is a stack of independent matrices, processed in one call.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "POLAR_EXPRESS_COEFFICIENTS",
    "RootComputationError",
    "inverse_root_eigh",
    "inverse_root_newton",
    "newton_schulz",
]


class RootComputationError(RuntimeError):
    """An inverse matrix root could not be computed (non-finite input, failed
    eigendecomposition, or an iteration that did not converge to a finite result)."""


# ---------------------------------------------------------------------------
# Newton-Schulz orthogonalization
# ---------------------------------------------------------------------------

# Keller Jordan's quintic (https://kellerjordan.github.io/posts/muon/), the default of
# torch.optim.Muon: a = 3.4445 maximises the slope at 0 so that small singular values
# grow fast in 5 steps; the price is that the iteration does not converge to 1 but
# oscillates in roughly [0.7, 1.2].
_JORDAN_COEFFICIENTS = (3.4445, -4.775, 2.0315)

# Polar Express, degree 5 (Amsel, Persson, Musco, Gower 2025, "The Polar Express: Optimal
# Matrix Sign Methods and Their Application to the Muon Algorithm", arXiv:2505.16932,
# Algorithm 1; also github.com/NoahAmsel/PolarExpress). Each triple (a, b, c) is the
# minimax-optimal odd quintic p(x) = a x + b x^3 + c x^5 for the interval of singular
# values left by the previous steps, starting from [1e-3, 1] (with the paper's cushion of
# 0.02 on the lower end). The last triple is the classical (15, -10, 3)/8 polynomial: the
# paper notes that later optimal triples equal it numerically.
_POLAR_EXPRESS_UNSCALED = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# The paper's safety factor 1.01, applied to every triple except the last:
# (a/s, b/s^3, c/s^5) is p(x/s), the same polynomial stretched so that it stays a good
# approximation for singular values up to s = 1.01 instead of 1.  Why: in bfloat16 the
# Frobenius normalisation and each step carry ~2^-8 = 0.4% relative round-off, which can
# push singular values just above the interval a triple was optimised for, where
# p(x) -> much larger than 1 for the aggressive early triples.
_POLAR_EXPRESS_SAFETY = 1.01

#: Per-iteration Polar Express coefficients, as run by the paper's Algorithm 1 (safety
#: factor 1.01 applied to all but the last triple). 8 triples; use a prefix for fewer
#: steps, e.g. ``newton_schulz(G, steps=None, coefficients=POLAR_EXPRESS_COEFFICIENTS[:5])``
#: (the paper's Muon experiments use 5 steps). Note: the paper additionally divides the
#: input by ``1.01 * ||G||_F``; :func:`newton_schulz` keeps torch.optim.Muon's
#: ``max(||G||_F, eps)`` normalisation, so it is not bit-identical to Algorithm 1.
POLAR_EXPRESS_COEFFICIENTS: list[tuple[float, float, float]] = [
    (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
    for (a, b, c) in _POLAR_EXPRESS_UNSCALED[:-1]
] + [_POLAR_EXPRESS_UNSCALED[-1]]


def _is_number(x: object) -> bool:
    # bool is a Real in Python; a coefficient given as True is certainly a mistake.
    return isinstance(x, Real) and not isinstance(x, bool)


def _coefficient_schedule(
    coefficients: Sequence[float] | Sequence[Sequence[float]], steps: int | None
) -> list[tuple[float, float, float]]:
    """Turn ``coefficients`` + ``steps`` into one (a, b, c) triple per iteration."""
    if not isinstance(coefficients, Sequence) or isinstance(coefficients, str):
        raise ValueError(
            "newton_schulz: coefficients must be one (a, b, c) triple or a sequence of "
            f"triples, got {type(coefficients).__name__}"
        )
    if len(coefficients) == 3 and all(_is_number(x) for x in coefficients):
        # One triple, reused at every iteration (Jordan's quintic).
        if steps is None:
            raise ValueError(
                "newton_schulz: steps=None is only allowed with a per-iteration list of "
                "coefficient triples; with a single (a, b, c) triple give steps explicitly"
            )
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"newton_schulz: steps must be an integer >= 1, got {steps!r}")
        a, b, c = (float(x) for x in coefficients)
        return [(a, b, c)] * steps

    # A per-iteration list (Polar Express).
    schedule = []
    for i, triple in enumerate(coefficients):
        if (
            not isinstance(triple, Sequence)
            or len(triple) != 3
            or not all(_is_number(x) for x in triple)
        ):
            raise ValueError(
                "newton_schulz: coefficients must be one (a, b, c) triple of numbers or a "
                f"sequence of such triples; element {i} is {triple!r}"
            )
        schedule.append(tuple(float(x) for x in triple))
    if not schedule:
        raise ValueError("newton_schulz: the per-iteration coefficient list is empty")
    if steps is not None and steps != len(schedule):
        raise ValueError(
            f"newton_schulz: steps={steps!r} but {len(schedule)} per-iteration coefficient "
            "triples were given; pass steps=None or steps equal to the list length "
            "(slice the list for fewer steps)"
        )
    return schedule


def newton_schulz(
    G: Tensor,
    steps: int | None = 5,
    coefficients: Sequence[float] | Sequence[Sequence[float]] = _JORDAN_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Approximate the polar factor ``U V^T`` of ``G = U S V^T`` with matmuls only.

    Formula (per matrix, ``X`` of shape (rows, cols) with rows <= cols)::

        X_0     = G / max(||G||_F, eps)              # all singular values in [0, 1]
        A_k     = X_k X_k^T
        X_{k+1} = a_k X_k + (b_k A_k + c_k A_k A_k) X_k
                = a_k X_k + b_k X_k X_k^T X_k + c_k (X_k X_k^T)^2 X_k

    i.e. each step applies the odd quintic ``p_k(s) = a_k s + b_k s^3 + c_k s^5`` to every
    singular value and keeps the singular vectors, so after the last step the result is
    ``U p(S) V^T`` with ``p(S) ~ I``.  If rows > cols the iteration runs on ``G^T`` (the
    Gram matrix ``X X^T`` is then cols x cols, the smaller side) and the result is
    transposed back.

    Sources: the iteration is Newton-Schulz for the matrix sign / polar factor (Higham,
    "Functions of Matrices", 2008, ch. 8) with Keller Jordan's quintic coefficients
    (3.4445, -4.775, 2.0315) from Muon (https://kellerjordan.github.io/posts/muon/); the
    algorithm (cast, transpose rule, Frobenius normalisation, eps, addmm fusion) follows
    ``torch.optim._muon._zeropower_via_newtonschulz`` (PyTorch >= 2.9) and gives
    bit-identical results for 2-D inputs.  Per-iteration coefficients are the Polar Express
    method (Amsel et al. 2025, arXiv:2505.16932), see :data:`POLAR_EXPRESS_COEFFICIENTS`.

    Why: Muon's update is the steepest-descent direction under the spectral norm, which is
    ``U V^T`` of the momentum; an SVD is too slow on accelerators, a handful of matmuls is
    not.  Jordan's quintic deliberately overshoots (singular values end roughly in
    [0.7, 1.2], not at 1): it buys fast growth of small singular values in 5 steps.

    Args:
        G: tensor of shape (..., rows, cols); leading dims are a batch of independent
            matrices processed in one call.
        steps: number of iterations.  With a single triple it is required (>= 1); with a
            per-iteration list it must be None or equal to ``len(coefficients)``.
        coefficients: one (a, b, c) triple used at every step, or a sequence of triples,
            one per step.
        eps: floor on the Frobenius norm, so that a zero matrix maps to zero instead of NaN.
        dtype: computation **and return** dtype (default bfloat16, as Muon: the iteration
            is insensitive to round-off and bf16 matmuls are fast).  Use torch.float32 for
            a more accurate result.  The caller casts back to the parameter dtype.
        check_finite: raise ValueError if ``G`` has a NaN/inf (costs one device sync).
            Without the check a single NaN silently turns the whole output into NaN.

    Returns:
        Tensor of the shape of ``G`` and dtype ``dtype``.
    """
    if G.ndim < 2:
        raise ValueError(
            f"newton_schulz: expected a tensor of shape (..., rows, cols), got shape {tuple(G.shape)}"
        )
    if not dtype.is_floating_point:
        raise ValueError(f"newton_schulz: dtype must be a floating point dtype, got {dtype}")
    schedule = _coefficient_schedule(coefficients, steps)
    if check_finite and not bool(torch.isfinite(G).all()):
        raise ValueError("newton_schulz: input contains non-finite values")

    # Out of place on purpose: G.to(dtype) returns G itself when it already has that
    # dtype, and an in-place division would then overwrite the caller's tensor.
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    # ||X||_F >= ||X||_2, so this puts every singular value in [0, 1], the interval the
    # polynomials are designed for.
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = X / norm.clamp(min=eps)

    if X.ndim == 2:
        # torch.addmm(C, A, B, beta, alpha) = beta*C + alpha*A@B in one fused call; using
        # the same calls as torch.optim.Muon makes the 2-D result bit-identical to it.
        for a, b, c in schedule:
            A = X @ X.mT
            B = torch.addmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
            X = torch.addmm(X, B, X, beta=a)  # a*X + B@X
    else:
        # Same computation for a stack: flatten the batch dims to one, use the batched
        # fused calls (baddbmm needs exactly 3 dims).
        batch_shape = X.shape[:-2]
        # The batch size is explicit: reshape cannot infer -1 for a stack with no elements.
        X = X.reshape(math.prod(batch_shape), X.size(-2), X.size(-1))
        for a, b, c in schedule:
            A = X @ X.mT
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
            X = torch.baddbmm(X, B, X, beta=a)
        X = X.reshape(*batch_shape, X.size(-2), X.size(-1))

    if transposed:
        X = X.mT
    return X


# ---------------------------------------------------------------------------
# Inverse p-th roots of symmetric PSD matrices
# ---------------------------------------------------------------------------


def _check_square_batch(A: Tensor, name: str) -> None:
    if A.ndim < 2 or A.size(-1) != A.size(-2):
        raise ValueError(
            f"{name}: expected a tensor of shape (..., n, n), got shape {tuple(A.shape)}"
        )
    if not A.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating point tensor, got {A.dtype}")


def _check_eps(eps: float, name: str) -> None:
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps!r}")


def _symmetrize(A: Tensor) -> Tensor:
    # Accumulated statistics such as sum G G^T are symmetric only up to round-off. Both
    # methods work on (A + A^T)/2 so that they see the same matrix (eigh would otherwise
    # read only the lower triangle, Newton the full matrix).
    return 0.5 * (A + A.mT)


def _identity_like(A: Tensor) -> Tensor:
    n = A.size(-1)
    return torch.eye(n, dtype=A.dtype, device=A.device).expand(A.shape)


def inverse_root_eigh(
    A: Tensor,
    p: float,
    *,
    eps: float = 0.0,
    relative_eps: bool = False,
    rank_rtol: float | None = None,
) -> Tensor:
    """Inverse p-th root ``(A + eps' I)^(-1/p)`` of a symmetric PSD matrix via ``eigh``.

    Formula: with ``A = Q diag(lam) Q^T`` (``torch.linalg.eigh``)::

        eps'   = eps                      if not relative_eps
               = eps * lam_max(A)         if relative_eps   (per matrix)
        floor  = rank_rtol * lam_max(A)   (default rank_rtol = sqrt(n) * machine eps of A's dtype)
        lam'_i = lam_i   if lam_i > floor   else 0
        d_i    = max(lam'_i + eps', floor)   if eps' > 0
               = lam'_i                      if eps' = 0
        r_i    = d_i^(-1/p)   if d_i > 0   else 0             (eps' = 0: pseudo-inverse root)
        result = Q diag(r) Q^T

    Hence ``||result||_2 <= max(eps', floor)^(-1/p)``; where ``eps' >= floor`` the result is
    ``(A' + eps' I)^(-1/p)``, A' being A with the eigenvalues at or below the floor set to 0.

    Source: the preconditioner ``L^(-1/4) G R^(-1/4)`` of Shampoo (Gupta, Koren, Singer
    2018, "Shampoo: Preconditioned Stochastic Tensor Optimization"; Anil et al. 2020,
    "Scalable Second Order Optimization for Deep Learning") needs inverse p-th roots of
    PSD statistics; the eigendecomposition is the direct way to get them.

    Why these choices:

    * Damping relative to ``lam_max`` (``relative_eps=True``) is scale-free: the same
      ``eps`` means the same relative regularisation whatever the width or gradient scale.
    * The floor: below it an eigenvalue is not resolved.  A float32 matrix knows its
      eigenvalues only to about u * lam_max (u = 1.2e-7): float64 ``eigh`` of float32 Gram
      matrices ``G G^T`` of rank r < n puts their zero eigenvalues within 0.2-0.8 u*lam_max,
      and float32 ``eigh`` spreads them over up to 0.07-0.22 * sqrt(n) * u * lam_max
      (measured, n = 16..2048: 0.8u at n = 16, 1.2u at 30, 4u at 1024).  Such an eigenvalue
      may be a zero (rank-deficient statistics: first steps, batch < width) or a real small
      one (an ill-conditioned full-rank gradient).  It is counted as 0, right for the first
      kind; the damped value is then raised to the floor, for the second: the exact
      ``(lam + eps')^(-1/p)`` of a real eigenvalue in [0, floor] may be as small as
      ``(floor + eps')^(-1/p)``, and the floor keeps the root within 2^(1/p) of that, where
      ``eps'^(-1/p)`` alone has no bound.  Without the raise (this function before), with
      Shampoo's ``epsilon=1e-12``, every unresolved direction got 1e-12^(-1/4) = 1000: a
      32x32 Gaussian gradient with smallest singular value 0.005 (an eigenvalue
      1.9u * lam_max of ``G G^T``) gave a first ungrafted update 884x the exact one in
      norm, a grafted one 128% off in direction.
    * Measured, relative Frobenius distance of Shampoo's update from the exact float64
      formula (epsilon=1e-12, Adam grafting; ungrafted the same to 2 digits), now vs before:
      first step, full-rank gradients 32x32..1024x1024 (Gaussian, or singular values
      log-spaced over 2-3 decades): 1.3e-4..9.4e-2 vs 1.0-1.4 (ungrafted 9e2-1.4e4), and
      0.13 at 2048x2048 over 3 decades; first step, rank-r gradients (r < n, float32 of an
      exactly rank-r matrix, against the exact formula of the latter): 1.1e-5..9e-5 vs
      1e-3..1.4; statistics summed over 12-16 steps of batch-b gradients (b < n, input
      covariances over 2-4 decades, n = 32..256), worst step: 1.1e-4..8.2e-3 vs 0.56-1.4.
      What remains comes from real eigenvalues below the floor.
    * Why ``sqrt(n) * u``: the floor must stay above the noise, or a noise eigenvalue counts
      as real and a damped null direction gets ``eps' + noise``: with a floor of u the
      30x30 statistic of tests/test_shampoo.py (one noise eigenvalue at 1.2u) moved its root
      by 1e-4 relative at eps = 1e-2.  Above the noise a higher floor only costs accuracy
      on real small eigenvalues: a floor of ``n * u`` (torch.linalg.pinv's default rtol, and
      this function's threshold before) gives 0.40 at n = 1024 and 0.45 at 2048 on the
      full-rank cases.
    * Not done: float64 ``eigh`` of the float32 matrix leaves only A's rounding (<= 0.8u),
      so a floor of u would do there, 10x closer on the full-rank cases (<= 3e-3 at
      n <= 1024), at the cost of a float64 decomposition for every matrix with eigenvalues
      near the floor, i.e. every rank-deficient statistic, where it gains nothing.  A
      float64 input is computed in float64 with its own floor; pass ``rank_rtol`` when its
      data is less precise than its dtype.
    * Roots refreshed less often than every step (``precondition_frequency > 1``) meet
      gradients with components in the null space of a rank-deficient statistic: the exact
      formula gives them eps'^(-1/p) (1000 per side at 1e-12), this function
      max(eps', floor)^(-1/p), so with a tiny eps' the update departs from the exact formula
      by design (measured, grafted, worst of the first 20-30 steps, n = 32..256, refresh
      every 5-10 steps: 0.36-0.67; before 0.1-1.4).  Where that matters, damp by at least
      the floor or start preconditioning once the statistics have full rank.
    * Elsewhere: DistributedShampoo (Shi et al. 2023, github.com/facebookresearch/
      optimizers, ``PerturbationConfig``) decomposes ``A + eps I`` and, if the smallest
      eigenvalue is below eps, shifts all so that it equals eps, so at eps = 1e-12 that
      direction gets 1000 (measured on the first-step cases above: up to 0.18 full-rank,
      0.034 rank-deficient); its ``PseudoInverseConfig`` is the eps' = 0 case here.  Anil et
      al.'s code damps by 1e-6 * lam_max and computes roots in float64 where it can.
      :func:`inverse_root_newton` has no cut: it converges on full-rank matrices below
      float32 resolution (<= 1.4e-3 on the first-step cases above) and raises
      :class:`RootComputationError` on singular ones.
    * ``eps' = 0``: the unresolved eigenvalues stay 0 and get root 0, the Moore-Penrose
      pseudo-inverse root.  ``rank_rtol=0.0`` disables the floor: ``max(lam, 0) + eps'``
      exactly, or for ``eps' = 0`` the pseudo-inverse root of every positive eigenvalue.
    * Accuracy limit (measured, float32, n=128): eigenvalues below ~1e-5 * lam_max carry
      percent-level errors in float32 ``eigh`` anyway; undamped inputs with a condition
      number above ~1e5 need damping, or a float64 input.

    Precision: the decomposition runs in float32 (inputs of lower precision are upcast,
    float64 inputs stay float64).  If it raises ``torch.linalg.LinAlgError`` or yields
    non-finite values, it is retried in float64, with the same floor (A's precision has not
    changed); if that fails too, :class:`RootComputationError` is raised.  The retry covers
    the whole batch.

    Args:
        A: symmetric PSD tensor of shape (..., n, n); only its symmetric part is used.
        p: root order, > 0 (Shampoo uses 2 or 4; 2 * tensor order in general).
        eps: damping added to the diagonal (>= 0).
        relative_eps: if True the damping is ``eps * lam_max(A)`` per matrix.
        rank_rtol: the floor relative to ``lam_max(A)`` (see above), >= 0; None means
            ``sqrt(n) * torch.finfo(A.dtype).eps``.

    Returns:
        Tensor of the shape and dtype of ``A``.

    Raises:
        RootComputationError: non-finite input, or ``eigh`` failed in float32 and float64.
    """
    name = "inverse_root_eigh"
    _check_square_batch(A, name)
    if not (p > 0 and math.isfinite(p)):
        raise ValueError(f"{name}: p must be a finite number > 0, got {p!r}")
    _check_eps(eps, name)
    if rank_rtol is not None and not (rank_rtol >= 0.0 and math.isfinite(rank_rtol)):
        raise ValueError(f"{name}: rank_rtol must be a finite number >= 0, got {rank_rtol!r}")
    if not bool(torch.isfinite(A).all()):
        raise RootComputationError(
            f"{name}: input of shape {tuple(A.shape)} contains non-finite values"
        )

    # The floor belongs to A's precision, not to the computation's: a float32 matrix retried
    # in float64 resolves no more of its spectrum than before.
    rtol = math.sqrt(A.size(-1)) * torch.finfo(A.dtype).eps if rank_rtol is None else rank_rtol
    # float64 input: no point in a float32 attempt that could only lose accuracy.
    attempts = [torch.float64] if A.dtype == torch.float64 else [torch.float32, torch.float64]
    for compute_dtype in attempts:
        S = _symmetrize(A.to(compute_dtype))
        try:
            lam, Q = torch.linalg.eigh(S)
        except torch.linalg.LinAlgError:
            continue  # eigh did not converge: retry in higher precision
        if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(Q).all())):
            continue

        # eigh returns eigenvalues in ascending order, so the last one is lam_max.
        lam_max = lam[..., -1:].clamp(min=0.0)
        floor = rtol * lam_max
        # At or below the floor (negative ones too: a PSD input can only have them from
        # round-off) an eigenvalue is not resolved and counts as zero.
        lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
        damping = eps * lam_max if relative_eps else torch.full_like(lam_max, eps)
        # Damped: raised to the floor. Undamped: the zeros stay zero (pseudo-inverse root).
        d = torch.where(damping > 0, torch.maximum(lam + damping, floor), lam)
        keep = d > 0
        # Take the power only where it is defined: torch.where alone would still evaluate
        # 0^(-1/p) = inf at the cut entries (harmless, but it trips anomaly detection).
        safe_d = torch.where(keep, d, torch.ones_like(d))
        r = torch.where(keep, safe_d.pow(-1.0 / p), torch.zeros_like(d))
        # Q diag(r) Q^T without forming diag(r); symmetrised because the product is
        # symmetric only up to round-off and preconditioners are assumed symmetric.
        result = _symmetrize((Q * r.unsqueeze(-2)) @ Q.mT)
        if not bool(torch.isfinite(result).all()):
            continue  # e.g. d^(-1/p) overflowed float32 for a tiny kept eigenvalue
        return result.to(A.dtype)

    raise RootComputationError(
        f"{name}: eigendecomposition of a matrix batch of shape {tuple(A.shape)} failed or "
        f"gave non-finite values in {' and '.join(str(t) for t in attempts)}"
    )


def _lambda_max_upper_bound(S: Tensor) -> Tensor:
    """Upper bound on the largest eigenvalue of symmetric PSD ``S``, matmuls only.

    For PSD S with eigenvalues lam_i >= 0 and m = 2^k::

        lam_max <= (tr S^m)^(1/m) <= n^(1/m) lam_max

    S^m is formed by k repeated squarings, each renormalised by its trace so nothing
    overflows: with B_0 = S / t_0, t_0 = tr S, and B_j = B_{j-1}^2 / t_j,
    t_j = tr(B_{j-1}^2), one gets (tr S^m)^(1/m) = prod_j t_j^(2^-j).  k is the smallest
    with n^(1/m) <= 1 + 1e-3, so the bound overestimates lam_max by at most 0.1% (and by
    much less unless the top of the spectrum is flat).  Why not power iteration: it needs
    a start vector not orthogonal to the top eigenvector and only gives a lower bound,
    while the Newton scaling below needs a guaranteed upper bound.  Returns shape
    (..., 1, 1); 0 for the zero matrix.
    """
    n = S.size(-1)
    k = max(1, math.ceil(math.log2(math.log(n) / math.log1p(1e-3)))) if n > 1 else 0
    trace = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)[..., None, None]
    positive = trace > 0
    t = torch.where(positive, trace, torch.ones_like(trace))
    log_bound = torch.log(t)
    B = S / t
    for j in range(1, k + 1):
        B2 = B @ B
        t_j = torch.diagonal(B2, dim1=-2, dim2=-1).sum(-1)[..., None, None]
        # tr(B^2) > 0 whenever B != 0; guard only the zero-matrix case.
        t_j = torch.where(t_j > 0, t_j, torch.ones_like(t_j))
        log_bound = log_bound + math.ldexp(1.0, -j) * torch.log(t_j)
        B = B2 / t_j
    return torch.where(positive, torch.exp(log_bound), torch.zeros_like(trace))


def inverse_root_newton(
    A: Tensor,
    p: int,
    *,
    eps: float = 0.0,
    relative_eps: bool = False,
    max_iters: int = 100,
    tol: float = 1e-6,
) -> Tensor:
    """Inverse p-th root ``(A + eps' I)^(-1/p)`` of a symmetric PD matrix, matmuls only.

    Coupled Newton iteration (Guo & Higham 2006, "A Schur-Newton method for the matrix
    p-th root and its inverse", SIAM J. Matrix Anal. Appl. 28(3)), in the form used by
    Shampoo (Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning")::

        S    = A + eps' I                 (eps' as in inverse_root_eigh)
        z    = (p + 1) / (2 c),  c >= lam_max(S)
        X_0  = z^(1/p) I,   M_0 = z S      (invariant: M_k = X_k^p S)
        T_k  = ((p + 1) I - M_k) / p
        X_{k+1} = X_k T_k,  M_{k+1} = T_k^p M_k
        stop when ||M_k - I||_F < tol; then X_k = S^(-1/p) (M_k)^(1/p) ~ S^(-1/p).

    Every eigenvalue m of M follows m <- m ((p + 1 - m) / p)^p, which converges
    (quadratically near 1) to 1 for every start in (0, p + 1); the scaling puts the
    spectrum of M_0 in (0, (p + 1) / 2], inside that interval with margin.  ``c`` is a
    matmul-only upper bound on lam_max (within 0.1%, see ``_lambda_max_upper_bound``);
    the same estimate is used for ``relative_eps``, so there the damping is
    ``eps * lam_max`` up to that 0.1% overestimate.

    Why: on accelerators an eigendecomposition is slow and poorly parallel, while this
    needs only ~(2 + log2 p) matmuls per iteration (measured in float32, n = 64..1024,
    condition number 1e2..1e6: 9-22 iterations).

    Stopping: the residual is measured in the Frobenius norm ||M - I||_F (Anil et al. use
    the max-abs entry).  Reason: M - I is a polynomial in S, and each of its eigenvalues
    shrinks in magnitude every step in exact arithmetic, so ||M - I||_F decreases
    monotonically; an increase can only be round-off, and a matrix whose residual stops
    decreasing keeps its previous (best) iterate and is frozen.  Each matrix of a batch
    stops on its own; the loop ends when all have stopped or after ``max_iters``.

    Computation in float32 (float64 inputs stay float64); result returned in A's dtype.

    Raises:
        RootComputationError: non-finite input, a zero/indefinite matrix (non-positive
            ``lam_max`` bound after damping), a non-finite result, or a final residual
            ``||M - I||_F > 0.1`` -- the iteration never entered its convergent regime,
            typically because S is singular or indefinite (M then keeps an eigenvalue
            <= 0 and X grows without bound).  A residual of r means a relative error of
            about r / p in the root, so 0.1 is ~2.5-5% error: clearly a failure, while
            the float32 round-off floor is ~1e-6..4e-6 (measured, n = 64..1024).  For singular matrices use eps > 0 or
            :func:`inverse_root_eigh` (pseudo-inverse root).
    """
    name = "inverse_root_newton"
    _check_square_batch(A, name)
    if not isinstance(p, int) or isinstance(p, bool) or p < 1:
        raise ValueError(f"{name}: p must be an integer >= 1 (T^p is a matrix power), got {p!r}")
    _check_eps(eps, name)
    if not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"{name}: max_iters must be an integer >= 0, got {max_iters!r}")
    if not tol > 0:
        raise ValueError(f"{name}: tol must be > 0, got {tol!r}")
    if not bool(torch.isfinite(A).all()):
        raise RootComputationError(
            f"{name}: input of shape {tuple(A.shape)} contains non-finite values"
        )

    compute_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    S = _symmetrize(A.to(compute_dtype))
    eye = _identity_like(S)

    lam_max = _lambda_max_upper_bound(S)  # (..., 1, 1)
    damping = eps * lam_max if relative_eps else eps
    S = S + damping * eye
    c = lam_max + damping  # lam_max(S + d I) = lam_max(S) + d exactly
    if not bool((c > 0).all()):
        raise RootComputationError(
            f"{name}: a matrix in the batch of shape {tuple(A.shape)} is zero or not "
            "positive semi-definite after damping; its inverse root is undefined "
            "(use eps > 0, or inverse_root_eigh for a pseudo-inverse root)"
        )

    z = (p + 1) / (2.0 * c)
    X = z.pow(1.0 / p) * eye
    M = z * S

    def residual(M: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(M - eye)[..., None, None]  # Frobenius

    err = residual(M)
    active = err >= tol
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        T = ((p + 1) * eye - M) / p
        X_new = X @ T
        M_new = torch.linalg.matrix_power(T, p) @ M
        err_new = residual(M_new)
        # NaN compares False, so a non-finite step is rejected too.
        improved = active & (err_new < err)
        X = torch.where(improved, X_new, X)
        M = torch.where(improved, M_new, M)
        err = torch.where(improved, err_new, err)
        active = improved & (err_new >= tol)

    # X is a polynomial in S, hence symmetric in exact arithmetic; (X + X^T)/2 removes
    # the round-off asymmetry (the result is then bitwise symmetric, as with eigh).
    X = _symmetrize(X)
    if not bool(torch.isfinite(X).all()):
        raise RootComputationError(
            f"{name}: non-finite result for a matrix batch of shape {tuple(A.shape)}"
        )
    worst = float(err.max()) if err.numel() else 0.0
    if worst > 0.1:
        raise RootComputationError(
            f"{name}: no convergence for a matrix batch of shape {tuple(A.shape)} "
            f"(residual ||M - I||_F = {worst:.3g} after {max_iters} iterations); the "
            "matrix is probably singular or indefinite: use eps > 0 or inverse_root_eigh"
        )
    return X.to(A.dtype)
