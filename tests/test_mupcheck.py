"""mupopt.mupcheck (`mupopt coord-check`, `mupopt transfer`) at toy scale: two widths, a few steps.

The coordinate-check assertions use the MLP family at widths 64 and 512 (a slope measured over
three octaves) and the thresholds of mupopt.mupcheck.coord_check (FLAT = 0.2:
muP's change since init may not grow faster than width^0.2). What the full-size runs measured is
in docs/mup-results.md.
"""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from mupopt.mupcheck import coord_check, transfer
from mupopt.mupcheck.models import ModelConfig, build_model, layer_type, load_corpus
from mupopt.mupcheck.train import OPTIMIZERS, SIX, to_frame

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
MUP_COLUMNS = ["width", "module", "t", "l1"]


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    # muP's small readout and gradients hit slow subnormal floats on CPU; the tools' run() set
    # this too and put the previous mode back (mupopt.mupcheck.train.flushing_denormals), as
    # this fixture does for the tests after it, with torch's threads started first.
    torch.ones(1 << 20).add_(1.0)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _slopes(records, opt):
    return {r["layer_type"]: r for r in coord_check.verdicts(records) if r["optimizer"] == opt}


@pytest.fixture(scope="module")
def mlp_adamw_muon():
    return coord_check.coord_data(["adamw", "muon"], [64, 512], model="mlp", steps=4, seeds=1)


def test_adamw_mup_flat_and_flatter_than_sp(mlp_adamw_muon):
    rows = _slopes(mlp_adamw_muon, "adamw")
    assert set(rows) == {"input", "hidden", "output"}
    for lt, r in rows.items():
        assert abs(r["mup_delta_slope"]) < coord_check.FLAT, (lt, r)
        assert r["mup_flat"] is True
    for lt in ("hidden", "output"):  # the layers whose SP lr is too large by a factor m
        assert rows[lt]["sp_delta_slope"] > coord_check.GROW, rows[lt]
        assert rows[lt]["sp_delta_slope"] > abs(rows[lt]["mup_delta_slope"]) + 0.3, rows[lt]


def test_muon_mup_flat(mlp_adamw_muon):
    rows = _slopes(mlp_adamw_muon, "muon")
    for lt, r in rows.items():
        assert abs(r["mup_delta_slope"]) < coord_check.FLAT, (lt, r)


def test_gpt_mup_flatter_than_sp_for_adamw():
    records = coord_check.coord_data(["adamw"], [32, 128], model="gpt", steps=3, seeds=1, batch=4, seq=16)
    rows = _slopes(records, "adamw")
    assert {"input", "attn_qkv", "attn_logits", "attn_out", "mlp_fc", "mlp_out", "residual", "output"} <= set(rows)
    for lt in ("attn_qkv", "mlp_fc", "mlp_out", "residual", "output"):
        r = rows[lt]
        assert r["mup_delta_slope"] < coord_check.FLAT, (lt, r)
        assert r["sp_delta_slope"] > r["mup_delta_slope"] + 0.3, (lt, r)


def test_records_have_mup_columns():
    records = coord_check.coord_data(["adamw"], [32, 64], model="mlp", steps=2, seeds=1, params=("mup",))
    frame = coord_check.get_coord_data(["adamw"], [32, 64], model="mlp", steps=2, seeds=1, params=("mup",))
    expected = MUP_COLUMNS + list(coord_check.EXTRA_COLUMNS)
    for r in records:
        assert list(r)[:4] == MUP_COLUMNS and set(expected) <= set(r)
    assert {r["t"] for r in records} == {1, 2}  # mup's convention: t counts from 1
    assert all(r["delta_rms"] == 0.0 for r in records if r["t"] == 1)
    if importlib.util.find_spec("pandas") is not None:
        assert list(frame.columns[:4]) == MUP_COLUMNS and set(expected) <= set(frame.columns)
    else:
        assert isinstance(frame, list) and set(expected) <= set(frame[0])


def test_to_frame_without_pandas(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("no pandas")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    rows = [{"width": 1, "module": "m", "t": 1, "l1": 0.5}]
    assert to_frame(rows) is rows


def test_coord_check_writes_files(tmp_path):
    result = coord_check.run(["adamw"], [32, 64], out=tmp_path, model="gpt", steps=2, seeds=1, batch=2, seq=8)
    names = {p.name for p in result["files"]}
    assert {"coord-gpt.csv", "coord-gpt-verdict.json"} <= names
    header = (tmp_path / "coord-gpt.csv").read_text().splitlines()[0].split(",")
    assert set(MUP_COLUMNS) <= set(header)
    verdict = json.loads((tmp_path / "coord-gpt-verdict.json").read_text())
    assert verdict["verdicts"] and "mup_delta_slope" in verdict["verdicts"][0]
    if HAVE_MPL:
        png = tmp_path / "coord-gpt-adamw.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(coord_check, "pyplot", lambda: None)
    result = coord_check.run(["adamw"], [32, 64], out=tmp_path, model="mlp", steps=2, seeds=1, params=("mup",))
    assert not any(p.suffix == ".png" for p in result["files"])
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_transfer_writes_files_and_summary(tmp_path):
    result = transfer.run(["adamw"], [32, 64], out=tmp_path, params=("sp", "mup"), lrs=[1e-3, 1e-2],
                          steps=4, batch=2, seq=16, eval_batches=1)
    names = {p.name for p in result["files"]}
    assert {"transfer.csv", "transfer.json", "transfer-summary.json"} <= names
    runs = json.loads((tmp_path / "transfer.json").read_text())
    assert len(runs) == 2 * 2 * 2  # params x widths x lrs
    summary = json.loads((tmp_path / "transfer-summary.json").read_text())["summary"]
    assert {s["param"] for s in summary} == {"sp", "mup"}
    for s in summary:
        assert s["widths"] == [32, 64] and len(s["best_lr"]) == 2
        assert 0 <= s["shift_steps"] <= 1
    if HAVE_MPL:
        assert (tmp_path / "transfer-adamw.png").exists()


def test_transfer_weight_decay_modes_and_lamb_variants(tmp_path):
    records = transfer.sweep(["adamw", "lamb", "lamb-strict"], [32, 64], params=("mup",),
                             wd_modes=("independent", "coupled"), lrs=[1e-2], steps=2, batch=2, seq=8, eval_batches=1)
    modes = {(r["optimizer"], r["wd_mode"]) for r in records}
    assert modes == {("adamw", "independent"), ("adamw", "coupled"), ("lamb", "independent"),
                     ("lamb-strict", "independent")}


def test_models_sp_and_mup_agree_at_base_width():
    cfg = ModelConfig(kind="gpt", base_width=32, vocab=20, block_size=8)
    sp, mup = build_model(cfg, 32, "sp", seed=3), build_model(cfg, 32, "mup", seed=3)
    for (n, a), (_, b) in zip(sp.named_parameters(), mup.named_parameters()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, 20, (2, 8))
    assert torch.allclose(sp(ids), mup(ids))
    wide = build_model(cfg, 128, "mup")
    assert wide.readout.weight.std().item() == pytest.approx(0.02 / 4, rel=0.15)
    assert wide.blocks[0].attn.scale == pytest.approx(math.sqrt(8) / 32)
    assert build_model(cfg, 128, "sp").blocks[0].attn.scale == pytest.approx(1 / math.sqrt(32))


def test_layer_types_and_corpus():
    assert layer_type("gpt", "blocks.0.attn.logits") == "attn_logits"
    assert layer_type("gpt", "blocks.1") == "residual"
    assert layer_type("gpt", "blocks.1.ln1") is None
    assert layer_type("mlp", "hidden.0") == "hidden"
    data = load_corpus()
    assert 50 <= data.vocab <= 100 and len(data.train) > 80_000
    assert set(SIX) <= set(OPTIMIZERS)


# ---------------------------------------------------------------------------------------------
# Depth (mupopt.set_base_depth): the check over depth and the sweep over depth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt", ["adamw", "muon"])
def test_depth_rule_keeps_the_residual_stream_change_flat_and_sp_does_not(opt):
    """Depths 2 and 16 (three octaves) at width 16: the change of the residual stream the readout
    sees ("stream") grows with depth in SP (each block adds a Theta(1) change) and stays flat
    under CompleteP (alpha 1: each block adds Theta(1/L))."""
    records = coord_check.coord_data([opt], [16], depths=(2, 16), steps=3, seeds=1, batch=2, seq=8)
    rows = _slopes(records, opt)
    stream = rows["stream"]
    assert stream["axis"] == "depth"
    assert stream["depth_flat"], stream
    assert stream["sp_grows"], stream
    assert stream["sp_delta_slope"] > stream["depth_delta_slope"] + 0.4, stream
    assert {r["depth"] for r in records} == {2, 16}


def test_depth_models_apply_the_residual_multiplier():
    cfg = ModelConfig(kind="gpt", base_width=16, depth=8, alpha=0.5, base_depth=2, block_size=8)
    model = build_model(cfg, 16, "mup")
    assert all(b.residual == pytest.approx(0.5) for b in model.blocks)
    assert model.mupopt_residual_multiplier == pytest.approx(0.5)
    sp = build_model(ModelConfig(kind="gpt", base_width=16, depth=8, block_size=8), 16, "mup")
    assert all(b.residual == 1.0 for b in sp.blocks)


def test_transfer_over_depth_writes_a_depth_summary(tmp_path):
    result = transfer.run(["adamw"], [16], depths=(2, 4), out=tmp_path, plots=False, lrs=[1e-3, 1e-2], steps=2,
                          batch=2, seq=8, eval_batches=1)
    rows = {r["param"]: r for r in result["summary"]}
    assert set(rows) == {"sp", "depth"}
    assert rows["depth"]["axis"] == "depth" and rows["depth"]["widths"] == [2, 4]
    assert json.loads((tmp_path / "transfer-summary.json").read_text())["settings"]["depths"] == [2, 4]


def test_joint_width_and_depth_sweep_pairs_them(tmp_path):
    records = transfer.sweep(["adamw"], [16, 32], depths=(2, 4), joint=True, lrs=[1e-2], steps=1, batch=2, seq=8,
                             eval_batches=1)
    assert {(r["param"], r["width"], r["depth"]) for r in records} == {
        (p, w, d) for p in ("sp", "depth") for w, d in ((16, 2), (32, 4))}
    with pytest.raises(ValueError, match="pairs widths with depths"):
        transfer.sweep(["adamw"], [16, 32], depths=(2, 4, 8), joint=True, lrs=[1e-2], steps=1)


def test_depth_sweep_sp_and_rule_coincide_at_the_base_depth():
    """At the base depth the depth rule is the identity: SP and the rule give the same run (for
    Muon too, whose routing follows the width information both keep)."""
    records = transfer.sweep(["muon"], [16], depths=(2, 4), lrs=[1e-2], steps=2, batch=2, seq=8, eval_batches=1)
    at_base = {r["param"]: r["val_loss"] for r in records if r["depth"] == 2}
    assert at_base["sp"] == at_base["depth"]


def test_tools_put_the_denormal_mode_back():
    """coord-check and transfer flush subnormals while they run and restore the mode after
    (it is process-wide: left on, a later test of stochastic rounding saw 1e-40 become 0)."""
    from mupopt.mupcheck.train import flushing_denormals

    def subnormal_survives():
        return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() != 0.0

    try:
        for before in (False, True):
            torch.set_flush_denormal(before)
            assert not flushing_denormals(subnormal_survives)()
            assert subnormal_survives() == (not before)
        assert coord_check.run.__wrapped__ and transfer.run.__wrapped__  # both tools decorated
    finally:
        torch.set_flush_denormal(True)  # this module's fixture mode


def test_bf16_model_is_the_fp32_init_rounded_with_its_width_information():
    from mupopt.mup import width_info

    cfg = ModelConfig(kind="gpt", base_width=32, vocab=20, block_size=8)
    fp32, bf16 = build_model(cfg, 64, "mup", seed=3), build_model(cfg, 64, "mup", seed=3, param_dtype="bf16")
    for (n, a), (_, b) in zip(fp32.named_parameters(), bf16.named_parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.bfloat16(), b), n
        assert width_info(b) == width_info(a) and width_info(b) is not None, n
    with pytest.raises(ValueError, match="param_dtype"):
        build_model(cfg, 64, "mup", param_dtype="fp16")


# flags -> (stochastic_rounding, kahan_summation, state_bits, param dtype)
STORAGE_FLAGS = {
    "sr": (["--param-dtype", "bf16", "--stochastic-rounding", "--state-bits", "16"], (True, False, 16, torch.bfloat16)),
    "kahan": (["--param-dtype", "bf16", "--kahan-summation"], (False, True, 32, torch.bfloat16)),
    "none": ([], (False, False, 32, torch.float32)),
}


@pytest.mark.parametrize("tool", ["transfer", "coord-check"])
def test_param_dtype_and_param_store_flags_reach_the_optimizer(tool, tmp_path, monkeypatch):
    """`--param-dtype bf16 --stochastic-rounding` (and `--state-bits`), `--param-dtype bf16
    --kahan-summation`: the optimizers the tool builds step bf16 params with the option on (each
    stepped param drew its rounding seed, or holds a compensation); without the flags, float32
    params and neither. The transfer records say which."""
    module = transfer if tool == "transfer" else coord_check
    made = []
    real = module.make_optimizer

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, "make_optimizer", spy)
    tiny = (["--widths", "16", "--points", "1", "--eval-batches", "1"] if tool == "transfer" else
            ["--widths", "16,32", "--seeds", "1"])
    common = ["--optimizers", "adamw,muon", "--params", "mup", "--steps", "2", "--batch", "2", "--seq", "8",
              "--no-plots", *tiny]
    for case, (flags, (sr, kahan, bits, dtype)) in STORAGE_FLAGS.items():
        made.clear()
        module.main(module.build_parser().parse_args([*common, "--out", str(tmp_path / case), *flags]))
        assert made
        for opt in made:
            params = [p for g in opt.param_groups for p in g["params"]]
            assert all(g["stochastic_rounding"] is sr and g["kahan_summation"] is kahan and g["state_bits"] == bits
                       for g in opt.param_groups)
            assert {p.dtype for p in params} == {dtype}
            stepped = [opt.state[p] for p in params if opt.state[p]]
            assert stepped
            assert all(("sr_seed" in st) is sr and ("param_compensation" in st) is kahan for st in stepped)
        if tool == "transfer":
            rows = json.loads((tmp_path / case / "transfer.json").read_text())
            assert {(r["param_dtype"], r["stochastic_rounding"], r["kahan_summation"]) for r in rows} == {
                ("bf16" if dtype == torch.bfloat16 else "fp32", sr, kahan)}


@pytest.mark.parametrize("tool", ["transfer", "coord-check"])
def test_stochastic_rounding_with_kahan_summation_refused(tool, capsys):
    """Both ways of storing bf16 params at once: a usage error (exit status 2) naming both flags,
    before any run, as the optimizers refuse both with a ValueError."""
    from mupopt import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([tool, "--param-dtype", "bf16", "--stochastic-rounding", "--kahan-summation", "--no-plots"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--kahan-summation" in err and "--stochastic-rounding" in err and "not allowed" in err
