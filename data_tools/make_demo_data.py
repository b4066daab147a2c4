"""Procedural demo data: coloured shapes with captions, as img2dataset-style training shards and
clip_benchmark ``wds/`` evaluation sets.

One object per 64x64 image (shape, colour, size, position) on a dark noisy background. Every caption
names both the shape and the colour, so a contrastive model cannot get by on colour alone; the
shapes stay distinct after the 32 px downscale the demo models use.

Everything is a function of ``(seed, stream, shard index)``: each tar can be generated on its own,
re-running skips finished tars, and the same seed gives byte-identical files.

``--captions web`` gives the training captions web alt-text noise (``WEB_CAPTION_MIX``): some vague (the
shape named "thing", "item", ...), some generic ("stock photo", "IMG_2041.jpg"), some of another image;
the images are the same as with clean captions (the noise draws from a stream of its own), and the
evaluation sets keep their clean labels.

    python -m data_tools.make_demo_data --out runs/demo/data --train-samples 50000 --shards 16 --seed 0
"""
from __future__ import annotations

import argparse
import functools
import io
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from cid_ds import __version__
from cid_ds.io import MANIFEST, atomic_path, read_json, write_json

IMAGE_SIZE = 64
JPEG_QUALITY = 90
SUPERSAMPLE = 2  # shapes are drawn at 2x and box-downscaled: anti-aliased edges

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (60, 110, 240),
    "yellow": (235, 215, 40),
    "purple": (160, 70, 210),
    "orange": (245, 140, 30),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_JITTER = 20
SIZES = {"small": (0.35, 0.45), "large": (0.60, 0.75)}  # object extent as a fraction of the side
SIZE_NAMES = tuple(SIZES)
POSITIONS = ("left", "right", "top", "bottom", "center")
MAX_ROTATION_DEG = 15.0

CAPTION_TEMPLATES = (
    "a {colour} {shape}.",
    "a photo of a {size} {colour} {shape}.",
    "a {size} {colour} {shape} {on_where}",
    "there is a {colour} {shape} {near_where}",
    "{colour} {shape}, {size}, {side}",
    "an image showing a {colour} {shape} {on_where}",
    "a drawing of a {colour} {shape}.",
    "a {shape} coloured {colour}, {size}",
)
ON_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top",
             "bottom": "at the bottom", "center": "in the center"}
NEAR_WHERE = {p: f"near the {p}" for p in POSITIONS}
SIDE = {"left": "left side", "right": "right side", "top": "top", "bottom": "bottom", "center": "center"}

ZEROSHOT_TEMPLATES = (
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a {c}.",
    "an image showing a {c}.",
    "there is a {c}.",
)

# Web alt-text noise (--captions web), as fractions of the training samples. Web captions are often partial
# or generic and sometimes describe another picture; CLIP-CID's cluster term is meant for exactly that, as
# it learns image structure the captions miss.
WEB_CAPTION_MIX = {"clean": 0.4, "vague": 0.25, "generic": 0.2, "wrong": 0.15}
VAGUE_WORDS = ("thing", "item", "object", "shape", "graphic")
GENERIC_CAPTIONS = ("stock photo", "IMG_{n:04d}.jpg", "image", "untitled", "click to enlarge", "photo {n}",
                    "product picture", "free download", "thumbnail", "DSC{n:05d}.JPG")
CAPTION_KINDS = ("clean", "web")

# Seed streams: training and each evaluation set draw from disjoint random streams.
TRAIN_STREAM = 0
CAPTION_NOISE_STREAM = 1000  # the web captions' noise: the images stay those of the clean stream
EVAL_SAMPLES_PER_SHARD = 256
LINEAR_PROBE_STREAM_OFFSET = 100  # the train splits of the eval sets draw from stream + this
MANIFEST_PARAMETERS = ("seed", "train_samples", "shards", "eval_scale", "code_version", "captions")


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class EvalSet:
    name: str
    base_samples: int
    stream: int
    label_attributes: tuple[str, ...]  # what the class names name; () for a retrieval set

    @property
    def is_retrieval(self) -> bool:
        return not self.label_attributes

    @property
    def classes(self) -> list[dict[str, str]]:
        """One dict of attribute values per class, in class-index order (colour-major)."""
        values = {"colour": COLOUR_NAMES, "shape": SHAPES}
        return [dict(zip(self.label_attributes, combo))
                for combo in itertools.product(*(values[a] for a in self.label_attributes))]

    @property
    def classnames(self) -> list[str]:
        return [" ".join(c.values()) for c in self.classes]


EVAL_SETS = (
    EvalSet("shapes", 600, 1, ("shape",)),
    EvalSet("colored_shapes", 720, 2, ("colour", "shape")),
    EvalSet("retrieval", 500, 3, ()),
)


# ---------------------------------------------------------------- drawing

def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of ``shape`` around the origin, y pointing down; the scale is set when drawing."""
    if shape == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == "triangle":
        return [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
    if shape == "cross":
        w = 0.32
        return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    if shape == "star":
        return [((1.0 if i % 2 == 0 else 0.42) * math.cos(math.radians(-90 + 36 * i)),
                 (1.0 if i % 2 == 0 else 0.42) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)]
    raise ValueError(f"not a polygon shape: {shape}")


POLYGONS = {s: _polygon(s) for s in ("square", "triangle", "cross", "star")}
RING_HOLE = 0.5  # inner radius / outer radius: a thick outline
BACKGROUND_BANK = 16      # backgrounds drawn per shard; each image takes a random window of one
BACKGROUND_SIDE = 96
TRANSPOSES = (None, *Image.Transpose)


def _shape_mask(shape: str, cx: float, cy: float, half: float, angle_deg: float) -> Image.Image:
    """Anti-aliased coverage of the object, an IMAGE_SIZE x IMAGE_SIZE "L" image."""
    s = SUPERSAMPLE
    mask = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = cx * s, cy * s, half * s
    if shape in ("circle", "ring"):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
        if shape == "ring":
            h = RING_HOLE * r
            draw.ellipse((x - h, y - h, x + h, y + h), fill=0)
    else:
        # Rotate, then fit the bounding box to the square [x - r, x + r] x [y - r, y + r], so that
        # size and position hold for every shape and angle.
        cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        points = [(px * cos - py * sin, px * sin + py * cos) for px, py in POLYGONS[shape]]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        scale = 2 * r / max(max(xs) - min(xs), max(ys) - min(ys))
        ox, oy = x - scale * (max(xs) + min(xs)) / 2, y - scale * (max(ys) + min(ys)) / 2
        draw.polygon([(ox + scale * px, oy + scale * py) for px, py in points], fill=255)
    return mask.reduce(s)


def _centre(position: str, half: float, u: float, v: float) -> tuple[float, float]:
    """Object centre in pixels such that the position word is true and the object stays inside;
    ``u``, ``v`` are uniform in [0, 1)."""
    mid = IMAGE_SIZE / 2
    if position == "center":
        room = min(4.0, mid - half - 1)
        return mid + room * (2 * u - 1), mid + room * (2 * v - 1)
    # Off-centre only for small objects: centre within [half + 1, 20] px of the named edge.
    along = half + 1 + (20.0 - half - 1) * u
    across = mid + 5.0 * (2 * v - 1)
    if position == "left":
        return along, across
    if position == "right":
        return IMAGE_SIZE - along, across
    if position == "top":
        return across, along
    return across, IMAGE_SIZE - along


def make_backgrounds(rng: np.random.Generator) -> list[Image.Image]:
    """Dark, nearly grey backgrounds (never in any object's colour family): a linear gradient plus
    pixel noise. Drawn once per shard; ``draw_object`` crops and flips them, which is far cheaper
    than drawing fresh noise for every image."""
    grid = np.linspace(-1.5, 1.5, BACKGROUND_SIDE, dtype=np.float32)
    backgrounds = []
    for _ in range(BACKGROUND_BANK):
        level = rng.uniform(15.0, 45.0)
        tint = rng.uniform(-6.0, 6.0, 3)
        slope, direction = rng.uniform(0.0, 15.0), rng.uniform(0.0, 2 * math.pi)
        gradient = slope * (math.cos(direction) * grid[None, :] + math.sin(direction) * grid[:, None])
        noise = rng.standard_normal((BACKGROUND_SIDE, BACKGROUND_SIDE, 3)) * rng.uniform(2.0, 7.0)
        pixels = (level + gradient)[..., None] + tint + noise
        backgrounds.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return backgrounds


def draw_object(spec: ObjectSpec, rng: np.random.Generator, backgrounds: list[Image.Image]) -> Image.Image:
    """Render ``spec`` over a random window of one of ``backgrounds``: a 64x64 RGB image."""
    # One generator call per image: per-call overhead, not drawing, dominates at this size.
    u = rng.random(11).tolist()
    low, high = SIZES[spec.size]
    half = (low + (high - low) * u[0]) * IMAGE_SIZE / 2
    cx, cy = _centre(spec.position, half, u[1], u[2])
    mask = _shape_mask(spec.shape, cx, cy, half, MAX_ROTATION_DEG * (2 * u[3] - 1))

    bank_index = int(u[4] * len(backgrounds))
    ox, oy = (int(w * (BACKGROUND_SIDE - IMAGE_SIZE + 1)) for w in u[5:7])
    background = backgrounds[bank_index].crop((ox, oy, ox + IMAGE_SIZE, oy + IMAGE_SIZE))
    transpose = TRANSPOSES[int(u[7] * len(TRANSPOSES))]
    if transpose is not None:
        background = background.transpose(transpose)

    colour = tuple(min(255, max(0, round(c + COLOUR_JITTER * (2 * w - 1))))
                   for c, w in zip(COLOURS[spec.colour], u[8:11]))
    return Image.composite(Image.new("RGB", background.size, colour), background, mask)


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def caption(spec: ObjectSpec, template_id: int) -> str:
    text = CAPTION_TEMPLATES[template_id].format(
        colour=spec.colour, shape=spec.shape, size=spec.size, on_where=ON_WHERE[spec.position],
        near_where=NEAR_WHERE[spec.position], side=SIDE[spec.position])
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"


def web_caption(spec: ObjectSpec, template_id: int, rng: np.random.Generator) -> tuple[str, str]:
    """``(caption, kind)``: the clean caption, or one of ``WEB_CAPTION_MIX``'s kinds of noise, drawn from ``rng``."""
    kind = str(rng.choice(list(WEB_CAPTION_MIX), p=list(WEB_CAPTION_MIX.values())))
    if kind == "vague":
        vague = ObjectSpec(str(rng.choice(VAGUE_WORDS)), spec.colour, spec.size, spec.position)
        return caption(vague, template_id), kind
    if kind == "generic":
        return str(rng.choice(GENERIC_CAPTIONS)).format(n=int(rng.integers(10000))), kind
    if kind == "wrong":
        return caption(random_spec(rng), int(rng.integers(len(CAPTION_TEMPLATES)))), kind
    return caption(spec, template_id), kind


def random_spec(rng: np.random.Generator, shape: Optional[str] = None, colour: Optional[str] = None) -> ObjectSpec:
    """Uniform over the attributes not given; large objects are always centred."""
    u = rng.random(4).tolist()
    shape = shape or SHAPES[int(u[0] * len(SHAPES))]
    colour = colour or COLOUR_NAMES[int(u[1] * len(COLOUR_NAMES))]
    size = SIZE_NAMES[int(u[2] * len(SIZE_NAMES))]
    position = POSITIONS[int(u[3] * len(POSITIONS))] if size == "small" else "center"
    return ObjectSpec(shape, colour, size, position)


# ---------------------------------------------------------------- shards

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: payload})


def _shard_rng(seed: int, stream: int, shard: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, shard])


def train_shard_samples(seed: int, shard: int, count: int, captions: str = "clean") -> Iterator[Sample]:
    rng = _shard_rng(seed, TRAIN_STREAM, shard)
    noise = _shard_rng(seed, CAPTION_NOISE_STREAM, shard)
    backgrounds = make_backgrounds(rng)
    for i in range(count):
        key = f"{shard:06d}_{i:08d}"
        spec = random_spec(rng)
        template_id = int(rng.integers(len(CAPTION_TEMPLATES)))
        text, kind = web_caption(spec, template_id, noise) if captions == "web" else (caption(spec, template_id), None)
        meta = {"key": key, "shape": spec.shape, "colour": spec.colour, "size": spec.size,
                "position": spec.position, "template": template_id, "caption": text}
        if kind is not None:
            meta["caption_kind"] = kind
        image = draw_object(spec, rng, backgrounds)
        yield key, {"jpg": encode_jpeg(image), "txt": text.encode(),
                    "json": json.dumps(meta, sort_keys=True).encode()}


def eval_shard_samples(eval_set: EvalSet, seed: int, shard: int, first: int, count: int, split: str = "test"
                       ) -> Iterator[Sample]:
    """Samples ``first .. first+count-1`` of a split of ``eval_set``; classification sets cycle through the
    classes. The train split (linear probe) is drawn from its own random stream."""
    rng = _shard_rng(seed, eval_set.stream + (LINEAR_PROBE_STREAM_OFFSET if split == "train" else 0), shard)
    backgrounds = make_backgrounds(rng)
    classes = eval_set.classes
    prefix = eval_set.name if split == "test" else f"{eval_set.name}_{split}"
    for index in range(first, first + count):
        key = f"{prefix}_{shard:04d}_{index:06d}"
        if eval_set.is_retrieval:
            spec = random_spec(rng)
            label = caption(spec, int(rng.integers(len(CAPTION_TEMPLATES)))).encode()
            ext = "txt"
        else:
            class_index = index % len(classes)
            spec = random_spec(rng, **classes[class_index])
            label, ext = str(class_index).encode(), "cls"
        yield key, {"jpg": encode_jpeg(draw_object(spec, rng, backgrounds)), ext: label}


def _ustar_header(name: str, size: int) -> bytes:
    """A POSIX ustar member header with fixed mode, owner and mtime. Built by hand because
    ``tarfile.addfile`` costs more per member than drawing the image does."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    header = bytearray(512)
    header[0:len(encoded)] = encoded
    header[100:148] = b"0000644\0" b"0000000\0" b"0000000\0" + b"%011o\0" % size + b"00000000000\0"
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = b"0"     # regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def write_tar(path: str, samples: Iterator[Sample]) -> None:
    """Write a webdataset tar atomically; equal samples give equal bytes (no timestamps, no owners)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for key, fields in samples:
            for ext, payload in fields.items():
                f.write(_ustar_header(f"{key}.{ext}", len(payload)))
                f.write(payload)
                f.write(bytes(-len(payload) % 512))
        f.write(bytes(1024))  # end-of-archive: two zero blocks


def split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------- plan, resume, manifest

@dataclass(frozen=True)
class TarJob:
    path: str
    count: int
    samples: Callable[[], Iterator[Sample]]


def eval_set_size(eval_set: EvalSet, eval_scale: float) -> int:
    n_classes = 1 if eval_set.is_retrieval else len(eval_set.classes)
    return max(n_classes, round(eval_set.base_samples * eval_scale))


def plan_manifest(n_train: int, shards: int, seed: int, eval_scale: float, captions: str = "clean") -> dict:
    eval_sets = {}
    for s in EVAL_SETS:
        n = eval_set_size(s, eval_scale)
        eval_sets[s.name] = {
            "type": "retrieval" if s.is_retrieval else "classification",
            "samples": n,
            "shards": math.ceil(n / EVAL_SAMPLES_PER_SHARD),
            "classes": None if s.is_retrieval else len(s.classes),
        }
        if not s.is_retrieval:  # a train split of the same size, for the linear probe
            eval_sets[s.name].update(train_samples=n, train_shards=math.ceil(n / EVAL_SAMPLES_PER_SHARD))
    return {
        "generator": "data_tools.make_demo_data",
        "code_version": __version__,
        "seed": seed,
        "train_samples": n_train,
        "shards": shards,
        "eval_scale": eval_scale,
        "image_size": IMAGE_SIZE,
        "attributes": {"shapes": list(SHAPES), "colours": list(COLOUR_NAMES), "sizes": list(SIZE_NAMES),
                       "positions": list(POSITIONS)},
        "caption_templates": list(CAPTION_TEMPLATES),
        **({"captions": captions, "web_caption_mix": WEB_CAPTION_MIX} if captions != "clean" else {}),
        "train": {"pattern": f"train/{{{0:05d}..{shards - 1:05d}}}.tar",
                  "samples_per_shard": split_evenly(n_train, shards)},
        "eval": eval_sets,
        "complete": False,
    }


def plan_jobs(out_dir: str, manifest: dict) -> list[TarJob]:
    seed = manifest["seed"]
    jobs = [TarJob(os.path.join(out_dir, "train", f"{shard:05d}.tar"), count,
                   functools.partial(train_shard_samples, seed, shard, count, manifest.get("captions", "clean")))
            for shard, count in enumerate(manifest["train"]["samples_per_shard"])]
    for eval_set in EVAL_SETS:
        info = manifest["eval"][eval_set.name]
        for split, prefix in (("test", ""), ("train", "train_")):
            if f"{prefix}samples" not in info:
                continue
            first = 0
            for shard, count in enumerate(split_evenly(info[f"{prefix}samples"], info[f"{prefix}shards"])):
                jobs.append(TarJob(os.path.join(out_dir, "eval", eval_set.name, split, f"{shard}.tar"), count,
                                   functools.partial(eval_shard_samples, eval_set, seed, shard, first, count, split)))
                first += count
    return jobs


def _write_text(path: str, lines: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("".join(f"{line}\n" for line in lines))


def write_eval_metadata(out_dir: str, manifest: dict) -> None:
    for eval_set in EVAL_SETS:
        root = os.path.join(out_dir, "eval", eval_set.name)
        info = manifest["eval"][eval_set.name]
        _write_text(os.path.join(root, "test", "nshards.txt"), [str(info["shards"])])
        if "train_shards" in info:
            _write_text(os.path.join(root, "train", "nshards.txt"), [str(info["train_shards"])])
        if eval_set.is_retrieval:
            _write_text(os.path.join(root, "dataset_type.txt"), ["retrieval"])
        else:
            _write_text(os.path.join(root, "classnames.txt"), eval_set.classnames)
            _write_text(os.path.join(root, "zeroshot_classification_templates.txt"), list(ZEROSHOT_TEMPLATES))


_STALE_TMP = re.compile(r"\.tmp\d+$")


def prepare_out_dir(out_dir: str, manifest: dict) -> None:
    """Refuse an ``out_dir`` made with other parameters; clear temp files left by a killed run."""
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        existing = read_json(manifest_path)
        for field in MANIFEST_PARAMETERS:  # "captions" is absent for clean captions (as before it existed)
            if existing.get(field) != manifest.get(field):
                raise ValueError(
                    f"{manifest_path}: this folder was generated with {field}={existing.get(field)!r}, "
                    f"asked for {field}={manifest.get(field)!r}; use another --out or delete the folder")
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir}: not empty and has no manifest.json; refusing to write demo data into it")
    for root, _, files in os.walk(out_dir):
        for name in files:
            if _STALE_TMP.search(name):
                os.remove(os.path.join(root, name))
    if not os.path.exists(manifest_path):
        write_json(manifest_path, manifest)


def _check_arguments(n_train: int, shards: int, eval_scale: float, captions: str) -> None:
    if captions not in CAPTION_KINDS:
        raise ValueError(f"captions must be one of {', '.join(CAPTION_KINDS)}, got {captions!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if n_train < shards:
        raise ValueError(f"train_samples ({n_train}) must be >= shards ({shards})")
    if not eval_scale > 0:
        raise ValueError(f"eval_scale must be > 0, got {eval_scale}")


def generate(out_dir: str, train_samples: int, shards: int, seed: int, eval_scale: float = 1.0,
             progress: bool = True, captions: str = "clean") -> dict:
    """Write the demo training shards and evaluation sets under ``out_dir``; return the manifest.

    Finished tars are kept (resume); ``out_dir`` holding data from other parameters is refused.
    """
    _check_arguments(train_samples, shards, eval_scale, captions)
    manifest = plan_manifest(train_samples, shards, seed, eval_scale, captions)
    prepare_out_dir(out_dir, manifest)
    write_eval_metadata(out_dir, manifest)
    jobs = plan_jobs(out_dir, manifest)
    start, written = time.perf_counter(), 0
    with tqdm(total=sum(j.count for j in jobs), unit="img", desc="demo data", disable=not progress) as bar:
        for job in jobs:
            if not os.path.exists(job.path):
                write_tar(job.path, job.samples())
                written += job.count
            bar.update(job.count)
    if progress:
        seconds = time.perf_counter() - start
        rate = written / max(seconds, 1e-6)
        print(f"{out_dir}: generated {written} samples in {seconds:.1f} s ({rate:.0f} samples/s), "
              f"kept {bar.total - written} from finished tars")
    manifest["complete"] = True
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train/, eval/, manifest.json)")
    parser.add_argument("--train-samples", type=int, default=50000)
    parser.add_argument("--shards", type=int, default=16, help="number of training tars")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples-scale", type=float, default=1.0,
                        help="multiplies the evaluation set sizes (600 / 720 / 500 images)")
    parser.add_argument("--captions", default="clean", choices=CAPTION_KINDS,
                        help="web: training captions with web alt-text noise (WEB_CAPTION_MIX); eval labels stay clean")
    args = parser.parse_args(argv)
    try:
        generate(args.out, args.train_samples, args.shards, args.seed, args.eval_samples_scale, captions=args.captions)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
