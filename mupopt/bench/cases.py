"""The benchmark cases of docs/benchmarks.md as shape lists, sized per device and mode.

A case is a list of parameter shapes. Its sizes depend on a *profile*: the full sizes on a GPU;
scaled-down ones on the CPU, where one AdamW step of a 1.24B-parameter list would move 35 GB
(about 4 s at the ~9 GB/s a copy reaches on a 2-core machine) and its fp32 tensors alone would not
fit in 23 GB of memory; and tiny ones for the smoke test. Scaled cases keep their tensor count and
layer structure (the launch-bound part of a step) and divide the widths; their name says so
(``gpt2-small/4``: every width / 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..mup import WIDTH_ATTR, WidthInfo

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Case:
    name: str
    shapes: tuple[Shape, ...]
    description: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)


# --------------------------------------------------------------------------------------------
# Model shape lists
# --------------------------------------------------------------------------------------------
def gpt2_shapes(d: int = 768, layers: int = 12, vocab: int = 50257, ctx: int = 1024) -> list[Shape]:
    """GPT-2 small (124M, 148 tensors at the defaults), nn.Linear layout (out, in), tied readout."""
    shapes: list[Shape] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,)]


def gpt2_hidden_shapes(d: int = 768, layers: int = 12) -> list[Shape]:
    """The 2-D hidden matrices of GPT-2 small (48 at the defaults): what Muon orthogonalises."""
    return [s for _ in range(layers) for s in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]


def llama_shapes(d: int = 2048, layers: int = 16, vocab: int = 128256, ffn: int = 8192, kv_ratio: int = 4) -> list[Shape]:
    """Llama-3.2-1B-like (1.24B, 146 tensors at the defaults): grouped-query attention with
    kv_dim = d / kv_ratio (32 query heads, 8 kv heads), SwiGLU MLP, RMSNorm gains, tied embedding."""
    kv = d // kv_ratio
    shapes: list[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


def llama_hidden_shapes(d: int = 2048, layers: int = 16, ffn: int = 8192, kv_ratio: int = 4) -> list[Shape]:
    kv = d // kv_ratio
    return [s for _ in range(layers) for s in ((d, d), (kv, d), (kv, d), (d, d), (ffn, d), (ffn, d), (d, ffn))]


def odd_shapes(max_numel: int, count: int = 40) -> list[Shape]:
    """Odd sizes from 1 to about ``max_numel``, log-spaced, every fifth one 2-D with odd sides:
    no size is a multiple of a vector width or block, so every tail path runs."""
    shapes: list[Shape] = []
    for k in range(count):
        n = max(1, int(round(max_numel ** (k / (count - 1))))) | 1
        if k % 5 == 4 and n > 9:
            rows = int(math.isqrt(n)) | 1
            shapes.append((rows, (n // rows) | 1))
        else:
            shapes.append((n,))
    return shapes


# --------------------------------------------------------------------------------------------
# Profiles: sizes per device and mode
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    name: str
    large: int  # elements of the one-tensor case
    gpt2_div: int  # widths of GPT-2 small divided by this
    gpt2_layers: int
    llama_div: int | None  # None: no Llama case
    llama_layers: int
    tiny: int  # tensors of 4096 elements
    odd_max: int
    ns_n: int  # Newton-Schulz square side
    roots_blocks: int
    roots_n: int
    shampoo_div: int  # Shampoo step on GPT-2 shapes with widths / this
    shampoo_layers: int
    shampoo_max_dim: int
    # Tensor counts of the overhead cases (tensors of OVERHEAD_NUMEL fp32 elements).
    overhead: tuple[int, ...] = (300, 1000)


# The overhead cases (issue 15): tensors so small that a step is all host work.
OVERHEAD_NUMEL = 64

PROFILES = {
    # 2^26 fp32 elements: 7 x 256 MiB of AdamW traffic, far above any L2 (H100: 50 MB).
    "gpu-full": Profile("gpu-full", 1 << 26, 1, 12, 1, 16, 1000, 1 << 24, 4096, 32, 1024, 1, 12, 1024),
    "gpu-quick": Profile("gpu-quick", 1 << 26, 1, 12, 1, 16, 1000, 1 << 24, 4096, 16, 1024, 1, 12, 1024),
    # 2^24 = 16M params: the CPU target of docs/benchmarks.md. Llama at width / 4 is 77M params
    # (1.2 GB for p, g, m, v in fp32): the full 1.24B list does not fit beside its checks here.
    "cpu-full": Profile("cpu-full", 1 << 24, 1, 12, 4, 16, 1000, 1 << 22, 1024, 16, 512, 4, 12, 512),
    # Sized so that the whole quick run takes a few minutes on 2 cores: the eager reference steps
    # of a list run 10-20 passes over memory (GPT-2/4, 7.8M params: 0.2-1.1 s per AdamW step on 2
    # shared cores, measured), so the lists are GPT-2/8 (2.0M params, 148 tensors) and Llama/16
    # (4.7M, 146 tensors); the one tensor is 2^22 (4M, 112 MB per fp32 AdamW step, 3.5x a 32 MB
    # L3). 1000 x 4096 stays: the launch-bound case is about the tensor count.
    # Shampoo and the roots use blocks of 128: a float32 eigh of 256 takes ~30 ms here, and a
    # Shampoo step on GPT-2/16 with blocks of 256 took 1 s (64 s of the first quick run).
    "cpu-quick": Profile("cpu-quick", 1 << 22, 8, 12, 16, 16, 1000, 1 << 20, 512, 8, 128, 16, 12, 128),
    # Seconds, not numbers: the smoke test of the machinery.
    "smoke": Profile("smoke", 1 << 12, 32, 2, None, 2, 50, 1 << 10, 64, 4, 32, 32, 2, 32, overhead=(20,)),
}


def profile_for(device: torch.device, mode: str) -> Profile:
    if mode == "smoke":
        return PROFILES["smoke"]
    return PROFILES[f"{'gpu' if device.type == 'cuda' else 'cpu'}-{mode}"]


def _tag(name: str, div: int) -> str:
    return name if div == 1 else f"{name}/{div}"


def _gpt2(prof: Profile, div: int, layers: int, hidden: bool = False) -> list[Shape]:
    d = 768 // div
    if hidden:
        return gpt2_hidden_shapes(d, layers)
    return gpt2_shapes(d, layers, max(1, 50257 // div), max(1, 1024 // div))


def elementwise_cases(prof: Profile) -> list[Case]:
    """The cases of the elementwise optimizers (AdamW, ADOPT, LAMB, SophiaG)."""
    cases = [
        Case("large", ((prof.large,),), f"one tensor of 2^{int(math.log2(prof.large))} elements"),
        Case(_tag("gpt2-small", prof.gpt2_div), tuple(_gpt2(prof, prof.gpt2_div, prof.gpt2_layers)),
             f"GPT-2 small parameter list, widths / {prof.gpt2_div}, {prof.gpt2_layers} layers"),
    ]
    if prof.llama_div is not None:
        div = prof.llama_div
        cases.append(Case(_tag("llama-1b", div), tuple(llama_shapes(2048 // div, prof.llama_layers, 128256 // div, 8192 // div)),
                          f"Llama-3.2-1B-like parameter list, widths / {div}"))
    cases += [
        Case(f"tiny-{prof.tiny}", tuple([(4096,)] * prof.tiny), f"{prof.tiny} tensors of 4096 elements (launch-bound)"),
        Case("odd-mixed", tuple(odd_shapes(prof.odd_max)), f"40 odd sizes from 1 to {prof.odd_max}, some 2-D"),
    ]
    return cases


def overhead_cases(prof: Profile) -> list[Case]:
    """Host time of a whole step(): N float32 tensors of 64 elements, where the arithmetic is
    negligible and the per-step Python and C++ work of the optimizer is what is measured."""
    return [Case(f"overhead-{n}", tuple([(OVERHEAD_NUMEL,)] * n), f"{n} tensors of {OVERHEAD_NUMEL} elements (host-bound)")
            for n in prof.overhead]


def muon_cases(prof: Profile) -> list[Case]:
    cases = [Case(_tag("gpt2-small", prof.gpt2_div), tuple(_gpt2(prof, prof.gpt2_div, prof.gpt2_layers, hidden=True)),
                  "hidden matrices of the GPT-2 small list")]
    if prof.name.startswith("gpu") and prof.llama_div is not None:
        cases.append(Case("llama-1b", tuple(llama_hidden_shapes()), "hidden matrices of the Llama-1B-like list"))
    return cases


def ns_cases(prof: Profile) -> list[Case]:
    """Newton-Schulz alone: one square matrix (the target case: min dim >= 2048 on a GPU) and a
    stack of 8 same-shape wide matrices (one batched call against a per-matrix loop)."""
    n = prof.ns_n
    return [
        Case(f"ns-{n}x{n}", ((n, n),), "one square matrix"),
        Case(f"ns-8x{n // 2}x{2 * n}", tuple([(n // 2, 2 * n)] * 8), "8 wide matrices of one shape"),
    ]


def roots_case(prof: Profile) -> Case:
    b, n = prof.roots_blocks, prof.roots_n
    return Case(f"roots-{b}x{n}", tuple([(n, n)] * b), f"{b} Shampoo statistics blocks of side {n}, inverse 4th roots")


def shampoo_case(prof: Profile) -> Case:
    div = prof.shampoo_div
    return Case(f"{_tag('gpt2-small', div)}:max{prof.shampoo_max_dim}", tuple(_gpt2(prof, div, prof.shampoo_layers)),
                f"GPT-2 small list, widths / {div}, blocks of side <= {prof.shampoo_max_dim}, roots every step")


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------
def make_params(shapes: Sequence[Shape], dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Leaf tensors with a ``.grad``. Params ~ N(0, 0.02^2) (the usual LLM init: large enough
    against the bf16 spacing, 1.2e-4 at 0.02, that an update of lr = 1e-3 is visible to the
    correctness checks); grads ~ N(0, 1) so the moments are never zero (never time zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.empty(shape, dtype=dtype, device=device)
        p.normal_(0.0, 0.02, generator=gen)
        p.grad = torch.empty_like(p).normal_(0.0, 1.0, generator=gen)
        params.append(p)
    return params


def clone_params(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Copies of params (of ``values`` when given: the params as they were before timed steps
    moved them) for a check; gradients are shared (no optimizer here writes them) and the muP
    width attribute travels with the copy."""
    out = []
    for i, p in enumerate(params):
        q = (p if values is None else values[i]).detach().clone()
        q.grad = p.grad
        info = getattr(p, WIDTH_ATTR, None)
        if info is not None:
            setattr(q, WIDTH_ATTR, info)
        out.append(q)
    return out


def set_mup_widths(params: Sequence[torch.Tensor], distinct: bool) -> None:
    """Attach muP width information. ``distinct``: every hidden tensor gets its own fan-in ratio
    m_in = 1 + i/7 (so its own lr multiplier 1/m_in) and every tensor its own m_out (its own eps
    multiplier with scale_eps): the worst case for a kernel that would launch once per distinct
    multiplier. Otherwise every ratio is 1 (all multipliers 1) on the same tensors and roles."""
    for i, p in enumerate(params):
        m_in, m_out = (1.0 + i / 7.0, 1.0 + i / 11.0) if distinct else (1.0, 1.0)
        if p.ndim < 2:
            info = WidthInfo("vector", 1.0, m_out)
        elif i < 2:
            info = WidthInfo("input", 1.0, m_out)  # embeddings come first in the GPT-2 list
        else:
            info = WidthInfo("hidden", m_in, m_out)
        setattr(p, WIDTH_ATTR, info)


def clear_mup_widths(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        if hasattr(p, WIDTH_ATTR):
            delattr(p, WIDTH_ATTR)


def roots_input(case: Case, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A stack of Shampoo-like statistics: G G^T / k with G (n, 2n) Gaussian, full rank (so the
    coupled Newton root, which needs positive definite input, converges)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, n = case.tensors, case.shapes[0][0]
    G = torch.randn(b, n, 2 * n, generator=gen, device=device)
    return G @ G.mT / (2 * n)
