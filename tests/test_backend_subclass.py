"""Every registered backend refuses a tensor subclass (DTensor) with a reason, so that no kernel
reads data_ptr() of a wrapper (0 for a DTensor): issue 12 item 6."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import Replicate, distribute_tensor

import mupopt
from dist_worker import one_rank_mesh
from mupopt import backends


@pytest.fixture(scope="module")
def dtensor():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with one_rank_mesh() as mesh:
        yield distribute_tensor(torch.randn(4, 4), mesh, [Replicate()])


def all_backends():
    return [(opt, name) for opt in sorted(backends._REGISTRY) for name in backends.names(opt)]


@pytest.mark.parametrize("optimizer,name", all_backends())
def test_every_backend_refuses_a_dtensor(dtensor, optimizer, name):
    backend = backends._REGISTRY[optimizer][name]
    reason = backend.reason([torch.randn(4, 4), dtensor])
    assert reason is not None and "DTensor" in reason and "tensor 1" in reason
    assert backend.reason([torch.randn(4, 4)]) is None or "subclass" not in backend.reason([torch.randn(4, 4)])


def test_explicit_backend_raises_and_auto_finds_none(dtensor):
    with pytest.raises(RuntimeError, match="subclass"):
        backends.select("adamw", "reference", [dtensor])
    with pytest.raises(RuntimeError, match="no backend"):
        backends.select("adamw", "auto", [dtensor])
