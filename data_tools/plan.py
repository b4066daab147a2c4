"""What data_tools.prepare will cost, before it starts: ``python -m data_tools.prepare ... --plan``.

Samples are counted from the first shards' tar headers. Then every stage runs for real on a cut of the user's
own data (``SAMPLE`` samples, into OUT/plan_sample, removed after) with the user's teacher on this machine's
device, and the plan scales what it measured to the whole: extract's samples/s per process; faiss's
sample x centroid products per second at the plan's k (the assignment is N x k of them, each k-means
iteration n_fit x k); the balance's seconds for one cluster of the plan's mean size, from the teacher's own
embeddings; pack's samples/s; each stage's bytes per sample on disk. The time of a stage is its work over
every process of the job's shape (--nodes x --gpus-per-node: prepare's processes), except the k-means fit:
process 0 fits a one-part fit alone; a hierarchical fit's parts are spread, their union clustered in process 0.
Figures for a machine other than this one scale with its speed; the sample is small, so fixed costs (a pool's
start, a tokenizer's load) make the balance and pack rates pessimistic.
"""
from __future__ import annotations

import io
import os
import resource
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import faiss
import numpy as np

from cid_ds.data.features import FeatureCache
from cid_ds.io import write_json
from data_tools.balance import group_cluster
from data_tools.cluster import (DEFAULT_FIT_MEMORY_GB, default_k, fit_memory, fit_shape,
                                load_image_rows, unit_rows)
from webdataset.tariterators import base_plus_ext

SAMPLE = 512  # samples of the user's data the stages run on
PROBE_SHARDS = 4  # shards whose headers are counted
NITER = 20  # data_tools.cluster's default k-means iterations
STAGES = ("extract", "cluster fit", "assign", "balance", "pack")


@dataclass
class Measured:
    """Per process on this machine, from the sample."""
    extract_per_s: float      # samples/s, after the teacher's load
    pairs_per_s: float        # faiss inner products (sample x centroid) per second, at the plan's k
    balance_cluster_s: float  # seconds to balance one cluster of ``cluster_size`` samples
    cluster_size: int
    pack_per_s: float         # kept samples/s, start-up included
    kept_fraction: float
    dim: int
    bytes_per_sample: dict    # on disk, per input sample: feats, clusters, balance; per kept sample: packed
    extract_peak_rss: int     # bytes, this process, teacher loaded


def count_samples(shards: list[str], probe: int = PROBE_SHARDS) -> tuple[int, float]:
    """``(samples, source bytes per sample)``: the mean of the first ``probe`` shards' distinct keys (tar
    headers only), times the shard count."""
    counts, sizes = [], []
    for path in shards[:probe]:
        with tarfile.open(path) as tar:
            counts.append(len({base_plus_ext(member.name)[0] for member in tar if member.isfile()}))
        sizes.append(os.path.getsize(path))
    per_shard = sum(counts) / len(counts)
    return round(per_shard * len(shards)), sum(sizes) / max(1, sum(counts))


def cut_sample(shards: list[str], samples: int, path: str) -> int:
    """A tar at ``path`` of the first ``samples`` samples of ``shards`` (every member of each), in order; how
    many it holds."""
    keys: set = set()
    with tarfile.open(path, "w") as out:
        for shard in shards:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key = base_plus_ext(member.name)[0]
                    if not member.isfile() or (key not in keys and len(keys) == samples):
                        continue
                    keys.add(key)
                    out.addfile(member, io.BytesIO(tar.extractfile(member).read()))
            if len(keys) == samples:
                break
    return len(keys)


def pairs_per_second(dim: int, k: int, rows: int = 4096, max_centroids: int = 65536) -> float:
    """faiss's exact inner-product search rate, rows x centroids per second, at min(k, ``max_centroids``)
    centroids (the rate is flat in k beyond that: one GEMM)."""
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((min(k, max_centroids), dim), dtype=np.float32)
    x = rng.standard_normal((rows, dim), dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(centroids)
    start = time.perf_counter()
    index.search(x, 1)
    return rows * len(centroids) / (time.perf_counter() - start)


def balance_seconds(rows: np.ndarray, size: int, block_size: int = 4096) -> float:
    """Seconds to balance one cluster of ``size`` of the teacher's embeddings: ``rows`` tiled to that size
    with a little noise (so that not every pair is a duplicate)."""
    rng = np.random.default_rng(0)
    x = np.resize(unit_rows(rows), (size, rows.shape[1])) + rng.standard_normal((size, rows.shape[1])) * 0.05
    start = time.perf_counter()
    group_cluster(unit_rows(x.astype(np.float32)), 0.9, 0.98, block_size)
    return time.perf_counter() - start


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def measure(run_stages: Callable[[list[str], str, dict], dict], shards: list[str], work_dir: str, samples: int,
            k: int) -> Measured:
    """Run the stages (``run_stages(shards, out, timing)``: data_tools.prepare's) on a cut of ``shards`` in
    ``work_dir``, and measure for ``samples`` samples in ``k`` clusters."""
    os.makedirs(work_dir, exist_ok=True)
    cut = os.path.join(work_dir, "sample.tar")
    cut_samples = cut_sample(shards, SAMPLE, cut)
    timing: dict = {}
    summary = run_stages([cut], os.path.join(work_dir, "out"), timing)
    cache = FeatureCache(os.path.join(work_dir, "out", "feats"), with_views=False)
    rows = np.concatenate([load_image_rows(cache, stem, n).image for stem, n in cache.shard_samples().items()])
    dim = rows.shape[1]
    cluster_size = max(2, min(4096, round(samples / k)))
    kept = summary["packed_samples"]
    return Measured(
        extract_per_s=timing["extract"]["samples_per_s"], pairs_per_s=pairs_per_second(dim, k),
        balance_cluster_s=balance_seconds(rows.astype(np.float32), cluster_size), cluster_size=cluster_size,
        pack_per_s=kept / max(timing["pack"]["seconds"], 1e-9), kept_fraction=kept / cut_samples, dim=dim,
        bytes_per_sample={stage: folder_bytes(os.path.join(work_dir, "out", stage)) / cut_samples
                          for stage in ("feats", "clusters", "balance")}
        | {"packed": folder_bytes(os.path.join(work_dir, "out", "packed")) / max(1, kept)},
        extract_peak_rss=timing["extract"]["peak_rss"])


def estimate(samples: int, k: int, processes: int, measured: Measured, fit_memory_gb: float = DEFAULT_FIT_MEMORY_GB,
             max_points_per_centroid: int = 256) -> list[dict]:
    """One row per stage: hours, disk and peak host memory per process, each with how it was reckoned."""
    m, dim = measured, measured.dim
    points, parts = fit_shape(samples, dim, k, max_points_per_centroid, fit_memory_gb)
    n_fit = min(k * points, samples)
    # a hierarchical fit's parts run side by side, a round of parts at a time; then process 0 clusters their union
    rounds = -(-parts // processes)
    fit_pairs = NITER * (n_fit * k if parts == 1 else rounds * (n_fit // parts) * k + parts * k * k)
    kept = round(samples * m.kept_fraction)
    key_bytes = 4 * 24  # numpy str keys: 4 bytes a character, ~24 characters
    hours = lambda seconds: seconds / 3600  # noqa: E731
    return [
        {"stage": "extract", "hours": hours(samples / (m.extract_per_s * processes)),
         "disk_bytes": m.bytes_per_sample["feats"] * samples, "memory_bytes": m.extract_peak_rss,
         "how": f"{m.extract_per_s:,.0f} samples/s a process x {processes}"},
        {"stage": "cluster fit", "hours": hours(fit_pairs / m.pairs_per_s),
         "disk_bytes": n_fit * dim * 2, "memory_bytes": fit_memory(n_fit, dim, k, parts),
         "how": (f"process 0: {NITER} iterations of {n_fit:,} x {k:,} ({points} a centroid)" if parts == 1 else
                 f"{NITER} iterations of {parts} parts of {n_fit // parts:,} x {k:,} ({points} a centroid), "
                 f"{rounds} a process, then of their {parts * k:,} centroids x {k:,} in process 0")
                + f" at {m.pairs_per_s:.3g} products/s; disk: its sample, while it runs"},
        {"stage": "assign", "hours": hours(samples * k / (m.pairs_per_s * processes)),
         "disk_bytes": m.bytes_per_sample["clusters"] * samples, "memory_bytes": k * dim * 4 + 65536 * dim * 4,
         "how": f"{samples:,} x {k:,} products at {m.pairs_per_s:.3g}/s a process x {processes}"},
        {"stage": "balance", "hours": hours(samples / m.cluster_size * m.balance_cluster_s / processes),
         "disk_bytes": m.bytes_per_sample["balance"] * samples + samples / processes * dim * 2,
         "memory_bytes": samples * (56 + key_bytes) + 4 * 4096**2,
         "how": f"{samples / m.cluster_size:,.0f} clusters of ~{m.cluster_size} at {m.balance_cluster_s:.3g} s each "
                f"/ {processes}, compute only: each process also reads the whole cache once (its clusters' rows lie in "
                f"every shard); disk: keep-lists + each process's copy of its rows"},
        {"stage": "pack", "hours": hours(kept / (m.pack_per_s * processes)),
         "disk_bytes": m.bytes_per_sample["packed"] * kept, "memory_bytes": None,
         "how": f"{kept:,} kept ({m.kept_fraction:.1%} in the sample) at {m.pack_per_s:,.0f} samples/s a process "
                f"x {processes}"},
    ]


def duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 1 else f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def size(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**40:,.2f} TiB" if n >= 2**40 else f"{n / 2**30:,.1f} GiB" \
        if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def print_plan(rows: list[dict], samples: int, k: int, processes: int, source_bytes: float) -> None:
    print(f"[plan] {samples:,} samples ({size(source_bytes * samples)} of tars), k = {k:,}, {processes} processes")
    print(f"[plan] {'stage':<12} {'time':>9} {'disk':>11} {'memory/process':>15}  how")
    for row in rows:
        print(f"[plan] {row['stage']:<12} {duration(row['hours']):>9} {size(row['disk_bytes']):>11} "
              f"{size(row['memory_bytes']):>15}  {row['how']}")
    print(f"[plan] total {duration(sum(row['hours'] for row in rows))}")


def plan(run_stages: Callable[[list[str], str, dict], dict], shards: list[str], out_dir: str, k: Optional[int],
         processes: int, fit_memory_gb: float = DEFAULT_FIT_MEMORY_GB, samples: Optional[int] = None) -> dict:
    """Measure on a cut of ``shards``, estimate the whole (or ``samples`` samples), print it and write
    OUT/plan.json; returns it."""
    counted, source_bytes = count_samples(shards)
    samples = samples or counted
    k = k or default_k(samples)
    work = os.path.join(out_dir, "plan_sample")
    try:
        measured = measure(run_stages, shards, work, samples, k)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = estimate(samples, k, processes, measured, fit_memory_gb)
    print_plan(rows, samples, k, processes, source_bytes)
    result = {"samples": samples, "k": k, "processes": processes, "source_bytes_per_sample": source_bytes,
              "measured": asdict(measured), "stages": rows,
              "peak_rss_note": "extract: this process's peak with the teacher loaded; pack: not estimated"}
    write_json(os.path.join(out_dir, "plan.json"), result)
    return result


def peak_rss() -> int:
    """This process's peak resident memory, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
