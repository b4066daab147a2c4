"""The batch both training loaders yield (cid_ds.data.wds_loader, cid_ds.data.dali_loader) and the objective
reads (cid_ds.objective). B samples; the trainer moves the tensors to its device and, with an online
teacher, fills ``t_img``/``t_txt`` itself."""
from __future__ import annotations

from typing import NotRequired, TypedDict

import torch

from cid_ds.data.damage import ShardDamage


class Batch(TypedDict):
    image: torch.Tensor                      # [B, 3, H, W], the student's normalisation (DALI: on the GPU with one)
    tokens: torch.Tensor                     # [B, L] int64, the student's tokenizer
    key: list[str]                           # the samples' webdataset keys
    n_skipped: int                           # samples skipped since the previous batch (bad image, empty caption)
    damaged_shards: list[ShardDamage]        # shards found damaged since the previous batch
    t_img: NotRequired[torch.Tensor]         # [B, Dt] teacher image embeddings (of the replayed view, if any)
    t_txt: NotRequired[torch.Tensor]         # [B, Dt] teacher text embeddings
    cluster: NotRequired[torch.Tensor]       # [B] int64 cluster ids, or [B, k] the top-k
    teacher_tokens: NotRequired[torch.Tensor]  # [B, L'] an online teacher's tokenizer
