"""Embed every sample once with the teacher and write the feature cache (see cid_ds.data.features).

  python -m data_tools.extract --shards '/data/{00000..00041}.tar' --teacher ViT-L-14 \\
      --pretrained laion400m_e32 --out runs/feats [--batch-size 256] [--workers 2] [--device auto] \\
      [--backend auto]

Images are embedded in the eval view (the teacher's preprocess_val), captions through its tokenizer.
Images are decoded by PIL in ``--workers`` processes (``--backend wds``) or by DALI with ``--workers``
threads, nvJPEG on a GPU (``--backend dali``; ``auto``: DALI when the device is a GPU).
Shards whose .npz exists are skipped, so a re-run resumes. Under torchrun or the deepspeed launcher
(RANK/WORLD_SIZE set) each rank takes shards[rank::world] on cuda:LOCAL_RANK; whichever rank finds
every shard file present at its end writes the complete manifest.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from cid_ds.config import expand_shards
from cid_ds.data.features import (FINGERPRINT_FIELDS, MANIFEST, DataError, shard_file, shard_stem,
                                  stems_by_shard, teacher_mismatches, write_complete_manifest,
                                  write_shard, write_started_manifest)
from cid_ds.data.wds_loader import (caption_of, decode_image, pass_data_errors, raise_data_errors,
                                    read_samples)
from cid_ds.io import read_json
from cid_ds.teacher import load_teacher


class _ShardBatches(IterableDataset):
    """Per worker, whole shards: a shard's batches, then its last (possibly empty) one with ``done``
    set and the keys that were skipped."""

    def __init__(self, shards: list[str], preprocess, tokenizer, batch_size: int):
        super().__init__()
        self.shards, self.preprocess, self.tokenizer, self.batch_size = shards, preprocess, tokenizer, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = self.shards[worker::workers]
        yield from pass_data_errors(batch for shard in shards for batch in self._shard_batches(shard))

    def _shard_batches(self, shard: str) -> Iterator[dict]:
        seen: set[str] = set()
        keys, images, captions, corrupt_image, missing_caption = [], [], [], [], []
        for sample in read_samples([shard]):
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
            keys.append(key)
            images.append(self.preprocess(image))
            captions.append(caption)
            if len(keys) == self.batch_size:
                yield _batch(shard, keys, torch.stack(images), captions, self.tokenizer)
                keys, images, captions = [], [], []
        last = _batch(shard, keys, torch.stack(images) if images else None, captions, self.tokenizer)
        yield dict(last, done=True, corrupt_image=corrupt_image, missing_caption=missing_caption)


def _check_unique(shard: str, key: str, seen: set[str]) -> None:
    if key in seen:
        raise DataError(f"shard {shard}: key {key} appears twice; cached features are looked up by key")
    seen.add(key)


def _batch(shard: str, keys: list[str], images: Optional[torch.Tensor], captions: list[str], tokenizer) -> dict:
    return {"shard": shard, "keys": keys, "done": False, "image": images,
            "tokens": tokenizer(captions) if captions else None}


def _dali_shard_batches(shards: list[str], preprocess, tokenizer, batch_size: int, threads: int,
                        device: torch.device) -> Iterator[dict]:
    """What ``_ShardBatches`` yields, decoded by DALI (nvJPEG on a GPU ``device``), a shard at a time."""
    from cid_ds.data.dali_loader import read_shard
    from cid_ds.data.shard_index import NO_CAPTION
    device_id = None if device.type != "cuda" else torch.cuda.current_device() if device.index is None else device.index
    for shard in shards:
        index, batches = read_shard(shard, preprocess, batch_size, threads, device_id)
        seen: set[str] = set()
        for keys, images, captions in batches:
            for key in keys:
                _check_unique(shard, key, seen)
            yield _batch(shard, keys, images, captions, tokenizer)
        yield dict(_batch(shard, [], None, [], tokenizer), done=True,
                   corrupt_image=[key for key, why in index.skipped.items() if why != NO_CAPTION],
                   missing_caption=[key for key, why in index.skipped.items() if why == NO_CAPTION])


def _embed(model, images: torch.Tensor, tokens: torch.Tensor, device: torch.device):
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        image = model.encode_image(images.to(device, non_blocking=True))
        text = model.encode_text(tokens.to(device, non_blocking=True))
    return (F.normalize(image.float(), dim=-1).half().cpu().numpy(),
            F.normalize(text.float(), dim=-1).half().cpu().numpy())


def _check_existing_manifest(out_dir: str, teacher: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return
    manifest = read_json(path)
    cached = manifest.get("teacher", {}) if isinstance(manifest, dict) else {}
    lines = teacher_mismatches(f"feature cache {path}", cached, {f: teacher[f] for f in FINGERPRINT_FIELDS})
    if lines:
        raise ValueError("\n".join(lines) + f"\nrefusing to mix two teachers in one cache: use another --out "
                         f"or delete {out_dir}")


def extract(shards: list[str], teacher: str, pretrained: Optional[str], out_dir: str, batch_size: int = 256,
            workers: int = 2, device: str = "cpu", rank: int = 0, world_size: int = 1, backend: str = "wds") -> dict:
    """Write this rank's share of the feature cache; returns what it did (``extracted``/``skipped`` shard
    stems, ``samples``, ``samples_per_s``) and ``manifest`` once the cache is complete (else None).
    ``backend``: "wds" (PIL in ``workers`` processes) or "dali" (``workers`` DALI threads)."""
    stems_by_shard(shards)  # unique names, or an error naming both shards
    missing = [path for path in shards if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"shard not found: {missing[0]}{more}")
    model, preprocess, tokenizer, info = load_teacher(teacher, pretrained, device)
    _check_existing_manifest(out_dir, info)
    write_started_manifest(out_dir, info)

    mine = shards[rank::world_size]
    todo = [path for path in mine if not os.path.isfile(shard_file(out_dir, shard_stem(path)))]
    for path in todo:  # temp files left by a crash mid-write
        for tmp in glob.glob(glob.escape(shard_file(out_dir, shard_stem(path))) + ".tmp*"):
            os.remove(tmp)

    samples, start = 0, time.time()
    if todo:
        workers = min(workers, len(todo))
        threads = torch.get_num_threads()
        if torch.device(device).type == "cpu":  # leave the decoding workers their cores
            torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) - workers)))
        try:
            samples = _run(model, preprocess, tokenizer, info, todo, out_dir, batch_size, workers,
                           torch.device(device), desc=f"extract rank {rank}" if world_size > 1 else "extract",
                           show=rank == 0, backend=backend)
        finally:
            torch.set_num_threads(threads)
    seconds = time.time() - start

    manifest = write_complete_manifest(out_dir, shards, info)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        if rank == 0:
            manifest = write_complete_manifest(out_dir, shards, info)
    return {"extracted": [shard_stem(p) for p in todo],
            "skipped": [shard_stem(p) for p in mine if p not in todo],
            "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds if samples else 0.0,
            "manifest": manifest}


def _run(model, preprocess, tokenizer, info: dict, todo: list[str], out_dir: str, batch_size: int,
         workers: int, device: torch.device, desc: str, show: bool, backend: str) -> int:
    """Embed the shards in ``todo``, writing each one's file as soon as its last batch is embedded."""
    if backend == "dali":
        loader = _dali_shard_batches(todo, preprocess, tokenizer, batch_size, workers, device)
    else:
        loader = DataLoader(_ShardBatches(todo, preprocess, tokenizer, batch_size), batch_size=None,
                            num_workers=workers, pin_memory=device.type == "cuda")
    pending: dict[str, dict] = {}
    samples = written = 0
    with tqdm(desc=desc, unit="img", disable=not show, postfix={"shards": f"0/{len(todo)}"}) as bar:
        for item in raise_data_errors(loader):
            acc = pending.setdefault(item["shard"], {"keys": [], "image": [], "text": []})
            if item["keys"]:
                image, text = _embed(model, item["image"], item["tokens"], device)
                acc["keys"] += item["keys"]
                acc["image"].append(image)
                acc["text"].append(text)
                samples += len(item["keys"])
                bar.update(len(item["keys"]))
            if item["done"]:
                del pending[item["shard"]]
                empty = np.zeros((0, info["embed_dim"]), np.float16)
                write_shard(out_dir, shard_stem(item["shard"]), acc["keys"],
                            np.concatenate(acc["image"] or [empty]), np.concatenate(acc["text"] or [empty]),
                            item["corrupt_image"], item["missing_caption"], info["weights_sha256"])
                written += 1
                bar.set_postfix(shards=f"{written}/{len(todo)}")
    return samples


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.extract", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="webdataset tars: brace pattern or glob")
    parser.add_argument("--teacher", required=True, help="open_clip name, local-dir:PATH or ds_configs/models name")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--out", required=True, help="feature cache folder")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available), cpu, cuda:N")
    parser.add_argument("--backend", default="auto", choices=("auto", "wds", "dali"),
                        help="image decoding: PIL in worker processes (wds), DALI (dali; nvJPEG on a GPU), "
                             "auto: dali on a GPU, wds on the CPU")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK is read too
    args = parser.parse_args(argv)

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
    device = args.device
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    backend = args.backend if args.backend != "auto" else "dali" if torch.device(device).type == "cuda" else "wds"
    shards = expand_shards(args.shards)
    if not shards:
        parser.error(f"--shards {args.shards!r} matches no file")
    try:
        result = extract(shards, args.teacher, args.pretrained, args.out, args.batch_size, args.workers,
                         device, rank, world_size, backend)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"extract: {e}")
    print(f"rank {rank}: extracted {len(result['extracted'])} shards ({result['samples']} samples, "
          f"{result['samples_per_s']:.0f} samples/s), {len(result['skipped'])} already done")
    manifest = result["manifest"]
    if manifest is not None:
        totals = manifest["totals"]
        print(f"feature cache complete: {args.out} ({totals['samples']} samples in {totals['shards']} shards; "
              f"skipped {totals['corrupt_image']} corrupt images, {totals['missing_caption']} missing captions)")


if __name__ == "__main__":
    main()
