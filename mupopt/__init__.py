"""mupopt: muP-scaled optimizers as drop-in torch.optim classes."""
from . import backends, mup
from ._vml import init_vml as _init_vml
from .mup import (
    BaseShapes,
    DepthInfo,
    MupError,
    MupWarning,
    WidthInfo,
    clear_base_depth,
    clear_base_shapes,
    depth_info,
    init_mup_,
    load_base_shapes,
    make_base_shapes,
    readout_multiplier_,
    readout_multipliers,
    restore_readout_multipliers,
    set_base_depth,
    set_base_shapes,
    summary,
    width_info,
)
from .kernels import cpp as _cpp_kernels
from .kernels import triton as _triton_kernels
from .optim._base import BackendFallbackWarning
from .optim import ADOPT, LAMB, AdamW, Muon, Shampoo, SophiaG, gnb_backward

__version__ = "0.1.0"

# Backends beyond the reference register themselves here; none compiles or imports its toolchain
# before the first step that uses it.
_triton_kernels.register()
_cpp_kernels.register()
# Before the user's first matmul: MKL's first vector-math call must not be a multi-threaded one
# after an sgemm (mupopt/_vml.py).
_init_vml()

__all__ = [
    "ADOPT",
    "BackendFallbackWarning",
    "AdamW",
    "LAMB",
    "Muon",
    "Shampoo",
    "SophiaG",
    "gnb_backward",
    "BaseShapes",
    "DepthInfo",
    "MupError",
    "MupWarning",
    "WidthInfo",
    "backends",
    "clear_base_depth",
    "clear_base_shapes",
    "depth_info",
    "init_mup_",
    "load_base_shapes",
    "make_base_shapes",
    "mup",
    "readout_multiplier_",
    "readout_multipliers",
    "restore_readout_multipliers",
    "set_base_depth",
    "set_base_shapes",
    "summary",
    "width_info",
]
