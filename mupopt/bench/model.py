"""What a step must move or compute: the bytes model of the elementwise steps and the flop counts
of the matrix-bound parts (docs/benchmarks.md, "Reading the tables").

Elementwise optimizer steps are memory-bound: their floor is the bytes each element of every
operand must cross the memory bus, read or written, in the best known implementation. A time turns
into GB/s as ``bytes / time``; divided by the copy bandwidth measured in the same run it reads as
"% of what this memory can do" (good kernels reach 80-90%).

Counts per operand are (reads, writes) per element per step; the bytes of one tensor are
``(reads + writes) * numel * element_size`` of the tensor that holds that operand, so every dtype
combination (fp32 params with bf16 states, all bf16, ...) is counted from the tensors themselves.
With fp32 everywhere this gives AdamW/ADOPT 28, Sophia step 24,
Sophia Hessian EMA 12, LAMB 40 bytes per parameter.

Matrix-bound parts (Muon's Newton-Schulz, Shampoo's inverse roots) are counted in flops from the
explicit formulas below and reported in TFLOP/s against a matmul measured in the same run.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

# The passes of each elementwise step over its operands, in order: (operands read, operands
# written) per element. "param" is p, "grad" is p.grad, other keys are the optimizer's state keys
# (the same names torch.optim uses, so torch peers count the same). The bytes model (TRAFFIC) counts
# them; the CPU's no-math bound (measure.traffic_bound) replays them.
PASSES: dict[str, tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]] = {
    # read p g m v, write p m v: 7 x 4 = 28 B in fp32.
    "adamw": ((("param", "grad", "exp_avg", "exp_avg_sq"), ("param", "exp_avg", "exp_avg_sq")),),
    "adopt": ((("param", "grad", "exp_avg", "exp_avg_sq"), ("param", "exp_avg", "exp_avg_sq")),),
    # LAMB needs the norms of p and of the update before it can write p. Best known: pass 1 reads
    # p g m v and writes m v (and the per-tensor norm partials); pass 2 re-reads p m v, recomputes
    # the update and writes p: 10 x 4 = 40 B, i.e. a floor of 40/28 = 1.43x AdamW's time.
    "lamb": ((("param", "grad", "exp_avg", "exp_avg_sq"), ("exp_avg", "exp_avg_sq")),
             (("param", "exp_avg", "exp_avg_sq"), ("param",))),
    # read p g m h, write p m: 24 B.
    "sophia": ((("param", "grad", "exp_avg", "hessian"), ("param", "exp_avg")),),
    # read g h, write h: 12 B.
    "sophia_hessian": ((("grad", "hessian"), ("hessian",)),),
}


def operands(optimizer: str) -> list[str]:
    """The operands of ``optimizer``'s passes in order of first appearance."""
    return list(dict.fromkeys(name for reads, writes in PASSES[optimizer] for name in reads + writes))


# Operand -> (reads, writes) per element per step, from PASSES.
TRAFFIC: dict[str, dict[str, tuple[int, int]]] = {
    opt: {name: (sum(name in r for r, _ in passes), sum(name in w for _, w in passes)) for name in operands(opt)}
    for opt, passes in PASSES.items()
}

ELEMENTWISE = tuple(TRAFFIC)


def bytes_per_element(optimizer: str, itemsize: Mapping[str, int]) -> int:
    """Bytes per element for operand element sizes ``itemsize`` (e.g. all 4 -> 28 for AdamW)."""
    return sum((r + w) * itemsize[name] for name, (r, w) in TRAFFIC[optimizer].items())


def step_bytes(optimizer: str, params: Sequence[torch.Tensor], states: Sequence[Mapping]) -> int:
    """Bytes one step of ``optimizer`` must move for these params, their ``.grad`` and ``states``
    (one state dict per param, keyed as the optimizer's state)."""
    total = 0
    for p, st in zip(params, states):
        for name, (r, w) in TRAFFIC[optimizer].items():
            t = p if name == "param" else p.grad if name == "grad" else st[name]
            total += (r + w) * t.numel() * t.element_size()
    return total


def copy_bytes(src: torch.Tensor) -> int:
    """A copy reads the source and writes the destination."""
    return 2 * src.numel() * src.element_size()


# --------------------------------------------------------------------------------------------
# Flops
# --------------------------------------------------------------------------------------------
def matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def ns_flops(shape: Sequence[int], steps: int = 5) -> int:
    """Newton-Schulz on one (rows, cols) matrix, ``steps`` iterations of mupopt.linalg's form,
    with m = min(rows, cols), n = max (the iteration runs on the wide orientation)::

        A = X X^T        2 m m n
        B = b A + c A A  2 m m m
        X = a X + B X    2 m m n         -> per step 4 m^2 n + 2 m^3

    The Frobenius normalisation (m n) is left out: < 0.1% at m >= 256. Checked against
    torch.utils.flop_counter in tests/test_bench_smoke.py."""
    rows, cols = shape[-2], shape[-1]
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)


def eigh_root_flops(n: int) -> int:
    """Inverse root of one n x n matrix through eigh: 9 n^3 for the symmetric eigendecomposition
    with eigenvectors (Golub & Van Loan, Matrix Computations, section 8.3, the symmetric QR
    algorithm: about 9 n^3 when Q is accumulated) plus 2 n^3 for Q diag(r) Q^T. A
    convention, not a measurement: LAPACK's divide and conquer (syevd) does fewer, so TFLOP/s of
    eigh-based roots compare methods on one scale rather than claiming hardware efficiency."""
    return 9 * n**3 + 2 * n**3


def counted_flops(fn: Callable[[], object]) -> int:
    """Matmul flops of one call of ``fn``, counted by torch's FlopCounterMode (for iterations
    whose length depends on the data, such as the coupled Newton root). Ops without a flop formula
    (eigh) count 0."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def muon_step_flops(shapes: Iterable[Sequence[int]], steps: int = 5) -> int:
    """Flops of a Muon step: Newton-Schulz on the 2-D view of every matrix (the elementwise
    momentum and update, 20 B/element, are < 1% of the time at these sizes and not counted)."""
    return sum(ns_flops((s[0], _prod(s[1:])), steps) for s in shapes)


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
