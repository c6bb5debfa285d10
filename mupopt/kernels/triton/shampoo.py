"""Shampoo's "triton" backend: fused statistics, batched roots, fused preconditioning and update.

Computes what :func:`mupopt.optim.shampoo.shampoo_reference` computes, in its two phases::

    phase 1 (writes nothing to params or state)
      L' = d*L + e*G G^T ;  R' = d*R + e*G^T G     _shampoo_stats_kernel, one launch per block
                                                   size (left and right statistics of that size
                                                   together), lower tiles only, mirrored, into a
                                                   stack (n_size, n, n) per size
      roots of the due stacks                      linalg.inverse_root_newton / _eigh on the stack
                                                   (torch, batched: see "Roots" below)
    phase 2
      state L, R (and roots when due) <- stacks    torch._foreach_copy_
      H = Lr G_b ;  D = H Rr  per block            _shampoo_matmul_kernel x 2, all blocks of all
                                                   tensors in one launch each (per-block address
                                                   table; D's epilogue writes per-tile partial
                                                   sums of D^2 for the graft)
      ||A_b||^2, A = g / (sqrt(v'/(1-bg2^t)) + eg) _shampoo_graft_norm_kernel (partial sums)
      v' ; direction (scale_b*D or A) ; momentum ;
      decay ; update                               _shampoo_update_kernel, every block and every
                                                   Adam-direction tensor in one launch per dtype
                                                   combination

(d, e) = (b2, 1-b2), or (1, 1) when b2 == 1. The graft scale is ``||A_b||_F / ||D_b||_F`` (0 when
D_b = 0); partial sums are reduced with ``.sum(1)`` over a zero-padded table, not atomics, so the
result is the same from run to run.

Roots: ``root_method="newton"`` calls :func:`mupopt.linalg.inverse_root_newton` on each
per-size stack, i.e. batched ``torch.matmul``, not Triton matmuls. Why: the iteration is
matmul-bound (about 4 n^3-flop products per iteration, 9-22 iterations, plus ~13 squarings for
the lambda_max bound at n = 1024), and cuBLAS's batched fp32 GEMM already runs at the fp32
peak; a Triton fp32 GEMM (IEEE, no tensor cores) can at best equal it. What Triton could add is
fusion of the O(n^2) elementwise parts (forming T, the residual norm, the per-matrix
accept/reject) and dropping the per-iteration host sync of the convergence test; that is an
optimisation left for when it can be measured on a GPU. Calling the one implementation also
keeps one definition of the stopping rule, so the backend cannot drift from the reference.
``root_method="eigh"`` calls ``linalg.inverse_root_eigh`` likewise (both looked up in
``mupopt.optim.shampoo`` at call time, where the reference finds them). The stacks hold the same
matrices as the reference's batches (all due matrices of one size), so even eigh's whole-batch
float64 retry matches.

State formats (``state_bits``): the grafting momentum and second moment go through
``_common``'s ``_load``/``_store`` in any format (float32, bf16, 8-bit). An 8-bit store needs
whole 256-element blocks of the flattened tensor, which the preconditioner's blocks cut across,
so a preconditioned tensor with 8-bit states is updated as one whole-tensor entry, its
graft-scaled D (D_b * scale_b in float32, what the kernel forms per block) assembled in the
tensor's layout first; its block entries serve the matmuls and graft norms only.
Param stores likewise: stochastic rounding (codes 3, 4) and ``kahan_summation`` (codes 7, 8: the
update loads p + c and stores the split, c addressed at the param's offsets, column 11 of the
update table).

Not measured on a GPU (none was available when written): verified in Triton's interpreter on
the CPU and by compiling for sm_90; tile sizes are untuned.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ... import backends, storage
from ...optim import _lean_states as lean
from ...optim import shampoo as _reference
from ...optim.shampoo import ROOT, blocks_of, is_matrix
from . import newton_schulz as ns

_jit = ns.DeferredJit(globals())
# Bound by _jit.build() (see DeferredJit): triton.language and the device functions these
# kernels call. Placeholders until then, so that the names are defined for readers and linters.
tl = _load = _store = _index = _mma = _syrk_tile = _store_symmetric = _UP_SCAL_C = None

PRIORITY = 10
# Elements per program of the elementwise passes (as _common.BLOCK).
BLOCK = 4096
NUM_WARPS = 8
# int64 columns of the statistics table: y address, row stride, k stride, K, old statistic
# address, output row in the size's stack.
_STATS_ROW = 6
# int64 columns of the matmul table: a, lda, b, ldb, c, ldc, M, N, K.
_MM_ROW = 9
# int64 columns of the update table: p, g, mom, v, D addresses (D = 0: Adam direction), element
# offset of the block in the tensor, block columns, tensor columns (row stride), block numel,
# the block-scale addresses of mom and v (format 8; else 0), the address of p's compensation
# (kahan_summation, read when P_BF16 is 7 or 8; else 0), then fp32 (decay, step, 1-bg2^t) and
# the stochastic rounding key (uint32 bits, read when P_BF16 is 3 or 4) packed in two int64
# columns.
_UP_ROW = 14
_UP_SCAL = 24  # fp32 index of "decay" within a row viewed as fp32 [2 * _UP_ROW]


@_jit
def _shampoo_stats_kernel(
    # table [n, 6] int64 (see _STATS_ROW); output stack (n_size, N, N) fp32; lower-triangle
    # tiles int32 [T(T+1)/2, 2]
    table_ptr, out_ptr, tiles_ptr,
    N, decay, gain,
    G_BF16: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (tiles on and below the diagonal, statistics)
    ti = tl.load(tiles_ptr + 2 * tl.program_id(0))
    tj = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
    row = table_ptr + tl.program_id(1) * ROW
    y_ptr = tl.load(row).to(tl.pointer_type(tl.bfloat16 if G_BF16 else tl.float32))
    stride_r = tl.load(row + 1)
    stride_k = tl.load(row + 2)
    K = tl.load(row + 3)
    old_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    out = out_ptr + tl.load(row + 5) * N * N
    # bf16 G: the products of bf16 operands are exact in fp32, so tensor-core MMA with fp32
    # accumulation computes what torch's fp32 matmul of the upcast gradient computes.
    acc = _syrk_tile(y_ptr, stride_r, stride_k, N, K, ti, tj, not G_BF16, BLOCK, BLOCK_K)
    rows = _index(ti * BLOCK + tl.arange(0, BLOCK))
    cols = _index(tj * BLOCK + tl.arange(0, BLOCK))
    old = tl.load(old_ptr + rows[:, None] * N + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < N), other=0.0)
    _store_symmetric(out, N, 1, old * decay + gain * acc, ti, tj, N, False, BLOCK)


@_jit
def _shampoo_matmul_kernel(
    # table [n, 9] int64 (see _MM_ROW): C = A @ B per row, A and C fp32, B fp32 or bf16, all
    # row-major with the given leading dimensions; partial [n, max_tiles] fp32 sums of C^2
    table_ptr, partial_ptr, max_tiles,
    B_BF16: tl.constexpr, SUMSQ: tl.constexpr, ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    e = tl.program_id(1)
    row = table_ptr + e * ROW
    M = tl.load(row + 6)
    N = tl.load(row + 7)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # The grid covers the largest block; the programs past this block's tiles have no work.
    if pid < tl.cdiv(M, BLOCK_M) * tiles_n:
        a_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
        lda = tl.load(row + 1)
        b_ptr = tl.load(row + 2).to(tl.pointer_type(tl.bfloat16 if B_BF16 else tl.float32))
        ldb = tl.load(row + 3)
        c_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        ldc = tl.load(row + 5)
        K = tl.load(row + 8)
        rows = _index((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M))
        cols = _index((pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N))
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(a_ptr + rows[:, None] * lda + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * ldb + cols[None, :], mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
            # fp32 x fp32 (a bf16 B is upcast: exact): IEEE, as torch's fp32 matmul.
            acc = _mma(acc, a, b.to(tl.float32), True)
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(c_ptr + rows[:, None] * ldc + cols[None, :], acc, mask=mask)
        if SUMSQ:
            # Rows/columns past the block are exact zeros (masked loads), so they add nothing.
            tl.store(partial_ptr + e * max_tiles + pid, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@_jit
def _shampoo_entry(table_ptr, scal_ptr, chunks_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """This program's entry (a block, or a whole tensor) and its element offsets."""
    cid = tl.program_id(0)
    entry = tl.load(chunks_ptr + 2 * cid)
    j = tl.load(chunks_ptr + 2 * cid + 1)
    row = table_ptr + entry * ROW
    base = tl.load(row + 5)
    c = tl.load(row + 6)
    ld = tl.load(row + 7)
    n = tl.load(row + 8)
    e = j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n
    # element e of a block is (i, e - i*c) in block coordinates; in the tensor it sits at
    # base + i*ld + (e - i*c). A whole tensor is one "block" with c = ld = numel.
    i = e // c
    offs = base + i * ld + (e - i * c)
    bc2 = tl.load(scal_ptr + entry * (2 * ROW) + _UP_SCAL_C + 2)
    return entry, row, e, mask, offs, bc2


@_jit
def _shampoo_graft_norm_kernel(
    # update table and chunk table (entry, chunk) of the preconditioned blocks;
    # partial [n_blocks, max_chunks] fp32 sums of A^2
    table_ptr, scal_ptr, chunks_ptr, partial_ptr, max_chunks, lut,
    bg2, one_minus_bg2, eps_g,
    G_BF16: tl.constexpr, V_BF16: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    entry, row, e, mask, offs, bc2 = _shampoo_entry(table_ptr, scal_ptr, chunks_ptr, ROW, BLOCK)
    g = _load(tl.load(row + 1), offs, mask, G_BF16, False, True)
    # v is only read here: a format-8 v decodes element by element in any traversal
    v = _load(tl.load(row + 3), offs, mask, V_BF16, False, True, tl.load(row + 10), lut)
    v = v * bg2 + one_minus_bg2 * g * g
    adam = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps_g)
    adam = tl.where(mask, adam, 0.0)
    j = tl.load(chunks_ptr + 2 * tl.program_id(0) + 1)
    tl.store(partial_ptr + entry * max_chunks + j, tl.sum(adam * adam, axis=0))


@_jit
def _shampoo_update_kernel(
    # update table [n, 14] int64 (see _UP_ROW) and its fp32 view; chunk table (entry, chunk);
    # graft scale per entry; format-8 map tables (_common.lut). An entry whose states are in
    # format 8 is a whole tensor (its stores quantize whole 256-element blocks: BLOCK is a
    # multiple of 256 and a whole tensor's chunks start at multiples of BLOCK)
    table_ptr, scal_ptr, chunks_ptr, scale_ptr, lut,
    bg2, one_minus_bg2, eps_g, beta1, one_minus_beta1,
    P_BF16: tl.constexpr, G_BF16: tl.constexpr, M_BF16: tl.constexpr, V_BF16: tl.constexpr,
    ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    entry, row, e, mask, offs, bc2 = _shampoo_entry(table_ptr, scal_ptr, chunks_ptr, ROW, BLOCK)
    p_addr = tl.load(row)
    g_addr = tl.load(row + 1)
    m_addr = tl.load(row + 2)
    v_addr = tl.load(row + 3)
    d_addr = tl.load(row + 4)
    m_amax = tl.load(row + 9)
    v_amax = tl.load(row + 10)
    decay = tl.load(scal_ptr + entry * (2 * ROW) + _UP_SCAL_C)
    step = tl.load(scal_ptr + entry * (2 * ROW) + _UP_SCAL_C + 1)

    g = _load(g_addr, offs, mask, G_BF16, False, True)
    v = _load(v_addr, offs, mask, V_BF16, False, True, v_amax, lut)
    v = v * bg2 + one_minus_bg2 * g * g
    _store(v_addr, offs, v, mask, V_BF16, False, True, 0, v_amax, lut)
    if d_addr != 0:
        # preconditioned block: the graft-scaled D (scale 1 without grafting)
        d = tl.load(d_addr.to(tl.pointer_type(tl.float32)) + e, mask=mask, other=0.0) * tl.load(scale_ptr + entry)
    else:
        # 1-D tensors and matrices before start_preconditioning_step: the Adam direction
        d = tl.div_rn(g, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps_g)
    mom = _load(m_addr, offs, mask, M_BF16, False, True, m_amax, lut)
    mom = mom * beta1 + one_minus_beta1 * d
    _store(m_addr, offs, mom, mask, M_BF16, False, True, 0, m_amax, lut)
    if P_BF16 >= 7:  # the storage layer takes c's address in the block-scale argument
        comp = tl.load(row + 11)
    else:
        comp = 0  # unused
    p = _load(p_addr, offs, mask, P_BF16, False, True, comp)
    p = p * decay
    p = p + step * mom
    if P_BF16 == 3 or P_BF16 == 4:
        key = tl.load(scal_ptr + entry * (2 * ROW) + _UP_SCAL_C + 3).to(tl.uint32, bitcast=True)
    else:
        key = 0  # unused
    _store(p_addr, offs, p, mask, P_BF16, False, True, key, comp)


def _helpers() -> dict:
    import triton.language as tl

    return dict(ns.device_helpers(), _UP_SCAL_C=tl.constexpr(_UP_SCAL))


def build() -> None:
    ns.build()
    _jit.build(_helpers)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _fail(message: str) -> None:
    raise RuntimeError(f"backend 'triton' cannot step these shampoo tensors: {message}")


_STATE_KEYS = ("momentum_buffer", "exp_avg_sq")
_MATRIX_KEYS = ("left", "right", "left_root", "right_root")


def _check(params, grads, states, kahan: bool = False) -> None:
    """Everything that could fail, before anything is written (the two-phase guarantee)."""
    if not (len(params) == len(grads) == len(states)):
        _fail(f"{len(params)} params, {len(grads)} gradients, {len(states)} states")
    device = params[0].device
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        reason = backends.subclass_reason([p, g, *(v for v in st.values() if isinstance(v, torch.Tensor))])
        if reason is not None:  # data_ptr() of a wrapper subclass is 0
            _fail(f"param {i}: {reason}")
        if p.device != device or p.dtype not in ns.SUPPORTED_DTYPES or not p.is_contiguous():
            _fail(f"param {i} (shape {tuple(p.shape)}, {p.dtype}, {p.device}) must be a contiguous "
                  f"fp32/bf16 tensor on {device}")
        for role, t in [("gradient", g)] + [(k, st[k]) for k in _STATE_KEYS]:
            quantized = role != "gradient" and (t.dtype == torch.uint8 or lean.is_quantized(st, role))
            if quantized:
                scales = st.get(role + lean.ABSMAX)
                blocks = lean.blocks_of(t.numel())
                if t.dtype != torch.uint8 or scales is None or scales.dtype != torch.float32 or \
                        scales.shape != (blocks,) or not scales.is_contiguous() or scales.device != device:
                    _fail(f"{role} {i}: an 8-bit state (state_bits=8) is uint8 codes with contiguous float32 "
                          f"block scales of shape ({blocks},) on {device}")
            if t.shape != p.shape:
                _fail(f"{role} {i} has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
            if t.device != device:
                _fail(f"{role} {i} is on {t.device}, the first parameter on {device}")
            if t.dtype not in ns.SUPPORTED_DTYPES and not quantized:
                _fail(f"{role} {i} has dtype {t.dtype}; supported: float32, bfloat16")
            if not t.is_contiguous():
                _fail(f"{role} {i} (shape {tuple(t.shape)}) is not contiguous")
        c = st.get(storage.COMPENSATION)
        if kahan and storage.compensates(p) and (c is None or c.dtype != p.dtype or c.shape != p.shape
                                                  or not c.is_contiguous() or c.device != p.device):
            # read and written at the param's offsets (a missing one would be address 0)
            _fail(f"{storage.COMPENSATION} {i} must be a contiguous {p.dtype} tensor of shape {tuple(p.shape)} on "
                  f"{p.device}, like its parameter (kahan_summation=True)")
        if is_matrix(p):
            for key in _MATRIX_KEYS:
                for t in st[key]:
                    if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
                        _fail(f"state {key!r} of tensor {i} must be contiguous float32 on {device}")


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _mm_tiles(interpret: bool) -> dict:
    # fp32 IEEE FMA path (no tensor cores): 64 x 64 x 32 with 4 warps is the Triton tutorial's
    # fp32-sized tile; untuned. Interpreter: 16 x 16 x 32, few ops per program.
    if interpret:
        return dict(bm=16, bn=16, bk=32, warps=4, stages=1)
    return dict(bm=64, bn=64, bk=32, warps=4, stages=3)


def shampoo_triton(params, grads, states, mults, hp, *, precondition=None) -> None:
    """The functional Shampoo step of the "triton" backend (signature of shampoo_reference)."""
    shampoo_triton_prepare(params, grads, states, mults, hp, precondition=precondition)()


def shampoo_triton_prepare(params, grads, states, mults, hp, *, precondition=None) -> Callable[[], None]:
    """Phase 1 (statistics, roots; may raise, writes nothing); returns phase 2, which writes, as
    mupopt.optim.shampoo.shampoo_reference_prepare. ``precondition`` (sharded matrices): as
    there; the owners' block math is the hook's (torch), the elementwise update of the covered
    shards this backend's update kernel, with the hook's directions as their D."""
    if not params:
        return lambda: None
    _check(params, grads, states, hp.kahan_summation)
    build()
    from . import _common

    interpret = _common.INTERPRET
    device = params[0].device
    t_all = [int(s) + 1 for s in _common.read_steps(states).tolist()]
    decay, gain = (1.0, 1.0) if hp.beta2 == 1.0 else (hp.beta2, 1.0 - hp.beta2)
    start = hp.start_preconditioning_step

    # ---- Phase 1: new statistics and the due roots; nothing of params or state is written ----
    plans = []
    covered = set(precondition.covered) if precondition is not None else set()
    # size -> [(tensor, side, block, y address, row stride, k stride, K, old statistic, g is bf16)]
    jobs: dict[int, list[tuple]] = {}
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        t = t_all[i]
        plan = {"matrix": is_matrix(p) and i not in covered, "refresh": False, "precondition": False,
                "given": i in covered and t >= start}
        if plan["matrix"]:
            rows, cols = p.shape[0], p.numel() // p.shape[0]
            blocks = blocks_of(rows, cols, hp.max_preconditioner_dim)
            plan.update(cols=cols, blocks=blocks)
            plan["refresh"] = t >= start and (t - start) % hp.precondition_frequency == 0
            plan["precondition"] = t >= start
            es = g.element_size()
            for k, (rs, cs) in enumerate(blocks):
                r, c = rs.stop - rs.start, cs.stop - cs.start
                addr = g.data_ptr() + (rs.start * cols + cs.start) * es
                # left: Y = G_b (r x c); right: Y = G_b^T (c x r), the same memory, strides swapped
                for side, n, sr, sk, K, old in (("left", r, cols, 1, c, st["left"][k]), ("right", c, 1, cols, r, st["right"][k])):
                    lst = jobs.setdefault(n, [])
                    lst.append((i, side, k, addr, sr, sk, K, old, g.dtype == torch.bfloat16))
        plans.append(plan)

    finish = None
    if covered:
        # The hook exchanges data with every rank: called before anything below can raise.
        g32 = {i: grads[i].float() for i in covered}
        adams = {}
        for i in covered:  # the Adam direction, as the update kernel forms it (the graft's block norms)
            v = lean.decoded(states[i], "exp_avg_sq", lean.UNSIGNED).float()  # any state format
            v = v * hp.grafting_beta2 + (1.0 - hp.grafting_beta2) * g32[i] * g32[i]
            adams[i] = g32[i] / ((v / (1 - hp.grafting_beta2 ** t_all[i])).sqrt() + hp.grafting_epsilon)
        finish = precondition.prepare(g32, adams, {i: t_all[i] for i in covered}, {i: states[i] for i in covered}, hp)

    stacks: dict[int, torch.Tensor] = {}
    for n, lst in jobs.items():
        stack = torch.empty((len(lst), n, n), dtype=torch.float32, device=device)
        stacks[n] = stack
        for g_bf16 in (False, True):
            sel = [(j, job) for j, job in enumerate(lst) if job[8] == g_bf16]
            if not sel:
                continue
            table = torch.tensor([[job[3], job[4], job[5], job[6], job[7].data_ptr(), j] for j, job in sel], dtype=torch.int64)
            t_blk = 16 if (interpret and n <= 16) else 32 if (interpret or n <= 32) else 64
            tiles = -(-n // t_blk)
            with ns._device_guard(params[0]):
                _common.launch(
                    _shampoo_stats_kernel, (tiles * (tiles + 1) // 2, len(sel)),
                    _upload(table, device), stack, ns.lower_tiles(tiles, device), n, float(decay), float(gain),
                    G_BF16=g_bf16, ROW=_STATS_ROW, BLOCK=t_blk, BLOCK_K=32, num_warps=4,
                    num_stages=1 if interpret else 3,
                )

    # The functions the reference calls, looked up where it looks them up (one definition of the
    # roots, and a test that patches the reference's root patches this backend too).
    root_fn = _reference.inverse_root_eigh if hp.root_method == "eigh" else _reference.inverse_root_newton
    roots: dict[int, tuple[list[int], torch.Tensor]] = {}
    for n, lst in jobs.items():
        due = [j for j, job in enumerate(lst) if plans[job[0]]["refresh"]]
        if not due:
            continue
        S = stacks[n] if len(due) == len(lst) else stacks[n][torch.tensor(due, device=device)]
        # May raise RootComputationError: nothing has been written yet.
        roots[n] = (due, root_fn(S, ROOT, eps=hp.epsilon, relative_eps=hp.relative_epsilon))

    def commit() -> None:
        # ---- Phase 2: commit state, precondition, graft, momentum, decay, update ----
        directions = finish() if finish is not None else {}  # {i: this rank's piece of D, fp32}
        _common.increment_steps(states)
        for n, lst in jobs.items():
            _foreach_copy([job[7] for job in lst], list(stacks[n].unbind(0)))
            if n in roots:
                due, R = roots[n]
                dst = [states[lst[j][0]][f"{lst[j][1]}_root"][lst[j][2]] for j in due]
                _foreach_copy(dst, list(R.unbind(0)))

        # Preconditioned blocks (entries 0 .. n_pre-1), then whole tensors taking the Adam direction.
        entries = []  # (tensor, base offset, block rows, block cols, tensor cols, D slot or None, Lr, Rr, g block addr)
        scratch = 0
        for i, plan in enumerate(plans):
            if plan["precondition"]:
                st = states[i]
                cols = plan["cols"]
                es = grads[i].element_size()
                for k, (rs, cs) in enumerate(plan["blocks"]):
                    r, c = rs.stop - rs.start, cs.stop - cs.start
                    base = rs.start * cols + cs.start
                    entries.append((i, base, r, c, cols, scratch, st["left_root"][k], st["right_root"][k],
                                    grads[i].data_ptr() + base * es))
                    scratch += r * c
        n_pre = len(entries)
        # Then the covered shards whose D the hook returned (one entry per tensor, scale 1), then
        # whole tensors taking the Adam direction.
        given = {}
        for i, plan in enumerate(plans):
            if plan["given"]:
                numel = params[i].numel()
                given[len(entries)] = directions[i]
                entries.append((i, 0, 1, numel, numel, None, None, None, None))
        for i, plan in enumerate(plans):
            if not plan["precondition"] and not plan["given"]:
                numel = params[i].numel()
                entries.append((i, 0, 1, numel, numel, None, None, None, None))
        # Preconditioned tensors with format-8 states: their update runs over the whole tensor
        # (a format-8 store needs whole 256-element blocks of the flattened tensor, which the
        # preconditioner's blocks cut across), with the graft-scaled D assembled in the tensor's
        # layout (whole[i], scale 1); their block entries above serve the matmuls and norms only.
        whole: dict[int, torch.Tensor] = {}
        for i, plan in enumerate(plans):
            if plan["precondition"] and lean.is_quantized(states[i], "momentum_buffer"):
                whole[i] = torch.empty(params[i].numel(), dtype=torch.float32, device=device)
                whole_entry = len(entries)
                entries.append((i, 0, 1, params[i].numel(), params[i].numel(), None, None, None, None))
                given[whole_entry] = whole[i]

        H = torch.empty(scratch, dtype=torch.float32, device=device)
        D = torch.empty(scratch, dtype=torch.float32, device=device)
        scale = torch.ones(len(entries), dtype=torch.float32, device=device)
        graft = hp.grafting == "adam"
        cfg = _mm_tiles(interpret)
        lut = _common.lut(device)

        # Update table (also read by the graft-norm kernel), one row per entry.
        rows_i64, rows_f32 = [], []
        for e, (i, base, r, c, ld, slot, _, _, _) in enumerate(entries):
            st, t, m = states[i], t_all[i], mults[i]
            d_addr = given[e].data_ptr() if e in given else 0 if slot is None else D.data_ptr() + 4 * slot
            scales = [st[k + lean.ABSMAX].data_ptr() if lean.is_quantized(st, k) else 0 for k in _STATE_KEYS]
            comp = st.get(storage.COMPENSATION) if hp.kahan_summation else None
            rows_i64.append([
                params[i].data_ptr(), grads[i].data_ptr(), st["momentum_buffer"].data_ptr(), st["exp_avg_sq"].data_ptr(),
                d_addr, base, max(c, 1), ld, r * c, *scales, 0 if comp is None else comp.data_ptr(), 0, 0,
            ])
            # formed in float64 as the reference forms them, rounded once to fp32
            rows_f32.append([
                1 - hp.lr * hp.weight_decay * m.wd,
                -hp.lr * m.lr / (1 - hp.beta1**t) if hp.beta1 > 0 else -hp.lr * m.lr,
                1 - hp.grafting_beta2**t,
                0.0,
            ])
        table = torch.tensor(rows_i64, dtype=torch.int64).reshape(len(entries), _UP_ROW)
        f32 = torch.tensor(rows_f32, dtype=torch.float32).reshape(len(entries), 4)
        if hp.stochastic_rounding:  # the key's bits in the fourth fp32 slot (mupopt/storage.py)
            keys = [int(storage.step_key(states[i].get("sr_seed", 0), states[i]["step"])) for (i, *_r) in entries]
            f32.view(torch.int32)[:, 3] = torch.tensor([(k ^ 0x80000000) - 0x80000000 for k in keys], dtype=torch.int32)
        table[:, 12:] = f32.view(torch.int64)
        table_d = _upload(table, device)
        counts = [-(-(r * c) // BLOCK) for (_, _, r, c, *_rest) in entries]

        def dtype_key(e: int, roles: tuple[str, ...]) -> tuple[int, ...]:
            """The storage codes (_common.storage_kind; format 8: _common.Q8_*) of ``roles``."""
            i = entries[e][0]
            tensors = {"p": params[i], "g": grads[i], "m": states[i]["momentum_buffer"], "v": states[i]["exp_avg_sq"]}
            signs = {"m": lean.SIGNED, "v": lean.UNSIGNED}
            return tuple(_common._kind_of(tensors[role], signs.get(role)) for role in roles)

        with ns._device_guard(params[0]):
            if n_pre:
                # H = Lr G_b (one launch per gradient dtype), then D = H Rr with the D^2 partials.
                max_tiles = max(-(-r // cfg["bm"]) * -(-c // cfg["bn"]) for (_, _, r, c, *_rest) in entries[:n_pre])
                part_d = torch.zeros(n_pre, max_tiles, dtype=torch.float32, device=device)
                for (g_bf16,), ids in _group(range(n_pre), lambda e: dtype_key(e, ("g",))).items():
                    mm1 = [[Lr.data_ptr(), r, gaddr, ld, H.data_ptr() + 4 * slot, c, r, c, r]
                           for (_, _, r, c, ld, slot, Lr, _, gaddr) in (entries[e] for e in ids)]
                    _common.launch(
                        _shampoo_matmul_kernel, (max_tiles, len(ids)),
                        _upload(torch.tensor(mm1, dtype=torch.int64), device), part_d, max_tiles,
                        B_BF16=g_bf16, SUMSQ=False, ROW=_MM_ROW, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_K=cfg["bk"],
                        num_warps=cfg["warps"], num_stages=cfg["stages"],
                    )
                mm2 = [[H.data_ptr() + 4 * slot, c, Rr.data_ptr(), c, D.data_ptr() + 4 * slot, c, r, c, c]
                       for (_, _, r, c, _, slot, _, Rr, _) in entries[:n_pre]]
                _common.launch(
                    _shampoo_matmul_kernel, (max_tiles, n_pre),
                    _upload(torch.tensor(mm2, dtype=torch.int64), device), part_d, max_tiles,
                    B_BF16=False, SUMSQ=graft, ROW=_MM_ROW, BLOCK_M=cfg["bm"], BLOCK_N=cfg["bn"], BLOCK_K=cfg["bk"],
                    num_warps=cfg["warps"], num_stages=cfg["stages"],
                )
                if graft:
                    max_chunks = max(counts[:n_pre])
                    part_a = torch.zeros(n_pre, max_chunks, dtype=torch.float32, device=device)
                    for (g_bf16, v_bf16), ids in _group(range(n_pre), lambda e: dtype_key(e, ("g", "v"))).items():
                        chunks = _upload(_chunk_table(ids, counts), device)
                        _common.launch(
                            _shampoo_graft_norm_kernel, (chunks.shape[0],), table_d, table_d.view(torch.float32), chunks,
                            part_a, max_chunks, lut, hp.grafting_beta2, 1.0 - hp.grafting_beta2, hp.grafting_epsilon,
                            G_BF16=g_bf16, V_BF16=v_bf16, ROW=_UP_ROW, BLOCK=BLOCK, num_warps=NUM_WARPS,
                        )
                    d_norm = part_d.sum(1).sqrt()
                    a_norm = part_a.sum(1).sqrt()
                    scale[:n_pre] = torch.where(d_norm > 0, a_norm / d_norm, torch.zeros_like(d_norm))

            for i, buf in whole.items():  # D * graft scale, per block, in the tensor's layout
                view = buf.view(params[i].shape[0], -1)
                for e, (j, base, r, c, ld, slot, *_rest) in enumerate(entries[:n_pre]):
                    if j == i:
                        rows = slice(base // ld, base // ld + r)
                        view[rows, base % ld:base % ld + c] = D[slot:slot + r * c].view(r, c) * scale[e]
            live = [e for e in range(len(entries)) if counts[e] > 0
                    and not (e < n_pre and entries[e][0] in whole)]
            for (p16, g16, m16, v16), ids in _group(live, lambda e: dtype_key(e, ("p", "g", "m", "v"))).items():
                chunks = _upload(_chunk_table(ids, counts), device)
                _common.launch(
                    _shampoo_update_kernel, (chunks.shape[0],), table_d, table_d.view(torch.float32), chunks, scale,
                    lut, hp.grafting_beta2, 1.0 - hp.grafting_beta2, hp.grafting_epsilon, hp.beta1, 1.0 - hp.beta1,
                    P_BF16=_common.param_kind(int(p16), hp.stochastic_rounding, hp.kahan_summation), G_BF16=g16,
                    M_BF16=m16, V_BF16=v16,
                    ROW=_UP_ROW, BLOCK=BLOCK, num_warps=NUM_WARPS,
                )

    return commit


def _group(ids, key) -> dict:
    out: dict = {}
    for e in ids:
        out.setdefault(key(e), []).append(e)
    return out


def _chunk_table(ids: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
    """int32 [C, 2]: (entry, chunk within the entry) for every chunk of the entries ``ids``."""
    ids_t = torch.tensor(list(ids), dtype=torch.long)
    n = torch.tensor([counts[e] for e in ids], dtype=torch.long)
    first = torch.cumsum(n, 0) - n
    entry = torch.repeat_interleave(ids_t, n)
    local = torch.arange(int(n.sum())) - torch.repeat_interleave(first, n)
    return torch.stack([entry, local], 1).to(torch.int32)


def _foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if not dst:
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """As the package's: CUDA tensors (or CPU under TRITON_INTERPRET=1), fp32/bf16, contiguous."""
    from . import MATRIX_DTYPES, unsupported_reason as common_reason

    return common_reason(tensors, MATRIX_DTYPES)


def register() -> None:
    """Register backend "triton" for the registry name "shampoo" (idempotent)."""
    if "triton" not in backends.names("shampoo"):
        backends.register(backends.Backend("shampoo", "triton", shampoo_triton, priority=PRIORITY,
                                           unsupported_reason=unsupported_reason, prepare=shampoo_triton_prepare,
                                           devices=("cuda",), validates=True, state_bits=lean.STATE_BITS,
                                           # the update kernel's param codes 7 and 8 (_common)
                                           kahan_summation=True))
