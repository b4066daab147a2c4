"""Your own data, ready to train: extract -> cluster -> balance -> pack in one resumable command.

  python -m data_tools.prepare --shards '/data/{00000..00041}.tar' --teacher ViT-L-14 \\
      --pretrained laion400m_e32 --student ViT-B-16 --out /data/prepared \\
      [--k K] [--target-keep-fraction F | --semantic T] [--max-removed-fraction 0.6] \\
      [--nodes 4 --gpus-per-node 8 | --ranks 32] [--workers 8] [--device auto] [--seed 0]

Each stage writes what it writes when run alone (the same artifacts and manifests), into OUT/<stage>:
OUT/feats (data_tools.extract), OUT/clusters (data_tools.cluster), OUT/balance (data_tools.balance) and
OUT/packed (data_tools.pack). Every stage resumes, so a re-run after an interruption, or with a flag
that accepts what a stage refused, goes on where it stopped. The defaults fit any teacher and data size:
k from the sample count (data_tools.cluster.default_k), a balance threshold tuned to keep CLIP-CID's
fraction and refused when it would remove more than --max-removed-fraction, and shards enough for
ranks x --workers loader readers. At the end: a summary, and OUT/train.yaml, the CLIP-CID recipe
(ds_configs/experiments/clip_cid.yaml) pointed at the prepared data, with its DeepSpeed JSON copied to
OUT/deepspeed.json (the folder trains from any checkout or container that sees it), and the command that
trains it on the job's shape:

  NUM_GPUS=8 launch/single_node.sh /data/prepared/train.yaml                       # one machine
  sbatch --nodes=4 --gpus-per-node=8 launch/slurm.sbatch /data/prepared/train.yaml  # SLURM

The shape is --nodes x --gpus-per-node (default 1 x 8), or --ranks, every rank of the job (alone: one
machine). The recipe's epochs are counted over all of them: the global batch is the batch x every rank.
On a cluster without GPUs (--train-on cpu, the default when prepare itself runs on the CPU) the ranks are
CPU processes and the SLURM command gives their count per node in CID_RANKS_PER_NODE.

Every stage spreads over processes (data_tools.spread). On one machine, --processes N (default: one per GPU,
one on the CPU) starts N copies of this command, each doing its share of every stage on its own GPU (extract
decodes with DALI where it serves, else PIL in a worker per CPU); under a launcher or srun, its processes do
the same across nodes, e.g. ``srun --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 python -m
data_tools.prepare ...``. Process 0 fits the k-means and prints the summary; the others wait only where a
stage needs what another completed.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import yaml

from cid_ds.config import Config, expand_shards, load_config
from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION
from cid_ds.io import atomic_path, check_writable, read_json
from data_tools.balance import DEFAULT_KEEP_FRACTION, DEFAULT_MAX_REMOVED_FRACTION, REPORT, TooMuchRemoved, balance
from data_tools.balance import check_arguments as check_balance_arguments
from data_tools.cluster import DEFAULT_FIT_MEMORY_GB, cluster
from data_tools.extract import Views, auto_backend, extract
from data_tools.outputs import OtherRun
from data_tools.pack import DEFAULT_RANKS, pack
from data_tools.plan import peak_rss, plan
from data_tools.spread import (Share, accept_local_rank, complete_manifest, cpus_per_process, run_local,
                               share_from_env)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "ds_configs", "experiments", "clip_cid.yaml")
STAGES = ("feats", "clusters", "balance", "packed")
EPOCHS = 32  # CLIP-KD's recipe (ViT-L/14 -> ViT-B/16 on CC3M+CC12M: 32 epochs, REFERENCES.md)
FULL_CLASSIFIER_UP_TO = 100_000  # clusters whose classifier is computed whole; above, MLCD's sampled 0.1
MIN_CONTRASTIVE_BATCH = 8  # below this a batch holds too few negatives for the contrastive terms to mean much


@dataclasses.dataclass(frozen=True)
class Shape:
    """The job the prepared data trains on: ``nodes`` machines of ``per_node`` ranks each, GPUs or (``gpus``
    False) CPU processes."""
    nodes: int = 1
    per_node: int = DEFAULT_RANKS
    gpus: bool = True

    @property
    def ranks(self) -> int:
        return self.nodes * self.per_node


def job_shape(nodes: Optional[int], per_node: Optional[int], ranks: Optional[int], gpus: bool) -> Shape:
    """The shape the flags give: ``--nodes`` x ``--gpus-per-node`` (default 1 x ``DEFAULT_RANKS``), or
    ``--ranks``, every rank of the job: alone one machine of them, with either of the others split by it."""
    for flag, value in (("--nodes", nodes), ("--gpus-per-node", per_node), ("--ranks", ranks)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if ranks is None:
        return Shape(nodes or 1, per_node or DEFAULT_RANKS, gpus)
    given = " and ".join(f"{flag} {value}" for flag, value in (("--nodes", nodes), ("--gpus-per-node", per_node))
                         if value is not None)
    nodes = nodes or (1 if per_node is None else max(1, ranks // per_node))
    shape = Shape(nodes, per_node or max(1, ranks // nodes), gpus)
    if shape.ranks != ranks:
        raise ValueError(f"--ranks {ranks} (every rank of the job) does not agree with {given}: --ranks must be "
                         "--nodes x --gpus-per-node; give one form or the other")
    return shape


def prepare(shards: list[str], teacher: str | Sequence[str], pretrained: Optional[str] | Sequence[Optional[str]],
            student: str, out_dir: str, views: Views = Views(), k: Optional[int] = None, semantic: Optional[float] = None,
            target_keep_fraction: Optional[float] = None, perceptual: float = 0.98,
            max_removed_fraction: float = DEFAULT_MAX_REMOVED_FRACTION, shape: Shape = Shape(), workers: int = 8,
            samples_per_shard: Optional[int] = None, device: str = "cpu", batch_size: int = 256,
            seed: int = 0, random_teacher_ok: bool = False,
            max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION, fit: Optional[dict] = None,
            share: Share = Share(), timing: Optional[dict] = None) -> Optional[dict]:
    """Run (or finish) every stage into ``out_dir``; write OUT/train.yaml; return the summary. ``teacher``,
    ``pretrained`` and ``views`` as data_tools.extract takes them (a list each: an ensemble); ``shape``: the
    job that will train on it; ``fit``: data_tools.cluster's fit options (parts, max_points_per_centroid,
    fit_memory_gb). Flags a later stage would refuse are refused before the first starts.

    Spread over processes (data_tools.spread), each does its share of every stage, on ``device`` (its own GPU),
    and starts a stage once a process has completed the one before; process 0 waits for the last and writes
    train.yaml and the summary, the others return None. ``timing``, when given, gets extract's samples/s and
    this process's peak memory after it, and pack's seconds (data_tools.plan measures with them)."""
    check_balance_arguments(perceptual, semantic, DEFAULT_KEEP_FRACTION if semantic is None and target_keep_fraction
                            is None else target_keep_fraction, max_removed_fraction)
    for name, value in (("nodes", shape.nodes), ("gpus_per_node", shape.per_node), ("workers", workers),
                        ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    recipe = load_config(RECIPE, check_paths=False)
    feats, clusters, balanced, packed = (os.path.join(out_dir, stage) for stage in STAGES)
    _stage(1, "extract", feats, share)
    backend, decoders = extract_backend(device, teacher, views)
    extracted = extract(shards, teacher, pretrained, feats, batch_size=batch_size, workers=decoders, device=device,
                        rank=share.rank, world_size=share.world, backend=backend, views=views,
                        random_teacher_ok=random_teacher_ok, max_damaged_fraction=max_damaged_fraction)
    cache = extracted["manifest"] or complete_manifest(feats, share, "extract")
    timing = {} if timing is None else timing
    timing["extract"] = {"samples_per_s": extracted["samples_per_s"], "peak_rss": peak_rss()}
    _stage(2, "cluster", clusters, share)
    clustering = cluster(feats, k, clusters, topk=recipe.cluster.positives, seed=seed, share=share, **(fit or {})) \
        or complete_manifest(clusters, share, "cluster")
    _stage(3, "balance", balanced, share)
    report = balance(feats, clusters, balanced, perceptual=perceptual, semantic=semantic,
                     target_keep_fraction=target_keep_fraction, max_removed_fraction=max_removed_fraction, seed=seed,
                     share=share)
    if report is None:
        complete_manifest(balanced, share, "balance")
        report = read_json(os.path.join(balanced, REPORT))
    _stage(4, "pack", packed, share)
    start = time.time()
    packing = pack(shards, feats, student, packed, clusters_dir=clusters, balance_dir=balanced,
                   samples_per_shard=samples_per_shard, ranks=shape.ranks, workers=workers,
                   max_damaged_fraction=max_damaged_fraction, share=share)
    timing["pack"] = {"seconds": time.time() - start}
    if packing is None:
        if share.rank > 0:
            return None
        packing = complete_manifest(packed, share, "pack")
    summary = {
        "samples_in": cache["totals"]["samples"],
        "skipped": {name: cache["totals"][name] for name in ("corrupt_image", "missing_caption")},
        "damaged_shards": cache["totals"]["damaged_shards"],
        "k": clustering["k"], "k_chosen": k is None,
        "kept": report["kept"], "kept_fraction": report["kept_fraction"], "semantic": report["semantic"],
        "packed_samples": packing["totals"]["samples"], "packed_shards": len(packing["shards"]),
        "train_yaml": os.path.join(out_dir, "train.yaml"), "shape": shape,
    }
    write_train_yaml(summary["train_yaml"], recipe, packed, clusters, student, summary, shape, workers)
    return summary


def _stage(number: int, name: str, out: str, share: Share) -> None:
    by = f" ({share})" if share.world > 1 else ""
    print(f"\n[prepare {number}/{len(STAGES)}] {name} -> {out}{by}", flush=True)


def extract_backend(device: str, teacher: str | Sequence[str], views: Views) -> tuple[str, int]:
    """data_tools.extract's decoding and its decoders: on a GPU, DALI (nvJPEG) where it serves (one teacher,
    no views) with a thread per CPU of this process, else PIL in a worker per CPU; on the CPU, where the
    teacher's forward is the bottleneck, PIL in two workers and the other cores to the model."""
    cpus = cpus_per_process()
    if device.startswith("cuda"):
        return auto_backend(device, 1 if isinstance(teacher, str) else len(teacher), views.count), cpus
    return "wds", max(1, min(2, cpus - 1))


def write_train_yaml(path: str, recipe: Config, packed: str, clusters: str, student: str, summary: dict,
                     shape: Shape, workers: int) -> None:
    """The CLIP-CID recipe pointed at the prepared data, sized for it and ``shape``: a batch that every loader
    reader (every rank x ``workers``, each reading its own shards) fills at least twice an epoch, ``EPOCHS``
    epochs of the global batch (batch x every rank), the recipe's share of warm-ups, the whole classifier below
    ``FULL_CLASSIFIER_UP_TO`` clusters; its loss weights, every other cluster key and its logging and
    checkpoint intervals as the recipe has them. The recipe's
    DeepSpeed JSON is copied beside it, so that the folder trains from any checkout or container."""
    ranks = shape.ranks
    batch = max(1, min(recipe.data.batch_size, summary["packed_samples"] // (2 * ranks * workers)))
    if batch < MIN_CONTRASTIVE_BATCH:
        print(f"[prepare] warning: {summary['packed_samples']} packed samples give a batch of {batch} for {ranks} "
              f"ranks x {workers} workers: a contrastive loss needs more; train on fewer ranks or workers "
              "(--nodes, --gpus-per-node or --ranks, --workers) or on more data", flush=True)
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
        "logging": {"every": recipe.logging.every},
        "checkpoint": {"every": recipe.checkpoint.every, "keep": recipe.checkpoint.keep},
    }
    header = (f"# Written by data_tools.prepare: the CLIP-CID recipe ({os.path.relpath(RECIPE, REPO)}) on "
              f"{summary['packed_samples']} packed samples,\n# {EPOCHS} epochs at {per_step} samples a step "
              f"({shape.nodes} nodes x {shape.per_node} ranks x batch {batch}). Every other key keeps its "
              "default (docs/configs.md).\n")
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
          f"[prepare] packed {summary['packed_samples']} samples in {summary['packed_shards']} shards")
    for line in next_commands(summary["shape"], summary["train_yaml"]):
        print(f"[prepare] {line}")


def next_commands(shape: Shape, train_yaml: str) -> list[str]:
    """How to train ``train_yaml`` on ``shape``: on one machine when it is one, and under SLURM (where ranks
    that are not GPUs are counted by CID_RANKS_PER_NODE, launch/slurm.sbatch)."""
    config, script = os.path.abspath(train_yaml), os.path.join(REPO, "launch", "slurm.sbatch")
    slurm = (f"sbatch --nodes={shape.nodes} --gpus-per-node={shape.per_node} {script} {config}" if shape.gpus
             else f"CID_RANKS_PER_NODE={shape.per_node} sbatch --nodes={shape.nodes} {script} {config}")
    if shape.nodes > 1:
        return [f"train with: {slurm}",
                f"or without SLURM: {os.path.join(REPO, 'launch', 'multi_node.sh')} HOSTFILE {config}  "
                f"(HOSTFILE: one 'HOST slots={shape.per_node}' line per machine)"]
    return [f"train with: NUM_GPUS={shape.per_node} {os.path.join(REPO, 'launch', 'single_node.sh')} {config}",
            f"or under SLURM: {slurm}"]


def _plan(args: argparse.Namespace, shards: list[str]) -> None:
    """``--plan``: the stages on a cut of the data, one process, this machine's device; the estimate for the
    job's shape (--nodes x --gpus-per-node processes)."""
    import torch
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device

    def run_stages(cut: list[str], out: str, timing: dict) -> dict:
        return prepare(cut, args.teacher, args.pretrained, args.student, out, Views(args.views),
                       semantic=args.semantic, target_keep_fraction=args.target_keep_fraction,
                       perceptual=args.perceptual, max_removed_fraction=args.max_removed_fraction, device=device,
                       batch_size=args.batch_size, seed=args.seed, random_teacher_ok=args.random_teacher_ok,
                       max_damaged_fraction=1.0, shape=Shape(1, 1, device != "cpu"), workers=1, timing=timing)

    try:
        shape = job_shape(args.nodes, args.gpus_per_node, args.ranks, (args.train_on or device) != "cpu")
        check_writable(args.out)
        plan(run_stages, shards, args.out, args.k, shape.ranks, args.fit_memory_gb, args.plan_samples)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"prepare --plan: {e}")


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
    parser.add_argument("--parts", type=int, default=None,
                        help="cluster: hierarchical fit in P parts (default: 1, or the fewest within --fit-memory-gb)")
    parser.add_argument("--max-points-per-centroid", type=int, default=256,
                        help="cluster: the fit draws k times this many rows")
    parser.add_argument("--fit-memory-gb", type=float, default=DEFAULT_FIT_MEMORY_GB,
                        help="cluster: host memory the fit may hold; over it the fit is refused, naming the --parts "
                             "that fits")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--target-keep-fraction", type=float, default=None,
                       help="balance: the fraction to keep (default: data_tools.balance's)")
    group.add_argument("--semantic", type=float, default=None, help="balance: a fixed cosine threshold instead")
    parser.add_argument("--perceptual", type=float, default=0.98, help="balance: near-identical above this cosine")
    parser.add_argument("--max-removed-fraction", type=float, default=DEFAULT_MAX_REMOVED_FRACTION,
                        help="balance: stop when it would remove more than this")
    parser.add_argument("--nodes", type=int, default=None, help="machines the job will train on (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help=f"ranks on each machine: GPUs, or CPU processes with --train-on cpu "
                             f"(default {DEFAULT_RANKS})")
    parser.add_argument("--ranks", type=int, default=None,
                        help="every rank of the job (nodes x GPUs per node), instead of those two; alone: one machine")
    parser.add_argument("--train-on", choices=("gpu", "cpu"), default=None,
                        help="what the ranks are (default: what --device resolves to): the printed SLURM command asks "
                             "for --gpus-per-node, or, for cpu, sets CID_RANKS_PER_NODE")
    parser.add_argument("--workers", type=int, default=8, help="loader workers per rank (data.workers)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="pack: samples per output shard (default: enough shards for ranks x workers)")
    parser.add_argument("--device", default="auto", help="extract on: auto (cuda when available), cpu, cuda:N")
    parser.add_argument("--batch-size", type=int, default=256, help="extract: images per teacher forward")
    parser.add_argument("--seed", type=int, default=0, help="k-means and the balance's tuning draw")
    parser.add_argument("--plan", action="store_true",
                        help="only print what each stage will cost (hours, disk, memory) for this job's shape, "
                             "measured on a cut of the data, and write OUT/plan.json (data_tools.plan)")
    parser.add_argument("--plan-samples", type=int, default=None,
                        help="--plan for this many samples (default: counted from the shards): measure on a few "
                             "shards, plan for the whole dataset")
    parser.add_argument("--processes", type=int, default=None,
                        help="processes on this machine, each doing its share of every stage (default: one per GPU, "
                             "one on the CPU); under a launcher or srun, their RANK/WORLD_SIZE instead")
    accept_local_rank(parser)
    parser.add_argument("--random-teacher-ok", action="store_true", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--max-damaged-fraction", type=float, default=DEFAULT_MAX_DAMAGED_FRACTION,
                        help="damaged source shards accepted, as a fraction of all")
    args = parser.parse_args(argv)
    shards = expand_shards(args.shards)
    if not shards:
        parser.error(f"--shards {args.shards!r} matches no file")
    import torch
    try:
        share = share_from_env()
    except ValueError as e:
        sys.exit(f"prepare: {e}")
    if args.plan:
        _plan(args, shards)
        return
    processes = args.processes or (torch.cuda.device_count() if args.device in ("auto", "cuda") else 1) or 1
    if share.world == 1 and processes > 1:  # this machine's processes, each one this command under RANK/WORLD_SIZE
        try:
            run_local([sys.executable, "-m", "data_tools.prepare", *(sys.argv[1:] if argv is None else argv)],
                      processes)
        except (ValueError, RuntimeError) as e:
            sys.exit(f"prepare: {e}")
        return
    device = args.device
    if device in ("auto", "cuda"):
        # modulo the GPUs it sees: under srun --gpus-per-task=1 each process sees its own GPU as cuda:0
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    try:
        shape = job_shape(args.nodes, args.gpus_per_node, args.ranks, (args.train_on or device) != "cpu")
        check_writable(args.out)
        summary = prepare(shards, args.teacher, args.pretrained, args.student, args.out, Views(args.views), k=args.k,
                          semantic=args.semantic, target_keep_fraction=args.target_keep_fraction,
                          perceptual=args.perceptual, max_removed_fraction=args.max_removed_fraction,
                          shape=shape, workers=args.workers, samples_per_shard=args.samples_per_shard,
                          device=device, batch_size=args.batch_size, seed=args.seed,
                          random_teacher_ok=args.random_teacher_ok, max_damaged_fraction=args.max_damaged_fraction,
                          fit={"parts": args.parts, "max_points_per_centroid": args.max_points_per_centroid,
                               "fit_memory_gb": args.fit_memory_gb}, share=share)
    except OtherRun as e:
        later = STAGES[STAGES.index(os.path.basename(e.out_dir)) + 1:] if os.path.basename(e.out_dir) in STAGES else ()
        sys.exit(f"prepare: {e}\n(prepare resumes every stage; to redo this one with the new flags, delete "
                 f"{' and '.join([e.out_dir, *(os.path.join(args.out, s) for s in later)])})")
    except TooMuchRemoved as e:
        sys.exit(f"prepare: {e}\n(under prepare, another --target-keep-fraction or --semantic needs "
                 f"{os.path.join(args.out, 'balance')} deleted first; --max-removed-fraction resumes it)")
    except (ValueError, FileNotFoundError) as e:  # a DataError (damaged shards, ...) is a ValueError
        sys.exit(f"prepare: {e}")
    if summary is None:
        print(f"prepare: {share} did its share of every stage; process 0 writes the summary")
        return
    print_summary(summary)


if __name__ == "__main__":
    main()
