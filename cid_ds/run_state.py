"""One training run's state as the loop carries it: what a step, a logging window, a checkpoint and a resume
read and change. Built once by ``cid_ds.train`` after the engine; everything after takes the ``Run``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from cid_ds.config import Config
from cid_ds.engine import compute_dtype
from cid_ds.step_guard import StepGuard

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from cid_ds.losses.cluster import ClusterDiscrimination
    from cid_ds.losses.ensemble import TeacherTargets


class DataPosition:
    """Where this rank is in the data: epoch and batches consumed in it. Saved per rank beside each
    checkpoint so a resume continues the same batch sequence (the loader's order is a function of
    seed, epoch, rank and worker count)."""

    def __init__(self, epoch: int = 0, batch_in_epoch: int = 0):
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


@dataclass
class Window:
    """A logging window's host-side counts (its losses are summed on the device, by the ``StepGuard``)."""
    t0: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0  # seconds spent waiting for the loader
    steps: int = 0
    skipped: int = 0        # samples the loader passed over (damaged or unreadable)


@dataclass
class Run:
    cfg: Config
    engine: Any  # the DeepSpeed engine (cid_ds.engine.build_engine)
    guard: Optional[StepGuard]
    rank: int = 0
    world_size: int = 1
    cluster_term: Optional[ClusterDiscrimination] = None
    targets: Optional[TeacherTargets] = None  # how the teacher terms read the teacher's embeddings
    step: int = 0  # steps taken: the next step's index
    position: DataPosition = field(default_factory=DataPosition)
    writer: Optional[SummaryWriter] = None  # rank 0's TensorBoard
    window: Window = field(default_factory=Window)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.engine)
