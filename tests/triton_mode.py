"""The mode the Triton test modules define the kernels in, and the environment around it.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined: without CUDA the kernels must
be defined interpreted (they then take CPU tensors). The variable is set only while the kernels
are imported and while a Triton test runs; at any other time it is as the user left it, so that
collecting these modules does not switch other modules' ``backend="auto"`` to the (slow)
interpreter.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

VAR = "TRITON_INTERPRET"


@contextlib.contextmanager
def defining_kernels():
    """Around the imports that define the kernels: interpreted where there is no CUDA (unless the
    user's environment says otherwise), the environment restored afterwards."""
    before = os.environ.get(VAR)
    if not torch.cuda.is_available():
        os.environ.setdefault(VAR, "1")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VAR, None)
        else:
            os.environ[VAR] = before


def runs_on_cpu() -> bool:
    """Whether the "triton" backend steps CPU tensors here: triton installed, its kernels
    defined interpreted (no CUDA). Imports the kernels inside :func:`defining_kernels`."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return False
    with defining_kernels():
        from mupopt.kernels.triton import _common
    return bool(_common.INTERPRET)


def match_environment(monkeypatch, interpret: bool) -> None:
    """While a test runs, the environment agrees with the mode the kernels were defined in."""
    if interpret:
        monkeypatch.setenv(VAR, "1")
    else:
        monkeypatch.delenv(VAR, raising=False)


def devices(interpret: bool) -> list:
    """The devices a kernel test runs on: CPU tensors in the interpreter, CUDA tensors compiled
    (marked gpu)."""
    return [
        pytest.param("cpu", marks=pytest.mark.skipif(not interpret, reason="CPU tensors need TRITON_INTERPRET=1")),
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available() or interpret, reason="needs CUDA and compiled kernels"),
            ],
        ),
    ]


# What every compile_for_sm90 script runs first: compiled-mode kernels (no TRITON_INTERPRET), the
# checkout first on the path, and a launch hook that compiles each launch for sm_90 instead of
# running it (compile_sm90, also callable on a kernel directly) and records, per launch, the
# kernel, its constexprs, counts from its PTX (128-bit global loads / stores, v4; Hopper
# tensor-core MMAs, wgmma) and the integer types of its pointer offsets (TTIR tt.addptr).
_SM90_PREAMBLE = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from mupopt.kernels.triton import _common
assert not _common.INTERPRET
TYPES = {torch.int64: "*i64", torch.int32: "*i32", torch.float32: "*fp32", torch.float64: "*fp64",
         torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.uint8: "*u8"}
results = []

def compile_sm90(kernel, signature, constexprs, num_warps, num_stages=3):
    compiled = triton.compile(ASTSource(kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    results.append({"kernel": kernel.__name__, "constexprs": {k: str(v) for k, v in constexprs.items()},
                    "v4_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
                    "v4_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)),
                    "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
                    # tt.addptr %ptrs, %offsets : tensor<...x!tt.ptr<T>>, tensor<...xiNN>
                    "offset_types": sorted(set(re.findall(r"tt\.addptr [^\n]*: tensor<[^>]*!tt\.ptr<[^>]*>>, tensor<[0-9x]*(i\d+)>",
                                                          compiled.asm["ttir"])))})

def compile_hook(kernel, grid, args, meta):  # every integer argument as i32: Triton's type below 2^31
    values = dict(zip(kernel.arg_names, args))
    values.update(meta)
    signature, constexprs = {}, {}
    for param in kernel.params:
        v = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[param.name] = TYPES[v.dtype]
        else:
            signature[param.name] = "fp32" if isinstance(v, float) else "i32"
    compile_sm90(kernel, signature, constexprs, meta["num_warps"], meta.get("num_stages", 3))

_common.LAUNCH_HOOK = compile_hook
"""


def compile_for_sm90(launches: str) -> list:
    """Run ``launches`` (Python that calls kernel wrappers, after :data:`_SM90_PREAMBLE`: each
    launch is compiled for sm_90, not run) in a fresh interpreter with compiled-mode kernels;
    return the preamble's records of the launches. Skips where triton has no ahead-of-time
    compile API or no ptxas."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = _SM90_PREAMBLE + textwrap.dedent(launches) + "\nprint(json.dumps(results))\n"
    proc = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0 and ("ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower()):
        pytest.skip("no ptxas for the NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
