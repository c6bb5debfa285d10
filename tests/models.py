"""Small model families for the muP tests (CPU, a few ms per forward).

TinyGPT is transformer-like: token embedding (input role), a positional embedding held directly
by the top module as a bare nn.Parameter (an "unknown module" parameter: its role is ambiguous and
needs an override, e.g. ``overrides={"pos": "input"}``), per block LayerNorm + attention
projections + MLP (hidden), a final LayerNorm and a readout (output role), optionally tied to the
token embedding. MLP is a plain d_in -> width -> width -> d_out network. The ``Mu*`` variants use
Microsoft's ``mup.MuReadout`` as the readout (for comparisons against ``mup.MuAdamW``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_SEQ = 16


class Block(nn.Module):
    """Pre-norm block: causal single-head attention (qkv, proj) and an MLP (mlp_in, mlp_out)."""

    def __init__(self, width: int, ffn_mult: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, ffn_mult * width)
        self.mlp_out = nn.Linear(ffn_mult * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        # muP attention scaling 1/d (not 1/sqrt(d)); irrelevant for the optimizer tests.
        att = (q @ k.transpose(-2, -1)) / q.shape[-1]
        seq = x.shape[1]
        mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        x = x + self.proj(att @ v)
        return x + self.mlp_out(F.gelu(self.mlp_in(self.ln2(x))))


class TinyGPT(nn.Module):
    """Token ids (batch, seq <= 16) -> logits (batch, seq, vocab)."""

    def __init__(self, width: int, vocab: int = 37, n_layer: int = 2, ffn_mult: int = 4, tie: bool = False):
        super().__init__()
        self.width, self.vocab = width, vocab
        self.tok = nn.Embedding(vocab, width)
        # A bare parameter of the top module: no module type tells its role.
        self.pos = nn.Parameter(torch.randn(MAX_SEQ, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, ffn_mult) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(width)
        self.readout = self._make_readout(width, vocab)
        if tie:
            self.readout.weight = self.tok.weight

    def _make_readout(self, width: int, vocab: int) -> nn.Linear:
        return nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        if seq > MAX_SEQ:
            raise ValueError(f"sequence length {seq} > {MAX_SEQ}")
        x = self.tok(ids) + self.pos[:seq]
        for block in self.blocks:
            x = block(x)
        return self.readout(self.ln_f(x))


class MLP(nn.Module):
    """(batch, d_in) -> (batch, d_out): input layer, one hidden layer, readout."""

    def __init__(self, width: int, d_in: int = 10, d_out: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, width)
        self.readout = self._make_readout(width, d_out)

    def _make_readout(self, width: int, d_out: int) -> nn.Linear:
        return nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.relu(self.hidden(torch.relu(self.inp(x)))))


def _mu_readout(width: int, d_out: int, bias: bool = True) -> nn.Linear:
    from mup import MuReadout  # test extra; callers importorskip("mup") first

    return MuReadout(width, d_out, bias=bias)


class MuMLP(MLP):
    """MLP whose readout is Microsoft's mup.MuReadout (forward divided by its width_mult)."""

    def _make_readout(self, width: int, d_out: int) -> nn.Linear:
        return _mu_readout(width, d_out)


class MuTinyGPT(TinyGPT):
    """TinyGPT whose readout is Microsoft's mup.MuReadout (untied only)."""

    def _make_readout(self, width: int, vocab: int) -> nn.Linear:
        return _mu_readout(width, vocab, bias=False)


def token_batch(batch: int = 4, seq: int = 8, vocab: int = 37, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=gen)


def fill_grads(params, step: int, seed: int = 0) -> None:
    """Deterministic gradients for ``params`` (a list) at ``step``, independent of any forward."""
    gen = torch.Generator().manual_seed(10_000 * seed + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def tensor_state(st: dict) -> dict:
    """An optimizer state without mupopt's width record (``"mup"``: a dict of numbers,
    mupopt.mup.width_record): the tensors the update keeps."""
    return {k: v for k, v in st.items() if k != "mup"}


def same_state_value(a, b) -> bool:
    """Two values of an optimizer state: tensors bit for bit, lists and dicts (Shampoo's blocks,
    the width record) element by element, anything else by ==."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_state_value, a, b))
    if isinstance(a, dict):  # Shampoo's blocks by block number; the width record's fields
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state_value(a[k], b[k]) for k in a)
    return a == b
