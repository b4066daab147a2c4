"""The student's own image-text contrastive loss, with open_clip's ``local_loss`` + ``gather_with_grad``
semantics: each rank scores its B local queries against the B*W gathered keys, so memory is linear in
the global batch and gradients reach every rank through the gather."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cid_ds.parallel.collectives import all_gather_with_grad, world


def contrastive_ce(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of local ``queries`` [B,D] against global ``keys`` [B*W,D]; the positive of query i
    on rank r is key ``r*B + i``."""
    rank, _ = world()
    labels = torch.arange(queries.shape[0], device=queries.device) + rank * queries.shape[0]
    return F.cross_entropy(logit_scale * queries @ keys.T, labels)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch; ``image`` and ``text`` are L2-normalised [B,D]."""
    all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    return (contrastive_ce(image, all_text, logit_scale) + contrastive_ce(text, all_image, logit_scale)) / 2
