"""Running experiment YAMLs through the ``deepspeed`` launcher and tabulating their results (demo, ablate)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from cid_ds.io import read_json, write_json

TIMING = "launch_timing.json"
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def launch_training(config: str, run_dir: str, overrides: list[str], ranks: int) -> dict:
    """Train ``config`` into ``run_dir`` (``key=value`` overrides appended) unless its ``results.json``
    exists, and return those results with ``wall_seconds``: launch, training, export and eval. The ranks run
    in this process's current directory, which the config's relative paths are relative to."""
    results_file = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results_file):
        deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(29500 + os.getpid() % 1000),
               TRAIN_SCRIPT, "--config", config, f"output_dir={run_dir}", *overrides]
        print(f"\n[launch] {' '.join(cmd)}", flush=True)
        start = time.time()
        subprocess.run(cmd, check=True)
        write_json(os.path.join(run_dir, TIMING), {"wall_seconds": time.time() - start})
    timing_file = os.path.join(run_dir, TIMING)
    wall = read_json(timing_file)["wall_seconds"] if os.path.isfile(timing_file) else None
    return read_json(results_file) | {"wall_seconds": wall}


def markdown_table(rows: dict[str, dict[str, float]], first_column: str) -> str:
    """One row per key; columns are the union of the rows' metrics in first-seen order ('-' where missing)."""
    columns = list(dict.fromkeys(k for numbers in rows.values() for k in numbers))
    lines = ["| " + " | ".join([first_column, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for label, numbers in rows.items():
        cells = [_cell(numbers.get(column)) for column in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # formatted by the caller (mean ± std)
        return value
    return f"{value:.3f}" if isinstance(value, float) and abs(value) < 10 else f"{value:.0f}"
