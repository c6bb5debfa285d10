"""The width families of ``mupopt coord-check`` and ``mupopt transfer``: an MLP and a small
GPT-style character transformer, each built in standard parameterization (SP) or in muP.

What differs between the two parameterizations (Yang et al., *Tensor Programs V*, arXiv
2203.03466, Table 3, in the "multiplier form" of mupopt, i.e. the base model is SP itself):

=====================  ===============================  ====================================
                       SP                               muP (``set_base_shapes`` + ``init_mup_``)
=====================  ===============================  ====================================
input weights          N(0, std_base^2)                 N(0, std_base^2)
hidden weights         std_base / sqrt(m_in)            std_base / sqrt(m_in)
readout weights        std_base / sqrt(m_in)            std_base / m_in (or zero)
attention logits       q.k / sqrt(d_head)               q.k * sqrt(d_head_base) / d_head
learning rates         one lr for every tensor          per-tensor multipliers inside step()
=====================  ===============================  ====================================

with ``m_in = fan_in / base fan_in``. SP here means "variance 1/fan_in" scaling of every matrix
but the embeddings (what PyTorch's and most codebases' defaults amount to), with the constants
chosen so that the SP and muP models coincide exactly at the base width: a learning rate tuned
there means the same in both, and only the scaling *with width* differs.

Attention scaling (Tensor Programs V, section 4 / appendix on attention): after training, q and k
are correlated, so q.k grows like d_head (law of large numbers), not like sqrt(d_head) (central
limit, which holds only at initialisation for independent q and k). Dividing by sqrt(d_head)
therefore leaves trained attention logits growing like sqrt(d_head) under muP's width-stable
updates; muP divides by d_head. Multiplying by sqrt(d_head_base) makes the two scalings agree at
the base width. The number of heads is fixed, so d_head = width / n_head grows with width and the
difference between the two scalings is visible in a width sweep.

The readout is a plain ``nn.Linear``: muP's readout rule lives in the optimizer (lr multiplier
1/m_in for AdamW-like optimizers) and in the init (``init_mup_``: std_base / m_in, or zero),
never in a forward multiplier. The learned positional embedding is a bare ``nn.Parameter`` of the
top module (shape (block_size, width)), which no module type identifies: it is declared an
``input`` tensor through ``set_base_shapes(..., overrides=...)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..mup import clear_base_shapes, init_mup_, set_base_depth, set_base_shapes, width_info

PARAMETERIZATIONS = ("sp", "mup")
MODELS = ("gpt", "mlp")
# --param-dtype: the dtype of every parameter, hence of the forward and backward (pure-bf16
# training: no float32 master copy; the optimizer steps the bf16 params themselves).
PARAM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "tinyshakespeare.txt"


# ---------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """(batch, d_in) -> (batch, d_out): ``input`` -> ReLU -> (``hidden.i`` -> ReLU) x depth -> ``readout``."""

    def __init__(self, width: int, d_in: int = 32, d_out: int = 10, depth: int = 2):
        super().__init__()
        self.width = width
        self.input = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.readout = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.input(x))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.readout(h)


class Attention(nn.Module):
    """Causal multi-head self-attention; ``logits`` is an identity module so that a forward hook
    sees the scaled attention logits (the quantity 1/d vs 1/sqrt(d) is about)."""

    def __init__(self, width: int, n_head: int, scale: float):
        super().__init__()
        if width % n_head:
            raise ValueError(f"width {width} is not a multiple of n_head {n_head}")
        self.n_head, self.scale = n_head, scale
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.logits = nn.Identity()
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, w // self.n_head).permute(2, 0, 3, 1, 4)
        att = self.logits((q @ k.transpose(-2, -1)) * self.scale)
        mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, w)
        return self.proj(y)


class FeedForward(nn.Module):
    def __init__(self, width: int, ffn_mult: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, ffn_mult * width, bias=False)
        self.proj = nn.Linear(ffn_mult * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + r * attn(ln1(x)), then x + r * mlp(ln2(x)); ``residual`` r
    is 1 but under a depth rule (the multiplier set_base_depth returns, (base_depth/depth)^alpha)."""

    def __init__(self, width: int, n_head: int, attn_scale: float, ffn_mult: int = 4):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, n_head, attn_scale)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, ffn_mult)
        self.residual = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.residual * self.attn(self.ln1(x))
        return x + self.residual * self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """Token ids (batch, seq <= block_size) -> logits (batch, seq, vocab).

    ``tok`` (nn.Embedding, input role), ``pos`` (a bare Parameter, declared input), ``blocks``
    (pre-LN), ``ln_f``, ``readout`` (nn.Linear without bias, output role, untied).
    """

    def __init__(self, width: int, vocab: int, block_size: int, depth: int = 2, n_head: int = 4,
                 attn_scale: float | None = None, ffn_mult: int = 4):
        super().__init__()
        self.width, self.block_size = width, block_size
        scale = attn_scale if attn_scale is not None else 1.0 / math.sqrt(width // n_head)
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(block_size, width))
        self.blocks = nn.ModuleList(Block(width, n_head, scale, ffn_mult) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.readout = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        if s > self.block_size:
            raise ValueError(f"sequence length {s} > block_size {self.block_size}")
        x = self.tok(ids) + self.pos[:s]
        for block in self.blocks:
            x = block(x)
        return self.readout(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# Building a member of a width family in SP or muP
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    """Everything but the width. ``base_width``: the width where SP and muP coincide."""

    kind: str = "gpt"
    base_width: int = 32
    depth: int = 2
    n_head: int = 4
    ffn_mult: int = 4
    vocab: int = 65
    block_size: int = 64
    d_in: int = 32
    d_out: int = 10
    std_base: float | None = None  # None: 0.02 for the GPT, 1/sqrt(base_width) for the MLP
    zero_readout: bool = False
    # Depth rule (GPT only): None = standard (residual multiplier 1, no depth information);
    # else alpha of mupopt.set_base_depth against base_depth blocks (1 CompleteP, 0.5 depth-muP).
    alpha: float | None = None
    base_depth: int = 2

    def std(self) -> float:
        if self.std_base is not None:
            return self.std_base
        return 0.02 if self.kind == "gpt" else 1.0 / math.sqrt(self.base_width)


def attention_scale(width: int, n_head: int, param: str, base_width: int) -> float:
    """SP: 1/sqrt(d_head). muP: sqrt(d_head_base)/d_head (= SP at the base width)."""
    d, d0 = width // n_head, base_width // n_head
    return 1.0 / math.sqrt(d) if param == "sp" else math.sqrt(d0) / d


def _construct(cfg: ModelConfig, width: int, param: str) -> nn.Module:
    if cfg.kind == "mlp":
        return MLP(width, cfg.d_in, cfg.d_out, cfg.depth)
    if cfg.kind == "gpt":
        return CharGPT(width, cfg.vocab, cfg.block_size, cfg.depth, cfg.n_head,
                       attention_scale(width, cfg.n_head, param, cfg.base_width), cfg.ffn_mult)
    raise ValueError(f"unknown model kind {cfg.kind!r}; expected one of {MODELS}")


def _overrides(cfg: ModelConfig, width: int) -> dict:
    # pos is (block_size, width), a bare Parameter: no module type tells its role.
    return {"pos": "input"} if cfg.kind == "gpt" else {}


def set_widths(model: nn.Module, cfg: ModelConfig, width: int, param: str = "mup") -> None:
    """set_base_shapes against a meta-device base model at ``cfg.base_width`` (and a delta model
    at twice that, so that the base width itself is recognised)."""
    with torch.device("meta"):
        base = _construct(cfg, cfg.base_width, param)
        delta = _construct(cfg, 2 * cfg.base_width, param)
    set_base_shapes(model, base, delta=delta, overrides=_overrides(cfg, width))


@torch.no_grad()
def init_sp_(model: nn.Module, std_base: float, *, generator: torch.Generator | None = None) -> nn.Module:
    """SP init by role (needs width info): input std_base, hidden and readout std_base/sqrt(m_in)."""
    for name, p in model.named_parameters():
        info = width_info(p)
        if info is None or info.role == "vector":
            continue
        std = std_base if info.role == "input" else std_base / math.sqrt(info.m_in)
        p.normal_(0.0, std, generator=generator)
    return model


def build_model(cfg: ModelConfig, width: int, param: str = "mup", seed: int = 0,
                device: str | torch.device = "cpu", param_dtype: str = "fp32") -> nn.Module:
    """A member of the width family, initialised with ``seed``.

    ``param="mup"``: width information attached (the optimizer applies muP multipliers) and
    ``init_mup_``. ``param="sp"``: SP init and no width information (every multiplier 1).
    ``cfg.alpha`` set: also the depth rule (set_base_depth against ``cfg.base_depth`` blocks and
    the residual multiplier it returns in every block); init is depth-free either way.
    ``param_dtype`` ("fp32" or "bf16", :data:`PARAM_DTYPES`): the float32 init rounded to it, so
    that both start from the same weights up to that rounding.
    """
    if param not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {param!r}; expected one of {PARAMETERIZATIONS}")
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"unknown param_dtype {param_dtype!r}; expected one of {list(PARAM_DTYPES)}")
    model = _construct(cfg, width, param)
    set_widths(model, cfg, width, param)
    gen = torch.Generator().manual_seed(seed)
    if param == "mup":
        init_mup_(model, cfg.std(), zero_readout=cfg.zero_readout, generator=gen)
    else:
        init_sp_(model, cfg.std(), generator=gen)
        clear_base_shapes(model)
    if cfg.alpha is not None:
        if cfg.kind != "gpt":
            raise ValueError("a depth rule needs residual blocks: model kind 'gpt'")
        mult = set_base_depth(model, model.blocks, base_depth=cfg.base_depth, alpha=cfg.alpha)
        for block in model.blocks:
            block.residual = mult
    # Module.to keeps each Parameter object (it swaps .data), so the width information set_base_shapes
    # attached to it stays.
    return model.to(device=device, dtype=PARAM_DTYPES[param_dtype])


def layer_type(kind: str, module_name: str) -> str | None:
    """The layer type a recorded module belongs to (None: not recorded).

    gpt: input (token embedding), attn_qkv, attn_logits, attn_out, mlp_fc, mlp_out (hidden
    matrices), residual (block outputs), output (logits). mlp: input, hidden, output.
    """
    parts = module_name.split(".")
    if kind == "mlp":
        if module_name == "input":
            return "input"
        if parts[0] == "hidden" and len(parts) == 2:
            return "hidden"
        return "output" if module_name == "readout" else None
    if module_name == "tok":
        return "input"
    if module_name == "readout":
        return "output"
    if parts[0] == "blocks":
        if len(parts) == 2:
            return "residual"
        tail = ".".join(parts[2:])
        return {"attn.qkv": "attn_qkv", "attn.logits": "attn_logits", "attn.proj": "attn_out",
                "mlp.fc": "mlp_fc", "mlp.proj": "mlp_out"}.get(tail)
    return None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
@dataclass
class CharData:
    """A character corpus encoded to ids; ``split`` 90/10 into train and validation."""

    text: str
    chars: list[str] = field(init=False)
    train: torch.Tensor = field(init=False)
    val: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.chars = sorted(set(self.text))
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in self.text], dtype=torch.long)
        n = int(0.9 * len(ids))
        self.train, self.val = ids[:n], ids[n:]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch: int, seq: int, generator: torch.Generator,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        start = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        x = torch.stack([data[i:i + seq] for i in start.tolist()])
        y = torch.stack([data[i + 1:i + seq + 1] for i in start.tolist()])
        return x.to(device), y.to(device)


def load_corpus(path: str | Path | None = None) -> CharData:
    """The shipped corpus (data/tinyshakespeare.txt) or any UTF-8 text file."""
    path = Path(path) if path else CORPUS
    return CharData(path.read_text(encoding="utf-8"))


def config_for(kind: str, data: CharData | None = None, **overrides) -> ModelConfig:
    cfg = ModelConfig(kind=kind, **overrides)
    if kind == "gpt" and data is not None:
        cfg = replace(cfg, vocab=data.vocab)
    return cfg
