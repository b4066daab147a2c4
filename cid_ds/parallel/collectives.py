"""Collectives the losses need. Single-process runs (no process group) pass tensors through."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; backward sends each chunk's gradient to its owner."""
    if world()[1] == 1:
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (targets: cached teacher embeddings)."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
