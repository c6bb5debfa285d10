"""`mupopt verify`: the main job runs, covers every optimizer and backend, and fails loudly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mupopt import backends, cli, verify


def test_verify_covers_every_optimizer_and_passes(tmp_path, capsys):
    out = tmp_path / "verify.json"
    assert cli.main(["verify", "--device", "cpu", "--steps", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["optimizer"] for r in rows} == {e.name for e in verify.OPTIMIZERS}
    for entry in verify.OPTIMIZERS:
        checked = {r["backend"] for r in rows if r["optimizer"] == entry.name}
        runnable = {
            b for b in backends.names(entry.name)
            if backends._REGISTRY[entry.name][b].unsupported_reason([torch.zeros(4, 4)]) is None
        }
        assert checked == runnable
    assert all(r["passed"] for r in rows)
    # every backend that steps 8-bit states gets a row for them
    for entry in verify.OPTIMIZERS:
        for b in {r["backend"] for r in rows if r["optimizer"] == entry.name} - {"reference"}:
            has = any(r["against"] == "reference backend (state_bits=8)" for r in rows
                      if r["optimizer"] == entry.name and r["backend"] == b)
            both = all(8 in backends.get(entry.name, x).state_bits for x in (b, "reference"))
            assert has == both, (entry.name, b)
            # and every backend with kahan_summation (both sides) one for it
            has = any(r["against"] == "reference backend (bf16, kahan_summation)" for r in rows
                      if r["optimizer"] == entry.name and r["backend"] == b)
            both = all(backends.get(entry.name, x).kahan_summation for x in (b, "reference"))
            assert has == both, (entry.name, b)
    table = capsys.readouterr().out
    assert "| optimizer" in table and "passed, 0 failed" in table


def test_verify_reports_a_wrong_backend(monkeypatch):
    """A backend that computes something else must show up as FAIL (the check can fail)."""
    table = backends._REGISTRY["adamw"]
    real = table["reference"]

    def off_by_a_bit(params, grads, states, mults, hp):
        real.fn(params, grads, states, mults, hp)
        for p in params:
            p.add_(1e-3)

    monkeypatch.setitem(table, "reference", backends.Backend("adamw", "reference", off_by_a_bit))
    monkeypatch.setattr(verify, "OPTIMIZERS", [e for e in verify.OPTIMIZERS if e.name == "adamw"])
    rows = verify.run(["cpu"], steps=2)
    assert rows and not any(r.passed for r in rows)


@pytest.mark.parametrize("check,option", [(verify.KAHAN, "kahan_summation"), (verify.SR, "stochastic_rounding")])
def test_verify_store_rows_fail_for_a_backend_that_ignores_the_option(monkeypatch, check, option):
    """A backend that says it has the option but stores to nearest fails the row by more than
    10x its atol; the real cpu backend passes. kahan_summation: the row compares p + c, so the
    params alone (within a bf16 spacing of the reference's) would not show it. Stochastic
    rounding: the same random bits as the reference, so the params are equal (measured: every
    element, all four cpu optimizers), and a store to nearest differs in 70-75% of them, by up
    to several spacings after 10 steps (measured: 9.4e-2, atol 6.1e-5)."""
    import dataclasses

    from mupopt.kernels import cpp

    cpp.register()
    if cpp.cpu_unsupported_reason([torch.zeros(4)]) is not None:
        pytest.skip("the cpu backend is not built here")
    entry = next(e for e in verify.OPTIMIZERS if e.name == "adamw")
    assert verify._check(entry, "cpu", "cpu", check, 10).passed
    real = backends.get("adamw", "cpu")

    def nearest(params, grads, states, mults, hp, **kw):
        real.fn(params, grads, states, mults, dataclasses.replace(hp, **{option: False}), **kw)

    monkeypatch.setitem(backends._REGISTRY["adamw"], "cpu",
                        dataclasses.replace(real, fn=nearest, bind=None, capturable=False))
    row = verify._check(entry, "cpu", "cpu", check, 10)
    assert not row.passed and row.max_abs > 10 * row.atol, verify.format_rows([row])


def test_verify_lists_every_backend_it_did_not_check(capsys):
    """Every registered (optimizer, backend) is either a row or a line saying why not and how
    to include it; the table shows each row's atol and rtol and the pass rule."""
    assert cli.main(["verify", "--device", "cpu", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    rows = verify.run(["cpu"], steps=1)
    checked = {(r.optimizer, r.backend) for r in rows}
    left_out = verify.unchecked(["cpu"])
    for entry in verify.OPTIMIZERS:
        for b in backends.names(entry.name):
            assert ((entry.name, b) in checked) != any(u.optimizer == entry.name and u.backend == b for u in left_out), (entry.name, b)
    for u in left_out:
        assert f"- {u.optimizer} / {u.backend}: {u.reason}. To include it: {u.how}" in out
        if u.backend == "triton":
            assert "TRITON_INTERPRET=1" in u.how
    if not torch.cuda.is_available():
        assert any(u.backend == "cuda" for u in left_out)
    assert "atol + rtol*|theirs|" in out and "| atol" in out and "| rtol" in out
    shampoo = next(r for r in rows if r.optimizer == "shampoo" and r.against.startswith("float64"))
    assert (shampoo.rtol, shampoo.atol) == verify.OPTIMIZERS[-1].oracle_tol
    assert f"{shampoo.atol:.1e}" in out


def test_verify_checks_only_the_optimizers_and_backends_named(tmp_path, capsys):
    """--optimizer and --backend narrow the checks (and the not-checked list) to what they name;
    a name verify does not know is an error, not an empty run that passes."""
    out = tmp_path / "verify.json"
    argv = ["verify", "--device", "cpu", "--steps", "2", "--optimizer", "adamw", "--optimizer", "lamb",
            "--backend", "reference", "--json", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())
    assert {(r["optimizer"], r["backend"]) for r in rows} == {("adamw", "reference"), ("lamb", "reference")}
    printed = capsys.readouterr().out
    assert "/ triton" not in printed and "shampoo" not in printed
    for argv, word in ((["--optimizer", "adam"], "'adam'"), (["--backend", "fused"], "'fused'")):
        assert cli.main(["verify", "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err
        assert word in err and "unknown" in err


def test_verify_refuses_a_selection_that_checks_nothing(capsys):
    """--optimizer muon --backend cpu (Muon has no cpu backend) checked nothing, exited 0 and
    printed "Every registered backend of the selected optimizers and backends was checked";
    --device cuda on a machine without CUDA ended in torch's AssertionError traceback. Both
    are usage errors (exit status 2) that name the problem."""
    assert cli.main(["verify", "--device", "cpu", "--optimizer", "muon", "--backend", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'muon' has no backend 'cpu'" in err and "triton" in err and "reference" in err
    if not torch.cuda.is_available():
        assert cli.main(["verify", "--device", "cuda", "--optimizer", "adamw"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err


def test_verify_checks_muon_and_shampoo_triton_under_the_interpreter():
    """Under TRITON_INTERPRET=1 the Triton backends of Muon (never checked before: a 1-D probe
    left it out) and Shampoo (failed at a tolerance tighter than its roots allow) are checked
    and pass."""
    code = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n" + textwrap.dedent("""
        import interpreter_speed
        interpreter_speed.install()  # test speed only
        from mupopt import verify
        rows = verify.run(["cpu"], steps=10, optimizers=["muon", "shampoo"], backend_names=["triton"])
        print(verify.format_rows(rows))
        got = {}
        for r in rows:  # five rows each: fp32 params, bf16 params with stochastic rounding and
                        # with kahan_summation, 16- and 8-bit states
            if r.backend == "triton":
                got[(r.optimizer, r.backend)] = got.get((r.optimizer, r.backend), True) and r.passed
        assert got == {("muon", "triton"): True, ("shampoo", "triton"): True}, got
        assert len(rows) == 10 and all(r.backend == "triton" for r in rows)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_verify_checks_the_lean_state_formats_where_a_backend_steps_them():
    """Rows "reference-states16/8" for every backend that registers the format; they pass for
    the cpu backend, and the 8-bit row's tolerance separates 8-bit from 32-bit states (a row
    that compared the wrong formats would fail)."""
    from mupopt.kernels import cpp

    cpp.register()
    entry = next(e for e in verify.OPTIMIZERS if e.name == "adamw")
    if cpp.cpu_unsupported_reason([torch.zeros(4)]) is not None:
        pytest.skip("the cpu backend is not built here")
    rows = [verify._check(entry, "cpu", "cpu", against, 5) for against in verify.LEAN]
    assert [r.against for r in rows] == ["reference backend (state_bits=16)", "reference backend (state_bits=8)"]
    assert all(r.passed for r in rows), verify.format_rows(rows)
    # The same 5 steps with 32-bit states differ from the 8-bit run by more than the row allows.
    model8, model32 = verify._models("cpu", True), verify._models("cpu", True)
    opt8 = entry.cls(model8.parameters(), **entry.kwargs, state_bits=8, backend="cpu")
    opt32 = entry.cls(model32.parameters(), **entry.kwargs, backend="cpu")
    for opt, model in ((opt8, model8), (opt32, model32)):
        verify._train(entry, opt, model, [], 5, "cpu")
    assert any("exp_avg_absmax" in st for st in opt8.state.values())  # the 4096-element matrix
    _, _, same = verify._compare(list(model8.parameters()), [p.detach() for p in model32.parameters()],
                                 rows[1].rtol, rows[1].atol)
    assert not same

