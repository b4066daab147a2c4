"""Embed every sample once with the teacher and write the feature cache (see cid_ds.data.features).

  python -m data_tools.extract --shards '/data/{00000..00041}.tar' --teacher ViT-L-14 \\
      --pretrained laion400m_e32 --out runs/feats [--batch-size 256] [--workers 2] [--device auto] \\
      [--backend auto] [--views K [--view-scale 0.9 1.0] [--no-view-flip] [--view-seed 0]] \\
      [--teacher ViT-B-16 --pretrained datacomp_xl_s13b_b90k ...]

Images are embedded in the eval view (the teacher's preprocess_val), captions through its tokenizer.
``--views K`` also embeds K random-resized-crop (+ flip) views of each image, drawn from a seeded RNG
(cid_ds.data.preprocess.draw_views), and stores each view's box and flip beside its embedding: the
loaders replay them (``data.views: replay``). Repeating ``--teacher`` (with a ``--pretrained`` each, or
none at all) extracts an ensemble: each row concatenates every teacher's normalised embedding. What the
cache will take on disk is printed before work starts and recorded in the manifest.
Images are decoded by PIL in ``--workers`` processes (``--backend wds``) or by DALI with ``--workers``
threads, nvJPEG on a GPU (``--backend dali``, one teacher without views; ``auto``: DALI when it can
serve and the device is a GPU).
Shards whose .npz exists are skipped, so a re-run resumes. A damaged shard (cid_ds.data.damage) gives
the rows of the samples before the damage, records the damage in its .npz and the manifest, and is done;
more damaged shards than ``--max-damaged-fraction`` accepts stop the run (their files are removed, so a
re-run after fixing the cause reads them again). Under torchrun or the deepspeed launcher
(RANK/WORLD_SIZE set) each rank takes shards[rank::world] on cuda:LOCAL_RANK; whichever rank finds
every shard file present at its end writes the complete manifest.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import tarfile
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION, DamageBudget, TooMuchDamage
from cid_ds.data.errors import DataError, pass_data_errors, raise_data_errors
from cid_ds.data.features import (FINGERPRINT_FIELDS, shard_file, shard_stem, stems_by_shard,
                                  teacher_mismatches, teacher_set, views_entry, write_complete_manifest, write_shard,
                                  write_started_manifest)
from cid_ds.data.preprocess import ViewTransform, draw_views, image_spec
from cid_ds.data.samples import caption_of, decode_image, read_samples
from cid_ds.io import MANIFEST, manifest_to_continue
from cid_ds.teacher import load_teacher
from data_tools.options import flag, run_stage, shard_paths
from data_tools.spread import Share, process_device


@dataclass(frozen=True)
class TeacherInput:
    """What a loader worker makes for one teacher: its eval view, its view replay and its tokens."""
    preprocess: Callable
    view_transform: ViewTransform
    tokenizer: Callable


@dataclass(frozen=True)
class Views:
    """How many augmented views to draw per image, and how (``draw_views``)."""
    count: int = 0
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    def draw(self, image, key: str) -> np.ndarray:
        return draw_views(image.width, image.height, self.count, key, self.seed, self.scale, self.ratio, self.flip)

    def manifest_entry(self, embed_dim: int) -> dict:
        """The cache manifest's ``views`` (as JSON reads it back: lists, not tuples)."""
        return views_entry(self.count, embed_dim, {"scale": list(self.scale), "ratio": list(self.ratio),
                                                   "flip": self.flip, "seed": self.seed})


@dataclass(frozen=True, kw_only=True)
class ExtractOptions:
    """What data_tools.extract is asked: its flags, with their defaults."""
    shards: list[str] = flag(help="webdataset tars: brace pattern or glob", parse=shard_paths)
    teacher: str | Sequence[str] = flag(
        help="open_clip name, local-dir:PATH or ds_configs/models name; repeat for an ensemble", action="append")
    pretrained: Optional[str] | Sequence[Optional[str]] = flag(
        None, "open_clip pretrained tag or checkpoint file (one per --teacher, in order)", action="append")
    random_teacher_ok: bool = flag(False, "a teacher without trained weights is meant (tests, benchmarks); "
                                          "otherwise refused")
    out: str = flag(help="feature cache folder")
    batch_size: int = flag(256)
    workers: int = flag(2, "DataLoader workers decoding images")
    device: str = flag("auto", "auto (cuda:LOCAL_RANK when available), cpu, cuda:N")
    backend: str = flag("auto", "image decoding: PIL in worker processes (wds), DALI (dali; nvJPEG on a GPU; one "
                                "teacher, no views), auto: dali on a GPU where it can serve, else wds",
                        choices=("auto", "wds", "dali"))
    views: int = flag(0, "augmented views embedded per image, besides the eval view")
    view_scale: tuple[float, float] = flag((0.9, 1.0), "the views' crop area, as a fraction of the image (open_clip "
                                                       "trains with 0.9 1.0)", type=float, nargs=2,
                                           metavar=("MIN", "MAX"))
    view_flip: bool = flag(True, "do not flip half of the views horizontally", names=("--no-view-flip",),
                           action="store_false")
    view_seed: int = flag(0)
    max_damaged_fraction: float = flag(DEFAULT_MAX_DAMAGED_FRACTION,
                                       "damaged shards (empty, cut, not a tar) are recorded and skipped past their "
                                       "damage; more than this fraction of them (at least one is accepted) stops "
                                       "the run")

    def teachers(self) -> list[tuple[str, Optional[str]]]:
        """``(spec, pretrained)`` of each teacher: one, or an ensemble."""
        specs = [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)
        weights = [self.pretrained] * len(specs) if self.pretrained is None or isinstance(self.pretrained, str) \
            else list(self.pretrained)
        if len(weights) != len(specs):
            raise ValueError(f"{len(specs)} --teacher but {len(weights)} --pretrained: give one per teacher, or none")
        return list(zip(specs, weights))

    def drawn_views(self) -> Views:
        return Views(self.views, tuple(self.view_scale), flip=self.view_flip, seed=self.view_seed)

    def check(self) -> None:
        teachers = self.teachers()
        if self.views < 0:
            raise ValueError(f"views must be >= 0, got {self.views}")
        if self.views and not 0 < self.view_scale[0] <= self.view_scale[1] <= 1:
            raise ValueError(f"view scale must satisfy 0 < min <= max <= 1 (a fraction of the image), got "
                             f"{tuple(self.view_scale)}")
        if self.backend == "dali" and (len(teachers) > 1 or self.views):
            raise ValueError("--backend dali extracts one teacher without views; use --backend wds")

    def on_this_process(self) -> ExtractOptions:
        """The options with ``auto`` resolved: the device this process's GPU when there is one, else the CPU
        (data_tools.spread.process_device); the backend ``auto_backend``'s."""
        device = process_device(self.device)
        backend = self.backend if self.backend != "auto" else auto_backend(device, len(self.teachers()), self.views)
        return replace(self, device=device, backend=backend)


@dataclass(frozen=True)
class Teachers:
    """The loaded teachers whose embeddings a cache's rows concatenate: their models, what a loader worker makes
    for each, and the manifest's teacher entry for the set."""
    models: list
    inputs: list[TeacherInput]
    info: dict


class _ShardBatches(IterableDataset):
    """Per worker, whole shards: a shard's batches, then its last (possibly empty) one with ``done``
    set, the keys that were skipped and the shard's ``damage`` (None when whole)."""

    def __init__(self, shards: list[str], teachers: list[TeacherInput], views: Views, batch_size: int):
        super().__init__()
        self.shards, self.teachers, self.views, self.batch_size = shards, teachers, views, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.shards[worker::workers]
        yield from pass_data_errors(batch for shard in shards for batch in self._shard_batches(shard))

    def _shard_batches(self, shard: str) -> Iterator[dict]:
        seen: set[str] = set()
        samples, corrupt_image, missing_caption, damaged = [], [], [], []
        for sample in read_samples([shard], damaged):
            key = sample["__key__"]
            _check_unique(shard, key, seen)
            caption = caption_of(sample)
            if caption is None:
                missing_caption.append(key)
                continue
            image = decode_image(sample)
            if image is None:
                corrupt_image.append(key)
                continue
            samples.append((key, image, caption))
            if len(samples) == self.batch_size:
                yield self._batch(shard, samples)
                samples = []
        yield dict(self._batch(shard, samples), done=True, corrupt_image=corrupt_image,
                   missing_caption=missing_caption, damage=damaged[0] if damaged else None)

    def _batch(self, shard: str, samples: list[tuple[str, object, str]]) -> dict:
        """Per teacher: eval-view images [B,3,H,W], view images [B,K,3,H,W] and tokens; the boxes [B,K,5]."""
        keys = [key for key, _, _ in samples]
        captions = [caption for _, _, caption in samples]
        boxes = [self.views.draw(image, key) for key, image, _ in samples]
        inputs = []
        for teacher in self.teachers:
            images = [teacher.preprocess(image) for _, image, _ in samples]
            views = [torch.stack([teacher.view_transform(image, view) for view in box])
                     for (_, image, _), box in zip(samples, boxes)] if self.views.count else []
            inputs.append({"image": torch.stack(images) if images else None,
                           "views": torch.stack(views) if views else None,
                           "tokens": teacher.tokenizer(captions) if captions else None})
        return {"shard": shard, "keys": keys, "done": False, "teachers": inputs,
                "view_box": np.stack(boxes) if boxes and self.views.count else None}


def _check_unique(shard: str, key: str, seen: set[str]) -> None:
    if key in seen:
        raise DataError(f"shard {shard}: key {key} appears twice; cached features are looked up by key")
    seen.add(key)


def _dali_shard_batches(shards: list[str], teacher: TeacherInput, batch_size: int, threads: int,
                        device: torch.device) -> Iterator[dict]:
    """What ``_ShardBatches`` yields for one teacher without views, decoded by DALI (nvJPEG on a GPU
    ``device``), a shard at a time."""
    from cid_ds.data.dali_loader import read_shard
    from cid_ds.data.shard_index import NO_CAPTION
    device_id = None if device.type != "cuda" else torch.cuda.current_device() if device.index is None else device.index

    def batch(shard: str, keys: list[str], images: Optional[torch.Tensor], captions: list[str]) -> dict:
        tokens = teacher.tokenizer(captions) if captions else None
        return {"shard": shard, "keys": keys, "done": False, "view_box": None,
                "teachers": [{"image": images, "views": None, "tokens": tokens}]}

    for shard in shards:
        index, batches = read_shard(shard, teacher.preprocess, batch_size, threads, device_id)
        seen: set[str] = set()
        for keys, images, captions in batches:
            for key in keys:
                _check_unique(shard, key, seen)
            yield batch(shard, keys, images, captions)
        yield dict(batch(shard, [], None, []), done=True,
                   corrupt_image=[key for key, why in index.skipped.items() if why != NO_CAPTION],
                   missing_caption=[key for key, why in index.skipped.items() if why == NO_CAPTION],
                   damage=index.damage)


def _normalized(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=-1).half().cpu().numpy()


def _embed(models: list, item: dict, device: torch.device) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``(image [B,D], text [B,D], views [B,K,D] or None)``: each teacher's normalised embeddings,
    concatenated along D in teacher order."""
    image, text, views = [], [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        for model, inputs in zip(models, item["teachers"]):
            image.append(_normalized(model.encode_image(inputs["image"].to(device, non_blocking=True))))
            text.append(_normalized(model.encode_text(inputs["tokens"].to(device, non_blocking=True))))
            if inputs["views"] is not None:
                b, k = inputs["views"].shape[:2]
                flat = model.encode_image(inputs["views"].flatten(0, 1).to(device, non_blocking=True))
                views.append(_normalized(flat).reshape(b, k, -1))
    return (np.concatenate(image, -1), np.concatenate(text, -1),
            np.concatenate(views, -1) if views else None)


def _check_existing_manifest(out_dir: str, teacher: dict, views: dict) -> None:
    path, manifest = os.path.join(out_dir, MANIFEST), manifest_to_continue(out_dir)
    if manifest is None:
        return
    cached = manifest.get("teacher", {})
    lines = teacher_mismatches(f"feature cache {path}", cached, {f: teacher.get(f) for f in FINGERPRINT_FIELDS})
    cached_views = manifest.get("views", views_entry(0, int(cached.get("embed_dim") or 0)))
    lines += [f"feature cache {path}: views.{field} is {cached_views.get(field)} but this run asks for {want}"
              for field, want in views.items() if field != "bytes_per_sample" and cached_views.get(field) != want]
    if lines:
        raise ValueError("\n".join(lines) + f"\nrefusing to mix two teacher sets or view settings in one cache: "
                         f"use another --out or delete {out_dir}")


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def estimated_samples(shards: list[str]) -> int:
    """The first shard's sample count times the number of shards (read from tar headers only; a
    damaged first shard counts up to the damage, which reading it reports)."""
    keys = set()
    try:
        with tarfile.open(shards[0]) as tar:
            keys.update(base_plus_ext(member.name)[0] for member in tar if member.isfile())
    except (tarfile.TarError, OSError, EOFError):
        pass
    return len(keys) * len(shards)


def auto_backend(device: str, teachers: int, views: int) -> str:
    """DALI on a GPU where it serves (one teacher, no views, nvidia-dali installed), else PIL (wds)."""
    serves = teachers == 1 and views == 0 and importlib.util.find_spec("nvidia.dali") is not None
    return "dali" if torch.device(device).type == "cuda" and serves else "wds"


def extract(options: ExtractOptions, share: Share = Share()) -> dict:
    """Write ``share``'s part of the feature cache (data_tools.spread: every ``world``-th shard); returns what it did
    (``extracted``/``skipped`` shard stems, ``samples``, ``samples_per_s``, ``bytes_per_sample``) and ``manifest``
    once the cache is complete (else None). ``backend``: "wds" (PIL in ``workers`` processes) or "dali" (``workers``
    DALI threads; one teacher, no views). ``random_teacher_ok``: a teacher without trained weights is meant (tests,
    benchmarks), else refused. ``damaged``: the damaged shards this run read (ShardDamage as dicts); more of them
    than ``max_damaged_fraction`` of all the shards accepts raise TooMuchDamage (cid_ds.data.damage)."""
    options.check()
    options = options.on_this_process()
    shards, out_dir = options.shards, options.out
    # the allowance of all the shards, not of this rank's share: a rank's share is small, and by chance one
    # rank of many would pass a share's allowance at half the threshold's rate (cid_ds.data.damage.RunDamage)
    budget = DamageBudget(len(shards), options.max_damaged_fraction, "--max-damaged-fraction")
    stems_by_shard(shards)  # unique names, or an error naming both shards
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    loaded = [load_teacher(spec, weight, options.device, options.random_teacher_ok)
              for spec, weight in options.teachers()]
    info = teacher_set([teacher_info for _, _, _, teacher_info in loaded])
    views = options.drawn_views()
    drawn = views.manifest_entry(int(info["embed_dim"]))
    _check_existing_manifest(out_dir, info, drawn)
    write_started_manifest(out_dir, info, drawn)

    mine = share.mine(shards)
    todo = [path for path in mine if not os.path.isfile(shard_file(out_dir, shard_stem(path)))]
    for path in todo:  # temp files left by a crash mid-write
        for tmp in glob.glob(glob.escape(shard_file(out_dir, shard_stem(path))) + ".tmp*"):
            os.remove(tmp)
    if todo and share.rank == 0:
        estimate = estimated_samples(shards)
        print(f"extract: {drawn['bytes_per_sample']} bytes per sample ({len(loaded)} teacher(s), {views.count} "
              f"views) x ~{estimate} samples = ~{size(drawn['bytes_per_sample'] * estimate)} in {out_dir}", flush=True)

    samples, start = 0, time.time()
    if todo:
        workers = min(options.workers, len(todo))
        threads = torch.get_num_threads()
        if torch.device(options.device).type == "cpu":  # leave the decoding workers their cores
            torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) - workers)))
        teachers = Teachers([model for model, _, _, _ in loaded],
                            [TeacherInput(preprocess, ViewTransform(image_spec(preprocess)), tokenizer)
                             for _, preprocess, tokenizer, _ in loaded], info)
        try:
            samples = _run(teachers, replace(options, workers=workers), todo, budget, share)
        finally:
            torch.set_num_threads(threads)
    seconds = time.time() - start

    manifest = write_complete_manifest(out_dir, shards, info, drawn)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if share.rank == 0:
            manifest = write_complete_manifest(out_dir, shards, info, drawn)
    return {"extracted": [shard_stem(p) for p in todo],
            "skipped": [shard_stem(p) for p in mine if p not in todo],
            "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds if samples else 0.0,
            "bytes_per_sample": drawn["bytes_per_sample"], "manifest": manifest,
            "damaged": [record.as_dict() for record in budget.damaged.values()]}


def _run(teachers: Teachers, options: ExtractOptions, todo: list[str], budget: DamageBudget, share: Share) -> int:
    """Embed the shards in ``todo``, writing each one's file as soon as its last batch is embedded; a
    damaged shard's file records its damage, which ``budget`` counts."""
    try:
        return _embed_shards(teachers, options, todo, budget, share)
    except TooMuchDamage as e:
        for record in budget.damaged.values():
            if os.path.isfile(shard_file(options.out, shard_stem(record.shard))):
                os.remove(shard_file(options.out, shard_stem(record.shard)))
        raise TooMuchDamage(f"{e}\nthe damaged shards' files in {options.out} were removed: a re-run reads them "
                            "again") from None


def _embed_shards(teachers: Teachers, options: ExtractOptions, todo: list[str], budget: DamageBudget,
                  share: Share) -> int:
    device, views = torch.device(options.device), options.drawn_views()
    if options.backend == "dali":
        loader = _dali_shard_batches(todo, teachers.inputs[0], options.batch_size, options.workers, device)
    else:
        loader = DataLoader(_ShardBatches(todo, teachers.inputs, views, options.batch_size), batch_size=None,
                            num_workers=options.workers, pin_memory=device.type == "cuda")
    pending: dict[str, dict] = {}
    samples = written = 0
    dim = int(teachers.info["embed_dim"])
    with tqdm(desc=f"extract rank {share.rank}" if share.world > 1 else "extract", unit="img",
              disable=share.rank != 0, postfix={"shards": f"0/{len(todo)}"}) as bar:
        for item in raise_data_errors(loader):
            acc = pending.setdefault(item["shard"], {"keys": [], "image": [], "text": [], "views": [], "box": []})
            if item["keys"]:
                image, text, view_image = _embed(teachers.models, item, device)
                acc["keys"] += item["keys"]
                acc["image"].append(image)
                acc["text"].append(text)
                if views.count:
                    acc["views"].append(view_image)
                    acc["box"].append(item["view_box"])
                samples += len(item["keys"])
                bar.update(len(item["keys"]))
            if item["done"]:
                del pending[item["shard"]]
                if item["damage"] is not None:
                    budget.add(item["damage"])
                stacked = {name: np.concatenate(acc[name]) if acc[name] else np.zeros((0, *shape), dtype)
                           for name, shape, dtype in (("image", (dim,), np.float16), ("text", (dim,), np.float16),
                                                      ("views", (views.count, dim), np.float16),
                                                      ("box", (views.count, 5), np.int32))}
                write_shard(options.out, shard_stem(item["shard"]), acc["keys"], stacked["image"], stacked["text"],
                            item["corrupt_image"], item["missing_caption"], teachers.info["weights_sha256"],
                            **({"view_image": stacked["views"], "view_box": stacked["box"]} if views.count else {}),
                            damage=item["damage"])
                written += 1
                bar.set_postfix(shards=f"{written}/{len(todo)}")
    return samples


def main(argv: Optional[list[str]] = None) -> None:
    run_stage("extract", ExtractOptions, __doc__, extract, _print_result, argv)


def _print_result(options: ExtractOptions, result: dict, share: Share) -> None:
    print(f"rank {share.rank}: extracted {len(result['extracted'])} shards ({result['samples']} samples, "
          f"{result['samples_per_s']:.0f} samples/s, {len(result['damaged'])} damaged), "
          f"{len(result['skipped'])} already done")
    manifest = result["manifest"]
    if manifest is not None:
        totals = manifest["totals"]
        print(f"feature cache complete: {options.out} ({totals['samples']} samples in {totals['shards']} shards, "
              f"{size(totals['bytes'])} of embeddings; skipped {totals['corrupt_image']} corrupt images, "
              f"{totals['missing_caption']} missing captions; {totals['damaged_shards']} damaged shards, listed in "
              f"{os.path.join(options.out, MANIFEST)})")


if __name__ == "__main__":
    main()
