"""With 2 ranks (real torch.distributed, gloo), each rank's losses over the gathered global batch give
the same loss and the same gradients as 1 rank on the concatenated batch: the contrastive, instance and
every CLIP-KD term."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cid_ds.losses.clip import clip_loss
from cid_ds.losses.instance import instance_loss
from cid_ds.losses.kd import feature_distillation, gradient_distillation, relational_distillation
from tests.helpers import free_port

B, D = 4, 8
SCALE, TEACHER_SCALE = torch.tensor(10.0), 30.0
TERMS = {
    "clip": lambda s_img, s_txt, t_img, t_txt: clip_loss(s_img, s_txt, SCALE),
    "instance": lambda s_img, s_txt, t_img, t_txt: instance_loss(s_img, s_txt, t_img, t_txt, SCALE),
    "fd": lambda s_img, s_txt, t_img, t_txt: feature_distillation(s_img, t_img) + feature_distillation(s_txt, t_txt),
    "crd": lambda s_img, s_txt, t_img, t_txt: relational_distillation(s_img, s_txt, SCALE, t_img, t_txt,
                                                                      TEACHER_SCALE, temperature=2.0),
    "gd": lambda s_img, s_txt, t_img, t_txt: gradient_distillation(s_img, s_txt, SCALE, t_img, t_txt, TEACHER_SCALE),
}


def global_batch():
    g = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(2 * B, D, generator=g), dim=-1) for _ in range(4)]


def losses_and_grads(s_img, s_txt, t_img, t_txt):
    """Per term: (loss, gradient w.r.t. the student's [image; text] rows)."""
    out = {}
    for name, term in TERMS.items():
        img, txt = s_img.clone().requires_grad_(), s_txt.clone().requires_grad_()
        loss = term(img, txt, t_img, t_txt)
        loss.backward()
        out[name] = (loss.detach(), torch.cat([img.grad, txt.grad]))
    return out


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(rank * B, (rank + 1) * B)
    results = losses_and_grads(*(x[rows] for x in global_batch()))
    # DDP averages gradients over ranks and each rank's loss is a mean over its local rows (or, for GD, the
    # global loss itself): the average of the rank losses must equal the 1-rank loss, and the sum of every
    # rank's gradient contributions (through the gather) / world size must equal its gradient.
    for loss, _ in results.values():
        dist.all_reduce(loss)
    out[rank] = {name: (loss / 2, grads) for name, (loss, grads) in results.items()}
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_concatenated_batch():
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=2)
    one_rank = losses_and_grads(*global_batch())
    for name, (loss1, grads1) in one_rank.items():
        for rank in (0, 1):
            torch.testing.assert_close(out[rank][name][0], loss1, msg=name)
        # rank r's local rows: its gradient here is d(loss_r)/d(rows); the gathers carry the rest. What DDP
        # applies is the average over ranks of each rank's full-parameter gradient, i.e. d(mean loss)/d(rows).
        rank_grads = torch.stack([out[0][name][1], out[1][name][1]])
        expected = grads1.view(2, 2, B, D).transpose(0, 1).reshape(2, 2 * B, D)
        torch.testing.assert_close(rank_grads / 2, expected, msg=name)
