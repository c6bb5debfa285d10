"""The `mupopt` command without its console script (`python -m mupopt`), and `--version`."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mupopt


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mupopt", *argv], capture_output=True, text=True, timeout=300)


def test_python_m_mupopt_runs_the_cli():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("verify", "bench", "coord-check", "transfer"):
        assert command in proc.stdout


def test_version_is_the_package_version():
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"mupopt {mupopt.__version__}"
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1) == mupopt.__version__


def test_docs_and_help_cite_only_files_in_the_repository():
    """Docstrings, --help texts and docs cite docs/mup.md, docs/benchmarks.md or the papers,
    never notes that are not in the repository (mup-rules.md, performance.md, optimizer-specs.md)."""
    root = Path(__file__).resolve().parent.parent
    absent = ("mup-rules.md", "performance.md", "optimizer-specs.md")
    files = [*root.joinpath("mupopt").rglob("*.py"), *root.joinpath("docs").glob("*.md"), root / "README.md",
             root / "DEVELOPERS.md", *root.joinpath("benchmarks").glob("*.py")]
    for f in files:
        text = f.read_text()
        for name in absent:
            assert name not in text, f"{f.relative_to(root)} cites {name}"
    for cited in ("docs/mup.md", "docs/benchmarks.md", "docs/mup-results.md"):
        assert (root / cited).exists()
    for argv in (["--help"], ["bench", "--help"], ["verify", "--help"]):
        proc = _run(*argv)
        assert proc.returncode == 0 and not any(name in proc.stdout for name in absent), proc.stdout


def test_verify_limited_to_one_backend_does_not_claim_every_backend():
    """`mupopt verify --optimizer adamw --backend reference` checks one row pair: it printed
    "Every registered backend was checked." all the same."""
    proc = _run("verify", "--optimizer", "adamw", "--backend", "reference", "--steps", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Every registered backend was checked." not in proc.stdout
    assert "the others were not" in proc.stdout
