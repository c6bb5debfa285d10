"""`mupopt verify`: the main job runs, covers every optimizer and backend, and fails loudly."""
from __future__ import annotations

import json

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
            if backends._REGISTRY[entry.name][b].unsupported_reason([verify.torch.zeros(1)]) is None
        }
        assert checked == runnable
    assert all(r["passed"] for r in rows)
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
