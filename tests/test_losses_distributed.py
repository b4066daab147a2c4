"""With 2 ranks (real torch.distributed, gloo), each rank's contrastive losses over the gathered global
batch give the same loss and the same gradients as 1 rank on the concatenated batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cid_ds.losses.clip import clip_loss
from cid_ds.losses.instance import instance_loss

B, D = 4, 8


def global_batch():
    g = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(2 * B, D, generator=g), dim=-1) for _ in range(4)]


def losses_and_grads(s_img, s_txt, t_img, t_txt):
    s_img, s_txt = s_img.clone().requires_grad_(), s_txt.clone().requires_grad_()
    scale = torch.tensor(10.0)
    clip = clip_loss(s_img, s_txt, scale)
    inst = instance_loss(s_img, s_txt, t_img, t_txt, scale)
    (clip + inst).backward()
    return clip.detach(), inst.detach(), s_img.grad, s_txt.grad


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(rank * B, (rank + 1) * B)
    s_img, s_txt, t_img, t_txt = (x[rows] for x in global_batch())
    clip, inst, g_img, g_txt = losses_and_grads(s_img, s_txt, t_img, t_txt)
    # DDP averages gradients over ranks and each rank's loss is a mean over its local rows; the
    # 1-rank loss is the mean over all rows: so the average of the rank losses must equal it, and the
    # sum of every rank's gradient contributions (through the gather) / world size must equal its gradient.
    for t in (clip, inst):
        dist.all_reduce(t)
    grads = torch.cat([g_img, g_txt])
    out[rank] = (clip / 2, inst / 2, grads)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_rank_on_the_concatenated_batch():
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=2)
    clip1, inst1, g_img1, g_txt1 = losses_and_grads(*global_batch())
    for rank in (0, 1):
        clip2, inst2, _ = out[rank]
        torch.testing.assert_close(clip2, clip1)
        torch.testing.assert_close(inst2, inst1)
    # rank r's local rows: its gradient here is d(loss_r)/d(rows); the gathers carry the rest. What DDP
    # applies is the average over ranks of each rank's full-parameter gradient, i.e. d(mean loss)/d(rows).
    rank_grads = torch.stack([out[0][2], out[1][2]])
    expected = torch.cat([g_img1, g_txt1]).view(2, 2, B, D).transpose(0, 1).reshape(2, 2 * B, D)
    torch.testing.assert_close(rank_grads / 2, expected)
