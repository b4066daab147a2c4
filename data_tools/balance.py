"""Image semantic balance: inside each cluster, group near-duplicate images and keep one of each group.

  python -m data_tools.balance --features runs/feats --clusters runs/clusters --out runs/balance \\
      [--perceptual 0.98] [--target-keep-fraction 0.563 | --semantic T] [--max-removed-fraction 0.6] \\
      [--workers N] [--block-size 4096] [--part-rows 65536] [--tune-samples 100000] [--seed 0]

Inside each cluster (the top-1 id written by data_tools.cluster), every pair of samples whose teacher
image embeddings (float32, L2-normalised) have a cosine similarity above the semantic threshold is
linked; union-find merges the links into groups, and each group keeps the member nearest its mean
embedding (the largest dot product with the group's sum; ties go to the first in cache order: shard
stem, then row in the shard). The perceptual threshold (higher) only labels what was removed: a removed
sample is a *perceptual* duplicate when its similarity to at least one other sample of its cluster is
above it (near-identical: copies, re-encodes, light edits), otherwise a *semantic* duplicate (every
one of its links lies in (semantic, perceptual]).

Memory. One pass over the cluster files orders the samples by cluster (the keys, 4 bytes a character, and
~56 bytes a sample stay in memory, in every process); one pass over the cache writes the fp16 image embeddings
this process needs, in that order, to OUT/by_cluster.<rank>-of-<world>.<digest>.npy (its parts' rows and the
tuning sample's, deleted when its parts are done), one shard at a time through a memory map that is closed after
each shard. A cluster is compared tile by tile, so no matrix grows with the square of its size: a process holds
one float32 tile (4 x block-size^2 bytes) and its cluster's rows in float32.

Work. Consecutive clusters are cut into parts (those starting in the same run of --part-rows cluster-
ordered samples; a big cluster makes its own part), processed by --workers processes (default: one per
CPU), each multiplying on one thread. Each finished part is written atomically to OUT/parts/, so a re-run
after a crash or a kill skips finished parts. The result does not depend on --workers, nor on
--block-size (except for a similarity within float rounding of a threshold). A re-run into the same OUT
refuses other parameters, other inputs or a cache from another teacher.

Spread over processes (data_tools.spread: a launcher's RANK/WORLD_SIZE, or ``python -m data_tools.spread -n N
-- python -m data_tools.balance ...``), each process balances a run of consecutive parts holding about 1/N of
the work (a cluster of n samples costs ~n^2), with a pool of the CPUs its machine gives it, and copies only
those parts' rows: the copy on disk is per process, not per dataset. Every process with parts tunes the
threshold on the same sample (so none waits for another; one without parts copies and tunes nothing), and the
process that finds every part written writes the keep-lists, the report and the complete manifest: the same
files whatever the process count, and any count finishes a run that another left.

The semantic threshold. By default it is tuned to keep 0.563 of the samples (DEFAULT_KEEP_FRACTION), so
that it fits the teacher's own similarity distribution: a seeded sample of whole clusters (drawn uniformly
until it holds --tune-samples samples) is balanced at thresholds chosen by bisection between 0 and
--perceptual, and the lowest threshold found (to 1e-4) at which the sample keeps at least the fraction is
used. A teacher that maps most images of a cluster within --perceptual of each other (one barely trained,
or collapsed) keeps too few even there: the bisection then goes on between --perceptual and 1, and every
sample removed counts as a perceptual duplicate (the report's tuning says above_perceptual). Only
identical embeddings can put the fraction out of reach. --target-keep-fraction F tunes for F instead;
--semantic T fixes the threshold at T.

The guard. Whatever the mode, a balance that would remove more than --max-removed-fraction of the samples
(default 0.6) stops with an error that gives the numbers, before it writes a keep-list or a complete
manifest; its finished parts stay, so a re-run with --max-removed-fraction 1 resumes them. A fixed
--semantic is first tried on the tuning sample of clusters, which stops it before the full pass; a
--target-keep-fraction below 1 - --max-removed-fraction is refused before any work.

Output in OUT:
  <shard_stem>.npz     one per cache shard (np.savez): kept [K] str sorted; removed [R] str sorted;
                       merged_into [R] str and merged_into_shard [R] str, the kept sample (key and shard
                       stem) each removed one was grouped with; perceptual [R] bool; teacher_sha256
  balance_report.json  the kept fraction first, then the mode (how the threshold was chosen), kept/removed
                       totals, removed_perceptual / removed_semantic, groups, thresholds, tuning, the
                       guard, largest tile, timing, and last the per-cluster sizes before and after
  balance_sizes.png    cluster sizes before and after, sorted, log-log
  manifest.json        parameters, teacher, inputs and their manifests, totals, complete
  parts/<n>.npz        intermediate: each part's representatives, in cluster order
"""
from __future__ import annotations

import contextlib
import functools
import gc
import glob
import hashlib
import json
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.pool import Pool
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from matplotlib.figure import Figure
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import cid_ds
from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.errors import DataError
from cid_ds.data.features import FeatureCache, shard_file
from cid_ds.data.joins import check_join
from cid_ds.io import MANIFEST, atomic_path, read_manifest, write_json
from data_tools.cluster import load_image_rows, unit_rows
from data_tools.options import flag, run_stage
from data_tools.outputs import check_rerun, save_figure
from data_tools.spread import Share, cpus_per_process

REPORT = "balance_report.json"
PLOT = "balance_sizes.png"
BY_CLUSTER = "by_cluster"  # by_cluster.<rank>-of-<world>.<ranges digest>.npy: a process's copy
PARTS = "parts"
SLAB = 1 << 20  # similarity entries compared at a time: bounds the masks and the link arrays of a dense tile
TUNE_STEPS = 14  # bisection steps: the bracket shrinks to perceptual / 2**14 < 1e-4
# CLIP-CID (Yang et al., AAAI 2025): its image semantic balance kept 56.3% of LAION-400M.
DEFAULT_KEEP_FRACTION = 0.563
DEFAULT_MAX_REMOVED_FRACTION = 0.6


class TooMuchRemoved(ValueError):
    """The balance would remove more than ``max_removed_fraction`` of the samples."""


@dataclass(frozen=True, kw_only=True)
class BalanceOptions:
    """What data_tools.balance is asked: its flags, with their defaults."""
    features: str = flag(help="teacher feature cache (python -m data_tools.extract)")
    clusters: str = flag(help="cluster assignments (python -m data_tools.cluster)")
    out: str = flag(help="output folder")
    perceptual: float = flag(0.98, "cosine above which a removed sample counts as a near-identical (perceptual) "
                                   "duplicate")
    target_keep_fraction: Optional[float] = flag(
        None, "tune the semantic threshold to keep this fraction of a seeded sample of clusters "
              f"(default {DEFAULT_KEEP_FRACTION}: what CLIP-CID kept of LAION-400M)", type=float, group="threshold")
    semantic: Optional[float] = flag(None, "instead: a fixed cosine above which two samples of a cluster are linked",
                                     type=float, group="threshold")
    max_removed_fraction: float = flag(DEFAULT_MAX_REMOVED_FRACTION,
                                       "stop, writing no keep-list, when the balance would remove more than this "
                                       "fraction of the samples (1 accepts any)")
    workers: int = flag(0, "processes balancing clusters (default: one per CPU)")
    block_size: int = flag(4096, "side of a similarity tile (float32: 4 x side^2 bytes per process)")
    part_rows: int = flag(65536, "samples per resumable part (about)")
    tune_samples: int = flag(100_000, "samples in the clusters drawn to tune --target-keep-fraction")
    seed: int = flag(0, "draw of the tuning clusters")

    @property
    def keep_fraction(self) -> Optional[float]:
        """The fraction the threshold is tuned to keep (None: a fixed --semantic)."""
        return DEFAULT_KEEP_FRACTION if self.semantic is None and self.target_keep_fraction is None \
            else self.target_keep_fraction

    @property
    def mode(self) -> str:
        """How the semantic threshold is chosen, in the CLI's words."""
        if self.semantic is not None:
            return f"fixed --semantic {self.semantic}"
        if self.target_keep_fraction is None:
            return f"threshold tuned to keep {DEFAULT_KEEP_FRACTION} (default)"
        return f"threshold tuned to keep {self.target_keep_fraction} (--target-keep-fraction)"

    def check(self) -> None:
        if self.semantic is not None and self.target_keep_fraction is not None:
            raise ValueError("give exactly one of semantic (a threshold) and target_keep_fraction")
        for name, value in (("perceptual", self.perceptual), ("semantic", self.semantic)):
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name} threshold must be a cosine similarity in (0, 1), got {value}")
        if self.semantic is not None and self.perceptual < self.semantic:
            raise ValueError(f"perceptual threshold ({self.perceptual}) must not be below the semantic threshold "
                             f"({self.semantic}): perceptual duplicates are the nearer ones")
        keep, most = self.keep_fraction, self.max_removed_fraction
        if keep is not None and not 0 < keep <= 1:
            raise ValueError(f"target_keep_fraction must be in (0, 1], got {keep}")
        if not 0 <= most <= 1:
            raise ValueError(f"max_removed_fraction must be in [0, 1], got {most}")
        if keep is not None and 1 - keep > most:
            raise TooMuchRemoved(f"target_keep_fraction {keep} would remove {1 - keep:.1%} of the samples, more "
                                 f"than --max-removed-fraction {most} allows: to accept it, --max-removed-fraction "
                                 f"{1 - keep:.4g} or more")
        for name, value in (("workers", self.workers or cpus_per_process()), ("block_size", self.block_size),
                            ("part_rows", self.part_rows), ("tune_samples", self.tune_samples)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class Layout:
    """Every sample, by its index in cache order (shards by stem, then rows) and by its position in
    cluster order (cluster id, then cache order): ``order[position] = index``."""
    stems: list[str]
    offsets: np.ndarray  # [shards + 1] index of each shard's first sample
    keys: np.ndarray     # [N] str
    cluster: np.ndarray  # [N] int32, top-1
    order: np.ndarray    # [N] int64
    starts: np.ndarray   # [k + 1] position of each cluster's first sample


def read_layout(assignments: ClusterAssignments, shards: dict[str, int]) -> Layout:
    """One pass over the cluster files: keys and top-1 ids, checked against the cache's sample counts."""
    keys, ids = [], []
    for stem, samples in tqdm(shards.items(), desc="read clusters", unit="shard"):
        shard = assignments.lookup(stem)
        if shard is None:
            raise FileNotFoundError(f"cluster assignments {assignments.dir}: no {shard_file(assignments.dir, stem)} "
                                    f"for shard {stem} of the feature cache")
        if len(shard.row) != samples:
            raise DataError(f"{shard_file(assignments.dir, stem)}: {len(shard.row)} keys but the feature cache "
                            f"has {samples} for shard {stem}")
        keys.append(np.asarray(list(shard.row), dtype=str))
        ids.append(shard.ids[:, 0])
    cluster = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    order = np.argsort(cluster, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(cluster, minlength=assignments.k))])
    offsets = np.concatenate([[0], np.cumsum(list(shards.values()), dtype=np.int64)])
    return Layout(list(shards), offsets, np.concatenate(keys) if keys else np.zeros(0, str), cluster, order, starts)


@dataclass(frozen=True)
class RowCopy:
    """A process's copy of the fp16 image embeddings of some runs of cluster-ordered positions: ``ranges``
    [R, 2] (sorted, disjoint, ``[first, last)``), stored one after another in the .npy file at ``path``."""
    path: str
    ranges: np.ndarray

    @classmethod
    def of(cls, out_dir: str, share: Share, ranges: list[tuple[int, int]]) -> "RowCopy":
        merged: list[list[int]] = []
        for first, last in sorted(ranges):
            if merged and first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], last)
            elif last > first:
                merged.append([first, last])
        held = np.asarray(merged, np.int64).reshape(-1, 2)
        digest = hashlib.sha256(held.tobytes()).hexdigest()[:12]
        return cls(os.path.join(out_dir, f"{BY_CLUSTER}.{share.rank}-of-{share.world}.{digest}.npy"), held)

    def local(self, first: int, last: int) -> slice:
        """Where positions ``[first, last)`` (inside one of the ranges) are in the file."""
        i = int(np.searchsorted(self.ranges[:, 0], first, side="right")) - 1
        start = int(np.diff(self.ranges[:i], axis=1).sum()) + first - int(self.ranges[i, 0])
        return slice(start, start + last - first)

    def rows(self, first: int, last: int) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")[self.local(first, last)]


def write_by_cluster(cache: FeatureCache, shards: dict[str, int], layout: Layout, copy: RowCopy) -> None:
    """The cache's fp16 image rows at ``copy``'s positions, in cluster order, as a .npy file written one shard
    at a time (a shard none of whose rows it holds is not read)."""
    wanted = np.zeros(len(layout.order), bool)
    for first, last in copy.ranges.tolist():
        wanted[first:last] = True
    row_of = np.full(len(layout.order), -1, np.int64)  # by cache index: its row in the file, -1 if not held
    row_of[layout.order[wanted]] = np.arange(int(wanted.sum()))
    with atomic_path(copy.path) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(int(wanted.sum()), cache.embed_dim))
        for s, (stem, samples) in enumerate(tqdm(shards.items(), desc="order by cluster", unit="shard")):
            first, last = layout.offsets[s], layout.offsets[s + 1]
            wanted = row_of[first:last] >= 0
            if not wanted.any():
                continue
            features = load_image_rows(cache, stem, samples)
            if list(features.row) != layout.keys[first:last].tolist():
                raise DataError(f"{shard_file(cache.dir, stem)}: its keys are not those of the cluster "
                                f"assignments' file for shard {stem}, in the same order")
            # Mapped for one shard only: touched pages leave the process when the map is closed.
            rows = np.lib.format.open_memmap(tmp, mode="r+")
            rows[row_of[first:last][wanted]] = features.image[wanted]
            rows.flush()
            del rows


def _compress(parent: np.ndarray) -> None:
    """Point every element at its root, by pointer jumping: log2(depth) passes."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return
        parent[:] = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the groups of each pair ``(a[i], b[i])``: the larger root is pointed at the smaller one."""
    while a.size:
        _compress(parent)
        a, b = parent[a], parent[b]
        differ = a != b
        a, b = np.minimum(a[differ], b[differ]), np.maximum(a[differ], b[differ])
        parent[b] = a  # where pairs share a b, one write wins; the others are retried with the new roots


def _link(parent: np.ndarray, perceptual_link: np.ndarray, sims: np.ndarray, semantic: float, perceptual: float,
          row0: int, col0: int) -> None:
    """Union the pairs of the tile ``sims`` (rows from ``row0``, columns from ``col0``) above ``semantic``
    and flag those above ``perceptual``, a slab of rows at a time; on the diagonal (row0 == col0) only the
    pairs above it."""
    rows = max(1, SLAB // sims.shape[1])
    for start in range(0, len(sims), rows):
        slab = sims[start:start + rows]
        linked = slab > semantic
        if row0 == col0:
            linked = np.triu(linked, start + 1)
        a, b = np.nonzero(linked)
        if a.size:
            near = slab[a, b] > perceptual
            a += row0 + start
            b += col0
            perceptual_link[a[near]] = perceptual_link[b[near]] = True
            _union(parent, a, b)


def representatives(x: np.ndarray, labels: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """``rep[i]``: the member of i's group (same label) with the largest dot product with the group's sum,
    the lowest index among equals. Sums and scores are float64, accumulated in index order ``chunk`` rows
    at a time, so that equal rows tie exactly wherever they sit in memory."""
    rep = np.arange(len(labels))
    members = np.flatnonzero(np.bincount(labels, minlength=len(labels))[labels] > 1)
    if not members.size:
        return rep
    groups, which, counts = np.unique(labels[members], return_inverse=True, return_counts=True)
    sums = np.zeros((len(groups), x.shape[1]))
    for i in range(0, len(members), chunk):
        np.add.at(sums, which[i:i + chunk], x[members[i:i + chunk]])
    score = np.concatenate([(x[members[i:i + chunk]].astype(np.float64) * sums[which[i:i + chunk]]).sum(1)
                            for i in range(0, len(members), chunk)])
    order = np.lexsort((members, -score, which))  # by group, best score first, then lowest index
    best = order[np.concatenate([[0], np.cumsum(counts)[:-1]])]
    rep[members] = members[best][which]
    return rep


def similarity_tiles(x: np.ndarray, block_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """The upper triangle of ``x @ x.T`` in tiles of at most block_size x block_size: ``(row0, col0, sims)``,
    each tile a view of one reused buffer (a new one faults in)."""
    n = len(x)
    tile = np.empty(min(n, block_size) ** 2, dtype=x.dtype)
    for i in range(0, n, block_size):
        for j in range(i, n, block_size):
            rows, cols = x[i:i + block_size], x[j:j + block_size]
            yield i, j, np.matmul(rows, cols.T, out=tile[:len(rows) * len(cols)].reshape(len(rows), len(cols)))


def group_cluster(x: np.ndarray, semantic: float, perceptual: float, block_size: int
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Balance one cluster of unit rows ``x`` [n, D] (float32): ``(rep, perceptual_link, largest_tile)``,
    where ``rep[i]`` is the index of the member kept for i's group (i itself if kept) and
    ``perceptual_link[i]`` whether i is above ``perceptual`` with another row. Similarities are computed
    in tiles of at most block_size x block_size, the upper triangle only."""
    n = len(x)
    parent = np.arange(n)
    perceptual_link = np.zeros(n, bool)
    largest = (0, 0)
    for i, j, sims in similarity_tiles(x, block_size):
        largest = max(largest, sims.shape, key=lambda shape: shape[0] * shape[1])
        _link(parent, perceptual_link, sims, semantic, perceptual, i, j)
    _compress(parent)
    return representatives(x, parent), perceptual_link, largest


def spanning_similarities(x: np.ndarray, block_size: int) -> np.ndarray:
    """The n - 1 similarities of a maximum spanning tree of a cluster of unit rows ``x`` that fits one tile
    (n <= block_size), by Prim's algorithm on the tile ``group_cluster`` computes. At any threshold t the tree's
    edges above t join exactly what all edges above t join, so the cluster keeps ``n - (tree > t).sum()``
    samples: one pass gives the count at every threshold the tuning tries."""
    n = len(x)
    if n > block_size:
        raise ValueError(f"a cluster of {n} rows is over one tile of {block_size}")
    _, _, sims = next(similarity_tiles(x, block_size))
    itself = np.full(1, -np.inf, sims.dtype)

    def similar_to(row: int) -> np.ndarray:
        """``row``'s similarity to every row, each pair's upper-triangle value as group_cluster compares it; NaN,
        never above a threshold there, as -inf (no copy of the tile: it is the process's largest array)."""
        similar = np.concatenate([sims[:row, row], itself, sims[row, row + 1:]])
        similar[np.isnan(similar)] = -np.inf
        return similar

    tree = np.empty(max(n - 1, 0), sims.dtype)
    best = similar_to(0)  # each row's highest similarity to the tree
    outside = np.ones(n, bool)
    outside[0] = False
    for edge in range(n - 1):
        row = int(np.argmax(np.where(outside, best, -np.inf)))
        tree[edge], outside[row] = best[row], False
        np.maximum(best, similar_to(row), out=best)
    return tree


def _balance_part(task: tuple[str, np.ndarray], copy: RowCopy, semantic: float, perceptual: float,
                  block_size: int) -> int:
    """Balance the clusters bounded by ``starts`` (positions in cluster order), write the part file and
    return its number of rows."""
    path, starts = task
    first, last = int(starts[0]), int(starts[-1])
    by_cluster = copy.rows(first, last)
    rep = np.arange(first, last)
    perceptual_link = np.zeros(last - first, bool)
    largest = (0, 0)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        if b - a > 1:
            cluster_rep, cluster_link, tile = group_cluster(unit_rows(by_cluster[a - first:b - first]), semantic,
                                                            perceptual, block_size)
            rep[a - first:b - first] = a + cluster_rep
            perceptual_link[a - first:b - first] = cluster_link
            largest = max(largest, tile, key=lambda shape: shape[0] * shape[1])
    del by_cluster
    _save_npz(path, rows=np.asarray([first, last]), rep=rep, perceptual=perceptual_link,
              largest_tile=np.asarray(largest))
    return last - first


def _kept_in(bounds: tuple[int, int], copy: RowCopy, semantic: float, block_size: int) -> int:
    """How many samples of the cluster at rows ``bounds`` (cluster order) the threshold keeps."""
    rep, _, _ = group_cluster(unit_rows(copy.rows(*bounds)), semantic, 1.0, block_size)
    return int((rep == np.arange(len(rep))).sum())


def _save_npz(path: str, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz
        np.savez(f, **arrays)


def plan_parts(starts: np.ndarray, part_rows: int) -> list[tuple[int, int]]:
    """``(first cluster, end cluster)`` of each part: the non-empty clusters whose first sample falls in
    the same run of ``part_rows`` positions."""
    clusters = np.flatnonzero(np.diff(starts))
    if not clusters.size:
        return []
    bucket = starts[clusters] // part_rows
    cut = np.flatnonzero(bucket[1:] != bucket[:-1]) + 1
    firsts = clusters[np.concatenate([[0], cut])]
    ends = np.concatenate([clusters[cut - 1] + 1, [clusters[-1] + 1]])
    return list(zip(firsts.tolist(), ends.tolist()))


def tuning_sample(starts: np.ndarray, tune_samples: int, seed: int) -> list[tuple[int, int]]:
    """Row bounds of whole non-empty clusters drawn uniformly (seeded) until they hold ``tune_samples``."""
    sizes = np.diff(starts)
    drawn = np.random.default_rng(seed).permutation(np.flatnonzero(sizes))
    enough = int(np.searchsorted(np.cumsum(sizes[drawn]), tune_samples)) + 1
    return [(int(starts[c]), int(starts[c + 1])) for c in np.sort(drawn[:enough])]


def tune_semantic(kept_at: Callable[[float], int], samples: int, target: float, perceptual: float) -> dict:
    """The lowest semantic threshold (bisection, ``TUNE_STEPS`` steps) at which ``kept_at(threshold)`` (samples
    kept out of ``samples``, non-decreasing in the threshold) is at least ``target * samples``: between 0
    and ``perceptual``, or, when even ``perceptual`` keeps too few (a teacher that maps most images of a
    cluster within ``perceptual`` of each other), between ``perceptual`` and 1, where every removed sample
    is a perceptual duplicate."""
    low, high = 0.0, perceptual
    kept_high = kept_at(high)
    above_perceptual = kept_high < target * samples
    if above_perceptual:
        low, high = perceptual, float(np.nextafter(np.float32(1), np.float32(0)))  # the highest float32 below 1
        kept_high = kept_at(high)
        if kept_high < target * samples:
            raise ValueError(f"target_keep_fraction {target} is out of reach: even at a semantic threshold just "
                             f"below 1 the tuning sample keeps {kept_high / samples:.4f} (identical embeddings); "
                             "lower --target-keep-fraction")
    for _ in range(TUNE_STEPS):
        middle = (low + high) / 2
        kept = kept_at(middle)
        if kept >= target * samples:
            high, kept_high = middle, kept
        else:
            low = middle
    return {"semantic": high, "sample_keep_fraction": kept_high / samples, "steps": TUNE_STEPS,
            "above_perceptual": above_perceptual}


def plot_balance(before: np.ndarray, after: np.ndarray, path: str) -> None:
    """The non-empty cluster sizes before and after, each sorted largest first, log-log."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for sizes, label in ((before, "before"), (after, "after")):
        sizes = np.sort(sizes[sizes > 0])[::-1]
        ax.loglog(np.arange(1, len(sizes) + 1), sizes, label=f"{label}: {sizes.sum()} samples")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("samples in the cluster")
    ax.set_title(f"k = {len(before)}, largest {before.max(initial=0)} -> {after.max(initial=0)}")
    ax.legend()
    save_figure(fig, path)


def _check_removed(kept: int, samples: int, max_removed_fraction: float, semantic: float, mode: str,
                  scope: str) -> None:
    """Raise TooMuchRemoved when keeping ``kept`` of ``samples`` removes more than ``max_removed_fraction``;
    ``scope`` says what was counted and what stays on disk."""
    removed = samples - kept
    if removed <= max_removed_fraction * samples:
        return
    share = removed / samples
    raise TooMuchRemoved(
        f"semantic threshold {semantic:.4f}, {mode}, would keep {kept:,} of {samples:,} samples "
        f"({kept / samples:.1%}) and remove {share:.1%}, more than --max-removed-fraction {max_removed_fraction} "
        f"allows ({scope}).\nTo accept it: --max-removed-fraction 1 (or any value from "
        f"{math.ceil(share * 1e4) / 1e4}); a re-run into the same --out resumes. To keep more: "
        "--target-keep-fraction F or a higher --semantic, into another --out.")


def _open_inputs(features_dir: str, clusters_dir: str) -> tuple[FeatureCache, dict[str, int], ClusterAssignments]:
    cache = FeatureCache(features_dir, with_views=False)
    shards = cache.shard_samples()
    assignments = ClusterAssignments(clusters_dir)
    if not assignments.complete:
        raise ValueError(f"cluster assignments {assignments.manifest_path}: complete is false "
                         "(finish python -m data_tools.cluster first)")
    check_join(cache, assignments)
    return cache, shards, assignments


def _pool_worker_setup() -> None:
    """One thread per pool process, and SIGTERM's default action: a forked worker inherits the parent's
    handlers (cid_ds.faults.StopSignal's only sets a flag), and the pool's terminate() at the end of its block
    would then wait forever for a worker that does not end. A make test run hung in that join once, while the
    disk was also full, so which of the two caused it is not known."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threadpool_limits(1)


@contextlib.contextmanager
def _processes(workers: int) -> Iterator[Optional[Pool]]:
    """A pool of ``workers`` processes, or None (this process) for one. Every process multiplies on one
    thread: no oversubscribed cores, and no result that could depend on a thread count."""
    if workers > 1:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        gc.freeze()  # forked workers' garbage collection would otherwise copy every page of the parent's objects
        try:
            with context.Pool(workers, initializer=_pool_worker_setup) as pool:
                yield pool
        finally:
            gc.unfreeze()
        return
    with threadpool_limits(1):
        yield None


def _run(pool: Optional[Pool], fn: Callable, tasks: list, chunksize: int = 1) -> Iterator:
    """``fn`` over ``tasks``, in this process or in the pool's workers (results in any order)."""
    return map(fn, tasks) if pool is None else pool.imap_unordered(fn, tasks, chunksize=chunksize)


def _assemble(layout: Layout, parts: Iterable[str]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(rep, perceptual_link, largest_tile)`` in cache order from the part files."""
    rep_position = np.arange(len(layout.order))
    link_position = np.zeros(len(layout.order), bool)
    largest = (0, 0)
    for path in parts:
        with np.load(path) as part:
            first, last = part["rows"].tolist()
            rep_position[first:last], link_position[first:last] = part["rep"], part["perceptual"]
            largest = max(largest, tuple(part["largest_tile"].tolist()), key=lambda shape: shape[0] * shape[1])
    rep, perceptual_link = np.empty_like(rep_position), np.empty_like(link_position)
    rep[layout.order], perceptual_link[layout.order] = layout.order[rep_position], link_position
    return rep, perceptual_link, largest


def write_keep_lists(out_dir: str, layout: Layout, rep: np.ndarray, perceptual_link: np.ndarray,
                     teacher_sha256: str) -> None:
    """``out_dir/<stem>.npz`` for every shard (fields in the module docstring)."""
    stems = np.asarray(layout.stems, dtype=str)
    for s, stem in enumerate(layout.stems):
        first, last = layout.offsets[s], layout.offsets[s + 1]
        index = np.arange(first, last)
        kept = rep[first:last] == index
        removed = index[~kept]
        removed = removed[np.argsort(layout.keys[removed], kind="stable")]
        merged = rep[removed]
        _save_npz(shard_file(out_dir, stem), kept=np.sort(layout.keys[first:last][kept]),
                  removed=layout.keys[removed], merged_into=layout.keys[merged],
                  merged_into_shard=stems[np.searchsorted(layout.offsets, merged, side="right") - 1],
                  perceptual=perceptual_link[removed], teacher_sha256=np.asarray(teacher_sha256))


def balance(options: BalanceOptions, share: Share = Share()) -> Optional[dict]:
    """Balance ``share``'s clusters (resuming finished parts); the process that finds every part written then
    writes the keep-lists, the report, the plot and the complete manifest, and returns the report (the others
    return None). The semantic threshold is ``semantic`` when given, otherwise the one tuned to keep
    ``target_keep_fraction`` (default DEFAULT_KEEP_FRACTION) of a sample of clusters. Raises TooMuchRemoved,
    having written no keep-list, when the balance would remove more than ``max_removed_fraction`` of the
    samples (a fixed ``semantic`` is first tried on the tuning sample, before the full pass). ``workers`` 0
    means one per CPU this process may use (data_tools.spread.cpus_per_process)."""
    options.check()
    out_dir, perceptual, block_size, seed = options.out, options.perceptual, options.block_size, options.seed
    target_keep_fraction, max_removed_fraction, mode = options.keep_fraction, options.max_removed_fraction, options.mode
    workers = options.workers or cpus_per_process()
    cache, shards, assignments = _open_inputs(options.features, options.clusters)
    start = time.time()
    layout = read_layout(assignments, shards)
    before = np.diff(layout.starts)
    tuning = target_keep_fraction is not None
    identity = {"perceptual": perceptual, "semantic": options.semantic,
                "target_keep_fraction": target_keep_fraction,
                "tune_samples": options.tune_samples if tuning else None, "seed": seed if tuning else None,
                "part_rows": options.part_rows, "k": assignments.k, "samples": len(layout.order),
                "cluster_sizes_sha256": hashlib.sha256(before.astype(np.int64).tobytes()).hexdigest()}
    manifest = check_rerun(out_dir, identity, "balance runs", cache)
    if manifest is None:
        manifest = dict(identity, teacher=cache.teacher, features=os.path.abspath(options.features),
                        clusters=os.path.abspath(options.clusters), code_version=cid_ds.__version__, complete=False,
                        upstream={"features": cache.manifest, "clusters": assignments.manifest})
        write_json(os.path.join(out_dir, MANIFEST), manifest)

    parts_dir = os.path.join(out_dir, PARTS)
    parts = [(os.path.join(parts_dir, f"{n:06d}.npz"), layout.starts[c0:c1 + 1])
             for n, (c0, c1) in enumerate(plan_parts(layout.starts, options.part_rows))]
    mine = share_of_parts(parts, share)
    sample = tuning_sample(layout.starts, options.tune_samples, seed)
    copy = RowCopy.of(out_dir, share, [(int(starts[0]), int(starts[-1])) for _, starts in mine] + sample)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), f"{BY_CLUSTER}.{share.rank}-of-{share.world}.*")) + \
            [tmp for path, _ in mine for tmp in glob.glob(glob.escape(path) + ".tmp*")]:
        if stale != copy.path:
            os.remove(stale)  # left by a crash mid-write, or a copy of other positions (other parameters)
    todo = [part for part in mine if not os.path.isfile(part[0])]
    timing = {"read_s": time.time() - start}
    # Only a process with parts to balance copies rows, tunes and starts a pool. One with none (more processes
    # than parts, or its parts done) that tuned anyway could still be tuning on its copy when the last to finish
    # removed every copy, and its manifest (tuned, not complete) would overwrite the complete one.
    if todo:
        if not os.path.isfile(copy.path):
            start = time.time()
            write_by_cluster(cache, shards, layout, copy)
            timing["order_s"] = time.time() - start
        with _processes(workers) as pool:
            if tuning and "tuning" not in manifest:  # each on the same sample, to the same threshold
                start = time.time()
                manifest["tuning"] = _tune(pool, workers, copy, sample, perceptual, target_keep_fraction, seed,
                                           block_size)
                write_json(os.path.join(out_dir, MANIFEST), manifest)
                timing["tune_s"] = time.time() - start
            semantic = manifest["tuning"]["semantic"] if tuning else options.semantic
            if not tuning and max_removed_fraction < 1:
                _check_estimate(pool, workers, copy, sample, len(layout.order), semantic, mode,
                                max_removed_fraction, block_size)
            start = time.time()
            _balance_parts(pool, todo, functools.partial(_balance_part, copy=copy, semantic=semantic,
                                                         perceptual=perceptual, block_size=block_size))
            timing["balance_s"] = time.time() - start
    with contextlib.suppress(FileNotFoundError):  # the last to finish may have removed it already
        os.remove(copy.path)  # every part of this process's is written: no re-run of it needs the copy

    if not all(os.path.isfile(path) for path, _ in parts):
        return None  # another process's parts are still to be balanced: the last to finish writes the rest
    for stale in glob.glob(os.path.join(glob.escape(out_dir), f"{BY_CLUSTER}.*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)  # copies left by a run interrupted at another process count
    if tuning and "tuning" not in manifest:  # recorded by the processes that balanced the parts, before they did
        manifest = read_manifest(out_dir)
    semantic = manifest["tuning"]["semantic"] if tuning else options.semantic
    start = time.time()
    rep, perceptual_link, largest = _assemble(layout, [path for path, _ in parts])
    kept = rep == np.arange(len(rep))
    _check_removed(int(kept.sum()), len(kept), max_removed_fraction, semantic, mode,
                   f"over all samples; nothing complete is written and the finished parts stay in {parts_dir}")
    write_keep_lists(out_dir, layout, rep, perceptual_link, cache.teacher["weights_sha256"])
    after = np.bincount(layout.cluster[kept], minlength=assignments.k)
    plot_balance(before, after, os.path.join(out_dir, PLOT))
    timing["write_s"] = time.time() - start
    report = _report(kept, perceptual_link, rep, before, after, largest, mode, settings=dict(
        semantic=semantic, target_keep_fraction=target_keep_fraction, perceptual=perceptual,
        max_removed_fraction=max_removed_fraction, tuning=manifest.get("tuning"), block_size=block_size,
        workers=workers, processes=share.world, parts=len(parts), teacher=cache.teacher, timing=timing,
        code_version=cid_ds.__version__, complete=True))
    _write_report(os.path.join(out_dir, REPORT), report)
    manifest.update(totals={name: report[name] for name in ("samples", "kept", "removed")}, parts=len(parts),
                    complete=True)
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    return report


def share_of_parts(parts: list[tuple[str, np.ndarray]], share: Share) -> list[tuple[str, np.ndarray]]:
    """``share``'s run of consecutive parts, cut so that every process gets about the same work: a cluster of
    n samples costs about n^2 similarities. Consecutive, so that a process's copy of the embeddings is one
    run of positions."""
    if not parts:
        return []
    cost = np.asarray([np.square(np.diff(starts).astype(np.float64)).sum() for _, starts in parts])
    edges = np.concatenate([[0.0], np.cumsum(cost)])
    middle = (edges[:-1] + edges[1:]) / 2 / max(edges[-1], 1.0)
    owner = np.minimum((middle * share.world).astype(int), share.world - 1)
    return [part for part, rank in zip(parts, owner) if rank == share.rank]


def _balance_parts(pool: Optional[Pool], todo: list[tuple[str, np.ndarray]], run_part: Callable) -> None:
    todo = sorted(todo, key=lambda part: -int(np.square(np.diff(part[1])).sum()))  # the longest first
    with tqdm(total=int(sum(starts[-1] - starts[0] for _, starts in todo)), desc="balance", unit="img",
              postfix={"parts": f"0/{len(todo)}"}) as bar:
        for done, rows in enumerate(_run(pool, run_part, todo), 1):
            bar.update(rows)
            bar.set_postfix(parts=f"{done}/{len(todo)}")


def _sample_counter(pool: Optional[Pool], workers: int, copy: RowCopy, sample: list[tuple[int, int]],
                    block_size: int) -> Callable[[float], int]:
    """``kept_at(threshold)``: how many samples of the clusters at row bounds ``sample`` the threshold keeps. The
    clusters that fit one tile are counted from their maximum spanning trees, computed once; a larger one is
    grouped again at each threshold."""
    small = [bounds for bounds in sample if bounds[1] - bounds[0] <= block_size]
    large = [bounds for bounds in sample if bounds[1] - bounds[0] > block_size]
    chunksize = max(1, len(sample) // (8 * workers))
    trees = list(_run(pool, functools.partial(_tree_of, copy=copy, block_size=block_size), small, chunksize))
    tree = np.sort(np.concatenate(trees)) if trees else np.zeros(0, np.float32)
    small_rows = sum(last - first for first, last in small)

    def kept_at(threshold: float) -> int:
        # float32 against the threshold as a float32, as numpy compares group_cluster's tiles with a Python float
        joined = len(tree) - int(np.searchsorted(tree, np.float32(threshold), side="right"))
        fn = functools.partial(_kept_in, copy=copy, semantic=threshold, block_size=block_size)
        return small_rows - joined + sum(_run(pool, fn, large, chunksize))

    return kept_at


def _tree_of(bounds: tuple[int, int], copy: RowCopy, block_size: int) -> np.ndarray:
    return spanning_similarities(unit_rows(copy.rows(*bounds)), block_size)


def _check_estimate(pool: Optional[Pool], workers: int, copy: RowCopy, sample: list[tuple[int, int]],
                    samples: int, semantic: float, mode: str, max_removed_fraction: float, block_size: int) -> None:
    """The guard on the tuning sample of clusters at a fixed threshold, before the full pass. Skipped when
    the sample holds every sample: the full pass then costs no more, and its result is checked."""
    rows = sum(last - first for first, last in sample)
    if rows < samples:
        kept = _sample_counter(pool, workers, copy, sample, block_size)(semantic)
        _check_removed(kept, rows, max_removed_fraction, semantic, mode,
                       f"estimated on a seeded sample of {len(sample):,} clusters ({rows:,} samples), before the "
                       f"full pass; {copy.path}, the embeddings in cluster order, stays for a re-run here")


def _tune(pool: Optional[Pool], workers: int, copy: RowCopy, sample: list[tuple[int, int]], perceptual: float,
          target: float, seed: int, block_size: int) -> dict:
    rows = sum(last - first for first, last in sample)
    kept_at = _sample_counter(pool, workers, copy, sample, block_size)
    steps = tqdm(total=TUNE_STEPS + 1, desc="tune threshold", unit="step")

    def counted(threshold: float) -> int:
        kept = kept_at(threshold)
        steps.update()
        steps.set_postfix(semantic=f"{threshold:.4f}", keep=f"{kept / rows:.4f}")
        return kept

    with steps:
        result = tune_semantic(counted, rows, target, perceptual)
    return dict(result, target_keep_fraction=target, seed=seed, sample_clusters=len(sample), sample_samples=rows)


def _report(kept: np.ndarray, perceptual_link: np.ndarray, rep: np.ndarray, before: np.ndarray, after: np.ndarray,
            largest: tuple[int, int], mode: str, settings: dict) -> dict:
    """The report in reading order: the kept fraction and the mode first, the per-cluster sizes (k numbers
    each) last."""
    samples, removed = len(kept), ~kept
    return {"kept_fraction": float(kept.mean()) if samples else 1.0, "mode": mode,
            "kept": int(kept.sum()), "samples": samples, "removed": int(removed.sum()),
            "removed_fraction": float(removed.mean()) if samples else 0.0,
            "removed_perceptual": int((removed & perceptual_link).sum()),
            "removed_semantic": int((removed & ~perceptual_link).sum()),
            "groups": int(np.unique(rep[removed]).size),
            **settings,
            "clusters": {"k": len(before), "nonempty": int((before > 0).sum()),
                         "largest_before": int(before.max(initial=0)), "largest_after": int(after.max(initial=0))},
            "largest_tile": list(largest),
            "cluster_sizes": {"before": before.tolist(), "after": after.tolist()}}


def _write_report(path: str, report: dict) -> None:
    """As cid_ds.io.write_json, but in the report's own order rather than sorted."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def main(argv: Optional[list[str]] = None) -> None:
    run_stage("balance", BalanceOptions, __doc__, balance, _print_report, argv)


def _print_report(options: BalanceOptions, report: Optional[dict], share: Share) -> None:
    if report is None:
        print(f"balance: {share} balanced its clusters; the last process to finish writes {options.out}")
        return
    print(f"kept {report['kept_fraction']:.1%} ({report['kept']:,} of {report['samples']:,}), {report['mode']}: "
          f"semantic threshold {report['semantic']:.4f}; removed {report['removed']:,} in {report['groups']:,} groups "
          f"({report['removed_perceptual']:,} perceptual, {report['removed_semantic']:,} semantic); largest cluster "
          f"{report['clusters']['largest_before']:,} -> {report['clusters']['largest_after']:,}; written to "
          f"{options.out}")
    if (report["tuning"] or {}).get("above_perceptual"):
        print(f"note: the threshold lies above --perceptual {report['perceptual']}: this teacher maps most images of "
              "a cluster within it of each other, so every removed sample counts as a perceptual duplicate")


if __name__ == "__main__":
    main()
