"""Image preprocessing as data: an open_clip preprocess read into a spec, and stored augmented views.

``image_spec`` reads the crop, resize and normalisation out of an open_clip (torchvision) preprocess,
so the DALI loader and view replay reproduce it rather than guess it.

A **view** (MobileCLIP's reinforced data) is one random-resized crop and flip of a source image, as the
int32 row ``(top, left, height, width, flip)`` in the source image's pixels. ``data_tools.extract --views K``
draws K per sample (``draw_views``) from an RNG seeded by (seed, key), so the boxes depend on nothing
else: not on batching, workers, or which teachers embed them. Each teacher embeds each box at its own
input size, and a loader that replays the box (``ViewTransform`` here, ``fn.decoders.image_slice`` in DALI) gives the
student the same pixels the stored embedding describes. In epoch ``e`` both loaders replay stored view
``e % K`` (``replay_slot``): the K views are independent draws, so cycling through them is as random as
picking one, and needs no per-sample state that DALI's graph could not compute.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from cid_ds.data.errors import DataError

VIEW_FIELDS = ("top", "left", "height", "width", "flip")
# open_clip / torchvision steps that do nothing to an RGB image already decoded to RGB
_PASS_THROUGH = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")
_STEPS = (T.RandomResizedCrop, T.Resize, T.CenterCrop, T.Normalize)  # what a spec reproduces


@dataclass(frozen=True)
class ImageSpec:
    """A preprocess as data: a random resized crop, or resize + centre crop; then normalisation."""
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str                                 # torchvision's InterpolationMode value
    crop_scale: Optional[tuple[float, float]] = None   # set: RandomResizedCrop (training view)
    crop_ratio: Optional[tuple[float, float]] = None
    resize: Optional[int] = None                       # set: shorter side, then centre crop (eval view)


def image_spec(preprocess: Callable) -> ImageSpec:
    """Read the crop, resize and normalisation out of an open_clip preprocess (a torchvision Compose).
    A step that a spec does not reproduce is an error, so that two backends never differ silently."""
    steps, found = getattr(preprocess, "transforms", [preprocess]), {}
    for step in steps:
        kind = next((t for t in _STEPS if isinstance(step, t)), None)
        if kind is not None and kind not in found:
            found[kind] = step
        elif getattr(step, "__name__", type(step).__name__) not in _PASS_THROUGH:
            raise ValueError(f"the DALI loader and view replay cannot reproduce the preprocess step {step!r} of "
                             f"{preprocess!r}; use data.backend=wds and data.views random or center")
    normalize = found.get(T.Normalize)
    if normalize is None:
        raise ValueError(f"the preprocess has no Normalize step: {preprocess!r}")
    norm = dict(mean=tuple(float(m) for m in normalize.mean), std=tuple(float(s) for s in normalize.std))
    if T.RandomResizedCrop in found:
        crop = found[T.RandomResizedCrop]
        return ImageSpec(tuple(crop.size), interpolation=crop.interpolation.value, crop_scale=tuple(crop.scale),
                         crop_ratio=tuple(crop.ratio), **norm)
    resize, center = found.get(T.Resize), found.get(T.CenterCrop)
    sides = [] if resize is None else [resize.size] if isinstance(resize.size, int) else list(resize.size)
    if center is None or len(sides) != 1 or resize.max_size is not None:
        raise ValueError(f"the DALI loader and view replay reproduce RandomResizedCrop, or Resize(shorter side) + "
                         f"CenterCrop, not {preprocess!r}; use data.backend=wds")
    return ImageSpec(tuple(center.size), interpolation=resize.interpolation.value, resize=sides[0], **norm)


def random_resized_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` by torchvision's ``RandomResizedCrop.get_params`` rule (ten tries
    at a box of random area and aspect ratio, else the largest centred box within ``ratio``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_views(width: int, height: int, count: int, key: str, seed: int, scale: tuple[float, float],
               ratio: tuple[float, float], flip: bool) -> np.ndarray:
    """``count`` views of a ``width`` x ``height`` image: int32 [count, 5] rows of ``VIEW_FIELDS``."""
    rng = random.Random(f"views:{seed}:{key}")
    rows = []
    for _ in range(count):
        box = random_resized_box(width, height, scale, ratio, rng)
        rows.append((*box, int(flip and rng.random() < 0.5)))
    return np.asarray(rows, dtype=np.int32).reshape(count, len(VIEW_FIELDS))


def replay_slot(epoch: int, stored: int) -> int:
    """The stored view both loaders replay in ``epoch``."""
    return epoch % stored


def check_stored_views(replay_views: int, stored: int, source: str) -> None:
    """Replaying N views needs at least N stored per sample."""
    if replay_views > stored:
        raise DataError(f"data.replay_views is {replay_views} but {source} stores {stored} views per sample "
                        "(data_tools.extract --views K stores K)")


class BatchNormalize:
    """ToTensor's scaling and Normalize of a whole uint8 batch [B,3,H,W] at once: the same float operations
    as per image, so the same values, without two tensor ops per image in the loader's hot path."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().div_(255).sub_(self.mean).div_(self.std)


def split_normalize(preprocess: Callable) -> tuple["Pixels", Optional[BatchNormalize]]:
    """An open_clip preprocess as ``(per-image steps giving uint8 pixels, the batch's normalisation)``; a
    preprocess that does not end in ToTensor + Normalize is applied whole per image, with None."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize) \
            or steps[-1].inplace:
        return Pixels([preprocess], to_uint8=False), None
    return Pixels(steps[:-2]), BatchNormalize(steps[-1].mean, steps[-1].std)


class Pixels:
    """Preprocess steps, then uint8 pixels (a class, not a lambda: loader workers started by spawn pickle it).

    A leading RandomResizedCrop draws its box from the ``rng`` each call is given, by torchvision's rule
    (``random_resized_box``), and crops and resizes as torchvision does: the same pixels for the same box.
    torchvision draws each of its numbers as a one-element torch tensor (the loader took 52-55 ms of CPU per
    batch of 128 with it, 39-40 without); and the loader's own RNG makes the crops a function of (seed, epoch,
    rank, worker) in whichever process they are made."""

    def __init__(self, steps: list, to_uint8: bool = True):
        self.crop = steps[0] if steps and type(steps[0]) is T.RandomResizedCrop else None
        self.rest = T.Compose(steps[1:] if self.crop is not None else steps)
        self.to_uint8 = to_uint8

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.crop is not None:
            top, left, height, width = random_resized_box(*image.size, self.crop.scale, self.crop.ratio, rng)
            image = TF.resized_crop(image, top, left, height, width, self.crop.size, self.crop.interpolation,
                                    antialias=self.crop.antialias)
        image = self.rest(image)
        return TF.pil_to_tensor(image) if self.to_uint8 else image


class ViewTransform:
    """A stored view of a PIL image as the model's input tensor: crop the box, flip, resize to the spec's
    size (antialiased, as torchvision's RandomResizedCrop), normalise (``pixels`` stops before it)."""

    def __init__(self, spec: ImageSpec):
        self.spec = spec
        self.interpolation = T.InterpolationMode(spec.interpolation)
        self.normalize = BatchNormalize(spec.mean, spec.std)

    def pixels(self, image: Image.Image, view: np.ndarray) -> torch.Tensor:
        """uint8 [3,H,W]"""
        top, left, height, width, flip = (int(v) for v in view)
        if image.mode != "RGB":
            image = image.convert("RGB")
        image = TF.resized_crop(image, top, left, height, width, list(self.spec.size), self.interpolation,
                                antialias=True)
        if flip:
            image = TF.hflip(image)
        return TF.pil_to_tensor(image)

    def __call__(self, image: Image.Image, view: np.ndarray) -> torch.Tensor:
        return self.normalize(self.pixels(image, view)[None])[0]
