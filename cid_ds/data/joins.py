"""Every join of artifacts checks the teacher fingerprint.

A run, or an offline stage, joins artifacts made by earlier stages: a feature cache (data_tools.extract),
cluster assignments (data_tools.cluster), keep-lists (data_tools.balance), distill-ready shards
(data_tools.pack) and, with ``kd.teacher: online``, the teacher itself. Each records the teacher (set)
whose embeddings it holds or was made from; ``check_join`` refuses any two that differ in a fingerprint
field (``cid_ds.data.features.FINGERPRINT_FIELDS``: the weights' sha256, width, input size, preprocessing,
context length), naming both manifest files and both values.

A side feature cache over distill-ready shards (``data.features`` with packed ``data.train_shards``) is
looked up by the packed shard's name and the sample's key, so it must be extracted over the packed shards
themselves (``data_tools.extract --shards 'PACKED/*.tar'``), with the packed shards' teacher: it then
replaces their stored embeddings and views (to add stored views, or to re-extract), while their cluster ids
stay valid. A cache of another teacher is refused, and so is one extracted over the source shards the
packed shards were made from (the cache they were packed from, or another over the same sources): its
files are named after source shards, so a packed shard's name would find the wrong samples, or none.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

from cid_ds.config import ConfigError
from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.features import FINGERPRINT_FIELDS, FeatureCache, _short
from cid_ds.data.packed import PackedShards
from cid_ds.io import MANIFEST, read_manifest


@dataclass(frozen=True)
class Artifact:
    """One side of a join: what it is, the file that records its teacher, and that teacher entry."""
    kind: str
    path: str
    teacher: dict


def balance_artifact(balance_dir: str) -> Artifact:
    """The keep-lists of ``data_tools.balance`` in ``balance_dir``, by their manifest."""
    path = os.path.join(balance_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError(f"balance {balance_dir}: no {MANIFEST} (run python -m data_tools.balance)")
    return Artifact("balance", path, (read_manifest(balance_dir) or {}).get("teacher", {}))


Joined = Union[FeatureCache, ClusterAssignments, PackedShards, Artifact, None]


def check_join(*artifacts: Joined) -> None:
    """Refuse artifacts (None: not in play) that come from different teachers, with a ConfigError that
    names, per differing field, both manifest files and both values; the first artifact given is the one
    the others are compared to. Refuse a side cache that cannot be joined to packed shards (module doc)."""
    present = [_as_artifact(a) for a in artifacts if a is not None]
    lines = [line for other in present[1:] for line in teacher_conflicts(other, present[0])]
    if lines:
        raise ConfigError("\n".join(lines) + "\nthese were made from different teachers' embeddings: re-make the "
                          "odd one out from the same teacher (data_tools.extract, cluster, balance, pack)")
    packed = next((a for a in artifacts if isinstance(a, PackedShards)), None)
    cache = next((a for a in artifacts if isinstance(a, FeatureCache)), None)
    if packed is not None and cache is not None:
        _check_side_cache(packed, cache)


def _as_artifact(joined: Joined) -> Artifact:
    if isinstance(joined, Artifact):
        return joined
    kind = {FeatureCache: "feature cache", ClusterAssignments: "cluster assignments",
            PackedShards: "packed shards"}[type(joined)]
    return Artifact(kind, joined.manifest_path, joined.teacher)


def teacher_conflicts(other: Joined, reference: Joined) -> list[str]:
    """One line per fingerprint field where the teacher of ``other`` differs from that of ``reference``."""
    other, reference = _as_artifact(other), _as_artifact(reference)
    return [f"{other.kind} {other.path}: teacher.{field} is {_short(other.teacher.get(field))} but "
            f"{reference.kind} {reference.path} has {_short(reference.teacher.get(field))}"
            for field in FINGERPRINT_FIELDS if other.teacher.get(field) != reference.teacher.get(field)]


def _check_side_cache(packed: PackedShards, cache: FeatureCache) -> None:
    """Refuse a side cache extracted over the packed shards' sources instead of over the packed shards."""
    sources = {os.path.abspath(path) for path in packed.manifest.get("sources", [])}
    shards = cache.manifest.get("shards", {})
    over_sources = sorted(entry["source"] for entry in shards.values()
                          if os.path.abspath(entry.get("source", "")) in sources)
    if over_sources:
        raise ConfigError(
            f"feature cache {cache.manifest_path} was extracted over the source shards (e.g. {over_sources[0]}) "
            f"that the packed shards of {packed.manifest_path} were made from, but a packed sample is looked up by "
            "the packed shard's name: extract the side cache over the packed shards themselves (data_tools.extract "
            f"--shards '{os.path.dirname(packed.manifest_path)}/*.tar'), or leave data.features out (the packed "
            "shards already hold the rows of the cache they were packed from)")
