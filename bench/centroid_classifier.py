"""The sharded centroid classifier: memory per rank and the speed-up of class sampling.

    python bench/centroid_classifier.py [--skip-memory] [--skip-speed]

Memory: each world size W is measured as rank 0 of W would run it (its C/W rows, the global batch),
in a fresh process: the bytes of the shard's tensors, and the peak RSS growth during steps; printed
beside the formula
    rows*D*4*(1 + 2 Adam moments) + sampled*D*4*6 + N*sampled*4*7
(the shard and its moments; the sampled rows, their normalised copy, gradients and Adam temporaries;
about seven N x sampled float buffers for logits, softmax and their gradients). The formula, checked
at small C, then gives bytes/rank at C = 1M, D = 512.

Speed: forward + backward + update at C = 100k on one process, sample rate 0.1 vs 1.0 (target >= 3x).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.* from a script

from bench.timing import clocked, interleaved, proc_status_bytes, reset_peak_rss  # noqa: E402
from cid_ds.parallel.partial_fc import ShardedCentroidClassifier  # noqa: E402


def formula_bytes(rows: int, dim: int, batch: int, rate: float) -> dict[str, int]:
    sampled = min(rows, max(math.ceil(rows * rate), batch))  # ShardedCentroidClassifier.num_sampled
    return {"shard + moments": rows * dim * 4 * 3, "sampled rows": sampled * dim * 4 * 6,
            "logits": batch * sampled * 4 * 7}


def one_step(clf: ShardedCentroidClassifier, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> None:
    clf(embeddings.clone().requires_grad_(), labels, step)["loss"].backward()
    clf.update(lr=1e-3)


def measure_child(rows: int, dim: int, batch: int, rate: float) -> None:
    """In a fresh process: the shard's own tensors (their bytes), then the peak RSS growth of 3 steps
    (the kernel's high-water mark is reset after building, so building's temporaries do not count)."""
    torch.manual_seed(0)
    embeddings, labels = torch.randn(batch, dim), torch.randint(0, rows, (batch,))
    clf = ShardedCentroidClassifier(torch.randn(rows, dim), sample_rate=rate, rank=0, world_size=1)
    static = sum(b.numel() * b.element_size() for b in clf.buffers())
    reset_peak_rss()
    baseline = proc_status_bytes("VmRSS")
    for step in range(3):
        one_step(clf, embeddings, labels, step)
    print(json.dumps({"static": static, "dynamic": proc_status_bytes("VmHWM") - baseline}))


def memory(classes: int, dim: int, batch: int, rate: float) -> None:
    print(f"memory per rank: measured at C={classes:,}, D={dim}, global batch {batch}, sample rate {rate} (MiB)")
    print(f"  {'W':>2} {'rows/rank':>10} {'shard+moments':>14} {'formula':>8} {'step peak':>10} {'formula':>8}")
    for world_size in (1, 2, 8):
        rows = -(-classes // world_size)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps([rows, dim, batch, rate])],
                             capture_output=True, text=True, check=True).stdout
        measured = json.loads(out.strip().splitlines()[-1])
        predicted = formula_bytes(rows, dim, batch, rate)
        dynamic = predicted["sampled rows"] + predicted["logits"]
        print(f"  {world_size:>2} {rows:>10,} {measured['static'] / 2**20:>14.1f} "
              f"{predicted['shard + moments'] / 2**20:>8.1f} {measured['dynamic'] / 2**20:>10.1f} {dynamic / 2**20:>8.1f}")
    big_c, big_d = 1_000_000, 512
    full = sum(formula_bytes(big_c, big_d, batch, rate).values())
    print(f"formula at C=1M, D=512, global batch {batch}, sample rate {rate}:")
    for world_size in (1, 2, 8):
        per_rank = formula_bytes(-(-big_c // world_size), big_d, batch, rate)
        total = sum(per_rank.values())
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in per_rank.items())
        print(f"  W={world_size}: {total / 2**30:6.2f} GiB/rank ({parts}); ratio to unsharded {total / full:.3f} "
              f"(target 1/W = {1 / world_size:.3f})")


def speed(classes: int, dim: int, batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    embeddings, labels = torch.randn(batch, dim), torch.randint(0, classes, (batch,))
    centroids = torch.randn(classes, dim)
    times = {}
    for rate in (1.0, 0.1):
        clf = ShardedCentroidClassifier(centroids, margin="arcface", sample_rate=rate, rank=0, world_size=1)
        steps = itertools.count()
        # one rate at a time: each classifier holds C x D rows and their moments
        times[rate] = interleaved({"step": clocked(lambda: one_step(clf, embeddings, labels, next(steps)))},
                                  repeats)["step"]
    print(f"cluster loss step (forward + backward + update), C={classes:,}, D={dim}, batch {batch}, "
          f"{torch.get_num_threads()} threads, median of {repeats}:")
    for rate, seconds in times.items():
        print(f"  sample rate {rate}: {seconds * 1e3:8.1f} ms  {batch / seconds:8.0f} samples/s")
    print(f"sample rate 0.1 vs 1.0: {times[1.0] / times[0.1]:.2f}x faster  (target >= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--memory-classes", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    if args.child:
        measure_child(*json.loads(args.child))
        return
    if not args.skip_memory:
        memory(args.memory_classes, 512, args.batch, 0.1)
    if not args.skip_speed:
        speed(100_000, 512, args.batch, repeats=5)


if __name__ == "__main__":
    main()
