"""The teacher: built the same way by every stage, and run online in the training step (``kd.teacher: online``).

Extraction (``data_tools.extract``) and the online teacher both load it here, so a teacher without
pretrained weights is the same random-init model in both (seeded), and an online run can be compared
with a run on the cache of that teacher. Such a teacher distils noise: it is refused unless ``random_ok``
says it is meant (tests, benchmarks).
"""
from __future__ import annotations

from typing import Callable, Optional

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from cid_ds.data.features import teacher_info
from cid_ds.models import create_model, has_trained_weights


def load_teacher(spec: str, pretrained: Optional[str], device: str | torch.device = "cpu", random_ok: bool = False
                 ) -> tuple[nn.Module, Callable, Callable, dict]:
    """``(model, preprocess_val, tokenizer, teacher_info)``, frozen, in eval mode. A teacher without weights
    (allowed by ``random_ok``) is initialised from seed 0 on the CPU, so that every rank and every re-run
    builds the same one."""
    if not random_ok and not has_trained_weights(spec, pretrained):
        raise ValueError(f"teacher '{spec}' has no trained weights (no pretrained tag or file, no weights file in "
                         "its folder), so the student would distil noise: give its weights, or say a random "
                         "teacher is meant (model.teacher_random_ok: true, --random-teacher-ok)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess_val, tokenizer = create_model(spec, pretrained, device="cpu")
    info = teacher_info(spec, pretrained, model)
    return model.to(device).eval().requires_grad_(False), preprocess_val, tokenizer, info


class OnlineTeacher:
    """Embeds each training batch with the teacher under no_grad, from the student's input tensor.

    The student's pixels are re-normalised to the teacher's mean/std and resized (bicubic) when the
    teacher's input size differs, so the teacher sees the same crop; captions come tokenised by the
    teacher's own tokenizer (the loader's ``teacher_tokens``).
    """

    def __init__(self, spec: str, pretrained: Optional[str], student: nn.Module, random_ok: bool = False):
        self.model, _, self.tokenizer, self.info = load_teacher(spec, pretrained, random_ok=random_ok)
        self.logit_scale = float(self.info["logit_scale"])
        self.embed_dim = int(self.info["embed_dim"])
        self.image_size = tuple(self.info["image_size"])
        student_cfg = open_clip.get_model_preprocess_cfg(student)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        self.student_mean, self.student_std = as_tensor(student_cfg["mean"]), as_tensor(student_cfg["std"])
        self.mean, self.std = as_tensor(self.info["preprocess"]["mean"]), as_tensor(self.info["preprocess"]["std"])

    def to(self, device: torch.device, dtype: torch.dtype) -> "OnlineTeacher":
        """Run on the engine's device in the engine's compute dtype."""
        self.model.to(device=device, dtype=dtype)
        for name in ("student_mean", "student_std", "mean", "std"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised ``(image, text)`` teacher embeddings, float32 [B, D]."""
        pixels = (image * self.student_std + self.student_mean - self.mean) / self.std
        if tuple(pixels.shape[-2:]) != self.image_size:
            pixels = F.interpolate(pixels, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        t_img = self.model.encode_image(pixels)
        t_txt = self.model.encode_text(tokens)
        return F.normalize(t_img.float(), dim=-1), F.normalize(t_txt.float(), dim=-1)
