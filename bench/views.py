"""Stored views: what each extra view costs the extractor, and what replaying them gives the demo student.

    python bench/views.py [--work runs/bench_views] [--samples 4096] [--views 0 1 2 4] [--rounds 2]
                          [--no-accuracy]

1. Extract cost: ``data_tools.extract`` of the same demo shards with the demo teacher (random weights:
   the cost does not depend on them), once per view count in ``--views``, in rotation, ``--rounds`` times;
   the best time of each. Printed: seconds, samples/s, time relative to the extract of the eval view
   alone (0 views), the cost of each extra view as a fraction of that, and bytes per sample.
2. Accuracy: the demo's views ablation (``ds_configs/ablations/views.yaml`` through ``launch.ablate``,
   after ``launch.demo --views 2 --teachers 2``; both skip what has finished, so after ``make
   ablate-views`` this only prints): the demo student with the eval view, replayed stored views or its
   own random crops, one teacher or the mean of two, the same 300 steps each.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cid_ds.config import expand_shards  # noqa: E402
from cid_ds.io import read_json, write_json  # noqa: E402
from data_tools.extract import ExtractOptions, extract  # noqa: E402
from data_tools.make_demo_data import generate  # noqa: E402
from launch.experiments import markdown_table  # noqa: E402

ABLATION = "ds_configs/ablations/views.yaml"
ABLATION_OUT = "runs/demo/ablate_views"


def extract_cost(work: str, samples: int, view_counts: list[int], rounds: int) -> dict[int, dict]:
    data = os.path.join(work, "data")
    generate(data, train_samples=samples, shards=4, seed=0, eval_scale=0.1, progress=False)
    shards = expand_shards(os.path.join(data, "train", "*.tar"))
    best: dict[int, dict] = {}
    for round_ in range(rounds):
        for count in view_counts:
            out = os.path.join(work, f"feats_{count}")
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            result = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=256, workers=1,
                                            views=count, random_teacher_ok=True, device="cpu"))
            seconds = time.perf_counter() - start
            print(f"round {round_} views {count}: {seconds:.1f} s", flush=True)
            if count not in best or seconds < best[count]["seconds"]:
                best[count] = {"seconds": seconds, "samples": result["samples"],
                               "bytes_per_sample": result["bytes_per_sample"]}
            shutil.rmtree(out)
    return best


def cost_table(best: dict[int, dict]) -> str:
    base = best[min(best)]["seconds"]
    rows = {}
    for count, run in sorted(best.items()):
        relative = run["seconds"] / base
        rows[f"{count} views"] = {"seconds": run["seconds"], "samples/s": run["samples"] / run["seconds"],
                                  "x eval-view extract": relative,
                                  "per extra view": (relative - 1) / count if count else None,
                                  "bytes/sample": run["bytes_per_sample"]}
    return markdown_table(rows, "extract")


def accuracy_table() -> str:
    python = sys.executable
    subprocess.run([python, "-m", "launch.demo", "--views", "2", "--teachers", "2"], check=True)
    subprocess.run([python, "-m", "launch.ablate", ABLATION, "--out", ABLATION_OUT], check=True)
    with open(os.path.join(ABLATION_OUT, "ablation.md")) as f:
        return f.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_views")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="only the extract cost (the accuracy part runs the demo and its views ablation)")
    args = parser.parse_args()
    if 0 not in args.views:
        parser.error("--views must include 0: the eval-view extract every cost is relative to")
    best = extract_cost(args.work, args.samples, args.views, args.rounds)
    results = {"extract": {str(k): v for k, v in best.items()}}
    print("\n" + cost_table(best))
    if args.accuracy:
        table = accuracy_table()
        results["ablation"] = read_json(os.path.join(ABLATION_OUT, "ablation.json"))
        print("\n" + table)
    write_json(os.path.join(args.work, "results.json"), results)


if __name__ == "__main__":
    main()
