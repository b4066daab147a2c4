"""How close the clustering stage runs to the machine's matrix-multiply speed.

    python bench/kmeans.py [--n 200000] [--dim 128] [--k 2000] [--niter 20] [--gpu auto]

Writes N random unit vectors as a feature cache, runs data_tools.cluster on it (fit, then assignment
of every row), and times a plain torch matrix product of the same FLOPs in the same run:
fit = niter * n_fit * k * D * 2, assign = N * k * D * 2 (the similarity products, which dominate
k-means). The ratio is stage seconds / GEMM seconds: 1.0 means faiss runs at GEMM speed. The GEMM
runs on the device faiss uses (the GPU with faiss-gpu, else the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import clocked  # noqa: E402
from cid_ds.data.features import write_complete_manifest, write_shard  # noqa: E402
from data_tools.cluster import ClusterOptions, cluster, num_gpus  # noqa: E402

SHARD_ROWS = 10_000  # img2dataset's default shard size


def write_random_cache(cache_dir: str, n: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    teacher = {"weights_sha256": "0" * 64, "embed_dim": dim}
    stems = []
    for start in range(0, n, SHARD_ROWS):
        rows = rng.standard_normal((min(SHARD_ROWS, n - start), dim), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        stem = f"{start // SHARD_ROWS:05d}"
        write_shard(cache_dir, stem, [f"{start + i:09d}" for i in range(len(rows))], rows, rows, [], [],
                    teacher["weights_sha256"])
        stems.append(stem)
    write_complete_manifest(cache_dir, [f"{stem}.tar" for stem in stems], teacher)


def gemm_seconds(rows: int, dim: int, k: int, repeats: int, device: torch.device, block: int = 16384) -> float:
    """Seconds for ``repeats`` products [rows, dim] x [dim, k] in fp32, ``block`` rows at a time."""
    x = torch.randn(rows, dim, device=device)
    c = torch.randn(dim, k, device=device)
    out = torch.empty(block, k, device=device)
    torch.mm(x[:block], c, out=out[:min(block, rows)])  # warm-up

    def products() -> None:
        for _ in range(repeats):
            for i in range(0, rows, block):
                part = x[i:i + block]
                torch.mm(part, c, out=out[:len(part)])
    return clocked(products)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--gpu", default="auto", choices=("auto", "on", "off"))
    args = parser.parse_args()
    device = torch.device("cuda" if num_gpus(args.gpu) and torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as root:
        cache, out = os.path.join(root, "feats"), os.path.join(root, "clusters")
        write_random_cache(cache, args.n, args.dim)
        start = time.perf_counter()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):  # no progress bars
            manifest = cluster(ClusterOptions(features=cache, k=args.k, out=out, niter=args.niter, gpu=args.gpu))
        total = time.perf_counter() - start
    n_fit, timing = manifest["fit_points"], manifest["timing"]

    stages = [("fit", timing["fit_s"], n_fit, args.niter), ("assign", timing["assign_s"], args.n, 1)]
    print(f"N={args.n} D={args.dim} k={args.k} niter={args.niter}, fit on {n_fit} points, "
          f"faiss on {manifest['device']}, GEMM on {device.type} ({torch.get_num_threads()} torch threads)")
    print(f"{'stage':8} {'seconds':>9} {'GFLOP':>8} {'GFLOP/s':>9} {'GEMM s':>8} {'GEMM GFLOP/s':>13} {'ratio':>6}")
    for name, seconds, rows, repeats in stages:
        gflop = repeats * rows * args.k * args.dim * 2 / 1e9
        gemm = gemm_seconds(rows, args.dim, args.k, repeats, device)
        print(f"{name:8} {seconds:9.2f} {gflop:8.1f} {gflop / seconds:9.1f} {gemm:8.2f} {gflop / gemm:13.1f} "
              f"{seconds / gemm:6.2f}")
    print(f"whole stage (sample {timing['sample_s']:.2f} s + fit + assign + statistics): {total:.2f} s")


if __name__ == "__main__":
    main()
