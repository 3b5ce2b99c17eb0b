"""The search space of a :class:`~kascade.passes.schedule.Schedule`, as Optuna sees it.

Each :class:`~kascade.passes.schedule.Choice` becomes one :class:`Axis`. Ordered axes get
numeric distributions so that samplers which model distances (TPE, GP, CMA-ES) can use
them: a choice over consecutive powers of two (tile sizes, warps) is an integer exponent
(``log2_BLOCK_M`` in 4..7), a choice over a run of consecutive integers (pipeline stages,
split counts) is that integer range; anything else is categorical.

The schedule's constraints are applied *before* anything is compiled or measured:
:meth:`SearchSpace.feasible` is the schedule's own pure check at this shape's sizes (head
dims, query heads per KV head, element size), so a search rejects a config at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from kascade.backends.model import schedule_sizes
from kascade.ir.errors import KascadeError
from kascade.passes.schedule import Config, Schedule

ENUMERATION_LIMIT = 200_000   # spaces larger than this are sampled, never enumerated


def _is_pow2_run(values: tuple[int, ...]) -> bool:
    return len(values) > 1 and all(v > 0 and v & (v - 1) == 0 for v in values) and \
        [v.bit_length() for v in values] == list(range(values[0].bit_length(), values[-1].bit_length() + 1))


def _is_int_run(values: tuple[int, ...]) -> bool:
    return len(values) > 1 and list(values) == list(range(values[0], values[-1] + 1))


@dataclass(frozen=True)
class Axis:
    """One free parameter: its name in a Config, its name in the study, its values and encoding.
    ``kind``: ``pow2`` (study value: the exponent), ``range`` (the value itself, ``log`` for wide
    ranges), ``ordinal`` (the index into sorted values that are neither, such as split counts
    stepping by ~1.5x: neighbours stay neighbours for TPE, unlike a categorical) or ``categorical``
    (two values that are not a run)."""
    name: str
    param: str
    values: tuple[int, ...]
    kind: str

    @classmethod
    def of(cls, name: str, values: tuple[int, ...]) -> Axis:
        values = tuple(sorted(set(values)))
        if _is_pow2_run(values):
            return cls(name, f"log2_{name}", values, "pow2")
        if _is_int_run(values):
            return cls(name, name, values, "range")
        if len(values) > 2:
            return cls(name, f"idx_{name}", values, "ordinal")
        return cls(name, name, values, "categorical")

    def distribution(self) -> BaseDistribution:
        if self.kind == "pow2":
            return IntDistribution(self.values[0].bit_length() - 1, self.values[-1].bit_length() - 1)
        if self.kind == "range":
            lo, hi = self.values[0], self.values[-1]
            return IntDistribution(lo, hi, log=lo >= 1 and hi / lo > 64)
        if self.kind == "ordinal":
            return IntDistribution(0, len(self.values) - 1)
        return CategoricalDistribution(self.values)

    def grid(self) -> list[int]:
        """Every study value of the axis (for Optuna's GridSampler)."""
        return [self.encode(v) for v in self.values]

    def encode(self, value: int) -> int:
        if self.kind == "ordinal":
            return self.values.index(value)
        return value.bit_length() - 1 if self.kind == "pow2" else value

    def decode(self, raw: Any) -> int:
        if self.kind == "ordinal":
            return self.values[int(raw)]
        return 1 << int(raw) if self.kind == "pow2" else int(raw)


class SearchSpace:
    """The free parameters of ``schedule`` at one shape (``sizes``: what its constraints read,
    see :func:`sizes_for`)."""

    def __init__(self, schedule: Schedule, sizes: Mapping[str, int]):
        if not schedule.space:
            raise KascadeError(f"schedule {schedule.key()} has no free parameters: nothing to tune")
        self.schedule = schedule
        self.sizes = dict(sizes)
        self.axes = tuple(Axis.of(c.name, c.values) for c in schedule.space)

    @property
    def size(self) -> int:
        """Configs in the product of the axes, feasible or not."""
        return math.prod(len(a.values) for a in self.axes)

    def distributions(self) -> dict[str, BaseDistribution]:
        return {a.param: a.distribution() for a in self.axes}

    def grid(self) -> dict[str, list[int]]:
        return {a.param: a.grid() for a in self.axes}

    def suggest(self, trial) -> Config:
        """Sample a config through an Optuna trial (define-by-run, axis order)."""
        out = {}
        for a in self.axes:
            d = a.distribution()
            if isinstance(d, IntDistribution):
                raw = trial.suggest_int(a.param, d.low, d.high, log=d.log)
            else:
                raw = trial.suggest_categorical(a.param, list(d.choices))
            out[a.name] = a.decode(raw)
        return Config.of(out)

    def config_of(self, params: Mapping[str, Any]) -> Config:
        """The config of a finished trial's ``params`` (study values)."""
        missing = [a.param for a in self.axes if a.param not in params]
        if missing:
            raise KascadeError(f"trial parameters {dict(params)} lack {missing}: the study was made for "
                               "another search space")
        return Config.of({a.name: a.decode(params[a.param]) for a in self.axes})

    def params_of(self, config: Config) -> dict[str, int]:
        """Study values for ``config`` (for ``study.enqueue_trial``)."""
        return {a.param: a.encode(config[a.name]) for a in self.axes}

    def feasible(self, config: Config) -> str | None:
        """Why the schedule rejects ``config`` at this shape, or None."""
        return self.schedule.feasible(config, self.sizes)

    def configs(self) -> Iterator[Config]:
        """Every feasible config, in a stable order (spaces up to ``ENUMERATION_LIMIT``)."""
        if self.size > ENUMERATION_LIMIT:
            raise KascadeError(f"the space has {self.size} configs; enumerating more than {ENUMERATION_LIMIT} "
                               "is refused (sample it instead)")
        for values in product(*(a.values for a in self.axes)):
            cfg = Config(tuple(zip((a.name for a in self.axes), values)))
            if self.feasible(cfg) is None:
                yield cfg

    def random_unseen(self, seen: set[str], rng: random.Random, tries: int = 2000) -> Config | None:
        """A feasible config whose key is not in ``seen``, or None when there is none (or none was
        found in ``tries`` draws of a space too large to enumerate)."""
        if self.size <= ENUMERATION_LIMIT:
            left = [c for c in self.configs() if c.key() not in seen]
            return rng.choice(left) if left else None
        for _ in range(tries):
            cfg = Config.of({a.name: rng.choice(a.values) for a in self.axes})
            if cfg.key() not in seen and self.feasible(cfg) is None:
                return cfg
        return None


sizes_for = schedule_sizes   # one definition, shared with the cost model's ranking


def parse_config(key: str) -> Config:
    """The inverse of ``Config.key()``: ``BLOCK_M=64,BLOCK_N=64`` -> Config."""
    try:
        return Config.of({k.strip(): int(v) for k, v in (item.split("=") for item in key.split(",") if item)})
    except ValueError:
        raise KascadeError(f"not a config key: {key!r} (expected NAME=INT,NAME=INT,...)") from None
