"""On a GPU (marked ``gpu``; benchmarks/gpu_check.sh's test stage): a world-size-1 NCCL process
group, the model sharded by FSDP2 on CUDA, every optimizer with the default backend (cuda or
triton) against the same optimizer on plain CUDA tensors (issue 12 item 8). One rank, so the
placement layer, the local-shard views and the collectives' calls are exercised with NCCL;
tests/test_distributed.py covers 2 ranks on the CPU."""
from __future__ import annotations


import pytest
import torch

import dist_worker as dw

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_nccl_available()),
                       reason="needs NCCL"),
]


@pytest.fixture(scope="module")
def nccl():
    torch.cuda.set_device(0)
    with dw.one_rank_mesh("cuda", "nccl") as mesh:
        yield mesh


def run(optimizer: str, mesh=None):
    model = dw.make_model().cuda()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto")
    for t in range(dw.STEPS):
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, p in model.named_parameters():
            g = dw.grad_for(t, name, p.shape).cuda()
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        dw.step_once(opt, optimizer, t)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu() for n, p in model.named_parameters()}
    return params, opt.selected_backends


@pytest.mark.parametrize("optimizer", ["adamw", "adopt", "lamb", "sophia", "muon", "shampoo"])
def test_fsdp2_on_cuda_equals_plain_cuda(nccl, optimizer):
    sharded, used = run(optimizer, nccl)
    plain, used_plain = run(optimizer)
    assert used == used_plain and "reference" not in str(used)
    for name, want in plain.items():
        torch.testing.assert_close(sharded[name], want, rtol=1e-6, atol=1e-7, msg=f"{optimizer}: {name}")
