"""Width information at optimizer construction, by parameter name (issue 19 item 4).

``mupopt.<Optimizer>(model.named_parameters(), base_shapes="model.bsh", overrides=...)``: for
frameworks that build the optimizer from named parameters and give it no model to call
``set_base_shapes`` on (torchtitan passes ``param_names`` in every group). Each optimizer must
step exactly as it does after ``set_base_shapes(model, "model.bsh")``, and every way of getting
it wrong is an error naming the parameter.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import mupopt
from mupopt.mup import MupError, clear_base_shapes
from models import TinyGPT, fill_grads

OPTIMIZERS = {
    "adamw": lambda ps, **kw: mupopt.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
    "adopt": lambda ps, **kw: mupopt.ADOPT(ps, lr=1e-2, weight_decay=0.1, **kw),
    "lamb": lambda ps, **kw: mupopt.LAMB(ps, lr=1e-2, weight_decay=0.1, **kw),
    "sophia": lambda ps, **kw: mupopt.SophiaG(ps, lr=1e-2, weight_decay=0.1, **kw),
    "muon": lambda ps, **kw: mupopt.Muon(ps, lr=1e-2, weight_decay=0.1, **kw),
    "shampoo": lambda ps, **kw: mupopt.Shampoo(ps, lr=1e-2, weight_decay=0.1, max_preconditioner_dim=16, **kw),
}
# The token embedding and the readout are both (vocab, d) with only d scaling; the bare
# positional parameter (MAX_SEQ, d) likewise: their names alone do not tell the role.
ROLES = {"tok.weight": "input", "pos": "input", "readout.weight": "output"}


@pytest.fixture
def bsh(tmp_path):
    with torch.device("meta"):
        base, delta = TinyGPT(8), TinyGPT(16)
    path = tmp_path / "tiny.bsh"
    mupopt.make_base_shapes(base, delta, path)
    return path


def _model(seed=0, width=32):
    torch.manual_seed(seed)
    return TinyGPT(width)


def _run(opt, params, steps=3):
    for step in range(steps):
        fill_grads(params, step)
        opt.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_by_name_steps_as_set_base_shapes(name, bsh):
    """Same multipliers and the same parameters, bit for bit, as width info from the model."""
    by_model = _model()
    by_name = copy.deepcopy(by_model)
    mupopt.set_base_shapes(by_model, bsh, overrides={"pos": "input"})
    try:
        ref = OPTIMIZERS[name](list(by_model.parameters()))
        opt = OPTIMIZERS[name](by_name.named_parameters(), base_shapes=bsh, overrides=ROLES)
        assert opt.group_multipliers(opt.param_groups[0]) == ref.group_multipliers(ref.param_groups[0])
        infos = opt.width_infos(opt.param_groups[0])
        assert infos == ref.width_infos(ref.param_groups[0]) and None not in infos
        _run(ref, list(by_model.parameters()))
        _run(opt, list(by_name.parameters()))
        for (n, a), b in zip(by_name.named_parameters(), by_model.parameters()):
            assert torch.equal(a, b), n
        # The records in the state carry the width information on (a resume needs no file).
        fresh = OPTIMIZERS[name](list(copy.deepcopy(by_name).parameters()))
        fresh.load_state_dict(opt.state_dict())
        assert fresh.group_multipliers(fresh.param_groups[0]) == opt.group_multipliers(opt.param_groups[0])
    finally:
        clear_base_shapes(by_model)


def test_by_name_differs_from_no_mup(bsh):
    """The width information changes the step (a test that the keyword is not ignored)."""
    a, b = _model(), _model()
    opt_a = mupopt.AdamW(a.named_parameters(), lr=1e-2, base_shapes=bsh, overrides=ROLES)
    opt_b = mupopt.AdamW(b.named_parameters(), lr=1e-2)
    _run(opt_a, list(a.parameters()), 1)
    _run(opt_b, list(b.parameters()), 1)
    assert not torch.equal(a.blocks[0].qkv.weight, b.blocks[0].qkv.weight)
    assert "hidden" in opt_a.mup_summary() and "blocks.0.qkv.weight" in opt_a.mup_summary()


def test_wrapper_prefixes_and_loaded_record(bsh):
    """Names as DDP / activation checkpointing write them match the file's plain names."""
    model = _model()
    named = [(f"module.{n}".replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."), p)
             for n, p in model.named_parameters()]
    overrides = {f"module.{k}": v for k, v in ROLES.items()}
    opt = mupopt.AdamW(named, base_shapes=mupopt.load_base_shapes(bsh), overrides=overrides)
    ref = mupopt.AdamW(_model().named_parameters(), base_shapes=bsh, overrides=ROLES)
    assert opt.group_multipliers(opt.param_groups[0]) == ref.group_multipliers(ref.param_groups[0])


def test_vocab_matrix_needs_a_role(bsh):
    with pytest.raises(MupError, match=r"'tok\.weight'.*readout.*embedding.*overrides"):
        mupopt.AdamW(_model().named_parameters(), base_shapes=bsh, overrides={"pos": "input"})


def test_plain_parameters_refused(bsh):
    with pytest.raises(MupError, match="named_parameters"):
        mupopt.AdamW(_model().parameters(), base_shapes=bsh)


def test_later_group(bsh):
    model = _model()
    opt = mupopt.AdamW([(n, p) for n, p in model.named_parameters() if not n.startswith("blocks.1")],
                       base_shapes=bsh, overrides=ROLES)
    with pytest.raises(ValueError, match="with/without names"):  # torch's own check
        opt.add_param_group({"params": list(model.blocks[1].parameters())})
    assert len(opt.param_groups) == 1
    # With names, a later group gets its width information from the file too.
    opt.add_param_group({"params": [p for n, p in model.named_parameters() if n.startswith("blocks.1")],
                         "param_names": [n for n, _ in model.named_parameters() if n.startswith("blocks.1")]})
    assert any(m.lr != 1.0 for m in opt.group_multipliers(opt.param_groups[1]))


def test_unknown_name_and_unused_override(bsh):
    model = _model()
    extra = nn.Parameter(torch.zeros(3, 32))
    with pytest.raises(MupError, match="'extra'.*missing from the recorded base shapes"):
        mupopt.AdamW(list(model.named_parameters()) + [("extra", extra)], base_shapes=bsh, overrides=ROLES)
    with pytest.raises(MupError, match=r"overrides \['nothing\.\*'\] match no parameter"):
        mupopt.AdamW(model.named_parameters(), base_shapes=bsh, overrides={**ROLES, "nothing.*": "hidden"})


def test_bad_arguments(bsh):
    model = _model()
    with pytest.raises(MupError, match="overrides= declares roles for base_shapes="):
        mupopt.AdamW(model.named_parameters(), overrides=ROLES)
    with pytest.raises(MupError, match="recorded base shapes"):
        mupopt.AdamW(model.named_parameters(), base_shapes=_model(width=8))
    with pytest.raises(MupError, match="has shape .* but 3 dimensions"):
        bad = mupopt.load_base_shapes(bsh)
        bad["blocks.0.qkv.weight"] = [None, 8, None]
        mupopt.AdamW(model.named_parameters(), base_shapes=bad, overrides=ROLES)


def test_agrees_or_conflicts_with_set_base_shapes(bsh):
    model = _model()
    mupopt.set_base_shapes(model, bsh, overrides={"pos": "input"})
    try:
        mupopt.AdamW(model.named_parameters(), base_shapes=bsh, overrides=ROLES)  # the same: accepted
        with pytest.raises(MupError, match="'readout.weight' carries width information .* differs"):
            mupopt.AdamW(model.named_parameters(), base_shapes=bsh, overrides={**ROLES, "readout.weight": "hidden"})
    finally:
        clear_base_shapes(model)


def test_copy_and_pickle_keep_it(bsh):
    model = _model()
    opt = mupopt.AdamW(model.named_parameters(), base_shapes=bsh, overrides=ROLES)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other._named_widths is not None
        assert other.group_multipliers(other.param_groups[0]) == opt.group_multipliers(opt.param_groups[0])
