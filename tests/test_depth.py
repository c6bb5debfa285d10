"""Depth: set_base_depth, the depth rules of the rule table, records, summary, errors, and the
weight-decay mode "inverse_width".

The expectations are written here from docs/mup.md ("Depth"), i.e. from CompleteP's Table 1 (Dey
et al., arXiv 2505.01618) and the derived rows, independently of mupopt.mup: a branch tensor gets
lr and decay x m_L^(alpha-1) and Adam epsilon x m_L^(-alpha); a trunk tensor nothing.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import mupopt
from mupopt.mup import DepthInfo, MupError, WidthInfo, multipliers, read_depth, width_record

from models import fill_grads

BASE_W, W = 16, 32          # width multiplier 2
BASE_D = 2


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(self.ln(x))))


class ResNet(nn.Module):
    """inp -> depth x (x + mult * block(x)) -> out."""

    def __init__(self, d=W, depth=8, d_in=5, d_out=3):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Linear(d, d_out)
        self.mult = 1.0

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + self.mult * b(h)
        return self.out(h)


def widths(model, depth):
    with torch.device("meta"):
        base, delta = ResNet(BASE_W, depth), ResNet(2 * BASE_W, depth)
    mupopt.set_base_shapes(model, base, delta=delta)


# ---------------------------------------------------------------------------------------------
# The rule table, transcribed in float64 from docs/mup.md (width rule x depth factor)
# ---------------------------------------------------------------------------------------------
WIDTH_LR = {  # docs/mup.md's width table at m_in = m_out = m (unblocked Shampoo)
    "adamw": {"input": lambda m: 1.0, "hidden": lambda m: 1 / m, "output": lambda m: 1 / m, "vector": lambda m: 1.0},
    "lamb": {"input": lambda m: 1.0, "hidden": lambda m: 1.0, "output": lambda m: 1.0, "vector": lambda m: 1.0},
    "shampoo": {"input": lambda m: m**0.5, "hidden": lambda m: 1.0, "output": lambda m: m**-0.5, "vector": lambda m: 1.0},
    "muon": {"hidden": lambda m: 1.0},
    "muon_match_rms_adamw": {"hidden": lambda m: m**-0.5},
}
for alias in ("adopt", "sophia", "shampoo_grafted"):
    WIDTH_LR[alias] = WIDTH_LR["adamw"]
ADAM_EPS = {"adamw", "adopt", "lamb"}  # epsilon added to sqrt(v): x m_L^(-alpha) in a branch


@pytest.mark.parametrize("rule", sorted(WIDTH_LR))
@pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
@pytest.mark.parametrize("m_depth", [0.5, 1.0, 8.0])
@pytest.mark.parametrize("wd_mode", ["independent", "coupled", "inverse_width"])
def test_depth_rules_match_the_float64_table(rule, alpha, m_depth, wd_mode):
    m = 4.0
    for role, width_lr in WIDTH_LR[rule].items():
        info = WidthInfo(role, m if role in ("hidden", "output") else 1.0, m if role in ("hidden", "input", "vector") else 1.0)
        for branch in (True, False):
            got = multipliers(rule, info, depth=DepthInfo(branch, m_depth, alpha), wd_mode=wd_mode)
            d_lr = m_depth ** (alpha - 1) if branch else 1.0
            lr = width_lr(m) * d_lr
            wd = {"independent": 1.0, "coupled": width_lr(m), "inverse_width": 1 / m}[wd_mode] * d_lr
            eps = (m_depth ** -alpha if branch else 1.0) if rule in ADAM_EPS else 1.0
            assert got.lr == pytest.approx(lr, rel=1e-12), (role, branch)
            assert got.wd == pytest.approx(wd, rel=1e-12), (role, branch)
            assert got.eps == pytest.approx(eps, rel=1e-12), (role, branch)


def test_depth_without_width_information():
    """A depth-only model (standard width parameterization): the depth factor alone."""
    got = multipliers("adamw", None, depth=DepthInfo(True, 8.0, 0.5))
    assert got == (8.0 ** -0.5, 8.0 ** -0.5, 8.0 ** -0.5)
    assert multipliers("adamw", None, depth=DepthInfo(False, 8.0, 0.5)) == (1.0, 1.0, 1.0)
    assert multipliers("adamw", None) == (1.0, 1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# set_base_depth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_set_base_depth_marks_branches_and_returns_the_residual_multiplier(alpha):
    model = ResNet(depth=8)
    mult = mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D, alpha=alpha)
    assert mult == pytest.approx((BASE_D / 8) ** alpha)
    assert model.mupopt_residual_multiplier == mult
    for name, p in model.named_parameters():
        info = mupopt.depth_info(p)
        assert info == DepthInfo(name.startswith("blocks."), 4.0, alpha), name
    mupopt.clear_base_depth(model)
    assert all(mupopt.depth_info(p) is None for p in model.parameters())


def lr_eps(opt):
    g = opt.param_groups[0]
    return [(m.lr, m.wd, m.eps) for m in opt.group_multipliers(g)]


def test_depth_and_width_compose_in_either_order():
    a, b = ResNet(depth=8), ResNet(depth=8)
    widths(a, 8)
    mupopt.set_base_depth(a, a.blocks, base_depth=BASE_D)
    mupopt.set_base_depth(b, b.blocks, base_depth=BASE_D)
    widths(b, 8)
    ma, mb = lr_eps(mupopt.AdamW(a.parameters(), lr=1e-3)), lr_eps(mupopt.AdamW(b.parameters(), lr=1e-3))
    assert ma == mb
    names = [n for n, _ in a.named_parameters()]
    i = names.index("blocks.3.fc.weight")  # hidden, in a branch: 1/m_N * m_L^0 at alpha 1
    assert ma[i] == (pytest.approx(0.5), pytest.approx(1.0), pytest.approx(0.25))
    j = names.index("out.weight")  # readout: no depth factor
    assert ma[j] == (pytest.approx(0.5), pytest.approx(1.0), pytest.approx(1.0))


def _assert_same_steps(model, opt, ref, torch_opt, steps=3):
    """``opt`` on ``model`` and ``torch_opt`` on its copy ``ref`` (param groups carrying the
    expected multipliers), stepped with the same gradients: the params agree to float64 rounding."""
    for step in range(steps):
        fill_grads(list(model.parameters()), step)
        fill_grads(list(ref.parameters()), step)
        opt.step()
        torch_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")


def test_adamw_under_depth_steps_as_torch_adamw_with_completep_groups():
    """mupopt.AdamW on a width x depth model against torch.optim.AdamW with one group per tensor
    built as CompleteP's reference code builds them (lr * m_N^-1 * m_L^(alpha-1), weight_decay *
    m_N for hidden weights, eps * m_L^-alpha in the branches), alpha 1/2 so every factor is not 1."""
    torch.manual_seed(0)
    model = ResNet(depth=8).double()
    widths(model, 8)
    mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D, alpha=0.5)
    ref = copy.deepcopy(model)
    lr, wd, eps, m_N, m_L = 1e-2, 0.1, 1e-6, 2.0, 4.0
    groups = []
    for name, p in ref.named_parameters():
        branch = name.startswith("blocks.")
        hidden = p.ndim == 2 and branch
        width_lr = 1 / m_N if (hidden or name == "out.weight") else 1.0
        depth_lr = m_L ** (0.5 - 1) if branch else 1.0
        groups.append({"params": [p], "lr": lr * width_lr * depth_lr, "weight_decay": wd / width_lr,
                       "eps": eps * (m_L ** -0.5 if branch else 1.0)})
    opt = mupopt.AdamW(model.parameters(), lr=lr, weight_decay=wd, eps=eps)
    _assert_same_steps(model, opt, ref, torch.optim.AdamW(groups, lr=lr))


def test_muon_hidden_branch_matrices_get_the_depth_factor():
    model = ResNet(depth=8)
    widths(model, 8)
    mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D, alpha=0.5)
    opt = mupopt.Muon(model.parameters(), lr=1e-2, adjust_lr_fn="original")
    names = [n for n, _ in model.named_parameters()]
    mults = opt.group_multipliers(opt.param_groups[0])
    fc = names.index("blocks.0.fc.weight")  # (2d, d): shape factor sqrt(max(1, 2)) x m_L^-1/2
    assert mults[fc].lr == pytest.approx(math.sqrt(2) * 4 ** -0.5)
    ln = names.index("blocks.0.ln.weight")  # AdamW part: AdamW's rule, eps x m_L^-1/2
    assert (mults[ln].lr, mults[ln].eps) == (pytest.approx(0.5), pytest.approx(0.5))


def test_init_mup_is_depth_free():
    """CompleteP keeps init variances depth-free: init_mup_ gives a depth-8 model's hidden
    weights the std of a depth-2 model's."""
    stds = []
    for depth in (2, 8):
        model = ResNet(depth=depth)
        widths(model, depth)
        mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D)
        mupopt.init_mup_(model, 0.5, generator=torch.Generator().manual_seed(0))
        stds.append(torch.cat([b.fc.weight.flatten() for b in model.blocks]).std().item())
    assert stds[0] == pytest.approx(0.5 / math.sqrt(2), rel=0.1)
    assert stds[1] == pytest.approx(stds[0], rel=0.1)


# ---------------------------------------------------------------------------------------------
# Records: saved with the optimizer, old records load as depth 1, wrapping keeps the information
# ---------------------------------------------------------------------------------------------
def test_depth_travels_in_the_optimizer_state_dict():
    model = ResNet(depth=8)
    mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D, alpha=0.5)
    opt = mupopt.AdamW(model.parameters(), lr=1e-3)
    fill_grads(list(model.parameters()), 0)
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][1]["mup"]["m_depth"] == 4.0 and sd["state"][1]["mup"]["branch"] == 0  # inp.bias
    fresh = ResNet(depth=8)  # no depth information: the records bring it
    opt2 = mupopt.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(sd)
    assert lr_eps(opt2) == lr_eps(opt)
    assert any(m[0] != 1.0 for m in lr_eps(opt2))


def test_records_without_depth_fields_read_as_depth_one():
    record = width_record(WidthInfo("hidden", 2.0, 2.0), (4, 4))
    assert "m_depth" not in record and read_depth(record, "w") is None
    record = width_record(None, (4,), depth=DepthInfo(True, 2.0, 1.0))
    assert read_depth(record, "w") == DepthInfo(True, 2.0, 1.0)
    del record["alpha"]
    with pytest.raises(MupError, match="some depth fields"):
        read_depth(record, "w")


def test_depth_survives_replaced_parameters():
    """FSDP2 / tensor parallelism replace the Parameter objects: the depth information comes
    back by module and name, as width information does."""
    model = ResNet(depth=4)
    mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            module._parameters[name] = nn.Parameter(p.detach().clone())
    assert all(mupopt.depth_info(p) is None for p in model.parameters())
    opt = mupopt.AdamW(model.parameters(), lr=1e-3)
    assert [opt._depth_of(p).branch for p in model.parameters()] == [n.startswith("blocks.") for n, _ in model.named_parameters()]


def test_summary_shows_depth():
    model = ResNet(depth=8)
    widths(model, 8)
    mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D)
    text = mupopt.summary(model)
    assert "depth" in text.splitlines()[0]
    line = next(l for l in text.splitlines() if l.startswith("blocks.0.fc.weight"))
    assert "branch(m_L=4,a=1)" in line and "eps x0.25" in line
    assert "x = x + 0.25 * block(x)" in text
    opt_text = mupopt.AdamW(model.parameters(), lr=1e-3).mup_summary()
    assert "trunk(m_L=4)" in next(l for l in opt_text.splitlines() if l.startswith("out.weight"))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_blocks_not_in_the_model_are_refused():
    model, other = ResNet(depth=4), ResNet(depth=4)
    with pytest.raises(MupError, match="not a module of the model"):
        mupopt.set_base_depth(model, other.blocks)


@pytest.mark.parametrize("base_depth", [0, -2, float("nan"), "2"])
def test_bad_base_depth_is_refused(base_depth):
    model = ResNet(depth=4)
    with pytest.raises(MupError, match="base_depth"):
        mupopt.set_base_depth(model, model.blocks, base_depth=base_depth)


def test_blocks_that_differ_in_structure_are_refused():
    model = ResNet(depth=4)
    model.blocks[2].fc = nn.Linear(W, 3 * W)
    model.blocks[2].proj = nn.Linear(3 * W, W)
    with pytest.raises(MupError, match="block 2 .* differs in structure"):
        mupopt.set_base_depth(model, model.blocks)


@pytest.mark.parametrize("alpha", [0.0, 0.49, 1.01, 2.0])
def test_alpha_outside_the_range_is_refused(alpha):
    model = ResNet(depth=4)
    with pytest.raises(MupError, match=r"alpha must be in \[0.5, 1.0\]"):
        mupopt.set_base_depth(model, model.blocks, alpha=alpha)
    assert all(mupopt.depth_info(p) is None for p in model.parameters())  # nothing written


def test_a_single_module_for_blocks_is_refused():
    model = ResNet(depth=4)
    with pytest.raises(MupError, match="repeated blocks"):
        mupopt.set_base_depth(model, model.blocks[0])


# ---------------------------------------------------------------------------------------------
# Weight decay "inverse_width" (Qiu et al., arXiv 2512.05620)
# ---------------------------------------------------------------------------------------------
def test_inverse_width_decay_is_independent_decay_over_width():
    """AdamW with wd_mode="inverse_width": p *= 1 - lr*wd/m per step for every tensor (m its width
    ratio: 2, 1 for the readout bias), the update with the muP lr; checked against
    torch.optim.AdamW groups."""
    torch.manual_seed(0)
    model = ResNet(depth=2).double()
    widths(model, 2)
    ref = copy.deepcopy(model)
    lr, wd = 1e-2, 0.5
    groups = []
    for name, p in ref.named_parameters():
        width_lr = 0.5 if (p.ndim == 2 and name != "inp.weight") else 1.0
        m = 1.0 if name == "out.bias" else 2.0  # out.bias (d_out,) has no width dimension
        # torch's decay is lr_group * weight_decay: want lr * wd / m
        groups.append({"params": [p], "lr": lr * width_lr, "weight_decay": wd / m / width_lr})
    opt = mupopt.AdamW(model.parameters(), lr=lr, weight_decay=wd, wd_mode="inverse_width")
    _assert_same_steps(model, opt, ref, torch.optim.AdamW(groups, lr=lr))


def test_depth_survives_fully_shard():
    """FSDP2 (fully_shard, a one-rank gloo mesh) after set_base_shapes and set_base_depth: the
    optimizer built over the new DTensor parameters gets the single-process multipliers."""
    from torch.distributed.fsdp import fully_shard
    import dist_worker as dw

    def build():
        model = ResNet(depth=4)
        widths(model, 4)
        mupopt.set_base_depth(model, model.blocks, base_depth=BASE_D, alpha=0.5)
        return model

    reference = lr_eps(mupopt.AdamW(build().parameters(), lr=1e-3))
    with dw.one_rank_mesh() as mesh:
        model = build()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(mupopt.depth_info(p) is None for p in model.parameters())  # new Parameters
        assert lr_eps(mupopt.AdamW(model.parameters(), lr=1e-3)) == reference
    assert any(m[0] != 1.0 and m[2] != 1.0 for m in reference)


def test_a_checkpoint_saved_without_depth_resumes_with_depth_factor_one():
    """A state_dict saved before depth existed (records without depth fields) wins over the
    resuming optimizer's records, as width records do: the run goes on as it was saved."""
    plain = ResNet(depth=8)
    opt = mupopt.AdamW(plain.parameters(), lr=1e-3)
    fill_grads(list(plain.parameters()), 0)
    opt.step()
    sd = opt.state_dict()
    assert all("m_depth" not in st["mup"] for st in sd["state"].values())
    deep = ResNet(depth=8)
    mupopt.set_base_depth(deep, deep.blocks, base_depth=BASE_D)
    resumed = mupopt.AdamW(deep.parameters(), lr=1e-3)
    assert any(m[2] != 1.0 for m in lr_eps(resumed))  # before the load: its own depth records
    resumed.load_state_dict(sd)
    assert all(m == (1.0, 1.0, 1.0) for m in lr_eps(resumed))
