"""open_clip student and teacher construction.

A model spec is one of
  * an open_clip built-in name (``ViT-B-32``) with an optional ``pretrained`` tag or checkpoint file,
  * ``local-dir:PATH``: a folder with ``open_clip_config.json`` (+ weights, as ``cid_ds.export`` writes),
  * a bare name of a folder under ``ds_configs/models/`` (small custom architectures; random init).
The last two take a checkpoint file as ``pretrained`` (loaded over the folder's own weights), not a tag.
Nothing is downloaded: a pretrained tag whose weights are not in the local open_clip cache fails there.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
from pathlib import Path
from typing import Callable, Optional, Sequence

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir as find_checkpoint_in_dir  # what local-dir: loads
from open_clip.transformer import PatchDropout
from torch import nn

from cid_ds.losses.ensemble import normalize_blocks
from cid_ds.safe_load import refuse_code_in_weights_file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_CONFIG_DIR = os.path.join(REPO_ROOT, "ds_configs", "models")


def resolve_spec(spec: str) -> str:
    """Map a bare ds_configs/models/<name> to its ``local-dir:`` form; leave anything else alone."""
    local = os.path.join(MODEL_CONFIG_DIR, spec)
    if not spec.startswith("local-dir:") and os.path.isfile(os.path.join(local, "open_clip_config.json")):
        return f"local-dir:{local}"
    return spec


def create_model(spec: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu"
                 ) -> tuple[nn.Module, Callable, Callable, Callable]:
    """Return ``(model, preprocess_train, preprocess_val, tokenizer)`` for an open_clip spec."""
    if pretrained is not None and os.path.isfile(pretrained):
        refuse_code_in_weights_file(pretrained)
    resolved = resolve_spec(spec)
    weights_file = None  # loaded over a local-dir model here: open_clip ignores `pretrained` for one
    if resolved.startswith("local-dir:"):
        path = resolved[len("local-dir:"):]
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise FileNotFoundError(f"model '{spec}': no open_clip_config.json in {path}")
        if pretrained is not None and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"model '{spec}': pretrained '{pretrained}' is not a file (a local-dir or "
                                    "ds_configs/models architecture takes a checkpoint file, not an open_clip tag)")
        in_folder = find_checkpoint_in_dir(Path(path))  # open_clip loads it weights-only, but names no file
        if in_folder is not None:
            refuse_code_in_weights_file(str(in_folder))
        weights_file, pretrained = pretrained, None
    elif pretrained is not None and not os.path.isfile(pretrained) \
            and pretrained not in open_clip.list_pretrained_tags_by_model(resolved):
        raise FileNotFoundError(f"model '{spec}': pretrained '{pretrained}' is neither a file nor a known tag")
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        resolved, pretrained=pretrained, device=device)
    if weights_file is not None:
        try:
            open_clip.load_checkpoint(model, weights_file, strict=True, weights_only=True)
        except (RuntimeError, pickle.UnpicklingError) as e:
            raise ValueError(f"model '{spec}': cannot load pretrained '{weights_file}' into it: {e}") from None
    tokenizer = open_clip.get_tokenizer(resolved)
    return model, preprocess_train, preprocess_val, tokenizer


def has_trained_weights(spec: str, pretrained: Optional[str]) -> bool:
    """Whether ``create_model(spec, pretrained)`` loads trained weights: a pretrained tag or file, or the weights
    file open_clip finds in a local-dir folder. Otherwise the model is randomly initialised."""
    if pretrained is not None:
        return True
    resolved = resolve_spec(spec)
    return resolved.startswith("local-dir:") and \
        find_checkpoint_in_dir(Path(resolved[len("local-dir:"):])) is not None


def model_config(spec: str) -> dict:
    """The open_clip ``model_cfg`` dict of a spec (what ``cid_ds.export`` writes back out)."""
    resolved = resolve_spec(spec)
    if resolved.startswith("local-dir:"):
        import json
        with open(os.path.join(resolved[len("local-dir:"):], "open_clip_config.json")) as f:
            return json.load(f)["model_cfg"]
    cfg = open_clip.get_model_config(resolved)
    if cfg is None:
        raise ValueError(f"unknown open_clip model '{spec}'")
    return cfg


def embed_dim(model: nn.Module) -> int:
    return int(model.text_projection.shape[1]) if isinstance(model.text_projection, nn.Parameter) \
        else int(model.text_projection.out_features)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, shapes, bytes): identifies a teacher in manifests."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# CLIP's initial temperature 0.07, for the extra learnable scales of the ICL and AFD terms.
INITIAL_LOG_SCALE = math.log(1 / 0.07)


def _scale(log_scale: nn.Parameter) -> torch.Tensor:
    return log_scale.exp().clamp(max=100).squeeze()  # open_clip clamps at 100


class DistillStudent(nn.Module):
    """The open_clip student plus what the distillation terms train beside it.

    * ``proj_image``/``proj_text``: linear heads into the teacher's embedding space, when the dimensions
      differ (CLIP-KD's projections); with ``teacher_blocks`` (a teacher ensemble, one head per teacher)
      the head's output is that many blocks, each normalised on its own;
    * ``cross_logit_scale`` (``cross_scale=True``): ICL's own temperature for student-vs-teacher logits;
    * ``fuse_image``/``fuse_text`` + ``fusion_logit_scale`` (``fusion=True``): AFD's fusion of student and
      teacher embeddings; the forward pass then takes the teacher embeddings;
    * ``mask_ratio > 0``: a second image pass with that fraction of the patch tokens dropped (MFD), through
      open_clip's PatchDropout (ViT students only), which keeps the class token.

    Everything is trained with the student (one DeepSpeed engine, so ZeRO-3 partitions it too) and dropped
    at export: the exported folder is a plain open_clip model.
    """

    def __init__(self, clip: nn.Module, teacher_dim: Optional[int] = None, cross_scale: bool = False,
                 fusion: bool = False, mask_ratio: float = 0.0, teacher_blocks: Optional[Sequence[int]] = None):
        super().__init__()
        # DeepSpeed's initial parameter broadcast views every parameter as bytes, which a 0-dim tensor
        # cannot do; open_clip's logit_scale is 0-dim, so it trains as shape [1] (export squeezes it back).
        clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
        self.clip = clip
        dim = embed_dim(clip)
        target_dim = teacher_dim or dim
        self.teacher_blocks = tuple(teacher_blocks or (target_dim,))
        if sum(self.teacher_blocks) != target_dim:
            raise ValueError(f"teacher_blocks {self.teacher_blocks} do not add up to teacher_dim {target_dim}")
        needs_head = target_dim != dim or len(self.teacher_blocks) > 1
        self.proj_image = nn.Linear(dim, target_dim, bias=False) if needs_head else nn.Identity()
        self.proj_text = nn.Linear(dim, target_dim, bias=False) if needs_head else nn.Identity()
        self.cross_scale, self.fusion, self.mask_ratio = cross_scale, fusion, mask_ratio
        if cross_scale:
            self.cross_logit_scale = nn.Parameter(torch.full([1], INITIAL_LOG_SCALE))
        if fusion:
            self.fuse_image = nn.Linear(2 * target_dim, target_dim)
            self.fuse_text = nn.Linear(2 * target_dim, target_dim)
            self.fusion_logit_scale = nn.Parameter(torch.full([1], INITIAL_LOG_SCALE))
        if mask_ratio > 0 and not hasattr(clip.visual, "patch_dropout"):
            raise ValueError(f"masked feature distillation drops patch tokens: it needs a ViT student, "
                             f"not {type(clip.visual).__name__}")

    def encode_masked_image(self, image: torch.Tensor) -> torch.Tensor:
        visual = self.clip.visual
        unmasked = visual.patch_dropout
        visual.patch_dropout = PatchDropout(self.mask_ratio).train(self.training)
        try:
            return self.clip.encode_image(image)
        finally:
            visual.patch_dropout = unmasked

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, teacher_image: Optional[torch.Tensor] = None,
                teacher_text: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        normalize = nn.functional.normalize
        image_features = self.clip.encode_image(image)
        text_features = self.clip.encode_text(tokens)
        out = {
            "image": normalize(image_features, dim=-1),
            "text": normalize(text_features, dim=-1),
            "image_in_teacher": normalize_blocks(self.proj_image(image_features), self.teacher_blocks),
            "text_in_teacher": normalize_blocks(self.proj_text(text_features), self.teacher_blocks),
            "logit_scale": _scale(self.clip.logit_scale),
        }
        if self.cross_scale:
            out["cross_logit_scale"] = _scale(self.cross_logit_scale)
        if self.fusion:
            if teacher_image is None or teacher_text is None:
                raise ValueError("a DistillStudent with fusion=True needs teacher_image and teacher_text")
            fused = {"image": (self.fuse_image, out["image_in_teacher"], teacher_image),
                     "text": (self.fuse_text, out["text_in_teacher"], teacher_text)}
            for name, (fuse, student, teacher) in fused.items():
                both = torch.cat([student, teacher.detach().to(student.dtype)], dim=-1)
                out[f"fused_{name}"] = normalize(fuse(both), dim=-1)
            out["fusion_logit_scale"] = _scale(self.fusion_logit_scale)
        if self.mask_ratio > 0:
            masked = self.encode_masked_image(image)
            out["masked_image_in_teacher"] = normalize_blocks(self.proj_image(masked), self.teacher_blocks)
        return out
