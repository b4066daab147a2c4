"""CLIP-CID cluster discrimination as a trainer term: the student image embedding (in the teacher's
space) is classified into its teacher k-means cluster over the sharded centroid classifier.

The classifier is not part of the DeepSpeed engine: its rows differ per rank and must not be averaged
over data-parallel ranks, so it has its own (row-wise AdamW) update, follows the engine's lr schedule times
``lr_mult``, and saves one checkpoint file per rank beside the engine's checkpoint.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import numpy as np
import torch

from cid_ds.config import ClusterConfig, Config
from cid_ds.data.clusters import CENTROIDS
from cid_ds.io import load_numeric_npy
from cid_ds.parallel.partial_fc import ShardedCentroidClassifier


def _read_centroids(cluster_dir: str) -> np.ndarray:
    """The [k, dim] centroid matrix, memory-mapped: reading its shape costs no I/O."""
    path = os.path.join(cluster_dir, CENTROIDS)
    centroids = load_numeric_npy(path, mmap=True)
    if centroids.ndim != 2:
        raise ValueError(f"{path}: centroids must be a [k, dim] matrix, got shape {centroids.shape}")
    return centroids


def centroid_dim(cluster_dir: str) -> int:
    return int(_read_centroids(cluster_dir).shape[1])


def load_centroids(cluster_dir: str) -> torch.Tensor:
    """The centroids over the read-only memory map: each rank's classifier copies just its own rows (at
    1M x 512 a full copy per rank would be 2 GB), and nothing writes through this tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(_read_centroids(cluster_dir), dtype=np.float32))


class ClusterDiscrimination:
    def __init__(self, cfg: ClusterConfig, lr: float, betas: tuple[float, float], eps: float,
                 lr_factor: Callable[[int], float], seed: int, device: torch.device,
                 teacher_index: Optional[int] = None):
        self.cfg, self.base_lr, self.lr_factor, self.betas, self.eps = cfg, lr * cfg.lr_mult, lr_factor, betas, eps
        self.teacher_index = teacher_index  # the clustering's (ClusterAssignments.teacher_index): one of an ensemble
        self.classifier = ShardedCentroidClassifier(
            load_centroids(cfg.dir), margin=cfg.margin, scale=cfg.scale, margin_value=cfg.margin_value,
            sample_rate=cfg.sample_rate, learnable=cfg.learnable, soft=cfg.soft, seed=seed).to(device)

    @property
    def dim(self) -> int:
        return self.classifier.dim

    def __call__(self, student_image: torch.Tensor, batch: dict, step: int,
                 student_text: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """The term on the student's image embeddings; with ``cluster.text_weight`` > 0, on its text embeddings
        (``student_text``) too, each labelled with its image's cluster, in the same classifier step."""
        labels = batch["cluster"]
        labels = (labels if labels.ndim == 2 else labels[:, None])[:, :self.cfg.positives]
        embeddings, teacher, weights = student_image, batch.get("t_img"), None
        if self.cfg.text_weight > 0:
            embeddings, labels = torch.cat([student_image, student_text]), torch.cat([labels, labels])
            teacher = None if teacher is None else torch.cat([teacher, teacher])
            weights = torch.cat([torch.ones(len(student_image), device=student_image.device),
                                 torch.full((len(student_text),), self.cfg.text_weight, device=student_image.device)])
        if self.cfg.soft:
            return self.classifier.soft_forward(embeddings, teacher, labels, step,
                                                temperature=self.cfg.soft_temperature, weights=weights)
        return self.classifier(embeddings, labels, step, weights=weights)

    def step(self, step: int, skip: Optional[torch.Tensor] = None) -> None:
        """Apply this step's gradient to this rank's sampled rows, at the schedule's lr for ``step``, unless the
        device flag ``skip`` (cid_ds.step_guard) says the step is skipped."""
        self.classifier.update(self.base_lr * self.lr_factor(step), self.betas, self.eps, skip)

    def save(self, tag_dir: str) -> None:
        self.classifier.save(tag_dir)

    def load(self, tag_dir: str) -> None:
        self.classifier.load(tag_dir)


def cluster_term(cfg: Config, lr_factor: Callable[[int], float], device: torch.device,
                 teacher_index: Optional[int] = None) -> ClusterDiscrimination:
    """The cluster term as ``cfg`` sets it: ``cluster.*``, and the classifier's optimizer on ``optim``'s lr (times
    ``cluster.lr_mult``), betas and eps, on the schedule ``lr_factor``; ``teacher_index``: the clustering's teacher
    of an ensemble."""
    return ClusterDiscrimination(cfg.cluster, cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.eps, lr_factor,
                                 cfg.seed, device, teacher_index)
