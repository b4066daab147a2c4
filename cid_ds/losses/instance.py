"""CLIP-CID instance discrimination: cross-modal contrast between the student and the (cached) teacher.

Student image embeddings (projected into the teacher space) must pick their own caption's teacher text
embedding out of the global batch, and student text embeddings their own image's teacher embedding.
Teacher embeddings are targets: gathered without gradient.
"""
from __future__ import annotations

import torch

from cid_ds.losses.clip import contrastive_ce
from cid_ds.parallel.collectives import all_gather_no_grad


def instance_loss(student_image: torch.Tensor, student_text: torch.Tensor, teacher_image: torch.Tensor,
                  teacher_text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """All inputs L2-normalised, [B,Dt]; teacher tensors carry no gradient."""
    all_teacher_text = all_gather_no_grad(teacher_text.detach())
    all_teacher_image = all_gather_no_grad(teacher_image.detach())
    return (contrastive_ce(student_image, all_teacher_text, logit_scale)
            + contrastive_ce(student_text, all_teacher_image, logit_scale)) / 2
