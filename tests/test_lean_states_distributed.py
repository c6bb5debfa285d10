"""state_bits with DTensor params on 2 CPU ranks (gloo; the workers of tests/dist_worker.py):
16-bit (bfloat16) states step FSDP2 and tensor-parallel shards as one process steps the whole
tensors, and resume through torch.distributed.checkpoint; 8-bit states refuse DTensor params with
a clear error (blocks per local shard are specified in mupopt.optim._lean_states, not built)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import dist_worker as dw

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

BF16 = {"state_bits": 16}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lean-dist")
    specs = [(f"steps-{pl}-{opt}", {"kind": "steps", "placement": pl, "optimizer": opt, "backend": "auto",
                                    "options": BF16})
             for pl in ("fsdp", "tp") for opt in ("adamw", "muon")]
    specs += [("dcp-fsdp-adamw", {"kind": "dcp", "placement": "fsdp", "optimizer": "adamw", "backend": "auto",
                                  "options": BF16, "path": str(tmp / "ckpt")}),
              ("refuse-8", {"kind": "steps", "placement": "fsdp", "optimizer": "adamw", "backend": "auto",
                            "options": {"state_bits": 8}})]
    out = tmp / "results.pt"
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    torch.multiprocessing.spawn(dw.worker, args=(2, dw.free_port(), specs, str(out), env), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


def single_process(optimizer: str) -> dict:
    model = dw.make_model()
    opt = dw.make_optimizer(optimizer, model.parameters(), "auto", **BF16)
    for t in range(dw.STEPS):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    st = opt.state[next(model.parameters())]
    assert any(v.dtype == torch.bfloat16 for v in st.values() if isinstance(v, torch.Tensor) and v.ndim)
    return {n: p.detach() for n, p in model.named_parameters()}


def _ok(results, key):
    r = results[key]
    if "failed" in r:
        pytest.fail(f"scenario {key} failed on rank 0:\n{r['failed']}")
    return r


@pytest.mark.parametrize("placement", ["fsdp", "tp"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bf16_states_on_shards_match_one_process(results, placement, optimizer):
    got = _ok(results, f"steps-{placement}-{optimizer}")["params"]
    want = single_process(optimizer)
    for name, w in want.items():
        if optimizer == "adamw":  # elementwise on local shards: bit for bit
            assert torch.equal(got[name], w), name
        else:  # Muon: Newton-Schulz of the gathered matrix, batched differently
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-6)


def test_bf16_states_resume_through_dcp(results):
    got = _ok(results, "dcp-fsdp-adamw")["params"]
    want = single_process("adamw")
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_8bit_states_refuse_dtensor_params(results):
    failed = results["refuse-8"].get("failed", "")
    assert "NotImplementedError" in failed and "state_bits=8 for distributed (DTensor) params" in failed
