"""Cluster assignments: what ``data_tools.cluster`` writes and the loaders read.

A folder with ``centroids.npy`` (float32 [k, D], L2-normalised), one ``<shard_stem>.npz`` per
feature-cache shard (``np.savez``, uncompressed):

  keys             [N] str          sample keys, in the feature cache's order
  ids              [N, topk] int32  the nearest centroids, nearest first
  sims             [N, topk] fp16   their cosine similarities
  skipped          [M] str          keys the extractor left out (corrupt image, missing caption)
  teacher_sha256   0-d str          the teacher whose image embeddings were clustered

and ``manifest.json`` (parameters, the teacher copied from the feature cache, fit and size statistics;
``complete`` is true once every shard has its file).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from cid_ds.data.errors import DataError
from cid_ds.data.features import _short, shard_file
from cid_ds.io import MANIFEST, atomic_path, load_numeric_npy, read_manifest

CENTROIDS = "centroids.npy"


def write_assignments(out_dir: str, stem: str, keys: list[str], ids: np.ndarray, sims: np.ndarray,
                      skipped: list[str], teacher_sha256: str) -> str:
    """Atomically write one shard's assignments."""
    path = shard_file(out_dir, stem)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz
        np.savez(f, keys=np.asarray(keys, dtype=str), ids=np.asarray(ids, dtype=np.int32),
                 sims=np.asarray(sims, dtype=np.float16), skipped=np.asarray(sorted(skipped), dtype=str),
                 teacher_sha256=np.asarray(teacher_sha256))
    return path


def stored_positives(clusters_dir: str) -> Optional[int]:
    """The nearest centroids stored per sample, as far as the manifest says (None: no manifest yet)."""
    manifest = read_manifest(clusters_dir)
    return None if manifest is None else int(manifest.get("topk", 1))


def fit_finished(clusters_dir: str) -> bool:
    """Whether the k-means fit is done: its centroids written and recorded in the manifest."""
    return os.path.isfile(os.path.join(clusters_dir, CENTROIDS)) and "fit_points" in (read_manifest(clusters_dir) or {})


@dataclass
class ShardClusters:
    """One shard's assignments: ``row[key]`` indexes ``ids`` and ``sims``; ``skipped`` as in the cache."""
    row: dict[str, int]
    ids: np.ndarray
    sims: np.ndarray
    skipped: frozenset[str]


class ClusterAssignments:
    """Read access to a cluster folder; opening it checks the manifest."""

    def __init__(self, clusters_dir: str):
        self.dir = clusters_dir
        self.manifest_path = os.path.join(clusters_dir, MANIFEST)
        if not os.path.isfile(self.manifest_path):
            raise FileNotFoundError(f"cluster assignments {clusters_dir}: no {MANIFEST} "
                                    "(write them with: python -m data_tools.cluster)")
        manifest = read_manifest(clusters_dir)
        for field in ("k", "topk", "dim", "teacher", "complete"):
            if manifest is None or field not in manifest:
                raise ValueError(f"cluster assignments {self.manifest_path}: field '{field}' is missing")
        if "weights_sha256" not in manifest["teacher"]:
            raise ValueError(f"cluster assignments {self.manifest_path}: field 'teacher.weights_sha256' is missing")
        self.manifest = manifest
        self.k: int = int(manifest["k"])
        self.topk: int = int(manifest["topk"])
        self.dim: int = int(manifest["dim"])
        self.teacher_index: Optional[int] = manifest.get("teacher_index")  # of an ensemble; None: all teachers
        self.teacher: dict = manifest["teacher"]
        self.teacher_sha256: str = self.teacher["weights_sha256"]
        self.complete: bool = bool(manifest["complete"])
        self.centroids_path = os.path.join(clusters_dir, CENTROIDS)
        self._recent_stem: Optional[str] = None
        self._recent: Optional[ShardClusters] = None

    def centroids(self) -> np.ndarray:
        """The float32 [k, D] centroids."""
        centroids = load_numeric_npy(self.centroids_path)
        if centroids.shape != (self.k, self.dim):
            raise DataError(f"{self.centroids_path}: shape {centroids.shape}, but {self.manifest_path} "
                            f"says k={self.k}, dim={self.dim}")
        return centroids.astype(np.float32, copy=False)

    def lookup(self, stem: str) -> Optional[ShardClusters]:
        """The assignments of shard ``stem``, or None if there is no file for it. The last shard is kept."""
        if stem != self._recent_stem:
            self._recent_stem, self._recent = stem, self._load(stem)
        return self._recent

    def _load(self, stem: str) -> Optional[ShardClusters]:
        path = shard_file(self.dir, stem)
        if not os.path.isfile(path):
            return None
        with np.load(path) as npz:
            keys, ids, sims, skipped = npz["keys"], npz["ids"], npz["sims"], npz["skipped"]
            sha = str(npz["teacher_sha256"])
        if sha != self.teacher_sha256:
            raise DataError(f"{path}: teacher_sha256 is {_short(sha)} but {self.manifest_path} says "
                            f"{_short(self.teacher_sha256)}")
        for name, array in (("ids", ids), ("sims", sims)):
            if array.shape != (len(keys), self.topk):
                raise DataError(f"{path}: field '{name}' has shape {array.shape}, expected ({len(keys)}, {self.topk})")
        if ids.size and not 0 <= ids.min() <= ids.max() < self.k:
            raise DataError(f"{path}: field 'ids' holds {ids.min()}..{ids.max()}, outside 0..{self.k - 1} (k={self.k})")
        return ShardClusters({key: i for i, key in enumerate(keys.tolist())}, ids, sims,
                             frozenset(skipped.tolist()))
