"""benchmarks/timing_crosscheck.py (issue 16 item 1) on the CPU: its analysis on made-up numbers,
its extraction of `mupopt bench` rows from a real smoke run of the runner, the clean skip without
CUDA and a smoke run of the whole script. The GPU numbers it exists for come from a GPU call."""
from __future__ import annotations

import json

import pytest
import torch

import benchmark_scripts


@pytest.fixture(scope="module")
def xc():
    return benchmark_scripts.load("timing_crosscheck")


def _s(xc, contender, method, series, r, med, p20=None, p80=None, nbytes=28):
    return xc.Sample(contender, method, series, r, med, med if p20 is None else p20, med if p80 is None else p80, nbytes)


def test_summary_separates_between_row_from_within_row_spread(xc):
    # Three rows, each tight inside (p20..p80 = 2% of its median) but 0.5 / 0.6 / 0.7 ms apart:
    # the case where one row's p20-p80 gives a false precision.
    samples = [_s(xc, "cuda", "timer", "fresh", r, m, 0.99 * m, 1.01 * m) for r, m in enumerate((0.5, 0.7, 0.6))]
    (row,) = xc.summarize(samples)
    assert (row["median_ms"], row["min_ms"], row["max_ms"], row["rows"]) == (0.6, 0.5, 0.7, 3)
    assert row["between"] == pytest.approx(0.2 / 0.6)
    assert row["within"] == pytest.approx(0.02)
    assert xc.spread([1.0]) == 0.0


def test_pct_of_copy_divides_by_the_copy_timed_the_same_way(xc):
    samples = [_s(xc, "cuda", "timer", "fresh", 0, 2.0, nbytes=1000), _s(xc, "cuda", "do_bench", "fresh", 0, 1.0, nbytes=1000),
               _s(xc, "cuda", "host", "fresh", 0, 0.1, nbytes=1000)]
    summary = xc.summarize(samples)
    xc.pct_of_copy(summary, {"timer": 1.0, "do_bench": 0.5}, 800)
    pct = {r["method"]: r.get("pct_of_copy") for r in summary}
    # timer: 1000 B / 2 ms against 800 B / 1 ms; do_bench: 1000 / 1 against 800 / 0.5; host: none.
    assert pct["timer"] == pytest.approx(62.5) and pct["do_bench"] == pytest.approx(62.5) and pct["host"] is None


def test_verdicts_give_every_ratio_with_its_numbers(xc):
    samples = [_s(xc, "triton", "timer", "fresh", r, m) for r, m in enumerate((1.0, 1.2))]
    samples += [_s(xc, "triton", "events", "fresh", r, 0.8) for r in range(2)]
    samples += [_s(xc, "triton", "do_bench", "fresh", r, 0.8) for r in range(2)]
    samples += [_s(xc, "triton", "host", "fresh", r, 0.2) for r in range(2)]
    samples += [_s(xc, "triton", "timer", "same", r, 1.1) for r in range(2)]
    times = {"triton": {"bench": [1.2, 1.25], "tune": [0.8, 0.85]}, "cuda": {"bench": [0.6], "tune": []}}
    lines = xc.verdicts(xc.summarize(samples), times, {"bench": [4100.0, 4100.0, 4000.0], "tune": [4200.0]})
    text = "\n".join(lines)
    assert "triton: timer 1.100 ms (rows 1.000-1.200, between-row spread 18% vs within-row 0%)" in text
    assert "timer/events 1.38x" in text and "timer/do_bench 1.38x" in text
    assert "host enqueue 0.200 ms = 18% of timer" in text and "same instance re-timed: spread 0%" in text
    assert "triton: mupopt bench [1.200, 1.250] ms vs tune_triton [0.800, 0.850] ms: bench/tune 1.48x" in text
    assert not any(line.startswith("cuda: mupopt bench") for line in lines)  # no tune rows: no ratio
    assert lines[-1] == "copy GB/s divided by: bench 4100, 4000; tune 4200"


def test_harness_rows_are_read_as_each_harness_writes_them(xc):
    # mupopt bench: runner rows of a real smoke run on the CPU (the reference and torch fused on the
    # "large" case), so a change of the runner's schema breaks this test, not the GPU call.
    bench = xc.bench_style(torch.device("cpu"), ["torch-fused", "reference"], "smoke")
    # tune_triton.sweep's rows (the GPU-only part of that script): its dict layout.
    tune = [dict(optimizer="adamw", backend="torch-fused", block=None, warps=None, median_ms=0.6, gbps=3000.0,
                 pct_of_copy=72.0, copy_gbps=4170.0),
            dict(optimizer="adamw", backend="triton", block=8192, warps=16, median_ms=0.8, gbps=2300.0,
                 pct_of_copy=55.0, copy_gbps=4170.0)]
    times, copies = xc.harness_medians(bench, tune)
    assert set(times) == {"torch-fused", "reference", "triton"}
    assert len(times["reference"]["bench"]) == 1 and len(times["torch-fused"]["bench"]) == 1
    assert times["torch-fused"]["tune"] == [0.6] and times["triton"] == {"bench": [], "tune": [0.8]}
    assert copies["tune"] == [4170.0, 4170.0]
    # Every AdamW row is divided by the copy the runner measured (smoke: the peaks group's, not refreshed).
    (copy_row,) = [r for r in bench if r["optimizer"] == "copy"]
    assert copies["bench"] == pytest.approx([copy_row["gbps"]] * 2)


def test_without_cuda_the_script_skips_cleanly(xc, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the skip path is for machines without it")
    assert xc.main([]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_cpu_smoke_run_writes_every_series(xc, tmp_path, capsys):
    out = tmp_path / "xc.json"
    assert xc.main(["--device", "cpu", "--smoke", "--rows", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["methods"] == ["timer", "host"] and data["bench_rows"] == [] and data["tune_rows"] == []
    keys = {(r["contender"], r["method"], r["series"]): r for r in data["summary"]}
    for contender in ("torch-fused", "reference"):
        assert keys[(contender, "timer", "fresh")]["rows"] == 2
        assert keys[(contender, "timer", "same")]["rows"] == 2
        assert keys[(contender, "host", "fresh")]["rows"] == 2
        assert keys[(contender, "timer", "fresh")]["nbytes"] == 28 * 4096  # the bytes model: 28 B per fp32 element
        assert keys[(contender, "timer", "fresh")]["pct_of_copy"] > 0
    assert any(line.startswith("torch-fused: timer ") for line in data["verdicts"])
    assert "contender    method" in capsys.readouterr().out


def test_gpu_state_reads_nvidia_smi_and_falls_back_on_an_unknown_field(xc, monkeypatch):
    """Read-only clock query: an older or newer driver that refuses the throttle field's name
    still gives clocks, power and temperature (nvidia-smi faked here)."""
    calls = []

    class Res:
        def __init__(self, rc, out):
            self.returncode, self.stdout = rc, out

    def fake_run(cmd, **kw):
        calls.append(cmd[1])
        if "reasons" in cmd[1]:
            return Res(2, "")  # 'Field ... is not a valid field to query.'
        return Res(0, "1980, 3201, 512.30, 41\n")

    monkeypatch.setattr(xc.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(xc.subprocess, "run", fake_run)
    assert xc.gpu_state() == {"sm_mhz": "1980", "mem_mhz": "3201", "power_w": "512.30", "temp_c": "41"}
    assert len(calls) == 3 and all(c.startswith("--query-gpu=clocks.sm,clocks.mem") for c in calls)
    assert not any(flag in " ".join(calls) for flag in ("-lgc", "-ac", "-pl", "-pm", "-r "))
    monkeypatch.setattr(xc.shutil, "which", lambda name: None)
    assert xc.gpu_state() == {}


class _Log:
    """Fake CUDA events and device calls that write down the order of what a timing method does."""

    def __init__(self, monkeypatch, xc):
        self.calls = []
        log = self.calls

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                log.append("record")
                self.t = len(log)

            def synchronize(self):
                log.append("event-sync")

            def elapsed_time(self, end):
                return float(end.t - self.t)

        monkeypatch.setattr(xc.torch.cuda, "Event", Event)
        from mupopt.bench import timing

        timer = object.__new__(timing.Timer)  # no CUDA here: the Timer without its flush buffer
        timer.device, timer.budget, timer.cuda = torch.device("cuda"), timing.BUDGETS["smoke"], True
        timer.flush = lambda: log.append("flush")
        timer.sync = lambda: log.append("sync")
        self.timer = timer

    def fn(self):
        self.calls.append("fn")


def test_the_harness_timer_has_the_host_part_of_the_call_inside_its_interval(xc, monkeypatch):
    """What both harnesses time per repetition (timing.Timer._once_ms): the synchronisation comes
    before the start event, so everything fn does on the host before its first kernel is inside
    the interval while the GPU idles."""
    log = _Log(monkeypatch, xc)
    log.timer._once_ms(log.fn)
    assert log.calls == ["flush", "sync", "record", "fn", "record", "event-sync"]


def test_the_events_method_enqueues_the_call_behind_the_flush(xc, monkeypatch):
    """timing_crosscheck's "events": no synchronisation between the flush and the start event (the
    host work of fn overlaps the flush on the GPU); one synchronisation after all repetitions."""
    log = _Log(monkeypatch, xc)
    med, p20, p80 = xc.time_events(log.timer, log.fn, reps=3)
    assert log.calls == ["fn", "sync"] + ["flush", "record", "fn", "record"] * 3 + ["sync"]
    assert p20 <= med <= p80
    log.calls.clear()
    xc.time_host(log.timer, log.fn, reps=2)
    assert log.calls == ["sync", "fn", "sync", "fn", "sync"]  # host time: no flush, nothing recorded


def test_a_failing_method_is_written_down_and_the_rest_measured(xc, tmp_path, monkeypatch):
    """One GPU call for everything: a method that raises (do_bench missing, a backend failing)
    costs its own numbers only."""
    real = xc._run_method

    def flaky(method, timer, fn):
        if method == "host":
            raise RuntimeError("made to fail")
        return real(method, timer, fn)

    monkeypatch.setattr(xc, "_run_method", flaky)
    out = tmp_path / "xc.json"
    assert xc.main(["--device", "cpu", "--smoke", "--rows", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["errors"]) == 4 and all("host: raised RuntimeError: made to fail" in e for e in data["errors"])
    methods = {(r["contender"], r["method"]) for r in data["summary"]}
    assert ("torch-fused", "timer") in methods and not any(m == "host" for _, m in methods)
    # Round 1 runs the contenders in reverse order.
    rounds = [(s["round"], s["contender"]) for s in data["samples"] if s["series"] == "fresh"]
    assert rounds == [(0, "torch-fused"), (0, "reference"), (1, "reference"), (1, "torch-fused")]
