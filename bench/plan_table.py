"""docs/stages.md's capacity table: data_tools.plan.estimate for 200M and 400M samples on 4 and 16 nodes of 8 A100s,
from published rates where this machine cannot measure them (each named below), this machine's where it can.

    python -m bench.plan_table
"""
import argparse

from data_tools.cluster import default_k
from data_tools.plan import Measured, duration, estimate, size

A100 = Measured(
    extract_per_s=2500 / 8,  # clip-retrieval inference, ViT-L/14 on 8 x A100: ~2,500 samples/s (REFERENCES.md)
    pairs_per_s=50e6 * 1e6 * 20 / 899 / 80,  # faiss distributed k-means: 50M -> 1M, 20 iterations, 899 s, 80 GPUs
    balance_cluster_s=0.00277 / 16,  # a 400-sample 768-d cluster: 2.77 ms on one core here; 16 cores a process
    cluster_size=400,  # (a DGX A100's 128 cores over its 8 GPUs' processes)
    pack_per_s=2096,  # bench/stages.py here: 320k samples in 152.7 s, one process (64-px JPEGs)
    kept_fraction=0.563,  # CLIP-CID's balance of LAION-400M
    dim=768,  # ViT-L/14
    bytes_per_sample={"feats": 2 * 768 * 2 + 100, "clusters": 174, "balance": 224, "packed": 0.0},  # packed: your tars x the kept share
    extract_peak_rss=None)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print("| samples | nodes x 8 A100 | k | extract | k-means fit | assign | balance | pack | feats disk | fit memory |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for samples in (200_000_000, 400_000_000):
        for nodes in (4, 16):
            k = default_k(samples)
            rows = {row["stage"]: row for row in estimate(samples, k, nodes * 8, A100)}
            print(f"| {samples // 10**6}M | {nodes} | {k:,} | " + " | ".join(duration(rows[s]["hours"]) for s in (
                "extract", "cluster fit", "assign", "balance", "pack")) +
                f" | {size(rows['extract']['disk_bytes'])} | {size(rows['cluster fit']['memory_bytes'])} |")


if __name__ == "__main__":
    main()
