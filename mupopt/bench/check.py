"""Correctness before speed: a backend is timed only after its result matches the reference's.

Both run the same calls from fresh state on copies of the same tensors; then params and every
state tensor are compared. A benchmark of a wrong kernel is worthless, so a mismatch of one of our
backends raises :class:`CheckFailed` and stops the run.

Tolerances. Elementwise steps, ``torch.testing.assert_close`` with
- fp32 states: rtol 1e-5 and atol 1e-6 x max|reference| of that tensor. Fused kernels reorder a
  few float32 operations (torch's fused AdamW against its single-tensor path: ~1e-7 relative);
- fp32 params, compared by their update: rtol 1e-4, atol 1e-5 x max|update| (a parameter of 0.02
  has a float32 spacing of 1.9e-9, 2e-6 of a 1e-3 update). A wrong formula is far outside: a
  dropped weight decay (lr*wd*p = 2e-6) moves the update by 2e-3, a wrong multiplier by > 1e-1.
  Plus 4 float32 spacings of the parameter (4 eps |p|): on a parameter of 1 the update is only
  resolved to 1.2e-7, and a fused kernel rounds p in another order than the reference;
  LAMB too: its trust ratio is a norm over the whole tensor, and every backend, the reference
  included, sums the squares in float64, so the ratios agree to about a float32 ulp at any size.
  (The reference once took eager torch's float32 vector_norm, 9.5e-5 off the float64 value at
  2^22 elements on the CPU: a 1.1e-3 error on every update, which the check had to allow and
  which stopped `mupopt bench --quick` at 1.3e-3, issue 13. tests/test_lamb_norm_reduce.py checks
  each backend against the float64 transcription above 2^22 elements.);
- bf16: rtol 1.6e-2 (two bf16 spacings, 2^-7 each) and atol 1e-3 x max|reference|: fp32 math
  rounded once to bf16 differs from another order by at most a spacing or so.
Matrix results: relative Frobenius error below a tolerance set by the caller from measurements:
Newton-Schulz in bf16 lies 1.1e-2..1.9e-2 from the float64 iteration (shapes 32x128..512x512,
measured), so bf16 results are checked against torch's bf16 iteration with 5e-2 (a missing step or
a wrong coefficient is off by > 1e-1); float32 Newton-Schulz lies ~2e-6 from float64 (checked with
1e-4); float32 eigh and Newton roots of well-conditioned blocks ~1e-6 (checked with 1e-4).
A bf16 parameter's matrix update is resolved only to the bf16 spacing of the parameter, so its
tolerance is at least 0.1 x ||spacings|| / ||update||: the error of one spacing on 1% of the
elements (sqrt(0.01) = 0.1). Seen on an H200: Shampoo "triton" bf16, blocks of 1024, 1.01% from
the reference against a tolerance of 1% -- updates of a few spacings, where one rounding the
other way is a large share of the update.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


# Float32 spacings of a parameter allowed on top of an update's tolerance (compare()).
_PARAM_SPACINGS = 4
# bf16 matrix updates: the relative Frobenius error of one spacing on 1% of the elements.
_BF16_FLIP_SHARE = 0.1


class CheckFailed(AssertionError):
    """A backend's result does not match the reference's: its timing would be worthless."""


Snapshot = dict[str, torch.Tensor]


def snapshot(params: Sequence[torch.Tensor], opt: torch.optim.Optimizer) -> Snapshot:
    """Params and state tensors by name ("param[3]", "exp_avg[3]", "left[3][0]"). Not cloned: the
    caller drops the optimizer (whose copies of the params these are) and keeps the snapshot, so a
    1.24B-parameter check holds one set of results, not two."""
    out: Snapshot = {}
    for i, p in enumerate(params):
        out[f"param[{i}]"] = p.detach()
        for key, val in opt.state.get(p, {}).items():
            if key == "step":
                continue  # a count, equal by construction; torch keeps it as a tensor too
            if isinstance(val, torch.Tensor):
                out[f"{key}[{i}]"] = val.detach()
            elif isinstance(val, (list, tuple)):
                for k, t in enumerate(val):
                    if isinstance(t, torch.Tensor):
                        out[f"{key}[{i}][{k}]"] = t.detach()
    return out


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol relative to the tensor's max |value|) for elementwise checks."""
    if dtype == torch.float32:
        return 1e-5, 1e-6
    return 1.6e-2, 1e-3


def compare(reference: Snapshot, got: Snapshot, *, dtype: torch.dtype, initial: Snapshot | None = None,
            update_tol: tuple[float, float] = (1e-4, 1e-5), matrix_tol: float | None = None, what: str = "") -> float:
    """Raise CheckFailed unless ``got`` matches ``reference`` on every name they share (all of
    the reference's params must be there). Returns the largest relative error seen.

    Params are compared by their update (minus ``initial``, the values both runs started from)
    where the update is resolved: in fp32 (``update_tol`` = rtol, atol relative to max|update|)
    and for matrix steps. The update is what the kernel computed; in the params themselves an
    error of 1% of a 1e-3 update on a 0.02 parameter is 5e-4 relative, under any useful rtol.
    In bf16 the update of a 0.02 parameter is ~8 spacings (1.2e-4 each), so bf16 params are
    compared as values. ``matrix_tol``: relative Frobenius error for every tensor."""
    missing = [k for k in reference if k.startswith("param[") and k not in got]
    if missing:
        raise CheckFailed(f"{what}: result lacks {missing[:3]}")
    worst = 0.0
    for name in (k for k in reference if k in got):
        ref, out = reference[name], got[name]
        if ref.shape != out.shape:
            raise CheckFailed(f"{what}: {name} has shape {tuple(out.shape)}, the reference {tuple(ref.shape)}")
        if not bool(torch.isfinite(out.float()).all()):
            raise CheckFailed(f"{what}: {name} has non-finite values")
        r, o = ref.double(), out.double()
        as_update = initial is not None and name in initial and (matrix_tol is not None or dtype == torch.float32)
        if as_update:
            r, o = r - initial[name].double(), o - initial[name].double()
        label = f"{name} (update)" if as_update else name
        if matrix_tol is not None:
            tol = matrix_tol
            if as_update and dtype == torch.bfloat16:
                floor = _BF16_FLIP_SHARE * float(torch.linalg.vector_norm(bf16_spacing(ref))) / (
                    float(torch.linalg.vector_norm(r)) or 1.0)
                tol = max(tol, floor)
            worst = max(worst, compare_tensors(r, o, tol, f"{what}: {label}"))
            continue
        rtol, atol_rel = update_tol if as_update else tolerances(dtype)
        scale = float(r.abs().max()) if r.numel() else 0.0
        allowed = atol_rel * scale + rtol * r.abs()
        if as_update:
            # An update is resolved only to the float32 spacing of the parameter it lands on
            # (eps * |p| bounds it): two valid rounding orders differ by a few spacings there.
            # Seen: LAMB "cpu" vs the reference on randn parameters (|p| up to ~5), 1.8e-7 apart
            # on 1.3e-4 updates, 3 spacings of a parameter in [0.5, 1). A wrong formula is far
            # outside: a dropped decay moves the update by lr*wd*|p| = 1e-4 |p| >> 4 eps |p|.
            allowed = allowed + _PARAM_SPACINGS * torch.finfo(torch.float32).eps * initial[name].double().abs()
        excess = (o - r).abs() - allowed
        if excess.numel() and float(excess.max()) > 0:
            bad = int((excess > 0).sum())
            k = int(excess.argmax())
            raise CheckFailed(f"{what}: {label} does not match the reference (rtol {rtol:g}, atol {atol_rel:g} x max|ref| = "
                              f"{atol_rel * scale:.3g}{', plus 4 float32 spacings of the parameter' if as_update else ''}): "
                              f"{bad} / {excess.numel()} elements outside; largest excess at flat index {k}: "
                              f"{float(o.flatten()[k]):.9g} vs {float(r.flatten()[k]):.9g}")
        if scale:
            worst = max(worst, float((o - r).abs().max()) / scale)
    return worst


def update_error(reference: Snapshot, got: Snapshot, initial: Snapshot) -> float:
    """The largest relative difference of two runs' parameter updates, as :func:`compare` measures
    an update: per param, max |(got - initial) - (reference - initial)| / max |reference - initial|,
    then the largest over the params of ``reference`` (inf when one is missing or non-finite).
    No tolerance: the caller decides (peer equivalence, mupopt.bench.measure.equivalence)."""
    worst = 0.0
    for name, ref in reference.items():
        if name not in got or not bool(torch.isfinite(got[name]).all()):
            return math.inf
        r = ref.double() - initial[name].double()
        o = got[name].double() - initial[name].double()
        scale = float(r.abs().max()) if r.numel() else 0.0
        diff = float((o - r).abs().max()) if r.numel() else 0.0
        worst = max(worst, diff / scale if scale else (0.0 if diff == 0 else math.inf))
    return worst


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 values at |x| (8 significant bits: 2^(floor(log2|x|) - 7)), float64;
    0 where x is 0."""
    a = x.double().abs()
    return torch.where(a > 0, torch.exp2(torch.floor(torch.log2(a.clamp(min=1e-300))) - 7), torch.zeros_like(a))


def compare_tensors(reference: torch.Tensor, got: torch.Tensor, tol: float, what: str) -> float:
    """Relative Frobenius error of one matrix result (Newton-Schulz, roots, a matrix update)."""
    r, o = reference.double(), got.double()
    if not bool(torch.isfinite(o).all()):
        raise CheckFailed(f"{what}: non-finite values")
    err = float(torch.linalg.vector_norm(o - r)) / (float(torch.linalg.vector_norm(r)) or 1.0)
    if err > tol:
        raise CheckFailed(f"{what}: differs from the reference by {err:.3g} (relative Frobenius; tolerance {tol:g})")
    return err
