"""The placement layer: where a step meets distributed tensors (FSDP2, tensor parallelism, HSDP,
and their combinations on N-D meshes).

Backends step plain tensors only (:func:`mupopt.backends.subclass_reason`); this module is the one
place that knows about DTensor placements. For a param group it turns every DTensor into its
local shard (params, gradients, state), keeps the muP multipliers of the *global* shape (the
optimizer computes them from ``p.shape``, which for a DTensor is global), and supplies the
collectives the math needs, batched per step. Where each rank's shard lies comes from the
DTensor's whole spec, every mesh dim it is split on (Shard, _StridedShard; Replicate holds
copies), and is checked against the DTensor at plan build; any other placement is refused.

- LAMB's trust ratio needs the norms of the whole tensor: the backend computes per-shard partial
  sums of squares for all tensors, and :class:`NormReduce` sums them over all ranks of each
  tensor's mesh, each distinct shard once, in one all-reduce per distinct process group, not
  one per tensor.
- Muon orthogonalises whole matrices: :class:`Orthogonalize` sends each distinct shard of a
  matrix to the rank that owns the matrix (one all-to-all for all matrices of a mesh), the owner
  runs Newton-Schulz on the matrices it owns (owners spread over every rank of the mesh,
  replicas included: about 1/world_size of the work each, balanced by NS cost), and a second
  all-to-all returns each rank its block of the result. The scheme is the one of the published
  distributed Muon implementations that spread the NS work over ranks (Liu et al., "Muon is
  Scalable for LLM Training", arXiv 2502.16982, Sec. 3 "Distributed Muon"; torchtitan/Dion's
  gather-to-owner form): gathering every matrix on every rank, what DTensor does by itself when
  a matmul sees a sharded operand, would repeat all of the NS work on every rank.
- Shampoo preconditions the blocks of the global tensor, as one process does: its hook
  (mupopt.optim.shampoo.GlobalBlocks) sends each block's pieces to the block's owner rank and
  the preconditioned pieces back through the same :class:`Exchange` (regions of 2-D views: a
  whole matrix for Muon, a block for Shampoo); the owners keep the blocks' statistics (Shi et
  al., arXiv 2309.06497: DistributedShampoo's distributors, the same math as one device).

Gradients whose placements differ from their parameter's (a Partial gradient of a replicated
tensor-parallel parameter) are redistributed to the parameter's placements first.
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, NamedTuple, Sequence

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard

    HAVE_DTENSOR = dist.is_available()
except ImportError:  # a torch built without distributed support
    dist = None
    DTensor = Replicate = Shard = None
    HAVE_DTENSOR = False
try:  # FSDP2's placement of a dim that tensor parallelism already split (private; not a Shard
    # subclass in torch 2.13, a subclass in earlier releases: tested apart from Shard either way)
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:
    _StridedShard = None
SHARD_LIKE = tuple(t for t in (Shard, _StridedShard) if t is not None)


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


def local_state(state: dict, p: torch.Tensor | None = None) -> dict:
    """A view of one param's state dict with each DTensor replaced by its local shard. Backends
    update state tensors in place (and the step count, a plain tensor, in place), so writing
    through the view writes the optimizer's state. The stochastic-rounding seed of a DTensor
    param ``p`` is its shard's (:func:`shard_seed`)."""
    view = {k: local(v) for k, v in state.items()}
    if p is not None and "sr_seed" in view:
        view["sr_seed"] = shard_seed(p, view["sr_seed"])
    return view


def shard_seed(p: torch.Tensor, seed: int) -> int:
    """The seed stochastic rounding uses on this rank's shard of ``p`` (mupopt/storage.py).

    Backends count element indices from 0 in the local shard, so shards keyed by the param's one
    seed (``state["sr_seed"]``, alike on every rank: the checkpoint holds one) would draw the
    same bits at the same local offsets: correlated rounding across shards. Each shard's key is
    the seed mixed with the global row-major index of the shard's first element instead: distinct
    for every shard (shards do not overlap), alike for the replicas of one shard (HSDP, Replicate
    mesh dims: they must stay equal), and the seed itself where that index is 0 (plain tensors,
    the first shard), so single-process results do not change."""
    if not is_dtensor(p):
        return seed
    from ..storage import MASK32, mix32

    mesh = p.device_mesh
    block = shard_block(tuple(p.shape), p.placements, tuple(mesh.shape), mesh.get_coordinate())
    first, stride = 0, 1
    for ix, n in reversed(list(zip(block.indices, p.shape))):
        if len(ix) == 0:
            return seed  # an empty shard rounds nothing
        first += int(ix[0]) * stride
        stride *= n
    if first == 0:
        return seed
    return int(mix32(int(seed) ^ mix32((first & MASK32) ^ mix32((first >> 32) + 1))))


def agree_seeds(params: Sequence[torch.Tensor], seeds: Sequence[int], optimizer: str) -> list[int]:
    """The seeds of DTensor ``params`` as the first rank of each one's mesh drew them (one
    broadcast per process group): a checkpoint holds one seed per param (DCP saves a non-tensor
    entry from one rank), so every rank must hold that one, also where ranks seed torch apart."""
    out = list(seeds)
    by_group: dict = {}
    for i, p in enumerate(params):
        by_group.setdefault(mesh_group(p.device_mesh, optimizer), []).append(i)
    for group, idx in by_group.items():
        t = torch.tensor([out[i] for i in idx], dtype=torch.int64)
        dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
        for i, s in zip(idx, t.tolist()):
            out[i] = s
    return out


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
# Each placement that splits a tensor cuts one tensor dim: Shard(d) as torch.chunk does,
# _StridedShard(d, split_factor) (FSDP2 over a dim that tensor parallelism already split) into
# split_factor interleaved runs per part; the cuts are applied in mesh-dim order, as
# distribute_tensor applies them. So the elements one mesh coordinate holds are the Cartesian
# product over tensor dims of one increasing index list each: what that dim's cuts leave of
# arange(size). The cuts are made by each placement's own _split_tensor (the method
# distribute_tensor cuts with, and the one torch's compute_local_shape_and_global_offset runs on
# an index vector for _StridedShard), so no copy of torch's arithmetic lives here, and every plan
# checks the result against the DTensor it steps (check_local).
_INDICES: dict[tuple, torch.Tensor] = {}
PROBE_NUMEL = 1 << 16  # check_local compares every global index up to this size (512 KiB of int64)


def split_mesh_dims(p, optimizer: str) -> tuple[int, ...]:
    """The mesh dims in which DTensor ``p`` is split (Shard, _StridedShard); in the others
    (Replicate) each rank holds a copy. Any other placement raises, naming it: a Partial
    parameter (a pending sum) or a placement type unknown here cannot be stepped shard by shard,
    and skipping it would be silently wrong."""
    dims = []
    for m, pl in enumerate(p.placements):
        if isinstance(pl, SHARD_LIKE):
            dims.append(m)
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(
                f"{optimizer}: a parameter of shape {tuple(p.shape)} has placement {pl!r} on mesh dim {m} "
                f"({placement_text(p)}); mupopt steps parameters placed with Shard, _StridedShard and "
                f"Replicate only (redistribute a Partial parameter to Replicate or Shard first)"
            )
    return tuple(dims)


def check_placements(params: Sequence[torch.Tensor], optimizer: str) -> None:
    """Refuse, before anything is written, a DTensor parameter with a placement the placement
    layer does not know (:func:`split_mesh_dims`)."""
    for p in params:
        if is_dtensor(p):
            split_mesh_dims(p, optimizer)


def _dim_indices(size: int, dim: int, ndim: int, cuts: tuple) -> torch.Tensor:
    """The global indices along tensor dim ``dim`` (of ``size``) that survive ``cuts``:
    (placement, parts, k) in mesh-dim order, keeping part k of each. Cached by value (placement
    equality is not a safe cache key: earlier torch releases compare a _StridedShard equal to
    the Shard of its dim)."""
    key = (size, dim, ndim, tuple((type(pl).__name__, getattr(pl, "split_factor", None), parts, k) for pl, parts, k in cuts))
    ix = _INDICES.get(key)
    if ix is None:
        shape = [1] * ndim
        shape[dim] = size
        ix = torch.arange(size).view(shape)  # an index vector along `dim`: the placement cuts it as it cuts p
        for pl, parts, k in cuts:
            pieces, _ = pl._split_tensor(ix, parts, with_padding=False, contiguous=False)
            ix = pieces[k]
        ix = _INDICES[key] = ix.reshape(-1).clone()
    return ix


class Block:
    """The elements of a global tensor that one mesh coordinate holds: the Cartesian product of
    ``indices`` (one increasing index list per tensor dim), in the order of that rank's local
    tensor. ``read`` and ``write`` move them between the whole tensor and a flat buffer."""

    def __init__(self, indices: tuple):
        self.indices = indices
        self.shape = tuple(len(ix) for ix in indices)
        self.numel = math.prod(self.shape)
        # A box (each list a run of consecutive indices: every Shard, and _StridedShard where
        # its runs abut) is read through slices, a view; any other block through index lists.
        self.is_box = all(len(ix) == 0 or int(ix[-1]) - int(ix[0]) + 1 == len(ix) for ix in indices)
        if self.is_box:
            self.offsets = tuple(int(ix[0]) if len(ix) else 0 for ix in indices)
            self._slices = tuple(slice(o, o + n) for o, n in zip(self.offsets, self.shape))
        self._keys: dict = {}

    def key(self, device):
        if self.is_box:
            return self._slices
        key = self._keys.get(device)
        if key is None:
            n = len(self.indices)
            key = self._keys[device] = tuple(
                ix.to(device).view([-1 if e == d else 1 for e in range(n)]) for d, ix in enumerate(self.indices))
        return key

    def read(self, whole: torch.Tensor) -> torch.Tensor:
        return whole[self.key(whole.device)]

    def write(self, whole: torch.Tensor, values: torch.Tensor) -> None:
        whole[self.key(whole.device)] = values.view(self.shape)


def shard_block(shape: Sequence[int], placements, mesh_shape: Sequence[int], coord: Sequence[int]) -> Block:
    """The :class:`Block` of a tensor of global ``shape`` held at mesh coordinate ``coord``."""
    ndim = len(shape)
    cuts: list[list] = [[] for _ in shape]
    for m, pl in enumerate(placements):
        if isinstance(pl, SHARD_LIKE):
            cuts[pl.dim % ndim].append((pl, mesh_shape[m], coord[m]))
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(f"placement {pl!r}")  # callers refuse it first (split_mesh_dims)
    return Block(tuple(_dim_indices(n, d, ndim, tuple(c)) for d, (n, c) in enumerate(zip(shape, cuts))))


@functools.lru_cache(maxsize=None)
def _local_split_supported() -> bool:
    """Whether distribute_tensor takes src_data_rank (None: cut locally, no collective; a public
    keyword of recent torch, checked rather than assumed)."""
    import inspect

    from torch.distributed.tensor import distribute_tensor

    return "src_data_rank" in inspect.signature(distribute_tensor).parameters


def check_local(p, block: Block, optimizer: str) -> None:
    """Raise unless ``block`` is where DTensor ``p`` keeps this rank's shard: its local tensor's
    shape, and (up to PROBE_NUMEL elements, where torch can split without a collective) every
    index: an index tensor distributed by DTensor itself must give this rank the block's."""
    local_shape = tuple(p._local_tensor.shape)
    problem = None
    if local_shape != block.shape:
        problem = f"a local shard of shape {local_shape} where the placements give {block.shape}"
    elif p.numel() <= PROBE_NUMEL and _local_split_supported():
        from torch.distributed.tensor import distribute_tensor

        index = torch.arange(p.numel()).view(p.shape)
        probe = distribute_tensor(index, p.device_mesh, p.placements, src_data_rank=None).to_local().cpu()
        if not torch.equal(probe, block.read(index)):
            problem = "DTensor places other elements on this rank than the placements give"
    if problem is not None:
        raise RuntimeError(
            f"{optimizer}: {problem} (a parameter of shape {tuple(p.shape)}, {placement_text(p)}, mesh "
            f"coordinate {p.device_mesh.get_coordinate()}): this torch's DTensor cuts tensors in a way "
            f"mupopt's placement layer does not know; nothing was changed"
        )


def mesh_group(mesh, optimizer: str):
    """One process group over every rank of ``mesh``, so that one collective spans all its
    dims: a 1-D mesh's own group; the default group when an N-D mesh spans the world (no new
    group); else the mesh flattened to 1-D (DeviceMesh._flatten: private, looked up rather than
    assumed; created once, by every rank of the root mesh as they build their plans together)."""
    if mesh.ndim == 1:
        return mesh.get_group(0)
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    flatten = getattr(mesh, "_flatten", None)
    if flatten is None or not mesh.mesh_dim_names:
        raise NotImplementedError(
            f"{optimizer}: parameters on a {mesh.ndim}-D mesh of shape {tuple(mesh.shape)} over part of the world "
            f"need one process group over the mesh: DeviceMesh._flatten (missing in this torch) and mesh dim "
            f"names (init_device_mesh(..., mesh_dim_names=...))"
        )
    return flatten().get_group(0)


def group_coords(mesh, group) -> list[tuple[int, ...]]:
    """The mesh coordinate of each rank of ``group`` (a group over exactly the mesh's ranks)."""
    shape = tuple(mesh.mesh.shape)
    out: list = [None] * dist.get_world_size(group)
    for c, rank in zip(itertools.product(*map(range, shape)), mesh.mesh.flatten().tolist()):  # row-major both
        out[dist.get_group_rank(group, rank)] = c
    if any(c is None for c in out):
        raise RuntimeError(f"a process group of {len(out)} ranks for a mesh of shape {shape}")
    return out


def counted_copy(coord: Sequence[int], split: Sequence[int], like: Sequence[int]) -> bool:
    """Whether the copy at ``coord`` is the one counted among the replicas of its shard: the one
    whose coordinates in every replicated mesh dim (not in ``split``) are ``like``'s."""
    return all(c == w for m, (c, w) in enumerate(zip(coord, like)) if m not in split)


# ---------------------------------------------------------------------------------------------
# LAMB: whole-tensor norms from per-shard partial sums
# ---------------------------------------------------------------------------------------------
class NormReduce:
    """Sums LAMB's per-shard partial sums of squares ([N, 2] float64, a row per tensor) over
    every rank of each tensor's mesh: one all-reduce per distinct process group (mesh_group: one
    in an FSDP2, TP or HSDP run; two under FSDP2 + TP, whose parameters that TP leaves whole live
    on the FSDP sub-mesh), whatever the number of tensors. A shard held by several ranks (mesh
    dims where the tensor is replicated: HSDP's replica groups, a TP-replicated dim) is counted
    once: the copies at coordinate 0 of the replicated dims contribute, the others add zeros.
    Tensors split on no mesh dim need no reduction (their local tensor is the whole tensor)."""

    def __init__(self, params: Sequence[torch.Tensor], optimizer: str = "LAMB"):
        by_group: dict[int, tuple] = {}
        for i, p in enumerate(params):
            split = split_mesh_dims(p, optimizer) if is_dtensor(p) else ()
            if not split:
                continue
            mesh = p.device_mesh
            coord = mesh.get_coordinate()
            check_local(p, shard_block(p.shape, p.placements, tuple(mesh.shape), coord), optimizer)
            group = mesh_group(mesh, optimizer)
            _, rows, weights = by_group.setdefault(id(group), (group, [], []))
            rows.append(i)
            weights.append(1.0 if counted_copy(coord, split, [0] * mesh.ndim) else 0.0)
        self.n = len(params)
        self.rows = [(group, torch.tensor(rows, dtype=torch.long),
                      None if all(weights) else torch.tensor(weights, dtype=torch.float64).unsqueeze(1))
                     for group, rows, weights in by_group.values()]
        self.calls = 0  # collectives issued (tests check the batching)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def __call__(self, partials: torch.Tensor) -> torch.Tensor:
        device = partials.device
        for k, (group, rows, weights) in enumerate(self.rows):
            if rows.device != device:  # once: the tables live where the partials are
                rows, weights = rows.to(device), None if weights is None else weights.to(device)
                self.rows[k] = (group, rows, weights)
            whole = len(rows) == self.n
            sub = partials if whole else partials.index_select(0, rows)
            if weights is not None:
                sub.mul_(weights)
            dist.all_reduce(sub, group=group)
            self.calls += 1
            if not whole:
                partials.index_copy_(0, rows, sub)
        return partials


# ---------------------------------------------------------------------------------------------
# Regions of sharded matrices gathered to owner ranks and scattered back (Muon, Shampoo)
# ---------------------------------------------------------------------------------------------
def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view (shape[0], rest) of a tensor shape (Muon's and Shampoo's)."""
    return shape[0], math.prod(shape[1:])


def matrix_block(shape: Sequence[int], block: Block) -> Block:
    """``block`` (of a tensor of global ``shape``) in the 2-D view (shape[0], rest): rows are
    its dim-0 indices, columns the row-major ravel of its other lists, again an increasing list,
    so the 2-D view of a local shard (local.reshape(rows, cols)) holds exactly these elements in
    this order."""
    if len(shape) == 2:
        return block
    cols = torch.zeros(1, dtype=torch.long)
    for n, ix in zip(shape[1:], block.indices[1:]):
        cols = (cols.unsqueeze(1) * n + ix.unsqueeze(0)).reshape(-1)
    return Block((block.indices[0], cols))


def _span(ix: torch.Tensor, lo: int, hi: int, first: int | None) -> tuple[int, int]:
    """The positions a:b of an increasing index list whose values lie in [lo, hi); ``first``:
    its first value when it is a run of consecutive indices (then no search), else None."""
    if first is not None:
        n = len(ix)
        return min(max(lo - first, 0), n), min(max(hi - first, 0), n)
    return int(torch.searchsorted(ix, lo)), int(torch.searchsorted(ix, hi))


def balance(costs: Sequence[float], loads: list[float]) -> list[int]:
    """Owners for items of ``costs``: largest first, each to the least-loaded bin (``loads``,
    updated in place; ties to the lower index, so every rank computes the same owners)."""
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(len(loads)), key=lambda r: (loads[r], r))
        owners[k] = r
        loads[r] += costs[k]
    return owners


def check_param(p, optimizer: str) -> None:
    """check_local for DTensor ``p`` at this rank's mesh coordinate."""
    mesh = p.device_mesh
    check_local(p, shard_block(p.shape, p.placements, tuple(mesh.shape), mesh.get_coordinate()), optimizer)


class ExchangeItem(NamedTuple):
    """One matrix an owner assembles: rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]``
    of the 2-D view (:func:`matrix_shape`) of tensor number ``tensor``, whose global ``shape``
    is placed with ``placements`` on ``mesh``; ``owner`` is a rank of the exchange's group."""

    tensor: int
    shape: tuple
    placements: tuple
    mesh: object
    rows: tuple[int, int]
    cols: tuple[int, int]
    owner: int


class Exchange:
    """The two all-to-alls of one process group (one that spans exactly the ranks of its items'
    meshes, :func:`mesh_group`): :meth:`gather` sends each distinct piece of every item to the
    item's owner, :meth:`scatter` returns every rank, replicas included, its pieces of the
    owners' results.

    A rank's piece of an item is the part of its shard inside the item's region: the shard of
    the 2-D view is the Cartesian product of two increasing index lists (:func:`matrix_block`),
    so the piece is a slice of the local 2-D view, and in the region a Cartesian product of
    index lists (a :class:`Block`). Muon's items are whole matrices, Shampoo's the blocks of
    side <= max_preconditioner_dim. A piece held by several ranks (replicated mesh dims: HSDP)
    is sent once, by the copy in the owner's replica coordinates; every copy gets the result
    back. Empty pieces are not sent."""

    def __init__(self, group, items: Sequence[ExchangeItem], optimizer: str):
        self.group = group
        self.world = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        self.items = list(items)
        self.calls = 0  # all-to-alls issued
        coords_of: dict[int, list] = {}
        shards: dict[tuple, list] = {}  # geometry -> the 2-D block of every group rank's shard
        self.local_shape: dict[int, tuple[int, int]] = {}  # tensor -> my local 2-D shape
        self.slice: list = []  # per item: the slice (a, b, c, d) of my local 2-D view in it, or None
        self.sends: list[bool] = []  # per item: my piece goes to its owner
        self.mine = [j for j, it in enumerate(self.items) if it.owner == self.me]
        self.pieces: dict[int, list] = {}  # items I own: every group rank's piece (Block in the region or None)
        self.senders: dict[int, list[bool]] = {}  # items I own: the ranks whose piece I receive
        for j, it in enumerate(self.items):
            if id(it.mesh) not in coords_of:  # (DeviceMesh.mesh is not free: once per mesh)
                coords_of[id(it.mesh)] = group_coords(it.mesh, group)
            coords = coords_of[id(it.mesh)]
            # The callers refused any placement but Shard, _StridedShard and Replicate.
            split = tuple(m for m, pl in enumerate(it.placements) if isinstance(pl, SHARD_LIKE))
            # Items of one geometry share it (Shampoo's blocks of a tensor, its checkpoint's blocks).
            geometry = (it.shape, id(it.mesh), tuple((type(pl).__name__, getattr(pl, "dim", None),
                                                     getattr(pl, "split_factor", None)) for pl in it.placements))
            if geometry not in shards:
                mesh_shape = tuple(it.mesh.shape)
                distinct: dict[tuple, Block] = {}
                for c in coords:
                    where = tuple(c[m] for m in split)
                    if where not in distinct:
                        distinct[where] = matrix_block(it.shape, shard_block(it.shape, it.placements, mesh_shape, c))
                shards[geometry] = [distinct[tuple(c[m] for m in split)] for c in coords]
            shard = shards[geometry]
            self.local_shape[it.tensor] = shard[self.me].shape
            piece, where = self._clip(shard[self.me], it)
            self.slice.append(where)
            owner_at = coords[it.owner]
            self.sends.append(piece is not None and counted_copy(coords[self.me], split, owner_at))
            if it.owner != self.me:
                continue
            self.pieces[j] = [self._clip(shard[r], it)[0] for r in range(self.world)]
            self.senders[j] = [b is not None and counted_copy(coords[r], split, owner_at) for r, b in enumerate(self.pieces[j])]
            size = (it.rows[1] - it.rows[0]) * (it.cols[1] - it.cols[0])
            if sum(b.numel for b, s in zip(self.pieces[j], self.senders[j]) if s) != size:  # the shards must tile it
                raise RuntimeError(f"{optimizer}: the shards of a tensor of shape {it.shape} (placements "
                                   f"{tuple(it.placements)}) do not tile its rows {it.rows}, columns {it.cols}")

    @staticmethod
    def _clip(shard: Block, it: ExchangeItem):
        """(the piece of ``shard`` in item ``it``'s region as a Block of the region, the slice
        (a, b, c, d) of the shard's 2-D view it is), or (None, None) when it is empty."""
        rows, cols = shard.indices
        first = shard.offsets if shard.is_box else (None, None)
        a, b = _span(rows, *it.rows, first[0])
        c, d = _span(cols, *it.cols, first[1])
        if a == b or c == d:
            return None, None
        return Block((rows[a:b] - it.rows[0], cols[c:d] - it.cols[0])), (a, b, c, d)

    def _all_to_all(self, parts: list[list[torch.Tensor]], recv_split: list[int], dtype, device) -> torch.Tensor:
        send_split = [sum(x.numel() for x in row) for row in parts]
        flat = [x.reshape(-1).to(dtype) for row in parts for x in row]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(recv_split), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send, recv_split, send_split, group=self.group)
        self.calls += 1
        return recv

    def gather(self, local2d: dict, dtype: torch.dtype, device, norms_of: dict | None = None):
        """Send my piece of each item to its owner; return {item: the whole region} for the
        items I own. ``local2d[t]``: my local 2-D view of tensor t. With ``norms_of`` (2-D
        tensors like ``local2d``), each piece also carries the Frobenius norm of the same piece
        of ``norms_of[t]``, and the second value returned is {item: the norm of the whole
        region} (the pieces' norms combined: one value per piece, not the piece itself)."""
        extra = 1 if norms_of is not None else 0
        parts: list[list[torch.Tensor]] = [[] for _ in range(self.world)]
        for j, it in enumerate(self.items):
            if self.sends[j]:
                a, b, c, d = self.slice[j]
                parts[it.owner].append(local2d[it.tensor][a:b, c:d])
                if extra:
                    parts[it.owner].append(torch.linalg.matrix_norm(norms_of[it.tensor][a:b, c:d]).reshape(1))
        recv_split = [sum(self.pieces[j][r].numel + extra for j in self.mine if self.senders[j][r]) for r in range(self.world)]
        recv = self._all_to_all(parts, recv_split, dtype, device)
        whole = {}
        for j in self.mine:
            it = self.items[j]
            whole[j] = torch.empty((it.rows[1] - it.rows[0], it.cols[1] - it.cols[0]), dtype=dtype, device=device)
        norms: dict[int, list] = {j: [] for j in self.mine}
        pos = 0
        for r in range(self.world):
            for j in self.mine:
                if self.senders[j][r]:
                    n = self.pieces[j][r].numel
                    self.pieces[j][r].write(whole[j], recv[pos:pos + n])
                    pos += n + extra
                    if extra:
                        norms[j].append(recv[pos - 1:pos])
        if not extra:
            return whole
        # One piece: its norm itself (sqrt(x^2) == |x| in binary floating point), as one process.
        return whole, {j: torch.linalg.vector_norm(torch.cat(v)) for j, v in norms.items()}

    def scatter(self, done: dict, dtype: torch.dtype, device, active: Sequence[int] | None = None) -> dict:
        """Send every rank, replicas included, its pieces of the items I own (``done[j]``, the
        whole region of item j); return {tensor: my local 2-D view of the results}, for the
        tensors of ``active`` (item indices, the same on every rank; default all)."""
        active = range(len(self.items)) if active is None else active
        on = set(active)
        parts = [[self.pieces[j][r].read(done[j]) for j in self.mine if j in on and self.pieces[j][r] is not None]
                 for r in range(self.world)]
        sizes = [0 if self.slice[j] is None else (self.slice[j][1] - self.slice[j][0]) * (self.slice[j][3] - self.slice[j][2])
                 for j in range(len(self.items))]
        recv_split = [0] * self.world
        for j in on:
            recv_split[self.items[j].owner] += sizes[j]
        recv = self._all_to_all(parts, recv_split, dtype, device)
        out: dict[int, torch.Tensor] = {}
        starts = [0] * self.world
        for r in range(1, self.world):
            starts[r] = starts[r - 1] + recv_split[r - 1]
        for j in sorted(on):  # each owner sent its items in item order
            it = self.items[j]
            if sizes[j] == 0:
                continue
            a, b, c, d = self.slice[j]
            rows, cols = self.local_shape[it.tensor]
            piece = recv[starts[it.owner]:starts[it.owner] + sizes[j]].view(b - a, d - c)
            starts[it.owner] += sizes[j]
            if (a, b, c, d) == (0, rows, 0, cols):
                out[it.tensor] = piece  # the whole local shard: no copy (Muon's matrices)
                continue
            if it.tensor not in out:
                out[it.tensor] = torch.empty((rows, cols), dtype=dtype, device=device)
            out[it.tensor][a:b, c:d] = piece
        for j in on:  # an empty local shard
            t = self.items[j].tensor
            if t not in out:
                out[t] = torch.empty(self.local_shape[t], dtype=dtype, device=device)
        return out


# ---------------------------------------------------------------------------------------------
# Muon: Newton-Schulz on whole matrices, the work spread over the ranks
# ---------------------------------------------------------------------------------------------
def ns_flops(rows: int, cols: int, steps: int) -> float:
    """Multiply-adds x 2 of ``steps`` quintic NS iterations on a (rows, cols) matrix, computed on
    the wide orientation (m <= n): X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n) per step."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


class Orthogonalize:
    """Muon's ``orthogonalize`` hook for one param group's Muon tensors (module docstring).

    ``hook(updates, ns)``: ``updates[i]`` is the local (shard-shaped) momentum update of tensor
    i, ``ns(X)`` the backend's Newton-Schulz on a stack X of same-shape matrices (k, r, c).
    Returns the orthogonalised updates, each shaped (and sharded) like its input. Tensors split
    on any mesh dim are gathered to an owner rank, orthogonalised there and scattered back, one
    :class:`Exchange` per process group (:func:`mesh_group`); owners are spread over every rank
    of the group, replicas included, by NS cost (each rank does about 1/size of the flops).
    Plain and replicated tensors are orthogonalised where they are.
    """

    def __init__(self, params: Sequence[torch.Tensor], optimizer: str = "Muon"):
        self.n = len(params)
        self.local_idx: list[int] = []
        by_group: dict[int, tuple] = {}
        for i, p in enumerate(params):
            if is_dtensor(p) and split_mesh_dims(p, optimizer):
                group = mesh_group(p.device_mesh, optimizer)
                by_group.setdefault(id(group), (group, []))[1].append(i)
            else:
                self.local_idx.append(i)
        self.exchanges = []
        for group, idx in by_group.values():
            shapes = [matrix_shape(params[i].shape) for i in idx]
            owners = balance([ns_flops(r, c, 1) for r, c in shapes], [0.0] * dist.get_world_size(group))
            items = []
            for k, (i, (r, c), owner) in enumerate(zip(idx, shapes, owners)):
                p = params[i]
                check_param(p, optimizer)
                items.append(ExchangeItem(k, tuple(p.shape), tuple(p.placements), p.device_mesh, (0, r), (0, c), owner))
            self.exchanges.append((Exchange(group, items, optimizer), idx))
        self.flops = 0.0  # NS flops of this rank in the last call (for reports and tests)
        self.calls = 0  # collectives issued in the last call (tests check the batching)

    @property
    def distributed(self) -> bool:
        return bool(self.exchanges)

    def __call__(self, updates: Sequence[torch.Tensor], ns: Callable, ns_steps: int = 5) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * self.n
        self.flops = 0.0
        calls_before = sum(ex.calls for ex, _ in self.exchanges)
        # Plain / replicated tensors: here, same-shape matrices stacked into one NS call.
        jobs = [(i, updates[i].reshape(matrix_shape(updates[i].shape))) for i in self.local_idx]
        for i, o in self._run_ns(jobs, ns, ns_steps):
            out[i] = o.view(updates[i].shape)
        for ex, idx in self.exchanges:
            # In the update's dtype: exact for the fp32 updates of the reference (NS returns bf16
            # or fp32), and one dtype for the exchange on every rank.
            first = updates[idx[0]]
            whole = ex.gather({k: updates[i].reshape(ex.local_shape[k]) for k, i in enumerate(idx)}, first.dtype, first.device)
            done = dict(self._run_ns(list(whole.items()), ns, ns_steps))
            back = ex.scatter(done, first.dtype, first.device)
            for k, i in enumerate(idx):
                out[i] = back[k].view(updates[i].shape)
        self.calls = sum(ex.calls for ex, _ in self.exchanges) - calls_before
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
                yield key, result[k].to(x.dtype)
