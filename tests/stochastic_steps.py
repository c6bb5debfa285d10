"""What the stochastic-rounding tests of every backend share: a few steps of an optimizer with
the option on, and the count of stored values that differ between two runs."""
from __future__ import annotations

import torch

# Three params: one longer than two CPU chunks of 32768 elements (and many Triton blocks), so the
# element index crosses chunk boundaries; one 2-D; one shorter than a vector.
SHAPES = [(70001,), (33, 17), (5,)]


def stepped(cls, kw: dict, backend: str, dtype: torch.dtype, shapes=SHAPES, steps: int = 3):
    """(params after ``steps`` steps with stochastic_rounding=True, the optimizer)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    opt = cls(ps, lr=1e-3, stochastic_rounding=True, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return [p.detach().clone() for p in ps], opt


def differing(a, b) -> int:
    """How many 16-bit values differ between the param lists ``a`` and ``b``."""
    return sum(int((x.view(torch.int16) != y.view(torch.int16)).sum()) for x, y in zip(a, b))
