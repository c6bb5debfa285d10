"""benchmarks/lean_states_quality.py's options that the numbers of docs/lean-states.md depend on:
``--group`` sets a param-group option of the built optimizer (and refuses one it lacks), and the
summary pairs runs by seed (per-seed difference from the baseline, mean, standard error). No
training here: the runs themselves are the benchmark's job."""
from __future__ import annotations

import statistics

import pytest
import torch

import benchmark_scripts
from mupopt.mupcheck.train import OPTIMIZERS


@pytest.fixture(scope="module")
def q():
    return benchmark_scripts.load("lean_states_quality")


def test_parse_group(q):
    assert q.parse_group("rho=0.1,weight_decay=0") == {"rho": 0.1, "weight_decay": 0.0}
    assert q.parse_group(None) == {}
    for bad in ("rho", "rho=x", "=1"):
        with pytest.raises(SystemExit, match="bad --group item"):
            q.parse_group(bad)


def test_group_options_reach_the_optimizer(q):
    p = torch.nn.Parameter(torch.zeros(4))
    spec = q.with_group_options(OPTIMIZERS["sophia"], {"rho": 0.16})
    opt = spec.make([p], 1e-3, 0.1, "independent")
    assert opt.param_groups[0]["rho"] == 0.16
    assert OPTIMIZERS["sophia"].make([p], 1e-3, 0.1, "independent").param_groups[0]["rho"] == 0.04
    with pytest.raises(SystemExit, match="no param-group option"):
        q.with_group_options(OPTIMIZERS["adamw"], {"rho": 0.1}).make([p], 1e-3, 0.1, "independent")


def test_summary_pairs_by_seed(q):
    val = {("32", 0): 2.0, ("32", 1): 3.0, ("32", 2): 2.5, ("8", 0): 2.02, ("8", 1): 2.97, ("8", 2): 2.55,
           ("x", 2): 2.0}  # "x" has seed 2 only: paired on that seed, no standard error
    rows = [{"optimizer": "adamw", "config": c, "seed": s, "val_loss": v} for (c, s), v in val.items()]
    lines = q.summary(rows).splitlines()
    d = [1.0, -1.0, 2.0]  # per-seed % differences of "8" from "32"
    se = statistics.stdev(d) / len(d) ** 0.5
    assert lines[2] == (f"adamw | 8 | 3 | 2.5133 | +0.53% | {statistics.mean(d):+.2f}% +- {se:.2f}% "
                        "(0: +1.00%, 1: -1.00%, 2: +2.00%)")
    assert lines[3].endswith("| -20.00% (2: -20.00%)")
    # against another baseline: "32" is then the one compared, and its differences change sign
    assert q.summary(rows, "8").splitlines()[1].split(" | ")[-1].startswith("-0.6")
