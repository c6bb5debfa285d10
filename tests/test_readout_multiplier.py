"""mupopt.readout_multiplier_: muP's forward readout multiplier 1/m (Microsoft mup's MuReadout /
MuSharedReadout) for readouts tied to the embedding and, as the alternative form of the output
rule, for untied readouts: the error that names it, its state, its summary line, and a coordinate
check in which a tied-embedding GPT's logits stay flat across widths with it and grow without."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mupopt
from mupopt.mup import multipliers
from mupopt.mupcheck.coord_check import FLAT, GROW, VANISH

from models import TinyGPT, token_batch

BASE = 32
POS = {"pos": "input"}
TIED = {**POS, "tok.weight": "input"}


def shaped(width: int, tie: bool, overrides: dict) -> TinyGPT:
    with torch.device("meta"):
        base, delta = TinyGPT(BASE, tie=tie), TinyGPT(2 * BASE, tie=tie)
    model = TinyGPT(width, tie=tie)
    mupopt.set_base_shapes(model, base, delta=delta, overrides=overrides)
    return model


def test_tied_pair_error_names_the_helper():
    with pytest.raises(mupopt.MupError) as err:
        shaped(128, True, POS)
    msg = str(err.value)
    assert "overrides={'tok.weight': 'input'}" in msg and "mupopt.readout_multiplier_(model, 'readout')" in msg


def test_tied_readout_gets_one_over_m_in_the_forward_pass_and_in_the_state():
    model = shaped(128, True, TIED)
    ids = token_batch()
    with torch.no_grad():
        plain = model(ids)
    assert mupopt.readout_multiplier_(model, "readout") == pytest.approx(BASE / 128)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain * (BASE / 128))
    info = mupopt.width_info(model.tok.weight)  # the optimizer still steps it as an embedding
    assert info.role == "input" and multipliers("adamw", info).lr == 1.0
    assert "readout output x 0.25" in mupopt.summary(model)
    state = model.state_dict()
    assert state["readout.mup_output_mult"].item() == pytest.approx(0.25)
    fresh = shaped(128, True, TIED)
    with pytest.raises(RuntimeError, match="mup_output_mult"):
        fresh.load_state_dict(state)  # strict: the multiplier must not be dropped silently
    mupopt.readout_multiplier_(fresh, "readout")
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids))
    with pytest.raises(mupopt.MupError, match="already"):
        mupopt.readout_multiplier_(model, "readout")


def test_untied_readout_moves_its_one_over_m_from_the_lr_to_the_forward_pass():
    model = shaped(128, False, POS)
    assert multipliers("adamw", mupopt.width_info(model.readout.weight)).lr == pytest.approx(BASE / 128)
    assert mupopt.readout_multiplier_(model, "readout") == pytest.approx(BASE / 128)
    info = mupopt.width_info(model.readout.weight)
    assert info.role == "output" and info.m_in == 1.0 and multipliers("adamw", info).lr == 1.0
    with pytest.raises(mupopt.MupError, match="role 'hidden'"):
        mupopt.readout_multiplier_(model, "blocks.0.proj")
    with pytest.raises(mupopt.MupError, match="width information"):
        mupopt.readout_multiplier_(TinyGPT(64), "readout")


def logits_change(width: int, tie: bool, forward_mult: bool, seed: int, steps: int = 4) -> float:
    """RMS change of the logits since init after ``steps`` AdamW steps on one batch."""
    torch.manual_seed(seed)
    model = shaped(width, tie, TIED if tie else POS)
    if forward_mult:  # before init_mup_: an untied readout then keeps std_base (its 1/m is in the forward)
        mupopt.readout_multiplier_(model, "readout")
    mupopt.init_mup_(model, std_base=0.02, generator=torch.Generator().manual_seed(seed))
    opt = mupopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    ids = token_batch(batch=8, seq=16, seed=seed)
    with torch.no_grad():
        start = model(ids)
    for _ in range(steps):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(ids) - start).pow(2).mean().sqrt().item()


def slope(widths, values) -> float:
    xs, ys = [math.log(w) for w in widths], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_coord_check_logits_flat_with_the_readout_multiplier(tie):
    """Coordinate check (widths 32-256, 4 AdamW steps, 2 seeds): the log-log slope of the logits'
    change against width is flat by `mupopt coord-check`'s verdict (-VANISH < slope < FLAT) with
    the multiplier (measured: tied -0.23 to -0.28, untied -0.09 to -0.16). Tied: without it the
    embedding's input-role updates reach the logits unscaled and the slope exceeds GROW (measured
    +0.47 to +0.50). Untied: the forward form matches the 1/m_in lr form."""
    widths = [32, 64, 128, 256]

    def curve(forward_mult: bool) -> list[float]:
        return [math.exp(sum(math.log(logits_change(w, tie, forward_mult, s)) for s in range(2)) / 2) for w in widths]

    with_mult = slope(widths, curve(True))
    assert -VANISH < with_mult < FLAT, with_mult
    without = slope(widths, curve(False))
    if tie:
        assert without > GROW, without
    else:
        assert -VANISH < without < FLAT, without  # the lr form: flat as well


# ---------------------------------------------------------------------------------------------
# The multiplier through rewrapping and re-shaping, and through Hugging Face save/load (issue 22
# item 4)
# ---------------------------------------------------------------------------------------------
def test_untied_readout_keeps_one_lr_rule_whatever_the_order():
    """The forward 1/m replaces the readout's lr 1/m_in: set_base_shapes again after the
    multiplier, and the width info recovered for a rewrapped weight (FSDP2 makes new
    Parameters), keep m_in = 1, so the 1/m is never applied twice."""
    model = shaped(128, False, POS)
    assert mupopt.width_info(model.readout.weight).m_in == 4.0
    mupopt.readout_multiplier_(model, "readout")
    assert mupopt.width_info(model.readout.weight).m_in == 1.0
    with torch.device("meta"):
        base, delta = TinyGPT(BASE, tie=False), TinyGPT(2 * BASE, tie=False)
    mupopt.set_base_shapes(model, base, delta=delta, overrides=POS)
    assert mupopt.width_info(model.readout.weight).m_in == 1.0
    model.readout.weight = torch.nn.Parameter(model.readout.weight.detach().clone())  # no width info
    mupopt.mup.recover_width_infos(model.parameters())
    assert mupopt.width_info(model.readout.weight).m_in == 1.0


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_meta_device_model_gets_its_multiplier_back_from_init_mup(tie):
    """The meta-device recipe (set_base_shapes, readout_multiplier_, to_empty, init_mup_):
    to_empty leaves every buffer uninitialised, the multiplier's too, and the logits were
    multiplied by whatever the memory held (0 in a probe: logits all 0). init_mup_
    writes the multiplier back; the model then computes what the same recipe on the CPU does."""
    overrides = TIED if tie else POS
    with torch.device("meta"):
        model = TinyGPT(128, tie=tie)
    with torch.device("meta"):
        base, delta = TinyGPT(BASE, tie=tie), TinyGPT(2 * BASE, tie=tie)
    mupopt.set_base_shapes(model, base, delta=delta, overrides=overrides)
    mult = mupopt.readout_multiplier_(model, "readout")
    model.to_empty(device="cpu")
    model.readout.mup_output_mult.fill_(123.0)  # what uninitialised memory may hold
    mupopt.init_mup_(model, generator=torch.Generator().manual_seed(0))
    assert mupopt.readout_multipliers(model) == {"readout": mult}
    want = shaped(128, tie, overrides)
    mupopt.readout_multiplier_(want, "readout")
    mupopt.init_mup_(want, generator=torch.Generator().manual_seed(0))
    for (name, p), q in zip(want.named_parameters(), model.parameters()):
        if mupopt.width_info(p).role != "vector":  # init_mup_ leaves vectors as to_empty made them
            assert torch.equal(p, q), name
    assert torch.equal(model.readout.mup_output_mult, want.readout.mup_output_mult)


def _gpt2(width: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=width, n_layer=1, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _shaped_gpt2(width: int):
    model = _gpt2(width)
    with torch.device("meta"):
        base, delta = _gpt2(32), _gpt2(64)
    mupopt.set_base_shapes(model, base, delta=delta, overrides={"transformer.wte.weight": "input"})
    return model, base, delta


def test_hugging_face_save_and_load_keeps_the_readout_multiplier(tmp_path):
    """GPT-2 (lm_head tied to wte) at width 128 over base 32: from_pretrained drops the buffer
    (an unexpected key for the rebuilt class), so the logits come back 4x too large; the config
    keeps the multiplier, restore_readout_multipliers applies it again, mupopt warns until then."""
    torch.manual_seed(0)
    model, base, delta = _shaped_gpt2(128)
    assert mupopt.readout_multiplier_(model, "lm_head") == 0.25
    x = torch.randint(0, 64, (2, 8))
    model.eval()
    want = model(x).logits
    model.save_pretrained(tmp_path)

    loaded = type(model).from_pretrained(tmp_path).eval()
    assert torch.allclose(loaded(x).logits, 4 * want, atol=1e-5)  # what a user gets without mupopt's help
    for call in (lambda: mupopt.summary(loaded),
                 lambda: mupopt.set_base_shapes(loaded, base, delta=delta, overrides={"transformer.wte.weight": "input"})):
        with pytest.warns(mupopt.MupWarning, match="restore_readout_multipliers"):
            call()
    assert mupopt.restore_readout_multipliers(loaded) == {"lm_head": 0.25}
    assert mupopt.readout_multipliers(loaded) == {"lm_head": 0.25}
    torch.testing.assert_close(loaded(x).logits, want)
    assert mupopt.restore_readout_multipliers(loaded) == {"lm_head": 0.25}  # a second call changes nothing
    torch.testing.assert_close(loaded(x).logits, want)


def test_rebuilding_the_multiplier_by_hand_must_agree_with_the_saved_one(tmp_path):
    model, _, _ = _shaped_gpt2(128)
    mupopt.readout_multiplier_(model, "lm_head")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    with torch.device("meta"):
        other_base, other_delta = _gpt2(64), _gpt2(32)  # another base width: another multiplier
    with pytest.warns(mupopt.MupWarning):
        mupopt.set_base_shapes(loaded, other_base, delta=other_delta, overrides={"transformer.wte.weight": "input"})
    with pytest.raises(mupopt.MupError, match="records a readout multiplier 0.25"):
        mupopt.readout_multiplier_(loaded, "lm_head")
