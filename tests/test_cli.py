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
