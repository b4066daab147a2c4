"""Ablation: run several experiments on the same data for the same steps, evaluate each, tabulate.

    python -m launch.ablate ds_configs/ablations/demo.yaml [--out runs/ablate] [--ranks 1] [--steps N] \\
        [--seeds N] [key=value ...]
    python -m launch.ablate a.yaml b.yaml ... [same options]      # one row per experiment YAML

An ablation YAML lists rows, each an experiment YAML plus ``key=value`` overrides (how "each KD term alone"
is written without a YAML per term):

    steps: 300                      # optional: every row trains this many steps
    seeds: 3                        # optional: every row trains with seed=0..2, reported as mean ± std
    rows:
      - {name: baseline, config: ds_configs/experiments/demo_baseline.yaml}
      - {name: fd, config: ds_configs/experiments/demo_distill.yaml, overrides: [loss.instance=0, loss.fd=2000]}

Overrides on the command line apply to every row (e.g. your data paths). Every row's config is checked
before the first one trains. Each row trains through the deepspeed launcher into ``OUT/<row>/``; a
re-run skips rows that finished. ``OUT/ablation.md`` and ``OUT/ablation.json`` get a row per experiment
(zero-shot / probe / retrieval numbers, steady samples/s, wall time) and are rewritten after every row.

With ``--seeds N`` (N > 1) every row trains N times, with ``seed=0..N-1`` (the data order, the augmentation and
the initialisation), into ``OUT/<row>/seed<S>/``; the table gives each number as mean ± std (sample standard
deviation) over the seeds, and under it every row is compared with the first: a difference of means no larger
than the sum of the two rows' standard deviations is reported as within the seed spread, not as a difference.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional

import yaml

from cid_ds.config import ConfigError, config_source, load_config
from cid_ds.evaluate import headline
from cid_ds.io import atomic_path, write_json
from cid_ds.sources import check_sources
from launch.experiments import launch_training, markdown_table

SPEC_KEYS = {"steps", "seeds", "rows", "description"}
RATES = ("samples_per_s_steady", "samples_per_s_run_average")  # results.json's, kept in ablation.json
ROW_KEYS = {"name", "config", "overrides"}


@dataclass
class Row:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)

    @property
    def run_name(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


def read_spec(path: str) -> tuple[list[Row], Optional[int], Optional[int]]:
    """The rows, and the optional common step count and seed count, of an ablation YAML; errors name the file
    and the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"ablation file not found: {path}")
    with open(path) as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list) or not spec["rows"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list under 'rows'")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(SPEC_KEYS))})")
    for key in ("steps", "seeds"):
        if spec.get(key) is not None and (not isinstance(spec[key], int) or spec[key] < 1):
            raise ConfigError(f"{path}: key '{key}' must be a positive integer, got {spec[key]!r}")
    rows = []
    for i, item in enumerate(spec["rows"]):
        where = f"{path}: rows[{i}]"
        if not isinstance(item, dict) or not {"name", "config"} <= set(item):
            raise ConfigError(f"{where}: each row needs 'name' and 'config'")
        if set(item) - ROW_KEYS:
            raise ConfigError(f"{where}: unknown key '{sorted(set(item) - ROW_KEYS)[0]}' (known: name, config, overrides)")
        overrides = item.get("overrides", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"{where}: 'overrides' must be a list of key=value strings")
        rows.append(Row(str(item["name"]), str(item["config"]), overrides))
    return rows, spec.get("steps"), spec.get("seeds")


def row_overrides(row: Row, common: list[str], steps: Optional[int]) -> list[str]:
    """The row's overrides, then the common ones, then the step count (warm-up scaled with it); the
    result is checked as the trainer will check it."""
    overrides = row.overrides + common
    if steps is not None:
        cfg = load_config(row.config, overrides, check_paths=False)
        warmup = round(cfg.optim.warmup_steps * steps / cfg.optim.steps)
        overrides = overrides + [f"optim.steps={steps}", f"optim.warmup_steps={warmup}", f"checkpoint.every={steps}"]
    check_sources(load_config(row.config, overrides), config_source(row.config, overrides))
    return overrides


def ablate(rows: list[Row], out: str, ranks: int = 1, steps: Optional[int] = None,
           common: list[str] = (), seeds: int = 1) -> dict:
    """Train and evaluate every row, ``seeds`` times each (skipping finished runs); write and return the table."""
    names = [row.run_name for row in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"ablation rows share the run folder name {duplicates[0]!r}: give them distinct names")
    planned = [(row, row_overrides(row, list(common), steps)) for row in rows]
    table: dict[str, dict] = {}
    for row, overrides in planned:
        runs = []
        for seed in range(seeds):
            folder, seeded = (os.path.join(out, row.run_name), overrides) if seeds == 1 else \
                (os.path.join(out, row.run_name, f"seed{seed}"), overrides + [f"seed={seed}"])
            results = launch_training(row.config, folder, seeded, ranks)
            runs.append({"seed": seed if seeds > 1 else None, "eval": results.get("eval", {}),
                         **{k: results.get(k) for k in RATES}, "wall_seconds": results["wall_seconds"]})
        table[row.name] = {"config": row.config, "overrides": overrides, "runs": runs}
        write_tables(out, table)
    return table


def row_numbers(entry: dict) -> dict[str, list[float]]:
    """Each headline number of a row (and its steady samples/s and wall time), one value per seed."""
    per_run = [headline(run["eval"]) | {"samples/s steady": run["samples_per_s_steady"], "wall s": run["wall_seconds"]}
               for run in entry["runs"]]
    return {name: [numbers[name] for numbers in per_run if numbers.get(name) is not None] for name in per_run[0]}


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def compare_with_first(numbers: dict[str, dict[str, list[float]]]) -> list[str]:
    """Per row after the first, its differences of means from the first row beyond the seed spread (the sum
    of the two standard deviations) and the numbers within it."""
    (first, reference), *others = numbers.items()
    lines = []
    for name, values in others:
        beyond, within = [], []
        for metric in reference.keys() & values.keys() - {"samples/s steady", "wall s"}:
            (a, sa), (b, sb) = mean_std(reference[metric]), mean_std(values[metric])
            (beyond if abs(b - a) > sa + sb else within).append(f"{metric} {b - a:+.3f}")
        lines.append(f"- {name} vs {first}: " + ("; ".join(sorted(beyond)) or "no difference beyond the spread") +
                     (f" (within the seed spread: {', '.join(sorted(within))})" if within else ""))
    return lines


def write_tables(out: str, table: dict[str, dict]) -> str:
    numbers = {name: row_numbers(entry) for name, entry in table.items()}
    seeded = any(len(entry["runs"]) > 1 for entry in table.values())
    if seeded:
        rows = {name: {metric: "{:.3f} ± {:.3f}".format(*mean_std(values)) if "wall" not in metric and "/s" not in metric
                       else mean_std(values)[0] for metric, values in per_metric.items()}
                for name, per_metric in numbers.items()}
        markdown = markdown_table(rows, f"row (mean ± std, {max(len(e['runs']) for e in table.values())} seeds)")
        markdown += "\n\n" + "\n".join(compare_with_first(numbers))
    else:
        rows = {name: {metric: values[0] for metric, values in per_metric.items()} for name, per_metric in numbers.items()}
        markdown = markdown_table(rows, "row")
    write_json(os.path.join(out, "ablation.json"), {"rows": table, "table": rows})
    with atomic_path(os.path.join(out, "ablation.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown + "\n")
    return markdown


def is_spec(path: str) -> bool:
    """An ablation YAML has a top-level 'rows' list; anything else is an experiment YAML."""
    with open(path) as f:
        tree = yaml.safe_load(f)
    return isinstance(tree, dict) and "rows" in tree


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m launch.ablate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="+", metavar="YAML_OR_KEY=VALUE",
                        help="one ablation YAML, or experiment YAMLs (a row each); key=value overrides for every row")
    parser.add_argument("--out", default="runs/ablate")
    parser.add_argument("--ranks", type=int, default=1, help="processes per node (CPU ranks or GPUs)")
    parser.add_argument("--steps", type=int, default=None, help="steps for every row (default: the spec's, else each YAML's)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="train every row with seed=0..N-1, reported as mean ± std (default: the spec's, else 1)")
    args = parser.parse_intermixed_args(argv)
    overrides = [item for item in args.items if "=" in item]
    files = [item for item in args.items if "=" not in item]
    try:
        for path in files:
            if not os.path.isfile(path):
                raise ConfigError(f"file not found: {path}")
        specs = [path for path in files if is_spec(path)]
        if specs and len(files) > 1:
            raise ConfigError(f"{specs[0]} is an ablation YAML: give it alone, or experiment YAMLs only")
        if args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        if specs:
            rows, spec_steps, spec_seeds = read_spec(specs[0])
        else:
            rows, spec_steps, spec_seeds = [Row(load_config(path, check_paths=False).name, path) for path in files], None, None
        table = ablate(rows, args.out, args.ranks, args.steps or spec_steps, overrides, args.seeds or spec_seeds or 1)
    except ConfigError as e:
        sys.exit(f"ablate: {e}")
    print("\n" + write_tables(args.out, table))
    print(f"\n[ablate] {os.path.join(args.out, 'ablation.md')}, {os.path.join(args.out, 'ablation.json')}")
    return table


if __name__ == "__main__":
    main()
