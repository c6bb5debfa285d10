"""csrc/ compiles where torch cannot build it: every CUDA file with nvcc.

The kernels and launchers (csrc/cuda, csrc/include) use no torch header, so nvcc checks them on
a machine without a GPU or a CUDA build of torch; a compile error fails the test, only a missing
nvcc skips it. The architectures (ARCHS) are the fewest that compile every branch of the sources
from sm_80 up: sm_80, plus each architecture a `__CUDA_ARCH__ >= N` guard names above it. Each
more costs a full device compile (cicc and ptxas: about 45 s of CI per architecture on 2 cores,
with sm_90 beside sm_80 while both took the same branches). The files are compiled in parallel
(one nvcc per core) by a module fixture, then reported one test per file.
The CUDA bindings (csrc/bindings_cuda.cpp, torch headers) are syntax-checked with the host
compiler against this torch's headers when they include c10/cuda (the CPU wheel does, minus one
generated header, stubbed here) and the CUDA runtime headers exist.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_FILES = sorted((CSRC / "cuda").glob("*.cu"))
BASE_ARCH = 80  # Ampere: the oldest GPU with native bfloat16 arithmetic.


def arch_guards(text: str) -> set[int]:
    """The architectures where a `__CUDA_ARCH__ >= N` or `< N` guard in ``text`` switches branch
    (N = 10 x the arch): compiling for each of them and for BASE_ARCH takes both sides."""
    return {int(n) // 10 for n in re.findall(r"__CUDA_ARCH__\s*(?:>=|<)\s*(\d+)", text)}


def _guarded_archs() -> set[int]:
    return set().union(*(arch_guards(f.read_text()) for f in [*CUDA_FILES, *(CSRC / "include").rglob("*.h")]))


COMPILED_ARCHS = sorted({BASE_ARCH} | {a for a in _guarded_archs() if a > BASE_ARCH})
ARCHS = tuple(x for a in COMPILED_ARCHS for x in ("-gencode", f"arch=compute_{a},code=sm_{a}"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.is_file() else None


NVCC = _nvcc()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{file name: CompletedProcess} for every csrc/cuda file."""
    if NVCC is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA sources cannot be checked")
    out = tmp_path_factory.mktemp("nvcc")

    def compile_one(src: Path) -> subprocess.CompletedProcess:
        cmd = [NVCC, "-std=c++17", "-O3", f"-I{CSRC / 'include'}", f"-I{CSRC}", *ARCHS,
               "-c", str(src), "-o", str(out / (src.stem + ".o"))]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = dict(zip((f.name for f in CUDA_FILES), pool.map(compile_one, CUDA_FILES)))
    return results


def test_there_are_cuda_sources():
    assert {f.name for f in CUDA_FILES} >= {"adamw.cu", "adopt.cu", "lamb.cu", "sophia.cu"}


def test_every_arch_guard_is_compiled():
    assert arch_guards("#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900\n#if __CUDA_ARCH__<1000") == {90, 100}
    assert COMPILED_ARCHS[0] == BASE_ARCH and set(COMPILED_ARCHS) >= {a for a in _guarded_archs() if a > BASE_ARCH}


@pytest.mark.parametrize("name", [f.name for f in CUDA_FILES])
def test_nvcc_compiles(compiled, name):
    res = compiled[name]
    assert res.returncode == 0, f"nvcc failed on csrc/cuda/{name}:\n{res.stderr[-4000:]}"


def test_kernels_use_no_torch_headers():
    """csrc/include, csrc/cpu and csrc/cuda stay free of torch so nvcc (and any C++ compiler)
    can build them alone; only bindings*.cpp and table.h see torch."""
    for folder in ("include", "cpu", "cuda"):
        for path in (CSRC / folder).rglob("*"):
            if path.suffix in (".h", ".cuh", ".cpp", ".cu"):
                text = path.read_text()
                for banned in ("<torch/", "<ATen/", "<c10/"):
                    assert banned not in text, f"{path.relative_to(CSRC)} includes {banned}"


def test_cuda_bindings_parse_against_this_torch(tmp_path):
    torch = pytest.importorskip("torch")
    include = Path(torch.__file__).parent / "include"
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), NVCC and str(Path(NVCC).resolve().parents[1]),
             "/usr/local/cuda"]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").is_file()), None)
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None or cuda_include is None:
        pytest.skip("needs a C++ compiler and the CUDA runtime headers")
    if not (include / "c10" / "cuda" / "CUDAStream.h").is_file():
        pytest.skip("this torch ships no c10/cuda headers")
    # The CPU wheel lacks this one generated header (a CUDA wheel's own copy comes first on the
    # search path); its macros only matter when linking.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [cxx, "-std=c++20", "-fsyntax-only", f"-I{CSRC / 'include'}", f"-I{CSRC}",
           "-isystem", str(include), "-isystem", str(include / "torch" / "csrc" / "api" / "include"),
           "-isystem", str(cuda_include), "-isystem", str(tmp_path / "stub"),
           str(CSRC / "bindings_cuda.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
