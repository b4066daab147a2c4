"""The demo, end to end on generated data: data -> teacher -> data_tools.prepare (feature cache -> clusters ->
balance -> packed shards) -> students -> table.

    python -m launch.demo [--out runs/demo] [--ranks 1] [--scale 1.0] [--captions web] [--views K] [--teachers 2]

Every stage is a real command a user would run (the trainer through the ``deepspeed`` launcher), and
every stage resumes: re-running skips what is finished. ``--scale`` shrinks data and steps (the test
suite runs the demo at a tiny scale). ``--captions web`` trains the students on the same images with web alt-text noise in
their captions (data_tools.make_demo_data), and the teacher on clean captions (OUT/teacher_data): it stands
for a large teacher trained on better data than the students' web captions, as a LAION-400M ViT-L/14 is.
Use another ``--out`` for it (``make demo-web``).

``--views K`` / ``--teachers 2`` then prepare richer offline targets for ``ds_configs/ablations/views.yaml``
(``make ablate-views``) in ``OUT/targets``: a second teacher (the demo teacher's recipe from another seed),
and prepare run again with both teachers and K stored views per image.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from cid_ds.evaluate import headline
from cid_ds.io import write_json
from launch.experiments import launch_training, markdown_table

EXPERIMENTS = "ds_configs/experiments"
ROWS = (("teacher", "demo_teacher"), ("student baseline", "demo_baseline"), ("student distilled", "demo_distill"),
        ("student CID", "demo_cid"))
CLUSTERS = 64
# The demo's renderer makes no copies or re-encodes, so only near-identical embeddings count as perceptual
# duplicates (and at tiny --scale the barely trained teacher maps most images within cosine 0.99 of each other).
PERCEPTUAL = 0.9999
# Source and packed shards: the packed ones sized as for 16 loader readers (1 rank x 16), enough to split
# over the tests' 2 ranks and any worker count the demo configs use.
TRAIN_SHARDS = 16
DEFAULT_OUT = os.path.abspath("runs/demo")  # where the demo YAMLs' paths point (resolved as load_config does)


def train(yaml_name: str, out: str, ranks: int, scale: float, extra: list[str], run_name: str | None = None) -> dict:
    """Run one demo experiment with its paths under ``out`` and its steps scaled, unless it has run."""
    from cid_ds.config import load_config
    config = os.path.join(EXPERIMENTS, f"{yaml_name}.yaml")
    cfg = load_config(config, check_paths=False)
    steps = max(2, round(cfg.optim.steps * scale))
    overrides = [
        f"data.train_shards={cfg.data.train_shards.replace(DEFAULT_OUT, os.path.abspath(out))}",
        f"eval.sets={json.dumps([s.replace(DEFAULT_OUT, os.path.abspath(out)) for s in cfg.eval.sets])}",
        f"optim.steps={steps}",
        f"optim.warmup_steps={max(1, round(cfg.optim.warmup_steps * scale))}",
        f"checkpoint.every={steps}",
        f"logging.every={max(1, min(cfg.logging.every, steps // 4))}",
    ] + extra
    if cfg.data.features is not None:
        overrides.append(f"data.features={cfg.data.features.replace(DEFAULT_OUT, os.path.abspath(out))}")
    if cfg.cluster.dir is not None:
        overrides.append(f"cluster.dir={cfg.cluster.dir.replace(DEFAULT_OUT, os.path.abspath(out))}")
    return launch_training(config, os.path.join(out, run_name or cfg.output_dir.split("/")[-1]), overrides, ranks)


def prepare_data(args: argparse.Namespace, shards: list[str], teachers: list[str], out: str, views: int = 0) -> dict:
    """``data_tools.prepare`` as a user runs it, with the demo's k, perceptual threshold and shard count."""
    import torch

    from data_tools.prepare import PrepareOptions, prepare, print_summary
    summary = prepare(PrepareOptions(shards=shards, teacher=teachers, student="demo-student", out=out, views=views,
                                     k=CLUSTERS, perceptual=PERCEPTUAL, gpus_per_node=1,
                                     train_on="gpu" if torch.cuda.is_available() else "cpu", workers=TRAIN_SHARDS,
                                     device="cpu", seed=args.seed))
    print_summary(summary)
    return summary


def prepare_richer_targets(args: argparse.Namespace, shards: list[str], teacher_export: str) -> dict:
    """The second teacher, and prepare with every teacher and ``args.views`` views into ``OUT/targets``;
    returns the stage times."""
    timings, t = {}, time.time()
    teachers = [f"local-dir:{teacher_export}"]
    if args.teachers > 1:
        second = train("demo_teacher", args.out, args.ranks, args.scale, [f"seed={args.seed + 1}"],
                       run_name="teacher_b")
        teachers.append(f"local-dir:{second['export']}")
        timings["teacher_b"] = time.time() - t
    t = time.time()
    prepare_data(args, shards, teachers, os.path.join(args.out, "targets"), views=args.views)
    timings["prepare_targets"] = time.time() - t
    return timings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--ranks", type=int, default=1, help="processes per node (CPU ranks or GPUs)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the demo's data and steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captions", default="clean", choices=("clean", "web"),
                        help="web: training captions with web alt-text noise; evaluation labels stay clean")
    parser.add_argument("--views", type=int, default=0, help="also prepare packed shards with K stored views")
    parser.add_argument("--teachers", type=int, default=1, choices=(1, 2), help="2: ... and a second teacher")
    args = parser.parse_args(argv)
    from cid_ds.config import expand_shards
    from cid_ds.io import read_json
    from data_tools.make_demo_data import generate

    t0 = time.time()
    timings = {}
    data = os.path.join(args.out, "data")
    sizes = dict(train_samples=max(256, round(40000 * args.scale)), shards=TRAIN_SHARDS, seed=args.seed,
                 eval_scale=min(1.0, max(0.1, args.scale)))
    generate(data, captions=args.captions, **sizes)
    shards = expand_shards(os.path.join(data, "train", "*.tar"))
    teacher_data = []
    if args.captions != "clean":  # the teacher stands for one trained on better data than the students' captions
        generate(os.path.join(args.out, "teacher_data"), **sizes)
        teacher_data = [f"data.train_shards={os.path.abspath(os.path.join(args.out, 'teacher_data', 'train', '*.tar'))}"]
    timings["data"] = time.time() - t0

    results = {}
    t = time.time()
    results["teacher"] = train("demo_teacher", args.out, args.ranks, args.scale, [f"seed={args.seed}", *teacher_data])
    timings["teacher"] = time.time() - t

    t = time.time()
    prepare_data(args, shards, [f"local-dir:{results['teacher']['export']}"], args.out)
    report = read_json(os.path.join(args.out, "balance", "balance_report.json"))
    timings["prepare"] = time.time() - t

    for label, name in ROWS[1:]:
        t = time.time()
        results[label] = train(name, args.out, args.ranks, args.scale, [f"seed={args.seed}"])
        timings[name] = time.time() - t
    if args.views or args.teachers > 1:
        timings |= prepare_richer_targets(args, shards, results["teacher"]["export"])

    rows = {label: headline(res["eval"]) for label, res in results.items()}
    baseline = rows["student baseline"]
    summary = {"captions": args.captions, "table": rows, "eval": {label: res["eval"] for label, res in results.items()},
               "balance": {k: report[k] for k in ("kept_fraction", "removed_fraction", "removed_perceptual",
                                                   "removed_semantic")},
               "beats_baseline": {label: {k: rows[label][k] > baseline[k] for k in baseline}
                                  for label in ("student distilled", "student CID")},
               "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.time() - t0, 1)}}
    write_json(os.path.join(args.out, "results.json"), summary)
    print(f"\n[demo] image semantic balance removed {report['removed_fraction']:.1%} of the training samples "
          f"(students train on the {report['kept_fraction']:.1%} kept, packed in {os.path.join(args.out, 'packed')})")
    print("\n" + markdown_table(rows, "model"))
    print(f"\n[demo] {summary['seconds']}  -> {os.path.join(args.out, 'results.json')}")
    return summary


if __name__ == "__main__":
    main()
