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

import argparse
import glob
import importlib.util
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from cid_ds.config import expand_shards
from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION, DamageBudget, TooMuchDamage
from cid_ds.data.errors import DataError, pass_data_errors, raise_data_errors
from cid_ds.data.features import (FINGERPRINT_FIELDS, MANIFEST, shard_file, shard_stem, stems_by_shard,
                                  teacher_mismatches, teacher_set, views_entry, write_complete_manifest, write_shard,
                                  write_started_manifest)
from cid_ds.data.preprocess import ViewTransform, draw_views, image_spec
from cid_ds.data.samples import caption_of, decode_image, read_samples
from cid_ds.io import check_writable, read_json
from cid_ds.teacher import load_teacher
from data_tools.spread import accept_local_rank


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
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    manifest = read_json(path)
    cached = manifest.get("teacher", {}) if isinstance(manifest, dict) else {}
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


def extract(shards: list[str], teacher: str | Sequence[str], pretrained: Optional[str] | Sequence[Optional[str]],
            out_dir: str, batch_size: int = 256, workers: int = 2, device: str = "cpu", rank: int = 0,
            world_size: int = 1, backend: str = "wds", views: Views = Views(), random_teacher_ok: bool = False,
            max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION) -> dict:
    """Write this rank's share of the feature cache; returns what it did (``extracted``/``skipped`` shard
    stems, ``samples``, ``samples_per_s``, ``bytes_per_sample``) and ``manifest`` once the cache is
    complete (else None). ``teacher``/``pretrained``: one, or a list each for an ensemble. ``backend``:
    "wds" (PIL in ``workers`` processes) or "dali" (``workers`` DALI threads; one teacher, no views).
    ``random_teacher_ok``: a teacher without trained weights is meant (tests, benchmarks), else refused.
    ``damaged``: the damaged shards this run read (ShardDamage as dicts); more of them than
    ``max_damaged_fraction`` of all the shards accepts raise TooMuchDamage (cid_ds.data.damage)."""
    specs = [teacher] if isinstance(teacher, str) else list(teacher)
    weights = [pretrained] * len(specs) if pretrained is None or isinstance(pretrained, str) else list(pretrained)
    if len(weights) != len(specs):
        raise ValueError(f"{len(specs)} teachers but {len(weights)} pretrained weights: give one per teacher")
    if views.count < 0:
        raise ValueError(f"views must be >= 0, got {views.count}")
    if views.count and not 0 < views.scale[0] <= views.scale[1] <= 1:
        raise ValueError(f"view scale must satisfy 0 < min <= max <= 1 (a fraction of the image), got {views.scale}")
    if backend == "dali" and (len(specs) > 1 or views.count):
        raise ValueError("--backend dali extracts one teacher without views; use --backend wds")
    # the allowance of all the shards, not of this rank's share: a rank's share is small, and by chance one
    # rank of many would pass a share's allowance at half the threshold's rate (cid_ds.data.damage.RunDamage)
    budget = DamageBudget(len(shards), max_damaged_fraction, "--max-damaged-fraction")
    stems_by_shard(shards)  # unique names, or an error naming both shards
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    loaded = [load_teacher(spec, weight, device, random_teacher_ok) for spec, weight in zip(specs, weights)]
    info = teacher_set([teacher_info for _, _, _, teacher_info in loaded])
    drawn = views.manifest_entry(int(info["embed_dim"]))
    _check_existing_manifest(out_dir, info, drawn)
    write_started_manifest(out_dir, info, drawn)

    mine = shards[rank::world_size]
    todo = [path for path in mine if not os.path.isfile(shard_file(out_dir, shard_stem(path)))]
    for path in todo:  # temp files left by a crash mid-write
        for tmp in glob.glob(glob.escape(shard_file(out_dir, shard_stem(path))) + ".tmp*"):
            os.remove(tmp)
    if todo and rank == 0:
        estimate = estimated_samples(shards)
        print(f"extract: {drawn['bytes_per_sample']} bytes per sample ({len(loaded)} teacher(s), {views.count} "
              f"views) x ~{estimate} samples = ~{size(drawn['bytes_per_sample'] * estimate)} in {out_dir}", flush=True)

    samples, start = 0, time.time()
    if todo:
        workers = min(workers, len(todo))
        threads = torch.get_num_threads()
        if torch.device(device).type == "cpu":  # leave the decoding workers their cores
            torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) - workers)))
        inputs = [TeacherInput(preprocess, ViewTransform(image_spec(preprocess)), tokenizer)
                  for _, preprocess, tokenizer, _ in loaded]
        try:
            samples = _run([model for model, _, _, _ in loaded], inputs, views, info, todo, out_dir, batch_size,
                           workers, torch.device(device),
                           desc=f"extract rank {rank}" if world_size > 1 else "extract", show=rank == 0,
                           backend=backend, budget=budget)
        finally:
            torch.set_num_threads(threads)
    seconds = time.time() - start

    manifest = write_complete_manifest(out_dir, shards, info, drawn)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank == 0:
            manifest = write_complete_manifest(out_dir, shards, info, drawn)
    return {"extracted": [shard_stem(p) for p in todo],
            "skipped": [shard_stem(p) for p in mine if p not in todo],
            "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds if samples else 0.0,
            "bytes_per_sample": drawn["bytes_per_sample"], "manifest": manifest,
            "damaged": [record.as_dict() for record in budget.damaged.values()]}


def _run(models: list, inputs: list[TeacherInput], views: Views, info: dict, todo: list[str], out_dir: str,
         batch_size: int, workers: int, device: torch.device, desc: str, show: bool, backend: str,
         budget: DamageBudget) -> int:
    """Embed the shards in ``todo``, writing each one's file as soon as its last batch is embedded; a
    damaged shard's file records its damage, which ``budget`` counts."""
    try:
        return _embed_shards(models, inputs, views, info, todo, out_dir, batch_size, workers, device, desc, show,
                             backend, budget)
    except TooMuchDamage as e:
        for record in budget.damaged.values():
            if os.path.isfile(shard_file(out_dir, shard_stem(record.shard))):
                os.remove(shard_file(out_dir, shard_stem(record.shard)))
        raise TooMuchDamage(f"{e}\nthe damaged shards' files in {out_dir} were removed: a re-run reads them "
                            "again") from None


def _embed_shards(models: list, inputs: list[TeacherInput], views: Views, info: dict, todo: list[str],
                  out_dir: str, batch_size: int, workers: int, device: torch.device, desc: str, show: bool,
                  backend: str, budget: DamageBudget) -> int:
    if backend == "dali":
        loader = _dali_shard_batches(todo, inputs[0], batch_size, workers, device)
    else:
        loader = DataLoader(_ShardBatches(todo, inputs, views, batch_size), batch_size=None,
                            num_workers=workers, pin_memory=device.type == "cuda")
    pending: dict[str, dict] = {}
    samples = written = 0
    dim = int(info["embed_dim"])
    with tqdm(desc=desc, unit="img", disable=not show, postfix={"shards": f"0/{len(todo)}"}) as bar:
        for item in raise_data_errors(loader):
            acc = pending.setdefault(item["shard"], {"keys": [], "image": [], "text": [], "views": [], "box": []})
            if item["keys"]:
                image, text, view_image = _embed(models, item, device)
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
                write_shard(out_dir, shard_stem(item["shard"]), acc["keys"], stacked["image"], stacked["text"],
                            item["corrupt_image"], item["missing_caption"], info["weights_sha256"],
                            **({"view_image": stacked["views"], "view_box": stacked["box"]} if views.count else {}),
                            damage=item["damage"])
                written += 1
                bar.set_postfix(shards=f"{written}/{len(todo)}")
    return samples


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.extract", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="webdataset tars: brace pattern or glob")
    parser.add_argument("--teacher", required=True, action="append",
                        help="open_clip name, local-dir:PATH or ds_configs/models name; repeat for an ensemble")
    parser.add_argument("--pretrained", default=None, action="append",
                        help="open_clip pretrained tag or checkpoint file (one per --teacher, in order)")
    parser.add_argument("--random-teacher-ok", action="store_true",
                        help="a teacher without trained weights is meant (tests, benchmarks); otherwise refused")
    parser.add_argument("--out", required=True, help="feature cache folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available), cpu, cuda:N")
    parser.add_argument("--backend", default="auto", choices=("auto", "wds", "dali"),
                        help="image decoding: PIL in worker processes (wds), DALI (dali; nvJPEG on a GPU; one "
                             "teacher, no views), auto: dali on a GPU where it can serve, else wds")
    parser.add_argument("--views", type=int, default=0, help="augmented views embedded per image, besides the eval view")
    parser.add_argument("--view-scale", type=float, nargs=2, default=(0.9, 1.0), metavar=("MIN", "MAX"),
                        help="the views' crop area, as a fraction of the image (open_clip trains with 0.9 1.0)")
    parser.add_argument("--no-view-flip", dest="view_flip", action="store_false",
                        help="do not flip half of the views horizontally")
    parser.add_argument("--view-seed", type=int, default=0)
    parser.add_argument("--max-damaged-fraction", type=float, default=DEFAULT_MAX_DAMAGED_FRACTION,
                        help="damaged shards (empty, cut, not a tar) are recorded and skipped past their damage; "
                             "more than this fraction of them (at least one is accepted) stops the run")
    accept_local_rank(parser)
    args = parser.parse_args(argv)

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
    device = args.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    backend = args.backend if args.backend != "auto" else auto_backend(device, len(args.teacher), args.views)
    pretrained = args.pretrained or [None] * len(args.teacher)
    if len(pretrained) != len(args.teacher):
        parser.error(f"{len(args.teacher)} --teacher but {len(pretrained)} --pretrained: give one per teacher, or none")
    shards = expand_shards(args.shards)
    if not shards:
        parser.error(f"--shards {args.shards!r} matches no file")
    views = Views(args.views, tuple(args.view_scale), flip=args.view_flip, seed=args.view_seed)
    try:
        check_writable(args.out)
        result = extract(shards, args.teacher, pretrained, args.out, args.batch_size, args.workers,
                         device, rank, world_size, backend, views, args.random_teacher_ok,
                         max_damaged_fraction=args.max_damaged_fraction)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"extract: {e}")
    print(f"rank {rank}: extracted {len(result['extracted'])} shards ({result['samples']} samples, "
          f"{result['samples_per_s']:.0f} samples/s, {len(result['damaged'])} damaged), "
          f"{len(result['skipped'])} already done")
    manifest = result["manifest"]
    if manifest is not None:
        totals = manifest["totals"]
        print(f"feature cache complete: {args.out} ({totals['samples']} samples in {totals['shards']} shards, "
              f"{size(totals['bytes'])} of embeddings; skipped {totals['corrupt_image']} corrupt images, "
              f"{totals['missing_caption']} missing captions; {totals['damaged_shards']} damaged shards, listed in "
              f"{os.path.join(args.out, MANIFEST)})")


if __name__ == "__main__":
    main()
