"""Your own data, ready to train: extract -> cluster -> balance -> pack in one resumable command.

  python -m data_tools.prepare --shards '/data/{00000..00041}.tar' --teacher ViT-L-14 \\
      --pretrained laion400m_e32 --student ViT-B-16 --out /data/prepared \\
      [--k K] [--target-keep-fraction F | --semantic T] [--max-removed-fraction 0.6] \\
      [--ranks 8] [--workers 8] [--device auto] [--seed 0]

Each stage writes what it writes when run alone (the same artifacts and manifests), into OUT/<stage>:
OUT/feats (data_tools.extract), OUT/clusters (data_tools.cluster), OUT/balance (data_tools.balance) and
OUT/packed (data_tools.pack). Every stage resumes, so a re-run after an interruption, or with a flag
that accepts what a stage refused, goes on where it stopped. The defaults fit any teacher and data size:
k from the sample count (data_tools.cluster.default_k), a balance threshold tuned to keep CLIP-CID's
fraction and refused when it would remove more than --max-removed-fraction, and shards enough for
--ranks x --workers loader readers. At the end: a summary, and OUT/train.yaml, the CLIP-CID recipe
(ds_configs/experiments/clip_cid.yaml) pointed at the prepared data, with its DeepSpeed JSON copied to
OUT/deepspeed.json (the folder trains from any checkout or container that sees it):

  NUM_GPUS=8 launch/single_node.sh /data/prepared/train.yaml

One process extracts on one device. To extract on several GPUs, run data_tools.extract under the
launcher into OUT/feats first; prepare then finds the cache complete and goes on from there.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
from typing import Optional, Sequence

import yaml

from cid_ds.config import Config, expand_shards, load_config
from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION
from cid_ds.io import atomic_path, check_writable
from data_tools.balance import DEFAULT_KEEP_FRACTION, DEFAULT_MAX_REMOVED_FRACTION, TooMuchRemoved, balance
from data_tools.balance import check_arguments as check_balance_arguments
from data_tools.cluster import cluster
from data_tools.extract import Views, extract
from data_tools.outputs import OtherRun
from data_tools.pack import pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "ds_configs", "experiments", "clip_cid.yaml")
STAGES = ("feats", "clusters", "balance", "packed")
EPOCHS = 32  # CLIP-KD's recipe (ViT-L/14 -> ViT-B/16 on CC3M+CC12M: 32 epochs, REFERENCES.md)
FULL_CLASSIFIER_UP_TO = 100_000  # clusters whose classifier is computed whole; above, MLCD's sampled 0.1
MIN_CONTRASTIVE_BATCH = 8  # below this a batch holds too few negatives for the contrastive terms to mean much


def prepare(shards: list[str], teacher: str | Sequence[str], pretrained: Optional[str] | Sequence[Optional[str]],
            student: str, out_dir: str, views: Views = Views(), k: Optional[int] = None, semantic: Optional[float] = None,
            target_keep_fraction: Optional[float] = None, perceptual: float = 0.98,
            max_removed_fraction: float = DEFAULT_MAX_REMOVED_FRACTION, ranks: int = 8, workers: int = 8,
            samples_per_shard: Optional[int] = None, device: str = "cpu", batch_size: int = 256,
            seed: int = 0, random_teacher_ok: bool = False,
            max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION) -> dict:
    """Run (or finish) every stage into ``out_dir``; write OUT/train.yaml; return the summary. ``teacher``,
    ``pretrained`` and ``views`` as data_tools.extract takes them (a list each: an ensemble). Flags a later
    stage would refuse are refused before the first starts."""
    check_balance_arguments(perceptual, semantic, DEFAULT_KEEP_FRACTION if semantic is None and target_keep_fraction
                            is None else target_keep_fraction, max_removed_fraction)
    for name, value in (("ranks", ranks), ("workers", workers), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    recipe = load_config(RECIPE, check_paths=False)
    feats, clusters, balanced, packed = (os.path.join(out_dir, stage) for stage in STAGES)
    _stage(1, "extract", feats)
    extracted = extract(shards, teacher, pretrained, feats, batch_size=batch_size, device=device, views=views,
                        random_teacher_ok=random_teacher_ok, max_damaged_fraction=max_damaged_fraction)
    cache = extracted["manifest"]
    _stage(2, "cluster", clusters)
    clustering = cluster(feats, k, clusters, topk=recipe.cluster.positives, seed=seed)
    _stage(3, "balance", balanced)
    report = balance(feats, clusters, balanced, perceptual=perceptual, semantic=semantic,
                     target_keep_fraction=target_keep_fraction, max_removed_fraction=max_removed_fraction, seed=seed)
    _stage(4, "pack", packed)
    packing = pack(shards, feats, student, packed, clusters_dir=clusters, balance_dir=balanced,
                   samples_per_shard=samples_per_shard, ranks=ranks, workers=workers,
                   max_damaged_fraction=max_damaged_fraction)
    summary = {
        "samples_in": cache["totals"]["samples"],
        "skipped": {name: cache["totals"][name] for name in ("corrupt_image", "missing_caption")},
        "damaged_shards": cache["totals"]["damaged_shards"],
        "k": clustering["k"], "k_chosen": k is None,
        "kept": report["kept"], "kept_fraction": report["kept_fraction"], "semantic": report["semantic"],
        "packed_samples": packing["totals"]["samples"], "packed_shards": len(packing["shards"]),
        "train_yaml": os.path.join(out_dir, "train.yaml"), "ranks": ranks,
    }
    write_train_yaml(summary["train_yaml"], recipe, packed, clusters, student, summary, ranks, workers)
    return summary


def _stage(number: int, name: str, out: str) -> None:
    print(f"\n[prepare {number}/{len(STAGES)}] {name} -> {out}", flush=True)


def write_train_yaml(path: str, recipe: Config, packed: str, clusters: str, student: str, summary: dict, ranks: int,
                     workers: int) -> None:
    """The CLIP-CID recipe pointed at the prepared data, sized for it: a batch that every loader reader
    (``ranks`` x ``workers``, each reading its own shards) fills at least twice an epoch, ``EPOCHS`` epochs,
    the recipe's share of warm-ups, the whole classifier below ``FULL_CLASSIFIER_UP_TO`` clusters; its loss
    weights and every other cluster key as the recipe has them. The recipe's
    DeepSpeed JSON is copied beside it, so that the folder trains from any checkout or container."""
    batch = max(1, min(recipe.data.batch_size, summary["packed_samples"] // (2 * ranks * workers)))
    if batch < MIN_CONTRASTIVE_BATCH:
        print(f"[prepare] warning: {summary['packed_samples']} packed samples give a batch of {batch} for {ranks} "
              f"ranks x {workers} workers: a contrastive loss needs more; train on fewer ranks or workers "
              "(--ranks, --workers) or on more data", flush=True)
    ds_config = os.path.join(os.path.dirname(os.path.abspath(path)), "deepspeed.json")
    with atomic_path(ds_config) as tmp:
        shutil.copyfile(recipe_path("deepspeed_config"), tmp)
    per_step = batch * ranks
    steps = max(1, math.ceil(EPOCHS * summary["packed_samples"] / per_step))

    def recipe_share(recipe_steps: int) -> int:
        """A step count of the recipe, as the same share of this run's steps."""
        return round(steps * recipe_steps / recipe.optim.steps)

    tree = {
        "name": "prepared",
        "output_dir": os.path.join(os.path.dirname(os.path.abspath(path)), "run"),
        "deepspeed_config": ds_config,
        "model": {"student": student},
        "data": {"train_shards": os.path.join(os.path.abspath(packed), "*.tar"), "workers": workers,
                 "batch_size": batch, "shuffle_buffer": recipe.data.shuffle_buffer},
        "loss": {name: weight for name, weight in dataclasses.asdict(recipe.loss).items() if weight > 0},
        "cluster": {**dataclasses.asdict(recipe.cluster), "dir": os.path.abspath(clusters),
                    "sample_rate": 1.0 if summary["k"] <= FULL_CLASSIFIER_UP_TO else recipe.cluster.sample_rate,
                    "warmup_steps": recipe_share(recipe.cluster.warmup_steps)},
        "optim": {"lr": recipe.optim.lr, "weight_decay": recipe.optim.weight_decay, "steps": steps,
                  "warmup_steps": max(1, recipe_share(recipe.optim.warmup_steps))},
    }
    header = (f"# Written by data_tools.prepare: the CLIP-CID recipe ({os.path.relpath(RECIPE, REPO)}) on "
              f"{summary['packed_samples']} packed samples,\n# {EPOCHS} epochs at {per_step} samples a step "
              f"({ranks} ranks x batch {batch}). Every other key keeps its default "
              "(docs/configs.md).\n")
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(header + yaml.safe_dump(tree, sort_keys=False))


def recipe_path(key: str) -> str:
    """A path the recipe names, which the shipped YAMLs give relative to the repository (load_config would
    take it from the current directory)."""
    with open(RECIPE) as f:
        return os.path.join(REPO, yaml.safe_load(f)[key])


def print_summary(summary: dict) -> None:
    chosen = " (from the sample count: data_tools.cluster.default_k)" if summary["k_chosen"] else ""
    skipped = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in summary["skipped"].items())
    print(f"\n[prepare] balance kept {summary['kept_fraction']:.1%}: {summary['kept']} of {summary['samples_in']} "
          f"samples (semantic threshold {summary['semantic']:.4f})\n"
          f"[prepare] embedded {summary['samples_in']} samples; skipped {skipped}; "
          f"{summary['damaged_shards']} damaged shards\n"
          f"[prepare] clusters: k = {summary['k']}{chosen}\n"
          f"[prepare] packed {summary['packed_samples']} samples in {summary['packed_shards']} shards\n"
          f"[prepare] train with: NUM_GPUS={summary['ranks']} {os.path.join(REPO, 'launch', 'single_node.sh')} "
          f"{os.path.abspath(summary['train_yaml'])}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.prepare", description=__doc__.split("\n")[0],
                                     epilog="Each stage's own command has more options: python -m data_tools.<stage> -h")
    parser.add_argument("--shards", required=True, help="img2dataset/webdataset tars: brace pattern or glob")
    parser.add_argument("--teacher", required=True, action="append",
                        help="open_clip name, local-dir:PATH or ds_configs/models name; repeat for an ensemble")
    parser.add_argument("--pretrained", default=None, action="append",
                        help="open_clip pretrained tag or checkpoint file (one per --teacher, in order)")
    parser.add_argument("--student", required=True, help="the student's model spec: its tokenizer makes the token ids")
    parser.add_argument("--out", required=True, help="folder for every stage's output and train.yaml")
    parser.add_argument("--views", type=int, default=0, help="extract: augmented views stored per image")
    parser.add_argument("--k", type=int, default=None, help="clusters (default: from the sample count)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--target-keep-fraction", type=float, default=None,
                       help="balance: the fraction to keep (default: data_tools.balance's)")
    group.add_argument("--semantic", type=float, default=None, help="balance: a fixed cosine threshold instead")
    parser.add_argument("--perceptual", type=float, default=0.98, help="balance: near-identical above this cosine")
    parser.add_argument("--max-removed-fraction", type=float, default=DEFAULT_MAX_REMOVED_FRACTION,
                        help="balance: stop when it would remove more than this")
    parser.add_argument("--ranks", type=int, default=8, help="processes the shards will be trained on")
    parser.add_argument("--workers", type=int, default=8, help="loader workers per rank (data.workers)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="pack: samples per output shard (default: enough shards for ranks x workers)")
    parser.add_argument("--device", default="auto", help="extract on: auto (cuda when available), cpu, cuda:N")
    parser.add_argument("--batch-size", type=int, default=256, help="extract: images per teacher forward")
    parser.add_argument("--seed", type=int, default=0, help="k-means and the balance's tuning draw")
    parser.add_argument("--random-teacher-ok", action="store_true", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--max-damaged-fraction", type=float, default=DEFAULT_MAX_DAMAGED_FRACTION,
                        help="damaged source shards accepted, as a fraction of all")
    args = parser.parse_args(argv)
    shards = expand_shards(args.shards)
    if not shards:
        parser.error(f"--shards {args.shards!r} matches no file")
    device = args.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        check_writable(args.out)
        summary = prepare(shards, args.teacher, args.pretrained, args.student, args.out, Views(args.views), k=args.k,
                          semantic=args.semantic, target_keep_fraction=args.target_keep_fraction,
                          perceptual=args.perceptual, max_removed_fraction=args.max_removed_fraction,
                          ranks=args.ranks, workers=args.workers, samples_per_shard=args.samples_per_shard,
                          device=device, batch_size=args.batch_size, seed=args.seed,
                          random_teacher_ok=args.random_teacher_ok, max_damaged_fraction=args.max_damaged_fraction)
    except OtherRun as e:
        later = STAGES[STAGES.index(os.path.basename(e.out_dir)) + 1:] if os.path.basename(e.out_dir) in STAGES else ()
        sys.exit(f"prepare: {e}\n(prepare resumes every stage; to redo this one with the new flags, delete "
                 f"{' and '.join([e.out_dir, *(os.path.join(args.out, s) for s in later)])})")
    except TooMuchRemoved as e:
        sys.exit(f"prepare: {e}\n(under prepare, another --target-keep-fraction or --semantic needs "
                 f"{os.path.join(args.out, 'balance')} deleted first; --max-removed-fraction resumes it)")
    except (ValueError, FileNotFoundError) as e:  # a DataError (damaged shards, ...) is a ValueError
        sys.exit(f"prepare: {e}")
    print_summary(summary)


if __name__ == "__main__":
    main()
