"""2-D meshes (issue 19) on 4 CPU ranks (gloo), mesh (2, 2), against single-process runs:

- "fsdp+tp": tensor parallelism on "tp", then FSDP2 on "dp" (set_base_shapes before both, the
  README order). The dims TP split become _StridedShard under FSDP2; the parameters TP leaves
  whole live on the "dp" sub-mesh.
- "hsdp-2d": FSDP2 on a (replicate, shard) mesh: every shard held by two ranks.

The model has two MLP blocks, so Muon has four hidden matrices of one NS cost to spread over the
four ranks. One spawn of 4 ranks runs every scenario (tests/dist_worker.py); a second spawn of 2
ranks resumes the 4-rank checkpoints under FSDP2 alone, and the test process resumes them on one
process. Fed gradients, as tests/test_distributed.py: AdamW, ADOPT, SophiaG bitwise equal to one
process; LAMB, Muon and Shampoo (blocks of 12 that no shard boundary aligns with, grafted and
not, and the default blocks) within 1e-6 relative (Shampoo on triton: test_distributed.tolerance).
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

import dist_worker as dw
from test_distributed import SHAMPOO_OPTIONS, assert_close, cpu_backends, tolerance

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORLD = 4
BLOCKS = 2
OPTIMIZERS = ["adamw", "adopt", "sophia", "lamb", "muon", "shampoo"]
DCP_OPTIMIZERS = ["adamw", "lamb", "muon", "shampoo"]
# name -> (optimizer, extra spec): Shampoo also through DCP's flatten_optimizer_state_dict layout,
# on the reference backend (what is tested is the checkpoint; its single-process runs on triton
# take ~20 s each under the interpreter).
DCP = {**{opt: (opt, {}) for opt in DCP_OPTIMIZERS}, "shampoo": ("shampoo", {"backend": "reference"}),
       "shampoo-flat": ("shampoo", {"backend": "reference", "flatten": True})}

# Every CPU backend on FSDP2 + TP; the default one on HSDP.
STEP_SPECS = [
    (f"steps-fsdp+tp-{opt}-{be}", {"kind": "steps", "placement": "fsdp+tp", "optimizer": opt, "backend": be, "blocks": BLOCKS})
    for opt in OPTIMIZERS for be in cpu_backends(opt)
] + [
    (f"steps-hsdp-2d-{opt}-auto", {"kind": "steps", "placement": "hsdp-2d", "optimizer": opt, "backend": "auto", "blocks": BLOCKS})
    for opt in OPTIMIZERS
] + [
    (f"steps-{pl}-shampoo-{tag}", {"kind": "steps", "placement": pl, "optimizer": "shampoo", "backend": "reference",
                                   "blocks": BLOCKS, "options": options})
    for pl in ("fsdp+tp", "hsdp-2d") for tag, options in SHAMPOO_OPTIONS.items()
]

BACKEND = {"fsdp+tp": "reference", "hsdp-2d": "auto"}  # one of the runs above, for the counts

# (global shape, placements on the (2, 2) mesh, the rank DTensor scatters from): FSDP2 + TP's
# forms, uneven and empty shards, nested cuts of one dim, replicated dims. torch's scatter
# refuses uneven _StridedShard (a size FSDP2 pads): those DTensor cuts locally (src None).
GEOMETRY_CASES = [
    ((32, 16), ["SS0/2", "S0"], 0), ((16, 32), ["S0", "S1"], 0), ((10, 6), ["SS0/2", "S0"], None),
    ((9, 5), ["SS1/2", "S1"], None), ((13, 7), ["S0", "S1"], 0), ((3, 10), ["S0", "S0"], 0), ((12, 8), ["R", "S0"], 0),
    ((8, 12), ["S1", "R"], 0),
]
# Muon's exchange alone: (shape, placements, mesh): the (2, 2) mesh; its "dp" sub-mesh (1-D);
# the (2, 1) sub-mesh ("b", "c") of a (2, 2, 1) mesh, a 2-D mesh over half the ranks (its group
# is the mesh flattened).
ORTHO_CASES = [
    ((32, 16), ["SS0/2", "S0"], "2d"), ((16, 32), ["S0", "S1"], "2d"), ((13, 7), ["S0", "S1"], "2d"),
    ((3, 10), ["S0", "S0"], "2d"), ((12, 8), ["R", "S0"], "2d"), ((10, 6), ["SS0/2", "S0"], "2d"),
    ((8, 12), ["S1", "R"], "2d"), ((12, 8), ["SS0/2"], "dp"), ((16, 8), ["S0"], "dp"),
    ((12, 8), ["S0", "S1"], "b,c"), ((6, 6), ["R", "R"], "2d"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every 4-rank scenario in one spawn; then the 2-rank resumes of its checkpoints."""
    tmp = tmp_path_factory.mktemp("dist2d")
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    dcp = {name: {"optimizer": opt, "backend": "auto", "blocks": BLOCKS, "path": str(tmp / f"ckpt-{name}"),
                  "placement": "fsdp+tp", "resume_placement": "fsdp", **extra} for name, (opt, extra) in DCP.items()}
    specs = STEP_SPECS + [(f"dcp-save-{opt}", {"kind": "dcp_save", **spec}) for opt, spec in dcp.items()] + [
        ("geometry", {"kind": "geometry", "cases": GEOMETRY_CASES}),
        ("orthogonalize", {"kind": "orthogonalize", "cases": ORTHO_CASES}),
        ("exchange-blocks", {"kind": "exchange_blocks", "cases": ORTHO_CASES, "side": 5}),
        ("refuse", {"kind": "refuse", "placements": ["S0", "P"]}),
        ("shampoo-failure", {"kind": "shampoo_failure", "placement": "fsdp+tp", "backend": "reference", "blocks": BLOCKS,
                             "fail_rank": 1}),
    ]
    out = tmp / "results.pt"
    res = dw.spawn(WORLD, specs, out, env)
    # A checkpoint that failed to save fails its test (get) instead of the resuming ranks.
    resumes = [(f"dcp-resume-{opt}", {"kind": "dcp_resume", **spec}) for opt, spec in dcp.items()
               if "failed" not in res[f"dcp-save-{opt}"]]
    out2 = tmp / "resumed.pt"
    res.update(dw.spawn(2, resumes, out2, env))
    res["_dcp"] = dcp
    return res


def get(results, key):
    r = results[key]
    if "failed" in r:
        pytest.fail(f"scenario {key} failed on rank 0:\n{r['failed']}")
    return r


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def single_process(optimizer: str, backend: str, steps: int = dw.STEPS, options=None):
    """The single-process run (model, optimizer), once per arguments (as test_distributed's)."""
    return _single_process(optimizer, backend, steps, tuple(sorted((options or {}).items())))


@functools.lru_cache(maxsize=None)
def _single_process(optimizer: str, backend: str, steps: int, options: tuple):
    model = dw.make_model(blocks=BLOCKS)
    opt = dw.make_optimizer(optimizer, model.parameters(), backend, **dict(options))
    for t in range(steps):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    return model, opt


@pytest.mark.parametrize("key,spec", STEP_SPECS, ids=[k for k, _ in STEP_SPECS])
def test_2d_steps_equal_single_process(results, key, spec):
    got = get(results, key)
    model, opt = single_process(spec["optimizer"], spec["backend"], options=spec.get("options"))
    assert got["mults"] == [str(m) for g in opt.param_groups for m in opt.group_multipliers(g)], "muP multipliers"
    assert_close(got["params"], {n: p.detach() for n, p in model.named_parameters()},
                 tolerance(spec["optimizer"], spec["backend"]), key)


@pytest.mark.parametrize("placement,groups", [("fsdp+tp", 2), ("hsdp-2d", 1)])
def test_lamb_one_all_reduce_per_process_group_per_step(results, placement, groups):
    """HSDP: one all-reduce per step for every tensor (both replicas in it, one counted).
    FSDP2 + TP: one over the 4 ranks for the tensors TP split and one over the "dp" pair for
    those TP left whole (they live on the "dp" sub-mesh, whose other copies belong to
    another mesh: a world-wide sum would count them twice)."""
    assert get(results, f"steps-{placement}-lamb-{BACKEND[placement]}")["norm_calls"] == groups * dw.STEPS


@pytest.mark.parametrize("placement", ["fsdp+tp", "hsdp-2d"])
def test_muon_newton_schulz_spread_over_all_four_ranks(results, placement):
    """Four hidden matrices of one NS cost: each rank, replicas included, orthogonalises one,
    a quarter of the flops; one all-to-all each way per step."""
    from mupopt.optim._placement import matrix_shape, ns_flops

    got = get(results, f"steps-{placement}-muon-{BACKEND[placement]}")
    model, opt = single_process("muon", "auto", steps=1)
    total = sum(ns_flops(*matrix_shape(tuple(p.shape)), 5)
                for g in opt.param_groups for i, p in enumerate(g["params"]) if opt._uses_muon(g, i))
    assert got["ns_flops"] == [pytest.approx(total / WORLD)] * WORLD
    assert got["ns_calls"] == 2


def test_shard_geometry_is_dtensors_on_every_rank(results):
    """DTensor's own distribution of an index tensor puts on each of the four ranks exactly
    the elements of the placement layer's block."""
    agree = get(results, "geometry")["agree"]
    assert agree == [[True] * len(GEOMETRY_CASES)] * WORLD


def test_muon_exchange_on_every_placement(results):
    """The exchange alone: strided, uneven, empty, replicated and sub-mesh shards come back as
    Newton-Schulz of the whole matrix on every rank; one exchange per process group (the 2-D
    mesh's, the "dp" pair's, the flattened ("b", "c") pair's), each two all-to-alls. The 2-D
    mesh's matrices are orthogonalised once over the four ranks; a sub-mesh's matrices once by
    each copy of the sub-mesh (its group knows no other); a replicated matrix where it is."""
    from mupopt.linalg import newton_schulz
    from mupopt.optim._placement import ns_flops

    got = get(results, "orthogonalize")
    for k, (shape, _, _) in enumerate(ORTHO_CASES):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(k))
        want = newton_schulz(full.unsqueeze(0), 5, dtype=torch.float32, check_finite=False)[0]
        torch.testing.assert_close(got["whole"][k], want, rtol=1e-6, atol=1e-6 * want.abs().max().item(), msg=str(shape))
    assert got["calls"] == [6] * WORLD
    copies = {"2d": 1, "dp": 2, "b,c": 2}
    total = sum(ns_flops(*shape, 5) * (WORLD if names == ["R", "R"] else copies[mesh]) for shape, names, mesh in ORTHO_CASES)
    assert sum(got["flops"]) == pytest.approx(total)
    assert max(got["flops"]) < 0.5 * total


def test_exchange_of_blocks_on_every_placement(results):
    """Shampoo's regions (blocks of side 5, so every shard is cut by some block) through the
    exchange alone, on the shards of the Muon cases (strided, uneven, empty, replicated,
    sub-mesh): every owner assembles its blocks exactly, with the norm of each block from the
    pieces' norms, and every rank, every copy included, gets exactly its pieces back."""
    assert get(results, "exchange-blocks")["ok"] == [[True] * len(ORTHO_CASES)] * WORLD


@pytest.mark.parametrize("name", list(DCP))
def test_dcp_saved_at_four_ranks_resumes_at_two(results, name):
    """Saved under FSDP2 + TP on 4 ranks after 5 steps, resumed under FSDP2 on 2 ranks into a
    fresh model and optimizer: the run continues as the uninterrupted single-process run
    (Shampoo: its blocks' statistics go to other owners; also in the flattened layout)."""
    optimizer = DCP[name][0]
    get(results, f"dcp-save-{name}")
    got = get(results, f"dcp-resume-{name}")["params"]
    backend = results["_dcp"][name]["backend"]
    model, _ = single_process(optimizer, backend)
    assert_close(got, {n: p.detach() for n, p in model.named_parameters()}, tolerance(optimizer, backend), name)


@pytest.mark.parametrize("name", list(DCP))
def test_dcp_saved_at_four_ranks_resumes_on_one_process(results, name):
    """The same checkpoints (FSDP2 + TP, 4 ranks) resumed here, in one process, into a fresh
    model and optimizer: the run continues as the uninterrupted single-process run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = DCP[name][0]
    get(results, f"dcp-save-{name}")
    spec = results["_dcp"][name]
    model = dw.make_model(seed=1, blocks=BLOCKS)
    opt = dw.make_optimizer(optimizer, model.parameters(), spec["backend"])
    msd, osd = get_state_dict(model, opt, options=dw.state_dict_options(spec))
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=spec["path"])
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=dw.state_dict_options(spec))
    for t in range(5, dw.STEPS):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    want, _ = single_process(optimizer, spec["backend"])
    assert_close({n: p.detach() for n, p in model.named_parameters()},
                 {n: p.detach() for n, p in want.named_parameters()}, tolerance(optimizer, spec["backend"]), name)


@pytest.mark.parametrize("placement", ["fsdp+tp", "hsdp-2d"])
def test_shampoo_roots_spread_over_all_four_ranks(results, placement):
    """Every block's roots are computed once per copy of its mesh, by the block's owner: the
    matrices on the 2-D mesh once over the four ranks, those on the "dp" sub-mesh (FSDP2 + TP:
    what TP leaves whole) once by each of its two copies. Each rank's share of the cost is
    within one block's cost of the even split (largest first, to the least loaded), and every
    rank computes some. One exchange (two all-to-alls) per process group and step."""
    from mupopt.optim.shampoo import blocks_of, root_cost

    got = get(results, f"steps-{placement}-shampoo-{BACKEND[placement]}")
    model, opt = single_process("shampoo", "reference", steps=1)
    on_dp = {"emb.weight", "out.weight"} if placement == "fsdp+tp" else set()
    cost = {"2d": [], "dp": []}
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            for rs, cs in blocks_of(p.shape[0], p.numel() // p.shape[0], 12):
                cost["dp" if name in on_dp else "2d"].append(root_cost(rs.stop - rs.start, cs.stop - cs.start))
    assert sum(got["roots"]) == 2 * (len(cost["2d"]) + 2 * len(cost["dp"]))
    assert sum(got["root_cost"]) == pytest.approx(sum(cost["2d"]) + 2 * sum(cost["dp"]))
    even = sum(cost["2d"]) / 4 + sum(cost["dp"]) / 2
    assert max(got["root_cost"]) <= even + max(cost["2d"]) + max(cost["dp"], default=0)
    assert min(got["roots"]) > 0
    assert got["root_calls"] == (4 if on_dp else 2)


def test_shampoo_failure_on_one_rank_leaves_every_rank_unchanged(results):
    """FSDP2 + TP, two param groups: an inverse root that fails on rank 1 only (in the first
    group: rank 1 still takes part in the second group's exchange), then a nan in rank 1's
    shard of fc1's gradient: every rank raises (rank 1 its own error, the others that another
    rank failed), no rank writes anything, no rank waits in an exchange; the same step then
    succeeds and the run is the single-process one."""
    got = get(results, "shampoo-failure")
    for rank, errors in enumerate(got["errors"]):
        if rank == 1:
            assert errors["root"].startswith("RootComputationError: injected"), errors
            assert errors["nan"].startswith("ValueError: Shampoo: non-finite gradient"), errors
        else:
            for case in ("root", "nan"):
                assert "the step failed on another rank" in errors[case], (rank, errors)
    assert got["untouched"] == [{"root": True, "nan": True}] * WORLD
    model, _ = single_process("shampoo", "reference", steps=3)
    assert_close(got["params"], {n: p.detach() for n, p in model.named_parameters()}, tolerance("shampoo", "reference"),
                 "after the failures")


def test_a_partial_parameter_is_refused_on_a_2d_mesh(results):
    """(Shard(0), Partial()) on the 2-D mesh: every optimizer's first step raises, naming the
    optimizer, the placement and the shape, before writing anything."""
    got = get(results, "refuse")
    for name, cls in [("adamw", "AdamW"), ("lamb", "LAMB"), ("muon", "Muon")]:
        error, untouched = got[name]
        assert error is not None and error.startswith("NotImplementedError"), (name, error)
        assert f"{cls}: a parameter of shape (16, 8) has placement Partial(sum) on mesh dim 1" in error, error
        assert untouched, name
