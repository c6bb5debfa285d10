"""The placement layer on one process: where shards lie (against DTensor itself), width info
that survives Parameter replacement (what FSDP2 and tensor parallelism do), and the
per-segment collectives chosen only for sharded tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dist_worker as dw
import mupopt
from mupopt.mup import MupError
from mupopt.optim import _placement as pl

PLACEMENT_CASES = [
    # (global shape, placements, mesh shape): Shard as torch.chunk (uneven, empty tails), nested
    # cuts of one dim, replicated dims, and _StridedShard (FSDP2 over a TP-split dim) in the
    # forms FSDP2 + TP produce, even and uneven.
    ((12, 5), ["S0"], (2,)),
    ((13, 3), ["S1"], (4,)),
    ((3, 4), ["S0"], (4,)),
    ((8, 4), ["S0", "S0"], (2, 2)),
    ((8, 4), ["R", "S1"], (2, 2)),
    ((7, 6), ["S1", "S0"], (2, 3)),
    ((32, 16), ["SS0/2", "S0"], (2, 2)),
    ((16, 32), ["SS1/2", "S1"], (2, 2)),
    ((30, 5), ["SS0/3", "S0"], (2, 3)),
    ((10, 6), ["SS0/2", "S0"], (2, 2)),
    ((12, 6, 4), ["S2", "SS0/2", "S0"], (2, 2, 2)),
]


@pytest.mark.parametrize("shape,spec,mesh_shape", PLACEMENT_CASES, ids=[f"{s}-{'.'.join(p)}" for s, p, _ in PLACEMENT_CASES])
def test_shard_block_agrees_with_torch(shape, spec, mesh_shape):
    """Every mesh coordinate's block has the shape and first offset that torch's own
    compute_local_shape_and_global_offset gives (the function DCP places checkpoint shards
    with), and the blocks of the distinct shards tile the tensor exactly once."""
    import itertools

    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    placements = dw.placements_of(spec)
    seen = torch.zeros(shape, dtype=torch.long)
    split = [m for m, p in enumerate(placements) if not isinstance(p, pl.Replicate)]
    distinct = set()
    for coord in itertools.product(*map(range, mesh_shape)):
        block = pl.shard_block(shape, placements, mesh_shape, coord)
        want_shape, want_offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coord), placements)
        assert block.shape == tuple(want_shape), coord
        if block.numel:
            assert tuple(int(ix[0]) for ix in block.indices) == tuple(want_offset), coord
        where = tuple(coord[m] for m in split)
        if where not in distinct:
            distinct.add(where)
            block.write(seen, block.read(seen) + 1)
    assert bool((seen == 1).all())


def test_strided_shard_is_fsdp_over_tensor_parallel():
    """_StridedShard(0, sf=T) on "dp" with Shard(0) on "tp" holds what FSDP2 gets by cutting
    the tensor-parallel shard: chunk dp of chunk tp (the right-to-left order of FSDP2 + TP)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    rows = torch.arange(24)
    for dp, tp in [(2, 2), (2, 3), (3, 2)]:
        placements = [_StridedShard(0, split_factor=tp), pl.Shard(0)]
        for i in range(dp):
            for j in range(tp):
                block = pl.shard_block((24, 2), placements, (dp, tp), (i, j))
                assert torch.equal(block.indices[0], rows.chunk(tp)[j].chunk(dp)[i]), (dp, tp, i, j)
                assert block.is_box  # each rank's rows are one run here: gathers move views


def test_non_box_block_reads_and_writes_through_indices():
    """A _StridedShard alone (no later cut) holds interleaved runs: not a box, still exact."""
    from torch.distributed.tensor.placement_types import _StridedShard

    block = pl.shard_block((8, 3), [_StridedShard(0, split_factor=2)], (2,), (0,))
    assert not block.is_box and block.indices[0].tolist() == [0, 1, 4, 5]
    whole = torch.arange(24.0).view(8, 3)
    assert torch.equal(block.read(whole), whole[[0, 1, 4, 5]])
    out = torch.zeros(8, 3)
    block.write(out, block.read(whole).reshape(-1))
    assert torch.equal(out[[0, 1, 4, 5]], whole[[0, 1, 4, 5]]) and out[[2, 3, 6, 7]].abs().sum() == 0


def test_width_info_survives_parameter_replacement():
    """set_base_shapes, then the Parameter objects are replaced (fully_shard and
    parallelize_module do this), then the optimizer: it finds the width info by module and
    name, so the run is muP, not SP."""
    model, base = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 4)), nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    mupopt.set_base_shapes(model, base)
    want = [mupopt.width_info(p) for p in model.parameters()]
    for module in model:
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().clone()))
    assert all(mupopt.width_info(p) is None for p in model.parameters())
    opt = mupopt.AdamW(model.parameters(), lr=1e-3)
    assert [mupopt.width_info(p) for p in model.parameters()] == want
    assert [m.lr for m in opt.group_multipliers(opt.param_groups[0])] == [1.0, 1.0, 0.5, 1.0]  # input, bias, output, bias


def test_replaced_parameter_of_another_shape_raises():
    model, base = nn.Sequential(nn.Linear(8, 32)), nn.Sequential(nn.Linear(8, 16))
    mupopt.set_base_shapes(model, base)
    model[0].weight = nn.Parameter(torch.zeros(32, 9))
    with pytest.raises(MupError, match=r"'0.weight' now has shape \(32, 9\).*set_base_shapes again"):
        mupopt.AdamW(model.parameters())


def test_clear_base_shapes_forgets_the_records():
    model, base = nn.Sequential(nn.Linear(8, 32)), nn.Sequential(nn.Linear(8, 16))
    mupopt.set_base_shapes(model, base)
    mupopt.clear_base_shapes(model)
    model[0].weight = nn.Parameter(model[0].weight.detach().clone())
    opt = mupopt.AdamW(model.parameters())
    assert opt.width_infos(opt.param_groups[0]) == [None, None]


@pytest.fixture(scope="module")
def one_rank():
    from dist_worker import one_rank_mesh

    with one_rank_mesh() as mesh:
        yield mesh


def test_collectives_only_for_sharded_tensors(one_rank):
    """A plain or replicated tensor needs no collective: LAMB gets no norm_reduce and Muon no
    orthogonalize for them; a sharded one gets exactly one of each per segment."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    plain = nn.Parameter(torch.randn(4, 4))
    replicated = nn.Parameter(distribute_tensor(torch.randn(4, 4), one_rank, [Replicate()]))
    sharded = nn.Parameter(distribute_tensor(torch.randn(4, 4), one_rank, [Shard(0)]))
    assert not pl.NormReduce([plain, replicated])
    assert pl.NormReduce([plain, sharded])
    assert not pl.Orthogonalize([plain, replicated]).distributed
    assert pl.Orthogonalize([plain, sharded]).distributed
    for p in (plain, replicated, sharded):
        p.grad = torch.ones_like(p)
    opt = mupopt.LAMB([plain, replicated, sharded], lr=1e-2)
    opt.step()
    (plan,) = opt._plan_cache.values()
    assert [list(s.collectives) for s in plan.segments] == [["norm_reduce"]]
    assert plan.segments[0].collectives["norm_reduce"].calls == 1


def test_dtensor_step_equals_plain_step(one_rank):
    """One rank: stepping through local shards equals stepping the plain tensors, bitwise, for
    every elementwise optimizer (the placement layer adds nothing to the math)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for cls, kw in [(mupopt.AdamW, {}), (mupopt.ADOPT, {}), (mupopt.LAMB, {}), (mupopt.SophiaG, {}),
                    (mupopt.Muon, {"ns_dtype": torch.float32}), (mupopt.Shampoo, {})]:
        gen = torch.Generator().manual_seed(0)
        values = [torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)]
        plain = [nn.Parameter(v.clone()) for v in values]
        dt = [nn.Parameter(distribute_tensor(v.clone(), one_rank, [Shard(0)])) for v in values]
        opts = cls(plain, lr=1e-2, **kw), cls(dt, lr=1e-2, **kw)
        for t in range(3):
            g = [torch.randn(v.shape, generator=gen) for v in values]
            for p, q, x in zip(plain, dt, g):
                p.grad = x.clone()
                q.grad = distribute_tensor(x.clone(), one_rank, [Shard(0)])
            for o in opts:
                o.step(bs=8) if cls is mupopt.SophiaG else o.step()
        for p, q in zip(plain, dt):
            assert torch.equal(p.detach(), q.full_tensor().detach()), cls.__name__


def test_a_parameter_without_width_info_is_named_in_the_error():
    """A parameter added to a model after set_base_shapes (no width info) among ones that have
    it: the error names it by its place in the model, also when the optimizer got plain
    parameters (issue 14 item 2)."""
    model, base = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 4)), nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    mupopt.set_base_shapes(model, base)
    model.add_module("extra", nn.Linear(4, 4))
    with pytest.raises(MupError, match=r"parameter 'extra.weight' has no muP width information"):
        mupopt.AdamW(model.parameters())


def test_a_placement_the_layer_does_not_step_is_refused(one_rank):
    """A Partial parameter (a pending sum) cannot be stepped shard by shard: every optimizer's
    first step raises, naming the optimizer, the placement and the shape, and writes nothing."""
    from torch.distributed.tensor import DTensor, Partial

    for cls in (mupopt.AdamW, mupopt.LAMB, mupopt.Muon, mupopt.Shampoo):
        p = nn.Parameter(DTensor.from_local(torch.ones(4, 6), one_rank, [Partial()]))
        p.grad = DTensor.from_local(torch.ones(4, 6), one_rank, [Partial()])
        opt = cls([p], lr=1e-2)
        with pytest.raises(NotImplementedError, match=rf"{cls.__name__}: a parameter of shape \(4, 6\) has placement Partial\(sum\)"):
            opt.step()
        assert torch.equal(p.to_local(), torch.ones(4, 6)) and not opt.state


def test_a_partial_mesh_without_flatten_is_refused_naming_it(one_rank):
    """An N-D mesh over part of the world needs one process group over its ranks
    (DeviceMesh._flatten, with dim names): without them the exchange refuses, naming why."""
    from types import SimpleNamespace

    mesh = SimpleNamespace(size=lambda: 2, ndim=2, shape=(1, 2), mesh_dim_names=None)  # world: 1 rank
    with pytest.raises(NotImplementedError, match=r"Muon: parameters on a 2-D mesh of shape \(1, 2\) over part of the world"):
        pl.mesh_group(mesh, "Muon")


def test_shampoo_checkpoint_form_and_its_refusals(one_rank):
    """Shampoo's state_dict gives each block whole, by block number: a DTensor (n, n) with its
    rows sharded for a sharded matrix, the tensor itself for a plain one; both load back (the
    list form too). Per-shard blocks of earlier releases, and a state whose blocks are not
    where the owners are, are refused naming the block, nothing changed."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    gen = torch.Generator().manual_seed(0)
    value = torch.randn(12, 8, generator=gen)
    sharded = nn.Parameter(distribute_tensor(value.clone(), one_rank, [Shard(0)]))
    plain = nn.Parameter(value.clone())
    opt = mupopt.Shampoo([sharded, plain], lr=1e-2, max_preconditioner_dim=5)  # blocks: rows 5, 5, 2 x cols 5, 3
    for _ in range(2):
        g = torch.randn(12, 8, generator=gen)
        sharded.grad, plain.grad = distribute_tensor(g.clone(), one_rank, [Shard(0)]), g.clone()
        opt.step()
    sd = opt.state_dict()
    left = sd["state"][0]["left"]
    assert list(left) == [str(k) for k in range(6)]
    assert all(isinstance(x, DTensor) and x.placements == (Shard(0),) for x in left.values())
    assert [tuple(x.shape) for x in left.values()] == [(5, 5)] * 4 + [(2, 2)] * 2
    assert all(isinstance(x, torch.Tensor) and not isinstance(x, DTensor) for x in sd["state"][1]["left"].values())
    twins = [nn.Parameter(distribute_tensor(value.clone(), one_rank, [Shard(0)])), nn.Parameter(value.clone())]
    other = mupopt.Shampoo(twins, lr=1e-2, max_preconditioner_dim=5)
    as_lists = {**sd, "state": {**sd["state"], 1: {**sd["state"][1], **{k: list(sd["state"][1][k].values())
                                                                       for k in ("left", "right", "left_root", "right_root")}}}}
    other.load_state_dict(as_lists)
    for p, q in zip([sharded, plain], twins):
        for key in ("left", "right", "left_root", "right_root"):
            assert all(torch.equal(x, y) for x, y in zip(opt.state[p][key], other.state[q][key])), key

    stacked = {**sd["state"][0], "left": {**left, "0": torch.zeros(1, 5, 5)}}  # a per-rank stack
    with pytest.raises(ValueError, match=r"state 'left' of block 0 of a parameter of shape \(12, 8\) is \(1, 5, 5\), "
                                         r"expected \(5, 5\) \(a checkpoint of per-shard blocks"):
        other.load_state_dict({**sd, "state": {**sd["state"], 0: stacked}})

    opt.state[sharded]["right"][3] = torch.empty(0)  # not where the owner keeps it
    before = sharded.to_local().clone()
    sharded.grad = distribute_tensor(torch.ones(12, 8), one_rank, [Shard(0)])
    plain.grad = torch.ones(12, 8)
    with pytest.raises(RuntimeError, match=r"state 'right' of block 3 of a parameter of shape \(12, 8\) is \(0,\) on "
                                           r"this rank, which owns the block"):
        opt.step()
    assert torch.equal(sharded.to_local(), before) and opt.state[sharded]["step"].item() == 2
