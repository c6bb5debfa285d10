"""pytest-benchmark files of mupopt, one per optimizer, outside the default test run (pytest's
testpaths is tests/, and these files are named bench_*.py):

    pytest benchmarks/ --benchmark-only                      # quick sizes, device auto-detected
    pytest benchmarks/bench_adamw.py --benchmark-only --bench-mode full --bench-device cuda
    pytest benchmarks/ --benchmark-only --benchmark-json out.json

Each test is one (implementation, case, dtype) of one optimizer: the registry's backends (found
when the tests are collected) and the peers of docs/benchmarks.md. Cases, bytes model, flop
counts, peers and the correctness pre-check are mupopt.bench's (mupopt/bench/measure.py), the same
code as `mupopt bench`; pytest-benchmark groups the implementations of one case and dtype so its
table compares them side by side, and each result's extra_info carries bytes or flops and GB/s or
TFLOP/s. Without pytest-benchmark every test skips.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mupopt.bench import cases as C
from mupopt.bench import measure as M
from mupopt.bench.runner import resolve_device
from mupopt.bench.timing import Timer, BUDGETS

# Rounds per test: pytest-benchmark reports min/median/IQR over them; warm-up is one round more.
ROUNDS = {"quick": 5, "full": 20, "smoke": 2}


def pytest_addoption(parser, pluginmanager):
    group = parser.getgroup("mupopt benchmarks")
    group.addoption("--bench-mode", default="quick", choices=sorted(ROUNDS), help="sizes: quick (default), full, smoke")
    group.addoption("--bench-device", default="auto", help="cpu, cuda or auto (default)")
    group.addoption("--bench-compile-max-tensors", type=int, default=1,
                    help="time the torch.compile peer on lists of at most this many tensors (default 1)")
    if not pluginmanager.hasplugin("benchmark"):
        # pytest-benchmark absent: the documented command line then skips every test instead of
        # failing on an unknown flag.
        parser.addoption("--benchmark-only", action="store_true", help="(pytest-benchmark is not installed)")


def pytest_collect_file(file_path, parent):
    # bench_*.py files with tests; a bench_*.py that is a script (no "def test_") is left alone
    # rather than imported. A file named on the command line is pytest's own to collect.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and "def test_" in file_path.read_text():
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class Item:
    def __init__(self, optimizer, impl, kind, case, dtype, device, profile):
        self.optimizer, self.impl, self.kind, self.case, self.dtype = optimizer, impl, kind, case, dtype
        self.device, self.profile = device, profile

    @property
    def id(self) -> str:
        case = self.case.name.replace("/", "-div")
        return f"{self.optimizer}-{self.impl}-{case}-{self.dtype}"


def pytest_generate_tests(metafunc):
    if "bench_item" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = resolve_device(config.getoption("--bench-device"))
    mode = config.getoption("--bench-mode")
    profile = C.profile_for(device, mode)
    items = []
    for optimizer in metafunc.module.OPTIMIZERS:
        dtypes = ["fp32"] if optimizer == "roots" else ["fp32", "bf16"]
        for case in M.cases_for(optimizer, profile):
            for dtype in dtypes:
                for impl, kind in M.implementations(optimizer, case):
                    items.append(Item(optimizer, impl, kind, case, dtype, device, profile))
    metafunc.parametrize("bench_item", items, ids=[i.id for i in items])


def pytest_configure(config):
    # A test skipped before timing (a backend that cannot run here) leaves its fixture unused.
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")


if importlib.util.find_spec("pytest_benchmark") is None:

    @pytest.fixture
    def benchmark():
        # Defined only without pytest-benchmark: a conftest fixture would shadow the plugin's.
        pytest.skip("pytest-benchmark is not installed (pip install pytest-benchmark)")


@pytest.fixture
def bench_step(benchmark, bench_item, request):
    """Check ``bench_item`` against the reference, then time it with pytest-benchmark, each
    round after a cache flush (the same Timer flush as `mupopt bench`)."""
    item = bench_item
    try:
        prepared = M.prepare(item.optimizer, item.impl, item.case, item.dtype, item.device, item.profile,
                             compile_max_tensors=request.config.getoption("--bench-compile-max-tensors"))
    except M.Skip as e:
        pytest.skip(str(e))
    mode = request.config.getoption("--bench-mode")
    timer = Timer(item.device, BUDGETS[mode])
    try:
        if item.device.type == "cuda":
            def target():
                prepared.call()
                torch.cuda.synchronize(item.device)
        else:
            target = prepared.call

        def flush():
            timer.flush()
            timer.sync()

        benchmark.group = f"{item.optimizer} {item.case.name} {item.dtype}"
        benchmark.extra_info.update(optimizer=item.optimizer, backend=item.impl, kind=item.kind, case=item.case.name,
                                    dtype=item.dtype, numel=item.case.numel, tensors=item.case.tensors,
                                    bytes=prepared.nbytes, flops=prepared.flops, check_err=prepared.check_err)
        benchmark.pedantic(target, setup=flush, rounds=ROUNDS[mode], warmup_rounds=1, iterations=1)
        median = benchmark.stats.stats.median if benchmark.stats else None
        if median:
            if prepared.nbytes:
                benchmark.extra_info["gbps"] = prepared.nbytes / median / 1e9
            if prepared.flops:
                benchmark.extra_info["tflops"] = prepared.flops / median / 1e12
    finally:
        prepared.close()
    return benchmark
