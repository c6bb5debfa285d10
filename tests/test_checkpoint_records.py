"""muP width records in checkpoints (issue 19 item 2): each parameter's record travels in that
parameter's optimizer state (mupopt.mup.width_record), so no checkpoint path can attach it to
another parameter, and every layout holds it once per parameter.

- torch.distributed.optim.ZeroRedundancyOptimizer (2 gloo ranks, tests/dist_worker.py) copies
  every param-group key but "params" between its ranks' optimizers; a resume through
  consolidate_state_dict + load_state_dict continues as the uninterrupted run, for all six
  optimizers, into a model without width information (the records come from the checkpoint);
  records moved onto other parameters make the first step raise, naming the parameter; 8-bit
  states, and bf16 params with kahan_summation's compensations or stochastic_rounding's seeds,
  resume bit for bit.
- DCP's flattened optimizer state (flatten_optimizer_state_dict=True: torchtitan's layout)
  holds 5 + ndim numbers per parameter and none in the param groups; it resumes without base
  shapes.
- A record that does not fit the parameter it lands on (shape, name) is refused, naming it,
  with nothing changed; state_dicts of mupopt's first format (group["mup"] lists) load.
"""
from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch

import dist_worker as dw
import mupopt
from mupopt.mup import WidthInfo, width_record

from models import same_state_value

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

OPTIMIZERS = ["adamw", "adopt", "lamb", "sophia", "muon", "shampoo"]
# ZeRO steps whole (unsharded) parameters on their owner rank: the single-process math, with
# LAMB's norms and Muon's Newton-Schulz batched over other sets of tensors.
ZERO_MIN_8BIT = 256  # format 8's size threshold there: the test model's matrices are small
TOLERANCE = {"adamw": 0.0, "adopt": 0.0, "sophia": 0.0, "lamb": 1e-6, "muon": 1e-6, "shampoo": 1e-6}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    specs = [(f"zero-{opt}", {"kind": "zero", "optimizer": opt, "backend": "auto", "path": str(tmp / f"zero-{opt}.pt")})
             for opt in OPTIMIZERS]
    # 8-bit states: ZeRO writes the consolidated state_dict's entries (codes under exp_avg_codes)
    # straight into each rank's optimizer state.
    specs.append(("zero-adamw-8bit", {"kind": "zero", "optimizer": "adamw", "backend": "auto", "min_8bit": ZERO_MIN_8BIT,
                                      "options": {"state_bits": 8}, "path": str(tmp / "zero-adamw-8bit.pt")}))
    # bf16 params: compensations (kahan_summation) and stochastic rounding's seeds, entries of
    # each param's state that ZeRO moves like the moments. The reference backend on both sides
    # (one process below); stochastic rounding continues the first optimizer too (each rank
    # draws its params' seeds, so one process would draw others).
    bf16 = {"kind": "zero", "optimizer": "adamw", "backend": "reference", "dtype": "bfloat16"}
    specs.append(("zero-adamw-kahan", {**bf16, "options": {"kahan_summation": True}, "path": str(tmp / "zero-kahan.pt")}))
    specs.append(("zero-adamw-sr", {**bf16, "options": {"stochastic_rounding": True}, "uninterrupted": True,
                                    "path": str(tmp / "zero-sr.pt")}))
    specs.append(("zero-mismatch", {"kind": "zero_mismatch", "optimizer": "adamw", "path": str(tmp / "mismatch.pt")}))
    out = tmp / "results.pt"
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return dw.spawn(2, specs, out, env)


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """As on the ranks: backend "auto" then picks the same backends here (triton's interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def get(results, key):
    r = results[key]
    if "failed" in r:
        pytest.fail(f"scenario {key} failed on rank 0:\n{r['failed']}")
    return r


def run(model, opt, name: str, steps) -> None:
    for t in steps:
        dw.feed_grads(model, t)
        dw.step_once(opt, name, t)


def uninterrupted(name: str) -> dict:
    model = dw.make_model()
    run(model, dw.make_optimizer(name, model.parameters(), "auto"), name, range(dw.STEPS))
    return {n: p.detach() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict, rtol: float, label: str):
    for name, w in want.items():
        g = got[name]
        if rtol == 0:
            assert torch.equal(g, w), f"{label}: {name} differs by {(g - w).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item(), msg=f"{label}: {name}")


def save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------------------------------------
# ZeroRedundancyOptimizer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero_resume_continues_as_the_uninterrupted_run(results, optimizer):
    got = get(results, f"zero-{optimizer}")
    assert_close(got["params"], uninterrupted(optimizer), TOLERANCE[optimizer], f"ZeRO {optimizer}")
    # The consolidated checkpoint holds one record per parameter, in its state, none in the groups.
    saved = got["saved"]
    assert all("mup" not in g for g in saved["param_groups"])
    model = dw.make_model()
    for i, p in enumerate(model.parameters()):
        assert saved["state"][i]["mup"]["shape"] == {str(d): s for d, s in enumerate(p.shape)}


def test_zero_resume_of_8bit_states_continues_as_the_uninterrupted_run(results, monkeypatch):
    """ZeRO's load_state_dict writes each rank's states straight into its optimizer, the 8-bit
    codes under their state_dict name (exp_avg_codes): the next step takes them back as the
    entries (before: "the state ... has no 'exp_avg'")."""
    from mupopt.optim import _lean_states as lean

    got = get(results, "zero-adamw-8bit")
    assert any(k.endswith(lean.CODES) for st in got["saved"]["state"].values() for k in st)
    monkeypatch.setattr(lean, "MIN_8BIT_SIZE", ZERO_MIN_8BIT)
    model = dw.make_model()
    run(model, dw.make_optimizer("adamw", model.parameters(), "auto", state_bits=8), "adamw", range(dw.STEPS))
    assert_close(got["params"], {n: p.detach() for n, p in model.named_parameters()}, 0.0, "ZeRO AdamW 8-bit")


def _bf16_adamw(steps, ckpt=None, **options) -> tuple:
    """One process, bf16 AdamW on the reference backend: ``steps`` fed steps, from the start or
    from the consolidated ZeRO checkpoint ``ckpt`` (saved after 5 steps). (model, optimizer)."""
    model = dw.make_model(seed=1 if ckpt else 0).to(torch.bfloat16)
    opt = dw.make_optimizer("adamw", model.parameters(), "reference", **options)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optim"])
    run(model, opt, "adamw", range(5 if ckpt else 0, steps))
    return model, opt


def _zero_loaded_as_saved(got: dict, entry: str) -> int:
    """Every rank's state as ZeRO loaded it holds, for each of its params, the consolidated
    checkpoint's ``entry`` (and step, moments) bit for bit; every param of the model is on one
    rank. Returns how many params."""
    seen = {}
    for rank_state in got["loaded"]:
        for i, st in rank_state.items():
            assert i not in seen, i
            seen[i] = st
            want = got["saved"]["state"][i]
            for k in ("step", "exp_avg", "exp_avg_sq", entry):
                assert same_state_value(st[k], want[k]), (i, k)
    assert sorted(seen) == sorted(got["saved"]["state"])
    return len(seen)


def test_zero_resume_of_compensated_bf16_params_is_bit_exact(results):
    """kahan_summation under ZeRO: the consolidated checkpoint holds every param's compensation,
    each rank's optimizer gets its params' back as saved, and the resumed run's params and
    compensations are those of one process stepping all 10 steps uninterrupted, bit for bit."""
    got = get(results, "zero-adamw-kahan")
    model, opt = _bf16_adamw(dw.STEPS, kahan_summation=True)
    params = list(model.parameters())
    assert _zero_loaded_as_saved(got, "param_compensation") == len(params)
    assert all(st["param_compensation"].dtype == torch.bfloat16 for st in got["saved"]["state"].values())
    assert all(bool(st["param_compensation"].any()) for st in got["saved"]["state"].values())
    assert_close(got["params"], {n: p.detach() for n, p in model.named_parameters()}, 0.0, "ZeRO AdamW kahan")
    final = {i: st for rank_state in got["final"] for i, st in rank_state.items()}
    for i, p in enumerate(params):
        assert torch.equal(final[i]["param_compensation"], opt.state[p]["param_compensation"]), i


def test_zero_resume_of_stochastic_rounding_keeps_the_seeds(results):
    """stochastic_rounding under ZeRO: every param's seed (drawn on its owner rank) is in the
    consolidated checkpoint and back on its rank after the load; the resumed run equals the
    uninterrupted ZeRO run bit for bit (a seed drawn anew would round otherwise), and one
    process resuming the same checkpoint (torch's load_state_dict) continues alike."""
    got = get(results, "zero-adamw-sr")
    assert _zero_loaded_as_saved(got, "sr_seed") == len(list(dw.make_model().parameters()))
    assert all(w.dtype == torch.bfloat16 for w in got["params"].values())
    assert_close(got["params"], got["uninterrupted"], 0.0, "ZeRO AdamW stochastic rounding")
    model, _ = _bf16_adamw(dw.STEPS, torch.load(got["path"], weights_only=True), stochastic_rounding=True)
    assert_close(got["params"], {n: p.detach() for n, p in model.named_parameters()}, 0.0, "one process from ZeRO's SR checkpoint")


def test_zero_records_moved_onto_other_parameters_are_refused(results):
    error = get(results, "zero-mismatch")["error"]
    assert error is not None and error.startswith("MupError"), error
    assert "was saved for a parameter of shape (16,)" in error
    assert "'fc1.weight'" in error or "'fc2.weight'" in error, error


# ---------------------------------------------------------------------------------------------
# DCP's flattened layout
# ---------------------------------------------------------------------------------------------
def test_flattened_layout_holds_each_record_once():
    """flatten_optimizer_state_dict=True copies each param group's keys under every one of its
    parameters (N x N numbers for a per-group list of N records); the records are state
    entries: 5 numbers and the shape per parameter, linear in N."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    counts = {}
    for depth in (2, 4):
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(depth)])
        with torch.device("meta"):
            base = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(depth)])
        mupopt.set_base_shapes(model, base)
        opt = mupopt.AdamW(model.named_parameters(), lr=1e-2)
        flat = get_optimizer_state_dict(model, opt, options=options)
        records = [k for k in flat if ".mup." in k]
        assert not [k for k in records if k.startswith("param_groups.")]
        assert len(records) == sum(5 + p.ndim for p in model.parameters())
        counts[len(list(model.parameters()))] = len(records)
    assert counts == {4: 4 * 5 + 6, 8: 8 * 5 + 12}


@pytest.mark.parametrize("optimizer", [o for o in OPTIMIZERS if o != "shampoo"])
def test_flattened_checkpoint_resumes_without_base_shapes(optimizer):
    """get/set_optimizer_state_dict with flatten_optimizer_state_dict=True into a fresh model
    without width information: the records come back with their parameters and the run
    continues as the uninterrupted one. Muon needs the width information to route its
    parameters before the load (the flattened layout loads only the entries the fresh state
    has), and without it the load says so. (Shampoo keeps lists of blocks in its state, which
    this torch layout does not take: docs/distributed.md.)"""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model = dw.make_model()
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto")
    run(model, opt, optimizer, range(5))
    flat = save_load(get_optimizer_state_dict(model, opt, options=options))
    plain = dw.make_model(seed=1, mup=False)
    plain.load_state_dict(model.state_dict())
    fresh = dw.make_optimizer(optimizer, plain.parameters(), "auto")
    if optimizer == "muon":
        with pytest.raises(mupopt.MupError, match=r"parameter 0 of param group 0 \(shape \(16, 16\)\) holds its muP width record and nothing else"):
            set_optimizer_state_dict(plain, fresh, flat, options=options)
        plain = dw.make_model(seed=1)
        plain.load_state_dict(model.state_dict())
        fresh = dw.make_optimizer(optimizer, plain.parameters(), "auto")
    set_optimizer_state_dict(plain, fresh, flat, options=options)
    assert fresh.width_infos(fresh.param_groups[0]) == [mupopt.width_info(p) for p in model.parameters()]
    run(plain, fresh, optimizer, range(5, dw.STEPS))
    assert_close({n: p.detach() for n, p in plain.named_parameters()}, uninterrupted(optimizer), TOLERANCE[optimizer],
                 optimizer)


# ---------------------------------------------------------------------------------------------
# Records that do not fit
# ---------------------------------------------------------------------------------------------
def stepped(name="adamw"):
    model = dw.make_model()
    opt = dw.make_optimizer(name, model.named_parameters(), "auto")
    run(model, opt, name, range(2))
    return model, opt


def assert_refused(opt, sd, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(mupopt.MupError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        assert all(same_state_value(v, after["state"][k][key]) for key, v in st.items()), k


def test_a_record_of_another_shape_is_refused_naming_the_parameter():
    model, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    names = sd["param_groups"][0]["param_names"]
    fc1, fc2 = names.index("fc1.weight"), names.index("fc2.weight")
    sd["state"][fc1]["mup"], sd["state"][fc2]["mup"] = sd["state"][fc2]["mup"], sd["state"][fc1]["mup"]
    assert_refused(opt, sd, r"parameter 'fc1.weight' was saved for a parameter of shape \(16, 32\), but it has shape \(32, 16\)")


def test_a_record_of_another_name_is_refused_naming_the_parameter():
    """norm.weight and norm.bias have the same shape: their names tell the records apart."""
    model, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    names = sd["param_groups"][0]["param_names"]
    w, b = names.index("norm.weight"), names.index("norm.bias")
    sd["state"][w]["mup"], sd["state"][b]["mup"] = sd["state"][b]["mup"], sd["state"][w]["mup"]
    assert_refused(opt, sd, r"parameter 'norm.weight' was saved for a parameter of another name")


def test_a_malformed_record_is_refused():
    model, opt = stepped()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["mup"]["role"] = 9
    assert_refused(opt, sd, r"parameter 'emb.weight' has an unknown role code 9")


def test_dcp_records_of_other_parameters_are_refused():
    """The same check on DCP's path (get_state_dict / set_state_dict, keyed by name)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = stepped()
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    osd["state"]["out.weight"]["mup"] = osd["state"]["fc1.weight"]["mup"]
    with pytest.raises(mupopt.MupError, match=r"'out.weight' was saved for a parameter of shape \(32, 16\)"):
        set_optimizer_state_dict(model, opt, osd)


def test_a_group_list_put_in_by_a_framework_is_refused():
    """A group["mup"] list (the first format) that reached the groups without mupopt's
    load_state_dict (ZeRO copies group keys as they are) cannot be matched to parameters."""
    model, opt = stepped()
    opt.param_groups[0]["mup"] = [None] * len(opt.param_groups[0]["params"])
    dw.feed_grads(model, 3)
    with pytest.raises(mupopt.MupError, match="ZeroRedundancyOptimizer copies one rank's list"):
        opt.step()


def test_a_muon_state_dict_loads_through_zero():
    """Muon saves ns_dtype by name (torch's full_state_dict gathering refuses a torch.dtype);
    ZeroRedundancyOptimizer copies a state_dict's group values into its optimizer as they are,
    bypassing Muon's load_state_dict, so a group can hold the name: it steps as with the dtype
    (it raised "Invalid ns_dtype: float32")."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    ref = dw.make_model()
    ref_opt = dw.make_optimizer("muon", ref.parameters(), "auto")
    dw.fed_steps(ref, ref_opt, "muon", range(2))
    sd = copy.deepcopy(ref_opt.state_dict())
    assert sd["param_groups"][0]["ns_dtype"] == "float32"
    with dw.one_rank_mesh():
        model = dw.make_model(seed=1)
        model.load_state_dict(ref.state_dict())
        cls, kwargs = dw.optimizer_args("muon", "auto")
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
        opt.load_state_dict(sd)
        for t in range(2, 4):
            dw.feed_grads(model, t)
            opt.step()
    dw.fed_steps(ref, ref_opt, "muon", range(2, 4))
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_state_dict_of_the_first_format_loads(optimizer):
    """mupopt's first format: the records as a list per param group (WidthInfo.as_dict(), by
    position), none in the states. It loads into an optimizer without width information and
    continues as the uninterrupted run; one parameter saved before its first step included."""
    model = dw.make_model()
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto")
    run(model, opt, optimizer, range(5))
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        del st["mup"]
    del sd["state"][8]  # out.bias, as if never stepped
    sd["param_groups"][0]["mup"] = [mupopt.width_info(p).as_dict() for p in model.parameters()]
    plain = dw.make_model(seed=1, mup=False)
    fresh = dw.make_optimizer(optimizer, plain.parameters(), "auto")
    fresh.load_state_dict(save_load(sd))
    assert fresh.width_infos(fresh.param_groups[0]) == [mupopt.width_info(p) for p in model.parameters()]
    assert "mup" not in fresh.param_groups[0]
    assert "mup" not in fresh.state_dict()["param_groups"][0]


def test_an_optimizer_saved_before_its_first_step_keeps_its_records_and_loads_into_torch():
    """Before a parameter's first step its record is saved with its initial state (zeros, step
    0): mupopt resumes it without base shapes, and torch.optim.AdamW loads it and steps exactly
    as from a fresh start."""
    model = dw.make_model()
    sd = save_load(mupopt.AdamW(model.parameters(), lr=1e-2).state_dict())
    assert len(sd["state"]) == len(list(model.parameters()))
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    blind = mupopt.AdamW(plain, lr=1e-2)
    blind.load_state_dict(sd)
    assert blind.width_infos(blind.param_groups[0]) == [mupopt.width_info(p) for p in model.parameters()]
    a = [p.detach().clone().requires_grad_() for p in model.parameters()]
    b = [p.detach().clone().requires_grad_() for p in model.parameters()]
    loaded, fresh = torch.optim.AdamW(a, lr=1e-2), torch.optim.AdamW(b, lr=1e-2)
    loaded.load_state_dict(sd)
    for t in range(3):
        for x, y in zip(a, b):
            x.grad = y.grad = dw.grad_for(t, "p", x.shape)
        loaded.step(), fresh.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_records_of_a_torch_state_dict_are_this_optimizers():
    """A torch.optim.AdamW state_dict has no records: the states keep this optimizer's, and its
    state_dict then carries them."""
    model = dw.make_model()
    ref = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in model.parameters()], lr=1e-2)
    for p in ref.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ref.step()
    opt = mupopt.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(save_load(ref.state_dict()))
    want = [width_record(mupopt.width_info(p), p.shape, n) for n, p in model.named_parameters()]
    assert [opt.state[p]["mup"] for p in model.parameters()] == want
    assert [st["mup"] for st in opt.state_dict()["state"].values()] == want


def test_width_record_round_trips_every_role():
    for info in (WidthInfo("input", 1.0, 4.0, 0), WidthInfo("hidden", 4.0, 4.0), WidthInfo("output", 4.0, 1.0),
                 WidthInfo("vector", 1.0, 4.0), None):
        record = width_record(info, (8, 4), "blocks.0._checkpoint_wrapped_module.fc.weight")
        assert mupopt.mup.read_record(record, (8, 4), "module.blocks.0.fc.weight", "x") == info


def test_a_dcp_checkpoint_without_records_loads_as_a_partial_load(tmp_path):
    """DCP loads the entries the fresh optimizer's state has, records included: a checkpoint of
    torch.optim.AdamW has none, so dcp.load refuses it unless the load is partial; then the
    moments load and the optimizer keeps its own records."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = dw.make_model(mup=False)
    ref = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dw.feed_grads(model, 0)
    ref.step()
    msd, osd = get_state_dict(model, ref)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    ours_model = dw.make_model(seed=1)
    ours = mupopt.AdamW(ours_model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(ours_model, ours)
    with pytest.raises(CheckpointException):
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
    msd, osd = get_state_dict(ours_model, ours)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(ours_model, ours, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for p, q in zip(ours_model.parameters(), model.parameters()):
        assert torch.equal(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert ours.state[p]["step"].item() == 1
    assert ours.width_infos(ours.param_groups[0]) == [mupopt.width_info(p) for p in dw.make_model().parameters()]
