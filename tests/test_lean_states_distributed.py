"""state_bits with DTensor params on 2 and 4 CPU ranks (gloo; the workers of tests/dist_worker.py).

16-bit (bfloat16) states step FSDP2 and tensor-parallel shards as one process steps the whole
tensors, and resume through torch.distributed.checkpoint.

8-bit states (mupopt.optim._lean_states: blocks over each rank's local shard, checkpoints as
float32 values placed like the param), each of the six optimizers on FSDP2 and on TP, and on 4
ranks (a second spawn) on FSDP2 + TP, mesh (2, 2) (the cut checked: fc1's rows in strided
quarters, the embedding in halves each on one TP group):
- each rank's local states are, bit for bit, what one process makes stepping that local shard
  alone with the same gradient shard, for the entries whose math is per element (all of AdamW,
  ADOPT, SophiaG and LAMB; Muon's momentum and AdamW part; Shampoo's Adam second moment); the
  params too where the whole step is per element (AdamW, ADOPT, SophiaG);
- AdamW's params lie, like those of one process stepping whole tensors in format 8, inside the
  interval that format 8's error bound (lean.relative_error_bound) allows around the exact
  (float64, unquantized) trajectory; LAMB's, Muon's and Shampoo's differ from those of one
  process stepping whole tensors in format 8 by at most 3x that run's own distance from format
  32 (a tolerance, measured at up to 1.8x, on the (2, 2) mesh too);
- a DCP save and resume is bit-exact (every rank's loaded codes, scales and other states are the
  saved ones, the continued run's states and params the uninterrupted run's): AdamW on FSDP2
  and TP, Muon on FSDP2, Shampoo on TP; AdamW, LAMB, Muon and Shampoo on the (2, 2) mesh; AdamW
  and LAMB on FSDP2 also on the triton backend. A format-32 checkpoint loads into format 8 and a
  format-8 one into format 32 (the loaded states are the checkpoint's values, quantized per
  shard / exported), and a checkpoint of FSDP2 shards loads on tensor-parallel shards (other
  blocks: quantized anew per shard from the exported values).
Stochastic rounding of bf16 params on FSDP2: shards holding equal values and gradients round
apart (their random bits are independent), and a DCP resume is bit-exact.
Compensated bf16 params (kahan_summation): each compensation a DTensor placed as its param;
AdamW on TP, and on FSDP2 through a DCP save and resume, params and compensations bit for bit
those of one process stepping whole tensors; Muon (FSDP2) and Shampoo (TP) p + c within 1e-6
plus a spacing of c per step, and through DCP (same placement) bit for bit their uninterrupted
runs; saved on FSDP2 and resumed on TP, the compensations (and moments) come back resharded
bit for bit and the run continues as one process's (AdamW bit for bit, Muon within the
tolerance); Shampoo saved on TP and resumed on FSDP2 and in one process, its blocks' statistics
and roots back bit for bit too; ADOPT and SophiaG on both placements bit for bit one process's,
LAMB within the tolerance, and through DCP (ADOPT and LAMB on FSDP2, SophiaG on TP) bit for
bit their uninterrupted runs; Muon and Shampoo on the triton backend, through a DCP save and
resume, equal one process on triton within the tolerance.

On 4 ranks, besides the 8-bit cases on FSDP2 + TP above: AdamW with 8-bit states saved on the
(2, 2) mesh and resharded to FSDP2 on a 1-D mesh; HSDP with stochastic rounding: replicas stay
equal, DCP resume bit-exact; AdamW with compensated bf16 params on FSDP2 + TP through DCP as on
FSDP2, and resumed under FSDP2 on a 1-D mesh of 4, bit for bit; Shampoo with compensated params
on FSDP2 + TP within the tolerance of one process, and through DCP bit for bit its
uninterrupted run.
"""
from __future__ import annotations

import functools
import math
import os
import sys

import pytest
import torch

import dist_worker as dw
import triton_mode
from mupopt.optim import _lean_states as lean

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

BF16 = {"state_bits": 16}
# Format 8 on the small test model: width 24, threshold 256, so that the embedding and readout
# (16 x 24) and the MLP matrices (48 x 24) are quantized and biases and the norm are not; FSDP2
# and TP shards then hold 192 or 576 elements: blocks end inside shards and shards inside the
# blocks one process would cut.
WIDTH8, MIN8, STEPS8 = 24, 256, 3
OPTIMIZERS8 = ("adamw", "adopt", "sophia", "lamb", "muon", "shampoo")
# AdamW without weight decay: the interval of test_adamw_8bit_params_within_the_format_bound
# then needs no transcription of the decay modes.
OPTIONS8 = {name: {"state_bits": 8, **({"weight_decay": 0.0} if name == "adamw" else {})} for name in OPTIMIZERS8}
# Muon routes hidden matrices by their muP roles: its runs have width information.
MUP8 = {"muon": True}
# The entries whose update is per element (momentum and second moments of raw gradients).
PER_SHARD = {"adamw": None, "adopt": None, "sophia": None, "lamb": ("step", "exp_avg", "exp_avg_sq"),
             "muon": ("momentum_buffer", "exp_avg", "exp_avg_sq"), "shampoo": ("step", "exp_avg_sq")}
SR = {"state_bits": 8, "stochastic_rounding": True}


# Shampoo's and Muon's auto pick other backends for sharded and for plain tensors (Muon: triton,
# which steps 8-bit states too, on the sharded matrices), whose float32 roundings differ from
# the reference's in the last bit (a block's absmax too): both sides of the comparisons use the
# reference.
BACKEND8 = {"shampoo": "reference", "muon": "reference"}
# Where the 8-bit cases run: (the fixture that spawned them, their placement). Each test of the
# 8-bit cases on shards runs on both 1-D placements and on the (2, 2) mesh (FSDP2 + TP).
MESHES8 = [("results", "fsdp"), ("results", "tp"), ("results_2d", "fsdp+tp")]
# The DCP save-and-resume cases of format 8 (their uninterrupted runs "lean4-<case>"): AdamW on
# both 1-D placements, Muon on FSDP2 and Shampoo on TP; on the (2, 2) mesh AdamW and the
# optimizers with whole-tensor math (LAMB's norms, Muon's orthogonalisation, Shampoo's blocks).
DCP8 = [("results", "fsdp-adamw"), ("results", "tp-adamw"), ("results", "fsdp-muon"), ("results", "tp-shampoo"),
        *(("results_2d", f"fsdp+tp-{opt}") for opt in ("adamw", "lamb", "muon", "shampoo"))]
# Stepped by the triton backend with 8-bit states on FSDP2, uninterrupted and through DCP.
TRITON8 = ("adamw", "lamb")


def lean_spec(placement, optimizer, **extra):
    return {"kind": "lean_steps", "placement": placement, "optimizer": optimizer, "backend": BACKEND8.get(optimizer, "auto"),
            "options": OPTIONS8[optimizer], "width": WIDTH8, "min_8bit": MIN8, "steps": STEPS8,
            "mup": MUP8.get(optimizer, False), **extra}


def dcp_spec(placement, optimizer, path, **extra):
    return {"kind": "dcp", "placement": placement, "optimizer": optimizer, "backend": BACKEND8.get(optimizer, "auto"),
            "options": OPTIONS8[optimizer], "width": WIDTH8, "min_8bit": MIN8, "save_at": 2, "steps": STEPS8 + 1,
            "mup": MUP8.get(optimizer, False), "states": True, "path": path, **extra}


def dcp8_specs(fixture, tmp):
    """The DCP8 cases of ``fixture``: each one's uninterrupted run ("lean4-<case>", as long as
    the resumed run) and its save after 2 steps and resume ("dcp8-<case>")."""
    cases = [case.rsplit("-", 1) for fix, case in DCP8 if fix == fixture]
    return ([(f"lean4-{pl}-{opt}", lean_spec(pl, opt, steps=STEPS8 + 1)) for pl, opt in cases]
            + [(f"dcp8-{pl}-{opt}", dcp_spec(pl, opt, str(tmp / f"ckpt8-{pl}-{opt}"))) for pl, opt in cases])


# kahan_summation: bf16 params with their compensations, on the reference backend on both sides
# of each comparison (the fused backends' float32 sqrt differs from the CPU reference's in the
# last bit, which a compensation shows: tests/test_kahan_triton.py; the placement layer hands
# every backend the same local shards). Shampoo without momentum: its momentum buffer (bf16, as
# the param) stores the preconditioned direction, whose last float32 bit differs between the
# sharded and the whole-tensor roots; a bf16 rounding then turns that into a bf16 ulp of the
# buffer (measured: 1 element of fc2.weight after 1 step), which the next step's update carries
# into p + c far above the reordering (4.6e-5 against 3e-8).
KAHAN = {"kahan_summation": True}
KAHAN_OPTIONS = {"shampoo": {"betas": (0.0, 0.99)}}
# The runs' length; the DCP cases save after 2 steps and continue to it, so that the runs of
# the steps cases are also the DCP cases' uninterrupted runs.
KAHAN_STEPS = 4


# The triton backend (its kernels under the interpreter: the workers run with TRITON_INTERPRET=1)
# compared with one process on triton: Muon's orthogonalisation gathered to owners, Shampoo's
# sharded blocks computed by the owners (torch) and every param's compensated update in
# triton's kernels. On FSDP2, which shards every param (the 1-D ones too); Shampoo on TP would
# add triton's whole-tensor kernels on each rank (the embedding's and readout's roots), which
# tests/test_kahan_triton.py covers, for 2 s of CPU per rank interpreted.
KAHAN_TRITON = ("fsdp-muon", "fsdp-shampoo")


# LAMB, ADOPT and SophiaG on shards (test_kahan_on_shards_equals_one_process).
KAHAN_MORE = tuple(f"{pl}-{opt}" for opt in ("adopt", "sophia", "lamb") for pl in ("fsdp", "tp"))
# Their DCP cases: save after 2 steps and resume on the same placement, one placement each.
KAHAN_MORE_DCP = ("fsdp-adopt", "tp-sophia", "fsdp-lamb")
# Whose whole step is per element: each rank's shard steps as one process steps those elements,
# bit for bit.
KAHAN_ELEMENTWISE = ("adamw", "adopt", "sophia")


def kahan_spec(placement, optimizer, backend="reference", **extra):
    return {"kind": "lean_steps", "placement": placement, "optimizer": optimizer, "backend": backend,
            "options": {**KAHAN, **KAHAN_OPTIONS.get(optimizer, {})}, "dtype": "bfloat16", "steps": KAHAN_STEPS,
            "mup": MUP8.get(optimizer, False), **extra}


def kahan_dcp_spec(placement, optimizer, path, **extra):
    return {**kahan_spec(placement, optimizer), "kind": "dcp", "save_at": 2, "states": True, "path": path, **extra}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lean-dist")
    specs = [(f"steps-{pl}-{opt}", {"kind": "steps", "placement": pl, "optimizer": opt, "backend": "auto",
                                    "options": BF16})
             for pl in ("fsdp", "tp") for opt in ("adamw", "muon")]
    specs += [("dcp-fsdp-adamw", {"kind": "dcp", "placement": "fsdp", "optimizer": "adamw", "backend": "auto",
                                  "options": BF16, "path": str(tmp / "ckpt")})]
    specs += [(f"lean-{pl}-{opt}", lean_spec(pl, opt)) for pl in ("fsdp", "tp") for opt in OPTIMIZERS8]
    # Uninterrupted runs of the DCP cases' length, and the DCP cases.
    specs += dcp8_specs("results", tmp)
    specs += [("dcp-32-to-8", dcp_spec("fsdp", "adamw", str(tmp / "ckpt-32-8"), options={"weight_decay": 0.0},
                                       resume_options=OPTIONS8["adamw"])),
              ("dcp-8-to-32", dcp_spec("fsdp", "adamw", str(tmp / "ckpt-8-32"), resume_options={"weight_decay": 0.0})),
              ("dcp-fsdp-to-tp", dcp_spec("fsdp", "adamw", str(tmp / "ckpt-fsdp-tp"), resume_placement="tp", min_8bit=512))]
    # Stochastic rounding: bf16 params, 8-bit states.
    specs += [("sr-shards", {"kind": "sr_shards", "options": SR}),
              ("lean4-sr", lean_spec("fsdp", "adamw", steps=STEPS8 + 1, dtype="bfloat16",
                                     options={**OPTIONS8["adamw"], **SR})),
              ("dcp8-sr", dcp_spec("fsdp", "adamw", str(tmp / "ckpt-sr"), dtype="bfloat16",
                                   options={**OPTIONS8["adamw"], **SR}))]
    # Compensated bf16 params (kahan_summation): AdamW on both 1-D placements (FSDP2: the DCP
    # case's save and its continued run), Muon and Shampoo (whole-tensor math) once each, and
    # through DCP (saved and resumed on the same placement, the steps cases their uninterrupted
    # runs); AdamW and Muon saved on FSDP2 and resumed on TP (other shards, plain tensors for the
    # embedding, norm and readout); Muon and Shampoo on the triton backend.
    specs += [("kahan-tp-adamw", kahan_spec("tp", "adamw")),
              ("kahan-fsdp-muon", kahan_spec("fsdp", "muon")),
              ("kahan-tp-shampoo", kahan_spec("tp", "shampoo")),
              ("kahan-dcp-fsdp-adamw", kahan_dcp_spec("fsdp", "adamw", str(tmp / "ckpt-kahan"))),
              ("kahan-dcp-fsdp-muon", kahan_dcp_spec("fsdp", "muon", str(tmp / "ckpt-kahan-muon"))),
              ("kahan-dcp-tp-shampoo", kahan_dcp_spec("tp", "shampoo", str(tmp / "ckpt-kahan-shampoo"))),
              ("kahan-dcp-fsdp-to-tp-adamw", kahan_dcp_spec("fsdp", "adamw", str(tmp / "ckpt-kahan-to-tp"),
                                                            resume_placement="tp")),
              ("kahan-dcp-fsdp-to-tp-muon", kahan_dcp_spec("fsdp", "muon", str(tmp / "ckpt-kahan-muon-to-tp"),
                                                           resume_placement="tp"))]
    specs += [(f"kahan-triton-{case}", kahan_dcp_spec(*case.split("-"), str(tmp / f"ckpt-kahan-triton-{case}"), backend="triton"))
              for case in KAHAN_TRITON]
    # LAMB, ADOPT and SophiaG with compensated params on both 1-D placements; Shampoo's TP
    # checkpoint resumed on FSDP2 (every param sharded, the blocks on other owners; the same
    # checkpoint is resumed in one process by test_kahan_dcp_resumes_on_one_process).
    specs += [(f"kahan-{case}", kahan_spec(*case.split("-"))) for case in KAHAN_MORE]
    specs += [("kahan-dcp-tp-to-fsdp-shampoo", kahan_dcp_spec("tp", "shampoo", str(tmp / "ckpt-kahan-shampoo-to-fsdp"),
                                                              resume_placement="fsdp"))]
    # The same three through DCP, each on one placement (the KAHAN_MORE steps cases their
    # uninterrupted runs); AdamW and LAMB with 8-bit states on triton, uninterrupted and through
    # DCP.
    specs += [(f"kahan-dcp-{case}", kahan_dcp_spec(*case.split("-"), str(tmp / f"ckpt-kahan-{case}")))
              for case in KAHAN_MORE_DCP]
    for opt in TRITON8:
        specs += [(f"lean4-triton-fsdp-{opt}", lean_spec("fsdp", opt, steps=STEPS8 + 1, backend="triton")),
                  (f"dcp8-triton-fsdp-{opt}", dcp_spec("fsdp", opt, str(tmp / f"ckpt8-triton-{opt}"), backend="triton"))]
    out = tmp / "results.pt"
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = dw.spawn(2, specs, out, env)
    res["_tmp"] = tmp  # the checkpoints, which tests resume on one process
    return res


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


# -- 8-bit states -------------------------------------------------------------------------------
@pytest.fixture
def min8(monkeypatch):
    monkeypatch.setattr(lean, "MIN_8BIT_SIZE", MIN8)


def _initial(optimizer) -> dict:
    model = dw.make_model(mup=MUP8.get(optimizer, False), width=WIDTH8)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _shard_alone(optimizer, name, full0, index, quantized, steps, options, use_muon, monkeypatch):
    """One process stepping one rank's shard of parameter ``name`` as a plain tensor of the
    shard's shape, with that shard of each step's gradient. Returns (param, state)."""
    # Format 8 where the distributed run quantized this param (its threshold is on the global size).
    monkeypatch.setattr(lean, "MIN_8BIT_SIZE", 1 if quantized else 1 << 40)
    flat = index.reshape(-1)
    p = torch.nn.Parameter(full0.reshape(-1)[flat].view(index.shape).clone())
    group = {"params": [p]} if use_muon is None else {"params": [p], "use_muon": use_muon}
    opt = dw.make_optimizer(optimizer, [group], BACKEND8.get(optimizer, "auto"), **options)
    for t in range(steps):
        p.grad = dw.grad_for(t, name, full0.shape).to(p.dtype).reshape(-1)[flat].view(index.shape)
        dw.step_once(opt, optimizer, t)
    return p.detach(), opt.state[p]


def _cut_on_the_2d_mesh(ranks: list) -> None:
    """The (2, 2) mesh cut the params in two dims (rank = 2 * dp + tp): fc1's weight (48 rows;
    TP's halves of rows, each cut again by FSDP2 on "dp": _StridedShard) in 4 disjoint quarters,
    rank 1 (dp 0, tp 1) holding rows of the second half, above rank 2's (dp 1, tp 0): a 1-D cut
    of the rows over 4 ranks orders them the other way; the embedding (FSDP2 alone) in halves,
    each on both ranks of a TP group."""
    numel = 2 * WIDTH8 * WIDTH8
    fc1 = [mine["fc1.weight"]["index"] for mine in ranks]
    assert len(fc1) == 4 and all(4 * i.numel() == numel for i in fc1)
    assert torch.equal(torch.cat([i.reshape(-1) for i in fc1]).sort().values, torch.arange(numel))
    assert int(fc1[1].min()) > int(fc1[2].max())
    emb = [mine["emb.weight"]["index"] for mine in ranks]
    assert torch.equal(emb[0], emb[1]) and torch.equal(emb[2], emb[3]) and 2 * emb[0].numel() == dw.VOCAB * WIDTH8
    assert not set(emb[0].reshape(-1).tolist()) & set(emb[2].reshape(-1).tolist())


@pytest.mark.parametrize("fixture,placement", MESHES8)
@pytest.mark.parametrize("optimizer", OPTIMIZERS8)
def test_8bit_states_per_shard_equal_one_process_on_the_shard(request, fixture, placement, optimizer, monkeypatch):
    r = _ok(request.getfixturevalue(fixture), f"lean-{placement}-{optimizer}")
    if placement == "fsdp+tp":
        _cut_on_the_2d_mesh(r["ranks"])
    full0 = _initial(optimizer)
    quantized_seen = [0] * len(r["ranks"])
    for rank, mine in enumerate(r["ranks"]):
        for name, entry in mine.items():
            got = entry["state"]
            quantized = any(k.endswith(lean.ABSMAX) for k in got)
            quantized_seen[rank] += quantized
            use_muon = ("momentum_buffer" in got) if optimizer == "muon" else None  # the distributed routing
            _, want = _shard_alone(optimizer, name, full0[name], entry["index"], quantized, STEPS8,
                                   OPTIONS8[optimizer], use_muon, monkeypatch)
            keys = PER_SHARD[optimizer] or [k for k, v in want.items() if isinstance(v, torch.Tensor)]
            keys = [k for k in keys if k in want]
            keys += [k + lean.ABSMAX for k in keys if k + lean.ABSMAX in want]
            assert keys, (rank, name)
            for k in keys:
                assert torch.equal(got[k], want[k]), (rank, name, k)
    # The 4 matrices quantized on every rank: under FSDP2 (on the (2, 2) mesh too) all shards;
    # under TP fc1 and fc2 are, the embedding and readout plain tensors stepped whole.
    assert quantized_seen == [4] * len(r["ranks"])


@pytest.mark.parametrize("fixture,placement", MESHES8)
@pytest.mark.parametrize("optimizer", ["adamw", "adopt", "sophia"])
def test_8bit_params_per_shard_equal_one_process_on_the_shard(request, fixture, placement, optimizer, monkeypatch):
    """Each rank's local param (a replica's too: on the (2, 2) mesh the embedding's halves are on
    two ranks each) is what one process stepping the shard alone makes, and so is the gathered
    param."""
    r = _ok(request.getfixturevalue(fixture), f"lean-{placement}-{optimizer}")
    full0 = _initial(optimizer)
    for name, w in r["params"].items():
        got = torch.empty_like(w).reshape(-1)
        for rank, mine in enumerate(r["ranks"]):
            entry = mine[name]
            quantized = any(k.endswith(lean.ABSMAX) for k in entry["state"])
            p, _ = _shard_alone(optimizer, name, full0[name], entry["index"], quantized, STEPS8, OPTIONS8[optimizer],
                                None, monkeypatch)
            assert torch.equal(entry["param"], p), (rank, name)
            got[entry["index"].reshape(-1)] = p.reshape(-1)
        assert torch.equal(got.view(w.shape), w), name


def _adamw_interval(name, full0, steps, hp):
    """Bounds (float64) on AdamW's params after ``steps`` steps with states stored in format 8,
    whatever the blocks: the exact recursion, each stored m and v widened by format 8's error
    bound times the largest magnitude the entry can have anywhere in the tensor (no block's
    absmax exceeds it), and the update taken at the worst corner of the (m, v) box."""
    rs, ru = lean.relative_error_bound(lean.SIGNED), lean.relative_error_bound(lean.UNSIGNED)
    b1, b2 = hp["betas"]
    lr, eps = hp["lr"], hp["eps"]
    m_lo = m_hi = v_lo = v_hi = torch.zeros(full0.shape, dtype=torch.float64)
    p_lo = p_hi = full0.double()
    for t in range(1, steps + 1):
        g = dw.grad_for(t - 1, name, full0.shape).double()
        m_lo, m_hi = b1 * m_lo + (1 - b1) * g, b1 * m_hi + (1 - b1) * g
        v_lo, v_hi = b2 * v_lo + (1 - b2) * g * g, b2 * v_hi + (1 - b2) * g * g
        bc1, bc2 = 1 - b1**t, math.sqrt(1 - b2**t)

        def u(m, v):
            return m / (v.clamp_min(0).sqrt() / bc2 + eps) / bc1

        # The step uses m and v before they are stored: the box of this step's values.
        hi = torch.where(m_hi > 0, u(m_hi, v_lo), u(m_hi, v_hi))
        lo = torch.where(m_lo > 0, u(m_lo, v_hi), u(m_lo, v_lo))
        p_lo, p_hi = p_lo - lr * hi, p_hi - lr * lo
        # Then stored: each value within bound * absmax of its block (plus float32 roundings).
        am = torch.maximum(m_lo.abs(), m_hi.abs()).max() * (1 + 1e-6)
        av = v_hi.max() * (1 + 1e-6)
        m_lo, m_hi = m_lo - rs * am, m_hi + rs * am
        v_lo, v_hi = (v_lo - ru * av).clamp_min(0), v_hi + ru * av
    # The params themselves are float32: a few roundings of |p| per step.
    slack = steps * 4 * 2.0**-24 * torch.maximum(p_lo.abs(), p_hi.abs())
    return p_lo - slack, p_hi + slack


@pytest.mark.parametrize("fixture,placement", MESHES8)
def test_adamw_8bit_params_within_the_format_bound(request, fixture, placement, min8):
    """The distributed run's params and those of one process stepping the whole tensors in
    format 8 both lie inside the interval format 8's error bound allows; so they differ by at
    most its width. The interval is narrower than the steps taken (a bound that can fail)."""
    got = _ok(request.getfixturevalue(fixture), f"lean-{placement}-adamw")["params"]
    model = dw.make_model(mup=False, width=WIDTH8)
    opt = dw.make_optimizer("adamw", model.parameters(), "auto", **OPTIONS8["adamw"])
    for t in range(STEPS8):
        dw.feed_grads(model, t)
        dw.step_once(opt, "adamw", t)
    assert any(lean.is_quantized(st, "exp_avg") for st in opt.state.values())
    full0 = _initial("adamw")
    hp = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8}
    for name, p in model.named_parameters():
        lo, hi = _adamw_interval(name, full0[name], STEPS8, hp)
        for which, value in (("distributed", got[name]), ("one process", p.detach())):
            v = value.double()
            assert bool(((v >= lo) & (v <= hi)).all()), (name, which, float((lo - v).clamp_min(0).max()),
                                                         float((v - hi).clamp_min(0).max()))
        moved = (got[name].double() - full0[name].double()).abs().mean()
        assert float((hi - lo).mean()) < float(moved), name


def _whole_tensor_run(optimizer, options) -> dict:
    model = dw.make_model(mup=MUP8.get(optimizer, False), width=WIDTH8)
    opt = dw.make_optimizer(optimizer, model.parameters(), BACKEND8.get(optimizer, "auto"), **options)
    for t in range(STEPS8):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fixture,placement", MESHES8)
@pytest.mark.parametrize("optimizer", ["lamb", "muon", "shampoo"])
def test_8bit_params_near_one_process_on_whole_tensors(request, fixture, placement, optimizer, min8):
    """LAMB, Muon, Shampoo (whole-tensor math: no per-shard run to equal): the distributed run's
    params differ from one process stepping whole tensors in format 8 by no more than 3 times
    that run's own distance from format 32, per tensor (both runs are format 8 with blocks cut
    elsewhere: each is as far from the 32-bit run as the format's error makes it), plus the
    collectives' float32 reordering (1e-6 relative, as tests/test_distributed.py)."""
    got = _ok(request.getfixturevalue(fixture), f"lean-{placement}-{optimizer}")["params"]
    eight = _whole_tensor_run(optimizer, OPTIONS8[optimizer])
    full = _whole_tensor_run(optimizer, {k: v for k, v in OPTIONS8[optimizer].items() if k != "state_bits"})
    quantized_apart = 0
    for name, w in eight.items():
        effect = float((w - full[name]).abs().max())
        diff = float((got[name] - w).abs().max())
        assert diff <= 3 * effect + 1e-6 * float(w.abs().max()) + 1e-7, (name, diff, effect)
        quantized_apart += diff > 0
    assert quantized_apart > 0  # blocks do end elsewhere


def _same_states(a: dict, b: dict, keys=None) -> None:
    for rank, (x, y) in enumerate(zip(a, b)):
        for name in x:
            for k, v in x[name]["state"].items():
                if keys is None or k in keys:
                    assert torch.equal(v, y[name]["state"][k]), (rank, name, k)


@pytest.mark.parametrize("fixture,case", DCP8)
def test_8bit_states_resume_through_dcp_bit_exact(request, fixture, case):
    """Saved after 2 steps and resumed on the same placement: every rank's states as loaded are
    the saved ones (codes and scales, and the rest: Shampoo's blocks too), some of them 8-bit on
    every rank, and after the continued steps every rank's states and the params are those of
    the uninterrupted run, bit for bit."""
    results = request.getfixturevalue(fixture)
    r = _ok(results, f"dcp8-{case}")
    _same_states(r["saved"], r["loaded"])
    assert all(any(k.endswith(lean.ABSMAX) for e in m.values() for k in e["state"]) for m in r["loaded"])
    want = _ok(results, f"lean4-{case}")
    _same_states(want["ranks"], r["final"])
    for name, w in want["params"].items():
        assert torch.equal(r["params"][name], w), name


@pytest.mark.parametrize("optimizer", TRITON8)
def test_8bit_states_resume_through_dcp_on_triton(results, optimizer):
    """AdamW and LAMB (its norms all-reduced between the kernels' passes) with 8-bit states
    stepped by the triton backend (kernels under the interpreter) on FSDP2, saved after 2 steps
    and resumed: every rank's codes and block scales as loaded are the saved ones, and after the
    continued steps the codes, scales, step counts and params are those of the uninterrupted
    triton run, bit for bit."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    r = _ok(results, f"dcp8-triton-fsdp-{optimizer}")
    want = _ok(results, f"lean4-triton-fsdp-{optimizer}")
    for run in (r, want):
        assert all(b.startswith("triton") for sel in run["selected"] for b in sel.values()), run["selected"]
    _same_states(r["saved"], r["loaded"])
    scales = sum(k.endswith(lean.ABSMAX) for m in r["loaded"] for e in m.values() for k in e["state"])
    assert scales == 2 * 2 * 4  # exp_avg and exp_avg_sq of the 4 matrices on 2 ranks
    _same_states(want["ranks"], r["final"])
    for name, w in want["params"].items():
        assert torch.equal(r["params"][name], w), name


def _global_values(saved: list, name: str, numel: int, kinds: dict) -> dict:
    """The whole tensor (flat) of each state entry of parameter ``name`` from every rank's local
    states (8-bit entries as their checkpoint values, lean.exported)."""
    out = {}
    for mine in saved:
        entry = mine[name]
        for k, v in entry["state"].items():
            if k.endswith(lean.ABSMAX) or not v.ndim:
                continue
            if k + lean.ABSMAX in entry["state"]:
                v = lean.exported(v, entry["state"][k + lean.ABSMAX], kinds[k])
            out.setdefault(k, torch.full((numel,), float("nan")))[entry["index"].reshape(-1)] = v.reshape(-1).float()
    return out


@pytest.mark.parametrize("case", ["dcp-32-to-8", "dcp-8-to-32", "dcp-fsdp-to-tp"])
def test_8bit_dcp_loads_across_formats_and_shardings(results, case):
    """The loaded states are the checkpoint's values (a format-32 state's, or a format-8 state's
    exported values), quantized over the loading rank's shard where it steps format 8: checked
    bit for bit against each rank's saved states."""
    from mupopt.optim.adamw import ADAMW_STATES

    r = _ok(results, case)
    checked = 0
    for name in r["saved"][0]:
        values = _global_values(r["saved"], name, r["params"][name].numel(), ADAMW_STATES)
        for mine in r["loaded"]:
            entry = mine[name]
            flat = entry["index"].reshape(-1)
            for k, kind in ADAMW_STATES.items():
                if k not in entry["state"]:
                    continue
                want = values[k][flat].view(entry["index"].shape)
                if k + lean.ABSMAX in entry["state"]:
                    codes, absmax = lean.quantized(want, kind)
                    assert torch.equal(entry["state"][k], codes) and torch.equal(entry["state"][k + lean.ABSMAX], absmax), (name, k)
                else:
                    assert torch.equal(entry["state"][k], want.to(entry["state"][k].dtype)), (name, k)
                checked += 1
    assert checked >= 8
    saved_8 = sum(k.endswith(lean.ABSMAX) for m in r["saved"] for e in m.values() for k in e["state"])
    loaded_8 = sum(k.endswith(lean.ABSMAX) for m in r["loaded"] for e in m.values() for k in e["state"])
    if case == "dcp-32-to-8":
        assert saved_8 == 0 and loaded_8 > 0
    elif case == "dcp-8-to-32":
        assert saved_8 > 0 and loaded_8 == 0
    else:
        assert saved_8 > 0 and loaded_8 > 0
    for w in r["params"].values():
        assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize("kind", [lean.SIGNED, lean.UNSIGNED])
@pytest.mark.parametrize("maps", lean.MAP_NAMES)
def test_exported_values_quantize_back_to_the_same_codes_and_scales(kind, maps, monkeypatch):
    """What load_state_dict does to a checkpoint of a DTensor param's 8-bit state, on blocks of
    absmax from 2^-126 (the smallest normal float32) to 1e38, every code present: the codes and
    scales come back bit for bit. (The plain decode would not: the signed dynamic map has no
    -1.0, so a block whose largest magnitude is negative decodes below its absmax.)"""
    monkeypatch.setattr(lean, "maps", maps)
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0**-126, 1e-30, 1e-12, 3e-4, 1.0, 7e5, 1e20, 1e38])
    x = torch.randn(len(scales), 2, lean.BLOCK, generator=gen) * torch.logspace(-8, 0, lean.BLOCK)
    x = x / x.abs().amax(dim=(1, 2), keepdim=True) * scales.view(-1, 1, 1)
    x[::2, 0] = -x[::2, 0].abs()  # blocks whose largest magnitude is negative
    if kind == lean.UNSIGNED:
        x = x.abs()
    values, _ = lean.map_tensor(kind)
    # Second block of each scale: every code's value once (times the scale: codes come back as they are).
    x[:, 1] = values[torch.randperm(lean.BLOCK, generator=gen) % lean.used_codes(maps, kind)] * scales.view(-1, 1)
    codes, absmax = lean.quantized(x.reshape(-1, lean.BLOCK), kind)
    assert all(len(set(c.tolist())) == lean.used_codes(maps, kind) for c in codes[1::2])
    again = lean.quantized(lean.exported(codes, absmax, kind), kind)
    assert torch.equal(again[0], codes) and torch.equal(again[1], absmax)
    # The export differs from the decode only where the decode lies below the block's absmax.
    dec, exp = lean.dequantize(codes, absmax, kind), lean.exported(codes, absmax, kind)
    differ = dec != exp
    assert bool((exp[differ] == -absmax.view(-1, 1).expand_as(exp)[differ]).all())
    assert bool(differ.any()) == (kind == lean.SIGNED and maps == "dynamic")


# -- stochastic rounding ----------------------------------------------------------------------
def test_stochastic_rounding_shards_draw_independent_bits(results):
    """Two FSDP2 shards of one bf16 param holding equal values and gradients (the param is two
    copies of one block, 8-bit states): their keys apart, they round apart. Before the shard's
    offset went into its key, ranks with one seed drew the same bits and these were equal."""
    r = _ok(results, "sr-shards")
    a, b = r["local"]
    assert a.dtype == torch.bfloat16 and a.shape == b.shape
    differ = (a != b).float().mean()
    # Each element rounds up with the probability of its fraction q, independently on the two
    # shards: they differ with probability 2q(1-q), 1/3 for q uniform (two steps: about that).
    assert 0.15 < float(differ) < 0.6, float(differ)
    assert r["quantized"]
    assert r["seeds"][0] == r["seeds"][1]  # one seed per param on every rank: the checkpoint's


def test_stochastic_rounding_resume_through_dcp_bit_exact(results):
    r = _ok(results, "dcp8-sr")
    want = _ok(results, "lean4-sr")["params"]
    for name, w in want.items():
        assert w.dtype == torch.bfloat16
        assert torch.equal(r["params"][name], w), name


# -- 2-D meshes (4 ranks) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def results_2d(tmp_path_factory):
    """FSDP2 + TP on a (2, 2) mesh (TP's dims _StridedShard under FSDP2), every optimizer with
    8-bit states, and the DCP8 cases; HSDP (every shard on two ranks), AdamW with 8-bit states;
    the HSDP runs round bf16 params stochastically; and AdamW with compensated bf16 params
    (kahan_summation) on FSDP2 + TP, resumed on FSDP2 + TP and under FSDP2 on a 1-D mesh of 4;
    Shampoo with compensated params on FSDP2 + TP, and resumed on it."""
    tmp = tmp_path_factory.mktemp("lean-dist-2d")
    sr = {**OPTIONS8["adamw"], **SR}
    specs = [(f"lean-fsdp+tp-{opt}", lean_spec("fsdp+tp", opt)) for opt in OPTIMIZERS8]
    specs += dcp8_specs("results_2d", tmp)
    specs += [("dcp8-fsdp+tp-to-fsdp", dcp_spec("fsdp+tp", "adamw", str(tmp / "ckpt-to-fsdp"), resume_placement="fsdp")),
              ("lean4-hsdp-sr", lean_spec("hsdp-2d", "adamw", steps=STEPS8 + 1, dtype="bfloat16", options=sr)),
              ("dcp8-hsdp-sr", dcp_spec("hsdp-2d", "adamw", str(tmp / "ckpt-sr"), dtype="bfloat16", options=sr)),
              ("kahan-dcp-fsdp+tp-adamw", kahan_dcp_spec("fsdp+tp", "adamw", str(tmp / "ckpt-kahan"))),
              ("kahan-dcp-fsdp+tp-to-fsdp-adamw", kahan_dcp_spec("fsdp+tp", "adamw", str(tmp / "ckpt-kahan-to-fsdp"),
                                                                 resume_placement="fsdp")),
              ("kahan-fsdp+tp-shampoo", kahan_spec("fsdp+tp", "shampoo")),
              ("kahan-dcp-fsdp+tp-shampoo", kahan_dcp_spec("fsdp+tp", "shampoo", str(tmp / "ckpt-kahan-shampoo")))]
    out = tmp / "results.pt"
    env = {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    res = dw.spawn(4, specs, out, env)
    res["_tmp"] = tmp
    return res


def test_8bit_dcp_reshards_from_2d_to_1d_mesh(results_2d):
    """Saved on the (2, 2) mesh under FSDP2 + TP, loaded on a 1-D mesh of 4 ranks under FSDP2
    (other shards, other blocks): each rank's loaded codes and scales are the checkpoint's values
    quantized over its new shard, bit for bit."""
    from mupopt.optim.adamw import ADAMW_STATES

    r = _ok(results_2d, "dcp8-fsdp+tp-to-fsdp")
    moved = 0
    for name in r["saved"][0]:
        values = _global_values(r["saved"], name, r["params"][name].numel(), ADAMW_STATES)
        for mine in r["loaded"]:
            entry = mine[name]
            for k, kind in ADAMW_STATES.items():
                if k + lean.ABSMAX not in entry["state"]:
                    continue
                want = values[k][entry["index"].reshape(-1)].view(entry["index"].shape)
                codes, absmax = lean.quantized(want, kind)
                assert torch.equal(entry["state"][k], codes) and torch.equal(entry["state"][k + lean.ABSMAX], absmax), (name, k)
                moved += 1
    assert moved >= 4 * 4 * 2  # 4 matrices on 4 ranks, 2 entries each
    for w in r["params"].values():
        assert bool(torch.isfinite(w).all())


def test_stochastic_rounding_hsdp_replicas_stay_equal_and_resume(results_2d):
    """HSDP with bf16 params rounded stochastically and 8-bit states: the two replicas of each
    shard hold equal params and states (their rounding keys are alike: a key per rank would
    split them), and a DCP resume is bit-exact."""
    r = _ok(results_2d, "lean4-hsdp-sr")
    by_index: dict = {}
    for mine in r["ranks"]:
        for name, entry in mine.items():
            by_index.setdefault((name, tuple(entry["index"].reshape(-1).tolist())), []).append(entry)
    assert len(by_index) == 2 * len(r["ranks"][0])  # two shards of every param, each on two ranks
    for (name, _), (a, b) in by_index.items():
        assert a["param"].dtype == torch.bfloat16
        assert torch.equal(a["param"], b["param"]), name
        for k in a["state"]:
            assert torch.equal(a["state"][k], b["state"][k]), (name, k)
    d = _ok(results_2d, "dcp8-hsdp-sr")
    for name, w in r["params"].items():
        assert torch.equal(d["params"][name], w), name


def test_8bit_state_memory_of_a_shard(min8):
    """state_memory() counts a DTensor param's local codes and local scales, before its first
    step (planned) as after: 1 byte per local element and 4 per local block, per entry."""
    import mupopt
    from torch.distributed.tensor import Shard, distribute_tensor

    with dw.one_rank_mesh() as mesh:
        w = torch.nn.Parameter(distribute_tensor(torch.randn(40, 30), mesh, [Shard(0)]))
        opt = mupopt.AdamW([w], lr=1e-2, state_bits=8)
        want = 2 * (40 * 30 + 4 * lean.blocks_of(40 * 30)) + 4  # exp_avg, exp_avg_sq; the float32 step
        assert opt.state_memory() == want
        w.grad = distribute_tensor(torch.randn(40, 30), mesh, [Shard(0)])
        opt.step()
        assert lean.is_quantized(opt.state[w], "exp_avg") and opt.state_memory() == want


# -- compensated bf16 params (kahan_summation) ------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kahan_one_process(optimizer: str, steps: int, backend: str = "reference") -> dict:
    """One process stepping the whole bf16 tensors: {name: (param, compensation)}. Computed once
    per arguments (the triton runs take seconds interpreted); callers only read it."""
    model = dw.make_model(mup=MUP8.get(optimizer, False)).to(torch.bfloat16)
    opt = dw.make_optimizer(optimizer, model.parameters(), backend, **KAHAN, **KAHAN_OPTIONS.get(optimizer, {}))
    for t in range(steps):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    assert all(b.split(" ")[0] == backend for sel in opt.selected_backends for b in sel.values()), opt.selected_backends
    return {n: (p.detach().clone(), opt.state[p]["param_compensation"].clone()) for n, p in model.named_parameters()}


def _whole(ranks: list, name: str, shape) -> dict:
    """Parameter ``name`` ("param") and each state entry of its shape, whole (float32), from
    every rank's local shards (replicas write the same elements; an element no rank holds stays
    nan, which no comparison passes)."""
    out: dict = {}
    for mine in ranks:
        entry = mine[name]
        flat = entry["index"].reshape(-1)
        for k, v in [("param", entry["param"]), *entry["state"].items()]:
            if v.ndim and v.shape == entry["index"].shape:
                out.setdefault(k, torch.full(shape, float("nan"))).view(-1)[flat] = v.reshape(-1).float()
    return out


def _kahan_whole(ranks: list, name: str, shape) -> tuple:
    """Parameter ``name`` and its compensation, whole (float32), from every rank's local shards."""
    whole = _whole(ranks, name, shape)
    return whole["param"], whole["param_compensation"]


def _kahan_placed(ranks: list, sharded: int) -> None:
    """On every rank, ``sharded`` compensations are DTensors placed as their params, bf16."""
    for mine in ranks:
        assert sum("param_compensation" in e["placed"] for e in mine.values()) == sharded
        assert all(e["state"]["param_compensation"].dtype == torch.bfloat16 for e in mine.values())


# Each placement's DTensor params: FSDP2 shards every param (on a 1-D mesh as on the (2, 2) mesh);
# TP places fc1's and fc2's weights and biases (fc2's bias replicated) and leaves the others whole.
SHARDED = {"fsdp": 9, "tp": 4, "fsdp+tp": 9}


def _kahan_near(ranks: list, want: dict, steps: int, rtol: float = 1e-6) -> int:
    """Params and compensations of every rank's local shards against one process's whole
    tensors ``want``: p + c within ``rtol`` of the largest |p| (float32 reordering: 1e-6, as
    tests/test_distributed.py) plus one spacing of c per step (a last-bit difference of x at a
    rounding boundary of c moves c by one spacing: tests/test_kahan_triton.py); a compensation
    ignored or lost would be off by c itself, 2^8 spacings. Returns how many elements of the
    compensations are nonzero (something to compare)."""
    moved = 0
    for name, (p, c) in want.items():
        got_p, got_c = _kahan_whole(ranks, name, p.shape)
        x, y = got_p.double() + got_c.double(), p.double() + c.double()
        spacing = torch.ldexp(torch.ones_like(y), torch.frexp(torch.maximum(got_c.abs(), c.abs().float()))[1] - 8)
        assert bool(((x - y).abs() <= rtol * y.abs().max() + steps * spacing.double()).all()), name
        moved += int((c != 0).sum())
    return moved


@pytest.mark.parametrize("case", ["tp-adamw", "fsdp-muon", "tp-shampoo", *KAHAN_MORE])
def test_kahan_on_shards_equals_one_process(results, case):
    """Each sharded param's compensation is a DTensor placed as the param (every rank steps its
    local shard of it), and params and compensations equal those of one process stepping the
    whole tensors on the same global gradients: AdamW, ADOPT and SophiaG (per element) bit for
    bit (AdamW on FSDP2: the DCP test below); LAMB (norms all-reduced), Muon and Shampoo
    (whole-tensor math, their Newton-Schulz / roots batched or reduced in another order) within
    _kahan_near's tolerance. Measured: LAMB and Muon equal, Shampoo 6e-7 of the largest |p|."""
    placement, optimizer = case.split("-")
    r = _ok(results, f"kahan-{case}")
    _kahan_placed(r["ranks"], SHARDED[placement])
    want = _kahan_one_process(optimizer, KAHAN_STEPS)
    for name, (p, c) in want.items():
        got_p, got_c = _kahan_whole(r["ranks"], name, p.shape)
        assert torch.equal(got_p.bfloat16(), r["params"][name]), name  # the shards are the gathered param
        if optimizer in KAHAN_ELEMENTWISE:
            assert torch.equal(got_p, p.float()) and torch.equal(got_c, c.float()), name
    assert _kahan_near(r["ranks"], want, KAHAN_STEPS) > 0


# Shampoo on triton, sharded against one process: a sharded matrix's block statistics, roots and
# products are the owners' (torch, as the reference's) where one process runs triton's kernels,
# and the roots amplify their float32 roundings: tests/test_distributed.py's tolerance for that
# gap, 1e-5 of the largest |p| (measured there: 3.2e-6 after 10 steps with float32 params).
KAHAN_TRITON_RTOL = {"muon": 1e-6, "shampoo": 1e-5}


@pytest.mark.parametrize("case", KAHAN_TRITON)
def test_kahan_triton_on_shards_resumes_and_equals_one_process_on_triton(results, case, monkeypatch):
    """The triton backend with compensated params on shards (Muon and Shampoo on FSDP2), saved
    through DCP after 2 steps and resumed on the same placement: every rank's states as loaded
    are the saved ones bit for bit (compensations, moments, Shampoo's blocks); the steps ran
    on triton, every sharded param's compensation is placed as the param, and after 4 steps
    params and compensations equal one process's uninterrupted run on triton (not the
    reference: the fused float32 sqrt differs in the last bit, which a compensation shows)
    within _kahan_near's tolerance, Shampoo's with KAHAN_TRITON_RTOL. Measured (4 steps, the
    same with and without the DCP resume): Muon equal; Shampoo's p equal, p + c apart on fc1 and
    fc2 by at most 8.8e-7 of the largest |p|, and on one element of the readout by 3.5e-6 (8
    spacings of its c)."""
    if not triton_mode.runs_on_cpu():
        pytest.skip("the one-process runs need triton's kernels on CPU tensors (interpreted)")
    triton_mode.match_environment(monkeypatch, True)
    placement, optimizer = case.split("-")
    r = _ok(results, f"kahan-triton-{case}")
    kernel = {"muon": {"muon", "adamw"}, "shampoo": {"shampoo"}}[optimizer]
    assert {k for sel in r["selected"] for k in sel} == kernel
    assert all(b.startswith("triton") for sel in r["selected"] for b in sel.values()), r["selected"]
    _same_states(r["saved"], r["loaded"])
    _kahan_dcp(r, optimizer, SHARDED[placement], SHARDED[placement])
    _kahan_placed(r["final"], SHARDED[placement])
    want = _kahan_one_process(optimizer, KAHAN_STEPS, "triton")
    assert _kahan_near(r["final"], want, KAHAN_STEPS, KAHAN_TRITON_RTOL[optimizer]) > 0


def _kahan_dcp(r: dict, optimizer: str, saved: int, loaded: int) -> None:
    """A DCP save after 2 steps (``saved`` compensations placed as their params on each rank),
    loaded into a fresh model and optimizer on the same or another placement (``loaded``): the
    params and every state entry of their shape (compensations, moments) come back, whole, bit
    for bit; the compensations saved are not zero (a lost one would show)."""
    _kahan_placed(r["saved"], saved)
    _kahan_placed(r["loaded"], loaded)
    for name, w in r["params"].items():
        before, after = _whole(r["saved"], name, w.shape), _whole(r["loaded"], name, w.shape)
        assert before.keys() == after.keys() and "param_compensation" in after, name
        for k in before:
            assert torch.equal(before[k], after[k]), (name, k)
        assert bool(before["param_compensation"].any()), name


def _kahan_adamw_dcp(r: dict, saved: int, loaded: int) -> None:
    """AdamW through DCP (_kahan_dcp): the saved params and compensations are one process's after
    2 steps, and the continued run's are one process's after KAHAN_STEPS, bit for bit."""
    _kahan_dcp(r, "adamw", saved, loaded)
    for ranks, steps in ((r["saved"], 2), (r["final"], KAHAN_STEPS)):
        for name, (p, c) in _kahan_one_process("adamw", steps).items():
            got_p, got_c = _kahan_whole(ranks, name, p.shape)
            assert torch.equal(got_p, p.float()) and torch.equal(got_c, c.float()), (steps, name)
    for name, (p, _) in _kahan_one_process("adamw", KAHAN_STEPS).items():
        assert r["params"][name].dtype == torch.bfloat16 and torch.equal(r["params"][name], p), name


def test_kahan_fsdp_equals_one_process_and_resumes_through_dcp(results):
    """AdamW on FSDP2, saved and resumed on FSDP2: every rank's states back bit for bit, the
    continued run one process's."""
    r = _ok(results, "kahan-dcp-fsdp-adamw")
    _same_states(r["saved"], r["loaded"])
    _kahan_adamw_dcp(r, SHARDED["fsdp"], SHARDED["fsdp"])


def test_kahan_dcp_reshards_fsdp_to_tp(results):
    """Saved on FSDP2, resumed on TP (other shards of fc1 and fc2; the embedding, norm and
    readout whole, plain tensors): the compensations reshard with their params (and the moments
    with them), and the continued run equals the uninterrupted one-process run: AdamW bit for
    bit; Muon within _kahan_near's tolerance (measured: equal)."""
    _kahan_adamw_dcp(_ok(results, "kahan-dcp-fsdp-to-tp-adamw"), SHARDED["fsdp"], SHARDED["tp"])
    r = _ok(results, "kahan-dcp-fsdp-to-tp-muon")
    _kahan_dcp(r, "muon", SHARDED["fsdp"], SHARDED["tp"])
    _kahan_near(r["final"], _kahan_one_process("muon", KAHAN_STEPS), KAHAN_STEPS)


@pytest.mark.parametrize("case", ["fsdp-muon", "tp-shampoo", *KAHAN_MORE_DCP])
def test_kahan_resume_through_dcp_equals_uninterrupted_run(results, case):
    """Muon (FSDP2), Shampoo (TP), ADOPT (FSDP2), SophiaG (TP) and LAMB (FSDP2) saved after 2
    steps and resumed on the same placement: every rank's states (compensations, moments,
    SophiaG's Hessian estimate, Shampoo's block statistics and roots) back bit for bit, the
    compensations nonzero and placed as their params, and the continued run's params and every
    state entry those of the uninterrupted run on the same placement (the steps case), bit for
    bit: LAMB too, whose all-reduced norms are summed in the same order in both runs (its
    tolerance in test_kahan_on_shards_equals_one_process is for one process's other order)."""
    placement, optimizer = case.split("-")
    r = _ok(results, f"kahan-dcp-{case}")
    _same_states(r["saved"], r["loaded"])
    _kahan_dcp(r, optimizer, SHARDED[placement], SHARDED[placement])
    uninterrupted = _ok(results, f"kahan-{case}")
    for name, w in uninterrupted["params"].items():
        assert torch.equal(r["params"][name], w), name
    _same_states(uninterrupted["ranks"], r["final"])


SHAMPOO_BLOCKS = ("left", "right", "left_root", "right_root")


def _blocks(ranks: list, name: str) -> dict:
    """Shampoo's block statistics and roots of parameter ``name`` ("left.<k>", ...), whole, from
    every rank's local states: a sharded matrix's block k lives on its owner (the other ranks
    hold an empty placeholder), a plain matrix's on every rank that steps it (equal copies)."""
    out: dict = {}
    for mine in ranks:
        for k, v in mine[name]["state"].items():
            if k.split(".")[0] in SHAMPOO_BLOCKS and v.numel():
                assert k not in out or torch.equal(out[k], v), (name, k)  # copies agree
                out[k] = v
    return out


def _same_blocks_loaded(r: dict) -> None:
    """Every block statistic and root of a Shampoo DCP scenario ``r`` came back as saved, all of
    them (as many as _block_entries counts)."""
    blocks = 0
    for name in r["params"]:
        before, after = _blocks(r["saved"], name), _blocks(r["loaded"], name)
        assert before.keys() == after.keys(), name
        for k in before:
            assert torch.equal(before[k], after[k]), (name, k)
        blocks += len(before)
    assert blocks == _block_entries(r["params"])


def _block_entries(params: dict) -> int:
    """How many block entries (L, R and their roots) Shampoo keeps for ``params``, all ranks together."""
    from mupopt.optim._placement import matrix_shape
    from mupopt.optim.shampoo import blocks_of

    side = dw.optimizer_args("shampoo")[1]["max_preconditioner_dim"]
    return sum(4 * len(blocks_of(*matrix_shape(w.shape), side)) for w in params.values() if w.ndim >= 2)


def test_kahan_shampoo_dcp_reshards_tp_to_fsdp(results):
    """Shampoo saved on TP after 2 steps (fc1 and fc2 sharded, their blocks on owners; the
    embedding and readout plain on every rank) and resumed on FSDP2 (every matrix sharded,
    the blocks on other owners): the params, compensations, momenta and second moments come
    back whole bit for bit (_kahan_dcp), and every block's statistics and roots too; the
    continued run equals the uninterrupted one-process run within _kahan_near's tolerance."""
    r = _ok(results, "kahan-dcp-tp-to-fsdp-shampoo")
    _kahan_dcp(r, "shampoo", SHARDED["tp"], SHARDED["fsdp"])
    _same_blocks_loaded(r)
    assert _kahan_near(r["final"], _kahan_one_process("shampoo", KAHAN_STEPS), KAHAN_STEPS) > 0


def test_kahan_state_memory_of_a_shard():
    """state_memory() counts a DTensor param's local compensation (2 bytes per local element of
    a bf16 param), before its first step as after."""
    import mupopt
    from torch.distributed.tensor import Shard, distribute_tensor

    with dw.one_rank_mesh() as mesh:
        w = torch.nn.Parameter(distribute_tensor(torch.randn(40, 30).bfloat16(), mesh, [Shard(0)]))
        opt = mupopt.AdamW([w], lr=1e-2, kahan_summation=True, backend="reference")
        want = 3 * 40 * 30 * 2 + 4  # exp_avg, exp_avg_sq, compensation in bf16; the float32 step
        assert opt.state_memory() == want
        w.grad = distribute_tensor(torch.randn(40, 30).bfloat16(), mesh, [Shard(0)])
        opt.step()
        c = opt.state[w]["param_compensation"]
        assert c.placements == w.placements and c.to_local().shape == w.to_local().shape
        assert opt.state_memory() == want


def test_kahan_fsdp_tp_2d_equals_one_process_and_resumes(results_2d):
    """The same on the (2, 2) mesh (TP's dims _StridedShard under FSDP2): every compensation
    placed as its param, one process's params and compensations bit for bit, DCP bit-exact."""
    r = _ok(results_2d, "kahan-dcp-fsdp+tp-adamw")
    _same_states(r["saved"], r["loaded"])
    _kahan_adamw_dcp(r, SHARDED["fsdp+tp"], SHARDED["fsdp+tp"])


def test_kahan_dcp_reshards_from_2d_to_1d_mesh(results_2d):
    """Saved on the (2, 2) mesh under FSDP2 + TP, resumed under FSDP2 on a 1-D mesh of 4 (every
    param cut into other shards): the compensations reshard with their params, and the
    continued run equals one process's, params and compensations bit for bit."""
    _kahan_adamw_dcp(_ok(results_2d, "kahan-dcp-fsdp+tp-to-fsdp-adamw"), SHARDED["fsdp+tp"], SHARDED["fsdp"])


def test_kahan_shampoo_fsdp_tp_2d_equals_one_process_and_resumes(results_2d):
    """Shampoo with compensated params on the (2, 2) mesh (fc1's and fc2's blocks assembled by
    their owners from _StridedShard shards): every compensation placed as its param, and after 4
    steps p + c within _kahan_near's tolerance of one process stepping whole tensors (measured:
    p equal, p + c apart by at most 2.8e-7 of the largest |p|, on the embedding: one spacing of
    its c).
    Saved after 2 steps and resumed on the same mesh: every rank's states (compensations, nonzero;
    momenta, second moments) back bit for bit, every block's statistics and roots too, and the
    continued run's params and states those of the uninterrupted run, bit for bit."""
    r = _ok(results_2d, "kahan-fsdp+tp-shampoo")
    _kahan_placed(r["ranks"], SHARDED["fsdp+tp"])
    assert _kahan_near(r["ranks"], _kahan_one_process("shampoo", KAHAN_STEPS), KAHAN_STEPS) > 0
    d = _ok(results_2d, "kahan-dcp-fsdp+tp-shampoo")
    _same_states(d["saved"], d["loaded"])
    _kahan_dcp(d, "shampoo", SHARDED["fsdp+tp"], SHARDED["fsdp+tp"])
    _same_blocks_loaded(d)
    for name, w in r["params"].items():
        assert torch.equal(d["params"][name], w), name
    _same_states(r["ranks"], d["final"])


@pytest.mark.parametrize("fixture,case", [("results", "fsdp-adamw"), ("results", "fsdp-muon"), ("results", "tp-shampoo"),
                                          ("results_2d", "fsdp+tp-adamw")])
def test_kahan_dcp_resumes_on_one_process(request, fixture, case):
    """A checkpoint of 2 ranks (FSDP2: AdamW, Muon; TP: Shampoo) or 4 (FSDP2 + TP, AdamW), saved
    after 2 steps, loaded here in one process (another world size: every compensation a plain
    tensor, whole): the params and compensations are the saved ones, bit for bit (Shampoo's
    block statistics and roots too, gathered here from their owners), and the run continues as
    the uninterrupted one-process run: AdamW bit for bit, Muon and Shampoo within _kahan_near's
    tolerance."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    results = request.getfixturevalue(fixture)
    r = _ok(results, f"kahan-dcp-{case}")
    optimizer = case.split("-")[1]
    model = dw.make_model(seed=1, mup=MUP8.get(optimizer, False)).to(torch.bfloat16)
    opt = dw.make_optimizer(optimizer, model.parameters(), "reference", **KAHAN, **KAHAN_OPTIONS.get(optimizer, {}))
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    ckpt = {"adamw": "ckpt-kahan", "muon": "ckpt-kahan-muon", "shampoo": "ckpt-kahan-shampoo"}[optimizer]
    dcp.load(state, checkpoint_id=str(results["_tmp"] / ckpt))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    blocks = 0
    for name, p in model.named_parameters():
        want_p, want_c = _kahan_whole(r["saved"], name, p.shape)
        c = opt.state[p]["param_compensation"]
        assert not isinstance(c, torch.distributed.tensor.DTensor) and c.dtype == torch.bfloat16, name
        assert torch.equal(p.detach().float(), want_p) and torch.equal(c.float(), want_c), name
        for k, v in _blocks(r["saved"], name).items():
            key, block = k.split(".")
            assert torch.equal(opt.state[p][key][int(block)], v), (name, k)
            blocks += 1
    assert blocks == (_block_entries(r["params"]) if optimizer == "shampoo" else 0)
    for t in range(2, KAHAN_STEPS):
        dw.feed_grads(model, t)
        dw.step_once(opt, optimizer, t)
    want = _kahan_one_process(optimizer, KAHAN_STEPS)
    if optimizer == "adamw":
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), want[name][0]), name
            assert torch.equal(opt.state[p]["param_compensation"], want[name][1]), name
    else:
        here = [{n: {"index": torch.arange(p.numel()).view(p.shape), "param": p.detach(),
                     "state": {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}}
                 for n, p in model.named_parameters()}]
        assert _kahan_near(here, want, KAHAN_STEPS) > 0
