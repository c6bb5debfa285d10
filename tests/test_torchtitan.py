"""mupopt in torchtitan (issue 19 item 4): mupopt.integrations.torchtitan registers the six
optimizers in torchtitan's optimizer container and gives the parameters their width information
from a base-shapes file, by name, when the container is built (after parallelisation: FSDP2's
DTensors, global shapes). Runs where torchtitan is installed (the Makefile installs 0.3.0)."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

try:  # ImportError where it is not installed; another error where it does not fit this torch
    from torchtitan.components.optimizer import ParamGroupConfig

    from mupopt.integrations.torchtitan import OPTIMIZERS, MupOptimizersContainer
except Exception as exc:  # noqa: BLE001 - the skip says which
    pytest.skip(f"torchtitan's optimizer code does not import here ({type(exc).__name__}: {exc}); "
                f"pip install mupopt[torchtitan]", allow_module_level=True)

import dist_worker as dw  # noqa: E402
import mupopt  # noqa: E402

NAMES = ["adamw", "adopt", "lamb", "sophia", "muon", "shampoo"]
TOLERANCE = {"adamw": 0.0, "adopt": 0.0, "sophia": 0.0, "lamb": 1e-6, "muon": 1e-6, "shampoo": 1e-6}


@pytest.fixture(scope="module")
def bsh(tmp_path_factory):
    """The base shapes of tests/dist_worker.py's Net, recorded once (mupopt.make_base_shapes)."""
    path = tmp_path_factory.mktemp("bsh") / "net.bsh"
    with torch.device("meta"):
        mupopt.make_base_shapes(dw.Net(dw.BASE), dw.Net(2 * dw.BASE), path)
    return str(path)


def config(name: str, bsh: str | None, **extra) -> MupOptimizersContainer.Config:
    cls, kwargs = dw.optimizer_args(name)
    kwargs.pop("backend")
    return MupOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=f"mupopt.{cls.__name__}", optimizer_kwargs=kwargs)],
        base_shapes=bsh, **extra)


def step(container, name: str, t: int) -> None:
    (opt,) = container.optimizers
    if name == "sophia":
        if t % 3 == 0:
            opt.update_hessian()
        opt.step(bs=64)
    else:
        container.step()


def run(model, container, name, steps):
    for t in steps:
        dw.feed_grads(model, t)
        step(container, name, t)


def uninterrupted(name: str) -> dict:
    model = dw.make_model()
    opt = dw.make_optimizer(name, model.parameters(), "auto")
    for t in range(dw.STEPS):
        dw.feed_grads(model, t)
        dw.step_once(opt, name, t)
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict, rtol: float, label: str):
    for name, w in want.items():
        if rtol == 0:
            assert torch.equal(got[name], w), f"{label}: {name} differs by {(got[name] - w).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(got[name], w, rtol=rtol, atol=rtol * w.abs().max().item(), msg=f"{label}: {name}")


def test_every_optimizer_is_registered():
    assert set(OPTIMIZERS) == {f"mupopt.{c}" for c in ("AdamW", "ADOPT", "LAMB", "SophiaG", "Muon", "Shampoo")}
    # torch's names still resolve through torchtitan's own table.
    assert MupOptimizersContainer._resolve_optimizer_factory("AdamW") is torch.optim.AdamW


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_the_mup_optimizer_and_resumes_without_base_shapes(name, bsh):
    """From the config alone: the optimizer is mupopt's, its multipliers are those of
    set_base_shapes with a base model, it steps as a plain mupopt optimizer, torchtitan's own
    (implementation) group keys are left out, and torchtitan's flattened checkpoint (one record per
    parameter) resumes into a container without base shapes (Muon: with them, which route its
    parameters) as the uninterrupted run."""
    model = dw.make_model(mup=False)
    container = config(name, bsh).build(model_parts=[model])
    (opt,) = container.optimizers
    assert type(opt) is OPTIMIZERS[f"mupopt.{type(opt).__name__}"]
    assert not opt.param_groups[0].get("fused")  # torchtitan's implementation choice, not passed on
    reference = dw.make_optimizer(name, dw.make_model().parameters(), "auto")
    assert opt.group_multipliers(opt.param_groups[0]) == reference.group_multipliers(reference.param_groups[0])
    run(model, container, name, range(5))
    flat = container.state_dict()
    records = [k for k in flat if ".mup." in k]
    assert not [k for k in records if k.startswith("param_groups.")]
    assert len(records) == sum(5 + p.ndim for p in model.parameters())
    buf = io.BytesIO()
    torch.save(flat, buf)
    buf.seek(0)
    flat = torch.load(buf, weights_only=True)

    plain = dw.make_model(seed=1, mup=False)
    plain.load_state_dict(model.state_dict())
    resumed = config(name, bsh if name == "muon" else None).build(model_parts=[plain])
    resumed.load_state_dict(flat)
    run(plain, resumed, name, range(5, dw.STEPS))
    assert_close({n: p.detach() for n, p in plain.named_parameters()}, uninterrupted(name), TOLERANCE[name], name)


def test_a_name_missing_from_the_base_shapes_raises_naming_it(tmp_path, bsh):
    shapes = mupopt.load_base_shapes(bsh)
    del shapes["fc2.bias"]
    path = tmp_path / "partial.bsh"
    path.write_text(json.dumps(shapes))
    with pytest.raises(mupopt.MupError, match="'fc2.bias' is missing from the recorded base shapes"):
        config("adamw", str(path)).build(model_parts=[dw.make_model(mup=False)])


def test_wrapper_path_components_do_not_hide_a_name(bsh):
    """Activation checkpointing puts _checkpoint_wrapped_module into the names of what it wraps;
    the base shapes recorded from the plain model still name those parameters."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = dw.make_model(mup=False)
    model.fc1 = checkpoint_wrapper(model.fc1)
    assert "fc1._checkpoint_wrapped_module.weight" in dict(model.named_parameters())
    (opt,) = config("adamw", bsh).build(model_parts=[model]).optimizers
    reference = dw.make_optimizer("adamw", dw.make_model().parameters(), "auto")
    assert opt.group_multipliers(opt.param_groups[0]) == reference.group_multipliers(reference.param_groups[0])


def test_a_pipeline_stage_takes_its_part_of_the_base_shapes(bsh):
    """Pipeline parallelism gives each stage part of the model: the names it lacks are no error."""
    model = dw.make_model(mup=False)
    stage = torch.nn.ModuleDict({"fc1": model.fc1, "fc2": model.fc2})
    other = torch.nn.ModuleDict({"emb": model.emb, "norm": model.norm, "out": model.out})
    container = config("adamw", bsh).build(model_parts=[stage, other])
    assert [type(o) for o in container.optimizers] == [mupopt.AdamW, mupopt.AdamW]
    assert mupopt.width_info(model.fc1.weight).role == "hidden" and mupopt.width_info(model.out.weight).role == "output"


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, bsh):
    tmp = tmp_path_factory.mktemp("tt")
    specs = [(f"tt-{n}", {"kind": "torchtitan", "optimizer": n, "bsh": bsh}) for n in ("adamw", "muon")]
    out = tmp / "results.pt"
    # No Triton interpreter here or on the ranks: "auto" picks the same (C++, reference) backends.
    env = {"PYTHONPATH": os.pathsep.join(sys.path)}
    return dw.spawn(2, specs, out, env)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_fsdp2_on_two_ranks_gets_the_global_width_information(fsdp_results, name):
    """Built after fully_shard on 2 gloo ranks: the multipliers and the steps are the
    single-process ones and the records hold the global shapes (fc1.weight is (32, 16), 16 rows
    per rank)."""
    got = fsdp_results[f"tt-{name}"]
    if "failed" in got:
        pytest.fail(got["failed"])
    reference = dw.make_optimizer(name, dw.make_model().parameters(), "auto")
    assert got["mults"] == [str(m) for m in reference.group_multipliers(reference.param_groups[0])]
    assert_close(got["params"], uninterrupted(name), TOLERANCE[name], name)
    assert got["records"]["state.fc1.weight.mup.shape.0"] == 32 and got["records"]["state.fc1.weight.mup.shape.1"] == 16
