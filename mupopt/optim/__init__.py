"""The mupopt optimizers: torch.optim.Optimizer subclasses with per-tensor muP multipliers."""
from .adamw import AdamW, adamw_reference
from .adopt import ADOPT, adopt_reference
from .lamb import LAMB, lamb_reference
from .muon import Muon, muon_reference
from .shampoo import Shampoo, shampoo_reference
from .sophia import SophiaG, gnb_backward, sophia_hessian_reference, sophia_reference

__all__ = [
    "ADOPT",
    "AdamW",
    "LAMB",
    "Muon",
    "Shampoo",
    "SophiaG",
    "adamw_reference",
    "adopt_reference",
    "gnb_backward",
    "lamb_reference",
    "muon_reference",
    "shampoo_reference",
    "sophia_hessian_reference",
    "sophia_reference",
]
