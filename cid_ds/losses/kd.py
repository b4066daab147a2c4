"""The CLIP-KD loss family (Yang et al., CVPR 2024, arXiv 2307.12732) over cached or online teacher embeddings.

Every input is L2-normalised; teacher tensors are targets and never receive gradient. Student embeddings
"in the teacher's space" come out of DistillStudent's projection heads. The two other CLIP-KD terms need
no function of their own: ICL is ``instance_loss`` with its own learnable scale, and AFD is ``clip_loss``
over DistillStudent's fused student+teacher features.

Terms built on the contrastive logits follow open_clip's ``local_loss``: each rank scores its local rows
against the gathered global batch, and DeepSpeed's gradient average makes the step exact. GD needs the
gradient every *key* receives from every query, so it is computed over the whole gathered batch on each
rank (B*W x B*W logits, the cost CLIP-KD's own code pays); the gather's backward sums the identical
rank gradients, which the data-parallel average turns back into exactly dL/dtheta.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cid_ds.parallel.collectives import all_gather_no_grad, all_gather_with_grad


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FD (and MFD, with the student's masked view): mean squared error over all elements, as CLIP-KD
    (hence its weight of 2000: the squared distance of unit vectors is spread over D elements)."""
    return F.mse_loss(student, teacher.detach())


def _distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the row softmaxes, averaged over rows, times T^2 (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits.detach() / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


def relational_distillation(s_img: torch.Tensor, s_txt: torch.Tensor, s_scale: torch.Tensor,
                            t_img: torch.Tensor, t_txt: torch.Tensor, t_scale: float,
                            temperature: float = 1.0) -> torch.Tensor:
    """CRD: the student's image->text and text->image similarity distributions over the global batch
    match the teacher's. Student embeddings in its own space; each side uses its own logit scale."""
    all_s_img, all_s_txt = all_gather_with_grad(s_img), all_gather_with_grad(s_txt)
    all_t_img, all_t_txt = all_gather_no_grad(t_img.detach()), all_gather_no_grad(t_txt.detach())
    image_to_text = _distill_kl(s_scale * s_img @ all_s_txt.T, t_scale * t_img @ all_t_txt.T, temperature)
    text_to_image = _distill_kl(s_scale * s_txt @ all_s_img.T, t_scale * t_txt @ all_t_img.T, temperature)
    return (image_to_text + text_to_image) / 2


def contrastive_gradients(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor | float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Analytic gradients of the mean InfoNCE of ``queries`` over ``keys`` (positive i <-> i) with respect
    to the queries and to the keys: ``s (P - Y) K / N`` and ``s (P - Y)^T Q / N``."""
    n = queries.shape[0]
    residual = torch.softmax(scale * queries @ keys.T, dim=1)
    residual = residual - torch.eye(n, dtype=residual.dtype, device=residual.device)
    return scale * residual @ keys / n, scale * residual.T @ queries / n


def gradient_distillation(s_img: torch.Tensor, s_txt: torch.Tensor, s_scale: torch.Tensor,
                          t_img: torch.Tensor, t_txt: torch.Tensor, t_scale: float) -> torch.Tensor:
    """GD: the gradients of the student's contrastive loss (in the teacher's space) with respect to its
    image and text embeddings match those of the teacher's own loss, both directions."""
    all_s_img, all_s_txt = all_gather_with_grad(s_img), all_gather_with_grad(s_txt)
    all_t_img, all_t_txt = all_gather_no_grad(t_img.detach()), all_gather_no_grad(t_txt.detach())
    loss = s_img.new_zeros(())
    for s_q, s_k, t_q, t_k in ((all_s_img, all_s_txt, all_t_img, all_t_txt),
                               (all_s_txt, all_s_img, all_t_txt, all_t_img)):
        s_grads, t_grads = contrastive_gradients(s_q, s_k, s_scale), contrastive_gradients(t_q, t_k, t_scale)
        loss = loss + sum(F.mse_loss(s, t) for s, t in zip(s_grads, t_grads))
    return loss
