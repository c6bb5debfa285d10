"""The public peers of `mupopt bench` (mupopt/bench/subjects.py, PEERS): each is declared the same
variant as ours or a different one, and the declaration is measured (measure.equivalence, float64);
peers run in a --smoke run where their library is installed and give a skipped row with the
reason where it is not; a peer that raises gives a failed row, not a crash; the report's peer
table renders. The libraries are optional (`pip install mupopt[peers]`): a peer whose library is
absent is skipped here, never required."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from mupopt.bench import measure as M
from mupopt.bench import report, subjects
from mupopt.bench.runner import Config, run
from mupopt.bench.subjects import PEERS, PEERS_BY_NAME, SUBJECTS, Peer, shampoo_subject
from mupopt.bench.timing import BUDGETS, Timer

CPU = torch.device("cpu")


def _subject(peer: Peer):
    return shampoo_subject(32) if peer.optimizer == "shampoo" else SUBJECTS[peer.optimizer]


def _available(peer: Peer) -> Peer:
    why = peer.unavailable(CPU)
    if why is not None:
        pytest.skip(why)
    return peer


@pytest.mark.parametrize("name", [p.name for p in PEERS])
def test_declared_variant_holds(name):
    """A peer declared the same variant matches our reference to 1e-6; one declared different
    differs, and matches under its neutral settings where it has them (so the text of
    ``differs`` names the whole difference)."""
    peer = _available(PEERS_BY_NAME[name])
    eq = M.equivalence(_subject(peer), peer, CPU)
    assert eq.consistent(peer), eq.label(peer)
    if peer.same_variant:
        assert eq.error <= subjects.EQUIVALENCE_TOL and eq.label(peer).startswith("same variant")
    else:
        assert eq.error > subjects.EQUIVALENCE_TOL and eq.label(peer).startswith("different variant")
        if peer.neutral is not None:
            assert eq.neutral_error <= peer.neutral_tol and "matches to" in eq.label(peer)


def _lr_doubled(peer: Peer) -> Peer:
    factory = peer.factory
    return dataclasses.replace(peer, factory=lambda ps, subject, **kw: factory(
        ps, dataclasses.replace(subject, kwargs={**subject.kwargs, "lr": 2 * subject.kwargs["lr"]}), **kw))


@pytest.mark.parametrize("name", ["torch-fused", "pytorch_optimizer.Muon", "pytorch_optimizer.SophiaH"])
def test_a_wrong_mapping_of_a_same_variant_fails(name):
    peer = _available(PEERS_BY_NAME[name])
    wrong = _lr_doubled(peer)
    eq = M.equivalence(_subject(peer), wrong, CPU)
    assert not eq.consistent(wrong) and eq.label(wrong).startswith("MISMATCH")


@pytest.mark.parametrize("name", ["pytorch_optimizer.ADOPT", "pytorch_optimizer.Lamb", "heavyball.AdamW", "heavyball.Muon",
                                  "pytorch_optimizer.ScalableShampoo"])
def test_a_wrong_mapping_of_a_different_variant_fails(name):
    """The neutral comparison catches a mapping error that "differs anyway" would hide."""
    peer = _available(PEERS_BY_NAME[name])
    wrong = _lr_doubled(peer)
    eq = M.equivalence(_subject(peer), wrong, CPU)
    assert not eq.consistent(wrong) and "still DIFFERS" in eq.label(wrong)


def test_a_same_variant_that_differs_is_not_declared_the_same():
    """pytorch-optimizer's ADOPT (clip mapped to our step count) differs only by its first-call
    decay: declaring it the same variant fails."""
    peer = _available(PEERS_BY_NAME["pytorch_optimizer.ADOPT"])
    claimed_same = dataclasses.replace(peer, differs="", neutral=None)
    eq = M.equivalence(SUBJECTS["adopt"], claimed_same, CPU)
    assert not eq.consistent(claimed_same)
    # ... and without the clip mapping it also differs with no decay: the mapping matters.
    unmapped = dataclasses.replace(peer, factory=lambda ps, subject, **kw: peer.factory(ps, subject, clip_lambda=lambda s: s ** 0.25, **kw))
    assert M.equivalence(SUBJECTS["adopt"], unmapped, CPU).neutral_error > 1e-3


@pytest.fixture(scope="module")
def peer_rows():
    """A --smoke run of the optimizers that have library peers, on the one-tensor case (and
    Muon's and Shampoo's model lists), fp32: every peer's row."""
    installed = [m for m in ("pytorch_optimizer", "heavyball") if importlib.util.find_spec(m) is not None]
    if not installed:
        pytest.skip("neither pytorch-optimizer nor heavyball is installed (pip install mupopt[peers])")
    config = Config(device="cpu", mode="smoke", optimizers=["adamw", "adopt", "lamb", "sophia", "muon", "shampoo"],
                    backends=["reference"], peers=[p.name for p in PEERS], cases=["large", "gpt2-small"], dtypes=["fp32"])
    rows, failures = run(config, progress=False)
    assert not failures
    return rows


def test_peer_rows_appear_with_their_label(peer_rows):
    by_name = {}
    for r in peer_rows:
        if r.kind == "peer" and r.backend in PEERS_BY_NAME:
            by_name.setdefault(r.backend, []).append(r)
    for peer in PEERS:
        if peer.unavailable(CPU) is not None:
            assert all(r.status == "skipped" for r in by_name[peer.name]), peer.name
            continue
        rows = by_name[peer.name]
        assert rows, peer.name
        for r in rows:
            if r.status == "skipped":  # pytorch-optimizer's Shampoo on a list with a long side
                assert peer.refuses is not None and "no blocking" in r.notes
                continue
            assert r.status == "ok" and r.median_ms > 0, (peer.name, r.notes)
            assert ("same variant: matches" if peer.same_variant else "different variant:") in r.notes
            if peer.library != "torch":
                assert f"{peer.library} {peer.version()}" in r.notes
            # A same variant is also checked on the case (its check_err); a different one is not.
            assert (r.check_err is not None) == peer.same_variant, (peer.name, r.check_err)
            if peer.compiles:
                assert "eager (--smoke compiles nothing)" in r.notes


def test_cuda_only_peers_skip_with_a_reason_on_the_cpu(peer_rows):
    for name in ("torchao.AdamW8bit", "bitsandbytes.AdamW8bit"):
        rows = [r for r in peer_rows if r.backend == name]
        assert rows and all(r.status == "skipped" and r.notes.startswith("needs CUDA") for r in rows)


def test_peer_rows_are_timed_in_the_rounds_of_ours(peer_rows):
    """Ours and the peers of a subject come from the same rounds: the same number of repetitions."""
    for opt, case in {(r.optimizer, r.case) for r in peer_rows if r.kind == "peer" and r.status == "ok"}:
        reps = {r.reps for r in peer_rows if (r.optimizer, r.case) == (opt, case) and r.status == "ok"
                and r.backend != "compile" and r.kind in ("mupopt", "peer")}
        assert len(reps) == 1, (opt, case, reps)


def test_an_absent_library_gives_skipped_rows_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "heavyball" else real(name, *a, **k))
    config = Config(device="cpu", mode="smoke", optimizers=["adamw"], backends=["reference"], peers=["heavyball", "torch-fused"],
                    cases=["large"], dtypes=["fp32"])
    rows, _ = run(config, progress=False)
    (hb,) = [r for r in rows if r.backend == "heavyball.AdamW"]
    assert hb.status == "skipped" and "heavyball is not installed" in hb.notes and "mupopt[peers]" in hb.notes
    assert [r.status for r in rows if r.backend == "torch-fused"] == ["ok"]


def test_a_peer_that_raises_is_a_failed_row_not_a_crash(monkeypatch):
    """pytorch-optimizer's Muon given a plain parameter list (what torch.optim.Muon takes) raises:
    the row says so and the run goes on."""
    if importlib.util.find_spec("pytorch_optimizer") is None:
        pytest.skip("pytorch-optimizer is not installed")
    plain = dataclasses.replace(PEERS_BY_NAME["pytorch_optimizer.Muon"], name="pytorch_optimizer.Muon-plain-list",
                                factory=subjects._library("pytorch_optimizer", "Muon", subjects._muon_kw))
    monkeypatch.setattr(subjects, "PEERS", PEERS + (plain,))
    monkeypatch.setattr(subjects, "PEER_NAMES", subjects.PEER_NAMES + (plain.name,))
    config = Config(device="cpu", mode="smoke", optimizers=["muon"], backends=["reference"],
                    peers=[plain.name, "torch-muon"], dtypes=["fp32"])
    rows, failures = run(config, progress=False)
    (bad,) = [r for r in rows if r.backend == plain.name]
    assert bad.status == "failed" and "raised RuntimeError" in bad.notes and bad.median_ms is None
    assert not failures  # a peer's failure does not fail the run
    assert [r.status for r in rows if r.backend in ("reference", "torch-muon") and r.optimizer == "muon"] == ["ok", "ok"]


def test_peers_option_takes_library_names():
    assert subjects.expand_peer_names(["heavyball"]) == {p.name for p in PEERS if p.library == "heavyball"}
    assert subjects.expand_peer_names(["pytorch_optimizer", "torch-fused"]) == (
        {p.name for p in PEERS if p.library == "pytorch-optimizer"} | {"torch-fused"})
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        subjects.expand_peer_names(["nope"])


def _fake(optimizer, backend, kind, ms, case="large", dtype="fp32", status="ok", notes=""):
    ms = ms if status == "ok" else None
    return dict(optimizer=optimizer, backend=backend, kind=kind, case=case, dtype=dtype, status=status,
                median_ms=ms, p20_ms=ms, p80_ms=ms, notes=notes)


def test_peer_table_renders_from_a_fake_run(tmp_path):
    rows = [
        _fake("adamw", "cpu", "mupopt", 2.0), _fake("adamw", "reference", "mupopt", 9.0),
        _fake("adamw", "torch-fused", "peer", 2.4), _fake("adamw", "heavyball.AdamW", "peer", 3.0, notes="eager (x)"),
        _fake("adamw", "compile", "peer", 1.0),  # not a public peer: never "best"
        _fake("adamw", "torchao.AdamW8bit", "peer", None, status="skipped", notes="needs CUDA: reasons"),
        _fake("lamb", "reference", "mupopt", 10.0), _fake("lamb", "pytorch_optimizer.Lamb", "peer", 23.0),
        _fake("adamw", "cpu", "mupopt", 1.0, case="gpt2"),  # no peer measured there: no line
    ]
    table = report.peer_table(rows)
    lines = table.splitlines()
    assert lines[2] == ("| adamw | large | fp32 | cpu 2 | torch-fused 2.4 | 1.20x | same | "
                        "heavyball.AdamW (eager) 1.50x (different) |")
    assert lines[3] == "| lamb | large | fp32 | reference 10 | pytorch_optimizer.Lamb 23 | 2.30x | different |  |"
    assert not any("| gpt2 |" in line for line in lines)
    assert f"- pytorch_optimizer.Lamb: {PEERS_BY_NAME['pytorch_optimizer.Lamb'].differs}" in table
    assert "- torchao.AdamW8bit not measured: needs CUDA: reasons" in table
    mismatch = report.peer_table([rows[0], _fake("adamw", "torch-fused", "peer", 2.0, notes="MISMATCH: declared the same")])
    assert "| MISMATCH |" in mismatch
    assert report.peer_table([rows[0], rows[1]]) == ""
    # ... and it is part of the doc's section for a run that has peer rows.
    full = [dict(r, mode="quick", device="cpu", device_name="CPU", date="2026-12-07T00:00:00") for r in rows]
    (tmp_path / "cpu-2026-12-07.json").write_text(json.dumps(full))
    assert "Against the public peers" in report.readme_section(tmp_path) and lines[2] in report.readme_section(tmp_path)


def test_time_rounds_runs_setups_untimed_and_every_callable_each_round():
    calls = []
    timer = Timer(CPU, BUDGETS["smoke"])
    fns = [lambda k=k: calls.append(("call", k)) for k in range(3)]
    setups = [lambda k=k: calls.append(("setup", k)) for k in range(3)]
    timings = timer.time_rounds(fns, setups)
    assert [t.reps for t in timings] == [2, 2, 2]
    # Each call right after its own setup; one warm-up call each, then 2 rounds of all three.
    assert all(calls[i][0] == "setup" and calls[i + 1] == ("call", calls[i][1]) for i in range(0, len(calls), 2))
    assert len(calls) == 2 * 3 * 3
    rounds = [k for kind, k in calls[6:] if kind == "call"]
    assert sorted(rounds[:3]) == sorted(rounds[3:]) == [0, 1, 2] and rounds[:3] != rounds[3:]


def test_heavyball_runs_eager_or_compiled_as_the_bench_says_and_restores_its_setting():
    """HeavyBall compiles its fused functions unless heavyball.utils.compile_mode is None (read at
    each call): the bench's eager rows set it to None for their calls only."""
    peer = _available(PEERS_BY_NAME["heavyball.AdamW"])
    from heavyball import utils

    configured = utils.compile_mode
    seen = []
    for compiled in (False, True):
        p = dataclasses.replace(peer, compiled=compiled)
        params = [torch.zeros(4, requires_grad=True)]
        params[0].grad = torch.ones(4)
        opt = p.make(params)
        opt.step = lambda **kw: seen.append(utils.compile_mode)
        p.step(opt)
        assert utils.compile_mode == configured
    assert seen == [None, configured] and configured is not None


def test_the_shared_gradients_are_back_after_a_peer_that_drops_them():
    """HeavyBall sets p.grad = None after its step and library peers step gradients of their own:
    after a subject's rounds the params carry the shared gradients again, for the next subject
    (the elementwise group steps AdamW, ADOPT, LAMB and SophiaG on the same params)."""
    from mupopt.bench import cases as C
    from mupopt.bench.runner import Group, Progress, Runner

    peer = _available(PEERS_BY_NAME["heavyball.AdamW"])
    runner = Runner(Config(device="cpu", mode="smoke", backends=["reference"], peers=[peer.name]), progress=False)
    runner.progress = Progress(1, enabled=False)
    case = C.Case("two", ((64,), (8, 8)))
    params = C.make_params(case.shapes, torch.float32, CPU)
    grads = [p.grad for p in params]
    # The peer alone: the last timed call is its own.
    runner._subject(SUBJECTS["adamw"], Group("elementwise", case, "fp32", ("adamw",)), params,
                    cost=M.elementwise_cost("adamw"), peers=[peer], only_peers=True, compile_peer=False)
    assert [r.status for r in runner.rows] == ["ok"]
    assert all(p.grad is g for p, g in zip(params, grads))
