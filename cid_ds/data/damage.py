"""Damaged shards: the record every stage keeps of one, and the threshold that stops a job when damage
looks systemic.

A shard is damaged when it cannot be read to its end: empty, not a tar, cut mid-member, a compressed
stream cut short, an I/O error. Every stage that reads shards (data_tools.extract and pack, both
training loaders, cid_ds.evaluate) reads it through ``cid_ds.data.tars.until_damage``: the complete
samples before the damage are used, a ``ShardDamage`` (file, byte, samples kept) is recorded where the
stage records what it did, and the shard counts as done.

The threshold (``DamageBudget``): of N shards a stage reads (in training: all the run's shards, counted over
every rank, ``RunDamage``), with a fraction f (``data.max_damaged_fraction``,
``--max-damaged-fraction``; default ``DEFAULT_MAX_DAMAGED_FRACTION``), max(1, floor(f * N)) damaged shards
are accepted when f > 0, none when f = 0; one more stops the job. The floor of one keeps a single bad
shard of a small set (1 of 4 is 25%) from stopping it, while a wrong path or a dead mount, which
damages every shard, stops it at the second.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator

from cid_ds.data.errors import DataError

DEFAULT_MAX_DAMAGED_FRACTION = 0.01


@dataclass(frozen=True)
class ShardDamage:
    shard: str
    byte: int          # where the damage starts, in the tar (the decompressed tar, for a compressed shard)
    samples_kept: int  # the complete samples before it, which were read
    problem: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"shard {self.shard} is damaged at byte {self.byte} ({self.problem}): the {self.samples_kept} "
                "samples before it are used, the rest is skipped")


class TooMuchDamage(DataError):
    """More shards are damaged than the threshold accepts."""


def check_fraction(value: float, setting: str) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"{setting} must be in [0, 1], got {value}")


class DamageBudget:
    """Counts the damaged shards among ``shards`` and stops past the threshold (module docstring)."""

    def __init__(self, shards: int, max_fraction: float, setting: str):
        check_fraction(max_fraction, setting)
        self.shards, self.max_fraction, self.setting = shards, max_fraction, setting
        self.allowed = max(1, int(max_fraction * shards)) if max_fraction > 0 else 0
        self.damaged: dict[str, ShardDamage] = {}

    def add(self, record: ShardDamage) -> None:
        """Count a damaged shard (once per shard); raise TooMuchDamage past the threshold."""
        self.damaged.setdefault(record.shard, record)
        if len(self.damaged) > self.allowed:
            raise TooMuchDamage(self.message(len(self.damaged), self.damaged.values()))

    def message(self, count: int, records: Iterable[ShardDamage]) -> str:
        """Why ``count`` damaged shards stop the job, listing (the first five of) ``records``."""
        listed = "\n  ".join(record.describe() for record in list(records)[:5])
        return (f"{count} of {self.shards} shards are damaged ({count / self.shards:.1%}), more than {self.setting} = "
                f"{self.max_fraction} accepts ({self.allowed}); damage this widespread looks systemic (a wrong path, "
                f"a dead mount, a copy still running), so the job stops:\n  {listed}")


def carry_damage(batches: Iterable[dict]) -> Iterator[dict]:
    """A training loader's batches; the ``damaged_shards`` of a report-only item (no ``image``: damage found
    after a worker's last batch) go with the next batch."""
    carried: list[ShardDamage] = []
    for batch in batches:
        carried += batch["damaged_shards"]
        if "image" in batch:
            batch["damaged_shards"], carried = carried, []
            yield batch


class RunDamage:
    """The training run's threshold, over all its shards and every rank. Ranks read disjoint shards, so the
    run's damaged shards are the sum of the ranks' distinct ones; ``check`` agrees on that sum (a collective:
    every rank calls it at the same step) and every rank stops together past the threshold. A per-rank
    budget would stop a large job by chance (640 shards a rank accept 6; at half the threshold's rate some
    rank of 64 passes 6 in most epochs) and one rank alone."""

    def __init__(self, shards: int, max_fraction: float):
        self.budget = DamageBudget(shards, max_fraction, "data.max_damaged_fraction")
        self.local: dict[str, ShardDamage] = {}  # this rank's, each shard once over all epochs
        self.count = 0  # the run's, as last agreed

    def add(self, records: Iterable[ShardDamage]) -> None:
        for record in records:
            self.local.setdefault(record.shard, record)

    def check(self, device) -> None:
        import torch
        import torch.distributed as dist
        count = torch.tensor([float(len(self.local))], device=device)
        if dist.is_initialized():
            dist.all_reduce(count)
        self.count = int(count.item())
        if self.count > self.budget.allowed:
            raise TooMuchDamage(self.budget.message(self.count, self.local.values()))
