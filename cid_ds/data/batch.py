"""The contract between the training loaders (cid_ds.data.wds_loader, cid_ds.data.dali_loader) and the
trainer: what a loader is asked for (``LoaderSpec``) and what it yields (``Batch``, which the objective,
cid_ds.objective, reads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NotRequired, Optional, TypedDict

import torch

from cid_ds.data.damage import ShardDamage


@dataclass(frozen=True)
class LoaderSpec:
    """One epoch of one rank's full batches. The sequence is fixed by (seed, epoch, rank, workers)."""
    shards: list[str]
    preprocess: Callable                    # the student's image transform (size, normalisation, augmentation)
    tokenizer: Callable                     # the student's tokenizer
    batch_size: int
    workers: int = 0                        # webdataset: DataLoader worker processes; DALI: CPU threads
    epoch: int = 0
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    shuffle_buffer: int = 1000
    skip_batches: int = 0                   # resume inside the epoch: the first N batches are not decoded
    teacher_tokenizer: Optional[Callable] = None  # an online teacher's: batches carry ``teacher_tokens``
    replay_views: int = 0                   # > 0: replay stored view ``epoch % replay_views`` (cid_ds.data.preprocess)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class Batch(TypedDict):
    """B samples. The trainer moves the tensors to its device into a batch of its own and, with an online
    teacher, adds ``t_img``/``t_txt`` there."""
    image: torch.Tensor                      # [B, 3, H, W], the student's normalisation (DALI: on the GPU with one)
    tokens: torch.Tensor                     # [B, L] int64, the student's tokenizer
    key: list[str]                           # the samples' webdataset keys
    n_skipped: int                           # samples skipped since the previous batch (bad image, empty caption)
    damaged_shards: list[ShardDamage]        # shards found damaged since the previous batch
    t_img: NotRequired[torch.Tensor]         # [B, Dt] teacher image embeddings (of the replayed view, if any)
    t_txt: NotRequired[torch.Tensor]         # [B, Dt] teacher text embeddings
    cluster: NotRequired[torch.Tensor]       # [B] int64 cluster ids, or [B, k] the top-k
    teacher_tokens: NotRequired[torch.Tensor]  # [B, L'] an online teacher's tokenizer
