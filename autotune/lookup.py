"""Runtime config lookup: which config a kernel call uses, and why.

Order: a measured record for this exact shape bucket in the user's database; a measured
record shipped with the package (``autotune/configs/*.json``, written by ``kascade
export``); the nearest measured bucket of the same schedule, dtype, target and versions;
otherwise ``None``, and the caller takes the config the cost model ranks first. A config
is only used if the schedule still finds it feasible for the actual shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from kascade.autotune.db import TuningDatabase, TuningDatabaseError, TuningKey, TuningRecord, read_json
from kascade.backends.model import decode_extents
from kascade.backends.targets import Target
from kascade.passes.schedule import Config, Schedule

SHIPPED = Path(__file__).parent / "configs"


@cache
def software_versions() -> str:
    """What a tuned config depends on besides the schedule: a change is a miss."""
    import torch
    parts = []
    for pkg in ("kascade", "triton", "torch"):
        try:
            parts.append(f"{pkg}={version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg}=unknown")
    parts.append(f"cuda={torch.version.cuda or 'none'}")
    return " ".join(parts)


def target_key(target: Target) -> str:
    return f"{target.name} ({target.arch})"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# bucket entries a kernel is specialised to (or that change its work per token): a tuned config
# only transfers between buckets that agree on all of them
EXACT = ("E", "F", "R", "M0", "D", "K")


def shape_bucket(schedule: Schedule, extents: Mapping[str, int]) -> str:
    """Head dims exactly (kernels are specialised to them); sequence lengths and the number of
    (batch x head) programs rounded up to a power of two (at least 16). Paged decode: head dims,
    query heads per KV head and page size exactly; the longest sequence ``L`` and the
    (sequence x KV head) pairs as powers of two. MoE: see below."""
    if schedule.kernels[0].family == "paged_decode_partial":
        x = decode_extents(extents)
        out = {k: x[k] for k in ("E", "F", "R", "M0")}
        out.update(L=max(16, _pow2(x["L"])), seqs=_pow2(x["B"] * x["G"]))
        return ",".join(f"{k}={v}" for k, v in sorted(out.items()))
    if schedule.kernels[0].family == "moe_gate_up":
        # MoE: experts E, choices K, hidden D and FFN F exactly; tokens T as a power of two
        out = {k: int(extents[k]) for k in ("E", "K", "D", "F")}
        out["T"] = _pow2(int(extents["T"]))
        return ",".join(f"{k}={v}" for k, v in sorted(out.items()))
    c, body = schedule.cascade, schedule.kernels[0].body
    ext = {role: extents[c.rank_extent(r)] for role, r in
           (("E", body.head), ("F", body.vhead), ("P", body.query), ("M", body.key))}
    heads = math.prod(extents[c.rank_extent(r)] for r in body.grid_ranks)
    out = {"E": ext["E"], "F": ext["F"], "P": max(16, _pow2(ext["P"])), "M": max(16, _pow2(ext["M"])),
           "heads": _pow2(heads)}
    return ",".join(f"{k}={v}" for k, v in sorted(out.items()))


def _parse_bucket(bucket: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in bucket.split(","))}


def _distance(a: dict[str, int], b: dict[str, int]) -> float:
    """Log-distance between buckets; infinite when what the kernel is specialised to differs."""
    if a.keys() != b.keys() or any(a.get(k) != b.get(k) for k in EXACT):
        return math.inf
    return sum(abs(math.log2(a[k]) - math.log2(b[k])) for k in a if k not in EXACT)


def lookup(schedule: Schedule, extents: Mapping[str, int], dtype: str, target: Target,
           db: TuningDatabase | None = None, shipped: Path | None = SHIPPED,
           sizes: Mapping[str, int] | None = None) -> tuple[Config, str] | None:
    """``(config, why)`` from tuned records, or None (then the cost model decides)."""
    key = TuningKey(schedule.key(), shape_bucket(schedule, extents), dtype, target_key(target),
                    software_versions(), measured=True)

    def usable(rec: TuningRecord | None) -> Config | None:
        if rec is None:
            return None
        cfg = Config.of({k: int(v) for k, v in (item.split("=") for item in rec.config.split(","))})
        return cfg if schedule.feasible(cfg, sizes) is None else None

    db = db if db is not None else TuningDatabase()
    if (cfg := usable(rec := db.best(key))) is not None:
        return cfg, f"tuned: {rec.seconds * 1e6:.1f} us measured for bucket {key.bucket} ({rec.source})"
    candidates = [r for r in db.records(schedule=key.schedule, dtype=dtype, target=key.target,
                                        versions=key.versions, measured=True)]
    for rec, name in shipped_records(shipped):
        if rec.key == key and (cfg := usable(rec)) is not None:
            return cfg, f"shipped: {rec.seconds * 1e6:.1f} us measured for bucket {key.bucket} ({name})"
        if (rec.key.schedule, rec.key.dtype, rec.key.target, rec.key.versions, rec.key.measured) == \
                (key.schedule, dtype, key.target, key.versions, True):
            candidates.append(rec)
    for rec in nearest_records(key.bucket, candidates):
        if (cfg := usable(rec)) is not None:
            return cfg, f"nearest tuned bucket {rec.key.bucket} (asked {key.bucket})"
    return None


def shipped_records(shipped: Path | None = SHIPPED) -> list[tuple[TuningRecord, str]]:
    """The records shipped with the package (``autotune/configs/*.json``), each with its file's
    name, in file order; a broken shipped file is skipped (a miss, not a crash)."""
    out = []
    for path in sorted(shipped.glob("*.json")) if shipped is not None and shipped.is_dir() else ():
        try:
            out.extend((rec, path.name) for rec in read_json(path))
        except TuningDatabaseError:
            continue
    return out


def nearest_records(bucket: str, records: Iterable[TuningRecord]) -> list[TuningRecord]:
    """The records a kernel at ``bucket`` may borrow from: those whose bucket agrees on every
    entry the kernel is specialised to (``EXACT``), nearest first (log distance over the other
    entries; the exact bucket itself at distance 0), then fastest."""
    want = _parse_bucket(bucket)
    scored = [(_distance(want, _parse_bucket(r.key.bucket)), r.seconds, i, r) for i, r in enumerate(records)]
    return [r for d, _, _, r in sorted(scored, key=lambda x: x[:3]) if d < math.inf]
