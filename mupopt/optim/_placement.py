"""The placement layer: where a step meets distributed tensors (FSDP2, tensor parallelism).

Backends step plain tensors only (:func:`mupopt.backends.subclass_reason`); this module is the one
place that knows about DTensor placements. For a param group it turns every DTensor into its
local shard (params, gradients, state), keeps the muP multipliers of the *global* shape (the
optimizer computes them from ``p.shape``, which for a DTensor is global), and supplies the
collectives the math needs, batched per step:

- LAMB's trust ratio needs the norms of the whole tensor: the backend computes per-shard partial
  sums of squares for all tensors, and :class:`NormReduce` sums them over each tensor's shard
  mesh dimensions in one all-reduce per distinct process group (one in an FSDP2 run), not one
  per tensor.
- Muon orthogonalises whole matrices: :class:`Orthogonalize` sends each shard of a matrix to the
  rank that owns the matrix (one all-to-all for all matrices), the owner runs Newton-Schulz on
  the matrices it owns (about 1/world_size of the work, balanced by NS cost), and a second
  all-to-all returns each rank its block of the result. The scheme is the one of the published
  distributed Muon implementations that spread the NS work over ranks (Liu et al., "Muon is
  Scalable for LLM Training", arXiv 2502.16982, Sec. 3 "Distributed Muon"; torchtitan/Dion's
  gather-to-owner form): gathering every matrix on every rank, what DTensor does by itself when
  a matmul sees a sharded operand, would repeat all of the NS work on every rank.
- Shampoo preconditions the blocks of each rank's local shard (the scheme of DistributedShampoo's
  FSDP distributor, Shi et al. arXiv 2309.06497): statistics and roots need no communication and
  the root work is spread over the ranks by construction; the blocks are cut where the shard
  ends as well as every ``max_preconditioner_dim``.

Gradients whose placements differ from their parameter's (a Partial gradient of a replicated
tensor-parallel parameter) are redistributed to the parameter's placements first.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    HAVE_DTENSOR = dist.is_available()
except ImportError:  # a torch built without distributed support
    dist = None
    DTensor = Replicate = Shard = None
    HAVE_DTENSOR = False


def is_dtensor(t) -> bool:
    return HAVE_DTENSOR and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor a backend steps: a DTensor's local shard (same storage), else ``t``."""
    if is_dtensor(t):
        return t._local_tensor
    return t


def local_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The local gradient of ``p``; a DTensor gradient is first brought to its parameter's
    placements (stored back into ``p.grad``, as an in-place unscale also leaves it there)."""
    if not is_dtensor(p):
        if is_dtensor(g):
            raise RuntimeError(f"a DTensor gradient for a plain parameter of shape {tuple(p.shape)}")
        return g
    if not is_dtensor(g):
        raise RuntimeError(
            f"a plain-tensor gradient of shape {tuple(g.shape)} for a DTensor parameter (placements "
            f"{p.placements}); gradients of sharded parameters must be DTensors"
        )
    if g.placements != p.placements or g.device_mesh != p.device_mesh:
        g = g.redistribute(p.device_mesh, p.placements)
        p.grad = g
    return g._local_tensor


def local_state(state: dict) -> dict:
    """A view of one param's state dict with each DTensor replaced by its local shard. Backends
    update state tensors in place (and the step count, a plain tensor, in place), so writing
    through the view writes the optimizer's state."""
    return {k: local(v) for k, v in state.items()}


def placement_text(p: torch.Tensor) -> str:
    return f"DTensor with placements {tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}"


# ---------------------------------------------------------------------------------------------
# Elementwise kernels: complex tensors as real, dense layouts as flat storage
# ---------------------------------------------------------------------------------------------
# Registry names whose math is per element (LAMB's norms too: the norm of a complex tensor is
# that of its real view, and the norm of a tensor that of its storage). For these the plan hands
# a backend each complex tensor as its real view (torch.optim does the same) and each dense
# non-overlapping tensor that is not contiguous (channels_last, a transposed leaf) as its flat
# storage, so the fused kernels step them instead of the reference (torch's fused kernels also
# read such tensors as flat storage). Params, gradients and states must then share strides.
ELEMENTWISE = frozenset({"adamw", "adopt", "lamb", "sophia", "sophia_hessian"})


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill numel consecutive storage slots (in some
    order), so the storage from t's offset is a flat view of all of them."""
    if t.is_contiguous():
        return True
    dims = sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for st, n in dims:
        if st != expected:
            return False
        expected *= n
    return True


def needs_view(t: torch.Tensor) -> bool:
    """Whether an elementwise kernel gets a view of ``t`` instead of ``t``: complex, or dense
    but not contiguous."""
    return t.is_complex() or (not t.is_contiguous() and dense(t))


def elementwise_view(t: torch.Tensor) -> torch.Tensor:
    """The real view of a complex tensor, flattened to its storage when it is dense but not
    contiguous (a truly strided tensor stays strided: the backends refuse it and it falls back
    to the reference alone)."""
    v = torch.view_as_real(t) if t.is_complex() else t
    if not v.is_contiguous() and dense(v):
        v = v.as_strided((v.numel(),), (1,), v.storage_offset())
    return v


def same_layout(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` with ``like``'s strides (a copy when they differ), so that a flat view of each pairs
    the same elements."""
    if x.stride() == like.stride():
        return x
    out = torch.empty_strided(like.shape, like.stride(), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def viewed_like(xs: Sequence[torch.Tensor], originals: Sequence[torch.Tensor], viewed: Sequence[bool] | None) -> list:
    """Each ``xs[i]`` (a param, its gradient or a state tensor) as an elementwise kernel sees
    ``originals[i]`` where ``viewed[i]``: given the param's strides, then its elementwise view."""
    if viewed is None:
        return list(xs)
    return [elementwise_view(same_layout(x, o)) if v else x for x, o, v in zip(xs, originals, viewed)]


# ---------------------------------------------------------------------------------------------
# Where each rank's shard lies in the global tensor
# ---------------------------------------------------------------------------------------------
def _chunk(n: int, parts: int, k: int) -> tuple[int, int]:
    """(offset, size) of part k when n is split as torch.chunk splits it (DTensor's Shard)."""
    size = -(-n // parts) if parts else n
    start = min(k * size, n)
    return start, min(size, n - start)


def shard_box(shape: Sequence[int], placements, mesh_shape: Sequence[int], coord: Sequence[int]):
    """(offsets, sizes) of the block of a tensor of global ``shape`` held at mesh coordinate
    ``coord``. Shard(d) on several mesh dims cuts dim d again within the previous cut, in mesh
    dim order, as DTensor does."""
    offsets = [0] * len(shape)
    sizes = list(shape)
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            if type(placement) is not Shard:  # _StridedShard (FSDP2 over TP): not a box
                raise NotImplementedError(f"placement {placement}")
            d = placement.dim
            start, size = _chunk(sizes[d], mesh_shape[mesh_dim], coord[mesh_dim])
            offsets[d] += start
            sizes[d] = size
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(f"placement {placement}")
    return offsets, sizes


def sharded_mesh_dims(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Shard))


# ---------------------------------------------------------------------------------------------
# LAMB: whole-tensor norms from per-shard partial sums
# ---------------------------------------------------------------------------------------------
class NormReduce:
    """Sums LAMB's per-shard partial sums of squares ([N, 2] float64, a row per tensor) over
    the mesh dimensions each tensor is sharded on: one all-reduce per distinct set of process
    groups (an FSDP2 or TP run has one), whatever the number of tensors. Replicated and plain
    tensors need no reduction (their local tensor is the whole tensor)."""

    def __init__(self, params: Sequence[torch.Tensor]):
        by_groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if is_dtensor(p):
                dims = sharded_mesh_dims(p)
                if dims:
                    mesh = p.device_mesh
                    key = tuple(mesh.get_group(d) for d in dims)
                    by_groups.setdefault(key, []).append(i)
        self.n = len(params)
        self.rows = [(groups, torch.tensor(rows, dtype=torch.long)) for groups, rows in by_groups.items()]
        self.calls = 0  # collectives issued (tests check the batching)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def __call__(self, partials: torch.Tensor) -> torch.Tensor:
        for groups, rows in self.rows:
            whole = len(rows) == self.n
            sub = partials if whole else partials.index_select(0, rows.to(partials.device))
            for group in groups:
                dist.all_reduce(sub, group=group)
                self.calls += 1
            if not whole:
                partials.index_copy_(0, rows.to(partials.device), sub)
        return partials


# ---------------------------------------------------------------------------------------------
# Muon: Newton-Schulz on whole matrices, the work spread over the ranks
# ---------------------------------------------------------------------------------------------
def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Muon's 2-D view (shape[0], rest) of a tensor shape."""
    return shape[0], math.prod(shape[1:])


def ns_flops(rows: int, cols: int, steps: int) -> float:
    """Multiply-adds x 2 of ``steps`` quintic NS iterations on a (rows, cols) matrix, computed on
    the wide orientation (m <= n): X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n) per step."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


class Orthogonalize:
    """Muon's ``orthogonalize`` hook for one param group's Muon tensors (module docstring).

    ``hook(updates, ns)``: ``updates[i]`` is the local (shard-shaped) momentum update of tensor
    i, ``ns(X)`` the backend's Newton-Schulz on a stack X of same-shape matrices (k, r, c).
    Returns the orthogonalised updates, each shaped (and sharded) like its input. Tensors sharded
    on a 1-D mesh are gathered to an owner rank, orthogonalised there and scattered back;
    plain and replicated tensors are orthogonalised where they are.
    """

    def __init__(self, params: Sequence[torch.Tensor], optimizer: str = "Muon"):
        self.n = len(params)
        self.local_idx: list[int] = []
        self.meshes: list[_MeshExchange] = []
        by_mesh: dict[int, list[int]] = {}
        meshes = {}
        for i, p in enumerate(params):
            if is_dtensor(p) and sharded_mesh_dims(p):
                if p.device_mesh.ndim != 1:
                    raise NotImplementedError(
                        f"{optimizer}: a parameter sharded on a {p.device_mesh.ndim}-D mesh ({placement_text(p)}) "
                        f"is not supported by the distributed Newton-Schulz (1-D meshes: FSDP2 or tensor "
                        f"parallelism alone); route it to AdamW with a param group use_muon=False"
                    )
                by_mesh.setdefault(id(p.device_mesh), []).append(i)
                meshes[id(p.device_mesh)] = p.device_mesh
            else:
                self.local_idx.append(i)
        for key, idx in by_mesh.items():
            self.meshes.append(_MeshExchange(meshes[key], idx, [params[i] for i in idx]))
        self.flops = 0.0  # NS flops of this rank in the last call (for reports and tests)

    @property
    def distributed(self) -> bool:
        return bool(self.meshes)

    def __call__(self, updates: Sequence[torch.Tensor], ns: Callable, ns_steps: int = 5) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * self.n
        self.flops = 0.0
        # Plain / replicated tensors: here, same-shape matrices stacked into one NS call.
        jobs = [(i, updates[i].reshape(matrix_shape(updates[i].shape))) for i in self.local_idx]
        for i, o in self._run_ns(jobs, ns, ns_steps):
            out[i] = o.view(updates[i].shape)
        for ex in self.meshes:
            full = ex.gather([updates[i] for i in ex.idx])  # {position in ex.idx: whole tensor}
            jobs = [(k, t.reshape(matrix_shape(t.shape))) for k, t in full.items()]
            done = {k: o.view(full[k].shape) for k, o in self._run_ns(jobs, ns, ns_steps)}
            first = updates[ex.idx[0]]
            for k, o in zip(ex.idx, ex.scatter(done, first.dtype, first.device)):
                out[k] = o
        return out

    def _run_ns(self, jobs, ns, ns_steps):
        by_shape: dict[tuple, list] = {}
        for key, x in jobs:
            by_shape.setdefault(tuple(x.shape), []).append((key, x))
        for shape, members in by_shape.items():
            if 0 in shape:
                for key, x in members:
                    yield key, torch.zeros_like(x)
                continue
            result = ns(torch.stack([x for _, x in members]))
            self.flops += len(members) * ns_flops(shape[0], shape[1], ns_steps)
            for k, (key, x) in enumerate(members):
                # In the update's dtype: exact for the fp32 updates of the reference (NS returns
                # bf16 or fp32), and one dtype for the exchange on every rank.
                yield key, result[k].to(x.dtype)


class _MeshExchange:
    """The two all-to-alls of one 1-D mesh: shards to owners, results back."""

    def __init__(self, mesh, idx: list[int], params: Sequence[torch.Tensor]):
        self.mesh = mesh
        self.group = mesh.get_group(0)
        self.world = mesh.size(0)
        self.me = mesh.get_local_rank(0)
        self.idx = idx
        self.shapes = [tuple(p.shape) for p in params]
        # Every rank's block of every tensor (offsets, sizes), from the placements alone.
        self.boxes = [[shard_box(p.shape, p.placements, (self.world,), (r,)) for r in range(self.world)] for p in params]
        for k, p in enumerate(params):  # the placement arithmetic must agree with DTensor's
            if list(p._local_tensor.shape) != self.boxes[k][self.me][1]:
                raise RuntimeError(
                    f"distributed Muon: a shard of shape {tuple(p._local_tensor.shape)} where its placements "
                    f"give {tuple(self.boxes[k][self.me][1])} ({placement_text(p)}): uneven sharding is not supported"
                )
        # Owners: largest NS cost first, each to the least-loaded rank (same on every rank).
        load = [0.0] * self.world
        self.owner = [0] * len(params)
        for k in sorted(range(len(params)), key=lambda k: (-ns_flops(*matrix_shape(self.shapes[k]), 1), k)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            self.owner[k] = r
            load[r] += ns_flops(*matrix_shape(self.shapes[k]), 1)
        self.mine = [k for k in range(len(params)) if self.owner[k] == self.me]

    def _numel(self, k: int, r: int) -> int:
        return math.prod(self.boxes[k][r][1])

    def _slices(self, k: int, r: int):
        offsets, sizes = self.boxes[k][r]
        return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))

    def gather(self, shards: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Send my shard of each tensor to its owner; return the whole tensors I own."""
        dtype, device = shards[0].dtype, shards[0].device
        # To rank r: my shards of the tensors r owns, in index order.
        send_parts = [[shards[k].reshape(-1).to(dtype) for k in range(len(shards)) if self.owner[k] == r]
                      for r in range(self.world)]
        send_split = [sum(x.numel() for x in parts) for parts in send_parts]
        recv_split = [sum(self._numel(k, r) for k in self.mine) for r in range(self.world)]
        flat = [x for parts in send_parts for x in parts]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(recv_split), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send.contiguous(), recv_split, send_split, group=self.group)
        whole = {k: torch.empty(self.shapes[k], dtype=dtype, device=device) for k in self.mine}
        pos = 0
        for r in range(self.world):
            for k in self.mine:
                n = self._numel(k, r)
                whole[k][self._slices(k, r)] = recv[pos:pos + n].view(self.boxes[k][r][1])
                pos += n
        return whole

    def scatter(self, done: dict[int, torch.Tensor], dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Send each rank its block of the tensors I own (in ``dtype``, which every rank passes
        alike); return my block of every tensor."""
        send_parts = [[done[k][self._slices(k, r)].reshape(-1).to(dtype) for k in self.mine] for r in range(self.world)]
        send_split = [sum(x.numel() for x in parts) for parts in send_parts]
        recv_split = [sum(self._numel(k, self.me) for k in range(len(self.shapes)) if self.owner[k] == r)
                      for r in range(self.world)]
        flat = [x for parts in send_parts for x in parts]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(recv_split), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send.contiguous(), recv_split, send_split, group=self.group)
        out: list[torch.Tensor | None] = [None] * len(self.shapes)
        pos = 0
        for r in range(self.world):
            for k in range(len(self.shapes)):
                if self.owner[k] == r:
                    n = self._numel(k, self.me)
                    out[k] = recv[pos:pos + n].view(self.boxes[k][self.me][1])
                    pos += n
        return out


# ---------------------------------------------------------------------------------------------
# Shampoo: per-shard statistics in a checkpoint
# ---------------------------------------------------------------------------------------------
def all_coords(mesh_shape: Sequence[int]) -> list[tuple[int, ...]]:
    coords = [()]
    for n in mesh_shape:
        coords = [c + (k,) for c in coords for k in range(n)]
    return coords


def shard_shapes(p: torch.Tensor) -> list[tuple[int, ...]]:
    """The local shape of DTensor ``p`` at every mesh coordinate (mesh order)."""
    mesh_shape = tuple(p.device_mesh.shape)
    return [tuple(shard_box(p.shape, p.placements, mesh_shape, c)[1]) for c in all_coords(mesh_shape)]


def stack_over_ranks(local_blocks: Sequence[torch.Tensor], shapes_per_rank: Sequence[Sequence[tuple]], p) -> list:
    """Per-rank tensors (Shampoo's L, R and roots of this rank's blocks) as DTensors with a
    leading mesh dimension, so that a distributed checkpoint keeps every rank's own (DCP saves a
    plain tensor once, as if it were replicated). Block k of every rank shares one global shape,
    (ranks, max rows, max cols); a smaller block (an uneven last shard) is zero-padded."""
    from torch.distributed.tensor import DTensor

    mesh = p.device_mesh
    out = []
    for k, x in enumerate(local_blocks):
        sides = [shapes[k] for shapes in shapes_per_rank]
        full = tuple(max(s[d] for s in sides) for d in range(x.ndim))
        if tuple(x.shape) == full:
            piece = x.unsqueeze(0)  # a view: a checkpoint load writes the state itself
        else:
            piece = x.new_zeros((1, *full))
            piece[(0, *(slice(0, n) for n in x.shape))] = x
        shape = (mesh.size(), *full)
        stride = tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
        out.append(DTensor.from_local(piece, mesh, [Shard(0)] * mesh.ndim, run_check=False, shape=shape, stride=stride))
    return out


def unstack_over_ranks(value, local_shape: tuple) -> torch.Tensor:
    """This rank's block back from :func:`stack_over_ranks` (a DTensor), cropped to its shape."""
    if not is_dtensor(value):
        return value
    piece = value.to_local()
    if piece.shape[0] != 1:
        raise ValueError(
            f"Shampoo statistics saved for another sharding (local {tuple(piece.shape)}): a resume "
            f"needs the same world size and placements (they are per-shard blocks)"
        )
    return piece[0][tuple(slice(0, n) for n in local_shape)]
