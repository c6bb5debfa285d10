"""The placement layer on one process: where shards lie (against DTensor itself), width info
that survives Parameter replacement (what FSDP2 and tensor parallelism do), and the
per-segment collectives chosen only for sharded tensors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mupopt
from mupopt.mup import MupError
from mupopt.optim import _placement as pl


def test_shard_box_follows_torch_chunk():
    """Shard(d) splits as torch.chunk (DTensor's rule), uneven sizes and empty tails included."""
    for n, parts in [(12, 2), (13, 2), (5, 4), (3, 4), (0, 2)]:
        chunks = torch.arange(n).chunk(parts) if n else ()
        for k in range(parts):
            offset, size = pl._chunk(n, parts, k)
            want = chunks[k] if k < len(chunks) else torch.arange(0)
            assert size == len(want) and (size == 0 or offset == int(want[0])), (n, parts, k)


def test_shard_box_nested_and_replicated():
    Shard, Replicate = pl.Shard, pl.Replicate
    # Shard(0) on both mesh dims of a (2, 2) mesh cuts dim 0 twice; Replicate leaves a dim whole.
    assert pl.shard_box((8, 4), [Shard(0), Shard(0)], (2, 2), (1, 0)) == ([4, 0], [2, 4])
    assert pl.shard_box((8, 4), [Replicate(), Shard(1)], (2, 2), (1, 1)) == ([0, 2], [8, 2])


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
