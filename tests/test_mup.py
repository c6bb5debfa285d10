"""The muP layer: roles, width multipliers, width-info sources, errors, schedulers, resume, init,
summaries — expectations derived in the tests from docs/mup.md, or from Microsoft's mup.

Widths: base 32, model 128, so every scaling dimension has m = 4.
"""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mupopt
from mupopt.mup import Multipliers, WidthInfo, multipliers
from mupopt.testing import adamw_f64

from models import MLP, MuMLP, MuTinyGPT, TinyGPT, fill_grads, token_batch

BASE, WIDTH = 32, 128
POS = {"pos": "input"}
REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Expectations, written from docs/mup.md (independently of mupopt.mup)
# ---------------------------------------------------------------------------------------------
def meta(cls, *args, **kwargs):
    with torch.device("meta"):
        return cls(*args, **kwargs)


def owner_of(model: nn.Module, name: str) -> nn.Module:
    mod_name, _, _ = name.rpartition(".")
    return model.get_submodule(mod_name) if mod_name else model


def expected_info(module: nn.Module, shape, base_shape) -> WidthInfo:
    """Role, m_in, m_out by the notation section of docs/mup.md."""
    ratio = [s / b for s, b in zip(shape, base_shape)]
    if len(shape) <= 1:
        return WidthInfo("vector", 1.0, ratio[0] if ratio else 1.0)
    if isinstance(module, nn.Embedding):  # (vocab, d): fan_in is dim 0, fan_out dim 1
        fan_in, fan_out, fan_in_dim = ratio[0], ratio[1], 0
    else:  # nn.Linear: (fan_out, fan_in)
        fan_in, fan_out, fan_in_dim = ratio[1], ratio[0], 1
    if fan_in != 1 and fan_out != 1:
        role = "hidden"
    elif fan_in != 1:
        role = "output"
    else:
        role = "input"
    return WidthInfo(role, fan_in, fan_out, fan_in_dim)


def table_lr(rule: str, info: WidthInfo, lamb_hidden_exponent: float = 0.0) -> float:
    """The lr multiplier of docs/mup.md's table."""
    role, m_in, m_out = info.role, info.m_in, info.m_out
    adam_like = {"input": 1.0, "hidden": 1.0 / m_in, "output": 1.0 / m_in, "vector": 1.0}
    if rule in ("adamw", "adopt", "sophia", "shampoo_grafted"):
        return adam_like[role]
    if rule == "lamb":
        return m_in**lamb_hidden_exponent if role == "hidden" else 1.0
    if rule in ("muon", "muon_match_rms_adamw"):  # hidden: Muon's row; the rest: AdamW fallback
        hidden = 1.0 if rule == "muon" else 1.0 / math.sqrt(m_in)
        return hidden if role == "hidden" else adam_like[role]
    if rule == "shampoo":
        return {
            "input": math.sqrt(m_out),
            "hidden": math.sqrt(m_out / m_in),
            "output": 1.0 / math.sqrt(m_in),
            "vector": adam_like["vector"],
        }[role]
    raise AssertionError(rule)


def tinygpt_expectations(model: TinyGPT, base: TinyGPT) -> dict[str, WidthInfo]:
    """Every parameter except the bare ``pos`` (whose role comes from an override)."""
    base_shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    return {
        n: expected_info(owner_of(model, n), tuple(p.shape), base_shapes[n])
        for n, p in model.named_parameters()
        if n != "pos"
    }


def assert_info(got: WidthInfo, want: WidthInfo, name: str):
    assert got.role == want.role, (name, got, want)
    assert got.m_in == pytest.approx(want.m_in), (name, got, want)
    assert got.m_out == pytest.approx(want.m_out), (name, got, want)
    if got.role != "vector":
        assert got.fan_in_dim == want.fan_in_dim, (name, got, want)


@pytest.fixture
def gpt():
    """TinyGPT(128) with width info from a meta-device TinyGPT(32)."""
    torch.manual_seed(0)
    model = TinyGPT(WIDTH)
    base = meta(TinyGPT, BASE)
    infos = mupopt.set_base_shapes(model, base, overrides=POS)
    return model, base, infos


# ---------------------------------------------------------------------------------------------
# Roles and multipliers
# ---------------------------------------------------------------------------------------------
def test_roles_and_width_ratios_follow_the_rules(gpt):
    """Every TinyGPT parameter gets the role, m_in and m_out docs/mup.md prescribes."""
    model, base, infos = gpt
    want = tinygpt_expectations(model, base)
    assert set(infos) == {n for n, _ in model.named_parameters()}
    roles = {w.role for w in want.values()}
    assert roles == {"input", "hidden", "output", "vector"}  # the model exercises every role
    for name, p in model.named_parameters():
        assert mupopt.width_info(p) is infos[name]
        if name in want:
            assert_info(infos[name], want[name], name)


def test_override_input_on_bare_parameter_puts_the_width_on_fan_out(gpt):
    """A bare (16, width) positional table declared 'input' gets m_in = 1 and m_out = 4: by
    definition an input tensor has a fixed fan_in and a scaling fan_out (docs/mup.md), which is
    what makes Shampoo's input multiplier sqrt(m_out) and scale_eps' 1/m_out act on it."""
    model, _, infos = gpt
    info = infos["pos"]
    assert info.role == "input"
    assert (info.m_in, info.m_out) == (1.0, 4.0), info
    assert multipliers("shampoo", info).lr == pytest.approx(math.sqrt(4.0))
    assert multipliers("adamw", info, scale_eps=True).eps == pytest.approx(1 / 4)


def test_shampoo_blocks_change_only_capped_sides():
    """Ungrafted Shampoo's lr multiplier from the block sides (mup.shampoo_block_lr): the table's
    row while no side is capped; AdamW's 1/m_in when both sides are capped at both widths; a
    capped side between (base below the cap, this width above it) grows by cap / base side."""
    from mupopt.mup import shampoo_block_lr

    hidden = WidthInfo("hidden", 4.0, 4.0)
    assert shampoo_block_lr(hidden, (512, 512), 1024) == pytest.approx(math.sqrt(4.0 / 4.0))
    assert shampoo_block_lr(hidden, (2048, 2048), 256) == pytest.approx(1 / 4)  # 512 at base: capped
    # rows 1024 (base 256) under a cap of 512: the side grows 2x, not 4x; cols uncapped (4x).
    assert shampoo_block_lr(hidden, (1024, 256), 512) == pytest.approx(math.sqrt(2.0 * 4.0) / 4)
    # nn.Linear input layer (d, features): rows scale.
    lin_in = WidthInfo("input", 1.0, 4.0)
    assert shampoo_block_lr(lin_in, (512, 10), 1024) == pytest.approx(math.sqrt(4.0))
    assert shampoo_block_lr(lin_in, (4096, 10), 1024) == pytest.approx(1.0)
    # nn.Embedding (vocab, d): the vocabulary is capped at both widths and does not scale; d does.
    emb = WidthInfo("input", 1.0, 4.0, fan_in_dim=0)
    assert shampoo_block_lr(emb, (50000, 512), 1024) == pytest.approx(math.sqrt(4.0))
    assert shampoo_block_lr(WidthInfo("input", 1.0, 4.0), (50000, 512), 1024) == pytest.approx(1.0)  # wrong layout
    out = WidthInfo("output", 4.0, 1.0)
    assert shampoo_block_lr(out, (10, 512), 1024) == pytest.approx(1 / math.sqrt(4.0))
    # Through multipliers(): only rule "shampoo" and non-vector roles take the blocks.
    assert multipliers("shampoo", hidden, shampoo_blocks=((2048, 2048), 256)).lr == pytest.approx(1 / 4)
    assert multipliers("shampoo", WidthInfo("vector", 1.0, 4.0), shampoo_blocks=((8, 2048), 256)).lr == 1.0


def test_summary_of_ungrafted_shampoo_uses_the_block_cap(gpt):
    """mupopt.summary(model, "shampoo") shows the multipliers mupopt.Shampoo(grafting=None) uses:
    with a cap below the MLP's 512-wide side the hidden rows change, as in the optimizer."""
    model, _, _ = gpt
    params = dict(model.named_parameters())
    opt = mupopt.Shampoo([{"params": list(params.values()), "max_preconditioner_dim": 64}], grafting=None)
    in_opt = {n: m.lr for n, m in zip(params, opt.group_multipliers(opt.param_groups[0]))}
    rows = {r[0]: float(r[5]) for r in _rows(mupopt.summary(model, "shampoo", max_preconditioner_dim=64))}
    assert rows.keys() == in_opt.keys()
    for n in rows:
        assert rows[n] == pytest.approx(in_opt[n], rel=1e-3), n
    uncapped = {r[0]: float(r[5]) for r in _rows(mupopt.summary(model, "shampoo"))}
    assert any(abs(uncapped[n] - rows[n]) > 1e-3 * rows[n] for n in rows)


def test_embedding_width_info_records_its_layout(gpt):
    """set_base_shapes marks nn.Embedding weights fan_in_dim=0, and the record survives the
    optimizer's param groups (and older records without the key read as nn.Linear's layout)."""
    model, _, infos = gpt
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert embeddings
    for name in embeddings:
        assert infos[f"{name}.weight"].fan_in_dim == 0
    assert WidthInfo.from_dict(infos[f"{embeddings[0]}.weight"].as_dict()) == infos[f"{embeddings[0]}.weight"]
    assert WidthInfo.from_dict({"role": "hidden", "m_in": 2.0, "m_out": 2.0}).fan_in_dim == 1
    with pytest.raises(mupopt.MupError, match="fan_in_dim"):
        WidthInfo("hidden", 2.0, 2.0, fan_in_dim=2)


def test_base_widths_warns_about_an_unlisted_multiple_of_a_width():
    """base_widths lists d_model but forgets d_ff = 4 d_model: both MLP weights would come out
    with one scaling side (input/output, AdamW lr 1 for the second instead of 1/m_in). A
    MupWarning names the weight and both fixes; listing d_ff or declaring the role silences it."""
    import warnings

    def mlp():
        return nn.Sequential(nn.Linear(10, 256), nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256),
                             nn.Linear(256, 10))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = mupopt.set_base_shapes(mlp(), base_widths={256: 64})
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, mupopt.MupWarning))
    assert len(messages) == 2, messages
    assert "'1.weight' (1024, 256) came out 'output'" in messages[0] and "4x the listed width 256" in messages[0]
    assert "'3.weight' (256, 1024) came out 'input'" in messages[1] and "{1024: <its base size>}" in messages[1]
    assert infos["3.weight"].role == "input"  # what the warning is about
    assert all(w.filename == __file__ for w in caught)  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infos = mupopt.set_base_shapes(mlp(), base_widths={256: 64, 1024: 256})
        assert infos["3.weight"].role == "hidden" and infos["1.weight"].role == "hidden"
        mupopt.set_base_shapes(mlp(), base_widths={256: 64}, overrides={"1.weight": "output", "3.weight": "input"})


RULES = [
    ("adamw", {}),
    ("adopt", {}),
    ("sophia", {}),
    ("lamb", {"lamb_hidden_exponent": 0.0}),
    ("lamb", {"lamb_hidden_exponent": -0.5}),
    ("shampoo", {}),
    ("shampoo_grafted", {}),
]


@pytest.mark.parametrize("rule,options", RULES, ids=lambda x: str(x))
def test_lr_multiplier_is_the_table_formula(gpt, rule, options):
    """multipliers(rule, info).lr equals the docs/mup.md table for every TinyGPT parameter."""
    model, base, infos = gpt
    want = tinygpt_expectations(model, base)
    seen = set()
    for name, info in want.items():
        got = multipliers(rule, infos[name], **options)
        expected = table_lr(rule, info, options.get("lamb_hidden_exponent", 0.0))
        assert got.lr == pytest.approx(expected, rel=1e-12), (name, info, got)
        seen.add(round(expected, 9))
    if rule in ("adamw", "shampoo") or options.get("lamb_hidden_exponent"):
        assert len(seen) > 1  # the test would catch a rule that ignores width


@pytest.mark.parametrize("rule", ["adamw", "adopt", "sophia", "shampoo", "shampoo_grafted"])
def test_decay_multiplier_independent_vs_coupled(gpt, rule):
    """independent: decay lr*wd without the muP multiplier; coupled: lr*lr_mult*wd."""
    model, base, infos = gpt
    for name, info in tinygpt_expectations(model, base).items():
        lr = table_lr(rule, info)
        assert multipliers(rule, infos[name], wd_mode="independent").wd == 1.0, name
        assert multipliers(rule, infos[name], wd_mode="coupled").wd == pytest.approx(lr), name


def test_scale_eps_is_one_over_m_out(gpt):
    """scale_eps (P1, opt-in) multiplies eps by 1/m_out; off by default."""
    model, base, infos = gpt
    for name, info in tinygpt_expectations(model, base).items():
        assert multipliers("adamw", infos[name]).eps == 1.0
        assert multipliers("adamw", infos[name], scale_eps=True).eps == pytest.approx(1 / info.m_out), name


@pytest.mark.parametrize(
    "cls,kwargs,rule,options",
    [
        (mupopt.AdamW, {}, "adamw", {}),
        (mupopt.AdamW, {"wd_mode": "coupled"}, "adamw", {}),
        (mupopt.ADOPT, {}, "adopt", {}),
        (mupopt.SophiaG, {}, "sophia", {}),
        (mupopt.LAMB, {}, "lamb", {"lamb_hidden_exponent": 0.0}),
        (mupopt.LAMB, {"hidden_lr_exponent": -0.5}, "lamb", {"lamb_hidden_exponent": -0.5}),
    ],
    ids=["adamw", "adamw-coupled", "adopt", "sophia", "lamb", "lamb-0.5"],
)
def test_optimizer_group_multipliers_match_table(gpt, cls, kwargs, rule, options):
    """The multipliers an optimizer applies (group_multipliers) are the table's, per tensor."""
    model, base, infos = gpt
    want = tinygpt_expectations(model, base)
    opt = cls(model.named_parameters(), **kwargs)
    (group,) = opt.param_groups
    for name, m in zip(group["param_names"], opt.group_multipliers(group)):
        if name not in want:
            continue
        lr = table_lr(rule, want[name], options.get("lamb_hidden_exponent", 0.0))
        assert m.lr == pytest.approx(lr), name
        if rule != "lamb":
            assert m.wd == pytest.approx(lr if kwargs.get("wd_mode") == "coupled" else 1.0), name


# ---------------------------------------------------------------------------------------------
# Against Microsoft's mup
# ---------------------------------------------------------------------------------------------
LR, WD = 1e-2, 0.1


def mup_pair(cls, **mupopt_kwargs):
    mup = pytest.importorskip("mup")
    torch.manual_seed(0)
    model = cls(WIDTH)
    mup.set_base_shapes(model, meta(cls, BASE), rescale_params=False)
    overrides = POS if issubclass(cls, TinyGPT) else None
    mupopt.set_base_shapes(model, overrides=overrides)  # source (c): p.infshape
    theirs = mup.MuAdamW(model.parameters(), lr=LR, weight_decay=WD)
    ours = mupopt.AdamW(model.named_parameters(), lr=LR, weight_decay=WD, **mupopt_kwargs)
    their_lr, their_decay = {}, {}
    for g in theirs.param_groups:
        for p in g["params"]:
            their_lr[id(p)] = g["lr"]
            their_decay[id(p)] = g["lr"] * g["weight_decay"]
    (group,) = ours.param_groups
    rows = []
    for name, p, m in zip(group["param_names"], group["params"], ours.group_multipliers(group)):
        rows.append((name, p, group["lr"] * m.lr, group["lr"] * group["weight_decay"] * m.wd, their_lr[id(p)], their_decay[id(p)]))
    return model, rows


@pytest.mark.parametrize("cls", [MuMLP, MuTinyGPT])
def test_effective_lr_and_decay_match_mu_adamw(cls):
    """Per tensor, mupopt's lr*lr_mult and lr*wd*wd_mult equal MuAdamW's group lr and
    lr*weight_decay; the MuReadout weight too: its forward divides by width_mult, so neither
    MuAdamW nor mupopt scales its lr (test_mu_readout_model_trains_as_mu_adamw)."""
    model, rows = mup_pair(cls)
    hidden_seen = False
    for name, p, our_lr, our_decay, their_lr, their_decay in rows:
        assert our_decay == pytest.approx(their_decay, rel=1e-12), name
        assert our_lr == pytest.approx(their_lr, rel=1e-12), name
        hidden_seen |= their_lr != LR
    assert hidden_seen  # MuAdamW did scale something: the comparison is not vacuous


def _train_side_by_side(pairs) -> torch.Generator:
    """5 steps of MSE regression on the same random batches for each (model, optimizer) pair;
    returns the generator, to draw the inputs of a later comparison."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 10, generator=gen), torch.randn(16, 3, generator=gen)
        for model, opt in pairs:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    return gen


@pytest.mark.parametrize("cls", [MuMLP, MuTinyGPT])
def test_coupled_decay_matches_torch_with_mu_lr_groups(cls):
    """wd_mode='coupled' is torch.optim with per-width lr groups and an unscaled weight_decay:
    decay = MuAdamW's group lr * WD (the MuReadout's lr unscaled, as MuAdamW's)."""
    model, rows = mup_pair(cls, wd_mode="coupled")
    for name, p, our_lr, our_decay, their_lr, _ in rows:
        assert our_decay == pytest.approx(their_lr * WD, rel=1e-12), name


def test_training_equals_mu_adamw_with_mu_readout():
    """Trained on the same data, mupopt.AdamW on a plain-readout MLP follows MuAdamW on a
    MuReadout MLP whose readout weight is width_mult times larger (the documented equivalence):
    same outputs, same weights (readout: ours == theirs / width_mult)."""
    mup = pytest.importorskip("mup")
    torch.manual_seed(0)
    theirs_model = MuMLP(WIDTH)
    mup.set_base_shapes(theirs_model, meta(MuMLP, BASE), rescale_params=False)
    ours_model = MLP(WIDTH)
    mupopt.set_base_shapes(ours_model, meta(MLP, BASE))
    wm = theirs_model.readout.width_mult()
    with torch.no_grad():
        ours_model.load_state_dict(theirs_model.state_dict())
        ours_model.readout.weight.div_(wm)
    # A negligible eps: Adam's direction is then invariant to the gradient's scale (1/width_mult);
    # not 0, which gives 0/0 on ReLU-dead units.
    theirs = mup.MuAdamW(theirs_model.parameters(), lr=LR, weight_decay=WD, eps=1e-30)
    ours = mupopt.AdamW(ours_model.parameters(), lr=LR, weight_decay=WD, eps=1e-30)
    gen = _train_side_by_side([(theirs_model, theirs), (ours_model, ours)])
    x = torch.randn(8, 10, generator=gen)
    torch.testing.assert_close(ours_model(x), theirs_model(x), rtol=1e-5, atol=1e-6)
    theirs_params = dict(theirs_model.named_parameters())
    for name, p in ours_model.named_parameters():
        q = theirs_params[name] / wm if name == "readout.weight" else theirs_params[name]
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("source", ["infshape", "base"])
def test_mu_readout_model_trains_as_mu_adamw(source):
    """A model that keeps Microsoft mup's MuReadout (mup.set_base_shapes insists on one), given
    to mupopt after mup.set_base_shapes: MuReadout divides its logits by width_mult (m_in) in the
    forward, and mupopt gave the readout's lr 1/m_in as well, so the readout learnt m times
    slower than under MuAdamW. The same model, the same data: the same weights as MuAdamW."""
    mup = pytest.importorskip("mup")
    torch.manual_seed(0)
    theirs_model = MuMLP(WIDTH)
    mup.set_base_shapes(theirs_model, meta(MuMLP, BASE))
    ours_model = copy.deepcopy(theirs_model)
    mup.set_base_shapes(ours_model, meta(MuMLP, BASE), rescale_params=False)  # deepcopy drops infshape
    if source == "infshape":
        mupopt.set_base_shapes(ours_model)
    else:
        mupopt.set_base_shapes(ours_model, meta(MuMLP, BASE))
    assert mupopt.width_info(ours_model.readout.weight).m_in == 1.0
    theirs = mup.MuAdamW(theirs_model.parameters(), lr=LR, weight_decay=WD, eps=1e-30)
    ours = mupopt.AdamW(ours_model.parameters(), lr=LR, weight_decay=WD, eps=1e-30)
    _train_side_by_side([(theirs_model, theirs), (ours_model, ours)])
    for (name, p), q in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# Width-info sources
# ---------------------------------------------------------------------------------------------
def as_tuples(infos):
    return {n: (i.role, i.m_in, i.m_out) for n, i in infos.items()}


def test_source_base_shape_dict_equals_base_model(gpt):
    """(a') a {name: shape} dict gives what the base model gives."""
    _, base, infos = gpt
    shapes = {n: tuple(p.shape) for n, p in base.named_parameters()}
    assert as_tuples(mupopt.set_base_shapes(TinyGPT(WIDTH), shapes, overrides=POS)) == as_tuples(infos)


def test_source_delta_gives_roles_at_the_base_width(gpt):
    """delta=: the base model itself (m = 1 everywhere) gets the roles it has at width 128."""
    _, _, infos = gpt
    small = TinyGPT(BASE)
    got = mupopt.set_base_shapes(small, meta(TinyGPT, BASE), delta=meta(TinyGPT, 64), overrides=POS)
    assert {n: i.role for n, i in got.items()} == {n: i.role for n, i in infos.items()}
    assert all(i.m_in == 1.0 and i.m_out == 1.0 for i in got.values())
    # Without delta nothing scales and a Linear's role cannot be told:
    with pytest.raises(mupopt.MupError, match="delta"):
        mupopt.set_base_shapes(TinyGPT(BASE), meta(TinyGPT, BASE), overrides=POS)


def test_source_base_widths_table_equals_base_model(gpt):
    """(b) base_widths {size: base size} gives what the base model gives. (TinyGPT's qkv has
    fan_out 3*width, so 384 must be listed next to d_model 128 and d_ff 512.)"""
    _, _, infos = gpt
    got = mupopt.set_base_shapes(TinyGPT(WIDTH), base_widths={128: 32, 384: 96, 512: 128}, overrides=POS)
    assert as_tuples(got) == as_tuples(infos)


def test_source_base_widths_mlp():
    """(b) with the brief's table {128: 32, 512: 128} on a model whose width dims are 128/512."""
    model = nn.Sequential(nn.Linear(10, 128), nn.Linear(128, 512), nn.Linear(512, 3))
    got = mupopt.set_base_shapes(model, base_widths={128: 32, 512: 128})
    assert as_tuples(got) == {
        "0.weight": ("input", 1.0, 4.0),
        "0.bias": ("vector", 1.0, 4.0),
        "1.weight": ("hidden", 4.0, 4.0),
        "1.bias": ("vector", 1.0, 4.0),
        "2.weight": ("output", 4.0, 1.0),
        "2.bias": ("vector", 1.0, 1.0),
    }


def test_source_infshape_equals_base_model(gpt):
    """(c) p.infshape left by Microsoft's mup.set_base_shapes gives what the base model gives."""
    mup = pytest.importorskip("mup")
    _, _, infos = gpt
    model = TinyGPT(WIDTH)
    # do_assert=False: mup insists on MuReadout for readouts; not our concern here.
    mup.set_base_shapes(model, meta(TinyGPT, BASE), rescale_params=False, do_assert=False)
    assert as_tuples(mupopt.set_base_shapes(model, overrides=POS)) == as_tuples(infos)


def test_source_override_pattern_with_role_string(gpt):
    """(d) an fnmatch pattern with a role string sets exactly the matching tensors' role, and
    the role places the width: 'input' puts the one scaling dimension on fan_out (dim 1 of the
    (16, d) table, so fan_in is dim 0, as in an embedding)."""
    _, _, infos = gpt
    got = mupopt.set_base_shapes(TinyGPT(WIDTH), meta(TinyGPT, BASE), overrides={"p?s": "input"})
    assert got["pos"] == WidthInfo("input", 1.0, WIDTH / BASE, fan_in_dim=0)
    for n, info in got.items():
        if n != "pos":
            assert as_tuples({n: info}) == as_tuples({n: infos[n]}), n


def test_role_string_contradicting_the_shape_raises():
    """A hidden-shaped matrix (both dimensions scale) declared 'input' is contradictory: the
    error asks for an explicit WidthInfo instead of guessing which dimension to ignore."""
    with pytest.raises(mupopt.MupError, match="WidthInfo"):
        mupopt.set_base_shapes(
            TinyGPT(WIDTH), meta(TinyGPT, BASE), overrides={**POS, "blocks.*.mlp_in.weight": "input"}
        )


def test_source_override_pattern_with_width_info(gpt):
    """(d) an fnmatch pattern with a WidthInfo sets exactly that WidthInfo."""
    _, _, infos = gpt
    declared = WidthInfo("hidden", 8.0, 2.0)
    got = mupopt.set_base_shapes(TinyGPT(WIDTH), meta(TinyGPT, BASE), overrides={**POS, "blocks.*.mlp_in.weight": declared})
    for n, info in got.items():
        if n.endswith("mlp_in.weight"):
            assert info == declared
            assert multipliers("adamw", info).lr == pytest.approx(1 / 8)
        else:
            assert info == infos[n], n


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_tied_weights_without_override_raise():
    """A weight shared by the embedding and the readout has no single role: MupError naming it."""
    with pytest.raises(mupopt.MupError) as err:
        mupopt.set_base_shapes(TinyGPT(WIDTH, tie=True), meta(TinyGPT, BASE, tie=True), overrides=POS)
    msg = str(err.value)
    assert "tok.weight" in msg and "readout.weight" in msg and "overrides" in msg


def test_tied_weights_with_input_override():
    """Declared 'input', the tied weight is an embedding: m_in 1, m_out 4, AdamW lr mult 1."""
    model = TinyGPT(WIDTH, tie=True)
    infos = mupopt.set_base_shapes(model, meta(TinyGPT, BASE, tie=True), overrides={**POS, "tok.weight": "input"})
    assert infos["tok.weight"] is infos["readout.weight"]
    # (vocab, d) as found in the embedding: fan_in (the vocabulary) is dim 0.
    assert_info(infos["tok.weight"], WidthInfo("input", 1.0, 4.0, fan_in_dim=0), "tok.weight")
    opt = mupopt.AdamW(model.parameters())  # one tensor, one record
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_tied_weights_declared_output_get_output_scaling():
    """Declared 'output' (through its readout name), the tied weight is used as a readout
    (fan_in = d_model scales): m_in 4, m_out 1, and AdamW's output multiplier 1/m_in = 1/4."""
    model = TinyGPT(WIDTH, tie=True)
    infos = mupopt.set_base_shapes(model, meta(TinyGPT, BASE, tie=True), overrides={**POS, "readout.weight": "output"})
    info = infos["readout.weight"]
    assert info.role == "output"
    assert (info.m_in, info.m_out, info.fan_in_dim) == (4.0, 1.0, 1), info  # the readout's layout
    assert multipliers("adamw", info).lr == pytest.approx(1 / 4)


class ConvDecoder(nn.Module):
    """Transposed convolutions, whose weight is (in_channels, out_channels, kH, kW): fan_in is
    dim 0, unlike nn.Conv2d's (out, in, kH, kW). Two widths, so that m_in != m_out."""

    def __init__(self, w: int, v: int):
        super().__init__()
        self.inp = nn.ConvTranspose2d(3, w, 3)  # fixed -> width: input
        self.mid = nn.ConvTranspose2d(w, v, 3)  # width -> width: hidden
        self.out = nn.ConvTranspose2d(v, 3, 3)  # width -> fixed: output
        self.enc = nn.Conv2d(v, w, 3)  # the plain layout beside it, hidden
        self.dw = nn.ConvTranspose2d(w, w, 3, groups=w)  # depthwise (w, 1, 3, 3): fan_in fixed, input


def test_transposed_conv_takes_fan_in_from_dim_0():
    """A decoder's first transposed conv (3 -> width channels) is an input layer and its last
    (width -> 3) a readout; taking fan_in from dim 1, as for nn.Conv2d, swapped the two roles
    (the readout got lr multiplier 1 instead of 1/m_in) and m_in with m_out."""
    model = ConvDecoder(64, 16)
    infos = mupopt.set_base_shapes(model, meta(ConvDecoder, 16, 8), delta=meta(ConvDecoder, 32, 32))
    want = {  # (role, m_in, m_out, fan_in_dim) by docs/mup.md: w grows 4x, v 2x
        "inp.weight": ("input", 1.0, 4.0, 0),
        "mid.weight": ("hidden", 4.0, 2.0, 0),
        "out.weight": ("output", 2.0, 1.0, 0),
        "enc.weight": ("hidden", 2.0, 4.0, 1),
        "dw.weight": ("input", 1.0, 4.0, 1),
    }
    for name, (role, m_in, m_out, fan_in_dim) in want.items():
        info = infos[name]
        assert (info.role, info.m_in, info.m_out, info.fan_in_dim) == (role, m_in, m_out, fan_in_dim), name
    opt = mupopt.AdamW(model.named_parameters(), lr=1e-3)
    lrs = dict(zip(opt.param_groups[0]["param_names"], (m.lr for m in opt.group_multipliers(opt.param_groups[0]))))
    for name, (role, m_in, m_out, _) in want.items():
        assert lrs[name] == pytest.approx(table_lr("adamw", WidthInfo(role, m_in, m_out))), name


def test_deepcopy_of_a_model_keeps_width_and_depth_information(gpt):
    """copy.deepcopy(model) (one model per sweep run, an EMA copy) must train as the original:
    nn.Parameter.__deepcopy__ drops the parameters' attributes, and an optimizer over the copy
    ran with every multiplier 1, without a word."""
    model, _, _ = gpt
    mupopt.set_base_depth(model, model.blocks, base_depth=1, alpha=0.5)
    twin = copy.deepcopy(model)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert mupopt.width_info(q) == mupopt.width_info(p) is not None, name
        assert mupopt.depth_info(q) == mupopt.depth_info(p) is not None, name
    want, got = (mupopt.AdamW(m.parameters(), lr=1e-3) for m in (model, twin))
    assert got.group_multipliers(got.param_groups[0]) == want.group_multipliers(want.param_groups[0])
    assert any(m.lr != 1.0 for m in got.group_multipliers(got.param_groups[0]))
    # The copy is a model of its own for the recovery of replaced Parameters (FSDP2, TP).
    twin.readout.weight = nn.Parameter(twin.readout.weight.detach().clone())
    assert mupopt.width_info(twin.readout.weight) is None
    mupopt.AdamW(twin.parameters(), lr=1e-3)
    assert mupopt.width_info(twin.readout.weight) == mupopt.width_info(model.readout.weight)


def test_an_unpickled_model_recovers_replaced_parameters(gpt):
    """torch.save(model) / torch.load: the Parameters keep their width information, but the
    loaded model was not one set_base_shapes had seen, so once fully_shard (or any wrapper)
    replaced every Parameter, an optimizer found no width information anywhere and ran without
    muP, silently."""
    import io

    model, _, first = gpt
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for module in loaded.modules():  # what fully_shard does: new Parameter objects, no attributes
        for local, p in list(module.named_parameters(recurse=False)):
            setattr(module, local, nn.Parameter(p.detach().clone()))
    assert all(mupopt.width_info(p) is None for p in loaded.parameters())
    opt = mupopt.AdamW(loaded.named_parameters(), lr=1e-3)
    assert opt.width_infos(opt.param_groups[0]) == [first[n] for n in opt.param_groups[0]["param_names"]]


@pytest.mark.parametrize("late", ["set_base_shapes", "set_base_depth", "readout_multiplier_"])
def test_width_or_depth_set_up_after_the_optimizer_raises_at_the_first_step(late):
    """The optimizer takes each parameter's information when it is created: set up after it,
    the information never reached the step (set_base_shapes: every multiplier 1, silently;
    readout_multiplier_: the readout's 1/m in the lr and in the forward). The first step
    refuses, names the parameter and the order, and writes nothing."""
    base, delta = meta(TinyGPT, BASE, tie=False), meta(TinyGPT, 2 * BASE, tie=False)
    model = TinyGPT(WIDTH, tie=False)
    if late != "set_base_shapes":
        mupopt.set_base_shapes(model, base, delta=delta, overrides=POS)
    opt = mupopt.AdamW(model.parameters(), lr=1e-3)
    if late == "set_base_shapes":
        mupopt.set_base_shapes(model, base, delta=delta, overrides=POS)
    elif late == "set_base_depth":
        mupopt.set_base_depth(model, model.blocks, base_depth=1)
    else:
        mupopt.readout_multiplier_(model, "readout")
    params = list(model.parameters())
    fill_grads(params, 0)
    before = [p.detach().clone() for p in params]
    with pytest.raises(mupopt.MupError, match=r"before the optimizer is created"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params)) and not opt.state
    fill_grads(params, 0)
    mupopt.AdamW(model.parameters(), lr=1e-3).step()  # made after: fine


def test_ambiguous_unknown_module_parameter_raises():
    """A bare 2-D parameter of a non-standard module needs an override: MupError naming it."""
    with pytest.raises(mupopt.MupError) as err:
        mupopt.set_base_shapes(TinyGPT(WIDTH), meta(TinyGPT, BASE))
    msg = str(err.value)
    assert "'pos'" in msg and "overrides" in msg


def test_parameter_missing_from_base_raises():
    """A parameter the base lacks is named in the error, with the override fix."""
    shapes = {n: tuple(p.shape) for n, p in meta(TinyGPT, BASE).named_parameters() if n != "ln_f.bias"}
    with pytest.raises(mupopt.MupError) as err:
        mupopt.set_base_shapes(TinyGPT(WIDTH), shapes, overrides=POS)
    msg = str(err.value)
    assert "ln_f.bias" in msg and "base" in msg and "overrides" in msg


def test_override_pattern_matching_nothing_raises():
    """A typo in an override pattern is an error, not silently ignored."""
    with pytest.raises(mupopt.MupError, match=r"blocks\.\*\.mlp_inn\.weight"):
        mupopt.set_base_shapes(TinyGPT(WIDTH), meta(TinyGPT, BASE), overrides={**POS, "blocks.*.mlp_inn.weight": "hidden"})


def test_a_failed_set_base_shapes_changes_nothing(gpt):
    """A call that raises (an override pattern with a typo, found after every parameter was
    seen) left the parameters it had passed with the new information beside the others' old
    one: a later optimizer took that mix of two bases without a word."""
    model, _, first = gpt
    records = {n: dict(m.__dict__.get("mupopt_widths", {})) for n, m in model.named_modules()}
    with pytest.raises(mupopt.MupError, match="blocks.0.typo"):
        mupopt.set_base_shapes(model, meta(TinyGPT, WIDTH // 2), overrides={**POS, "blocks.0.typo": "hidden"})
    for name, p in model.named_parameters():
        assert mupopt.width_info(p) == first[name], name
    assert records == {n: dict(m.__dict__.get("mupopt_widths", {})) for n, m in model.named_modules()}
    fresh = TinyGPT(WIDTH)
    with pytest.raises(mupopt.MupError):
        mupopt.set_base_shapes(fresh, meta(TinyGPT, BASE))  # 'pos' needs an override
    assert all(mupopt.width_info(p) is None for p in fresh.parameters())


def test_mixed_width_info_in_one_optimizer_raises(gpt):
    """Params with and without width info in one optimizer: MupError naming the bare one."""
    model, _, _ = gpt
    stray = nn.Parameter(torch.zeros(3, 3))
    named = [*model.named_parameters(), ("stray", stray)]
    with pytest.raises(mupopt.MupError) as err:
        mupopt.AdamW(named)
    assert "'stray'" in str(err.value) and "set_base_shapes" in str(err.value)
    with pytest.raises(mupopt.MupError, match=r"\(3, 3\)"):  # unnamed: its shape is named
        mupopt.AdamW([{"params": list(model.parameters())}, {"params": [stray], "lr": 1e-4}])


# ---------------------------------------------------------------------------------------------
# No width info: plain torch behaviour
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cleared", [False, True], ids=["never-set", "cleared"])
def test_no_width_info_equals_torch_adamw(cleared):
    """Without width info (never set, or removed by clear_base_shapes) every multiplier is 1 and
    mupopt.AdamW computes what torch.optim.AdamW computes."""
    torch.manual_seed(0)
    ours_model = TinyGPT(BASE)
    if cleared:
        mupopt.set_base_shapes(ours_model, meta(TinyGPT, 16), overrides=POS)
        mupopt.clear_base_shapes(ours_model)
    theirs_model = copy.deepcopy(ours_model)
    # The reference backend: it rounds as torch does, bit for bit. A fused backend's last-bit
    # differences are amplified here: the key bias of attention has a gradient that is zero up
    # to rounding noise (softmax is shift-invariant), and Adam turns that noise into lr-sized
    # steps (a 2e-9 difference after step 1 became 5e-5 after step 3 with backend "cpu").
    # The fused backends are held to torch.optim.AdamW in tests/test_contract.py.
    ours = mupopt.AdamW(ours_model.parameters(), lr=LR, weight_decay=WD, backend="reference")
    theirs = torch.optim.AdamW(theirs_model.parameters(), lr=LR, weight_decay=WD)
    assert all(m == Multipliers(1.0, 1.0, 1.0) for g in ours.param_groups for m in ours.group_multipliers(g))
    ids = token_batch()
    for _ in range(3):
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            opt.zero_grad()
            F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
    for (n, a), b in zip(ours_model.named_parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------
# Schedulers: the multiplier is applied inside step, on top of the scheduled lr
# ---------------------------------------------------------------------------------------------
def _scheduler(kind, opt):
    sched = torch.optim.lr_scheduler
    if kind == "onecycle":
        return sched.OneCycleLR(opt, max_lr=LR, total_steps=10)
    if kind == "lambda":
        return sched.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    if kind == "cosine":
        return sched.CosineAnnealingLR(opt, T_max=4)
    return None


# Multipliers by docs/mup.md for MLP(128) over MLP(32): Adam-like, independent decay.
MLP_LR_MULT = {"inp.weight": 1.0, "inp.bias": 1.0, "hidden.weight": 1 / 4, "hidden.bias": 1.0, "readout.weight": 1 / 4, "readout.bias": 1.0}


@pytest.mark.parametrize("kind", ["onecycle", "lambda", "cosine", "manual"])
def test_scheduler_lr_is_multiplied_inside_step(kind):
    """Whatever lr (and betas, for OneCycleLR) the scheduler or a manual edit puts in the group,
    each tensor moves by the float64 AdamW step at group lr * its muP multiplier."""
    torch.manual_seed(0)
    model = MLP(WIDTH)
    infos = mupopt.set_base_shapes(model, meta(MLP, BASE))
    assert (infos["hidden.weight"].role, infos["hidden.weight"].m_in) == ("hidden", 4.0)
    names, params = zip(*model.named_parameters())
    opt = mupopt.AdamW(params, lr=LR, weight_decay=WD)
    sched = _scheduler(kind, opt)
    shadow = [p.detach().double().clone() for p in params]
    states = [{} for _ in params]
    lrs = []
    for t in range(6):
        group = opt.param_groups[0]
        if kind == "manual" and t == 3:
            group["lr"] = 3e-3
        b1, b2 = group["betas"]
        hp = SimpleNamespace(lr=group["lr"], beta1=b1, beta2=b2, eps=group["eps"], weight_decay=WD, amsgrad=False, maximize=False)
        lrs.append(group["lr"])
        fill_grads(params, t)
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, (name, p) in enumerate(zip(names, params)):
            prev = shadow[i].clone()
            adamw_f64(shadow[i], p.grad.double(), states[i], Multipliers(MLP_LR_MULT[name], 1.0, 1.0), hp)
            torch.testing.assert_close((p.detach() - before[i]).double(), shadow[i] - prev, rtol=1e-4, atol=2e-7, msg=f"{name} step {t}")
        if sched is not None:
            sched.step()
    assert len(set(lrs)) > 1, lrs  # the lr did change during the run


# ---------------------------------------------------------------------------------------------
# Resume in a fresh process without the base model
# ---------------------------------------------------------------------------------------------
RESUME_SCRIPT = """
import sys, torch, mupopt
from models import TinyGPT, fill_grads
d = sys.argv[1]
torch.manual_seed(123)                     # a different init: the state dicts must overwrite it
model = TinyGPT(64)                        # no set_base_shapes, no base model
assert all(mupopt.width_info(p) is None for p in model.parameters())
opt = mupopt.AdamW(model.named_parameters(), lr={lr}, weight_decay={wd})
model.load_state_dict(torch.load(d + "/model.pt"))
opt.load_state_dict(torch.load(d + "/opt.pt"))
params = list(model.parameters())
for t in range(3, 6):
    fill_grads(params, t)
    opt.step()
torch.save(dict(model.named_parameters()), d + "/resumed.pt")
open(d + "/summary.txt", "w").write(opt.mup_summary())
"""


def test_resume_in_fresh_process_without_base_model(tmp_path):
    """3 steps, save, resume in a new process that never sees the base model, 3 more steps:
    the same weights as 6 uninterrupted steps, and mup_summary still shows the roles."""
    torch.manual_seed(0)
    model = TinyGPT(64)
    infos = mupopt.set_base_shapes(model, meta(TinyGPT, BASE), overrides=POS)
    opt = mupopt.AdamW(model.named_parameters(), lr=LR, weight_decay=WD)
    params = list(model.parameters())
    for t in range(3):
        fill_grads(params, t)
        opt.step()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    for t in range(3, 6):
        fill_grads(params, t)
        opt.step()

    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(lr=LR, wd=WD))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    resumed = torch.load(tmp_path / "resumed.pt")
    for name, p in model.named_parameters():
        torch.testing.assert_close(resumed[name], p.detach(), rtol=1e-6, atol=1e-7, msg=name)
    rows = {row[0]: row for row in _rows((tmp_path / "summary.txt").read_text())}
    assert set(rows) == set(infos)
    for name, info in infos.items():
        assert rows[name][2] == info.role, rows[name]
        assert float(rows[name][5]) == pytest.approx(table_lr("adamw", info), rel=1e-3), rows[name]


# ---------------------------------------------------------------------------------------------
# init_mup_
# ---------------------------------------------------------------------------------------------
def _std(tensors):
    return torch.cat([t.detach().flatten() for t in tensors]).std().item()


def test_init_mup_scales_std_by_role():
    """hidden std ~ std_base/sqrt(m_in), input std_base, output std_base/m_in; vectors untouched;
    zero_readout zeros the readout."""
    std_base = 0.02
    models = {}
    for width in (BASE, WIDTH):
        torch.manual_seed(width)
        model = TinyGPT(width)
        mupopt.set_base_shapes(model, meta(TinyGPT, BASE), delta=meta(TinyGPT, 64), overrides=POS)
        vectors = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 1}
        mupopt.init_mup_(model, std_base, generator=torch.Generator().manual_seed(width))
        for n, p in model.named_parameters():
            if n in vectors:
                assert torch.equal(p, vectors[n]), n
        models[width] = model

    def stds(model):
        hidden = [p for n, p in model.named_parameters() if mupopt.width_info(p).role == "hidden"]
        return _std(hidden), _std([model.tok.weight]), _std([model.readout.weight])

    (h32, i32, o32), (h128, i128, o128) = stds(models[BASE]), stds(models[WIDTH])
    m = WIDTH / BASE
    assert h32 == pytest.approx(std_base, rel=0.05)  # m = 1 at the base width
    assert h128 / h32 == pytest.approx(1 / math.sqrt(m), rel=0.05)
    assert i128 / i32 == pytest.approx(1.0, rel=0.1)
    assert i128 == pytest.approx(std_base, rel=0.1)
    assert o128 / o32 == pytest.approx(1 / m, rel=0.1)

    model = models[WIDTH]
    mupopt.init_mup_(model, std_base, zero_readout=True)
    assert torch.count_nonzero(model.readout.weight) == 0
    assert torch.count_nonzero(model.blocks[0].qkv.weight) > 0


def test_init_mup_without_width_info_raises():
    """init_mup_ needs width info on every parameter."""
    with pytest.raises(mupopt.MupError, match="set_base_shapes"):
        mupopt.init_mup_(TinyGPT(BASE))


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------
def _rows(text):
    """The table's rows (an optimizer's summary ends with a line saying which backends ran:
    tests/test_step_plan.py)."""
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["name", "shape", "role"]
    if lines[-1].startswith("backends at the last step: "):
        lines = lines[:-1]
    return [line.split() for line in lines[2:]]


@pytest.mark.parametrize("rule", ["adamw", "shampoo", "muon", "muon_match_rms_adamw"])
def test_summary_has_one_row_per_parameter(gpt, rule):
    """mupopt.summary: one row per parameter with its name, role and lr multiplier (for Muon,
    whose rules cover hidden matrices only, it raised at the embedding: the other tensors take
    the AdamW fallback of docs/mup.md's table)."""
    model, base, infos = gpt
    want = tinygpt_expectations(model, base)
    rows = _rows(mupopt.summary(model, rule))
    assert [r[0] for r in rows] == [n for n, _ in model.named_parameters()]
    for r in rows:
        assert r[2] == infos[r[0]].role
        if r[0] in want:
            assert float(r[5]) == pytest.approx(table_lr(rule, want[r[0]]), rel=1e-3), r


def test_optimizer_mup_summary_has_one_row_per_parameter(gpt):
    """optimizer.mup_summary(): one row per parameter (named) with role and lr multiplier."""
    model, base, infos = gpt
    want = tinygpt_expectations(model, base)
    rows = _rows(mupopt.AdamW(model.named_parameters()).mup_summary())
    assert [r[0] for r in rows] == [n for n, _ in model.named_parameters()]
    for r in rows:
        assert r[2] == infos[r[0]].role
        if r[0] in want:
            assert float(r[5]) == pytest.approx(table_lr("adamw", want[r[0]]), rel=1e-3), r


# ---------------------------------------------------------------------------------------------
# The tuning run at the base width, recorded base shapes, wrong sources (issue 14, items 1-3)
# ---------------------------------------------------------------------------------------------
def test_base_width_error_shows_the_one_line_fix():
    """The tuning run (model == base, no delta) cannot tell widths from fixed sizes: the error
    shows the delta= fix and the recorded-shapes alternative, not only a parameter name."""
    with pytest.raises(mupopt.MupError) as err:
        mupopt.set_base_shapes(TinyGPT(BASE), meta(TinyGPT, BASE), overrides=POS)
    msg = str(err.value)
    assert "base width" in msg and "delta=" in msg and "make_base_shapes" in msg


@pytest.mark.parametrize("width", [BASE, 64, WIDTH])
def test_recorded_base_shapes_work_unchanged_at_every_width(tmp_path, width):
    """make_base_shapes(base, delta, file) once; set_base_shapes(model, file) at every width,
    the base width included, gives what base + delta gives (roles at m = 1 at the base)."""
    path = tmp_path / "tinygpt.bsh"
    shapes = mupopt.make_base_shapes(meta(TinyGPT, BASE), meta(TinyGPT, 2 * BASE), path)
    assert shapes["tok.weight"] == [None, BASE] and shapes["readout.weight"] == [None, BASE]
    want = mupopt.set_base_shapes(TinyGPT(width), meta(TinyGPT, BASE), delta=meta(TinyGPT, 2 * BASE), overrides=POS)
    for source in (path, str(path), shapes, mupopt.load_base_shapes(path)):
        got = mupopt.set_base_shapes(TinyGPT(width), source, overrides=POS)
        assert got == want
        assert {n: i.fan_in_dim for n, i in got.items()} == {n: i.fan_in_dim for n, i in want.items()}
    assert {i.role for i in want.values()} == {"input", "hidden", "output", "vector"}
    assert all(i.m_in == width / BASE or i.m_in == 1.0 for i in want.values())


def test_recorded_base_shapes_read_microsoft_mup_bsh(tmp_path):
    """A .bsh file written by Microsoft mup's make_base_shapes (YAML) loads as base shapes."""
    mup = pytest.importorskip("mup")
    path = tmp_path / "mup.bsh"
    mup.make_base_shapes(meta(TinyGPT, BASE), meta(TinyGPT, 2 * BASE), savefile=str(path))
    got = mupopt.set_base_shapes(TinyGPT(WIDTH), str(path), overrides=POS)
    assert as_tuples(got) == as_tuples(mupopt.set_base_shapes(TinyGPT(WIDTH), meta(TinyGPT, BASE), overrides=POS))


@pytest.mark.parametrize("width", [BASE, WIDTH])
def test_recorded_base_shapes_as_microsoft_mup_returns_them(tmp_path, width):
    """What Microsoft mup's make_base_shapes returns without a savefile ({name: InfShape}) and
    its .bsh file read by hand ({name: [base size or None]}) are recorded base shapes too: the
    first was a TypeError ("'method' object is not iterable"), the second a shapes dict, which
    fails at the base width. Both give what the file gives, at the base width too."""
    mup = pytest.importorskip("mup")
    path = tmp_path / "mup.bsh"
    returned = mup.make_base_shapes(meta(TinyGPT, BASE), meta(TinyGPT, 2 * BASE), savefile=str(path))
    want = as_tuples(mupopt.set_base_shapes(TinyGPT(width), str(path), overrides=POS))
    by_hand = mupopt.load_base_shapes(path)
    assert as_tuples(mupopt.set_base_shapes(TinyGPT(width), returned, overrides=POS)) == want
    assert as_tuples(mupopt.set_base_shapes(TinyGPT(width), dict(by_hand), overrides=POS)) == want


def test_recorded_base_shapes_match_names_through_wrappers(tmp_path):
    """Base shapes recorded from the plain model name the parameters of its wrapped form:
    activation checkpointing's _checkpoint_wrapped_module and DDP's leading module. are not
    part of a name (what frameworks such as torchtitan build the optimizer over)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    path = tmp_path / "gpt.bsh"
    mupopt.make_base_shapes(meta(TinyGPT, BASE), meta(TinyGPT, 2 * BASE), path)
    want = as_tuples(mupopt.set_base_shapes(TinyGPT(WIDTH), path, overrides=POS))
    model = TinyGPT(WIDTH)
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])
    wrapped = nn.Module()
    wrapped.module = model  # DataParallel's naming
    got = mupopt.set_base_shapes(wrapped, path, overrides=POS)
    assert any("_checkpoint_wrapped_module" in n for n in got)
    assert {mupopt.mup.canonical_name(n): v for n, v in as_tuples(got).items()} == want


def test_a_part_of_the_model_takes_its_part_of_the_base_shapes(tmp_path):
    """partial=True (a pipeline stage): base entries the part lacks are no error, its own
    parameters are matched as in the whole model; without it they are refused, and a parameter
    the base does not name raises naming it in either case."""
    path = tmp_path / "gpt.bsh"
    mupopt.make_base_shapes(meta(TinyGPT, BASE), meta(TinyGPT, 2 * BASE), path)
    whole = mupopt.set_base_shapes(TinyGPT(WIDTH), path, overrides=POS)
    stage = nn.Module()
    stage.blocks = TinyGPT(WIDTH).blocks
    with pytest.raises(mupopt.MupError, match="recorded base shapes has .* parameter"):
        mupopt.set_base_shapes(stage, path)
    got = mupopt.set_base_shapes(stage, path, overrides=POS, partial=True)
    assert as_tuples(got) == {n: v for n, v in as_tuples(whole).items() if n.startswith("blocks.")}
    stage.extra = nn.Linear(WIDTH, WIDTH)
    with pytest.raises(mupopt.MupError, match="'extra.weight' is missing from the recorded base shapes"):
        mupopt.set_base_shapes(stage, path, partial=True)


def test_an_int_as_base_is_a_type_error_naming_base_widths():
    with pytest.raises(TypeError, match=r"base_widths=\{<width>: 16\}"):
        mupopt.set_base_shapes(MLP(64), 16)
    with pytest.raises(TypeError, match="base_widths="):
        mupopt.set_base_shapes(MLP(64), base_widths=16)
    with pytest.raises(TypeError, match="positive"):  # was a ZeroDivisionError
        mupopt.set_base_shapes(MLP(64), base_widths={64: 0})


def test_a_delta_at_the_base_width_is_named():
    """delta= built at the base width tells no width dimension: the error said "Pass delta=" to
    a call that passed one."""
    with pytest.raises(mupopt.MupError, match="base and delta have the same shapes"):
        mupopt.set_base_shapes(MLP(64), meta(MLP, 16), delta=meta(MLP, 16))


def test_a_base_wider_than_the_model_raises():
    """Swapped arguments (base wider than the model) would give m < 1 silently."""
    with pytest.raises(mupopt.MupError, match="swap"):
        mupopt.set_base_shapes(MLP(32), meta(MLP, 128))
    with pytest.raises(mupopt.MupError, match="swap"):
        mupopt.set_base_shapes(MLP(32), base_widths={32: 128})


def test_a_base_with_extra_layers_raises():
    """A base of another depth (parameters the model lacks) was built from another config."""
    with pytest.raises(mupopt.MupError, match=r"base model has 12 parameter\(s\) the model lacks.*blocks\.2\."):
        mupopt.set_base_shapes(TinyGPT(WIDTH), meta(TinyGPT, BASE, n_layer=3), overrides=POS)
    with pytest.raises(mupopt.MupError, match="delta model has"):
        mupopt.set_base_shapes(TinyGPT(BASE), meta(TinyGPT, BASE), delta=meta(TinyGPT, 64, n_layer=3), overrides=POS)


def test_mup_summary_of_plain_parameters_uses_the_model_names(gpt):
    """Given model.parameters() (as Hugging Face's Trainer passes them), mup_summary() names
    each row as set_base_shapes saw it. After a state_dict round trip the roles come from the
    saved records; the names from what this process knows (the records keep a name as its
    CRC-32 only: docs/mup.md), so plain parameters without width information get positions."""
    model, _, infos = gpt
    names = [n for n, _ in model.named_parameters()]
    opt = mupopt.AdamW(model.parameters())
    rows = _rows(opt.mup_summary())
    assert [r[0] for r in rows] == names
    assert [r[2] for r in rows] == [infos[n].role for n in names]
    info = infos["blocks.0.qkv.weight"]
    assert WidthInfo.from_dict(info.as_dict()).name == "blocks.0.qkv.weight"
    sd = copy.deepcopy(opt.state_dict())
    fresh = mupopt.AdamW(model.parameters())
    fresh.load_state_dict(sd)
    assert [r[0] for r in _rows(fresh.mup_summary())] == names
    blind = mupopt.AdamW([p.detach().clone().requires_grad_() for p in model.parameters()])
    blind.load_state_dict(sd)
    rows = _rows(blind.mup_summary())
    assert rows[0][0] == "group0.param0"
    assert [r[2] for r in rows] == [infos[n].role for n in names]


class _ReadmeGPT(nn.Module):
    """A GPT-shaped stand-in for the README's GPT(width=...): embedding, MLP, norm, readout."""

    def __init__(self, width: int, vocab: int = 50):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids)
        return self.head(self.ln(x + self.down(F.gelu(self.up(x)))))


@pytest.mark.parametrize("width", [256, 512])
def test_readme_mup_recipe_runs_unchanged_at_the_base_width_and_wider(width):
    """The README's 'muP in a few lines' block, as written, at the base width (the tuning run)
    and at a larger one: a summary with every role, multipliers 1 at the base, 1/m wider."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## muP in a few lines"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python"))]
    assert "GPT(width=2048)" in code and "delta" in code
    code = code.replace("GPT(width=2048)", f"GPT(width={width})")
    scope = {"GPT": _ReadmeGPT, "lr_tuned_at_width_256": 1e-3, "print": lambda *a: None}
    exec(compile(code, "README.md", "exec"), scope)
    model, opt = scope["model"], scope["opt"]
    rows = _rows(opt.mup_summary())
    assert [r[0] for r in rows] == [n for n, _ in model.named_parameters()]
    assert {r[2] for r in rows} == {"input", "hidden", "output", "vector"}
    hidden = mupopt.width_info(model.up.weight)
    assert hidden.role == "hidden" and multipliers("adamw", hidden).lr == pytest.approx(256 / width)
