"""Issue 22 item 8: `mupopt bench` stopped now and then on "adamw backend 'cpu', case large,
fp32: ... 65618 / 4194304 elements outside". The cpu backend was right; the reference snapshot
was not: torch's float32 sqrt (MKL's VML) computes one thread's share of the process's first
vector-math call at about 12 bits when that call runs on several threads after an MKL sgemm
(mupopt/_vml.py has the measurements). The bench's peaks measure matmuls first, then the
reference AdamW's sqrt of a 2^22-element moment is the first VML call.

Each check needs a fresh process (only a process's first VML call is exposed). Without the
initialisation in mupopt/_vml.py the sequence below failed in 6 of 8 runs of the bench here, so
six clean runs in a row leave under a 1% chance that the fix is missing on such a machine. On a
machine whose MKL has no such race the test passes either way.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mupopt import backends
from mupopt.bench.check import CheckFailed
from mupopt.bench.runner import Config, run
from mupopt.optim.adamw import adamw_reference

RUNS = 6

# What the bench does: matmuls (its peaks), then the AdamW check on one 2^22-element tensor:
# the reference snapshot, a second reference run and the cpu backend from the same start.
_SCRIPT = r"""
import json, torch, mupopt
from mupopt.bench import cases as C, measure as M
from mupopt.bench.subjects import SUBJECTS
torch.set_num_threads(2)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
for _ in range(5):
    torch.mm(a, b)
subject = SUBJECTS["adamw"]
params = C.make_params(((1 << 22),), torch.float32, torch.device("cpu"))
start = [p.detach().clone() for p in params]
reference = M.reference_snapshot(subject, params, start)
out = {"reference_reproduces": M.reference_rerun_differs(subject, params, start, reference) is None}
from mupopt.kernels.cpp import build
if build.load_cpu() is True:
    try:
        M.check_optimizer(subject, lambda ps: subject.make(ps, "cpu"), params, start, reference, torch.float32, "cpu")
        out["cpu_matches"] = True
    except AssertionError as e:
        out["cpu_matches"] = str(e)
print(json.dumps(out))
"""


def test_reference_after_a_matmul_is_right_in_every_fresh_process():
    outcomes = []
    for _ in range(RUNS):
        done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outcomes.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert all(o["reference_reproduces"] for o in outcomes), outcomes
    assert all(o.get("cpu_matches", True) is True for o in outcomes), outcomes


def test_bench_says_when_the_reference_does_not_reproduce_itself(monkeypatch):
    """A reference that is off in its first run only (as the MKL race made it): the check of a
    backend that computes the true result fails, and the message puts the reference in doubt."""
    calls = []

    def first_run_off(params, grads, states, mults, hp):
        adamw_reference(params, grads, states, mults, hp)
        calls.append(1)
        if len(calls) <= 2:  # the two steps of the first check sequence
            for p in params:
                p.mul_(1 + 3e-4)

    monkeypatch.setitem(backends._REGISTRY["adamw"], "reference", backends.Backend("adamw", "reference", first_run_off))
    monkeypatch.setitem(backends._REGISTRY["adamw"], "true", backends.Backend("adamw", "true", adamw_reference))
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["true"], peers=[], cases=["large"],
                    dtypes=["fp32"])
    with pytest.raises(CheckFailed, match=r"'true'.*reference itself is not reproducible.*param\[0\]"):
        run(config, progress=False)


def test_bench_blames_the_backend_when_the_reference_reproduces_itself(monkeypatch):
    def off(params, grads, states, mults, hp):
        adamw_reference(params, grads, states, mults, hp)
        for p in params:
            p.mul_(1 + 3e-4)

    monkeypatch.setitem(backends._REGISTRY["adamw"], "off", backends.Backend("adamw", "off", off))
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["off"], peers=[], cases=["large"],
                    dtypes=["fp32"])
    with pytest.raises(CheckFailed) as raised:
        run(config, progress=False)
    assert "'off'" in str(raised.value) and "not reproducible" not in str(raised.value)
