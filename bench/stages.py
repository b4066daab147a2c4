"""The offline stages spread over processes (data_tools.spread): time, samples/s and peak memory at 1 and N.

    python bench/stages.py [--sizes 20000 80000 320000] [--processes 1 2]

For each size: a feature cache and cluster assignments of generated embeddings (bench/balance.py's
``write_inputs``: Zipf cluster sizes, 64-d), and source tars of the same keys (one small JPEG, a caption).
Then, at each process count, as a user runs them (``python -m data_tools.spread -n P -- python -m ...``):
  pack     the cache and clusters into shards of 2,000 samples (every sample: no balance);
  assign   data_tools.cluster's assignment (its fit done once beforehand, then the shard files removed);
  fit      data_tools.cluster with a hierarchical fit of --parts 4 (each process fits every P-th part, process 0
           the union), and the assignment;
  balance  data_tools.balance with its defaults (the threshold tuned on a sample, in every process) and
           --workers cores / P: one process with a pool of every core against P with their share each.
Each process gets ``cores / P`` threads (OMP_NUM_THREADS, torch's): the same machine, split. Memory: the
process tree's PSS sampled every 200 ms (bench/balance.py's ``tree_memory``); the peak of the tree's sum and the
largest single process's. Prints one row per stage, size and count, and the speed-up of N processes over 1.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psutil
import webdataset as wds
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from balance import MEMORY_FIELDS, SHARD_ROWS, tree_memory, write_inputs  # noqa: E402


def write_tars(root: str, n: int) -> str:
    """Source tars whose keys are the cache's (bench/balance.py: ``{i:09d}`` in shards of SHARD_ROWS)."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    src = os.path.join(root, "src")
    os.makedirs(src)
    for start in range(0, n, SHARD_ROWS):
        with wds.TarWriter(os.path.join(src, f"{start // SHARD_ROWS:05d}.tar")) as tar:
            for i in range(start, min(n, start + SHARD_ROWS)):
                tar.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": f"a photo of thing number {i}".encode()})
    return os.path.join(src, "*.tar")


def measured(command: list[str], processes: int) -> dict:
    """Run ``command`` as ``processes`` processes with the cores split between them; seconds and PSS peaks."""
    threads = str(max(1, len(os.sched_getaffinity(0)) // processes))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, DS_ACCELERATOR="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "data_tools.spread", "-n", str(processes), "--", *command],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    tree_peak, process_peak = 0, 0
    while proc.poll() is None:
        try:
            tree_peak = max(tree_peak, tree_memory(root)["pss"])
            for child in root.children():  # each stage process with its own children
                process_peak = max(process_peak, tree_memory(child)["pss"])
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} x {processes} failed:\n{proc.stderr.read()[-3000:]}")
    return {"seconds": seconds, "tree_pss": tree_peak, "process_pss": process_peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 80_000, 320_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", nargs="+", default=["pack", "assign", "fit", "balance"])
    args = parser.parse_args()
    assert "pss" in MEMORY_FIELDS.values()
    print(f"{len(os.sched_getaffinity(0))} cores; sizes {args.sizes}; processes {args.processes}\n")
    print("| stage | samples | processes | seconds | samples/s | speed-up | peak PSS, tree | peak PSS, one process |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as root:
            feats, clusters, _ = write_inputs(root, n, dim=64, k=max(16, n // 400), exponent=0.9)
            shards = write_tars(root, n)
            fitted = os.path.join(root, "fitted")
            subprocess.run([sys.executable, "-m", "data_tools.cluster", "--features", feats, "--k", str(max(16, n // 400)),
                            "--out", fitted, "--gpu", "off"], cwd=REPO, check=True, capture_output=True)
            stages = {
                "pack": lambda out: ["python", "-m", "data_tools.pack", "--shards", shards, "--features", feats,
                                     "--clusters", clusters, "--tokenizer", "demo-student", "--out", out,
                                     "--samples-per-shard", "2000"],
                "assign": lambda out: ["python", "-m", "data_tools.cluster", "--features", feats, "--k",
                                       str(max(16, n // 400)), "--out", out, "--gpu", "off"],
                "fit": lambda out: ["python", "-m", "data_tools.cluster", "--features", feats, "--k",
                                    str(max(16, n // 400)), "--out", out, "--gpu", "off", "--parts", "4"],
                "balance": lambda out: ["python", "-m", "data_tools.balance", "--features", feats, "--clusters",
                                        clusters, "--out", out, "--max-removed-fraction", "1", "--workers",
                                        str(max(1, len(os.sched_getaffinity(0)) // processes))],
            }
            for stage, command in ((name, stages[name]) for name in args.stages):
                first = None
                for processes in args.processes:
                    out = os.path.join(root, f"{stage}{processes}")
                    if stage == "assign":  # the fit once; only the assignment is timed
                        shutil.copytree(fitted, out, ignore=shutil.ignore_patterns("0*.npz", "cluster_sizes*"))
                    result = measured([sys.executable if c == "python" else c for c in command(out)], processes)
                    first = first or result["seconds"]
                    print(f"| {stage} | {n:,} | {processes} | {result['seconds']:.1f} | {n / result['seconds']:,.0f} | "
                          f"{first / result['seconds']:.2f}x | {result['tree_pss'] / 2**20:,.0f} MiB | "
                          f"{result['process_pss'] / 2**20:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
