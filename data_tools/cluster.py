"""Cluster the teacher's image embeddings with faiss k-means and assign every sample its nearest centroids.

  python -m data_tools.cluster --features runs/feats --out runs/clusters [--k 1000] [--niter 20] \\
      [--max-points-per-centroid 256] [--topk 1] [--batch-size 65536] [--seed 0] [--gpu auto] \\
      [--parts N] [--nredo 1] [--init random] [--teacher-index I]

Without ``--k``, k comes from the cache's sample count by the rule in ``default_k``: one cluster per
400 samples (CLIP-CID's 1M clusters for LAION-400M), at least 16, at most one per 20 samples.
Spherical k-means is fitted on k * max-points-per-centroid rows drawn uniformly over the cache (read
shard by shard); then every row is assigned, shard by shard, to its top-k centroids by inner product.
A cache of a teacher ensemble is clustered on the concatenation of its teachers' embeddings (the
renormalised rows, whose cosine is the mean of the teachers' cosines), or with ``--teacher-index I``
on teacher I's alone.
With ``--parts P`` (by default whenever the whole fit would hold more than --fit-memory-gb) the fit is
hierarchical: the sample is split into P random parts, each is clustered into k centroids, and the union
of the P*k centroids (weighted by their part's cluster sizes) is clustered into k: how 1M clusters of
LAION-400M were made. The output format is described in cid_ds.data.clusters. A re-run into the same
--out skips what is done (the fit, finished shards) and refuses other parameters or a cache from another
teacher. Started as N processes (data_tools.spread), process 0 draws the fit's sample and fits it; the parts
of a hierarchical fit are spread over every process (process 0 then clusters their centroids); every process
assigns every N-th shard, and the last to finish writes the statistics and the complete manifest. An
interrupted hierarchical fit resumes at the parts not yet written, with any number of processes.

Initialisation: ``random`` (faiss's default: k rows of the sample) is the only one that scales to 1M
centroids, but on data with clear clusters it leaves some merged and others split; ``kmeans++`` and
``afk-mc2`` (its MCMC approximation) spread the initial centroids, at the cost of k sequential passes
over the sample, and ``--nredo`` keeps the best of several runs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional, Union

import faiss
import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

import cid_ds
from cid_ds.data.clusters import CENTROIDS, ClusterAssignments, fit_finished, write_assignments
from cid_ds.data.features import FeatureCache, ShardFeatures, shard_file, teacher_members
from cid_ds.io import MANIFEST, atomic_path, load_numeric_npy, write_json
from data_tools.options import flag, run_stage
from data_tools.outputs import check_rerun, save_figure
from data_tools.spread import Share, wait_for

FIT_SAMPLE = "fit_sample"  # the drawn sample during the fit, on disk: FIT_SAMPLE.<draw>.npy
FIT_PARTS = "fit_parts"  # a hierarchical fit's first level during the fit: FIT_PARTS.<draw>/<part>.npz
DEFAULT_FIT_MEMORY_GB = 64.0
# The parameters that decide the output; a re-run into the same folder must repeat them.
PARAMS = ("k", "dim", "niter", "max_points_per_centroid", "topk", "seed", "parts", "nredo", "init", "teacher_index")
# The default k (default_k): CLIP-CID and MLCD cluster ~400M samples into 1M clusters.
SAMPLES_PER_CLUSTER = 400
MIN_CLUSTERS = 16  # fewer clusters carry no structure for the classifier to learn
MIN_SAMPLES_PER_CLUSTER = 20  # smaller clusters starve the classifier's rows
FAISS_MIN_POINTS_PER_CENTROID = 39  # fewer, and faiss warns that the fit has too few points
INIT_METHODS = {"random": faiss.ClusteringInitMethod_RANDOM, "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
                "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2}


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """What data_tools.cluster is asked: its flags, with their defaults."""
    features: str = flag(help="teacher feature cache (python -m data_tools.extract)")
    k: Optional[int] = flag(None, f"number of clusters (default: one per {SAMPLES_PER_CLUSTER} samples, at least "
                                  f"{MIN_CLUSTERS}, at most one per {MIN_SAMPLES_PER_CLUSTER} samples)", type=int)
    out: str = flag(help="output folder")
    niter: int = flag(20, "k-means iterations")
    max_points_per_centroid: int = flag(256, "the fit uses k times this many rows, drawn uniformly over the cache")
    topk: int = flag(1, "nearest centroids stored per sample")
    batch_size: int = flag(65536, "rows per faiss search in the assignment")
    seed: int = flag(0)
    gpu: str = flag("auto", "auto: every GPU faiss sees, CPU when none", choices=("auto", "on", "off"))
    parts: Optional[int] = flag(None, "hierarchical fit: k-means of P parts, then of their centroids (default: 1, or "
                                      "the fewest parts, then points per centroid, whose fit holds at most "
                                      "--fit-memory-gb)", type=int)
    fit_memory_gb: float = flag(DEFAULT_FIT_MEMORY_GB, "host memory the fit may hold (its sample is on disk, one part "
                                                       "in memory at a time); a fit over it is refused before any "
                                                       "work, naming the --parts that fits")
    nredo: int = flag(1, "k-means runs per fit, the best kept")
    init: str = flag("random", "initial centroids: random rows (scales to 1M), kmeans++ or afk-mc2 (better, slower)",
                     choices=tuple(INIT_METHODS))
    teacher_index: Optional[int] = flag(None, "a teacher ensemble's cache: cluster teacher I's embeddings only "
                                              "(default: all, concatenated)", type=int)

    def check(self) -> None:
        for name, value in (("niter", self.niter), ("max_points_per_centroid", self.max_points_per_centroid),
                            ("topk", self.topk), ("batch_size", self.batch_size), ("parts", self.parts or 1),
                            ("nredo", self.nredo), ("k", 1 if self.k is None else self.k)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")


def num_gpus(gpu: str) -> int:
    """How many GPUs faiss uses: ``auto`` = all it sees, ``off`` = none, ``on`` = all, at least one."""
    if gpu not in ("auto", "on", "off"):
        raise ValueError(f"gpu must be 'auto', 'on' or 'off', got {gpu!r}")
    seen = faiss.get_num_gpus() if gpu != "off" else 0
    if gpu == "on" and seen == 0:
        raise ValueError("--gpu on: faiss sees no GPU (faiss-cpu installed, or no CUDA device visible)")
    return seen


def default_k(samples: int) -> int:
    """The number of clusters for ``samples`` samples when none is given::

        k = min(max(samples // 400, 16), max(samples // 20, 1))

    One cluster per SAMPLES_PER_CLUSTER (400) samples: CLIP-CID's and MLCD's 1M clusters for ~400M samples.
    At least MIN_CLUSTERS (16): fewer clusters carry no structure. But never fewer than
    MIN_SAMPLES_PER_CLUSTER (20) samples per cluster, which would starve the classifier's rows: that bound
    wins below 320 samples. And at least 1 (so never more than ``samples``)."""
    return _default_k_and_reason(samples)[0]


def _default_k_and_reason(samples: int) -> tuple[int, str]:
    if samples < 1:
        raise ValueError(f"no samples to cluster (the feature cache holds {samples})")
    by_size = samples // SAMPLES_PER_CLUSTER
    most = max(1, samples // MIN_SAMPLES_PER_CLUSTER)
    ratio = f"{samples:,} samples / {SAMPLES_PER_CLUSTER} per cluster"
    if by_size >= MIN_CLUSTERS:
        return by_size, f"{ratio} (CLIP-CID: 1M clusters for 400M samples)"
    if MIN_CLUSTERS <= most:
        return MIN_CLUSTERS, f"{ratio} = {by_size}, raised to the minimum of {MIN_CLUSTERS} clusters"
    return most, (f"{samples:,} samples: {MIN_CLUSTERS} clusters would hold fewer than {MIN_SAMPLES_PER_CLUSTER} "
                  f"samples each, so one cluster per {MIN_SAMPLES_PER_CLUSTER} samples (at least 1)")


def _announced_default_k(samples: int) -> int:
    k, reason = _default_k_and_reason(samples)
    print(f"k = {k}: {reason}; pass --k to choose")
    return k


def unit_rows(x: np.ndarray) -> np.ndarray:
    """A float32 copy of ``x`` with L2-normalised rows (fp16 rows are only nearly unit length)."""
    x = np.array(x, dtype=np.float32, order="C")
    faiss.normalize_L2(x)
    return x


def flat_index(centroids: np.ndarray, ngpu: int) -> faiss.Index:
    index = faiss.IndexFlatIP(centroids.shape[1])
    if ngpu:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=ngpu)
    index.add(centroids)
    return index


def search(index: faiss.Index, x: np.ndarray, topk: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [N, topk], sims float32 [N, topk])`` of the rows of ``x``, ``batch_size`` rows at a time."""
    ids, sims = np.zeros((len(x), topk), np.int32), np.zeros((len(x), topk), np.float32)
    for start in range(0, len(x), batch_size):
        batch = unit_rows(x[start:start + batch_size])
        sims[start:start + len(batch)], ids[start:start + len(batch)] = index.search(batch, topk)
    return ids, sims


def load_image_rows(cache: FeatureCache, stem: str, samples: int) -> ShardFeatures:
    """A shard's cached features, checked against the cache manifest's sample count."""
    features = cache.lookup(stem)
    if features is None:
        raise FileNotFoundError(f"feature cache {cache.dir}: shard {stem} is in {cache.manifest_path} "
                                f"but {shard_file(cache.dir, stem)} is missing")
    if len(features.row) != samples:
        raise ValueError(f"{shard_file(cache.dir, stem)}: {len(features.row)} keys but {cache.manifest_path} "
                         f"says shards.{stem}.samples = {samples}")
    return features


def teacher_columns(cache: FeatureCache, teacher_index: Optional[int]) -> slice:
    """The columns of the cache's rows that hold teacher ``teacher_index`` (None: all of them)."""
    if teacher_index is None:
        return slice(0, cache.embed_dim)
    dims = [int(member["embed_dim"]) for member in teacher_members(cache.teacher)]
    if not 0 <= teacher_index < len(dims):
        raise ValueError(f"teacher_index {teacher_index}: feature cache {cache.manifest_path} holds "
                         f"{len(dims)} teacher(s), indices 0..{len(dims) - 1}")
    start = sum(dims[:teacher_index])
    return slice(start, start + dims[teacher_index])


def sample_rows(cache: FeatureCache, shards: dict[str, int], n: int, seed: int, columns: slice = slice(None),
                out: Optional[np.ndarray] = None) -> np.ndarray:
    """``n`` image rows (fp16, ``columns`` of them) drawn uniformly without replacement over the whole
    cache, reading one shard at a time, into ``out`` (a new array when None); the draw depends only on
    (seed, shard sizes)."""
    rng = np.random.default_rng(seed)
    stems = list(shards)
    per_shard = rng.multivariate_hypergeometric(np.array([shards[s] for s in stems], np.int64), n)
    if out is None:
        out = np.empty((n, len(range(cache.embed_dim)[columns])), np.float16)
    filled = 0
    for stem, count in tqdm(list(zip(stems, per_shard)), desc="sample", unit="shard"):
        if count:
            rows = np.sort(rng.choice(shards[stem], count, replace=False))
            out[filled:filled + count] = load_image_rows(cache, stem, shards[stem]).image[rows, columns]
            filled += count
    return out


def kmeans(x: np.ndarray, k: int, niter: int, max_points_per_centroid: int, seed: int, nredo: int, init: str,
           ngpu: int, verbose: bool, weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, float]:
    """Spherical faiss k-means of the rows of ``x``: ``(unit centroids float32 [k, D], final objective)``."""
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, max_points_per_centroid=max_points_per_centroid,
                      seed=seed, nredo=nredo, init_method=INIT_METHODS[init], gpu=ngpu or False, verbose=verbose)
    objective = km.train(unit_rows(x), weights=weights)
    return unit_rows(km.centroids), float(objective)


def part_rows(n: int, parts: int, seed: int, part: int) -> np.ndarray:
    """The sorted rows of ``part`` of a hierarchical fit of ``n`` rows: a seeded random split into ``parts``, the
    same in every process."""
    return np.sort(np.array_split(np.random.default_rng(seed).permutation(n), parts)[part])


def fit_parts(files: FitFiles, params: dict, ngpu: int, batch_size: int, share: Share, **options) -> None:
    """The first level of a hierarchical fit: each of ``share``'s parts not yet written is clustered into k, its
    centroids and how many of its rows each holds saved to ``files.parts/<part>.npz`` (a re-run fits only what is
    missing; a process with nothing to fit does not open the sample, which process 0 may remove once it is done)."""
    k, parts, seed = params["k"], params["parts"], params["seed"]
    todo = [part for part in share.mine(range(parts)) if not os.path.isfile(part_file(files.parts, part))]
    if not todo:
        return
    x = np.load(files.sample, mmap_mode="r")
    for part in tqdm(todo, desc="fit parts" if share.world == 1 else f"fit parts {share}", unit="part"):
        rows = x[part_rows(len(x), parts, seed, part)]
        centroids, _ = kmeans(rows, k, seed=seed, ngpu=ngpu, **options)
        ids, _ = search(flat_index(centroids, ngpu), rows, 1, batch_size)
        with atomic_path(part_file(files.parts, part)) as tmp, open(tmp, "wb") as f:
            np.savez(f, centroids=centroids, weights=np.bincount(ids[:, 0], minlength=k).astype(np.float32))


def part_file(parts_dir: str, part: int) -> str:
    return os.path.join(parts_dir, f"{part:06d}.npz")


def combine_parts(parts_dir: str, parts: int, k: int, seed: int, ngpu: int, **options) -> tuple[np.ndarray, float]:
    """The second level: the union of every part's centroids clustered into k, each weighted by the rows of its
    part it holds."""
    centroids, weights = [], []
    for part in range(parts):
        with np.load(part_file(parts_dir, part)) as saved:
            centroids.append(saved["centroids"])
            weights.append(saved["weights"])
    return kmeans(np.concatenate(centroids), k, seed=seed, ngpu=ngpu, weights=np.concatenate(weights), **options)


def read_centroids(centroids: Union[np.ndarray, str]) -> tuple[np.ndarray, str]:
    """``(unit centroids float32 [k, D], where they came from)`` from an array or a .npy file."""
    if isinstance(centroids, str):
        return unit_rows(load_numeric_npy(centroids)), f"centroids {centroids}"
    return unit_rows(centroids), "centroids"


def assign(features_dir: str, centroids: Union[np.ndarray, str], out_dir: str, topk: int = 1,
           batch_size: int = 65536, ngpu: int = 0, teacher_index: Optional[int] = None,
           share: Share = Share()) -> dict:
    """Write ``out_dir/<stem>.npz`` (top-k centroid ids and similarities) for every cache shard of ``share``
    (data_tools.spread) that has no file yet; returns ``assigned``/``skipped`` stems, ``samples`` and
    ``seconds``."""
    cache = FeatureCache(features_dir, with_views=False)
    shards = cache.shard_samples()
    columns = teacher_columns(cache, teacher_index)
    centroids, source = read_centroids(centroids)
    width = columns.stop - columns.start
    if centroids.ndim != 2 or centroids.shape[1] != width:
        raise ValueError(f"{source} have shape {centroids.shape}, but feature cache {cache.manifest_path} "
                         f"has {width}-d rows (teacher.embed_dim = {cache.embed_dim}, teacher_index {teacher_index})")
    if not 1 <= topk <= len(centroids):
        raise ValueError(f"topk must be between 1 and k = {len(centroids)}, got {topk}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = share.mine(list(shards))
    todo = [stem for stem in mine if not os.path.isfile(shard_file(out_dir, stem))]
    for stem in todo:  # temp files left by a crash mid-write
        for tmp in glob.glob(glob.escape(shard_file(out_dir, stem)) + ".tmp*"):
            os.remove(tmp)

    index = flat_index(centroids, ngpu)
    start = time.time()
    with tqdm(total=sum(shards[s] for s in todo), desc="assign" if share.world == 1 else f"assign {share}", unit="img",
              postfix={"shards": f"0/{len(todo)}"}) as bar:
        for done, stem in enumerate(todo, 1):
            features = load_image_rows(cache, stem, shards[stem])
            ids, sims = search(index, features.image[:, columns], topk, batch_size)
            write_assignments(out_dir, stem, list(features.row), ids, sims, list(features.skipped),
                              cache.teacher["weights_sha256"])
            bar.update(len(ids))
            bar.set_postfix(shards=f"{done}/{len(todo)}")
    return {"assigned": todo, "skipped": [s for s in mine if s not in todo],
            "samples": sum(shards[s] for s in todo), "seconds": time.time() - start}


def size_statistics(out_dir: str, stems: list[str]) -> tuple[np.ndarray, dict]:
    """Top-1 cluster sizes over every shard file and their summary for the manifest."""
    assignments = ClusterAssignments(out_dir)
    sizes = np.zeros(assignments.k, np.int64)
    sim_sum = 0.0
    for stem in stems:
        shard = assignments.lookup(stem)
        sizes += np.bincount(shard.ids[:, 0], minlength=assignments.k)
        sim_sum += float(shard.sims[:, 0].astype(np.float64).sum())
    samples = int(sizes.sum())
    return sizes, {"samples": samples, "min": int(sizes.min()), "median": float(np.median(sizes)),
                   "max": int(sizes.max()), "mean": samples / len(sizes), "empty": int((sizes == 0).sum()),
                   "mean_top1_sim": sim_sum / samples if samples else 0.0}


def plot_sizes(sizes: np.ndarray, path: str) -> None:
    """Histogram of the non-empty cluster sizes on log-spaced bins, log counts."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    nonempty = sizes[sizes > 0]
    bins = np.unique(np.geomspace(1, nonempty.max() + 1, 40).round()) if nonempty.size else [0, 1]
    ax.hist(nonempty, bins=bins)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a bin holding one cluster stays visible
    ax.set_xlabel("samples in the cluster (top-1)")
    ax.set_ylabel("clusters")
    ax.set_title(f"k = {len(sizes)}, {int((sizes == 0).sum())} empty, median {np.median(sizes):g}")
    save_figure(fig, path)


def fit_points(cache: FeatureCache, shards: dict[str, int], params: dict) -> int:
    """The samples drawn for the fit; a ValueError when they are too few for ``params``' k and parts."""
    k, parts = params["k"], params["parts"]
    total = sum(shards.values())
    n_fit = min(k * params["max_points_per_centroid"], total)
    if n_fit // parts < k:
        raise ValueError(f"feature cache {cache.manifest_path}: {total} samples, {n_fit} drawn for the fit, "
                         f"too few for {parts} part(s) of at least k = {k} points each")
    return n_fit


def fewest_parts(n_fit: int, dim: int, k: int, budget_gb: float, start: int = 1) -> Optional[int]:
    """The fewest parts, from ``start``, each of at least k of ``n_fit`` points, whose fit holds at most
    ``budget_gb`` of host memory; None when none does."""
    return next((p for p in range(start, n_fit // k + 1) if fit_memory(n_fit, dim, k, p) <= budget_gb * 2**30), None)


def fit_shape(total: int, dim: int, k: int, max_points_per_centroid: int, budget_gb: float) -> tuple[int, int]:
    """The default fit, ``(max_points_per_centroid, parts)``, within ``budget_gb`` of host memory: the whole
    sample in one fit when it fits; else a hierarchical fit in the fewest parts that do, each of at least k
    points, as MLCD fitted 1M clusters of LAION on 20 machines (20M points into 1M on each, then their centroids
    into 1M); else fewer points per centroid, down to faiss's 39. Unchanged when nothing fits (check_fit_memory
    then refuses, naming what would)."""
    for points in range(max_points_per_centroid, min(max_points_per_centroid, FAISS_MIN_POINTS_PER_CENTROID) - 1, -1):
        parts = fewest_parts(min(k * points, total), dim, k, budget_gb)
        if parts is not None:
            return points, parts
    return max_points_per_centroid, 1


def fit_memory(n_fit: int, dim: int, k: int, parts: int) -> int:
    """Host bytes the fit holds at its peak: one part of the sample in float32 twice (the unit rows and faiss's
    training copy), and every part's centroids with their assignment. The drawn sample itself is a file on disk
    (``FIT_SAMPLE``, memory-mapped), read one part at a time."""
    part = -(-n_fit // parts)
    return 2 * part * dim * 4 + parts * k * dim * 4 + part * 12


def check_fit_memory(n_fit: int, dim: int, params: dict, budget_gb: float) -> None:
    """Refuse, before any work, a fit that would hold more than ``budget_gb`` of host memory, naming what fits."""
    k, parts = params["k"], params["parts"]
    needed = fit_memory(n_fit, dim, k, parts)
    if needed <= budget_gb * 2**30:
        return
    fitting = fewest_parts(n_fit, dim, k, budget_gb, start=parts)
    fewer = next(((m, p) for m in range(n_fit // k - 1, FAISS_MIN_POINTS_PER_CENTROID - 1, -1)
                  if (p := fewest_parts(k * m, dim, k, budget_gb)) is not None), None)
    fix = f"--parts {fitting} (a hierarchical fit, as MLCD's 1M clusters of LAION)" if fitting else \
        f"--max-points-per-centroid {fewer[0]} --parts {fewer[1]}" if fewer else "a smaller --k"
    raise ValueError(f"the k-means fit of k = {k:,} on {n_fit:,} sampled {dim}-d rows in {parts} part(s) holds "
                     f"~{needed / 2**30:,.1f} GiB of host memory, over --fit-memory-gb {budget_gb:g}: use {fix}, or "
                     "raise --fit-memory-gb")


@dataclass(frozen=True)
class FitFiles:
    """Where a fit keeps its drawn sample (fp16, memory-mapped) and a hierarchical fit its parts, while it runs."""
    sample: str
    parts: str

    @classmethod
    def of(cls, out_dir: str, features: str, shards: dict[str, int], params: dict, n_fit: int) -> FitFiles:
        """Named by the draw (the cache, its shard sizes, the parameters, the sample's size): files of another draw
        (another cache in the same place, a sample an earlier version wrote in place) are never taken for this
        one's."""
        draw = hashlib.sha256(json.dumps([os.path.abspath(features), shards, params, n_fit]).encode()).hexdigest()[:16]
        return cls(os.path.join(out_dir, f"{FIT_SAMPLE}.{draw}.npy"), os.path.join(out_dir, f"{FIT_PARTS}.{draw}"))

    def remove(self, keep_own: bool = False) -> None:
        """Every fit's sample and parts in this folder (cut-off writes too), or, ``keep_own``, all but this fit's."""
        out_dir = os.path.dirname(self.sample)
        for path in glob.glob(os.path.join(glob.escape(out_dir), f"{FIT_SAMPLE}*")) + \
                glob.glob(os.path.join(glob.escape(out_dir), f"{FIT_PARTS}*")):
            if keep_own and path in (self.sample, self.parts):
                continue
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def draw_fit_sample(cache: FeatureCache, shards: dict[str, int], params: dict, n_fit: int, files: FitFiles) -> None:
    """``n_fit`` rows drawn over the whole cache into ``files.sample``, which appears whole or not at all; one left
    by an interrupted run of the same draw (the same rows: the name says the draw) is kept, with its parts, and any
    other fit's files are removed."""
    files.remove(keep_own=True)
    if os.path.isfile(files.sample):
        return
    columns = teacher_columns(cache, params["teacher_index"])
    with atomic_path(files.sample) as tmp:
        x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n_fit, columns.stop - columns.start))
        sample_rows(cache, shards, n_fit, params["seed"], columns, out=x)
        x.flush()
        del x


def _fit(cache: FeatureCache, shards: dict[str, int], params: dict, n_fit: int, ngpu: int, batch_size: int,
         verbose: bool, files: FitFiles, share: Share) -> Optional[tuple[np.ndarray, dict]]:
    """The centroids of ``n_fit`` sampled rows, and the manifest's fit fields (process 0; the others return None).
    Process 0 draws the sample to ``files.sample``, memory-mapped, so that host memory holds one part. A
    hierarchical fit's parts are spread over the processes (the others start once the sample is drawn); process 0
    waits for them all and clusters their centroids."""
    k, parts, seed = params["k"], params["parts"], params["seed"]
    start = time.time()
    if share.rank == 0:
        draw_fit_sample(cache, shards, params, n_fit, files)
    sampled = time.time()
    options = dict(niter=params["niter"], max_points_per_centroid=params["max_points_per_centroid"],
                   nredo=params["nredo"], init=params["init"], verbose=verbose)
    if parts == 1:
        centroids, objective = kmeans(np.load(files.sample, mmap_mode="r"), k, seed=seed, ngpu=ngpu, **options)
    else:
        fit_parts(files, params, ngpu, batch_size, share, **options)
        if share.rank > 0:
            return None
        wait_for(lambda: all(os.path.isfile(part_file(files.parts, part)) for part in range(parts)),
                 f"cluster: {share} waits for the other processes' parts of the fit in {files.parts}")
        centroids, objective = combine_parts(files.parts, parts, k, seed, ngpu, **options)
    return centroids, {"fit_points": n_fit, "objective": objective, "device": f"{ngpu} GPU(s)" if ngpu else "cpu",
                       "timing": {"sample_s": sampled - start, "fit_s": time.time() - sampled}}


def cluster(options: ClusterOptions, share: Share = Share(), verbose: bool = False) -> Optional[dict]:
    """Fit (or reuse the fitted) centroids, assign every shard not yet assigned, write the statistics;
    returns the complete manifest. Spread over processes (data_tools.spread), process 0 fits (each process fits
    its share of a hierarchical fit's parts), each assigns its share of the shards, and the last to finish
    completes the manifest (the others return None). ``k`` None:
    ``default_k`` of the cache's sample count, printed with its reason. ``parts`` None: ``fit_shape``, a
    hierarchical fit (then fewer points per centroid) once the whole would hold more than ``fit_memory_gb`` of
    host memory; a fit that still holds more is refused before any work, naming what fits."""
    options.check()
    ngpu = num_gpus(options.gpu)
    out_dir = options.out
    cache = FeatureCache(options.features, with_views=False)
    shards = cache.shard_samples()
    k = options.k if options.k is not None else _announced_default_k(sum(shards.values()))
    if options.topk > k:
        raise ValueError(f"topk ({options.topk}) must not exceed k ({k})")
    columns = teacher_columns(cache, options.teacher_index)
    max_points_per_centroid, parts = options.max_points_per_centroid, options.parts
    if parts is None:
        shape = fit_shape(sum(shards.values()), columns.stop - columns.start, k, max_points_per_centroid,
                          options.fit_memory_gb)
        if shape != (max_points_per_centroid, 1) and verbose and share.rank == 0:
            print(f"cluster: the fit of the whole sample would hold more than --fit-memory-gb "
                  f"{options.fit_memory_gb:g}: {shape[0]} points per centroid, in {shape[1]} part(s) (pass --parts "
                  "to choose)", flush=True)
        max_points_per_centroid, parts = shape
    params = {"k": k, "dim": columns.stop - columns.start, "niter": options.niter,
              "max_points_per_centroid": max_points_per_centroid, "topk": options.topk, "seed": options.seed,
              "parts": parts, "nredo": options.nredo, "init": options.init, "teacher_index": options.teacher_index}
    n_fit = fit_points(cache, shards, params)  # before anything is written: a k too large leaves no manifest behind
    check_fit_memory(n_fit, params["dim"], params, options.fit_memory_gb)
    files = FitFiles.of(out_dir, options.features, shards, params, n_fit)
    if share.rank > 0:  # process 0 fits; the others join a hierarchical fit once its sample is drawn
        wait_for_fit(out_dir, share, files.sample if parts > 1 else None)
    manifest = check_rerun(out_dir, params, "clusterings", cache)
    centroids_path = os.path.join(out_dir, CENTROIDS)

    if manifest is not None and "fit_points" in manifest and os.path.isfile(centroids_path):
        centroids = ClusterAssignments(out_dir).centroids()
        if share.rank == 0:
            files.remove()  # left if a run stopped between the fit's manifest and their removal
    elif share.rank > 0:
        _fit(cache, shards, params, n_fit, ngpu, options.batch_size, verbose, files, share)
        wait_for_fit(out_dir, share)
        fitted = ClusterAssignments(out_dir)
        manifest, centroids = fitted.manifest, fitted.centroids()
    else:
        done = [s for s in shards if os.path.isfile(shard_file(out_dir, s))]
        if done:
            raise ValueError(f"{out_dir} holds assignments ({shard_file(out_dir, done[0])}) but no finished fit "
                             f"({CENTROIDS} and 'fit_points' in {MANIFEST}): delete {out_dir} to start again")
        if manifest is None:
            manifest = dict(params, teacher=cache.teacher, features=os.path.abspath(options.features),
                            code_version=cid_ds.__version__, complete=False)
            write_json(os.path.join(out_dir, MANIFEST), manifest)
        centroids, fit = _fit(cache, shards, params, n_fit, ngpu, options.batch_size, verbose, files, share)
        with atomic_path(centroids_path) as tmp, open(tmp, "wb") as f:
            np.save(f, centroids)
        manifest.update(fit)
        write_json(os.path.join(out_dir, MANIFEST), manifest)
        files.remove()

    result = assign(options.features, centroids, out_dir, options.topk, options.batch_size, ngpu,
                    options.teacher_index, share)
    if not all(os.path.isfile(shard_file(out_dir, stem)) for stem in shards):
        return None  # another process's shards are still to be assigned: the last to finish completes the manifest
    sizes, stats = size_statistics(out_dir, list(shards))
    write_json(os.path.join(out_dir, "cluster_sizes.json"), {"k": k, "sizes": sizes.tolist()})
    plot_sizes(sizes, os.path.join(out_dir, "cluster_sizes.png"))
    manifest["timing"]["assign_s"] = result["seconds"]  # of this run's process: a resumed run times only its shards
    manifest.update(cluster_sizes=stats, shards=len(shards), complete=True)
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def wait_for_fit(out_dir: str, share: Share, sample: Optional[str] = None) -> None:
    """Processes other than 0 assign with the centroids process 0 fits (its sample is drawn over the whole cache,
    in one process); they wait for its manifest to record it, or, given a hierarchical fit's ``sample``, until
    it is drawn, to fit their parts."""
    wait_for(lambda: fit_finished(out_dir) or (sample is not None and os.path.isfile(sample)),
             f"cluster: {share} waits for process 0's k-means fit in {out_dir}")


def main(argv: Optional[list[str]] = None) -> None:
    run_stage("cluster", ClusterOptions, __doc__, lambda options, share: cluster(options, share, verbose=True),
              _print_result, argv)


def _print_result(options: ClusterOptions, manifest: Optional[dict], share: Share) -> None:
    if manifest is None:
        print(f"cluster: {share} assigned its shards; the last process to finish completes {options.out}")
        return
    sizes = manifest["cluster_sizes"]
    print(f"{options.out}: {sizes['samples']} samples in {manifest['k']} clusters (fit on {manifest['fit_points']}); "
          f"sizes min {sizes['min']} median {sizes['median']:g} max {sizes['max']}, {sizes['empty']} empty; "
          f"mean top-1 similarity {sizes['mean_top1_sim']:.3f}")


if __name__ == "__main__":
    main()
