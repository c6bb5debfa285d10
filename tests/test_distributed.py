"""Distributed training (issue 12): FSDP2, tensor parallelism and DDP on 2 CPU ranks (gloo),
against single-process training of the same model on the same global gradients or batch.

The ranks run every scenario of this module in one process group (tests/dist_worker.py); the
test process computes the single-process runs and compares:

- "steps": gradients fed directly (the global gradient of each step, as a DTensor with the
  parameter's placements), so the comparison sees the optimizer alone. Elementwise optimizers on
  local shards are bitwise equal to single-process ones; LAMB (norms summed over ranks in
  another order) and Muon (NS of the gathered matrix, batched differently) within 1e-6 relative;
  Shampoo (blocks of the global tensor on owner ranks) within 1e-6 relative with blocks that do
  not align with the shards (12 on sides of 16 and 32), with and without grafting, and with the
  default blocks; its root work is split between the ranks.
- "train": forward/backward with muP set up in the README order (set_base_shapes, then the
  sharding, then the optimizer): the sharded run matches single-process muP training (not SP).
- "dcp": a torch.distributed.checkpoint round trip into a fresh, unstepped optimizer continues
  exactly, and the same checkpoint resumes on one process (2 ranks -> 1), Shampoo's too.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import pytest
import torch

import dist_worker as dw
import mupopt

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

HAVE_TRITON = importlib.util.find_spec("triton") is not None
OPTIMIZERS = ["adamw", "adopt", "lamb", "sophia", "muon", "shampoo"]


def cpu_backends(optimizer: str) -> list[str]:
    out = ["reference"]
    if optimizer in ("adamw", "adopt", "lamb", "sophia", "muon"):
        out.append("cpu" if optimizer != "muon" else "auto")  # Muon: its AdamW part on "cpu"
    if HAVE_TRITON:
        out.append("triton")
    return out


STEP_SPECS = [
    (f"steps-{pl}-{opt}-{be}", {"kind": "steps", "placement": pl, "optimizer": opt, "backend": be})
    for pl in ("fsdp", "tp") for opt in OPTIMIZERS for be in cpu_backends(opt)
]
TRAIN_SPECS = [
    (f"train-{pl}-{opt}", {"kind": "train", "placement": pl, "optimizer": opt, "backend": "auto"})
    for pl in ("fsdp", "tp", "ddp") for opt in ("adamw", "muon")
]
# HSDP on a (1, 2) mesh: a 2-D mesh at 2 ranks (the 4-rank meshes: tests/test_distributed_2d.py).
HSDP_SPECS = [("steps-hsdp-muon", {"kind": "steps", "placement": "hsdp", "optimizer": "muon", "backend": "auto"})]
# Shampoo beyond make_optimizer's (blocks of 12, grafted): ungrafted, and the default blocks
# (1024: one block per matrix, split by every shard).
SHAMPOO_OPTIONS = {"ungrafted": {"grafting": None}, "default-blocks": {"max_preconditioner_dim": 1024}}
SHAMPOO_SPECS = [
    (f"steps-{pl}-shampoo-{tag}", {"kind": "steps", "placement": pl, "optimizer": "shampoo", "backend": "reference",
                                   "options": options})
    for pl in ("fsdp", "tp") for tag, options in SHAMPOO_OPTIONS.items()
]
DCP_OPTIMIZERS = ["adamw", "adopt", "lamb", "sophia", "muon", "shampoo"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every scenario, run once on 2 ranks."""
    tmp = tmp_path_factory.mktemp("dist")
    specs = STEP_SPECS + TRAIN_SPECS + HSDP_SPECS + SHAMPOO_SPECS
    specs += [(f"dcp-{pl}-{opt}", {"kind": "dcp", "placement": pl, "optimizer": opt, "backend": "auto",
                                   "path": str(tmp / (f"ckpt-{opt}" if pl == "fsdp" else f"ckpt-{pl}-{opt}")),
                                   "full": pl == "fsdp"})
              for pl in ("fsdp", "tp") for opt in DCP_OPTIMIZERS]
    out = tmp / "results.pt"
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = dw.spawn(2, specs, out, env)
    res["_tmp"] = tmp
    return res


def get(results, key):
    r = results[key]
    if "failed" in r:
        pytest.fail(f"scenario {key} failed on rank 0:\n{r['failed']}")
    return r


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def single_process_steps(optimizer: str, backend: str, steps=dw.STEPS, mup=True, options=None):
    """The single-process run (model, optimizer), computed once per arguments in this module
    (several tests compare against the same run; Shampoo on triton takes ~20 s interpreted).
    Callers only read it."""
    return _single_process_steps(optimizer, backend, steps, mup, tuple(sorted((options or {}).items())))


@functools.lru_cache(maxsize=None)
def _single_process_steps(optimizer: str, backend: str, steps: int, mup: bool, options: tuple):
    model = dw.make_model(mup=mup)
    opt = dw.make_optimizer(optimizer, model.parameters(), backend, **dict(options))
    for t in range(steps):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    return model, opt


def assert_close(got: dict, want: dict, rtol: float, label: str):
    for name, w in want.items():
        g = got[name]
        if rtol == 0:
            assert torch.equal(g, w), f"{label}: {name} differs by {(g - w).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item(), msg=f"{label}: {name}")


TOLERANCE = {"adamw": 0.0, "adopt": 0.0, "sophia": 0.0, "lamb": 1e-6, "muon": 1e-6, "shampoo": 1e-6}


def tolerance(optimizer: str, backend: str) -> float:
    """Relative tolerance of a sharded run against one process with the same backend. Shampoo
    on "triton" ("auto" picks it under the interpreter these tests run in): a sharded matrix's
    block statistics, roots and products are the owners' (torch, as the reference's) where one
    process runs triton's kernels; the two differ by up to 3.2e-6 after 10 steps (measured, 2
    and 4 ranks; the roots amplify float32 rounding)."""
    if optimizer == "shampoo" and backend in ("triton", "auto") and HAVE_TRITON:
        return 1e-5
    return TOLERANCE[optimizer]


ALL_STEPS = STEP_SPECS + HSDP_SPECS + SHAMPOO_SPECS


@pytest.mark.parametrize("key,spec", ALL_STEPS, ids=[k for k, _ in ALL_STEPS])
def test_sharded_steps_equal_single_process(results, key, spec):
    got = get(results, key)
    model, opt = single_process_steps(spec["optimizer"], spec["backend"], options=spec.get("options"))
    want = {n: p.detach() for n, p in model.named_parameters()}
    assert got["mults"] == [str(m) for g in opt.param_groups for m in opt.group_multipliers(g)], "muP multipliers"
    assert_close(got["params"], want, tolerance(spec["optimizer"], spec["backend"]), key)


@pytest.mark.parametrize("placement", ["fsdp", "tp"])
def test_ungrafted_shampoo_lr_rule_counts_the_global_blocks(results, placement):
    """Blocks are the global tensor's, so the ungrafted rule counts the global block sides (as
    one process; test_sharded_steps_equal_single_process compares all multipliers), not the
    shard's: for at least two matrices the two differ, so this would see the shard's."""
    from mupopt.mup import shampoo_block_lr

    got = get(results, f"steps-{placement}-shampoo-ungrafted")
    model = dw.make_model()
    opt = dw.make_optimizer("shampoo", model.parameters(), "reference", grafting=None)
    differ = 0
    for (name, p), info, m in zip(model.named_parameters(), opt.width_infos(opt.param_groups[0]),
                                  opt.group_multipliers(opt.param_groups[0])):
        if p.ndim < 2:
            continue
        assert m.lr == pytest.approx(shampoo_block_lr(info, tuple(p.shape), 12)), name
        differ += shampoo_block_lr(info, got["local_shapes"][name], 12) != pytest.approx(m.lr)
    assert differ >= 2


def test_shampoo_roots_split_between_the_ranks(results):
    """FSDP2 shards every matrix: each block's roots are computed once, by its owner, and the
    two ranks share the cost (largest first to the less loaded: within one block's cost of
    half). The preconditioner memory of the two ranks adds up to one process's."""
    from mupopt.optim.shampoo import blocks_of, root_cost

    got = get(results, "steps-fsdp-shampoo-reference")
    model, opt = single_process_steps("shampoo", "reference", steps=1)
    blocks = [(rs.stop - rs.start, cs.stop - cs.start) for p in model.parameters() if p.ndim >= 2
              for rs, cs in blocks_of(p.shape[0], p.numel() // p.shape[0], 12)]
    total = sum(root_cost(r, c) for r, c in blocks)
    assert sum(got["roots"]) == 2 * len(blocks)  # L and R of every block, once
    assert sum(got["root_cost"]) == pytest.approx(total)
    assert max(got["root_cost"]) <= total / 2 + max(root_cost(r, c) for r, c in blocks)
    assert min(got["roots"]) > 0
    assert got["root_calls"] == 2  # one all-to-all each way (every matrix on the one mesh)
    memory = opt.preconditioner_memory()
    assert sum(m["preconditioners"] for m in got["memory"]) == memory["preconditioners"]
    assert sum(m["buffers"] for m in got["memory"]) == memory["buffers"]


@pytest.mark.parametrize("placement", ["fsdp", "tp"])
def test_lamb_reduces_norms_once_per_step(results, placement):
    got = get(results, f"steps-{placement}-lamb-reference")
    assert got["norm_calls"] == dw.STEPS  # one all-reduce per step for all sharded tensors


def test_muon_spreads_newton_schulz_over_ranks(results):
    """FSDP2 shards every Muon matrix: each rank orthogonalises about half of them (by flops)."""
    got = get(results, "steps-fsdp-muon-reference")
    model, opt = single_process_steps("muon", "reference", steps=1)
    total = sum(dw_flops(p) for g in opt.param_groups for i, p in enumerate(g["params"]) if opt._uses_muon(g, i))
    # The last step's flops of each rank: fc1 (32x16) and fc2 (16x32) cost the same: one each.
    assert got["ns_flops"] == [pytest.approx(total / 2)] * 2
    assert got["ns_calls"] == 2  # one all-to-all each way


def dw_flops(p):
    from mupopt.optim._placement import matrix_shape, ns_flops

    return ns_flops(*matrix_shape(tuple(p.shape)), 5)


@pytest.mark.parametrize("key,spec", TRAIN_SPECS, ids=[k for k, _ in TRAIN_SPECS])
def test_training_in_readme_order_keeps_mup(results, key, spec):
    """set_base_shapes before fully_shard / DDP: the run is the single-process muP run, and
    visibly not the SP one (so muP was not silently lost)."""
    got = get(results, key)["params"]
    want = single_process_train(spec["optimizer"], mup=True)
    sp = single_process_train(spec["optimizer"], mup=False)
    assert_close(got, want, 1e-5, key)
    assert max((got[n] - sp[n]).abs().max().item() for n in sp) > 1e-3


def single_process_train(optimizer: str, mup: bool):
    model = dw.make_model(mup=mup)
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto")
    for t in range(5):
        gen = torch.Generator().manual_seed(t)
        x = torch.randint(0, dw.VOCAB, (8, 6), generator=gen)
        y = torch.randint(0, dw.VOCAB, (8, 6), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, dw.VOCAB), y.reshape(-1))
        loss.backward()
        dw.step_once(opt, optimizer, t)
        opt.zero_grad()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("placement", ["fsdp", "tp"])
@pytest.mark.parametrize("optimizer", DCP_OPTIMIZERS)
def test_dcp_resume_at_the_same_world_size(results, optimizer, placement):
    got = get(results, f"dcp-{placement}-{optimizer}")["params"]
    model, _ = single_process_steps(optimizer, "auto")
    assert_close(got, {n: p.detach() for n, p in model.named_parameters()}, tolerance(optimizer, "auto"), optimizer)


@pytest.mark.parametrize("optimizer", DCP_OPTIMIZERS)
def test_dcp_resume_on_one_process(results, optimizer):
    """The FSDP2 checkpoint of 2 ranks (saved after 5 steps) resumes in a single process and
    continues as the uninterrupted single-process run (Shampoo's statistics too: saved as whole
    blocks, their rows sharded over the ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    get(results, f"dcp-fsdp-{optimizer}")
    path = results["_tmp"] / f"ckpt-{optimizer}"
    model = dw.make_model(seed=1)
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto")
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _continues_as_one_process(model, opt, optimizer)


def _continues_as_one_process(model, opt, optimizer) -> None:
    """Steps 5.. of a model and optimizer loaded from the FSDP2 run's step-5 checkpoint end where
    one process stepping all the steps does."""
    for t in range(5, dw.STEPS):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    want, _ = single_process_steps(optimizer, "auto")
    assert_close({n: p.detach() for n, p in model.named_parameters()},
                 {n: p.detach() for n, p in want.named_parameters()}, tolerance(optimizer, "auto"), optimizer)


@pytest.mark.parametrize("optimizer", DCP_OPTIMIZERS)
def test_full_state_dict_resumes_on_one_process(results, optimizer):
    """get_state_dict(full_state_dict=True, cpu_offload=True) of the FSDP2 run (after 5 steps),
    saved by rank 0 with torch.save, loads into one process with plain load_state_dict and
    continues as the uninterrupted run. torch's gathering accepts only tensors, numbers, strings
    and containers: Muon's ns_dtype (a torch.dtype in its groups) made it raise
    "Unexpected value type <class 'torch.dtype'>"; it is saved by name and loads as the dtype."""
    get(results, f"dcp-fsdp-{optimizer}")
    saved = torch.load(results["_tmp"] / f"ckpt-{optimizer}.full.pt", weights_only=True)
    if isinstance(saved, str):
        pytest.fail(f"get_state_dict(full_state_dict=True, cpu_offload=True) failed on rank 0:\n{saved}")
    model = dw.make_model(seed=1)
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    if optimizer == "muon":
        assert opt.param_groups[0]["ns_dtype"] is torch.float32
    _continues_as_one_process(model, opt, optimizer)


def test_readme_fsdp_example_runs_on_two_ranks(tmp_path):
    """examples/fsdp_mup.py (the README's Distributed section) under torchrun, 2 gloo ranks."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(root, "examples", "fsdp_mup.py"), str(tmp_path / "ckpt")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "backends: [{'adamw': 'cpu'}]" in out.stdout
    loss = float(out.stdout.split("loss ")[1].split(";")[0])
    assert 0 < loss < 10
