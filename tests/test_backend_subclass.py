"""Every registered backend refuses a tensor subclass (DTensor) with a reason, so that no kernel
reads data_ptr() of a wrapper (0 for a DTensor): issue 12 item 6."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor

import mupopt
from mupopt import backends


@pytest.fixture(scope="module")
def dtensor():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    yield distribute_tensor(torch.randn(4, 4), mesh, [Replicate()])
    if created:
        dist.destroy_process_group()


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
