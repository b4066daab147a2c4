"""Image semantic balance at 1M samples: wall time and peak memory against the input embeddings.

    python bench/balance.py [--n 1000000] [--dim 128] [--k 10000] [--zipf 0.9] [--workers 2] [--block-size 4096]

Writes N embeddings as a feature cache (shards of 10k rows, fp16) and a cluster folder (top-1 ids) in a
temporary folder. Cluster sizes follow a Zipf law (size of the r-th largest ~ r^-zipf; the defaults give
a largest cluster of ~69k). Each cluster's members are spread around a random centre (cosine to one
another ~0.5); 10% of them are near-copies of another member (cosine ~0.995) and 10% semantic duplicates
(cosine ~0.93), so there is something to remove. Then ``python -m data_tools.balance`` runs in a child
process whose process tree (the workers are forked) is sampled every 200 ms from /proc/PID/smaps_rollup:
the peaks of the tree's summed PSS (every page, shared ones split between the processes that map them),
Pss_Anon (allocated memory only: not mapped files such as libraries and the memory-mapped embeddings)
and RSS (shared pages counted in every process). The input is the cache's fp16 image rows (N x D x 2
bytes); the target is a peak of at most 2x that. A child that only imports data_tools.balance (numpy,
faiss, matplotlib; no torch) shows the fixed cost any run pays, printed beside it. The
report's largest similarity tile shows that the largest cluster was never compared as one n x n matrix.
Reading smaps_rollup slows the process read, so the wall time comes from a second, unsampled run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cid_ds.data.clusters import write_assignments  # noqa: E402
from cid_ds.data.features import write_complete_manifest, write_shard  # noqa: E402
from cid_ds.io import MANIFEST, write_json  # noqa: E402

SHARD_ROWS = 10_000  # img2dataset's default shard size
DUPLICATES = {"near-copy": (0.1, 0.1), "semantic": (0.1, 0.4)}  # fraction of rows, noise scale
MEMORY_FIELDS = {"Pss:": "pss", "Pss_Anon:": "pss_anon", "Rss:": "rss"}
TEACHER = {"weights_sha256": "0" * 64, "embed_dim": 0}


def zipf_sizes(n: int, k: int, exponent: float) -> np.ndarray:
    """``k`` cluster sizes summing to ``n``, the r-th largest ~ r^-exponent, each at least 1."""
    weights = np.arange(1, k + 1, dtype=np.float64) ** -exponent
    sizes = np.maximum(1, np.floor(weights / weights.sum() * n)).astype(np.int64)
    sizes[0] += n - sizes.sum()
    return sizes


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_inputs(root: str, n: int, dim: int, k: int, exponent: float, seed: int = 0) -> tuple[str, str, np.ndarray]:
    """A feature cache and a cluster folder (as data_tools.extract and data_tools.cluster write them)."""
    rng = np.random.default_rng(seed)
    sizes = zipf_sizes(n, k, exponent)
    labels = rng.permutation(np.repeat(np.arange(k, dtype=np.int32), sizes))
    centres = unit(rng.standard_normal((k, dim)))
    x = unit(centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)).astype(np.float32)
    # duplicates: a row replaced by another member of its cluster plus noise
    by_cluster = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    source = by_cluster[starts[labels] + rng.integers(0, 1 << 62, n) % sizes[labels]]
    draw = rng.random(n)
    low = 0.0
    for fraction, noise in DUPLICATES.values():
        rows = (draw >= low) & (draw < low + fraction) & (source != np.arange(n))
        x[rows] = unit(x[source[rows]] + noise * rng.standard_normal((int(rows.sum()), dim), dtype=np.float32)
                       / np.sqrt(dim))
        low += fraction
    teacher = dict(TEACHER, embed_dim=dim)
    feats, clusters = os.path.join(root, "feats"), os.path.join(root, "clusters")
    stems = []
    for start in range(0, n, SHARD_ROWS):
        stem, rows = f"{start // SHARD_ROWS:05d}", slice(start, min(n, start + SHARD_ROWS))
        keys = [f"{i:09d}" for i in range(rows.start, rows.stop)]
        image = x[rows].astype(np.float16)
        write_shard(feats, stem, keys, image, image, [], [], teacher["weights_sha256"])
        ids = labels[rows, None]
        write_assignments(clusters, stem, keys, ids, np.ones(ids.shape, np.float16), [], teacher["weights_sha256"])
        stems.append(stem)
    write_complete_manifest(feats, [f"{stem}.tar" for stem in stems], teacher)
    write_json(os.path.join(clusters, MANIFEST),
               {"k": k, "topk": 1, "dim": dim, "teacher": teacher, "features": feats, "complete": True,
                "note": "written by bench/balance.py: Zipf sizes, not k-means"})
    return feats, clusters, sizes


def tree_memory(root: psutil.Process) -> dict:
    """Summed smaps_rollup fields (bytes) of ``root`` and its descendants."""
    total = dict.fromkeys(MEMORY_FIELDS.values(), 0)
    for p in [root] + root.children(recursive=True):
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                for line in f:
                    name, value, *_ = line.split()
                    if name in MEMORY_FIELDS:
                        total[MEMORY_FIELDS[name]] += int(value) * 1024
        except (FileNotFoundError, ProcessLookupError):  # ended between listing and reading
            pass
    return total


def run(cmd: list[str], sample_memory: bool) -> dict:
    """Run ``cmd``; with ``sample_memory``, sample its process tree every 200 ms and return the peaks too.
    Reading smaps_rollup stalls the process read (page faults wait), so timings come from a run without it."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    root = psutil.Process(proc.pid)
    peaks = dict.fromkeys(MEMORY_FIELDS.values(), 0)
    while sample_memory and proc.poll() is None:
        try:
            sample = tree_memory(root)
        except psutil.NoSuchProcess:
            break
        peaks = {name: max(peaks[name], sample[name]) for name in peaks}
        time.sleep(0.2)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return dict(peaks, seconds=seconds, stdout=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--zipf", type=float, default=0.9)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        feats, clusters, sizes = write_inputs(root, args.n, args.dim, args.k, args.zipf)
        print(f"inputs: {args.n} embeddings (D = {args.dim}) in {args.k} clusters, sizes Zipf {args.zipf}: "
              f"largest {sizes.max()}, median {np.median(sizes):g}, smallest {sizes.min()} "
              f"(written in {time.perf_counter() - start:.0f} s)")
        idle = run([sys.executable, "-c", "import data_tools.balance"], sample_memory=True)
        # a fixed threshold, as the numbers in bench/RESULTS.md were measured (the default now tunes one first)
        cmd = [sys.executable, "-m", "data_tools.balance", "--features", feats, "--clusters", clusters,
               "--semantic", "0.9", "--max-removed-fraction", "1",
               "--workers", str(args.workers), "--block-size", str(args.block_size), "--out"]
        timed = run(cmd + [os.path.join(root, "timed")], sample_memory=False)
        sampled = run(cmd + [os.path.join(root, "sampled")], sample_memory=True)
        with open(os.path.join(root, "timed", "balance_report.json")) as f:
            report = json.load(f)

    input_bytes = args.n * args.dim * 2
    mib = 1 << 20
    tile = report["largest_tile"]
    largest = int(sizes.max())
    print(timed["stdout"].strip())
    print(f"wall {timed['seconds']:.1f} s, start-up included ({args.n / timed['seconds']:,.0f} samples/s) with "
          f"--workers {args.workers}; stages: {', '.join(f'{name} {s:.1f}' for name, s in report['timing'].items())}")
    print(f"input embeddings (fp16 image rows): {input_bytes / mib:.0f} MiB")
    for name in ("pss", "pss_anon", "rss"):
        print(f"peak {name.upper():8} of the process tree: {sampled[name] / mib:6.0f} MiB = "
              f"{sampled[name] / input_bytes:5.2f} x input; above an idle import ({idle[name] / mib:4.0f} MiB): "
              f"{(sampled[name] - idle[name]) / input_bytes:5.2f} x input")
    for name, value in (("PSS, all included", sampled["pss"]),
                        ("PSS above the idle import", sampled["pss"] - idle["pss"]),
                        ("PSS_ANON above the idle import", sampled["pss_anon"] - idle["pss_anon"])):
        print(f"target peak <= 2 x input, {name}: {'met' if value <= 2 * input_bytes else 'NOT met'}")
    print(f"largest similarity tile {tile[0]} x {tile[1]} ({tile[0] * tile[1] * 4 / mib:.0f} MiB float32); "
          f"largest cluster {largest}: n x n would be {largest ** 2 * 4 / mib:,.0f} MiB "
          f"({'never materialised' if tile[0] * tile[1] < largest ** 2 else 'MATERIALISED'})")


if __name__ == "__main__":
    main()
