"""Running a partitioned program for real with ``torch.distributed``.

Each process is one device of the mesh: it slices the full inputs to its shard (weights per
``input_shards``), runs the per-device cascade with the reference evaluator segment by
segment, and between segments performs the program's collectives with ``torch.distributed``
on one process group per mesh axis (``gloo`` on the CPU, ``nccl`` on GPUs). The evaluator
runs whole cascades, so the per-device cascade is cut after every statement whose tensor
a collective communicates; each segment reads what earlier ones produced as inputs.

:func:`run_distributed` spawns the processes (``torch.multiprocessing``, a free port on
127.0.0.1) and runs several jobs per spawn, because starting processes is what costs.
"""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kascade.backends.reference import evaluate
from kascade.ir.cascade import Cascade, Einsum, Operator, TensorDecl
from kascade.ir.errors import DeviceError, ShapeError
from kascade.ir.expr import Op, extent_of, extents_used, tensors_read
from kascade.ir.extents import bind_extents, extent_symbols
from kascade.ir.validate import infer_dtypes
from kascade.passes.partition import Collective, PartitionedProgram

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class Job:
    """One program run: full (unsharded) inputs, params and extra extents, as for ``evaluate``."""
    program: PartitionedProgram
    inputs: Mapping[str, torch.Tensor]
    params: Mapping[str, int | float] = field(default_factory=dict)
    extents: Mapping[str, int] = field(default_factory=dict)


def segments(program: PartitionedProgram) -> list[tuple[Cascade, tuple[Collective, ...]]]:
    """The per-device cascade cut after each communicated tensor: ``(segment, collectives)``.

    A segment's inputs are the program inputs it reads plus tensors earlier segments made;
    every statement is marked output so its value is kept for later segments. Extent
    declarations are left out: the runner binds every extent once, for the whole program.
    """
    local = program.local
    dtypes = infer_dtypes(local)
    out, current, made = [], [], []
    for s in local.stmts:
        current.append(s)
        comm = tuple(c for n in s.outputs for c in program.collectives_after(n))
        if comm or s is local.stmts[-1]:
            out.append((_segment(local, current, made, dtypes, len(out)), comm))
            made += [n for st in current for n in st.outputs]
            current = []
    return out


def _segment(local: Cascade, stmts: list, made: list[str], dtypes, k: int) -> Cascade:
    read = {n for s in stmts for e in _exprs(s) for n in tensors_read(e)}
    inputs = [t for t in local.inputs if t.name in read]
    inputs += [TensorDecl(n, local.ranks_of(n), dtypes[n]) for n in made if n in read]
    marked = []
    for s in stmts:
        if isinstance(s, Einsum):
            marked.append(Einsum(s.name, s.ranks, s.expr, s.dtype or dtypes[s.name], True, s.step, s.init))
        else:
            marked.append(Operator(s.kind, s.names, s.ranks, s.over, s.expr, s.dtypes, True))
    # keep the declarations the segment can state (aliases such as S = T matter to the checker)
    known = {extent_of(r) for t in (*inputs, *marked) for r in t.ranks}
    known |= {n.arg for s in marked for e in _exprs(s) for n in e.walk() if n.op is Op.EXTENT}
    known |= {extent_of(r) for s in marked for e in _exprs(s) for n in e.walk() if n.op is Op.REDUCE
              for r in n.reduce_ranks}
    decls = [x for x in local.extents if x.value is not None and x.name in known
             and extents_used(x.value) <= known]
    return Cascade(local.params, tuple(inputs), tuple(decls), tuple(marked), name=f"{local.name}_seg{k}")


def _exprs(s) -> list:
    return [s.expr] + ([s.init] if isinstance(s, Einsum) and s.init is not None else [])


def shard_inputs(program: PartitionedProgram, inputs: Mapping[str, torch.Tensor],
                 device: int) -> dict[str, torch.Tensor]:
    """``device``'s slice of each input (whole for replicated inputs)."""
    coords = program.coords(device)
    out = dict(inputs)
    for name, dims in program.input_shards:
        t = inputs[name]
        for dim, sh in dims:
            full = t.shape[dim]
            if full % sh.degree:
                raise ShapeError(f"input {name!r}: dim {dim} (rank {sh.rank!r}) has size {full}, not divisible by the "
                                 f"{sh.axis} degree {sh.degree}; accepted: sizes that are multiples of {sh.degree}")
            n = full // sh.degree
            t = t.narrow(dim, coords[sh.axis] * n, n)
        out[name] = t.contiguous()
    return out


def axis_groups(program: PartitionedProgram) -> dict[str, list[list[int]]]:
    """For each axis, the device groups that differ only in that axis's coordinate."""
    axes = program.axes
    out = {}
    for a, (axis, degree) in enumerate(axes):
        others = [range(d) for i, (_, d) in enumerate(axes) if i != a]
        groups = []
        for rest in itertools.product(*others):
            members = []
            for c in range(degree):
                coord = list(rest[:a]) + [c] + list(rest[a:])
                dev = 0
                for (_, d), x in zip(axes, coord):
                    dev = dev * d + x
                members.append(dev)
            groups.append(members)
        out[axis] = groups
    return out


def run_device(program: PartitionedProgram, inputs: Mapping[str, torch.Tensor], params: Mapping[str, int | float],
               extents: Mapping[str, int], device: int, groups: Mapping[str, object], *,
               torch_device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Run ``program`` as device ``device`` (its process must be in an initialised process
    group; ``groups`` maps each axis to this device's group). Returns the source's outputs,
    whole on every device, in float64."""
    if set(inputs) != {t.name for t in program.source.inputs}:
        raise ShapeError(f"inputs {sorted(inputs)}; the cascade's inputs are "
                         f"{sorted(t.name for t in program.source.inputs)}")
    glob = bind_extents(program.source, {n: tuple(t.shape) for n, t in inputs.items()}, extents)
    local_in = shard_inputs(program, inputs, device)
    known = extent_symbols(program.local)
    given = {k: v for k, v in {**glob, **program.local_extents(glob)}.items() if k in known}
    sizes = bind_extents(program.local, {n: tuple(t.shape) for n, t in local_in.items()}, given)
    all_params = {**params, **program.device_params(device)}
    env: dict[str, torch.Tensor] = {n: t.to(torch_device) if torch_device else t for n, t in local_in.items()}
    for seg, comm in segments(program):
        seg_in = {t.name: env[t.name] for t in seg.inputs}
        seg_sizes = {k: v for k, v in sizes.items() if k in extent_symbols(seg)}
        seg_params = {p.name: all_params[p.name] for p in seg.params}
        env.update(evaluate(seg, seg_in, seg_params, seg_sizes, dtype=torch.float64, device=torch_device,
                            keep_all=True))
        for c in comm:
            env[c.tensor] = _communicate(program, c, env[c.tensor], groups[c.axis])
    return {n: env[n] for n in program.source.outputs}


def run_serial(program: PartitionedProgram, inputs: Mapping[str, torch.Tensor],
               params: Mapping[str, int | float] | None = None,
               extents: Mapping[str, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every device of ``program`` in this one process, in lockstep, the collectives done by
    combining the devices' tensors (sum / max / min, concatenation): the same arithmetic as
    :func:`run_device` without processes, for quick checks. Returns each device's outputs."""
    params, extents = params or {}, extents or {}
    glob = bind_extents(program.source, {n: tuple(t.shape) for n, t in inputs.items()}, extents)
    known = extent_symbols(program.local)
    given = {k: v for k, v in {**glob, **program.local_extents(glob)}.items() if k in known}
    world = program.world_size
    envs = [shard_inputs(program, inputs, d) for d in range(world)]
    sizes = bind_extents(program.local, {n: tuple(t.shape) for n, t in envs[0].items()}, given)
    groups = axis_groups(program)
    for seg, comm in segments(program):
        seg_sizes = {k: v for k, v in sizes.items() if k in extent_symbols(seg)}
        for d, env in enumerate(envs):
            all_params = {**params, **program.device_params(d)}
            env.update(evaluate(seg, {t.name: env[t.name] for t in seg.inputs},
                                {p.name: all_params[p.name] for p in seg.params}, seg_sizes,
                                dtype=torch.float64, keep_all=True))
        for c in comm:
            for members in groups[c.axis]:
                parts = [envs[d][c.tensor] for d in members]
                if c.kind == "all_reduce":
                    fold = {"sum": torch.add, "max": torch.maximum, "min": torch.minimum}[c.op]
                    whole = parts[0]
                    for x in parts[1:]:
                        whole = fold(whole, x)
                else:
                    shard = next(s for s in program.shards if s.rank == c.rank)
                    whole = torch.cat(parts, dim=program.local.ranks_of(c.tensor).index(shard.local_rank))
                for d in members:
                    envs[d][c.tensor] = whole
    return [{n: env[n] for n in program.source.outputs} for env in envs]


def _communicate(program: PartitionedProgram, c: Collective, t: torch.Tensor, group) -> torch.Tensor:
    if c.kind == "all_reduce":
        t = t.contiguous()
        dist.all_reduce(t, op=_REDUCE_OPS[c.op], group=group)
        return t
    if c.kind == "all_gather":
        shard = next(s for s in program.shards if s.rank == c.rank)
        dim = program.local.ranks_of(c.tensor).index(shard.local_rank)
        parts = [torch.empty_like(t) for _ in range(c.group)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)
    raise DeviceError(f"the distributed runner performs all_reduce and all_gather; got {c.kind!r}")


# ---- launching ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: Sequence[Job], out_dir: str, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_device = None
    if backend == "nccl":
        torch_device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    torch.set_num_threads(1)   # world-size processes share the machine's cores
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        results = []
        groups_by_mesh: dict[tuple, dict[str, object]] = {}
        for job in jobs:
            p = job.program
            if p.world_size != world:
                raise ShapeError(f"a program for {p.world_size} devices cannot run on {world} processes")
            if p.axes not in groups_by_mesh:   # every process creates every group, in one order
                mine = {}
                for axis, members in axis_groups(p).items():
                    for m in members:
                        g = dist.new_group(m) if len(members) > 1 else dist.group.WORLD
                        if rank in m:
                            mine[axis] = g
                groups_by_mesh[p.axes] = mine
            out = run_device(p, job.inputs, job.params, job.extents, rank, groups_by_mesh[p.axes],
                             torch_device=torch_device)
            results.append({k: v.cpu() for k, v in out.items()})
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(jobs: Sequence[Job], world_size: int, *, backend: str = "gloo"
                    ) -> list[list[dict[str, torch.Tensor]]]:
    """Spawn ``world_size`` processes, run every job on all of them, and return
    ``results[device][job]`` (each job's outputs as seen by that device)."""
    if backend not in ("gloo", "nccl"):
        raise DeviceError(f"unknown torch.distributed backend {backend!r}; accepted: gloo, nccl")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DeviceError("backend 'nccl' needs CUDA GPUs; none is present (use 'gloo' on the CPU)")
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="kascade-dist-") as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), list(jobs), out_dir, backend), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
