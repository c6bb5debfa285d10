"""Newton–Schulz orthogonalisation (Muon's polar factor) as batched Triton matmuls.

Computes what :func:`mupopt.linalg.newton_schulz` computes in its bf16 (and fp32) path, for a
stack of same-shape matrices ``(..., rows, cols)`` in one launch per stage (the batch is grid
axis 1)::

    X = bf16(G), transposed if rows > cols (X is m x n, m <= n)
    X = X / max(||X||_F, eps)                                 _ns_normalize_kernel
    per iteration (a, b, c):
        A = X X^T                                              _ns_syrk_kernel (lower tiles, mirrored)
        B = b*A + c*A A                                        _ns_syrk_kernel (C = A in the epilogue)
        X = a*X + B X                                          _ns_update_kernel (a*X in the epilogue)

Why these kernels (flops per iteration, m x n with m <= n, counting a multiply-add as 2):
``torch`` spends 2m^2n (X X^T) + 2m^3 (A A) + 2m^2n (B X); here the two symmetric products
compute only the tiles on and below the diagonal and write each off-diagonal tile twice (as
itself and transposed), so they cost about half: m^2n + m^3 + 2m^2n. For a square matrix that
is 4m^3 instead of 6m^3 per iteration, an upper bound of 1.5x on the speed-up. ``A A`` is
computed as ``A A^T``: A is stored exactly symmetric (mirrored tiles), so both are the same
numbers and one kernel serves both products. The elementwise parts (``b*A + c*(.)`` and
``a*X + (.)``) are epilogues of the matmul that produces their operand: no extra pass over A
or X, and ``B`` is rounded to bf16 once, as cuBLAS's fused ``baddbmm`` does.

Numerics: operands in the storage dtype (bf16, or fp32 for ``dtype=torch.float32``), fp32
accumulation (``tl.dot``; fp32 operands with ``input_precision="ieee"``: Triton's default for
fp32 is TF32, which torch's fp32 matmul does not use), one rounding per stored matrix, round to
nearest even. The result equals torch's up to the order of the fp32 sums, i.e. within a bf16
rounding per element per iteration.

Not measured on a GPU: this was written on a machine without one and verified in Triton's
interpreter (CPU) and by compiling for sm_90; the tile sizes in :func:`_tiles` follow the
Triton matmul tutorial's H100 choices and are untuned.

Compilation is deferred (see :class:`DeferredJit`): importing this module imports neither
triton nor the kernels, so ``register()``-time imports do not fix the interpreter mode.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from ...linalg import _JORDAN_COEFFICIENTS, _coefficient_schedule

__all__ = ["newton_schulz_triton", "DeferredJit", "SUPPORTED_DTYPES"]

# CUDA's limit on grid axis 1, the batch axis of every kernel here.
_MAX_GRID_Y = 65535

#: Storage dtypes of the iteration (linalg also allows float64: that one stays in torch).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


class DeferredJit:
    """The Triton functions of one module, decorated with ``triton.jit`` at their first use.

    Why: ``triton.jit`` decides between compiling and interpreting (``TRITON_INTERPRET``) when it
    decorates, and this backend's other kernels are decorated when ``_common`` is imported, at the
    first step (see the package docstring). Decorating ours here at import time would fix the
    mode whenever ``register()`` imports this module, possibly before a test or a user sets the
    variable, and disagree with ``_common``. So kernels are plain functions marked with this
    decorator, and :meth:`build` (called by every launcher) imports ``_common`` and decorates them
    in ``_common``'s mode. ``tl`` and the shared device helpers are bound as module globals then:
    Triton resolves a kernel's names in its module's globals when it compiles (or interprets) it.
    """

    def __init__(self, namespace: dict):
        self._ns = namespace
        self._names: list[str] = []
        self.ready = False

    def __call__(self, fn: Callable) -> Callable:
        self._names.append(fn.__name__)
        return fn

    def build(self, helpers: Callable[[], dict] | None = None) -> None:
        """Decorate the marked functions (once). ``helpers()`` returns device functions of other
        modules to bind first (they must already be decorated)."""
        if self.ready:
            return
        import triton
        import triton.language as tl

        from . import _common

        ns = self._ns
        ns["tl"] = tl
        ns["triton"] = triton
        ns["_INTERPRET"] = tl.constexpr(_common.INTERPRET)
        ns["_bf16_rtne"] = _common._bf16_rtne
        ns["_load"] = _common._load
        ns["_store"] = _common._store
        ns["_lerp"] = _common._lerp
        if helpers is not None:
            ns.update(helpers())
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if _common.INTERPRET else "0"
        try:
            for name in self._names:
                ns[name] = triton.jit(ns[name])
        finally:
            if previous is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = previous
        self.ready = True


_jit = DeferredJit(globals())
# Bound by _jit.build() (see DeferredJit): triton.language and the device functions these
# kernels call. Placeholders until then, so that the names are defined for readers and linters.
tl = _INTERPRET = _bf16_rtne = None


# ---------------------------------------------------------------------------------------------
# Device helpers (also used by shampoo.py)
# ---------------------------------------------------------------------------------------------
@_jit
def _index(i):
    """Row, column or k indices as int64, before they multiply a stride: a matrix of 2^31 or more
    elements (a 262144 x 8192 embedding, which Muon takes without width info) has element offsets
    past int32, and int32 index x int32 stride wraps (issue 13 item 12). The masks compare the
    same int64 indices. tests/test_triton_matrix.py checks the IR and a strided view whose
    offsets pass 2^31."""
    return i.to(tl.int64)


@_jit
def _mma(acc, a, b, FP32: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if _INTERPRET:
        # The interpreter keeps bf16 as uint16 and its tl.dot multiplies the bit patterns
        # (triton-lang/triton#11584, still open in 3.9); fp32 holds every bf16 exactly, so the
        # upcast computes the same products.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32:
        # tl.dot's default for fp32 operands is TF32 (10-bit mantissa); torch's fp32 matmul
        # (allow_tf32=False by default) is IEEE.
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@_jit
def _to_storage(x, BF16: tl.constexpr):
    """fp32 -> storage dtype, round to nearest even (the interpreter's own cast truncates)."""
    if BF16:
        if _INTERPRET:
            y = _bf16_rtne(x)
        else:
            y = x.to(tl.bfloat16)
    else:
        y = x
    return y


@_jit
def _syrk_tile(y_ptr, stride_yr, stride_yk, N, K, ti, tj,
               FP32: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile (ti, tj) of Y Y^T for Y of shape (N, K) at ``y_ptr`` with the given strides.

    Both operands are row blocks of Y read with the same access pattern (the second one
    transposed in registers), so a right-hand statistic ``G^T G`` is the same call with the
    strides of ``G^T``.
    """
    rows_i = _index(ti * BLOCK + tl.arange(0, BLOCK))
    rows_j = _index(tj * BLOCK + tl.arange(0, BLOCK))
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = _index(k0 + ks)
        kmask = kk[None, :] < K
        a = tl.load(y_ptr + rows_i[:, None] * stride_yr + kk[None, :] * stride_yk,
                    mask=(rows_i[:, None] < N) & kmask, other=0.0)
        b = tl.load(y_ptr + rows_j[:, None] * stride_yr + kk[None, :] * stride_yk,
                    mask=(rows_j[:, None] < N) & kmask, other=0.0)
        acc = _mma(acc, a, tl.trans(b), FP32)
    return acc


@_jit
def _store_symmetric(out_ptr, stride_or, stride_oc, val, ti, tj, N, BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Store tile (ti, tj) of a symmetric N x N matrix and, off the diagonal, its mirror (tj, ti)."""
    rows = _index(ti * BLOCK + tl.arange(0, BLOCK))
    cols = _index(tj * BLOCK + tl.arange(0, BLOCK))
    y = _to_storage(val, BF16)
    if ti == tj:
        # A diagonal tile's own product need not be bitwise symmetric (the interpreter's numpy
        # matmul sums (r, c) and (c, r) in different orders: seen in bf16 after rounding), so
        # its upper half is its lower half transposed.
        local = tl.arange(0, BLOCK)
        y = tl.where(local[:, None] >= local[None, :], y, tl.trans(y))
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :] * stride_oc, y,
             mask=(rows[:, None] < N) & (cols[None, :] < N))
    if ti != tj:
        # The mirror is the transposed tile itself, so the stored matrix is exactly symmetric;
        # a diagonal tile is written once (a second write could race with different bits).
        tl.store(out_ptr + cols[:, None] * stride_or + rows[None, :] * stride_oc, tl.trans(y),
                 mask=(cols[:, None] < N) & (rows[None, :] < N))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@_jit
def _ns_normalize_kernel(
    # input X (batch, M, N) in the storage dtype, any strides (the transpose is a stride swap);
    # per-matrix norm, already clamped to >= eps, as fp32 [batch]; output (batch, M, N)
    x_ptr, norm_ptr, out_ptr,
    M, N,
    stride_xb, stride_xr, stride_xc,
    stride_ob, stride_or, stride_oc,
    BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rows = _index((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = _index((pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N))
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + b * stride_xb + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
    norm = tl.load(norm_ptr + b)
    # torch divides bf16 by bf16 as fp32 IEEE division rounded once: the same here.
    y = tl.div_rn(x.to(tl.float32), norm)
    tl.store(out_ptr + b * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
             _to_storage(y, BF16), mask=mask)


@_jit
def _ns_syrk_kernel(
    # OUT = alpha * Y Y^T (+ beta * C): Y (batch, N, K); C and OUT (batch, N, N) with OUT's strides;
    # tiles: int32 [T(T+1)/2, 2] (i, j) of the lower-triangle tiles
    y_ptr, c_ptr, out_ptr, tiles_ptr,
    N, K,
    stride_yb, stride_yr, stride_yk,
    stride_ob, stride_or, stride_oc,
    alpha, beta,
    HAS_C: tl.constexpr, BF16: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (tiles on and below the diagonal, batch)
    ti = tl.load(tiles_ptr + 2 * tl.program_id(0))
    tj = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
    b = tl.program_id(1).to(tl.int64)
    acc = _syrk_tile(y_ptr + b * stride_yb, stride_yr, stride_yk, N, K, ti, tj, not BF16, BLOCK, BLOCK_K)
    out = alpha * acc
    if HAS_C:
        rows = _index(ti * BLOCK + tl.arange(0, BLOCK))
        cols = _index(tj * BLOCK + tl.arange(0, BLOCK))
        c = tl.load(c_ptr + b * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
                    mask=(rows[:, None] < N) & (cols[None, :] < N), other=0.0)
        out = beta * c.to(tl.float32) + out
    _store_symmetric(out_ptr + b * stride_ob, stride_or, stride_oc, out, ti, tj, N, BF16, BLOCK)


@_jit
def _ns_update_kernel(
    # OUT = a * X + B @ X: B (batch, M, M), X (batch, M, N), OUT (batch, M, N) with any strides
    # (the last iteration writes the caller's (rows, cols) layout directly, transposed or not)
    b_ptr, x_ptr, out_ptr,
    M, N,
    stride_bb, stride_br, stride_bc,
    stride_xb, stride_xr, stride_xc,
    stride_ob, stride_or, stride_oc,
    a,
    BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    # Grouped order (Triton matmul tutorial): GROUP_M row tiles share each column tile of X
    # while it is in L2.
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = _index(pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    cols = _index(pid_n * BLOCK_N + tl.arange(0, BLOCK_N))
    ks = tl.arange(0, BLOCK_K)
    bb = b_ptr + bat * stride_bb
    xb = x_ptr + bat * stride_xb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        kk = _index(k0 + ks)
        bt = tl.load(bb + rows[:, None] * stride_br + kk[None, :] * stride_bc,
                     mask=(rows[:, None] < M) & (kk[None, :] < M), other=0.0)
        xt = tl.load(xb + kk[:, None] * stride_xr + cols[None, :] * stride_xc,
                     mask=(kk[:, None] < M) & (cols[None, :] < N), other=0.0)
        acc = _mma(acc, bt, xt, not BF16)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(xb + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0)
    out = a * x.to(tl.float32) + acc
    tl.store(out_ptr + bat * stride_ob + rows[:, None] * stride_or + cols[None, :] * stride_oc,
             _to_storage(out, BF16), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def build() -> None:
    """Decorate this module's Triton functions (idempotent; see :class:`DeferredJit`)."""
    _jit.build()


def device_helpers() -> dict:
    """The device functions other kernel modules call (bind them with DeferredJit.build)."""
    build()
    g = globals()
    return {name: g[name] for name in ("_index", "_mma", "_to_storage", "_syrk_tile", "_store_symmetric")}


def _launch(kernel, grid, *args, **meta) -> None:
    """Through ``_common.launch``: one launch path for the backend (and its test hook)."""
    from . import _common

    _common.launch(kernel, grid, *args, **meta)


def interpreted() -> bool:
    build()
    from . import _common

    return _common.INTERPRET


def _tiles(m: int, n: int, dtype: torch.dtype) -> dict:
    """Tile sizes for an m x n iterate (m <= n). Untuned (no GPU when written).

    tl.dot needs every tile side >= 16. Interpreter: the smallest tiles that cover small test
    matrices with few programs (its cost is per program and per tile op). GPU, bf16: 128 x 128
    x 64 with 8 warps and 3 stages (Triton tutorial's H100 matmul choice: 3 * (128*64*2) * 2 B
    = 96 KiB of shared memory) from m >= 512, 64-wide tiles below so that a 256..511 Gram
    still has >= 10 tiles per matrix; fp32 (IEEE FMA path, no tensor cores) 64 x 64 x 32.
    """
    if interpreted():
        t = 16 if m <= 16 else 32
        return dict(syrk=t, bm=t, bn=32 if n > 16 else 16, bk=32 if m > 16 else 16, warps=4, stages=1)
    if dtype == torch.float32:
        t = 32 if m <= 32 else 64
        return dict(syrk=t, bm=t, bn=64, bk=32, warps=4, stages=3)
    if m >= 512:
        return dict(syrk=128, bm=128, bn=128, bk=64, warps=8, stages=3)
    t = 32 if m <= 32 else 64
    return dict(syrk=t, bm=t, bn=64 if n > 32 else 32, bk=64 if m > 32 else 32, warps=4, stages=3)


_TILE_TABLES: dict[tuple, torch.Tensor] = {}


def lower_tiles(T: int, device: torch.device) -> torch.Tensor:
    """int32 [T(T+1)/2, 2]: the tiles (i, j), j <= i, of a T x T tile grid, row by row (cached).

    A table rather than inverting pid = i(i+1)/2 + j in the kernel: two loads instead of a float
    square root with off-by-one fixes, and the same order on every backend.
    """
    key = (T, device)
    table = _TILE_TABLES.get(key)
    if table is None:
        i, j = torch.tril_indices(T, T)
        table = torch.stack([i, j], 1).to(torch.int32).contiguous().to(device)
        _TILE_TABLES[key] = table
    return table


def _device_guard(t: torch.Tensor):
    from contextlib import nullcontext

    return torch.cuda.device(t.device) if t.device.type == "cuda" else nullcontext()


def syrk(Y: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, C: torch.Tensor | None = None,
         beta: float = 0.0) -> torch.Tensor:
    """``out = alpha * Y Y^T + beta * C`` for stacks Y (batch, N, K), C and out (batch, N, N).

    Only tiles on and below the diagonal are computed; each off-diagonal one is stored twice.
    ``C`` must have ``out``'s strides (it may not be ``out`` itself). Exposed for tests.
    """
    build()
    nb, N, K = Y.shape
    if C is not None:
        assert C.stride() == out.stride() and C.data_ptr() != out.data_ptr()
    if nb == 0 or N == 0:
        return out
    if K == 0:  # no tile reads Y: the product is zero
        out.copy_(beta * C if C is not None else torch.zeros_like(out))
        return out
    cfg = _tiles(N, K, Y.dtype)
    t = cfg["syrk"]
    tiles = -(-N // t)
    with _device_guard(Y):
        _launch(
            _ns_syrk_kernel, (tiles * (tiles + 1) // 2, nb),
            Y, C if C is not None else out, out, lower_tiles(tiles, Y.device),
            N, K, *Y.stride(), *out.stride(),
            float(alpha), float(beta),
            HAS_C=C is not None, BF16=out.dtype == torch.bfloat16, BLOCK=t, BLOCK_K=cfg["bk"],
            num_warps=cfg["warps"], num_stages=cfg["stages"],
        )
    return out


def newton_schulz_triton(
    G: torch.Tensor,
    steps: int | None = 5,
    coefficients: Sequence[float] | Sequence[Sequence[float]] = _JORDAN_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """:func:`mupopt.linalg.newton_schulz` on the Triton kernels of this module.

    Same arguments, validation and result (shape of ``G``, dtype ``dtype``) for ``dtype``
    bfloat16 (Muon's default) or float32; the result is a contiguous tensor (linalg returns a
    transposed view for tall inputs). ``G`` may be a CUDA tensor, or a CPU tensor when the
    kernels run in the interpreter (``TRITON_INTERPRET=1``).
    """
    if G.ndim < 2:
        raise ValueError(
            f"newton_schulz: expected a tensor of shape (..., rows, cols), got shape {tuple(G.shape)}"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"newton_schulz_triton: dtype must be bfloat16 or float32, got {dtype}")
    schedule = _coefficient_schedule(coefficients, steps)
    if check_finite and not bool(torch.isfinite(G).all()):
        raise ValueError("newton_schulz: input contains non-finite values")
    build()

    rows, cols = G.shape[-2:]
    batch_shape = G.shape[:-2]
    X = G.to(dtype).reshape(-1, rows, cols)  # reshape: a view unless the batch dims are strided
    nb = X.shape[0]
    out = torch.empty((nb, rows, cols), dtype=dtype, device=G.device)
    if out.numel() == 0:
        return out.reshape(G.shape)
    if nb > _MAX_GRID_Y:
        # the batch is grid axis 1, at most 65535 programs: one call per slice
        for i in range(0, nb, _MAX_GRID_Y):
            out[i:i + _MAX_GRID_Y] = newton_schulz_triton(X[i:i + _MAX_GRID_Y], None, schedule, eps, dtype,
                                                         check_finite=False)
        return out.reshape(G.shape)
    transposed = rows > cols
    V = X.mT if transposed else X  # (nb, m, n), m <= n: the transpose is a stride swap
    m, n = V.shape[-2:]
    # ||X||_F with torch's reduction and clamp in the storage dtype: the same numbers as linalg.
    norm = torch.linalg.vector_norm(V, dim=(-2, -1)).clamp(min=eps).float().contiguous()

    cfg = _tiles(m, n, dtype)
    bf16 = dtype == torch.bfloat16
    x_cur = torch.empty((nb, m, n), dtype=dtype, device=G.device)
    x_next = torch.empty_like(x_cur) if len(schedule) > 1 else None
    A = torch.empty((nb, m, m), dtype=dtype, device=G.device)
    B = torch.empty_like(A)
    final = out.mT if transposed else out  # (nb, m, n) view of the result

    with _device_guard(G):
        bm, bn = cfg["bm"], cfg["bn"]
        _launch(
            _ns_normalize_kernel, (-(-m // bm) * -(-n // bn), nb),
            V, norm, x_cur, m, n, *V.stride(), *x_cur.stride(),
            BF16=bf16, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
        for it, (a, b, c) in enumerate(schedule):
            syrk(x_cur, A)
            syrk(A, B, alpha=c, C=A, beta=b)
            dst = final if it == len(schedule) - 1 else x_next
            _launch(
                _ns_update_kernel, (-(-m // bm) * -(-n // bn), nb),
                B, x_cur, dst, m, n, *B.stride(), *x_cur.stride(), *dst.stride(), float(a),
                BF16=bf16, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["bk"], GROUP_M=8,
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
            if dst is x_next:
                x_cur, x_next = x_next, x_cur
    return out.reshape(*batch_shape, rows, cols)
