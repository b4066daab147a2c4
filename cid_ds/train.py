"""The training loop: ``deepspeed.initialize``, steps, logging, checkpoints, resume, export, eval.

Run it with the DeepSpeed launcher (``deepspeed --num_gpus N launch/train.py --config X.yaml``) or
as a single process (``python -m cid_ds.train --config X.yaml``). Overrides: ``key=value`` after the
options, e.g. ``optim.lr=1e-3 data.batch_size=64``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

import psutil
import torch
import yaml

from cid_ds.config import TEACHER_TERMS, Config, ConfigError, expand_shards, load_config
from cid_ds.data.damage import RunDamage, TooMuchDamage
from cid_ds.faults import (StopSignal, bf16_mode_of_files, checkpoint_about, exit_within, is_complete,
                           newest_complete_tag)
from cid_ds.io import OutputNotWritable, check_writable, read_json, write_json
from cid_ds.losses.ensemble import TeacherTargets, split_blocks, teacher_targets
from cid_ds.profiling import start_profiler

if TYPE_CHECKING:
    from cid_ds.data.clusters import ClusterAssignments
    from cid_ds.data.features import FeatureCache
    from cid_ds.data.packed import PackedShards
    from cid_ds.teacher import OnlineTeacher

EXIT_SECONDS = 60  # from the end of the run (or its error) to the process's exit, at most

DS_KEYS_OWNED_BY_YAML = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                         "gradient_clipping", "optimizer", "scheduler")


def deepspeed_config(cfg: Config, on_gpu: bool) -> dict:
    """The DeepSpeed JSON named by the YAML, with the batch and clipping the YAML owns filled in.

    The JSON says *how* to train (ZeRO stage, precision, communication); the YAML says *what* (batch,
    optimizer, schedule), so each fact lives in one file: a JSON that sets a YAML-owned key is an error.
    """
    path = cfg.deepspeed_config
    ds = read_json(path)
    for key in DS_KEYS_OWNED_BY_YAML:
        if key in ds:
            raise ConfigError(f"{path}: key '{key}' is set by the experiment YAML, remove it from the DeepSpeed JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.optim.grad_clip
    autocast = ds.get("torch_autocast", {})
    fp16 = ds.get("fp16", {}).get("enabled") or (autocast.get("enabled") and _names_fp16(autocast.get("dtype")))
    if cfg.loss.cluster > 0 and fp16 and on_gpu:
        raise ConfigError(f"{path}: fp16 loss scaling would also scale the centroid classifier's gradients, "
                          "which live outside the engine: use bf16 with the cluster term")
    if not on_gpu:  # bf16/fp16 matmuls on CPU are slower than fp32 and DeepSpeed's CPU path is fp32-tested
        for precision in ("bf16", "fp16", "torch_autocast"):
            ds.setdefault(precision, {})["enabled"] = False
    return ds


def _names_fp16(dtype: Optional[str]) -> bool:
    """Whether a JSON dtype string is fp16, by DeepSpeed's own parser (a string it cannot read is left to it)."""
    from deepspeed.runtime.config import DtypeEnum
    try:
        return DtypeEnum(dtype) is DtypeEnum.fp16
    except ValueError:
        return False


def compute_dtype(engine) -> torch.dtype:
    """What the student computes in: torch autocast's dtype (the weights stay fp32), or the dtype DeepSpeed
    cast the weights to (its bf16/fp16 modes). Inputs and an online teacher are sent in it."""
    if engine.torch_autocast_enabled():
        return engine.torch_autocast_dtype()
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32


def skip_allreduce_at_one_rank(engine) -> None:
    """Without ZeRO, DeepSpeed all-reduces the gradients after every backward even at one rank, where there is
    nothing to average: it copies each gradient into a flat buffer, reduces it with itself and copies it back
    (11 ms of the demo's 154 ms step on 2 CPU cores). ZeRO's own reduction also keeps its books, so it stays."""
    if engine.dp_world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings of rank < 2 and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


ADAMW_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """torch's AdamW over ``param_groups``, in the implementation ``perf.adamw`` names. torch's own default
    is the per-tensor for-loop on CPU; inside ZeRO the optimizer sees a few flat tensors, where only
    ``fused`` (one kernel instead of one op per Adam term) saves time."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                             eps=cfg.optim.eps, **ADAMW_IMPLEMENTATIONS[cfg.perf.adamw])


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def init_distributed(dist_backend: Optional[str] = None) -> None:
    """``deepspeed.init_distributed``, letting a plain ``python -m cid_ds.train`` run as a 1-rank job (the
    launcher sets these variables itself), and on CPU without leaving DeepSpeed's shared memory behind. The
    rendezvous listens on MASTER_ADDR only (cid_ds.rendezvous), not on every interface as torch's env:// does."""
    import deepspeed

    from cid_ds.rendezvous import bound_init_method
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend=dist_backend, init_method=bound_init_method())
    unlink_cpu_allreduce_buffer()


def unlink_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU all-reduce op, when all ranks share a machine, creates a 66 MB /dev/shm file per rank,
    maps every rank's, and never unlinks them: each run left them in RAM until reboot (one set per
    MASTER_PORT). Once every rank is past initialisation (the barrier), every file is mapped, so
    removing this rank's name changes nothing while the ranks run and frees the memory when they exit."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


class DataPosition:
    """Where this rank is in the data: epoch and batches consumed in it. Saved per rank beside each
    checkpoint so a resume continues the same batch sequence (the loader's order is a function of
    seed, epoch, rank and worker count)."""

    def __init__(self, epoch: int = 0, batch_in_epoch: int = 0):
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


def resolve_replay_views(cfg: Config, stored: int, source: Optional[str]) -> int:
    """How many stored views ``data.views: replay`` cycles through (0: not replaying)."""
    if cfg.data.views != "replay":
        return 0
    if stored == 0:
        raise ConfigError(f"data.views is replay, but {source or cfg.data.train_shards} stores no views: extract with "
                          "data_tools.extract --views K (and pack again), or use data.views random")
    if cfg.data.replay_views > stored:
        raise ConfigError(f"data.replay_views is {cfg.data.replay_views} but {source} stores {stored} views per sample")
    return cfg.data.replay_views or stored


def batches(cfg: Config, shards: list[str], preprocess, tokenizer, position: DataPosition,
            rank: int, world_size: int, teacher_tokenizer=None, clusters_dir: Optional[str] = None,
            replay_views: int = 0) -> Iterator[dict]:
    """Endless batches, epoch after epoch, starting at ``position``; updates ``position`` as it goes.
    ``clusters_dir``: cluster assignments to join by key (None: none, or the shards carry them).
    ``replay_views``: replay that many stored views (``resolve_replay_views``).
    ``cfg.data.backend`` picks the loader (cid_ds.data.dali_loader.resolve_backend)."""
    from cid_ds.data.dali_loader import resolve_backend
    backend = resolve_backend(cfg.data.backend, shards, joins=cfg.data.features is not None or clusters_dir is not None)
    while True:
        common = dict(batch_size=cfg.data.batch_size, epoch=position.epoch, seed=cfg.seed, rank=rank,
                      world_size=world_size, shuffle_buffer=cfg.data.shuffle_buffer,
                      skip_batches=position.batch_in_epoch, teacher_tokenizer=teacher_tokenizer,
                      replay_views=replay_views)
        if backend == "dali":
            from cid_ds.data.dali_loader import build_dali_loader
            loader = build_dali_loader(shards, preprocess, tokenizer, threads=cfg.data.workers, **common)
        else:
            from cid_ds.data.wds_loader import build_train_loader
            loader = build_train_loader(
                shards, preprocess, tokenizer, workers=cfg.data.workers, features_dir=cfg.data.features,
                missing_features=cfg.data.missing_features, clusters_dir=clusters_dir, **common)
        produced = False
        for batch in loader:
            produced = True
            position.batch_in_epoch += 1
            yield batch
        if not produced and position.batch_in_epoch == 0:
            raise RuntimeError(f"rank {rank}: an epoch of {cfg.data.train_shards} gave no full batch of "
                               f"{cfg.data.batch_size}; use fewer ranks/workers or a smaller batch")
        position.epoch, position.batch_in_epoch = position.epoch + 1, 0


def loss_weights(cfg: Config) -> dict[str, float]:
    """The terms to compute: every ``loss.*`` weight > 0."""
    return {name: weight for name, weight in dataclasses.asdict(cfg.loss).items() if weight > 0}


def compute_losses(cfg: Config, out: dict, batch: dict, cluster_term, step: int,
                   targets: Optional[TeacherTargets] = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every term with a weight > 0, and the metrics they report (batch accuracy, sampled fraction).
    ``targets`` says how ``batch``'s teacher rows are split per teacher (each teacher term is the weighted
    sum over the student's heads) and gives each teacher's logit scale (crd, gd); None: one teacher
    of the rows' width, without a logit scale."""
    from cid_ds.losses.clip import clip_loss
    weights = loss_weights(cfg)
    f = {k: v.float() for k, v in out.items()}
    scale = f["logit_scale"]
    losses, metrics = {}, {}
    if "clip" in weights:
        losses["clip"] = clip_loss(f["image"], f["text"], scale)
    if any(name in weights for name in TEACHER_TERMS):
        targets = targets or TeacherTargets.single(batch["t_img"].shape[-1])
        split = {name: split_blocks(tensor, targets.head_dims) for name, tensor in (
            ("t_img", targets.combine(batch["t_img"].float())), ("t_txt", targets.combine(batch["t_txt"].float())),
            ("s_img", f["image_in_teacher"]), ("s_txt", f["text_in_teacher"]),
            ("masked", f.get("masked_image_in_teacher", f["image_in_teacher"])))}
        for head, (weight, teacher_scale) in enumerate(targets.blocks):
            per_head = {name: blocks[head] for name, blocks in split.items()}
            for name, value in _teacher_terms(weights, f, per_head, teacher_scale, cfg.kd.crd_temperature).items():
                losses[name] = losses.get(name, 0) + weight * value
    if "afd" in weights:
        losses["afd"] = clip_loss(f["fused_image"], f["fused_text"], f["fusion_logit_scale"])
    if cluster_term is not None:
        targets = targets or TeacherTargets.single(f["image_in_teacher"].shape[-1])
        student, rows = targets.cluster_view(f["image_in_teacher"], batch.get("t_img"), cluster_term.teacher_index)
        result = cluster_term(student, batch | {"t_img": rows}, step)
        losses["cluster"] = result["loss"]
        metrics = {"cluster/accuracy": result["accuracy"], "cluster/sampled_fraction": result["sampled_fraction"]}
    return losses, metrics


def _teacher_terms(weights: dict[str, float], f: dict[str, torch.Tensor], x: dict[str, torch.Tensor],
                   teacher_scale: Optional[float], crd_temperature: float) -> dict[str, torch.Tensor]:
    """The weighted teacher terms against one teacher head: ``x`` holds its targets ``t_img``/``t_txt`` and
    the student's embeddings in its space ``s_img``/``s_txt``/``masked``."""
    from cid_ds.losses.instance import instance_loss
    from cid_ds.losses.kd import feature_distillation, gradient_distillation, relational_distillation
    terms = {}
    t_img, t_txt, s_img, s_txt = x["t_img"], x["t_txt"], x["s_img"], x["s_txt"]
    if "instance" in weights:
        terms["instance"] = instance_loss(s_img, s_txt, t_img, t_txt, f["logit_scale"])
    if "icl" in weights:
        terms["icl"] = instance_loss(s_img, s_txt, t_img, t_txt, f["cross_logit_scale"])
    if "fd" in weights:
        terms["fd"] = feature_distillation(s_img, t_img) + feature_distillation(s_txt, t_txt)
    if "mfd" in weights:
        terms["mfd"] = feature_distillation(x["masked"], t_img)
    if "crd" in weights:
        terms["crd"] = relational_distillation(f["image"], f["text"], f["logit_scale"], t_img, t_txt, teacher_scale,
                                               crd_temperature)
    if "gd" in weights:
        terms["gd"] = gradient_distillation(s_img, s_txt, f["logit_scale"], t_img, t_txt, teacher_scale)
    return terms


def all_finite(total: torch.Tensor) -> bool:
    """Whether the loss is finite on every rank (one all-reduce and one device sync per step)."""
    import torch.distributed as dist
    finite = torch.isfinite(total.detach()).float().reshape(1)
    dist.all_reduce(finite, dist.ReduceOp.MIN)
    return bool(finite.item())


def checkpoint_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def save_checkpoint(engine, cfg: Config, step: int, position: DataPosition, rank: int, cluster_term) -> None:
    """Every rank writes its files; once all have, rank 0 marks the checkpoint complete, points ``latest`` at it
    and only then deletes the stale ones. A failed write on any rank stops every rank, naming the path.
    A complete checkpoint of ``step`` is kept as it is: no update happened since (a stop after non-finite
    steps), and writing over it could lose the only good checkpoint to a full disk."""
    import torch.distributed as dist
    from cid_ds.checkpoint_io import complete_and_rotate, recorded, recording_write_failures, stop_if_any_rank_failed
    tag = f"step{step:08d}"
    root = checkpoint_dir(cfg)
    tag_dir = os.path.join(root, tag)
    complete_everywhere = torch.tensor([float(is_complete(tag_dir))], device=engine.device)
    dist.all_reduce(complete_everywhere, dist.ReduceOp.MIN)  # every rank takes the same branch
    if complete_everywhere.item():
        return
    position_file = os.path.join(tag_dir, f"data_position_rank{rank}.json")
    with recording_write_failures(engine) as failures:
        recorded(failures, position_file, lambda: write_json(position_file, position.state()))
        if cluster_term is not None:
            recorded(failures, tag_dir, lambda: cluster_term.save(tag_dir))
        engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    stop_if_any_rank_failed(failures, tag_dir, rank, engine.device)
    if rank == 0:
        about = {"zero_stage": engine.zero_optimization_stage(), "bf16_mode": engine.bfloat16_enabled()}
        recorded(failures, tag_dir, lambda: complete_and_rotate(root, tag, about, cfg.checkpoint.keep))
    stop_if_any_rank_failed(failures, tag_dir, rank, engine.device)


def check_checkpoint_layout(tag_dir: str, zero_stage: int, bf16_mode: bool, ds_path: str) -> None:
    """DeepSpeed cannot load a checkpoint into an engine of another layout: it fails deep inside, or starts the
    optimizer afresh. A ZeRO checkpoint keeps the optimizer state in per-rank partitions, one without ZeRO as a
    whole; and DeepSpeed's bf16 mode saves its own optimizer files (``bf16_zero_pp_rank_*``), which an engine
    without it (torch autocast, or fp32 on CPU) does not look for. With bf16 the file names do not tell the
    ZeRO stage apart, so the completion marker records both; a checkpoint from before that is judged by its
    file names where they tell."""
    about = checkpoint_about(tag_dir)
    saved = about.get("zero_stage")
    if saved is not None and (saved > 0) != (zero_stage > 0):
        raise ConfigError(f"checkpoint.resume: {tag_dir} was saved " + (
            f"with ZeRO stage {saved}" if saved else "without ZeRO (stage 0)") + f", but deepspeed_config "
            f"{ds_path} runs ZeRO stage {zero_stage}: resume with a JSON of the kind it was saved with (the "
            "run's config.yaml names it)")
    saved_bf16 = about.get("bf16_mode", bf16_mode_of_files(tag_dir))
    if saved_bf16 is not None and saved_bf16 != bf16_mode:
        raise ConfigError(
            f"checkpoint.resume: {tag_dir} was saved in DeepSpeed's bf16 mode, and deepspeed_config {ds_path} "
            "does not run it (on CPU the trainer turns bf16 off): resume on GPUs with a JSON that sets \"bf16\": "
            "{\"enabled\": true} (ds_configs' zero0/1/2.json did before they moved to torch autocast)"
            if saved_bf16 else
            f"checkpoint.resume: {tag_dir} was saved without DeepSpeed's bf16 mode, and deepspeed_config {ds_path} "
            "runs it: resume with a JSON without it (torch_autocast, as ds_configs' zero0/1/2.json)")


def resume(engine, cfg: Config, rank: int, cluster_term) -> tuple[int, DataPosition]:
    """Load the newest checkpoint if asked to; return (next step, data position)."""
    from cid_ds.checkpoint_io import load_deepspeed_files_safely, refuse_code_in_checkpoint
    if cfg.checkpoint.resume == "none":
        return 0, DataPosition()
    root = cfg.checkpoint.resume if cfg.checkpoint.resume != "auto" else checkpoint_dir(cfg)
    tag = None
    if cfg.checkpoint.resume != "auto" and os.path.basename(os.path.normpath(root)).startswith("step"):
        root, tag = os.path.split(os.path.normpath(root))
    if tag is None:
        tag = newest_complete_tag(root)
        if tag is None:
            if cfg.checkpoint.resume != "auto":
                raise ConfigError(f"checkpoint.resume: no complete checkpoint in {root}")
            return 0, DataPosition()
    tag_dir = os.path.join(root, tag)
    check_checkpoint_layout(tag_dir, engine.zero_optimization_stage(), engine.bfloat16_enabled(),
                            cfg.deepspeed_config)
    refuse_code_in_checkpoint(tag_dir)
    load_deepspeed_files_safely(engine)
    path, client = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint.resume: could not load the checkpoint {tag_dir}")
    if cluster_term is not None:
        cluster_term.load(tag_dir)
    position_file = os.path.join(tag_dir, f"data_position_rank{rank}.json")
    if not os.path.isfile(position_file):  # saved by fewer ranks: this rank starts its data afresh
        print(f"[cid_ds] rank {rank}: no {position_file}, starting the data at epoch 0", flush=True)
        return int(client["step"]), DataPosition()
    return int(client["step"]), DataPosition(**read_json(position_file))


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def open_clusters(cfg: Config, packed: Optional[PackedShards]) -> ClusterAssignments:
    """``cluster.dir``'s assignments, complete, and of the clustering packed shards (if any) carry ids of."""
    from cid_ds.data.clusters import ClusterAssignments
    assignments = ClusterAssignments(cfg.cluster.dir)
    if not assignments.complete:
        raise ConfigError(f"cluster.dir: the cluster assignments in {cfg.cluster.dir} are incomplete: "
                          "re-run data_tools.cluster to finish them")
    if packed is not None and packed.topk and packed.manifest["k"] != assignments.k:
        raise ConfigError(f"cluster.dir: {assignments.manifest_path} has k = {assignments.k}, but the shards of "
                          f"{packed.manifest_path} were packed with a clustering of k = {packed.manifest['k']}: "
                          "point cluster.dir at that one")
    return assignments


def check_teachers(cfg: Config, packed: Optional[PackedShards], cache: Optional[FeatureCache],
                   assignments: Optional[ClusterAssignments], online_teacher: Optional[OnlineTeacher]) -> None:
    """Refuse artifacts of the run made from different teachers (cid_ds.data.joins). An online teacher
    replaces the stored embeddings: packed shards are then joined only for their cluster ids."""
    from cid_ds.data.joins import Artifact, check_join
    if online_teacher is None:
        check_join(packed, cache, assignments)
        return
    packed_ids = packed if packed is not None and packed.topk and assignments is not None else None
    check_join(Artifact("model.teacher", cfg.model.teacher, online_teacher.info), assignments, packed_ids)


def run(cfg: Config, stop: Optional[StopSignal] = None) -> dict[str, Any]:
    """Train as ``cfg`` says. ``stop``: the stop-signal flag, installed by the caller as early as it can (a
    signal during start-up then stops the run at its first check instead of killing the rank)."""
    try:
        check_writable(cfg.output_dir)  # before start-up, and on every rank: a shared folder may be read-only on one node
    except OutputNotWritable as e:
        raise ConfigError(f"output_dir: {e}") from None
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from cid_ds.data.features import FeatureCache, teacher_members
    from cid_ds.data.packed import PackedShards, packed_manifest_path
    from cid_ds.models import DistillStudent, create_model

    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    on_gpu = get_accelerator().device_name() == "cuda"
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    clip_model, preprocess_train, preprocess_val, tokenizer = create_model(
        cfg.model.student, cfg.model.student_pretrained)
    shards = expand_shards(cfg.data.train_shards)
    packed_path = packed_manifest_path(shards)
    packed = PackedShards(packed_path) if packed_path else None
    teacher, teacher_source, stored_views = None, None, 0  # the teacher (set) of the embeddings trained against
    if packed is not None:
        if not packed.complete:
            raise ConfigError(f"data.train_shards: the distill-ready shards of {packed_path} are incomplete: "
                              "re-run data_tools.pack to finish them")
        teacher, teacher_source, stored_views = packed.teacher, packed_path, packed.views
    cache = None
    if cfg.data.features is not None:
        cache = FeatureCache(cfg.data.features)
        if not cache.complete:
            raise ConfigError(f"data.features: the feature cache {cache.manifest_path} is incomplete "
                              "(extraction still running or interrupted): re-run data_tools.extract to finish it")
        teacher, teacher_source, stored_views = cache.teacher, cache.manifest_path, cache.views
    online_teacher = None
    if cfg.kd.teacher == "online":
        from cid_ds.teacher import OnlineTeacher
        online_teacher = OnlineTeacher(cfg.model.teacher, cfg.model.teacher_pretrained, clip_model,
                                       random_ok=cfg.model.teacher_random_ok)
        teacher, teacher_source = online_teacher.info, f"model.teacher {cfg.model.teacher}"
    assignments = open_clusters(cfg, packed) if cfg.loss.cluster > 0 else None
    check_teachers(cfg, packed, cache, assignments, online_teacher)
    replay_views = resolve_replay_views(cfg, stored_views, teacher_source)
    targets = None
    if teacher is not None:
        try:
            targets = teacher_targets(teacher_members(teacher), cfg.kd.ensemble, cfg.kd.teacher_weights,
                                      cfg.kd.teacher_logit_scale, teacher_source)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if None in (scale for _, scale in targets.blocks) and (cfg.loss.crd > 0 or cfg.loss.gd > 0):
            raise ConfigError(f"loss.crd/loss.gd need the teacher's logit scale: {teacher_source} predates it, "
                              "set kd.teacher_logit_scale")
    cluster_index = None  # the teacher of an ensemble the clusters were fit on; None: all of them
    if assignments is not None:
        from cid_ds.losses.cluster import centroid_dim
        cluster_dim, cluster_index = centroid_dim(cfg.cluster.dir), assignments.teacher_index
        if targets is None:
            targets = TeacherTargets.single(cluster_dim)
        student_side = sum(targets.head_dims) if cluster_index is None or targets.mode == "mean" \
            else targets.head_dims[cluster_index]
        if student_side != cluster_dim:
            raise ConfigError(f"cluster.dir: centroids are {cluster_dim}-d, the student's teacher-space embedding "
                              f"{student_side}-d (kd.ensemble {cfg.kd.ensemble}, teacher widths {list(targets.dims)}): "
                              "cluster every teacher with kd.ensemble per_teacher, or one teacher (--teacher-index)")
    if cfg.perf.grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    heads = targets.head_dims if targets is not None else None
    student = DistillStudent(clip_model, sum(heads) if heads else None, teacher_blocks=heads,
                             cross_scale=cfg.loss.icl > 0, fusion=cfg.loss.afd > 0,
                             mask_ratio=cfg.kd.mask_ratio if cfg.loss.mfd > 0 else 0.0)
    # Only the images go NHWC: convolutions then compute and return NHWC. The weights stay NCHW, because
    # DeepSpeed views every parameter as contiguous bytes (broadcast, ZeRO's flat buffers).
    memory_format = torch.channels_last if cfg.perf.channels_last else torch.preserve_format
    optimizer = build_optimizer(student, cfg)
    lr_factor = cosine_with_warmup(cfg.optim.warmup_steps, cfg.optim.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, on_gpu))
    skip_allreduce_at_one_rank(engine)
    if cfg.perf.compile:
        engine.compile()  # in place (nn.Module.compile): parameter names and checkpoints stay as they are
    device = engine.device
    dtype = compute_dtype(engine)
    if online_teacher is not None:
        online_teacher.to(device, dtype)

    cluster_term = None
    if cfg.loss.cluster > 0:
        from cid_ds.losses.cluster import ClusterDiscrimination
        cluster_term = ClusterDiscrimination(cfg.cluster, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.eps,
                                             lr_factor, cfg.seed, device, cluster_index)
    step, position = resume(engine, cfg, rank, cluster_term)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
        writer = SummaryWriter(cfg.logging.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard"))
        writer.add_text("config", "```\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False) + "```", step)
        print(f"[cid_ds] {cfg.name}: world {world_size}, device {device}, dtype {dtype}, "
              f"start step {step}/{cfg.optim.steps}, epoch {position.epoch}", flush=True)

    join_clusters = cfg.loss.cluster > 0 and not (packed is not None and packed.topk)
    data = batches(cfg, shards, preprocess_val if cfg.data.views == "center" else preprocess_train, tokenizer,
                   position, rank, world_size, online_teacher.tokenizer if online_teacher is not None else None,
                   cfg.cluster.dir if join_clusters else None, replay_views)
    weights = loss_weights(cfg)
    window = {"t0": time.perf_counter(), "data_wait": 0.0, "steps": 0, "skipped": 0, "nonfinite": 0}
    damage = RunDamage(len(shards), cfg.data.max_damaged_fraction)
    train_start, first_step = time.perf_counter(), step
    last_losses: dict[str, float] = {}
    engine.train()
    stop = stop or StopSignal()
    nonfinite_in_a_row = 0
    profiler = start_profiler(cfg.logging.profile_steps, cfg.logging.every, cfg.output_dir, rank, on_gpu)
    while step < cfg.optim.steps:
        t_wait = time.perf_counter()
        batch = next(data)
        window["data_wait"] += time.perf_counter() - t_wait
        window["skipped"] += int(batch.get("n_skipped", 0))
        damage.add(batch["damaged_shards"])
        image = batch["image"].to(device, dtype=dtype, non_blocking=True, memory_format=memory_format)
        tokens = batch["tokens"].to(device, non_blocking=True)
        for k in ("t_img", "t_txt", "cluster"):
            if k in batch:
                batch[k] = batch[k].to(device, non_blocking=True)
        if online_teacher is not None:
            batch["t_img"], batch["t_txt"] = online_teacher(image, batch["teacher_tokens"].to(device, non_blocking=True))
        fusion_inputs = tuple(targets.combine(batch[k]).to(dtype) for k in ("t_img", "t_txt")) if cfg.loss.afd > 0 else ()
        out = engine(image, tokens, *fusion_inputs)
        losses, metrics = compute_losses(cfg, out, batch, cluster_term, step, targets)
        total = sum(weights[k] * v for k, v in losses.items())
        if not all_finite(total):
            nonfinite_in_a_row += 1
            window["nonfinite"] += 1
            if nonfinite_in_a_row >= cfg.checkpoint.max_nonfinite_in_a_row:
                save_checkpoint(engine, cfg, step, position, rank, cluster_term)
                raise SystemExit(f"[cid_ds] rank {rank}: {nonfinite_in_a_row} non-finite losses in a row at step "
                                 f"{step} (last: {sorted(k for k, v in losses.items() if not torch.isfinite(v))}); "
                                 f"stopped, weights of step {step} saved in {checkpoint_dir(cfg)}")
            continue
        nonfinite_in_a_row = 0
        engine.backward(total)
        engine.step()
        if cluster_term is not None:
            cluster_term.step(step)
        step += 1
        window["steps"] += 1
        if profiler is not None:
            profiler.step()

        if step % cfg.checkpoint.stop_check_every == 0 or step % cfg.logging.every == 0:
            damage.check(device)
        if step % cfg.logging.every == 0 or step == cfg.optim.steps:
            last_losses = log_window(writer, engine, losses, metrics, total, out, window, step, device, cfg,
                                     world_size, damage.count)
        stopping = step % cfg.checkpoint.stop_check_every == 0 and stop.agreed(device)
        if step % cfg.checkpoint.every == 0 or step == cfg.optim.steps or stopping:
            save_checkpoint(engine, cfg, step, position, rank, cluster_term)
        if stopping:
            if rank == 0:
                print(f"[cid_ds] stop signal ({stop.received or 'on another rank'}): checkpoint of step {step} "
                      f"saved in {checkpoint_dir(cfg)}; resume with checkpoint.resume=auto", flush=True)
            return {"step": step, "losses": last_losses, "stopped": True}

    seconds = time.perf_counter() - train_start
    if profiler is not None:
        profiler.stop()
    results: dict[str, Any] = {"step": step, "losses": last_losses, "train_seconds": seconds,
                               "samples_per_s": (step - first_step) * cfg.data.batch_size * world_size / seconds}
    dist.barrier()
    if rank == 0:
        results.update(export_and_evaluate(cfg))
        write_json(os.path.join(cfg.output_dir, "results.json"), results)
        if writer is not None:
            for set_name, metrics in results.get("eval", {}).items():
                for metric, value in metrics.items():
                    if isinstance(value, (int, float)) and metric != "samples":
                        writer.add_scalar(f"eval/{set_name}/{metric}", value, step)
            writer.close()
    dist.barrier()
    return results


def log_window(writer, engine, losses: dict, metrics: dict, total: torch.Tensor, out: dict, window: dict, step: int,
               device: torch.device, cfg: Config, world_size: int, damaged_shards: int) -> dict[str, float]:
    """Read scalars once per logging window (each read is a device sync), average losses over ranks.
    ``damaged_shards``: the run's so far, over every rank (cid_ds.data.damage.RunDamage)."""
    import torch.distributed as dist
    elapsed = time.perf_counter() - window["t0"]
    averaged = {f"loss/{k}": v for k, v in losses.items()} | {"loss/total": total} | metrics
    names = sorted(averaged)
    values = torch.stack([averaged[k].detach().float().reshape(()) for k in names])
    dist.all_reduce(values)
    values = (values / world_size).tolist()
    rank_rate = torch.tensor([window["steps"] * cfg.data.batch_size / elapsed], device=device)
    rates = [torch.zeros_like(rank_rate) for _ in range(world_size)]
    dist.all_gather(rates, rank_rate)
    scalars = dict(zip(names, values))
    scalars.update({
        "train/lr": engine.get_lr()[0],
        "train/logit_scale": float(out["logit_scale"].detach()),
        **{f"train/{k}": float(out[k].detach()) for k in ("cross_logit_scale", "fusion_logit_scale") if k in out},
        "perf/samples_per_s": float(sum(r.item() for r in rates)),
        "perf/data_wait_fraction": window["data_wait"] / elapsed,
        "perf/memory_gib": memory_bytes(device) / 2**30,
        "data/skipped_samples": window["skipped"],
        "data/damaged_shards": damaged_shards,
        "train/nonfinite_steps_skipped": window["nonfinite"],
    })
    scalars.update({f"perf/samples_per_s_rank{r}": rates[r].item() for r in range(world_size)})
    if writer is not None:
        for k, v in scalars.items():
            writer.add_scalar(k, v, step)
        writer.flush()
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss/"))
        print(f"[cid_ds] step {step}/{cfg.optim.steps} {shown} lr={scalars['train/lr']:.3g} "
              f"{scalars['perf/samples_per_s']:.0f} samples/s data_wait={scalars['perf/data_wait_fraction']:.0%}",
              flush=True)
    window.update(t0=time.perf_counter(), data_wait=0.0, steps=0, skipped=0, nonfinite=0)
    return {k.split("/")[-1]: v for k, v in scalars.items() if k.startswith("loss/")}


def export_and_evaluate(cfg: Config) -> dict[str, Any]:
    """Export the final checkpoint as an open_clip folder and evaluate that folder: what users get."""
    from cid_ds.evaluate import evaluate
    from cid_ds.export import export_checkpoint
    from cid_ds.models import create_model
    export_dir = os.path.join(cfg.output_dir, "export")
    export_checkpoint(checkpoint_dir(cfg), cfg.model.student, export_dir, pretrained=cfg.model.student_pretrained)
    results: dict[str, Any] = {"export": export_dir}
    if cfg.eval.at_end and cfg.eval.sets:
        model, _, preprocess_val, tokenizer = create_model(f"local-dir:{export_dir}")
        results["eval"] = evaluate(model, preprocess_val, tokenizer, cfg.eval.sets, batch_size=cfg.eval.batch_size)
        print(f"[cid_ds] eval: {json.dumps(results['eval'])}", flush=True)
    return results


def main(argv: Optional[list[str]] = None, stop: Optional[StopSignal] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    stop = stop or StopSignal()
    try:
        results = run(load_config(args.config, args.overrides), stop)
    except ConfigError as e:  # a setting or input the run cannot use, found before or after start-up
        raise SystemExit(f"config error: {e}") from None
    except TooMuchDamage as e:
        raise SystemExit(f"data error: {e}") from None
    return results


def process_main(stop: Optional[StopSignal] = None) -> None:
    """``main`` as a process of its own (the launcher's rank, ``python -m cid_ds.train``): whatever the run
    left running (loader workers, threads, the process group's teardown), the process ends within
    ``EXIT_SECONDS`` of it."""
    try:
        main(stop=stop)
    except BaseException:
        exit_within(EXIT_SECONDS, 1)
        raise
    exit_within(EXIT_SECONDS, 0)
    if torch.distributed.is_initialized():  # NCCL warns of leaked resources at exit otherwise
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    process_main()
