"""The CLIP-KD loss family: each term equals a hand-written reference on a fixed batch, vanishes (or is
lowest) when the student equals the teacher, and sends gradient only to the student and its heads."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from cid_ds.config import Config
from cid_ds.losses.kd import (contrastive_gradients, feature_distillation, gradient_distillation,
                              relational_distillation)
from cid_ds.models import DistillStudent, create_model
from cid_ds.losses.ensemble import TeacherTargets
from cid_ds.objective import compute_losses


def unit(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).requires_grad_(grad)


def kl_rows(student_logits, teacher_logits):
    """sum_j p_t log(p_t / p_s), averaged over rows, written out."""
    p_t = torch.exp(teacher_logits) / torch.exp(teacher_logits).sum(1, keepdim=True)
    p_s = torch.exp(student_logits) / torch.exp(student_logits).sum(1, keepdim=True)
    return (p_t * (torch.log(p_t) - torch.log(p_s))).sum(1).mean()


def infonce(q, k, scale):
    logits = scale * q @ k.T
    return -(logits.diagonal() - torch.log(torch.exp(logits).sum(1))).mean()


def test_fd_is_the_mean_squared_error_and_zero_for_the_teacher_itself():
    s, t = unit(8, 16, grad=True), unit(8, 16, seed=1, grad=True)
    loss = feature_distillation(s, t)
    torch.testing.assert_close(loss, ((s - t) ** 2).sum() / (8 * 16))
    loss.backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert feature_distillation(t.detach(), t.detach()) == 0


def test_crd_is_the_kl_between_teacher_and_student_similarity_distributions():
    s_img, s_txt = unit(8, 16, grad=True), unit(8, 16, seed=1, grad=True)
    t_img, t_txt = unit(8, 32, seed=2, grad=True), unit(8, 32, seed=3, grad=True)
    s_scale, t_scale = torch.tensor(10.0), 50.0
    loss = relational_distillation(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    expected = (kl_rows(10 * s_img @ s_txt.T, 50 * t_img @ t_txt.T)
                + kl_rows(10 * s_txt @ s_img.T, 50 * t_txt @ t_img.T)) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s_img.grad.abs().sum() > 0 and s_txt.grad.abs().sum() > 0
    assert t_img.grad is None and t_txt.grad is None


def test_crd_temperature_softens_both_sides_and_rescales_by_its_square():
    s_img, s_txt, t_img, t_txt = (unit(8, 16, seed=i) for i in range(4))
    loss = relational_distillation(s_img, s_txt, torch.tensor(10.0), t_img, t_txt, 20.0, temperature=4.0)
    expected = 16 * (kl_rows(2.5 * s_img @ s_txt.T, 5 * t_img @ t_txt.T)
                     + kl_rows(2.5 * s_txt @ s_img.T, 5 * t_txt @ t_img.T)) / 2
    torch.testing.assert_close(loss, expected)
    same = relational_distillation(t_img, t_txt, torch.tensor(20.0), t_img, t_txt, 20.0, temperature=4.0)
    assert abs(same.item()) < 1e-6


def test_contrastive_gradients_are_the_autograd_gradients_of_infonce():
    q, k = unit(8, 16, grad=True), unit(8, 16, seed=1, grad=True)
    grad_q, grad_k = torch.autograd.grad(infonce(q, k, 12.0), (q, k))
    analytic_q, analytic_k = contrastive_gradients(q.detach(), k.detach(), 12.0)
    torch.testing.assert_close(analytic_q, grad_q)
    torch.testing.assert_close(analytic_k, grad_k)


def test_gd_matches_the_gradients_of_the_teacher_loss_and_vanishes_for_the_teacher_itself():
    s_img, s_txt = unit(8, 16, grad=True), unit(8, 16, seed=1, grad=True)
    t_img, t_txt = unit(8, 16, seed=2, grad=True), unit(8, 16, seed=3, grad=True)
    loss = gradient_distillation(s_img, s_txt, torch.tensor(10.0), t_img, t_txt, 30.0)

    def autograd_grads(img, txt, scale):  # d/d(query), d/d(key) of each direction's InfoNCE
        img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
        i2t = torch.autograd.grad(infonce(img, txt, scale), (img, txt))
        t2i = torch.autograd.grad(infonce(txt, img, scale), (txt, img))
        return i2t + t2i
    expected = sum(((a - b) ** 2).mean() for a, b in zip(autograd_grads(s_img, s_txt, 10.0),
                                                         autograd_grads(t_img, t_txt, 30.0)))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s_img.grad.abs().sum() > 0 and t_img.grad is None and t_txt.grad is None
    same = gradient_distillation(t_img.detach(), t_txt.detach(), torch.tensor(30.0), t_img, t_txt, 30.0)
    assert same.item() < 1e-12


@pytest.fixture(scope="module")
def student_and_batch():
    torch.manual_seed(0)
    clip, _, _, tokenizer = create_model("demo-student")
    student = DistillStudent(clip, teacher_dim=256, cross_scale=True, fusion=True, mask_ratio=0.5)
    image = torch.randn(6, 3, 32, 32)
    tokens = tokenizer([f"a red circle number {i}" for i in range(6)])
    t_img, t_txt = unit(6, 256, seed=7, grad=True), unit(6, 256, seed=8, grad=True)
    return student, image, tokens, t_img, t_txt


def all_terms_config() -> Config:
    cfg = Config()
    for name, weight in dict(clip=1, fd=2000, crd=1, icl=1, mfd=2000, gd=1, afd=1).items():
        setattr(cfg.loss, name, float(weight))
    return cfg


def test_every_term_trains_the_student_and_its_heads_and_never_the_teacher(student_and_batch):
    student, image, tokens, t_img, t_txt = student_and_batch
    student.zero_grad(set_to_none=True)
    out = student(image, tokens, t_img, t_txt)
    batch = {"t_img": t_img, "t_txt": t_txt}
    losses, _ = compute_losses(all_terms_config(), out, batch, None, step=0, targets=TeacherTargets.single(256, 50.0))
    assert sorted(losses) == ["afd", "clip", "crd", "fd", "gd", "icl", "mfd"]
    for name, loss in losses.items():
        assert torch.isfinite(loss) and loss.ndim == 0, name
    sum(losses.values()).backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    for head in ("proj_image.weight", "proj_text.weight", "cross_logit_scale", "fuse_image.weight",
                 "fuse_text.bias", "fusion_logit_scale"):
        assert dict(student.named_parameters())[head].grad.abs().sum() > 0, head
    assert t_img.grad is None and t_txt.grad is None


def test_icl_and_afd_use_their_own_learnable_scales(student_and_batch):
    student, image, tokens, t_img, t_txt = student_and_batch
    with torch.no_grad():
        out = student(image, tokens, t_img, t_txt)
        losses, _ = compute_losses(all_terms_config(), out, {"t_img": t_img, "t_txt": t_txt}, None, 0,
                                   TeacherTargets.single(256, 50.0))
    cross = math.exp(student.cross_logit_scale.item())
    expected_icl = (infonce(out["image_in_teacher"], t_txt, cross) + infonce(out["text_in_teacher"], t_img, cross)) / 2
    torch.testing.assert_close(losses["icl"], expected_icl)
    fused_image = F.normalize(student.fuse_image(torch.cat([out["image_in_teacher"], t_img], 1)), dim=-1)
    fused_text = F.normalize(student.fuse_text(torch.cat([out["text_in_teacher"], t_txt], 1)), dim=-1)
    fusion = math.exp(student.fusion_logit_scale.item())
    expected_afd = (infonce(fused_image, fused_text, fusion) + infonce(fused_text, fused_image, fusion)) / 2
    torch.testing.assert_close(losses["afd"], expected_afd.detach())


def test_mfd_student_sees_only_the_unmasked_patches(student_and_batch):
    student, image, tokens, t_img, t_txt = student_and_batch
    seen = []
    hook = student.clip.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        student.train()
        out = student(image, tokens, t_img, t_txt)
    finally:
        hook.remove()
    assert seen == [1 + 16, 1 + 8]  # class token + 4x4 patches, then half the patches
    assert not torch.allclose(out["masked_image_in_teacher"], out["image_in_teacher"])
    assert isinstance(student.clip.visual.patch_dropout, torch.nn.Identity)  # restored after the masked pass


def test_mfd_needs_a_vit_student(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 64, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}}))
    resnet, _, _, _ = create_model(f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="needs a ViT student, not ModifiedResNet"):
        DistillStudent(resnet, mask_ratio=0.5)
