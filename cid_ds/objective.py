"""The objective: every loss term with a weight > 0, computed from one batch and the student's outputs."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from cid_ds.config import TEACHER_TERMS, Config
from cid_ds.data.batch import Batch
from cid_ds.losses.ensemble import TeacherTargets, split_blocks

def loss_weights(cfg: Config, step: Optional[int] = None) -> dict[str, float]:
    """The terms to compute: every ``loss.*`` weight > 0; at ``step``, the cluster term's weight rises
    linearly over ``cluster.warmup_steps``."""
    weights = {name: weight for name, weight in dataclasses.asdict(cfg.loss).items() if weight > 0}
    if step is not None and "cluster" in weights and cfg.cluster.warmup_steps:
        weights["cluster"] *= min(1.0, (step + 1) / cfg.cluster.warmup_steps)
    return weights


def compute_losses(cfg: Config, out: dict, batch: Batch, cluster_term, step: int,
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
        text = targets.cluster_view(f["text_in_teacher"], None, cluster_term.teacher_index)[0] \
            if cfg.cluster.text_weight > 0 else None
        result = cluster_term(student, batch | {"t_img": rows}, step, text)
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

