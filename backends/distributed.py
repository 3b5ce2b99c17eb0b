"""Running a partitioned program for real with ``torch.distributed``.

Each process is one device of the mesh: it slices the full inputs to its shard (weights per
``input_shards``), runs the per-device cascade with the reference evaluator segment by
segment, and between segments performs the program's collectives with ``torch.distributed``
on one process group per mesh axis (``gloo`` on the CPU, ``nccl`` on GPUs). The evaluator
runs whole cascades, so the per-device cascade is cut after every statement whose tensor
a collective communicates; each segment reads what earlier ones produced as inputs.

An ``all_to_all`` (expert dispatch) defines a new per-device tensor from the blocks received,
its row counts exchanged beforehand, with ``all_to_all_single`` (uneven splits work on gloo).
A :class:`PipelineJob` runs a pipeline program instead: each stage on its own processes
(partitioned over several with a mapping), the live tensors sent on with ``send`` / ``recv``.

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
from kascade.ir.cascade import Cascade, Einsum, ExtentDecl, Operator, TensorDecl
from kascade.ir.dtypes import Kind
from kascade.ir.errors import DeviceError, ShapeError
from kascade.ir.expr import Op, extent_of, extents_used, tensors_read
from kascade.ir.extents import bind_extents, extent_symbols
from kascade.ir.validate import infer_dtypes
from kascade.passes.partition import (
    Collective,
    PartitionedProgram,
    PipelineProgram,
    parse_mapping,
    partition,
)

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class Job:
    """One program run: full (unsharded) inputs, params and extra extents, as for ``evaluate``."""
    program: PartitionedProgram
    inputs: Mapping[str, torch.Tensor]
    params: Mapping[str, int | float] = field(default_factory=dict)
    extents: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineJob:
    """A pipeline program run over its stages, stage ``k`` on processes ``k * W .. k * W + W - 1``.

    With ``mapping`` (as for :func:`~kascade.passes.partition.partition`, e.g. ``"g=tp:2,f=tp:2"``)
    each stage is also partitioned by the shards whose ranks it has (pp x tp): ``W`` is the
    stages' common device count (1 without a mapping). Stage ``k``'s device ``j`` receives what
    stage ``k - 1``'s device ``j`` sends; the last stage's processes hold the outputs."""
    program: PipelineProgram
    inputs: Mapping[str, torch.Tensor]
    params: Mapping[str, int | float] = field(default_factory=dict)
    extents: Mapping[str, int] = field(default_factory=dict)
    mapping: str | Mapping | None = None

    def stage_programs(self) -> list[PartitionedProgram | None]:
        """Each stage partitioned by the mapping's shards of its ranks (None: runs whole)."""
        if self.mapping is None:
            return [None] * len(self.program.stages)
        shards = parse_mapping(self.mapping, self.program.source)
        out = []
        for st in self.program.stages:
            have = {r for t in (*st.inputs, *st.stmts) for r in t.ranks}
            have |= {r for s in st.stmts for e in _exprs(s) for n in e.walk() if n.op is Op.REDUCE
                     for r in n.reduce_ranks}
            mine = [sh for sh in shards if sh.rank in have]
            out.append(partition(st, mine) if mine else None)
        return out

    @property
    def stage_world(self) -> int:
        sizes = {p.world_size for p in self.stage_programs() if p is not None} or {1}
        if len(sizes) != 1:
            raise ShapeError(f"pipeline stages partitioned over different device counts {sorted(sizes)}; every "
                             "stage needs the same number of devices (map ranks so each stage's degrees agree)")
        return sizes.pop()


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
    # an extent that the statements or a kept declaration use but no rank here carries (K in
    # X[PAIR[q] // K, d], T_EP in P = T_EP * K) is declared free; the runner binds it
    ranked = {extent_of(r) for t in (*inputs, *marked) for r in t.ranks} | {x.name for x in decls}
    ranked |= {extent_of(r) for s in marked for e in _exprs(s) for n in e.walk() if n.op is Op.REDUCE
               for r in n.reduce_ranks} | {extent_of(s.over) for s in marked if isinstance(s, Operator)}
    used = {n.arg for s in marked for e in _exprs(s) for n in e.walk() if n.op is Op.EXTENT}
    decls += [ExtentDecl(n) for n in sorted((used | {n for x in decls for n in extents_used(x.value)}) - ranked)]
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


def _local_given(program: PartitionedProgram, glob: Mapping[str, int]) -> dict[str, int]:
    """The extents the per-device cascade takes from the global ones: its local extents and the
    global ones it names, except those it declares or a sort binds (the local pair count ``P = T_EP * K`` of
    expert all-to-all differs from the global ``P``; the others follow from their values)."""
    known = extent_symbols(program.local)
    derived = {x.name for x in program.local.extents if x.value is not None}
    derived |= {program.local.rank_extent(s.new_rank) for s in program.local.stmts
                if isinstance(s, Operator) and s.kind == "sort"}
    return {k: v for k, v in {**glob, **program.local_extents(glob)}.items() if k in known and k not in derived}


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
    given = _local_given(program, glob)
    # the rows an all-to-all delivers are data-dependent: their extent is bound from the received
    # tensor by the segment that reads it
    sizes = bind_extents(program.local, {n: tuple(t.shape) for n, t in local_in.items()}, given, complete=False)
    all_params = {**params, **program.device_params(device)}
    env: dict[str, torch.Tensor] = {n: t.to(torch_device) if torch_device else t for n, t in local_in.items()}
    for seg, comm in segments(program):
        seg_in = {t.name: env[t.name] for t in seg.inputs}
        seg_sizes = {k: v for k, v in sizes.items() if k in extent_symbols(seg)}
        seg_params = {p.name: all_params[p.name] for p in seg.params}
        env.update(evaluate(seg, seg_in, seg_params, seg_sizes, dtype=torch.float64, device=torch_device,
                            keep_all=True))
        for c in comm:
            env[c.into or c.tensor] = _communicate(program, c, env, groups[c.axis])
    return {n: env[n] for n in program.source.outputs}


def run_serial(program: PartitionedProgram, inputs: Mapping[str, torch.Tensor],
               params: Mapping[str, int | float] | None = None,
               extents: Mapping[str, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every device of ``program`` in this one process, in lockstep, the collectives done by
    combining the devices' tensors (sum / max / min, concatenation): the same arithmetic as
    :func:`run_device` without processes, for quick checks. Returns each device's outputs."""
    params, extents = params or {}, extents or {}
    glob = bind_extents(program.source, {n: tuple(t.shape) for n, t in inputs.items()}, extents)
    given = _local_given(program, glob)
    world = program.world_size
    envs = [shard_inputs(program, inputs, d) for d in range(world)]
    sizes = bind_extents(program.local, {n: tuple(t.shape) for n, t in envs[0].items()}, given, complete=False)
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
                if c.kind == "all_to_all":   # device j gets block j of every device's rows, in device order
                    blocks = [_blocks(envs[d], c, parts[i]) for i, d in enumerate(members)]
                    for j, d in enumerate(members):
                        envs[d][c.into] = torch.cat([b[j] for b in blocks])
                    continue
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


def _blocks(env: Mapping[str, torch.Tensor], c: Collective, t: torch.Tensor) -> list[torch.Tensor]:
    """``t``'s rows cut into the blocks an all_to_all sends to each device of its group."""
    sizes = env[c.splits[0]].tolist() if c.splits else [t.shape[0] // c.group] * c.group
    return list(torch.split(t, sizes))


def _communicate(program: PartitionedProgram, c: Collective, env: Mapping[str, torch.Tensor],
                 group) -> torch.Tensor:
    t = env[c.tensor]
    if c.kind == "all_to_all":
        # counts are exchanged before rows (an all_to_all without splits), so both sides know the
        # block sizes: gloo and nccl both run all_to_all_single with uneven splits
        if c.splits is None:
            out = torch.empty_like(t.contiguous())
            dist.all_to_all_single(out, t.contiguous(), group=group)
            return out
        send, recv = (env[n].tolist() for n in c.splits)
        out = t.new_empty((sum(recv), *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), recv, send, group=group)
        return out
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
    raise DeviceError(f"the distributed runner performs all_reduce, all_gather and all_to_all; got {c.kind!r}")


def run_stage(job: PipelineJob, rank: int, groups: Mapping[int, Mapping[str, object]], *,
              torch_device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Run process ``rank``'s part of a pipeline job: receive the tensors the previous stage
    sends (point-to-point, same device index), evaluate this stage (partitioned over its
    devices with ``groups[stage]`` when the job has a mapping), send on what the next stage
    needs. Returns the source's outputs on the last stage, ``{}`` elsewhere."""
    pp, width = job.program, job.stage_world
    k, j = divmod(rank, width)
    stage, prog = pp.stages[k], job.stage_programs()[k]
    sizes = bind_extents(pp.source, {n: tuple(t.shape) for n, t in job.inputs.items()}, job.extents)
    dtypes = infer_dtypes(pp.source)
    env = {n: t.to(torch_device) if torch_device else t for n, t in job.inputs.items()}
    for c in (c for c in pp.transfers if c.dst == k):
        shape = [sizes[pp.source.rank_extent(r)] for r in pp.source.ranks_of(c.tensor)]
        kind = dtypes[c.tensor].kind   # as the evaluator returns it: float64, int64, bool
        dtype = torch.float64 if kind is Kind.FLOAT else torch.bool if kind is Kind.BOOL else torch.int64
        buf = torch.empty(shape, device=torch_device, dtype=dtype)
        dist.recv(buf, src=(k - 1) * width + j)
        env[c.tensor] = buf
    ins = {t.name: env[t.name] for t in stage.inputs}
    ext = {n: v for n, v in job.extents.items() if n in extent_symbols(stage)}
    if prog is None:
        env.update(evaluate(stage, ins, {p.name: job.params[p.name] for p in stage.params}, ext,
                            dtype=torch.float64, device=torch_device))
    else:
        env.update(run_device(prog, ins, job.params, ext, j, groups[k], torch_device=torch_device))
    for c in (c for c in pp.transfers if c.src == k):
        dist.send(env[c.tensor].contiguous(), dst=(k + 1) * width + j)
    return {n: env[n] for n in pp.source.outputs} if k == len(pp.stages) - 1 else {}


def _stage_groups(job: PipelineJob, rank: int) -> dict[int, dict[str, object]]:
    """Every stage's axis groups (offset to its processes); every process creates all of
    them, in one order, as torch.distributed requires."""
    width, out = job.stage_world, {}
    for k, prog in enumerate(job.stage_programs()):
        if prog is None:
            continue
        for axis, members in axis_groups(prog).items():
            for m in members:
                ranks = [k * width + d for d in m]
                g = dist.new_group(ranks)
                if rank in ranks:
                    out.setdefault(k, {})[axis] = g
    return out


# ---- launching ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: Sequence[Job | PipelineJob], out_dir: str, backend: str) -> None:
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
            if isinstance(job, PipelineJob):
                if len(job.program.stages) * job.stage_world != world:
                    raise ShapeError(f"a pipeline of {len(job.program.stages)} stages x {job.stage_world} devices "
                                     f"cannot run on {world} processes")
                out = run_stage(job, rank, _stage_groups(job, rank), torch_device=torch_device)
                results.append({k: v.cpu() for k, v in out.items()})
                continue
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


def run_distributed(jobs: Sequence[Job | PipelineJob], world_size: int, *, backend: str = "gloo"
                    ) -> list[list[dict[str, torch.Tensor]]]:
    """Spawn ``world_size`` processes, run every job on all of them, and return
    ``results[device][job]`` (each job's outputs as seen by that device; for a
    :class:`PipelineJob`, the last stage's processes hold the outputs, the others ``{}``)."""
    if backend not in ("gloo", "nccl"):
        raise DeviceError(f"unknown torch.distributed backend {backend!r}; accepted: gloo, nccl")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DeviceError("backend 'nccl' needs CUDA GPUs; none is present (use 'gloo' on the CPU)")
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="kascade-dist-") as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), list(jobs), out_dir, backend), nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]
