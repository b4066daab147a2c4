"""The trainer's one door to the training loaders: which loader reads the run's shards (``resolve_backend``),
its batches epoch after epoch from a data position (``batches``), and, in the loaders' own terms of how shards
split over ranks and readers (``LoaderSpec.rank_shards``, ``readers_per_rank``), what goes wrong when the data
is too small for them (``idle_readers``, ``no_full_batch``)."""
from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

import torch

from cid_ds.data.batch import Batch, LoaderSpec
from cid_ds.data.errors import DataError

if TYPE_CHECKING:
    from cid_ds.config import DataConfig
    from cid_ds.run_state import DataPosition

BACKENDS = ("auto", "dali", "wds")  # data.backend


def resolve_backend(backend: str, spec: LoaderSpec) -> str:
    """``data.backend`` -> "dali" or "wds". "auto" is DALI on a GPU for packed shards with nothing to join from
    side folders, the webdataset loader otherwise; "dali" where DALI cannot serve is an error."""
    side = spec.side_data()
    servable = side.packed is not None and not side.joins
    if backend == "dali" and not servable:
        raise DataError("data.backend=dali reads distill-ready shards (data_tools.pack) with everything in them: "
                        f"{spec.shards[:1]} has no packed manifest.json beside it, or data.features / cluster.dir "
                        "asks for a join from a side folder; use data.backend=wds (or auto)")
    if backend != "auto":
        return backend
    return "dali" if servable and torch.cuda.is_available() and importlib.util.find_spec("nvidia.dali") else "wds"


def epoch_loader(spec: LoaderSpec, backend: str) -> Iterable[Batch]:
    """One epoch of ``spec``'s batches from the ``backend`` loader."""
    if backend == "dali":
        from cid_ds.data.dali_loader import build_dali_loader
        return build_dali_loader(spec)
    from cid_ds.data.wds_loader import build_train_loader
    return build_train_loader(spec)


def batches(spec: LoaderSpec, data: DataConfig, position: DataPosition) -> Iterator[Batch]:
    """Endless batches, epoch after epoch, starting at ``position``; updates ``position`` as it goes.
    ``spec``: what every epoch reads (its epoch and skip_batches come from ``position``), with its side data
    opened once here for every epoch. ``data.backend`` picks the loader."""
    spec = replace(spec, side=spec.side_data())
    backend = resolve_backend(data.backend, spec)
    warning = idle_readers(spec, backend)
    if warning is not None and spec.rank == 0:
        print(f"[cid_ds] warning: {warning}", flush=True)
    while True:
        produced = False
        for batch in epoch_loader(replace(spec, epoch=position.epoch, skip_batches=position.batch_in_epoch), backend):
            produced = True
            position.batch_in_epoch += 1
            yield batch
        if not produced and position.batch_in_epoch == 0:
            raise DataError(no_full_batch(spec, backend, data))
        position.epoch, position.batch_in_epoch = position.epoch + 1, 0


def readers_per_rank(spec: LoaderSpec, backend: str) -> int:
    """How many readers split a rank's shards: the webdataset loader's DataLoader workers, each reading whole
    shards of its own; DALI reads one stream per rank."""
    return 1 if backend == "dali" else max(1, spec.workers)


def idle_readers(spec: LoaderSpec, backend: str) -> Optional[str]:
    """What goes wrong when the shards are fewer than the loader's readers over every rank, or None."""
    per_rank = readers_per_rank(spec, backend)
    readers = spec.world_size * per_rank
    if len(spec.shards) >= readers:
        return None
    return (f"{len(spec.shards)} shards for {spec.world_size} ranks x {per_rank} loader workers = {readers} readers: "
            "the readers without a shard sit idle" + (", and a rank without one has no batch to train on"
                                                      if len(spec.shards) < spec.world_size else "") +
            f"; pack more shards (data_tools.pack --ranks {spec.world_size} --workers {per_rank}) or lower "
            "data.workers")


def no_full_batch(spec: LoaderSpec, backend: str, data: DataConfig) -> str:
    """Why an epoch of this rank gave no full batch: what the data holds (and what a balance removed), what a
    step takes, and how the shards split over ranks and loader readers."""
    from cid_ds.sources import data_size
    size = data_size(spec.shards, data.features)
    rank_shards = spec.rank_shards()
    if not rank_shards:
        split = f"this rank has none of the {len(spec.shards)} shards"
    else:
        held = size.samples(rank_shards)
        split = f"this rank reads {len(rank_shards)} of the {len(spec.shards)} shards"
        if held is not None:
            split += f", holding {held} samples"
        workers = min(readers_per_rank(spec, backend), len(rank_shards))
        if workers > 1:
            split += (f", split over {workers} DataLoader workers (data.workers), each of which fills whole batches "
                      "from its own shards only")
            if held is not None:
                split += f" (about {held // workers} samples each)"
    return (f"rank {spec.rank}: an epoch gave no full batch of data.batch_size {spec.batch_size}. The data: "
            f"data.train_shards {data.train_shards}, {size.describe(spec.shards)}. A step takes {spec.batch_size} x "
            f"{spec.world_size} ranks = {spec.batch_size * spec.world_size} samples, and each rank fills its batches "
            f"from its own shards, shards[rank::{spec.world_size}]: {split}. Use more data, a smaller "
            "data.batch_size, or fewer ranks or data.workers")
