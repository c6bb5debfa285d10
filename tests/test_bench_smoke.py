"""Smoke test of the benchmark suite (mupopt.bench): the command runs end to end on tiny sizes,
writes JSON and CSV in one schema with positive ratios, and its correctness pre-check stops a
wrong backend before it is timed. Numbers are not looked at: timing is the benchmarks' job."""
from __future__ import annotations

import argparse
import csv
import json
import math

import pytest
import torch

from mupopt import backends
from mupopt.bench import cli, model, report
from mupopt.bench.check import CheckFailed
from mupopt.bench.runner import COLUMNS, Config, run
from mupopt.mup import ONES
from mupopt.optim.adamw import adamw_reference

RATIO_COLUMNS = [c for c in COLUMNS if c.startswith("ratio_to_")]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`mupopt bench --smoke` for two optimizers on the CPU (the elementwise and the matrix path).
    Backends: the reference only, so that a compiled backend's first use (the C++ build) does not
    land in this test's time; the registry path is covered by the fake backends below."""
    out = tmp_path_factory.mktemp("bench")
    status = cli.main(_args("--smoke", "--device", "cpu", "--optimizers", "adamw,muon", "--backends", "reference",
                            "--out", str(out), "-q", "--note", "smoke test"))
    return status, out


def test_smoke_run_writes_json_and_csv_in_one_schema(smoke_run):
    status, out = smoke_run
    assert status == 0
    (json_path,) = out.glob("*.json")
    (csv_path,) = out.glob("*.csv")
    assert json_path.stem == csv_path.stem and json_path.stem.startswith("cpu-")
    rows = json.loads(json_path.read_text())
    assert rows and all(list(r) == COLUMNS for r in rows)
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        assert len(list(reader)) == len(rows)
    for r in rows:
        assert r["device"] == "cpu" and r["torch"] == torch.__version__ and r["date"] and r["run_note"] == "smoke test"
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["optimizer"] for r in ok} >= {"copy", "matmul", "adamw", "muon"}
    # Throughput from the bytes model (elementwise; not for the host-bound overhead cases) or the
    # flop count (matrix-bound).
    for r in ok:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        if r["optimizer"] == "adamw" and not r["case"].startswith("overhead-"):
            assert r["gbps"] > 0 and r["bytes"] > 0
        if r["optimizer"] == "muon":
            assert r["tflops"] > 0 and r["flops"] > 0


def test_ratios_are_positive_numbers(smoke_run):
    _, out = smoke_run
    rows = json.loads(next(out.glob("*.json")).read_text())
    seen = set()
    for r in rows:
        for c in RATIO_COLUMNS:
            if r[c] is not None:
                assert isinstance(r[c], float) and math.isfinite(r[c]) and r[c] > 0, (r["optimizer"], r["backend"], c)
                seen.add(c)
    # The peers of the two optimizers ran: torch's AdamW (fused and foreach), torch.optim.Muon,
    # the reference, and the muP pair.
    assert {"ratio_to_torch_fused", "ratio_to_torch_foreach", "ratio_to_reference", "ratio_to_torch_muon",
            "ratio_to_uniform_lr"} <= seen
    ref = next(r for r in rows if r["optimizer"] == "adamw" and r["backend"] == "reference" and r["case"] == "large")
    assert ref["ratio_to_reference"] == 1.0


def test_overhead_case_times_whole_steps_against_torch_fused(smoke_run):
    """Issue 15's overhead case: tiny float32 tensors, a whole step() per call, torch's fused and
    foreach AdamW in the same run; us per tensor per step in the notes and the table."""
    _, out = smoke_run
    rows = [r for r in json.loads(next(out.glob("*.json")).read_text()) if r["case"].startswith("overhead-")]
    by_backend = {r["backend"]: r for r in rows if r["optimizer"] == "adamw" and r["status"] == "ok"}
    assert {"reference", "torch-fused", "torch-foreach"} <= set(by_backend)
    for r in by_backend.values():
        assert r["case"] == "overhead-20" and r["dtype"] == "fp32" and r["tensors"] == 20 and r["numel"] == 20 * 64
        assert "us per tensor per step" in r["notes"] and r["threads"] == 1 and r["bytes"] is None
        assert r["ratio_to_torch_fused"] > 0
    assert by_backend["torch-fused"]["ratio_to_torch_fused"] == 1.0
    assert "us/tensor" in report.markdown_table(rows)


def test_cpu_rows_are_given_as_a_percentage_of_the_no_math_bound(tmp_path):
    """Issue 22 item 11: on the CPU every elementwise row of a case has its % of the no-math bound
    of its optimizer's bytes (a "peak" row timed just before, csrc/cpu/traffic.cpp), torch's
    AdamW peers included; the table shows the column."""
    from mupopt.kernels.cpp import build

    outcome = build.load_cpu()
    if outcome is not True:
        pytest.skip(f"the cpu library cannot be built here: {outcome}")
    rows, failures = run(Config(device="cpu", mode="smoke", optimizers=("adamw", "lamb"), backends=("cpu",),
                                peers=("torch-fused",), cases=("large",), dtypes=("fp32",)), progress=False)
    assert not failures
    ok = [r for r in rows if r.status == "ok" and r.case == "large"]
    bounds = {r.optimizer: r for r in ok if r.backend == "no-math bound"}
    assert set(bounds) == {"adamw", "lamb"} and all(b.kind == "peak" for b in bounds.values())
    assert bounds["lamb"].bytes == 40 * bounds["lamb"].numel and bounds["adamw"].bytes == 28 * bounds["adamw"].numel
    measured = [r for r in ok if r.kind != "peak"]
    assert {(r.optimizer, r.backend) for r in measured} == {("adamw", "cpu"), ("adamw", "torch-fused"), ("lamb", "cpu")}
    for r in measured:
        assert r.pct_of_bound == pytest.approx(100 * bounds[r.optimizer].median_ms / r.median_ms)
    assert "% of bound" in report.markdown_table(rows) and report.BOUND_NOTE in report.markdown_table(rows)


def test_overhead_target_is_a_quarter_of_torch_fused():
    from mupopt.bench.runner import Row, target_for

    for ratio, met in ((4.5, True), (3.0, False)):
        row = Row("lamb", "cpu", "mupopt", "overhead-300", "fp32", 300 * 64, 300, ratio_to_torch_fused=ratio)
        assert target_for(row, "cpu") == ("host time <= 0.25x torch fused (issue 15)", met)
    assert target_for(Row("lamb", "reference", "mupopt", "overhead-300", "fp32", 1, 300), "cpu") is None


def test_readme_section_names_device_and_date(smoke_run, tmp_path):
    _, out = smoke_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START_MARKER}\nold\n{report.END_MARKER}\n\nafter\n")
    assert report.update_readme(readme, out)
    assert "No results recorded yet" in readme.read_text()  # smoke numbers never reach the README
    assert report.update_readme(readme, out, include_smoke=True)
    text = readme.read_text()
    rows = json.loads(next(out.glob("*.json")).read_text())
    assert "old" not in text and text.endswith("after\n")
    assert rows[0]["device_name"] in text and rows[0]["date"][:10] in text
    assert not report.update_readme(readme, out, include_smoke=True)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, out)


def _wrong_adamw(params, grads, states, mults, hp):
    """AdamW that drifts every parameter by 1e-3 (5% of a parameter of scale 0.02)."""
    adamw_reference(params, grads, states, mults, hp)
    for p in params:
        p.add_(1e-3)


def _ignores_mup(params, grads, states, mults, hp):
    """AdamW that drops the per-tensor muP multipliers: right whenever every multiplier is 1."""
    adamw_reference(params, grads, states, [ONES] * len(params), hp)


def _register(monkeypatch, name, fn):
    monkeypatch.setitem(backends._REGISTRY["adamw"], name, backends.Backend("adamw", name, fn))


def test_precheck_stops_a_wrong_backend(monkeypatch, capsys):
    _register(monkeypatch, "wrong", _wrong_adamw)
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["wrong"], peers=[], cases=["large"], dtypes=["fp32"])
    with pytest.raises(CheckFailed, match="'wrong'.*param\\[0\\]"):
        run(config, progress=False)
    # The command says so and exits with 2, timing nothing.
    status = cli.main(_args("--smoke", "--device", "cpu", "--optimizers", "adamw", "--backends", "wrong", "--peers", "none",
                            "--cases", "large", "--dtypes", "fp32", "--out", "", "-q"))
    assert status == 2
    assert "CORRECTNESS CHECK FAILED" in capsys.readouterr().err


def test_unknown_backend_name_is_an_error(capsys):
    """--backends with a misspelt name timed only the peers and exited 0; like an unknown
    optimizer or dtype it is now exit status 2, naming the registered backends."""
    status = cli.main(_args("--smoke", "--device", "cpu", "--optimizers", "adamw", "--backends", "cpux", "--peers", "none",
                            "--cases", "large", "--dtypes", "fp32", "--out", "", "-q"))
    assert status == 2
    err = capsys.readouterr().err
    assert "unknown backends ['cpux']" in err and "'reference'" in err


def test_case_name_matching_nothing_is_an_error(capsys):
    """--cases with a name that matches no case of the selected optimizers timed only the device
    peaks and exited 0; it is exit status 2 now, and a prefix that matches still runs."""
    status = cli.main(_args("--smoke", "--device", "cpu", "--optimizers", "adamw", "--peers", "none",
                            "--cases", "larg,bogus", "--dtypes", "fp32", "--out", "", "-q"))
    assert status == 2
    assert "--cases ['bogus'] match no case" in capsys.readouterr().err


def test_keep_going_records_the_failure(monkeypatch):
    _register(monkeypatch, "wrong", _wrong_adamw)
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["wrong"], peers=[], cases=["large"],
                    dtypes=["bf16"], keep_going=True)
    rows, failures = run(config, progress=False)
    (row,) = [r for r in rows if r.backend == "wrong"]
    assert row.status == "failed" and row.median_ms is None and "CHECK FAILED" in row.notes
    assert len(failures) == 1


def test_precheck_catches_a_backend_that_ignores_mup_multipliers(monkeypatch):
    # Uniform multipliers hide the bug; the muP case (one lr per tensor) shows it.
    _register(monkeypatch, "nomup", _ignores_mup)
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["nomup"], peers=[], cases=["large"], dtypes=["fp32"])
    rows, _ = run(config, progress=False)
    assert [r.status for r in rows if r.backend == "nomup"] == ["ok"]
    config.cases = ["gpt2-small/32.mup"]
    with pytest.raises(CheckFailed, match="'nomup'.*gpt2-small/32.mup"):
        run(config, progress=False)


def test_bytes_model_matches_the_performance_table():
    fp32 = dict.fromkeys(["param", "grad", "exp_avg", "exp_avg_sq", "hessian"], 4)
    per_param = {k: model.bytes_per_element(k, fp32) for k in model.ELEMENTWISE}
    assert per_param == {"adamw": 28, "adopt": 28, "sophia": 24, "sophia_hessian": 12, "lamb": 40}
    # fp32 p and g with bf16 moments: 20 B (docs/benchmarks.md).
    assert model.bytes_per_element("adamw", {**fp32, "exp_avg": 2, "exp_avg_sq": 2}) == 20


def test_newton_schulz_flop_formula_matches_torchs_count():
    from mupopt.linalg import newton_schulz

    for shape in [(3, 48, 80), (2, 96, 40)]:
        G = torch.randn(*shape)
        counted = model.counted_flops(lambda: newton_schulz(G, 5, check_finite=False))
        assert counted == shape[0] * model.ns_flops(shape[1:])


def test_max_seconds_stops_between_groups_and_still_writes(tmp_path):
    """--max-seconds: no new case group after the budget; what was measured is written, each
    row saying the run stopped early."""
    out = tmp_path / "b"
    status = cli.main(_args("--smoke", "--device", "cpu", "--optimizers", "adamw", "--backends", "reference",
                            "--peers", "none", "--max-seconds", "1e-9", "--out", str(out), "-q"))
    assert status == 0
    rows = json.loads(next(out.glob("*.json")).read_text())
    # The first group (the device peaks) starts before any time has passed; nothing after it.
    assert rows and {r["optimizer"] for r in rows} <= {"copy", "matmul"}
    assert all("--max-seconds" in r["run_note"] and "stopped after 1 of" in r["run_note"] for r in rows)


def test_update_check_allows_a_few_parameter_spacings_and_no_dropped_decay():
    """An fp32 update is compared to the float32 spacing of its parameter: a different rounding
    of p (a few spacings) passes, a dropped weight decay (lr*wd*p) does not."""
    from mupopt.bench.check import compare

    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(1 << 16, generator=gen) * 3  # |p| up to ~13: spacings up to ~1e-6
    upd = torch.randn(1 << 16, generator=gen) * 1e-4
    lr, wd = 1e-3, 0.1
    ref = p0 * (1 - lr * wd) + upd
    spacing = torch.finfo(torch.float32).eps * p0.abs()
    rounded_elsewhere = ref + 3 * spacing * torch.sign(torch.randn(p0.shape, generator=gen))
    compare({"param[0]": ref}, {"param[0]": rounded_elsewhere}, dtype=torch.float32, initial={"param[0]": p0})
    no_decay = p0 + upd
    with pytest.raises(CheckFailed, match=r"param\[0\] \(update\)"):
        compare({"param[0]": ref}, {"param[0]": no_decay}, dtype=torch.float32, initial={"param[0]": p0})


def test_bf16_matrix_update_tolerance_follows_the_parameter_spacing():
    """A bf16 matrix update of a few spacings: rounding 0.5% of the elements the other way
    passes (it is ~1.7% of the update here, above the 1% matrix tolerance); an update half again
    as large does not (the floor here is 0.1 x 1/3: updates of 3 spacings)."""
    from mupopt.bench.check import bf16_spacing, compare

    assert bf16_spacing(torch.tensor([1.0, 1.5, -0.3, 0.0])).tolist() == [2**-7, 2**-7, 2**-9, 0.0]
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(256, 256, generator=gen).bfloat16()
    step = 3 * bf16_spacing(p0) * torch.sign(torch.randn(p0.shape, generator=gen))  # a few spacings
    ref = (p0.double() + step).bfloat16()
    flip = torch.rand(p0.shape, generator=gen) < 0.005
    other = (ref.double() + flip * bf16_spacing(ref)).bfloat16()
    upd = ref.double() - p0.double()
    rel = float(torch.linalg.vector_norm(other.double() - ref.double()) / torch.linalg.vector_norm(upd))
    assert rel > 0.01  # the plain matrix tolerance would refuse it
    compare({"param[0]": ref}, {"param[0]": other}, dtype=torch.bfloat16, initial={"param[0]": p0}, matrix_tol=1e-2)
    wrong = (p0.double() + 1.5 * step).bfloat16()
    with pytest.raises(CheckFailed, match=r"param\[0\] \(update\)"):
        compare({"param[0]": ref}, {"param[0]": wrong}, dtype=torch.bfloat16, initial={"param[0]": p0}, matrix_tol=1e-2)


def test_default_out_is_a_user_folder_and_nothing_is_overwritten(tmp_path, monkeypatch):
    """Without --out, results go to a user folder (never the working directory's tracked
    benchmarks/results); a second run of the same day gets a new name; --force overwrites."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MUPOPT_BENCH_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert report.default_out_dir() == tmp_path / "data" / "mupopt" / "bench"
    monkeypatch.setenv("MUPOPT_BENCH_DIR", str(tmp_path / "mine"))
    assert report.default_out_dir() == tmp_path / "mine"
    argv = ("--smoke", "--device", "cpu", "--optimizers", "adamw", "--backends", "reference", "--peers", "none",
            "--max-seconds", "1e-9", "-q")
    assert cli.main(_args(*argv)) == 0
    assert cli.main(_args(*argv)) == 0
    assert not (tmp_path / "benchmarks").exists()
    stems = sorted(p.stem for p in (tmp_path / "mine").glob("*.json"))
    assert len(stems) == 2 and stems[1] == stems[0] + "-2", stems
    first = tmp_path / "mine" / f"{stems[0]}.json"
    first.write_text("[]")
    assert cli.main(_args(*argv, "--force")) == 0
    assert json.loads(first.read_text())  # overwritten on request only
    assert len(list((tmp_path / "mine").glob("*.json"))) == 2


def test_table_explains_percent_of_peak_above_100(smoke_run):
    _, out = smoke_run
    rows = json.loads(next(out.glob("*.json")).read_text())
    row = next(r for r in rows if r["status"] == "ok" and r["optimizer"] == "adamw")
    assert "values above 100" not in report.markdown_table([dict(row, pct_of_peak=80.0)])
    assert "caches" in report.markdown_table([dict(row, pct_of_peak=140.0)])
    assert "above 100" in report.readme_section(out, include_smoke=True)


def test_result_tables_live_in_docs_benchmarks_and_are_current():
    """The generated tables are in docs/benchmarks.md (the report's default target), regenerated
    from benchmarks/results; the README keeps a short summary and links there."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "benchmarks.md").read_text()
    assert report.DEFAULT_DOC.as_posix() == "docs/benchmarks.md"
    start, end = doc.index(report.START_MARKER), doc.index(report.END_MARKER)
    section = report.readme_section(root / "benchmarks" / "results", "../benchmarks/results")
    assert doc[start + len(report.START_MARKER):end].strip() == section.strip()
    readme = (root / "README.md").read_text()
    assert report.START_MARKER not in readme and "docs/benchmarks.md" in readme
    assert len(readme.splitlines()) < 250
    # ... in lines a reader can read: the length limit is not met by joining paragraphs into one
    # line (tables and images aside).
    long = [i + 1 for i, line in enumerate(readme.splitlines()) if len(line) > 100 and not line.startswith(("|", "!["))]
    assert not long, f"README lines over 100 characters: {long}"


def test_bench_overhead_script_reports_paired_ratios(tmp_path):
    """benchmarks/bench_overhead.py (issue 15's overhead target, paired with torch fused) runs and
    reports a ratio and a verdict per optimizer; numbers here are meaningless (tiny, 1 round)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "overhead.txt"
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_overhead.py"), "--rounds", "1",
                          "--counts", "3", "--backend", "reference", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in out.read_text().splitlines() if "tensors" in line and "ours/fused" in line]
    assert [r.split()[2] for r in rows] == ["AdamW", "ADOPT", "LAMB", "SophiaG"]
    assert all(float(r.split("ours/fused ")[1].split()[0]) > 0 and ("met" in r) for r in rows)


def test_lean_case_times_every_format_and_checks_it(monkeypatch):
    """The GPT-2 list's ``.lean`` group: AdamW with 16- and 8-bit states, and on bf16 params with
    stochastic rounding alone and with 8-bit states, each its own case, each checked against the
    reference backend in the same options; a backend that steps the formats wrongly is stopped."""
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["reference"], peers=[],
                    cases=["gpt2-small/32.lean"], dtypes=["bf16"])
    rows, _ = run(config, progress=False)
    mine = [r for r in rows if r.kind == "mupopt"]
    assert {r.case for r in mine} == {f"gpt2-small/32.{v}" for v in ("states16", "states8", "sr", "sr-states8")}
    assert all(r.status == "ok" for r in mine)
    from mupopt.optim import _lean_states as lean

    wrong = backends.Backend("adamw", "wrong", lean.reference(_wrong_adamw, {"exp_avg": lean.SIGNED,
                                                                             "exp_avg_sq": lean.UNSIGNED}),
                             state_bits=lean.STATE_BITS)
    monkeypatch.setitem(backends._REGISTRY["adamw"], "wrong", wrong)
    config.backends = ["wrong"]
    with pytest.raises(CheckFailed, match="'wrong'.*gpt2-small/32.states16"):
        run(config, progress=False)
