"""Images/s of the two training loaders on the same distill-ready shards: DALI vs webdataset + PIL.

    python bench/loader.py [--images 2048] [--batch-size 64] [--threads 2] [--size 224] [--view train]
                           [--source 500x375] [--rounds 2] [--device auto]

Writes packed shards of photo-like JPEGs (``--source`` pixels, quality 90), then reads one epoch with
each loader in turn, ``--rounds`` times, alternating: same shards, batch size, output size
(``--size``, the open_clip ViT preprocess: RandomResizedCrop for ``--view train``, resize + centre crop
for ``eval``) and thread count (``--threads`` DataLoader worker processes for PIL, DALI CPU threads).
Images/s is the steady rate after the first batch (start-up: worker start, DALI pipeline build, index
files already made). The best round of each is compared. CPU ms/image is the CPU time the epoch took
in all threads and processes (the PIL loader's workers included), per image delivered: the work each
loader does for an image, whatever its thread count. ``--device auto`` runs DALI's GPU decoding
when CUDA is there; the PIL loader keeps ``--threads`` workers either way.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cid_ds.data.batch import LoaderSpec  # noqa: E402
from cid_ds.data.dali_loader import build_dali_loader, default_device_id  # noqa: E402
from cid_ds.data.packed import FORMAT, encode_array, tokenizer_fingerprint  # noqa: E402
from cid_ds.data.shard_index import shard_indexes  # noqa: E402
from cid_ds.data.wds_loader import build_train_loader  # noqa: E402
from cid_ds.io import write_json  # noqa: E402

SHARD_SAMPLES = 512
EMBED_DIM = 512


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG with a photo's mix of smooth areas and texture (so its size and decode cost are a photo's)."""
    coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 8, (height, width, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_packed_shards(folder: str, images: int, source: tuple[int, int], tokenizer) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for start in range(0, images, SHARD_SAMPLES):
        path = os.path.join(folder, f"{start // SHARD_SAMPLES:05d}.tar")
        with wds.TarWriter(path) as tar:
            for i in range(start, min(start + SHARD_SAMPLES, images)):
                caption = f"a photo, number {i}"
                embeddings = rng.standard_normal((2, EMBED_DIM)).astype(np.float16)
                tar.write({"__key__": f"{i:09d}", "jpg": photo_like(rng, *source), "txt": caption.encode(),
                           "tokens": encode_array(tokenizer([caption])[0].numpy(), "tokens"),
                           "t_img": encode_array(embeddings[0], "t_img"),
                           "t_txt": encode_array(embeddings[1], "t_txt")})
        paths.append(path)
    write_json(os.path.join(folder, "manifest.json"), {
        "format": FORMAT, "tokenizer": {"spec": "ViT-B-32", "context_length": 77,
                                        "probe_ids": tokenizer_fingerprint(tokenizer)},
        "teacher": {"weights_sha256": "0" * 64}, "embed_dim": EMBED_DIM, "topk": 0, "k": 0,
        "shards": [], "complete": True})
    return paths


def steady_rate(loader, batch_size: int) -> tuple[float, int]:
    """(images/s after the first batch, batches); the image reaches host memory or the GPU."""
    batches, start = 0, None
    for batch in loader:
        batch["image"].sum().item()  # the batch is complete (a GPU copy has landed)
        batches += 1
        if start is None:
            start = time.perf_counter()
    return (batches - 1) * batch_size / (time.perf_counter() - start), batches


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the PIL loader's workers, which an
    exhausted DataLoader has joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--view", default="train", choices=("train", "eval"))
    parser.add_argument("--source", default="500x375", help="source JPEG WIDTHxHEIGHT")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu"),
                        help="DALI decoding: auto = GPU when present")
    args = parser.parse_args()
    source = tuple(int(v) for v in args.source.split("x"))
    preprocess = open_clip.image_transform(args.size, is_train=args.view == "train",
                                           mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    device_id = default_device_id() if args.device == "auto" else None

    with tempfile.TemporaryDirectory() as folder:
        shards = write_packed_shards(folder, args.images, source, tokenizer)
        shard_indexes(shards, {"tokens": 77, "t_img": EMBED_DIM, "t_txt": EMBED_DIM})
        mb = sum(os.path.getsize(p) for p in shards) / 2**20
        spec = LoaderSpec(shards, preprocess, tokenizer, args.batch_size, workers=args.threads, shuffle_buffer=1000)
        loaders = {
            "wds+PIL": lambda epoch: build_train_loader(replace(spec, epoch=epoch)),
            "DALI": lambda epoch: build_dali_loader(replace(spec, epoch=epoch), device_id=device_id),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        cpu_ms: dict[str, list[float]] = {name: [] for name in loaders}
        for epoch in range(args.rounds):
            for name, build in loaders.items():
                start = cpu_seconds()
                rate, batches = steady_rate(build(epoch), args.batch_size)
                rates[name].append(rate)
                cpu_ms[name].append(1e3 * (cpu_seconds() - start) / (batches * args.batch_size))
                print(f"round {epoch}: {name:8} {rate:8.1f} images/s ({batches} batches), "
                      f"{cpu_ms[name][-1]:.2f} CPU ms/image", flush=True)

    dali_device = f"GPU {torch.cuda.get_device_name(device_id)}" if device_id is not None else "CPU"
    print(f"\n{args.images} images {args.source} JPEG ({mb:.0f} MiB), view {args.view} -> {args.size}x{args.size}, "
          f"batch {args.batch_size}, {args.threads} threads/workers, {os.cpu_count()} CPUs, DALI on {dali_device}")
    best = {name: max(values) for name, values in rates.items()}
    least_cpu = {name: min(values) for name, values in cpu_ms.items()}
    print(f"{'loader':10} {'images/s':>10} {'CPU ms/image':>13}")
    for name, rate in best.items():
        print(f"{name:10} {rate:10.1f} {least_cpu[name]:13.2f}")
    print(f"ratio DALI / wds+PIL: {best['DALI'] / best['wds+PIL']:.2f}x images/s, "
          f"{least_cpu['wds+PIL'] / least_cpu['DALI']:.2f}x images per CPU second")


if __name__ == "__main__":
    main()
