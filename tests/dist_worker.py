"""What each rank of tests/test_distributed.py (world size 2) and tests/test_distributed_2d.py
(world size 4, 2-D meshes) runs, gloo on the CPU.

One process group serves every scenario of a test module (starting ranks costs seconds).
A scenario builds the same small model as the single-process run of the test, places it
(FSDP2, tensor parallel, both, HSDP or DDP), sets muP up in the README order (set_base_shapes before the
sharding, optimizer after), steps it, and returns the full parameters (gathered) and what the
test asks for. Rank 0 saves the results for the test process to compare.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import tempfile
import traceback
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

VOCAB, WIDTH, BASE = 16, 16, 8


def spawn(world: int, specs: list, out, env: dict) -> dict:
    """Runs ``specs`` on ``world`` gloo ranks (processes spawned here) and returns rank 0's
    results. The ranks meet through a file next to ``out`` (torch's FileStore), not a TCP port:
    a port picked free and bound later by the workers can be taken in between by another test's
    spawn (pytest-xdist runs several files at once)."""
    store = f"{out}.store"
    if os.path.exists(store):
        os.remove(store)  # FileStore needs a new file per group
    torch.multiprocessing.spawn(worker, args=(world, store, specs, str(out), env), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


@contextlib.contextmanager
def one_rank_mesh(device: str = "cpu", backend: str = "gloo"):
    """A world-size-1 process group (its store a file in a new temporary folder, as spawn's; an
    existing group is used as it is) and its 1-D device mesh, for single-process tests of
    DTensor paths."""
    from torch.distributed.device_mesh import init_device_mesh

    created = not dist.is_initialized()
    with tempfile.TemporaryDirectory() as folder:
        if created:
            dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            yield init_device_mesh(device, (1,))
        finally:
            if created:
                dist.destroy_process_group()


STEPS = 10


class Net(nn.Module):
    """Embedding, residual MLP blocks (fc1, fc2; then fc3, fc4 with blocks=2), a norm and a
    readout: every muP role. Sides of 16 and 32: Shampoo's blocks of 12 (make_optimizer) cut
    them where no shard ends."""

    def __init__(self, d: int = WIDTH, vocab: int = VOCAB, blocks: int = 1):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = blocks
        for b in range(blocks):
            setattr(self, f"fc{2 * b + 1}", nn.Linear(d, 2 * d))
            setattr(self, f"fc{2 * b + 2}", nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def mlps(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, f"fc{2 * b + 1}"), getattr(self, f"fc{2 * b + 2}")) for b in range(self.blocks)]

    def forward(self, x):
        h = self.emb(x)
        for up, down in self.mlps():
            h = h + down(torch.relu(up(h)))
        return self.out(self.norm(h))


def make_model(seed: int = 0, mup: bool = True, blocks: int = 1, width: int = WIDTH) -> Net:
    import mupopt

    torch.manual_seed(seed)
    model = Net(width, blocks=blocks)
    if mup:
        with torch.device("meta"):
            base = Net(BASE, blocks=blocks)
        mupopt.set_base_shapes(model, base)
    return model


def grad_for(step: int, name: str, shape) -> torch.Tensor:
    """The global gradient of parameter ``name`` at ``step`` (the same on every rank)."""
    gen = torch.Generator().manual_seed(1000 * step + sum(map(ord, name)))
    return torch.randn(shape, generator=gen) * 0.1


def optimizer_args(name: str, backend: str = "auto", **options):
    """(class, keyword arguments) of each optimizer as the distributed tests configure it;
    ``options`` override its hyperparameters (a spec's "options")."""
    import mupopt

    table = {
        "adamw": (mupopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        "adopt": (mupopt.ADOPT, dict(lr=1e-2, weight_decay=0.1)),
        "lamb": (mupopt.LAMB, dict(lr=1e-2, weight_decay=0.1)),
        "sophia": (mupopt.SophiaG, dict(lr=1e-2, weight_decay=0.1, rho=0.04)),
        "muon": (mupopt.Muon, dict(lr=2e-2, ns_dtype=torch.float32, adamw_lr=1e-2)),
        # Blocks of 12 on sides of 16 and 32: no block boundary is a shard boundary (2 or 4 ranks).
        "shampoo": (mupopt.Shampoo, dict(lr=1e-2, betas=(0.9, 0.99), epsilon=1e-6, max_preconditioner_dim=12,
                                         grafting="adam")),
    }
    if name not in table:
        raise ValueError(name)
    cls, kwargs = table[name]
    return cls, {**kwargs, **options, "backend": backend}


def make_optimizer(name: str, params, backend: str, **options):
    cls, kwargs = optimizer_args(name, backend, **options)
    return cls(params, **kwargs)


def feed_grads(model: nn.Module, step: int) -> None:
    """p.grad = this step's global gradient, as a DTensor with p's placements where p is one."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = grad_for(step, name, p.shape).to(p.dtype)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


def step_once(opt, name: str, step: int) -> None:
    if name == "sophia":
        if step % 3 == 0:
            opt.update_hessian()
        opt.step(bs=64)
    else:
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def place(model: nn.Module, placement: str):
    """Shard ``model`` in place (set_base_shapes already ran: the README order). 1-D meshes over
    the world: "fsdp", "tp", "ddp"; "hsdp" on a (1, world) mesh. 2-D meshes of shape
    (2, world // 2): "fsdp+tp" (TP on "tp", then FSDP2 on "dp": the dims TP split become
    _StridedShard) and "hsdp-2d" (replicate x shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    name = {m: n for n, m in model.named_children()}
    tp_plan = {}
    for up, down in model.mlps():
        tp_plan[name[up]], tp_plan[name[down]] = ColwiseParallel(), RowwiseParallel()
    if placement == "hsdp":  # a 2-D mesh at 2 ranks (replicate x shard, the replicate dim of size 1)
        fully_shard(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("rep", "shard")))
    elif placement == "hsdp-2d":
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("rep", "shard"))
        for up, down in model.mlps():
            fully_shard(up, mesh=mesh2)
            fully_shard(down, mesh=mesh2)
        fully_shard(model, mesh=mesh2)
    elif placement == "fsdp+tp":
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh2["tp"], tp_plan)
        for up, down in model.mlps():
            fully_shard(up, mesh=mesh2["dp"])
            fully_shard(down, mesh=mesh2["dp"])
        fully_shard(model, mesh=mesh2["dp"])
    elif placement == "fsdp":
        for up, down in model.mlps():
            fully_shard(up, mesh=mesh)
            fully_shard(down, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif placement == "tp":
        parallelize_module(model, mesh, tp_plan)
    elif placement == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        raise ValueError(placement)
    return model


def build(spec: dict, *, seed: int = 0, mup: bool = True, placement: str | None = None, options: dict | None = None):
    """The scenario's (model, placed model, optimizer): make_model with spec["blocks"],
    spec["width"], spec["mup"] (default ``mup``), cast to spec["dtype"] if given, placed under
    ``placement`` (default spec["placement"]), the optimizer with ``options`` (default
    spec["options"])."""
    model = make_model(seed=seed, blocks=spec.get("blocks", 1), width=spec.get("width", WIDTH), mup=spec.get("mup", mup))
    if "dtype" in spec:
        model.to(getattr(torch, spec["dtype"]))
    placed = place(model, placement or spec["placement"])
    options = spec.get("options", {}) if options is None else options
    return model, placed, make_optimizer(spec["optimizer"], placed.parameters(), spec["backend"], **options)


def fed_steps(model: nn.Module, opt, name: str, steps: range) -> None:
    for t in steps:
        feed_grads(model, t)
        step_once(opt, name, t)


def scenario_steps(spec: dict) -> dict:
    """Fed gradients: the optimizer alone under a placement, STEPS steps."""
    model, placed, opt = build(spec)
    out = {"mults": [str(m) for g in opt.param_groups for m in opt.group_multipliers(g)]}
    if spec["optimizer"] == "shampoo":  # the local shapes, for the lr rule's test
        out["local_shapes"] = {n: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
                               for n, p in model.named_parameters()}
    fed_steps(model, opt, spec["optimizer"], range(STEPS))
    out["params"] = full_params(model)
    out["selected"] = opt.selected_backends
    if spec["optimizer"] == "muon":
        seg = [s for plan in opt._plan_cache.values() for s in plan.segments if s.kernel == "muon"]
        hooks = [h for h in (s.collectives.get("orthogonalize") for s in seg) if h is not None]
        out["ns_flops"] = all_ranks(sum(h.flops for h in hooks))  # the last step's, every rank's
        out["ns_calls"] = sum(h.calls for h in hooks)
    if spec["optimizer"] == "shampoo":
        hooks = [s.collectives["precondition"] for plan in opt._plan_cache.values() for s in plan.segments
                 if "precondition" in s.collectives]
        # The last step's (every root is due at every step): every rank's roots and their cost.
        out["roots"] = all_ranks(sum(h.roots for h in hooks))
        out["root_cost"] = all_ranks(sum(h.root_cost for h in hooks))
        out["root_calls"] = sum(h.calls for h in hooks)
        out["memory"] = all_ranks(opt.preconditioner_memory())
    if spec["optimizer"] == "lamb":
        seg = [s for plan in opt._plan_cache.values() for s in plan.segments]
        out["norm_calls"] = sum(s.collectives["norm_reduce"].calls for s in seg if "norm_reduce" in s.collectives)
    return out


@contextlib.contextmanager
def min_8bit(spec: dict):
    """spec["min_8bit"]: format 8's size threshold for the scenario (the test models are small)."""
    from mupopt.optim import _lean_states as lean

    saved = lean.MIN_8BIT_SIZE
    lean.MIN_8BIT_SIZE = spec.get("min_8bit", saved)
    try:
        yield
    finally:
        lean.MIN_8BIT_SIZE = saved


def local_index(p) -> torch.Tensor:
    """Which elements of the global tensor (row-major indices) this rank's shard of ``p`` holds,
    shaped like the shard, as DTensor itself cuts them (the whole tensor for a plain one)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    index = torch.arange(p.numel()).view(p.shape)
    if not isinstance(p, DTensor):
        return index
    return distribute_tensor(index, p.device_mesh, p.placements, src_data_rank=None).to_local()


def scenario_lean_steps(spec: dict) -> dict:
    """Fed gradients, spec["steps"] steps (default 3), no muP unless spec["mup"]: the full params,
    every rank's local_states and the backends the steps ran on."""
    with min_8bit(spec):
        model, _, opt = build(spec, mup=False)
        fed_steps(model, opt, spec["optimizer"], range(spec.get("steps", 3)))
        return {"params": full_params(model), "ranks": all_ranks(local_states(model, opt)),
                "selected": opt.selected_backends}


def local_states(model: nn.Module, opt) -> dict:
    """{name: {"index": local_index(p), "state": p's state, "param": p, "placed": keys}}, each
    tensor this rank's local shard, cloned; a list of tensors (Shampoo's block statistics and
    roots, by block) as one entry per item, "<key>.<k>"; "placed": the state entries that are
    DTensors placed as p is (mesh and placements)."""
    from torch.distributed.tensor import DTensor

    def local(v):
        return (v.to_local() if isinstance(v, DTensor) else v).clone()

    out = {}
    for name, p in model.named_parameters():
        state = opt.state.get(p, {})
        st = {k: local(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
        st.update({f"{k}.{i}": local(x) for k, v in state.items() if isinstance(v, list)
                   for i, x in enumerate(v) if isinstance(x, torch.Tensor)})
        placed = {k for k, v in state.items() if isinstance(v, DTensor) and isinstance(p, DTensor)
                  and v.device_mesh == p.device_mesh and v.placements == p.placements}
        mine = p.to_local() if isinstance(p, DTensor) else p
        out[name] = {"index": local_index(p), "state": st, "param": mine.detach().clone(), "placed": placed}
    return out


def scenario_sr_shards(spec: dict) -> dict:
    """Stochastic rounding on FSDP2 shards that hold equal values: one bf16 weight made of two
    copies of one block (rank 0 holds one, rank 1 the other), equal gradients, ranks seeding
    torch apart (their seeds must still agree). Two steps with spec["options"]; every rank's
    local weight and state["sr_seed"]."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    import mupopt

    with min_8bit({"min_8bit": 256, **spec}):
        torch.manual_seed(0)
        half = torch.randn(8, 64) * 0.1  # bfloat16 steps of 2^-11 or less: an update of ~1e-3 falls between
        model = nn.Linear(64, 16, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.cat([half, half]))
        model.to(torch.bfloat16)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        fully_shard(model, mesh=mesh)
        torch.manual_seed(100 + dist.get_rank())
        opt = mupopt.AdamW(model.parameters(), lr=1e-3, **spec["options"])
        g = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
        for _ in range(2):
            model.weight.grad = distribute_tensor(torch.cat([g, g]).bfloat16(), mesh, [Shard(0)])
            opt.step()
        st = opt.state[model.weight]
        return {"local": all_ranks(model.weight.to_local().detach().clone()), "seeds": all_ranks(st["sr_seed"]),
                "quantized": "exp_avg_absmax" in st}


def scenario_train(spec: dict) -> dict:
    """Forward/backward on a global batch split over the ranks (README order for muP)."""
    model = make_model(mup=spec.get("mup", True))
    placed = place(model, spec["placement"])
    opt = make_optimizer(spec["optimizer"], placed.parameters(), spec["backend"])
    rank, world = dist.get_rank(), dist.get_world_size()
    for t in range(5):
        gen = torch.Generator().manual_seed(t)
        x = torch.randint(0, VOCAB, (8, 6), generator=gen)
        y = torch.randint(0, VOCAB, (8, 6), generator=gen)
        if spec["placement"] != "tp":  # data parallel: each rank its half of the batch
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        logits = placed(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        loss.backward()
        step_once(opt, spec["optimizer"], t)
        opt.zero_grad()
    return {"params": full_params(model)}


def state_dict_options(spec: dict):
    """spec["flatten"]: DCP's flatten_optimizer_state_dict layout (state and groups per parameter)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=spec.get("flatten", False))


def _dcp_save(spec: dict) -> dict:
    """spec["save_at"] (default 5) fed steps under spec["placement"], then a DCP save to
    spec["path"]. spec["width"], spec["min_8bit"]: the model's width and format 8's threshold."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with min_8bit(spec):
        model, placed, opt = build(spec)
        fed_steps(model, opt, spec["optimizer"], range(spec.get("save_at", 5)))
        msd, osd = get_state_dict(placed, opt, options=state_dict_options(spec))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=spec["path"])
        if spec.get("full"):
            _full_save(placed, opt, spec["path"] + ".full.pt")
        return local_states(model, opt)


def _full_save(placed: nn.Module, opt, path: str) -> None:
    """The other way to checkpoint: get_state_dict(full_state_dict=True, cpu_offload=True), rank 0
    saves the whole tensors with torch.save (a single process loads them with load_state_dict).
    A failure is saved instead, as its traceback, for the test to show."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    try:
        msd, osd = get_state_dict(placed, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        saved = {"model": msd, "optim": osd}
    except Exception:  # noqa: BLE001 - reported to the test
        saved = traceback.format_exc()
    if dist.get_rank() == 0:
        torch.save(saved, path)


def _dcp_resume(spec: dict) -> dict:
    """Load spec["path"] into a fresh model and optimizer (other initial values, not stepped)
    under spec["resume_placement"] (default: the saving placement) and spec["resume_options"]
    (default: the saving options), continue to spec["steps"] (default STEPS) steps. The full
    params, this rank's local_states as loaded ("loaded") and after the steps ("final"), and the
    backends the continued steps ran on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    with min_8bit(spec):
        # Other initial values (seed 1): the checkpoint must bring them.
        model, placed, opt = build(spec, seed=1, placement=spec.get("resume_placement"),
                                   options=spec.get("resume_options"))
        msd, osd = get_state_dict(placed, opt, options=state_dict_options(spec))
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=spec["path"])
        set_state_dict(placed, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=state_dict_options(spec))
        loaded = local_states(model, opt)
        fed_steps(model, opt, spec["optimizer"], range(spec.get("save_at", 5), spec.get("steps", STEPS)))
        return {"params": full_params(model), "loaded": loaded, "final": local_states(model, opt),
                "selected": opt.selected_backends}


def scenario_dcp(spec: dict) -> dict:
    """Save after 5 fed steps through DCP, resume in the same process group, continue 5 steps."""
    saved = _dcp_save(spec)
    out = _dcp_resume(spec)
    if spec.get("states"):  # every rank's local states as saved, as loaded and at the end
        out["saved"], out["loaded"], out["final"] = all_ranks(saved), all_ranks(out["loaded"]), all_ranks(out["final"])
    else:
        del out["loaded"], out["final"]
    return out


def scenario_dcp_save(spec: dict) -> dict:
    """The save half alone: another world size resumes it (scenario "dcp_resume")."""
    _dcp_save(spec)
    return {}


def scenario_dcp_resume(spec: dict) -> dict:
    out = _dcp_resume(spec)
    del out["loaded"], out["final"]
    return out


def _snapshot(model: nn.Module, opt) -> list:
    """Every rank's local params and optimizer state, cloned."""
    def local(v):
        return v.to_local() if hasattr(v, "to_local") else v

    out = [local(p).detach().clone() for p in model.parameters()]
    for st in opt.state.values():
        for key, v in st.items():
            if key == "mup":  # the width record: numbers, compared as a value
                out.append(v)
                continue
            out += [local(x).clone() for x in (v if isinstance(v, list) else [v])]
    return out


def scenario_shampoo_failure(spec: dict) -> dict:
    """Shampoo under spec["placement"], two param groups (the first MLP block, the rest): 2 fed
    steps; then step 3 twice with a failure on rank spec["fail_rank"] only: its inverse roots
    raise (in the first group, whose blocks every rank owns some of: that rank must still take
    part in the second group's exchange), then its shard of fc1's gradient holds a nan. Every
    rank must raise and keep its params and state as they were. Then step 3 again, without
    failure. Returns every rank's errors and whether it was untouched, and the params."""
    import mupopt.optim.shampoo as shampoo
    from mupopt.linalg import RootComputationError

    model = make_model(blocks=spec.get("blocks", 1))
    placed = place(model, spec["placement"])
    first = [p for n, p in model.named_parameters() if n.startswith(("fc1.", "fc2."))]
    rest = [p for n, p in model.named_parameters() if not n.startswith(("fc1.", "fc2."))]
    opt = make_optimizer("shampoo", [{"params": first}, {"params": rest}], spec["backend"])
    for t in range(2):
        feed_grads(model, t)
        opt.step()
    before = _snapshot(model, opt)
    failing = dist.get_rank() == spec["fail_rank"]
    errors, untouched = {}, {}

    def refuse(*args, **kwargs):
        raise RootComputationError("injected: this rank's root fails")

    for case in ("root", "nan"):
        feed_grads(model, 2)
        real = shampoo.inverse_root_eigh
        if failing and case == "root":
            shampoo.inverse_root_eigh = refuse
        if failing and case == "nan":
            model.fc1.weight.grad.to_local()[0, 0] = float("nan")
        try:
            opt.step()
            errors[case] = None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            errors[case] = f"{type(exc).__name__}: {exc}"
        finally:
            shampoo.inverse_root_eigh = real
        untouched[case] = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(before, _snapshot(model, opt)))
    feed_grads(model, 2)
    opt.step()
    return {"errors": all_ranks(errors), "untouched": all_ranks(untouched), "params": full_params(model)}


def placements_of(spec: Sequence[str]) -> list:
    """Placements from short names: "R", "S<dim>", "SS<dim>/<split_factor>" (_StridedShard),
    "P" (Partial)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    out = []
    for s in spec:
        if s == "R":
            out.append(Replicate())
        elif s == "P":
            out.append(Partial())
        elif s.startswith("SS"):
            dim, sf = s[2:].split("/")
            out.append(_StridedShard(int(dim), split_factor=int(sf)))
        else:
            out.append(Shard(int(s[1:])))
    return out


def mesh_2d():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("dp", "tp"))


def all_ranks(value) -> list:
    """``value`` of every rank, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def scenario_geometry(spec: dict) -> dict:
    """For each (shape, placements, src) of spec["cases"] on the 2-D mesh: whether DTensor's own
    distribution of an index tensor (scattered from rank src; cut locally where src is None)
    gives this rank the elements of the placement layer's block, on every rank."""
    from torch.distributed.tensor import distribute_tensor

    from mupopt.optim._placement import shard_block

    mesh = mesh_2d()
    agree = []
    for shape, names, src in spec["cases"]:
        placements = placements_of(names)
        index = torch.arange(math.prod(shape)).view(shape)
        got = distribute_tensor(index, mesh, placements, src_data_rank=src).to_local()
        block = shard_block(shape, placements, tuple(mesh.shape), mesh.get_coordinate())
        agree.append(got.shape == block.shape and torch.equal(got, block.read(index)))
    return {"agree": all_ranks(agree)}


def scenario_orthogonalize(spec: dict) -> dict:
    """Muon's exchange alone on matrices of spec["cases"] ((shape, placements, mesh: "2d", its
    "dp" sub-mesh, or the (2, 1) sub-mesh "b,c" of a (2, 2, 1) mesh)): uneven, empty, replicated
    and strided shards, three process groups.
    Returns the whole results, every rank's NS flops and collectives, and what every rank got."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from mupopt.linalg import newton_schulz
    from mupopt.optim._placement import Orthogonalize

    from torch.distributed.device_mesh import init_device_mesh

    mesh = mesh_2d()
    meshes = {"2d": mesh, "dp": mesh["dp"],
              "b,c": init_device_mesh("cpu", (2, dist.get_world_size() // 2, 1), mesh_dim_names=("a", "b", "c"))["b", "c"]}
    params = []
    for k, (shape, names, where) in enumerate(spec["cases"]):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(k))
        # Cut locally (every rank has `full`): torch's scatter refuses uneven _StridedShard.
        params.append(distribute_tensor(full, meshes[where], placements_of(names), src_data_rank=None))
    hook = Orthogonalize(params)
    out = hook([p.to_local() for p in params], lambda X: newton_schulz(X, 5, dtype=torch.float32, check_finite=False), 5)
    whole = [DTensor.from_local(o, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
             for o, p in zip(out, params)]
    return {"whole": whole, "flops": all_ranks(hook.flops), "calls": all_ranks(hook.calls)}


def scenario_exchange_blocks(spec: dict) -> dict:
    """The exchange alone with Shampoo's regions: blocks of side spec["side"] of the matrices of
    spec["cases"] (as scenario_orthogonalize's), owners spread over each group. Per case and
    rank: whether each owner assembled its blocks (and the norm of a second tensor's block)
    exactly, and whether each rank got back exactly its pieces of the owners' results."""
    from torch.distributed.tensor import distribute_tensor

    from mupopt.optim._placement import Exchange, ExchangeItem, balance, matrix_shape, mesh_group
    from mupopt.optim.shampoo import blocks_of
    from torch.distributed.device_mesh import init_device_mesh

    mesh = mesh_2d()
    meshes = {"2d": mesh, "dp": mesh["dp"],
              "b,c": init_device_mesh("cpu", (2, dist.get_world_size() // 2, 1), mesh_dim_names=("a", "b", "c"))["b", "c"]}
    out = []
    for k, (shape, names, where) in enumerate(spec["cases"]):
        full = torch.randn(shape, generator=torch.Generator().manual_seed(k))
        p = distribute_tensor(full, meshes[where], placements_of(names), src_data_rank=None)
        group = mesh_group(p.device_mesh, "test")
        rows, cols = matrix_shape(shape)
        blocks = blocks_of(rows, cols, spec["side"])
        owners = balance([1.0] * len(blocks), [0.0] * dist.get_world_size(group))
        ex = Exchange(group, [ExchangeItem(0, shape, tuple(p.placements), p.device_mesh, (rs.start, rs.stop), (cs.start, cs.stop), r)
                              for (rs, cs), r in zip(blocks, owners)], "test")
        mine = p.to_local().reshape(ex.local_shape[0])
        whole, norms = ex.gather({0: mine}, torch.float32, "cpu", norms_of={0: 3 * mine})
        full2d = full.reshape(rows, cols)
        ok = all(torch.equal(w, full2d[blocks[j][0], blocks[j][1]]) and torch.allclose(
            norms[j], torch.linalg.matrix_norm(3 * full2d[blocks[j][0], blocks[j][1]]), rtol=1e-6) for j, w in whole.items())
        back = ex.scatter({j: 2 * w for j, w in whole.items()}, torch.float32, "cpu")
        out.append(ok and torch.equal(back[0], 2 * mine))
    return {"ok": all_ranks(out)}


def scenario_refuse(spec: dict) -> dict:
    """A parameter with a placement the placement layer does not step (spec["placements"] on
    the 2-D mesh): each optimizer's first step must raise; the messages and whether the
    parameter stayed as it was."""
    from torch.distributed.tensor import DTensor

    import mupopt

    mesh = mesh_2d()
    placements = placements_of(spec["placements"])
    out = {}
    for name, cls in [("adamw", mupopt.AdamW), ("lamb", mupopt.LAMB), ("muon", mupopt.Muon)]:
        local = torch.randn(8, 8, generator=torch.Generator().manual_seed(dist.get_rank()))
        p = nn.Parameter(DTensor.from_local(local.clone(), mesh, placements, run_check=False))
        p.grad = DTensor.from_local(torch.ones(8, 8), mesh, placements, run_check=False)
        opt = cls([p], lr=1e-2)
        try:
            opt.step()
            out[name] = (None, False)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[name] = (f"{type(exc).__name__}: {exc}", torch.equal(p.to_local(), local) and not opt.state)
    return out


def zero_step(opt, name: str, step: int) -> None:
    """One step of a ZeroRedundancyOptimizer: SophiaG's Hessian update runs on the local
    optimizer (the rank's own parameters), then ZeRO steps it and broadcasts the parameters."""
    if name == "sophia":
        if step % 3 == 0:
            opt.optim.update_hessian()
        opt.step(bs=64)
    else:
        opt.step()


def scenario_zero(spec: dict) -> dict:
    """torch.distributed.optim.ZeroRedundancyOptimizer over a mupopt class: 5 fed steps,
    consolidate_state_dict, rank 0 saves (torch.save), every rank loads it into a fresh model and
    ZeRO optimizer (without width information unless spec["mup_at_resume"]: the records must come
    from the checkpoint) and continues 5 steps. spec["options"], spec["min_8bit"]: the
    optimizer's options over optimizer_args', format 8's size threshold."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    with min_8bit(spec):
        return _zero_resume(spec, ZeroRedundancyOptimizer)


def _zero_local_state(model: nn.Module, opt) -> dict:
    """This rank's local optimizer state (its partition of ZeRO's parameters), by the index of
    each parameter in model.parameters(), tensors cloned."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {index[id(p)]: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for p, st in opt.optim.state.items()}


def _zero_resume(spec: dict, ZeroRedundancyOptimizer) -> dict:
    """spec["dtype"]: both models cast to it (bf16 params, for kahan_summation or
    stochastic_rounding). Returns the resumed run's params, the consolidated checkpoint
    ("saved"), every rank's local state as loaded ("loaded": before ZeRO's first step), and with
    spec["uninterrupted"] the params of the first optimizer continued to STEPS without the
    checkpoint ("uninterrupted": seeds drawn by the ranks make a single process another run)."""
    name, path = spec["optimizer"], spec["path"]
    cls, kwargs = optimizer_args(name, spec["backend"], **spec.get("options", {}))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = make_model().to(dtype)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
    for t in range(5):
        feed_grads(model, t)
        zero_step(opt, name, t)
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    model2 = make_model(seed=1, mup=spec.get("mup_at_resume", False)).to(dtype)
    ckpt = torch.load(path, weights_only=True)
    saved = torch.load(path, weights_only=True)["optim"]  # ZeRO's load_state_dict edits the dict it gets
    model2.load_state_dict(ckpt["model"])
    opt2 = ZeroRedundancyOptimizer(model2.parameters(), optimizer_class=cls, **kwargs)
    opt2.load_state_dict(ckpt["optim"])
    out = {"saved": saved, "path": path, "loaded": all_ranks(_zero_local_state(model2, opt2))}
    for t in range(5, STEPS):
        feed_grads(model2, t)
        zero_step(opt2, name, t)
    out["params"], out["final"] = full_params(model2), all_ranks(_zero_local_state(model2, opt2))
    if spec.get("uninterrupted"):
        for t in range(5, STEPS):
            feed_grads(model, t)
            zero_step(opt, name, t)
        out["uninterrupted"] = full_params(model)
    return out


def scenario_zero_mismatch(spec: dict) -> dict:
    """A ZeRO checkpoint whose records were moved onto other parameters (one on each rank's
    partition, so both ranks fail alike): the first step after the load raises, naming the
    parameter. The error message of this rank."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, kwargs = optimizer_args(spec["optimizer"], "auto")
    model = make_model()
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kwargs)
    feed_grads(model, 0)
    zero_step(opt, spec["optimizer"], 0)
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        sd = opt.state_dict()
        index = {id(p): i for i, p in enumerate(model.parameters())}
        by_name = dict(model.named_parameters())
        for part in opt._partition_parameters():  # each rank's first (a matrix) gets norm.weight's record
            first = part[0]["params"][0]
            sd["state"][index[id(first)]]["mup"] = dict(sd["state"][index[id(by_name["norm.weight"])]]["mup"])
        torch.save(sd, spec["path"])
    dist.barrier()
    model2 = make_model(seed=1)  # with width information: the message names the parameter
    opt2 = ZeroRedundancyOptimizer(model2.parameters(), optimizer_class=cls, **kwargs)
    opt2.load_state_dict(torch.load(spec["path"], weights_only=True))
    feed_grads(model2, 1)
    try:
        zero_step(opt2, spec["optimizer"], 1)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(exc).__name__}: {exc}", "names": [n for n, _ in model.named_parameters()]}
    return {"error": None}


def scenario_torchtitan(spec: dict) -> dict:
    """torchtitan's optimizer container (mupopt.integrations.torchtitan) built after FSDP2, as
    torchtitan builds it: width information from the base-shapes file by name, of the global
    shapes; fed steps; the multipliers, parameters and records of the flattened state_dict."""
    from torchtitan.components.optimizer import ParamGroupConfig

    from mupopt.integrations.torchtitan import MupOptimizersContainer

    model = make_model(mup=False)
    place(model, "fsdp")
    cls, kwargs = optimizer_args(spec["optimizer"], "auto")
    kwargs.pop("backend")
    config = MupOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name=f"mupopt.{cls.__name__}", optimizer_kwargs=kwargs)],
        base_shapes=spec["bsh"],
    )
    container = config.build(model_parts=[model])
    (opt,) = container.optimizers
    out = {"mults": [str(m) for g in opt.param_groups for m in opt.group_multipliers(g)]}
    for t in range(STEPS):
        feed_grads(model, t)
        if spec["optimizer"] == "sophia":
            if t % 3 == 0:
                opt.update_hessian()
            opt.step(bs=64)
        else:
            container.step()
    out["params"] = full_params(model)
    out["records"] = {k: v for k, v in container.state_dict().items() if ".mup." in k}
    return out


SCENARIOS = {"steps": scenario_steps, "lean_steps": scenario_lean_steps, "sr_shards": scenario_sr_shards, "train": scenario_train, "dcp": scenario_dcp, "dcp_save": scenario_dcp_save,
             "dcp_resume": scenario_dcp_resume, "geometry": scenario_geometry, "orthogonalize": scenario_orthogonalize,
             "refuse": scenario_refuse, "exchange_blocks": scenario_exchange_blocks,
             "shampoo_failure": scenario_shampoo_failure,
             "zero": scenario_zero, "zero_mismatch": scenario_zero_mismatch, "torchtitan": scenario_torchtitan}


def worker(rank: int, world: int, store: str, specs: list, out_path: str, env: dict) -> None:
    os.environ.update(env)
    if env.get("TRITON_INTERPRET") == "1":
        import interpreter_speed

        interpreter_speed.install()  # test speed only: tests/interpreter_speed.py
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    from torch.distributed.checkpoint.api import CheckpointException

    results = {}
    try:
        for key, spec in specs:
            try:
                results[key] = SCENARIOS[spec["kind"]](spec)
            # DCP's CheckpointException is a BaseException: caught too, so that a failed load
            # fails its own test instead of killing the spawn.
            except (Exception, CheckpointException):  # noqa: BLE001 - the test shows it
                results[key] = {"failed": traceback.format_exc()}
            dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()
