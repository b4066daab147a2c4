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
the same across nodes, e.g. ``srun --nodes=4 --ntasks-per-node=8 --gpus-per-task=1 --kill-on-bad-exit=1 python
-m data_tools.prepare ...`` (``--kill-on-bad-exit=1``: a process that fails ends the others, which may be
waiting for its work). Process 0 draws the k-means sample, the processes fit a hierarchical fit's parts, and
process 0 prints the summary; the others wait only where a stage needs what another completed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import shutil
import sys
import time
from typing import Optional, Sequence

import yaml

from cid_ds.config import Config, load_config
from cid_ds.io import atomic_path, check_writable, read_json
from data_tools.balance import REPORT, BalanceOptions, TooMuchRemoved, balance
from data_tools.cluster import ClusterOptions, cluster
from data_tools.extract import ExtractOptions, auto_backend, extract
from data_tools.options import borrowed, flag, parse_options, refusals
from data_tools.outputs import OtherRun
from data_tools.pack import DEFAULT_RANKS, PackOptions, pack
from data_tools.plan import peak_rss, plan
from data_tools.spread import (Share, complete_manifest, cpus_per_process, keep_own_gpu, process_device,
                               run_local, share_from_env)

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
    for name, value in (("--nodes", nodes), ("--gpus-per-node", per_node), ("--ranks", ranks)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if ranks is None:
        return Shape(nodes or 1, per_node or DEFAULT_RANKS, gpus)
    given = " and ".join(f"{name} {value}" for name, value in (("--nodes", nodes), ("--gpus-per-node", per_node))
                         if value is not None)
    nodes = nodes or (1 if per_node is None else max(1, ranks // per_node))
    shape = Shape(nodes, per_node or max(1, ranks // nodes), gpus)
    if shape.ranks != ranks:
        raise ValueError(f"--ranks {ranks} (every rank of the job) does not agree with {given}: --ranks must be "
                         "--nodes x --gpus-per-node; give one form or the other")
    return shape


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrepareOptions:
    """What data_tools.prepare is asked: its own flags and, borrowed with prepare's help, the stages' flags it passes
    on, whose defaults and parsing are the stages' own (``stages`` makes each stage's options of them)."""
    shards: list[str] = borrowed(ExtractOptions, "shards", "img2dataset/webdataset tars: brace pattern or glob")
    teacher: str | Sequence[str] = borrowed(ExtractOptions, "teacher")
    pretrained: Optional[str] | Sequence[Optional[str]] = borrowed(ExtractOptions, "pretrained")
    student: str = borrowed(PackOptions, "tokenizer")
    out: str = flag(help="folder for every stage's output and train.yaml")
    views: int = borrowed(ExtractOptions, "views", "extract: augmented views stored per image")
    k: Optional[int] = borrowed(ClusterOptions, "k", "clusters (default: from the sample count)")
    parts: Optional[int] = borrowed(ClusterOptions, "parts", "cluster: hierarchical fit in P parts (default: 1, or "
                                                             "the fewest within --fit-memory-gb)")
    max_points_per_centroid: int = borrowed(ClusterOptions, "max_points_per_centroid",
                                            "cluster: the fit draws k times this many rows")
    fit_memory_gb: float = borrowed(ClusterOptions, "fit_memory_gb", "cluster: host memory the fit may hold; over "
                                                                     "it the fit is refused, naming the --parts that "
                                                                     "fits")
    target_keep_fraction: Optional[float] = borrowed(BalanceOptions, "target_keep_fraction",
                                                     "balance: the fraction to keep (default: data_tools.balance's)")
    semantic: Optional[float] = borrowed(BalanceOptions, "semantic", "balance: a fixed cosine threshold instead")
    perceptual: float = borrowed(BalanceOptions, "perceptual", "balance: near-identical above this cosine")
    max_removed_fraction: float = borrowed(BalanceOptions, "max_removed_fraction",
                                           "balance: stop when it would remove more than this")
    nodes: Optional[int] = flag(None, "machines the job will train on (default 1)", type=int)
    gpus_per_node: Optional[int] = flag(None, "ranks on each machine: GPUs, or CPU processes with --train-on cpu "
                                              f"(default {DEFAULT_RANKS})", type=int)
    ranks: Optional[int] = flag(None, "every rank of the job (nodes x GPUs per node), instead of those two; alone: "
                                      "one machine", type=int)
    train_on: Optional[str] = flag(None, "what the ranks are (default: what --device resolves to): the printed SLURM "
                                         "command asks for --gpus-per-node, or, for cpu, sets CID_RANKS_PER_NODE",
                                   choices=("gpu", "cpu"))
    workers: int = flag(8, "loader workers per rank (data.workers)")
    samples_per_shard: Optional[int] = borrowed(PackOptions, "samples_per_shard", "pack: samples per output shard "
                                                "(default: enough shards for ranks x workers)")
    device: str = borrowed(ExtractOptions, "device", "extract on: auto (cuda when available), cpu, cuda:N")
    batch_size: int = borrowed(ExtractOptions, "batch_size", "extract: images per teacher forward")
    seed: int = borrowed(ClusterOptions, "seed", "k-means and the balance's tuning draw")
    plan: bool = flag(False, "only print what each stage will cost (hours, disk, memory) for this job's shape, "
                             "measured on a cut of the data, and write OUT/plan.json (data_tools.plan)")
    plan_samples: Optional[int] = flag(None, "--plan for this many samples (default: counted from the shards): "
                                             "measure on a few shards, plan for the whole dataset", type=int)
    processes: Optional[int] = flag(None, "processes on this machine, each doing its share of every stage (default: "
                                          "one per GPU, one on the CPU); under a launcher or srun, their "
                                          "RANK/WORLD_SIZE instead", type=int)
    random_teacher_ok: bool = borrowed(ExtractOptions, "random_teacher_ok", argparse.SUPPRESS)  # tests
    max_damaged_fraction: float = borrowed(ExtractOptions, "max_damaged_fraction",
                                           "damaged source shards accepted, as a fraction of all")

    def shape(self, device: str) -> Shape:
        """The job that will train on the data; its ranks are GPUs unless --train-on or ``device`` says cpu."""
        return job_shape(self.nodes, self.gpus_per_node, self.ranks, (self.train_on or device) != "cpu")

    def check(self) -> None:
        for name, value in (("--workers", self.workers), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def stages(self, device: str, shape: Shape, positives: int
               ) -> tuple[ExtractOptions, ClusterOptions, BalanceOptions, PackOptions]:
        """Each stage's options: these flags, its folder in OUT, extract's decoding on ``device``, the shards sized
        for ``shape`` and ``positives`` nearest centroids stored (the recipe's cluster.positives)."""
        feats, clusters, balanced, packed = (os.path.join(self.out, stage) for stage in STAGES)
        backend, decoders = extract_backend(device, self.teacher, self.views)
        return (ExtractOptions(shards=self.shards, teacher=self.teacher, pretrained=self.pretrained, out=feats,
                               batch_size=self.batch_size, workers=decoders, device=device, backend=backend,
                               views=self.views, random_teacher_ok=self.random_teacher_ok,
                               max_damaged_fraction=self.max_damaged_fraction),
                ClusterOptions(features=feats, k=self.k, out=clusters, topk=positives,
                               max_points_per_centroid=self.max_points_per_centroid, seed=self.seed,
                               parts=self.parts, fit_memory_gb=self.fit_memory_gb),
                BalanceOptions(features=feats, clusters=clusters, out=balanced, perceptual=self.perceptual,
                               target_keep_fraction=self.target_keep_fraction, semantic=self.semantic,
                               max_removed_fraction=self.max_removed_fraction, seed=self.seed),
                PackOptions(shards=self.shards, features=feats, tokenizer=self.student, out=packed, clusters=clusters,
                            balance=balanced, ranks=shape.ranks, workers=self.workers,
                            samples_per_shard=self.samples_per_shard, max_damaged_fraction=self.max_damaged_fraction))


def prepare(options: PrepareOptions, share: Share = Share(), timing: Optional[dict] = None) -> Optional[dict]:
    """Run (or finish) every stage into OUT; write OUT/train.yaml; return the summary. Flags a later stage would
    refuse are refused before the first starts.

    Spread over processes (data_tools.spread), each does its share of every stage, on its own GPU (``device`` auto:
    ``data_tools.spread.process_device``), and starts a stage once a process has completed the one before; process
    0 waits for the last and writes train.yaml and the summary, the others return None. ``timing``, when given,
    gets extract's samples/s and this process's peak memory after it, and pack's seconds (data_tools.plan measures
    with them)."""
    recipe = load_config(RECIPE, check_paths=False)
    device = process_device(options.device)
    shape = options.shape(device)
    options.check()
    stages = options.stages(device, shape, recipe.cluster.positives)
    for stage in stages:
        stage.check()
    extracting, clustering, balancing, packing = stages
    check_writable(options.out)
    _stage(1, "extract", extracting.out, share)
    extracted = extract(extracting, share)
    cache = extracted["manifest"] or complete_manifest(extracting.out, share, "extract")
    timing = {} if timing is None else timing
    timing["extract"] = {"samples_per_s": extracted["samples_per_s"], "peak_rss": peak_rss()}
    _stage(2, "cluster", clustering.out, share)
    clusters = cluster(clustering, share) or complete_manifest(clustering.out, share, "cluster")
    _stage(3, "balance", balancing.out, share)
    report = balance(balancing, share)
    if report is None:
        complete_manifest(balancing.out, share, "balance")
        report = read_json(os.path.join(balancing.out, REPORT))
    _stage(4, "pack", packing.out, share)
    start = time.time()
    packed = pack(packing, share)
    timing["pack"] = {"seconds": time.time() - start}
    if packed is None:
        if share.rank > 0:
            return None
        packed = complete_manifest(packing.out, share, "pack")
    summary = {
        "samples_in": cache["totals"]["samples"],
        "skipped": {name: cache["totals"][name] for name in ("corrupt_image", "missing_caption")},
        "damaged_shards": cache["totals"]["damaged_shards"],
        "k": clusters["k"], "k_chosen": options.k is None,
        "kept": report["kept"], "kept_fraction": report["kept_fraction"], "semantic": report["semantic"],
        "packed_samples": packed["totals"]["samples"], "packed_shards": len(packed["shards"]),
        "train_yaml": os.path.join(options.out, "train.yaml"), "shape": shape,
    }
    write_train_yaml(summary["train_yaml"], recipe, packing.out, clustering.out, options.student, summary, shape,
                     options.workers)
    return summary


def _stage(number: int, name: str, out: str, share: Share) -> None:
    by = f" ({share})" if share.world > 1 else ""
    print(f"\n[prepare {number}/{len(STAGES)}] {name} -> {out}{by}", flush=True)


def extract_backend(device: str, teacher: str | Sequence[str], views: int) -> tuple[str, int]:
    """data_tools.extract's decoding and its decoders: on a GPU, DALI (nvJPEG) where it serves (one teacher,
    no views) with a thread per CPU of this process, else PIL in a worker per CPU; on the CPU, where the
    teacher's forward is the bottleneck, PIL in two workers and the other cores to the model."""
    cpus = cpus_per_process()
    if device.startswith("cuda"):
        return auto_backend(device, 1 if isinstance(teacher, str) else len(teacher), views), cpus
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


# --plan's cut is clustered and packed as these flags' defaults size it; the plan sizes the whole (--k,
# --fit-memory-gb)
SIZED_FOR_THE_WHOLE = ("k", "parts", "max_points_per_centroid", "fit_memory_gb", "samples_per_shard")


def _plan(options: PrepareOptions) -> None:
    """``--plan``: the stages on a cut of the data, one process, this machine's device; the estimate for the
    job's shape (--nodes x --gpus-per-node processes)."""
    device = process_device(options.device)
    defaults = {field.name: field.default for field in dataclasses.fields(PrepareOptions)}
    cut = dataclasses.replace(options, device=device, nodes=1, gpus_per_node=1, ranks=None, train_on=None, workers=1,
                              max_damaged_fraction=1.0, **{name: defaults[name] for name in SIZED_FOR_THE_WHOLE})

    def run_stages(shards: list[str], out: str, timing: dict) -> dict:
        return prepare(dataclasses.replace(cut, shards=shards, out=out), timing=timing)

    with refusals("prepare --plan"):
        shape = options.shape(device)
        check_writable(options.out)
        plan(run_stages, options.shards, options.out, options.k, shape.ranks, options.fit_memory_gb,
             options.plan_samples)


def _under_prepare(out_dir: str, error: Exception) -> str:
    """A stage's refusal, and how to change that stage's flags when prepare resumes it."""
    if isinstance(error, OtherRun):
        stage = os.path.basename(error.out_dir)
        later = STAGES[STAGES.index(stage) + 1:] if stage in STAGES else ()
        return (f"{error}\n(prepare resumes every stage; to redo this one with the new flags, delete "
                f"{' and '.join([error.out_dir, *(os.path.join(out_dir, s) for s in later)])})")
    if isinstance(error, TooMuchRemoved):
        return (f"{error}\n(under prepare, another --target-keep-fraction or --semantic needs "
                f"{os.path.join(out_dir, 'balance')} deleted first; --max-removed-fraction resumes it)")
    return str(error)  # a DataError (damaged shards, ...) is a ValueError


def main(argv: Optional[list[str]] = None) -> None:
    options = parse_options(PrepareOptions, "prepare", __doc__, argv,
                            epilog="Each stage's own command has more options: python -m data_tools.<stage> -h")
    keep_own_gpu()
    import torch
    with refusals("prepare"):
        share = share_from_env()
    if options.plan:
        _plan(options)
        return
    processes = options.processes or (torch.cuda.device_count() if options.device in ("auto", "cuda") else 1) or 1
    if share.world == 1 and processes > 1:  # this machine's processes, each one this command under RANK/WORLD_SIZE
        with refusals("prepare", also=(RuntimeError,)):
            run_local([sys.executable, "-m", "data_tools.prepare", *(sys.argv[1:] if argv is None else argv)],
                      processes)
        return
    with refusals("prepare", explain=functools.partial(_under_prepare, options.out)):
        summary = prepare(options, share)
    if summary is None:
        print(f"prepare: {share} did its share of every stage; process 0 writes the summary")
        return
    print_summary(summary)


if __name__ == "__main__":
    main()
