"""Teacher ensembles: rows that concatenate several teachers' L2-normalised embeddings, made into the
targets the teacher terms compare the student with.

* ``mean``: one target, the normalised weighted mean of the teachers' embeddings (their widths must
  be equal); the student has one head into that space.
* ``per_teacher``: every teacher term is computed once per teacher and summed with the weights; the
  student has one head per teacher (``DistillStudent``'s blocks).

With one teacher both are that teacher alone, and an ensemble of a teacher with itself equals it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def split_blocks(x: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    return list(x.split(list(dims), dim=-1))


def normalize_blocks(x: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """Each block of the last dimension L2-normalised on its own."""
    if len(dims) == 1:
        return F.normalize(x, dim=-1)
    return torch.cat([F.normalize(block, dim=-1) for block in split_blocks(x, dims)], dim=-1)


@dataclass(frozen=True)
class TeacherTargets:
    """How the cached rows (``dims``: each teacher's width, in order) become the loss targets."""
    dims: tuple[int, ...]
    weights: tuple[float, ...]               # per teacher, summing to 1
    scales: tuple[Optional[float], ...]      # per teacher: its logit scale (crd, gd)
    mode: str = "mean"                       # mean | per_teacher

    @classmethod
    def single(cls, dim: int, scale: Optional[float] = None) -> "TeacherTargets":
        return cls((dim,), (1.0,), (scale,))

    @property
    def head_dims(self) -> tuple[int, ...]:
        """The widths of the student's teacher-space heads."""
        return self.dims[:1] if self.mode == "mean" else self.dims

    @property
    def blocks(self) -> list[tuple[float, Optional[float]]]:
        """``(weight, teacher logit scale)`` of each head, in order."""
        if self.mode == "per_teacher":
            return list(zip(self.weights, self.scales))
        scale = None if None in self.scales else sum(w * s for w, s in zip(self.weights, self.scales))
        return [(1.0, scale)]

    def combine(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, sum(dims)] cached rows -> [B, sum(head_dims)] targets."""
        if self.mode == "per_teacher" or len(self.dims) == 1:
            return rows
        mean = sum(w * block for w, block in zip(self.weights, split_blocks(rows.float(), self.dims)))
        return F.normalize(mean, dim=-1)

    def cluster_view(self, student: torch.Tensor, rows: Optional[torch.Tensor], teacher_index: Optional[int]
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The student's teacher-space embedding and the cached rows in the space a clustering was fit in:
        every teacher's rows concatenated (``teacher_index`` None) or teacher ``teacher_index``'s."""
        if teacher_index is None:
            return student, rows
        if self.mode == "per_teacher":
            student = split_blocks(student, self.head_dims)[teacher_index]
        return student, None if rows is None else split_blocks(rows, self.dims)[teacher_index]


def teacher_targets(members: list[dict], mode: str, weights: Sequence[float], scale_override: Optional[float],
                    source: str) -> TeacherTargets:
    """The targets for a cache's teacher ``members`` (manifest entries); errors name ``source`` and the key."""
    dims = tuple(int(m["embed_dim"]) for m in members)
    if weights and len(weights) != len(members):
        raise ValueError(f"kd.teacher_weights has {len(weights)} weights but {source} holds {len(members)} "
                         f"teacher(s): {[m.get('spec') for m in members]}")
    weights = tuple(weights) if weights else (1.0,) * len(members)
    if mode == "mean" and len(set(dims)) > 1:
        widths = ", ".join(f"{m.get('spec')}: {d}" for m, d in zip(members, dims))
        raise ValueError(f"kd.ensemble mean averages the teachers' embeddings, but the teachers of {source} have "
                         f"different widths ({widths}): use kd.ensemble per_teacher")
    scales = tuple(scale_override if scale_override is not None else m.get("logit_scale") for m in members)
    return TeacherTargets(dims, tuple(w / sum(weights) for w in weights), scales, mode)
