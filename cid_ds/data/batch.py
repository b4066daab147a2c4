"""The contract between the training loaders (cid_ds.data.wds_loader, cid_ds.data.dali_loader) and the
trainer: what a loader is asked for (``LoaderSpec``, with the ``SideData`` opened once for the run) and what
it yields (``Batch``, which the objective, cid_ds.objective, reads). cid_ds.data.loader is the trainer's door
to both loaders."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NotRequired, Optional, TypedDict

import torch

from cid_ds.data.damage import ShardDamage

if TYPE_CHECKING:
    from cid_ds.data.clusters import ClusterAssignments
    from cid_ds.data.features import FeatureCache
    from cid_ds.data.packed import PackedShards

MISSING_FEATURES = ("error", "skip")  # a key without cached features (or cluster ids): an error, or a counted skip


@dataclass(frozen=True)
class SideData:
    """What the loaders read besides the shards' own samples, opened and cross-checked once for a run
    (cid_ds.sources for the trainer, cid_ds.data.batch.open_side_data otherwise): the packed manifest of
    distill-ready shards, and the side folders joined to every sample by key."""
    packed: Optional[PackedShards] = None         # the shards' packed manifest; None: plain webdataset shards
    cache: Optional[FeatureCache] = None          # a teacher feature cache to join (it replaces packed embeddings)
    clusters: Optional[ClusterAssignments] = None  # cluster ids to join (None: none, or the shards carry them)
    missing_features: str = "error"               # MISSING_FEATURES: a key missing from either

    def __post_init__(self) -> None:
        if self.missing_features not in MISSING_FEATURES:
            raise ValueError(f"missing_features must be {' or '.join(map(repr, MISSING_FEATURES))}, "
                             f"got {self.missing_features!r}")

    @property
    def joins(self) -> bool:
        """Whether samples are joined with side folders by key (which only the webdataset loader does)."""
        return self.cache is not None or self.clusters is not None


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
    side: Optional[SideData] = None         # None: the shards' packed manifest, if any, opened by the loader

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def side_data(self) -> SideData:
        """``side``, or that of the shards alone (their packed manifest, if any)."""
        return self.side if self.side is not None else open_side_data(self.shards)

    def rank_shards(self) -> list[str]:
        """The shards this rank reads in this epoch, in order: ``shards[rank::world_size]``, shuffled by
        (seed, epoch, rank). Both loaders read them so, and split them over their readers."""
        shards = self.shards[self.rank::self.world_size]
        random.Random(f"{self.seed}:{self.epoch}:{self.rank}").shuffle(shards)
        return shards


def open_side_data(shards: list[str], features_dir: Optional[str] = None, clusters_dir: Optional[str] = None,
                   missing_features: str = "error") -> SideData:
    """``SideData`` for ``shards`` outside the trainer: their packed manifest if any, and the side folders
    given, checked to come from one teacher and one clustering (cid_ds.data.joins)."""
    from cid_ds.data.clusters import ClusterAssignments
    from cid_ds.data.features import FeatureCache
    from cid_ds.data.joins import check_join
    from cid_ds.data.packed import PackedShards, packed_manifest_path
    manifest = packed_manifest_path(shards)
    side = SideData(PackedShards(manifest) if manifest else None,
                    FeatureCache(features_dir) if features_dir is not None else None,
                    ClusterAssignments(clusters_dir) if clusters_dir is not None else None, missing_features)
    check_join(side.packed, side.cache, side.clusters)
    return side


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
