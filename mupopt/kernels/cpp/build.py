"""Builds the C++ libraries of the "cpu" and "cuda" backends from ``csrc/``, at first use.

``torch.utils.cpp_extension.load(..., is_python_module=False)`` compiles with ninja and loads
the shared library, whose static initialisers register the ``torch.ops.mupopt`` ops
(``csrc/bindings.cpp``; ``csrc/bindings_cuda.cpp`` adds their CUDA kernels). Nothing is built on
``import mupopt``: the first step with backend "cpu"/"cuda", or the registry asking whether they
can run (``auto``), calls :func:`load_cpu` / :func:`load_cuda`, which try once per process and
remember the outcome, success or the reason for failure.

Cache: ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/py<ver>_<cpu|cuXY>``), one
directory per library named after a digest of every source file (its path relative to the
sources' folder and its bytes), the flags and the torch version, so an edited source or another
torch builds anew, and a checkout, another checkout of the same commit and an installed wheel's
copy share one library. Not the folder: a complete library is loaded from the cache without
torch's build (below), so two folders of identical sources never rebuild over each other
(torch's ninja file names the sources by absolute path; it is only written by a build, which
runs only where the library is missing).

Loading a built library: when the cache holds the library of this digest and no build of it is
under way (torch's ``lock`` file in its folder), it is loaded directly with
``torch.ops.load_library``: no compiler, no ninja, no lock, well under a second on every rank of
a job. Only a missing library goes through ``torch.utils.cpp_extension.load``, which compiles it
(minutes: 146 s for "cpu" on 2 cores; every other process that needs it meanwhile waits on
torch's lock file, so on a job's first start each rank's first step takes the whole build: the
20-65 s measured per rank in issue 19) or waits for the process building it. :data:`loads`
records which of the two each load was.

Ahead of time, in the environment the jobs run in (same ``TORCH_EXTENSIONS_DIR`` or home):
``python -m mupopt.kernels.cpp.build`` builds every library this machine's ranks load: "cpu",
and "cuda" where CUDA is available.

Flags: ``-O3 -fopenmp -ffp-contract=off -fno-math-errno`` and no ``-march``: the hot loops are
compiled twice (baseline and ``target("avx2,fma")``) and picked at run time
(``csrc/cpu/driver.h``), so a cached or ahead-of-time build also runs on an older CPU that
shares the cache directory. ``-ffp-contract=off`` keeps every fused multiply-add explicit (the
rounding must follow ATen's, see ``csrc/include/mupopt/common.h``); ``-fno-math-errno`` lets
``sqrtf`` vectorise.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

# The sources: ``csrc`` beside this file is a link to the checkout's ``csrc/`` in a source tree
# and a copy of it in an installed wheel (package data, pyproject.toml).
PACKAGED_CSRC = Path(__file__).resolve().parent / "csrc"
ENV_CSRC = "MUPOPT_CSRC"
ENV_VERBOSE = "MUPOPT_BUILD_VERBOSE"

CPU_SOURCES = (
    "bindings.cpp",
    "cpu/adamw.cpp",
    "cpu/adopt.cpp",
    "cpu/lamb.cpp",
    "cpu/sophia.cpp",
    "cpu/traffic.cpp",
    "cpu/q8_codec.cpp",
)
CUDA_SOURCES = (
    "bindings_cuda.cpp",
    "cuda/adamw.cu",
    "cuda/adopt.cu",
    "cuda/lamb.cu",
    "cuda/sophia.cu",
)
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno")
LD_FLAGS = ("-fopenmp",)
# nvcc: IEEE division and square root (the defaults, restated: --use_fast_math would change
# results); fused multiply-adds are written out explicitly in the headers.
NVCC_FLAGS = ("-O3", "--prec-div=true", "--prec-sqrt=true")

_lock = threading.Lock()
# None: not tried yet; True: loaded; str: why it cannot be built or loaded.
_outcome: dict[str, "bool | str | None"] = {"cpu": None, "cuda": None}
# What this process did for each library it loaded, in order: {"kind", "name", "how": "cached"
# (loaded from the cache as it was: no compiler, ninja or lock) or "built" (torch's JIT build
# ran: it compiled, or waited for another process compiling), "seconds"}.
loads: list[dict] = []


def csrc_dir() -> Path:
    return Path(os.environ.get(ENV_CSRC) or PACKAGED_CSRC)


def _digest(kind: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    h.update(f"{kind}|{torch.__version__}|{torch.version.cuda}|{' '.join(flags)}".encode())
    root = csrc_dir()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".h", ".cpp", ".cu", ".cuh")):
        rel = path.relative_to(root).as_posix()
        if kind == "cpu" and (rel.startswith("cuda/") or rel == "bindings_cuda.cpp"):
            continue  # not part of the CPU library: editing them must not rebuild it
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _find_ninja() -> str | None:
    """Put a ninja on PATH (torch runs ``ninja`` by name) and return its directory.

    ``pip install ninja`` places it next to the interpreter, which is not on PATH when a venv's
    python is run without activating the venv (``.venv/bin/python -m pytest``)."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore

        candidates.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in candidates:
        exe = os.path.join(d, "ninja")
        if os.path.isfile(exe) and os.access(exe, os.X_OK):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return d
    return None


def _compiler_problem() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which((cxx.split() or ["c++"])[0]) is None:  # CXX may carry a launcher: "ccache g++"
        return (
            f"no C++ compiler: {cxx!r} (the CXX environment variable, default c++) is not on PATH; "
            f"install g++ or clang++, or use backend='reference'"
        )
    if _find_ninja() is None:
        return "ninja is not installed (pip install ninja): torch builds C++ extensions with it"
    missing = [s for s in CPU_SOURCES if not (csrc_dir() / s).is_file()]
    if missing:
        return (
            f"mupopt's C++ sources are not at {csrc_dir()} (missing {missing[0]}): reinstall mupopt "
            f"(its wheel carries them) or set {ENV_CSRC} to the csrc/ folder of a checkout"
        )
    return None


def _error_sentence(kind: str, exc: BaseException) -> str:
    """The first compiler or linker diagnostic of a failed build, as one sentence."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = None
    for pattern in (r"\berror:", r"undefined reference|cannot find -l|fatal", r"\berror\b"):
        hits = [ln for ln in lines if re.search(pattern, ln, re.I)]
        if hits:
            detail = hits[0]
            break
    detail = detail or (lines[0] if lines else type(exc).__name__)
    if len(detail) > 300:
        detail = detail[:297] + "..."
    cmd = "python -m mupopt.kernels.cpp.build" + (" --cuda" if kind == "cuda" else "")
    return f"the {kind} C++ library failed to build or load: {detail} (run `{cmd}` for the full log)"


def _load(kind: str, verbose: bool) -> None:
    from torch.utils import cpp_extension

    root = csrc_dir()
    sources, flags = (CPU_SOURCES, CXX_FLAGS) if kind == "cpu" else (CUDA_SOURCES, CXX_FLAGS + NVCC_FLAGS)
    name = f"mupopt_{kind}_{_digest(kind, flags)}"
    kwargs = {}
    if kind == "cuda":
        kwargs["extra_cuda_cflags"] = list(NVCC_FLAGS)
    build_dir = _build_dir(name)
    start = time.perf_counter()
    if build_dir is not None and _load_cached(build_dir, name):
        loads.append({"kind": kind, "name": name, "how": "cached", "seconds": time.perf_counter() - start})
        return
    announce = build_dir is None or not _is_built(build_dir, name)
    if announce:  # a build takes minutes: say what is happening, once, and how long it took
        where = f" into {build_dir}" if build_dir else ""
        print(f"mupopt: building the {kind} C++ library (backend {kind!r}) from {root}{where}, once per "
              f"source version ...", end="\n" if verbose else "", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(root / s) for s in sources],
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            extra_include_paths=[str(root / "include"), str(root)],
            is_python_module=False,
            verbose=verbose,
            **kwargs,
        )
    except BaseException:
        if announce:
            print(f"{' mupopt:' if verbose else ''} failed after {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        raise
    if announce:
        print(f"{'mupopt: built' if verbose else ''} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    loads.append({"kind": kind, "name": name, "how": "built", "seconds": time.perf_counter() - start})


def _load_cached(build_dir: str, name: str) -> bool:
    """Load the library of ``name`` straight from its build folder if it is complete there: it
    exists and torch's lock file is absent (present while a process builds it). A library that
    fails to load (being written) is left to torch's build, which waits for the lock."""
    if os.path.exists(os.path.join(build_dir, "lock")):
        return False
    for ext in (".so", ".pyd", ".dll", ".dylib"):
        path = os.path.join(build_dir, name + ext)
        if os.path.isfile(path):
            try:
                torch.ops.load_library(path)
            except OSError:
                return False
            return True
    return False


def _build_dir(name: str) -> str | None:
    """torch's build folder of extension ``name`` (where its library lands), or None if this
    torch does not say."""
    from torch.utils import cpp_extension

    try:
        return cpp_extension._get_build_directory(name, False)
    except Exception:  # a private helper: absent or changed in some torch version
        return None


def _is_built(build_dir: str, name: str) -> bool:
    """Whether the library is already in the cache (then loading it takes well under a second)."""
    return any(os.path.isfile(os.path.join(build_dir, name + ext)) for ext in (".so", ".pyd", ".dll", ".dylib"))


def load_cpu(verbose: bool | None = None) -> bool | str:
    """Build (at most once per process) and load the CPU library: True, or why it failed."""
    return _ensure("cpu", verbose)


def load_cuda(verbose: bool | None = None) -> bool | str:
    """Build and load the CUDA library (after the CPU one, which defines the ops)."""
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    first = load_cpu(verbose)
    if first is not True:
        return first
    return _ensure("cuda", verbose)


def _ensure(kind: str, verbose: bool | None) -> bool | str:
    outcome = _outcome[kind]
    if outcome is not None:
        return outcome
    with _lock:
        if _outcome[kind] is None:
            if verbose is None:
                verbose = os.environ.get(ENV_VERBOSE, "") not in ("", "0")
            problem = _compiler_problem()
            if problem is None and kind == "cuda":
                from torch.utils.cpp_extension import CUDA_HOME

                if CUDA_HOME is None:
                    problem = "no CUDA toolkit (nvcc) found: set CUDA_HOME or install the toolkit"
            if problem is not None:
                _outcome[kind] = problem
            else:
                try:
                    _load(kind, verbose)
                    if kind == "cpu":
                        _register_fakes()
                        _make_map_tables()
                    _outcome[kind] = True
                except Exception as exc:  # a compiler error, a missing header, a bad link
                    _outcome[kind] = _error_sentence(kind, exc)
    return _outcome[kind]


# The ops of csrc/bindings.cpp. They return nothing and only write their (a!) arguments, so
# their fake (meta) kernel does nothing: enough for FakeTensor tracing (torch.compile) to carry
# them through as opaque, functionalised ops.
OPS = (
    "adamw_", "adopt_", "lamb_", "sophia_", "sophia_hessian_",
)


def _register_fakes() -> None:
    def fake(*args, **kwargs) -> None:
        return None

    for op in OPS:
        torch.library.register_fake(f"mupopt::{op}")(fake)


def _make_map_tables() -> None:
    """Make the tables of the 8-bit states' maps in use (ops.map_table) with the library: their
    construction reads values (checks, sizes), which a step traced by torch.compile(fullgraph=True)
    cannot, so a first 8-bit step made them only outside a trace. About 0.2 s."""
    from . import ops
    from ...optim import _lean_states as lean

    for kind in (lean.SIGNED, lean.UNSIGNED):
        ops.map_table(kind)


def is_loaded(kind: str = "cpu") -> bool:
    return _outcome[kind] is True


def main(argv: list[str] | None = None) -> int:
    """``python -m mupopt.kernels.cpp.build [--cuda] [--quiet]``: build ahead of time every
    library a training process on this machine loads: "cpu", and "cuda" where CUDA is available
    (``--cuda``: fail if it is not). Run it where the jobs run (same torch, same mupopt
    installation, same ``TORCH_EXTENSIONS_DIR`` or home), e.g. in the container image; every rank
    then loads the libraries from the cache in well under a second."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mupopt.kernels.cpp.build", description=main.__doc__)
    parser.add_argument("--cuda", action="store_true", help="require the CUDA library (default: build it where CUDA is available)")
    parser.add_argument("--quiet", action="store_true", help="no compiler output")
    args = parser.parse_args(argv)
    status = 0
    kinds = ("cpu", "cuda") if args.cuda or torch.cuda.is_available() else ("cpu",)
    for kind in kinds:
        start = time.perf_counter()
        outcome = load_cpu(not args.quiet) if kind == "cpu" else load_cuda(not args.quiet)
        took = time.perf_counter() - start
        if outcome is True:
            how = next((r["how"] for r in loads if r["kind"] == kind), "cached")
            print(f"mupopt {kind} library ready ({how}, {took:.1f} s); cache: {_build_root()}")
        else:
            print(f"mupopt {kind} library: {outcome}", file=sys.stderr)
            status = 1
    return status


def _build_root() -> str:
    from torch.utils import cpp_extension

    return os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()


if __name__ == "__main__":
    sys.exit(main())
