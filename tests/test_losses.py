"""The contrastive and instance losses equal a plain reference computation; gradients reach only the student."""
import torch
import torch.nn.functional as F

from cid_ds.losses.clip import clip_loss
from cid_ds.losses.instance import instance_loss


def reference_infonce(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """-log softmax of the diagonal, written out by hand."""
    logits = scale * q @ k.T
    log_probs = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
    return -log_probs.diagonal().mean()


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_clip_loss_is_symmetric_infonce():
    image, text, scale = unit(8, 16), unit(8, 16, seed=1), torch.tensor(10.0)
    expected = (reference_infonce(image, text, 10.0) + reference_infonce(text, image, 10.0)) / 2
    torch.testing.assert_close(clip_loss(image, text, scale), expected)


def test_instance_loss_matches_reference_and_trains_only_the_student():
    s_img = unit(8, 32).requires_grad_()
    s_txt = unit(8, 32, seed=1).requires_grad_()
    t_img = unit(8, 32, seed=2).requires_grad_()  # would receive gradient if the loss leaked into the teacher
    t_txt = unit(8, 32, seed=3).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    loss = instance_loss(s_img, s_txt, t_img, t_txt, scale)
    expected = (reference_infonce(s_img, t_txt, 14.0) + reference_infonce(s_txt, t_img, 14.0)) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s_img.grad is not None and s_img.grad.abs().sum() > 0
    assert s_txt.grad is not None and s_txt.grad.abs().sum() > 0
    assert scale.grad is not None
    assert t_img.grad is None and t_txt.grad is None


def test_instance_loss_is_lowest_when_the_student_matches_the_teacher():
    t_img, t_txt = unit(16, 32), unit(16, 32, seed=1)
    aligned_t = F.normalize(t_img + t_txt, dim=-1)
    matched = instance_loss(aligned_t, aligned_t, aligned_t, aligned_t, torch.tensor(20.0))
    random = instance_loss(unit(16, 32, seed=5), unit(16, 32, seed=6), aligned_t, aligned_t, torch.tensor(20.0))
    assert matched < 0.01 < random
