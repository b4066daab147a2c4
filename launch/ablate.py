"""Ablation: run several experiments on the same data for the same steps, evaluate each, tabulate.

    python -m launch.ablate ds_configs/ablations/demo.yaml [--out runs/ablate] [--ranks 1] [--steps N] \\
        [key=value ...]
    python -m launch.ablate a.yaml b.yaml ... [same options]      # one row per experiment YAML

An ablation YAML lists rows, each an experiment YAML plus ``key=value`` overrides (how "each KD term alone"
is written without a YAML per term):

    steps: 300                      # optional: every row trains this many steps
    rows:
      - {name: baseline, config: ds_configs/experiments/demo_baseline.yaml}
      - {name: fd, config: ds_configs/experiments/demo_distill.yaml, overrides: [loss.instance=0, loss.fd=2000]}

Overrides on the command line apply to every row (e.g. your data paths). Every row's config is checked
before the first one trains. Each row trains through the deepspeed launcher into ``OUT/<row>/``; a
re-run skips rows that finished. ``OUT/ablation.md`` and ``OUT/ablation.json`` get a row per experiment
(zero-shot / probe / retrieval numbers, steady samples/s, wall time) and are rewritten after every row.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import yaml

from cid_ds.config import ConfigError, config_source, load_config
from cid_ds.evaluate import headline
from cid_ds.io import atomic_path, write_json
from cid_ds.sources import check_sources
from launch.experiments import launch_training, markdown_table

SPEC_KEYS = {"steps", "rows", "description"}
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


def read_spec(path: str) -> tuple[list[Row], Optional[int]]:
    """The rows and the optional common step count of an ablation YAML; errors name the file and the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"ablation file not found: {path}")
    with open(path) as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("rows"), list) or not spec["rows"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list under 'rows'")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: {', '.join(sorted(SPEC_KEYS))})")
    steps = spec.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"{path}: key 'steps' must be a positive integer, got {steps!r}")
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
    return rows, steps


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
           common: list[str] = ()) -> dict:
    """Train and evaluate every row (skipping finished ones); write and return the table."""
    names = [row.run_name for row in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"ablation rows share the run folder name {duplicates[0]!r}: give them distinct names")
    planned = [(row, row_overrides(row, list(common), steps)) for row in rows]
    table: dict[str, dict] = {}
    for row, overrides in planned:
        results = launch_training(row.config, os.path.join(out, row.run_name), overrides, ranks)
        table[row.name] = {"config": row.config, "overrides": overrides, "eval": results.get("eval", {}),
                           **{k: results.get(k) for k in RATES}, "wall_seconds": results["wall_seconds"]}
        write_tables(out, table)
    return table


def write_tables(out: str, table: dict[str, dict]) -> str:
    rows = {name: headline(entry["eval"]) | {"samples/s steady": entry["samples_per_s_steady"],
                                             "wall s": entry["wall_seconds"]}
            for name, entry in table.items()}
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
        if specs:
            rows, spec_steps = read_spec(specs[0])
        else:
            rows, spec_steps = [Row(load_config(path, check_paths=False).name, path) for path in files], None
        table = ablate(rows, args.out, args.ranks, args.steps or spec_steps, overrides)
    except ConfigError as e:
        sys.exit(f"ablate: {e}")
    print("\n" + write_tables(args.out, table))
    print(f"\n[ablate] {os.path.join(args.out, 'ablation.md')}, {os.path.join(args.out, 'ablation.json')}")
    return table


if __name__ == "__main__":
    main()
