"""The webdataset + PIL training loader.

Per DataLoader worker the pipeline is

  shards (split by rank, seeded shuffle, split by worker)
    -> raw samples (a damaged shard's up to the damage, cid_ds.data.damage)
    -> drop unusable (no caption; no cached features or cluster) and join both by key,
       or, from distill-ready shards (cid_ds.data.packed), read them from the sample itself
    -> seeded shuffle buffer -> skip the samples of already-trained batches (nothing decoded yet)
    -> decode + preprocess, or replay the epoch's stored view (corrupt images dropped)
    -> full batches, captions tokenised per batch

and the DataLoader takes batches from the workers round-robin.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cid_ds.data.batch import Batch, LoaderSpec, SideData
from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.damage import ShardDamage, carry_damage
from cid_ds.data.errors import DataError, pass_data_errors, raise_data_errors
from cid_ds.data.features import FeatureCache, shard_file, shard_stem
from cid_ds.data.packed import ARRAY_FIELDS, VIEW_ARRAYS, PackedShards, decode_array
from cid_ds.data.preprocess import ViewTransform, check_stored_views, image_spec, replay_slot, split_normalize
from cid_ds.data.samples import caption_of, decode_image, read_samples
from cid_ds.faults import ignore_stop_signals

def build_train_loader(spec: LoaderSpec) -> Iterable[Batch]:
    """One epoch of ``spec``'s full batches (cid_ds.data.batch): ``image``, ``tokens``, ``key``, ``n_skipped``,
    ``damaged_shards`` (the ShardDamage records read since the previous batch), ``teacher_tokens`` with a
    teacher tokenizer, and teacher targets and cluster ids when the shards carry them (distill-ready shards,
    cid_ds.data.packed) or when joined by key from ``spec.side``: ``t_img``/``t_txt`` from its feature cache,
    ``cluster`` from its cluster assignments; its ``missing_features`` applies to keys missing from either.

    With ``spec.replay_views`` > 0 each sample's stored view ``epoch % replay_views`` is cropped, flipped and
    resized to ``preprocess``'s size and normalisation, and ``t_img`` is that view's teacher embedding.

    ``spec.skip_batches`` is exact while every worker is still producing batches at batch N and the skipped
    span holds no corrupt image that the feature cache does not already list.
    """
    side = spec.side_data()
    cache, packed_shards = side.cache, side.packed
    packed = _packed_fields(packed_shards, spec.tokenizer, cache, side.clusters, spec.replay_views) \
        if packed_shards else {}
    if spec.replay_views:  # the views come from the side cache when one is joined, else from the packed shards
        if cache is not None:
            check_stored_views(spec.replay_views, cache.views, cache.manifest_path)
        else:
            check_stored_views(spec.replay_views, packed_shards.views if packed_shards else 0,
                               packed_shards.manifest_path if packed_shards else spec.shards[0])
    dataset = _EpochBatches(spec, side, packed)
    augment_seed = random.Random(f"augment:{spec.seed}:{spec.epoch}:{spec.rank}").getrandbits(63)
    loader = DataLoader(dataset, batch_size=None, num_workers=spec.workers, persistent_workers=False,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(augment_seed),
                        worker_init_fn=ignore_stop_signals)
    return carry_damage(raise_data_errors(loader))


def _packed_fields(packed: PackedShards, tokenizer: Callable, cache: Optional[FeatureCache],
                   clusters: Optional[ClusterAssignments], replay_views: int) -> dict[str, int]:
    """The array fields to read from distill-ready shards, with their lengths: a side cache or cluster
    folder given explicitly is joined instead, stored views are read only to replay them, and stored
    token ids are used only when they are what ``tokenizer`` makes (another student's tokenizer
    re-tokenises the captions)."""
    fields = packed.lengths()
    drop = set() if replay_views else set(VIEW_ARRAYS)
    drop |= {"t_img", "t_txt", *VIEW_ARRAYS} if cache is not None else set()
    drop |= {"cluster"} if clusters is not None else set()
    if not packed.tokens_usable(tokenizer):
        drop.add("tokens")
    return {name: length for name, length in fields.items() if name not in drop}


class _EpochBatches(IterableDataset):
    def __init__(self, spec: LoaderSpec, side: SideData, packed: dict[str, int]):
        super().__init__()
        self.spec = spec
        self.slot = replay_slot(spec.epoch, spec.replay_views) if spec.replay_views else None
        # per image: decode and geometry to uint8 pixels; per batch: scaling and normalisation
        self.view_transform = ViewTransform(image_spec(spec.preprocess)) if spec.replay_views else None
        self.pixels, self.normalize = (None, self.view_transform.normalize) if spec.replay_views \
            else split_normalize(spec.preprocess)
        self.cache, self.clusters, self.missing_features = side.cache, side.clusters, side.missing_features
        self.packed = packed
        self.n_skipped = 0  # per worker process: samples dropped since the last batch
        self.damaged: list[ShardDamage] = []  # per worker process: damaged shards read since the last batch

    def __iter__(self) -> Iterator[dict]:
        self.n_skipped, self.damaged = 0, []
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        spec = self.spec
        rank_shards = spec.rank_shards()
        # Workers beyond the shard count get nothing and drop out of the DataLoader's round-robin.
        producing = min(workers, len(rank_shards))
        if worker >= producing:
            return
        # The DataLoader asks worker 0 first, so after skipping k batches worker w plays the part of
        # worker (w + k) % producing of the unskipped epoch, which made batch k + w.
        role = (worker + spec.skip_batches) % producing
        role_skip = len(range(role, spec.skip_batches, producing))

        samples = self._usable(read_samples(rank_shards[role::producing], self.damaged))
        rng = random.Random(f"{spec.seed}:{spec.epoch}:{spec.rank}:{role}")
        samples = wds.shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=rng)(samples)
        samples = itertools.islice(samples, role_skip * spec.batch_size, None)
        augment = random.Random(f"augment:{spec.seed}:{spec.epoch}:{spec.rank}:{role}")
        yield from pass_data_errors(self._batches(samples, augment))
        if self.damaged:
            yield {"damaged_shards": self.damaged}

    def _usable(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["caption"] = caption_of(sample)
            self._read_packed(sample)
            if sample["caption"] is None or not (self._join_features(sample) and self._join_clusters(sample)):
                self.n_skipped += 1
                continue
            yield sample

    def _read_packed(self, sample: dict) -> None:
        """Decode the packed arrays this loader uses; drop the raw bytes of those it joins or re-makes;
        when replaying, take the epoch's view."""
        where = f"shard {sample['__url__']} key {sample['__key__']}"
        for name in ARRAY_FIELDS.keys() - self.packed.keys():
            sample.pop(name, None)
        for name, length in self.packed.items():
            if name not in sample:
                raise DataError(f"{where}: field '.{name}' is missing (the packed manifest promises it)")
            sample[name] = decode_array(sample[name], name, length, where)
        if "v_img" in sample:
            views = len(sample["v_box"]) // 5
            sample["t_img"] = sample.pop("v_img").reshape(views, -1)[self.slot]
            sample["view"] = sample.pop("v_box").reshape(views, 5)[self.slot]

    def _join_features(self, sample: dict) -> bool:
        if self.cache is None:
            return True
        found = self._find_row(self.cache, ("feature cache", "the cache"), sample)
        if found is not None:
            features, row = found
            sample["t_img"], sample["t_txt"] = features.image[row], features.text[row]
            if self.slot is not None:
                sample["t_img"], sample["view"] = features.view_image[row, self.slot], features.view_box[row, self.slot]
        return found is not None

    def _join_clusters(self, sample: dict) -> bool:
        if self.clusters is None:
            return True
        found = self._find_row(self.clusters, ("cluster assignments", "the assignments"), sample)
        if found is not None:
            assignments, row = found
            sample["cluster"] = assignments.ids[row]
        return found is not None

    def _find_row(self, source: Union[FeatureCache, ClusterAssignments], names: tuple[str, str],
                  sample: dict) -> Optional[tuple[object, int]]:
        """``(shard entry, row)`` of the sample in a FeatureCache or ClusterAssignments, None to skip it."""
        stem, key = shard_stem(sample["__url__"]), sample["__key__"]
        shard = source.lookup(stem)
        if shard is not None and key in shard.row:
            return shard, shard.row[key]
        if shard is not None and key in shard.skipped:
            return None  # the extractor found it unusable too
        if self.missing_features == "skip":
            return None
        problem = f"no file {shard_file(source.dir, stem)}" if shard is None else f"key not in {names[1]}"
        raise DataError(f"{names[0]} {source.dir}: shard {stem} ({sample['__url__']}) key {key}: "
                         f"{problem} (data.missing_features='skip' skips such samples)")

    def _batches(self, samples: Iterator[dict], augment: random.Random) -> Iterator[dict]:
        batch = []
        for sample in samples:
            image = decode_image(sample)
            if image is None:
                self.n_skipped += 1
                continue
            replayed = self.view_transform is not None
            sample["image"] = self.view_transform.pixels(image, sample["view"]) if replayed \
                else self.pixels(image, augment)
            batch.append(sample)
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch)
                batch = []

    def _collate(self, batch: list[dict]) -> Batch:
        captions = [s["caption"] for s in batch]
        stacked = {name: np.stack([s[name] for s in batch]) for name in ("tokens", "t_img", "t_txt", "cluster")
                   if name in batch[0]}
        images = torch.stack([s["image"] for s in batch])
        out = {
            "image": self.normalize(images) if self.normalize is not None else images,
            "tokens": torch.from_numpy(stacked["tokens"].astype(np.int64)) if "tokens" in stacked
            else self.spec.tokenizer(captions),
            "key": [s["__key__"] for s in batch],
            "n_skipped": self.n_skipped,
            "damaged_shards": list(self.damaged),
        }
        if self.spec.teacher_tokenizer is not None:
            out["teacher_tokens"] = self.spec.teacher_tokenizer(captions)
        for name in ("t_img", "t_txt"):
            if name in stacked:
                out[name] = torch.from_numpy(stacked[name].astype(np.float32))
        if "cluster" in stacked:
            ids = torch.from_numpy(stacked["cluster"].astype(np.int64))
            out["cluster"] = ids[:, 0] if ids.shape[1] == 1 else ids
        self.n_skipped = 0
        self.damaged.clear()  # in place: the shard reader appends to this list
        return out
