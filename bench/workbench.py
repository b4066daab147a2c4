"""The workload the trainer benches share (bench/trainer_throughput.py, bench/fast_paths.py): distill-ready shards
made from the demo data by the real stages, the demo experiments' configs on them, and the pieces of one cid_ds
step on a real batch of them.

Without CUDA: the demo student and teacher (ds_configs/models/demo-*), fp32, batch 128, one loader worker. With
CUDA: a ViT-B/32 student and a ViT-L/14 teacher with random weights, bf16, batch 256 per GPU, 8 loader workers.
The teacher is saved as a local-dir: folder (random weights, seed 0), so that open_clip's --distill-model and the
feature cache use the same weights."""
from __future__ import annotations

import argparse
import copy
import math
import os
from typing import Callable, Optional

import torch

from bench.timing import on_gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not on_gpu():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from cid_ds.config import Config, expand_shards, load_config  # noqa: E402
from cid_ds.io import atomic_path, read_json, write_json  # noqa: E402
from cid_ds.models import DistillStudent, create_model, model_config, resolve_spec  # noqa: E402

SHARDS = 8
CLUSTERS = 64
EXPERIMENTS = {"plain": "ds_configs/experiments/demo_baseline.yaml", "instance": "ds_configs/experiments/demo_distill.yaml",
               "CID": "ds_configs/experiments/demo_cid.yaml"}


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the workload (and, with --steps and --batch, the size of the prepared data)."""
    gpu = on_gpu()
    parser.add_argument("--work", default=os.path.join("runs", "bench_vs_open_clip", "gpu" if gpu else "cpu"))
    parser.add_argument("--student", default="ViT-B-32" if gpu else "demo-student")
    parser.add_argument("--teacher", default="ViT-L-14" if gpu else "demo-teacher")
    parser.add_argument("--batch", type=int, default=256 if gpu else 128, help="per GPU / CPU process")
    parser.add_argument("--workers", type=int, default=8 if gpu else 1, help="loader workers (DALI threads)")
    parser.add_argument("--steps", type=int, default=100 if gpu else 60)


def save_random_model(spec: str, folder: str) -> str:
    """An open_clip local-dir: folder with ``spec``'s config and a random initialisation (seed 0), made once."""
    weights = os.path.join(folder, "open_clip_model.safetensors")
    if not os.path.isfile(weights):
        import open_clip
        from safetensors.torch import save_file
        resolved = resolve_spec(spec)
        local = os.path.join(resolved[len("local-dir:"):], "open_clip_config.json")
        preprocess = read_json(local).get("preprocess_cfg", {}) if resolved.startswith("local-dir:") else {}
        write_json(os.path.join(folder, "open_clip_config.json"),
                   {"model_cfg": model_config(spec), "preprocess_cfg": preprocess})
        torch.manual_seed(0)
        state = open_clip.create_model(resolved).state_dict()
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    return folder


def samples_for(args: argparse.Namespace) -> int:
    """Training samples to prepare: one epoch covers every run of --steps at --batch, in whole shards."""
    return math.ceil(args.steps * args.batch * 1.05 / SHARDS) * SHARDS


def prepare(args: argparse.Namespace) -> dict[str, str]:
    """Demo shards -> teacher folder -> feature cache -> k-means -> distill-ready shards under --work; each stage
    skips what is done."""
    from data_tools.cluster import ClusterOptions, cluster
    from data_tools.extract import ExtractOptions, extract
    from data_tools.make_demo_data import generate
    from data_tools.pack import PackOptions, pack
    samples = samples_for(args)
    root = os.path.join(args.work, f"{args.teacher}-{samples}".replace("/", "_"))
    data, feats, clusters = (os.path.join(root, d) for d in ("data", "feats", "clusters"))
    packed = os.path.join(root, f"packed-{args.student}".replace("/", "_"))  # the tokens are the student's
    generate(data, train_samples=samples, shards=SHARDS, seed=0, eval_scale=0.1, progress=False)
    teacher_dir = save_random_model(args.teacher, os.path.join(root, "teacher"))
    shards = expand_shards(os.path.join(data, "train", "*.tar"))
    extract(ExtractOptions(shards=shards, teacher=f"local-dir:{teacher_dir}", out=feats, workers=args.workers,
                           device="cuda" if on_gpu() else "cpu", backend="wds"))
    cluster(ClusterOptions(features=feats, k=CLUSTERS, out=clusters, seed=0))
    pack(PackOptions(shards=shards, features=feats, tokenizer=args.student, out=packed, clusters=clusters,
                     samples_per_shard=math.ceil(samples / SHARDS)), progress=False)
    return {"teacher": teacher_dir, "clusters": clusters, "packed": packed,
            "shards": os.path.join(packed, f"{{00000..{SHARDS - 1:05d}}}.tar")}


def load_experiment(name: str, args: argparse.Namespace, paths: dict) -> Config:
    return load_config(os.path.join(REPO, EXPERIMENTS[name]), [
        f"model.student={args.student}", f"data.train_shards={paths['packed']}/*.tar", f"data.batch_size={args.batch}",
        f"cluster.dir={paths['clusters']}", "eval.sets=[]"])


class Workbench:
    """The student, a real batch of the packed shards and the pieces of one cid_ds step, on the bench's device
    and dtype (fp32 on CPU; on GPU bf16 weights, where the trainer computes in bf16 under autocast)."""

    def __init__(self, args: argparse.Namespace, paths: dict):
        from cid_ds.data.batch import LoaderSpec
        from cid_ds.data.packed import PackedShards, packed_manifest_path
        from cid_ds.data.wds_loader import build_train_loader
        self.args, self.paths = args, paths
        self.device = torch.device("cuda" if on_gpu() else "cpu")
        self.dtype = torch.bfloat16 if on_gpu() else torch.float32
        self.cfg = {name: load_experiment(name, args, paths) for name in EXPERIMENTS}
        self.shards = expand_shards(f"{paths['packed']}/*.tar")
        self.teacher_dim = PackedShards(packed_manifest_path(self.shards)).embed_dim
        _, self.preprocess, _, self.tokenizer = create_model(args.student)
        batch = next(iter(build_train_loader(LoaderSpec(self.shards, self.preprocess, self.tokenizer,
                                                        batch_size=args.batch))))
        self.batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        self.batch["image"] = self.batch["image"].to(self.dtype)

    def student(self, clip: Optional[torch.nn.Module] = None, dtype: Optional[torch.dtype] = None) -> DistillStudent:
        torch.manual_seed(0)
        clip = clip if clip is not None else create_model(self.args.student)[0]
        return DistillStudent(clip, self.teacher_dim).to(self.device, dtype or self.dtype)

    def losses(self, model, experiment: str = "instance", cluster_term=None, image: Optional[torch.Tensor] = None
               ) -> torch.Tensor:
        """The experiment's weighted loss of ``model`` (a student or its engine) on the batch."""
        from cid_ds.objective import compute_losses, loss_weights
        cfg = self.cfg[experiment]
        weights = loss_weights(cfg)
        out = model(self.batch["image"] if image is None else image, self.batch["tokens"])
        losses, _ = compute_losses(cfg, out, self.batch, cluster_term, 0)
        return sum(weights[k] * v for k, v in losses.items())

    def step(self, student: torch.nn.Module, experiment: str = "instance", cluster_term=None,
             image: Optional[torch.Tensor] = None) -> Callable[[], None]:
        """Forward, the experiment's losses, backward: the cid_ds step without the engine."""
        def run() -> None:
            student.zero_grad(set_to_none=True)
            self.losses(student, experiment, cluster_term, image).backward()
        return run

    def engine(self, adamw: str = "fused", deepspeed_json: Optional[str] = None, host_light_step: bool = True):
        """The DeepSpeed engine the trainer builds (cid_ds.engine.build_engine, 1 rank) for the instance
        experiment, with ``perf.adamw``, ``perf.host_light_step`` and the YAML's JSON or ``deepspeed_json``."""
        from cid_ds.engine import build_engine
        cfg = copy.deepcopy(self.cfg["instance"])
        cfg.perf.adamw, cfg.perf.host_light_step = adamw, host_light_step
        cfg.deepspeed_config = os.path.join(REPO, deepspeed_json) if deepspeed_json else cfg.deepspeed_config
        # an fp32 student: the engine applies the JSON's precision, as in the trainer
        engine, _ = build_engine(self.student(dtype=torch.float32), cfg, on_gpu())
        return engine

    def cluster_term(self):
        from cid_ds.engine import cosine_with_warmup
        from cid_ds.losses.cluster import cluster_term
        return cluster_term(self.cfg["CID"], cosine_with_warmup(1, 2), self.device)
