"""The teacher feature cache: what ``data_tools.extract`` writes and the loaders read.

A cache is a folder with one ``<shard_stem>.npz`` per input shard (``np.savez``, uncompressed):

  keys             [N] str    sample keys, in shard order
  image, text      [N, D] fp16  teacher embeddings of the eval view and of the caption,
                              L2-normalised before the cast
  view_image       [N, V, D] fp16  with ``--views V``: the embeddings of V augmented views
  view_box         [N, V, 5] int32  each view's crop box and flip (cid_ds.data.preprocess.VIEW_FIELDS)
  corrupt_image    [M] str    keys skipped because the image did not decode
  missing_caption  [K] str    keys skipped because the caption was missing or empty
  samples          0-d int    N
  teacher_sha256   0-d str    the weights that produced the rows
  damage           0-d str    only for a damaged shard: its ShardDamage as JSON (cid_ds.data.damage);
                              the rows are the samples before the damage, and the shard is done

and ``manifest.json``, which names the teacher and the views and is derived from the shard files alone,
so that any process can (re)write it. ``complete`` is true once every input shard has its file.

A teacher **ensemble** is one cache: each row is the concatenation of every teacher's L2-normalised
embedding (widths may differ), and the manifest's ``teacher`` is ``teacher_set(members)``, which
fingerprints every member. The cosine of two rows, renormalised, is then the mean of the members'
cosines, so clustering and balance on the rows use the ensemble; the trainer splits the rows by the
members' widths.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

import cid_ds
from cid_ds.data.errors import DataError
from cid_ds.io import MANIFEST, atomic_path, read_manifest, write_json

if TYPE_CHECKING:
    from torch import nn

    from cid_ds.data.damage import ShardDamage

DTYPE = "float16"
# The teacher fields that decide what the embeddings are; spec and pretrained only record provenance.
FINGERPRINT_FIELDS = ("weights_sha256", "embed_dim", "image_size", "preprocess", "context_length")


def shard_stem(path: str) -> str:
    """``/data/00012.tar`` -> ``00012``: the name a shard's features are stored under."""
    name = os.path.basename(path.rstrip("/"))
    return name[:-len(".tar")] if name.endswith(".tar") else os.path.splitext(name)[0]


def stems_by_shard(shards: list[str]) -> dict[str, str]:
    """``{stem: path}`` for a shard list; two shards with the same stem would share a cache file."""
    stems: dict[str, str] = {}
    for path in shards:
        stem = shard_stem(path)
        if stem in stems and stems[stem] != path:
            raise ValueError(f"shards {stems[stem]} and {path} have the same name '{stem}'; "
                             "the feature cache stores one file per shard name, so names must be unique")
        stems[stem] = path
    return stems


def shard_file(cache_dir: str, stem: str) -> str:
    return os.path.join(cache_dir, f"{stem}.npz")


def teacher_info(spec: str, pretrained: Optional[str], model: nn.Module) -> dict:
    """The manifest's ``teacher`` entry for an open_clip model."""
    import open_clip  # here, not at the top: the cache readers (balance, cluster) need no torch

    from cid_ds.models import embed_dim, weights_fingerprint
    cfg = open_clip.get_model_preprocess_cfg(model)
    return {
        "spec": spec,
        "pretrained": pretrained,
        "weights_sha256": weights_fingerprint(model),
        "embed_dim": embed_dim(model),
        "image_size": list(cfg["size"]) if isinstance(cfg["size"], (tuple, list)) else [cfg["size"]] * 2,
        "preprocess": {"mean": [float(x) for x in cfg["mean"]], "std": [float(x) for x in cfg["std"]],
                       "interpolation": cfg["interpolation"], "resize_mode": cfg["resize_mode"]},
        "context_length": int(model.context_length),
        "logit_scale": float(model.logit_scale.detach().exp().clamp(max=100)),  # the teacher's own logits (crd, gd)
    }


def teacher_set(members: list[dict]) -> dict:
    """The manifest's ``teacher`` entry for the teachers whose embeddings a cache's rows concatenate: one
    teacher's info as it is, or for several ``members``, their total ``embed_dim`` and a ``weights_sha256``
    over every member's fingerprint, so that a cache of another teacher set (or order) is refused."""
    if len(members) == 1:
        return members[0]
    fingerprints = [{field: member.get(field) for field in FINGERPRINT_FIELDS} for member in members]
    digest = hashlib.sha256(json.dumps(fingerprints, sort_keys=True).encode()).hexdigest()
    return {"members": members, "weights_sha256": digest, "embed_dim": sum(int(m["embed_dim"]) for m in members)}


def teacher_members(teacher: dict) -> list[dict]:
    """The teachers of a manifest's ``teacher`` entry, in the order their embeddings are concatenated."""
    return teacher.get("members", [teacher])


def teacher_mismatches(source: str, cached: dict, expected: dict) -> list[str]:
    """One line per field of ``expected`` that differs from the cache's teacher."""
    lines = []
    for field, want in expected.items():
        have = cached.get(field)
        if have != want:
            lines.append(f"{source}: teacher.{field} is {_short(have)} but the teacher given is {_short(want)}")
    return lines


def _short(value: object) -> str:
    text = str(value)
    return text[:12] + ".." if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def write_shard(cache_dir: str, stem: str, keys: list[str], image: np.ndarray, text: np.ndarray,
                corrupt_image: list[str], missing_caption: list[str], teacher_sha256: str,
                view_image: Optional[np.ndarray] = None, view_box: Optional[np.ndarray] = None,
                damage: Optional[ShardDamage] = None) -> str:
    """Atomically write one shard's features; ``image``/``text`` (and ``view_image``) must already be
    L2-normalised. ``damage``: the shard is damaged, the rows are the samples before it."""
    path = shard_file(cache_dir, stem)
    views = {} if view_image is None else {"view_image": np.asarray(view_image, dtype=np.float16),
                                           "view_box": np.asarray(view_box, dtype=np.int32)}
    damaged = {} if damage is None else {"damage": np.asarray(json.dumps(damage.as_dict()))}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz
        np.savez(f,
                 keys=np.asarray(keys, dtype=str),
                 image=np.asarray(image, dtype=np.float16),
                 text=np.asarray(text, dtype=np.float16),
                 corrupt_image=np.asarray(corrupt_image, dtype=str),
                 missing_caption=np.asarray(missing_caption, dtype=str),
                 samples=np.asarray(len(keys)),
                 teacher_sha256=np.asarray(teacher_sha256),
                 **views, **damaged)
    return path


def _shard_summary(path: str, source: str, teacher_sha256: str) -> dict:
    with np.load(path) as npz:
        if str(npz["teacher_sha256"]) != teacher_sha256:
            raise DataError(f"{path}: teacher_sha256 is {_short(str(npz['teacher_sha256']))} but the "
                             f"manifest's teacher is {_short(teacher_sha256)}; delete the file to redo it")
        damage = {"damage": json.loads(str(npz["damage"]))} if "damage" in npz.files else {}
        return {"source": source, "samples": int(npz["samples"]),
                "corrupt_image": len(npz["corrupt_image"]), "missing_caption": len(npz["missing_caption"]), **damage}


def _manifest(teacher: dict, views: Optional[dict], shards: dict[str, dict], complete: bool) -> dict:
    views = views or views_entry(0, int(teacher["embed_dim"]))
    totals = {"shards": len(shards)}
    for field in ("samples", "corrupt_image", "missing_caption"):
        totals[field] = sum(s[field] for s in shards.values())
    totals["damaged_shards"] = sum("damage" in s for s in shards.values())
    totals["bytes"] = totals["samples"] * views["bytes_per_sample"]
    return {"teacher": teacher, "views": views, "dtype": DTYPE, "shards": shards, "totals": totals,
            "complete": complete, "code_version": cid_ds.__version__}


def views_entry(count: int, embed_dim: int, drawn: Optional[dict] = None) -> dict:
    """The manifest's ``views``: their count, how they were drawn (``drawn``: scale, ratio, flip, seed;
    recorded when there are views) and the cache's bytes per sample (image and text rows, plus each view's
    row and box)."""
    per_sample = 2 * 2 * embed_dim + count * (2 * embed_dim + 4 * 5)
    return {"count": count, **(drawn if count else {}), "bytes_per_sample": per_sample}


def write_started_manifest(cache_dir: str, teacher: dict, views: Optional[dict] = None) -> None:
    """Record the teacher and views before any work, so that a resumed run can be checked against them."""
    write_json(os.path.join(cache_dir, MANIFEST), _manifest(teacher, views, {}, complete=False))


def write_complete_manifest(cache_dir: str, shards: list[str], teacher: dict, views: Optional[dict] = None
                            ) -> Optional[dict]:
    """If every shard has its file, write the complete manifest (from the files) and return it; else None.

    Any number of processes may call this: they all derive the same content, and writes are atomic.
    """
    stems = stems_by_shard(shards)
    if not all(os.path.isfile(shard_file(cache_dir, stem)) for stem in stems):
        return None
    entries = {stem: _shard_summary(shard_file(cache_dir, stem), path, teacher["weights_sha256"])
               for stem, path in stems.items()}
    manifest = _manifest(teacher, views, entries, complete=True)
    write_json(os.path.join(cache_dir, MANIFEST), manifest)
    return manifest


@dataclass
class ShardFeatures:
    """One shard's cached rows: ``row[key]`` indexes ``image``, ``text`` and, with views, ``view_image``
    and ``view_box``; ``skipped`` holds the keys the extractor left out on purpose (corrupt image, missing
    caption)."""
    row: dict[str, int]
    image: np.ndarray
    text: np.ndarray
    skipped: frozenset[str]
    view_image: Optional[np.ndarray] = None
    view_box: Optional[np.ndarray] = None


def listed_samples(cache_dir: str) -> dict[str, int]:
    """``{stem: samples}`` of the shards the cache's manifest lists so far (none without a manifest)."""
    return _samples(read_manifest(cache_dir) or {})


def _samples(manifest: dict) -> dict[str, int]:
    shards = manifest.get("shards")
    return {stem: int(entry["samples"]) for stem, entry in sorted(shards.items())} if isinstance(shards, dict) else {}


class FeatureCache:
    """Read access to a cache folder; opening it checks the manifest. ``with_views=False`` leaves the
    stored views unread (stages that need only the eval view's rows: cluster, balance)."""

    def __init__(self, cache_dir: str, with_views: bool = True):
        self.dir, self.with_views = cache_dir, with_views
        self.manifest_path = os.path.join(cache_dir, MANIFEST)
        if not os.path.isfile(self.manifest_path):
            raise FileNotFoundError(f"feature cache {cache_dir}: no {MANIFEST} "
                                    "(write the cache with: python -m data_tools.extract)")
        manifest = read_manifest(cache_dir)
        for field in ("teacher", "dtype", "complete"):
            if manifest is None or field not in manifest:
                raise ValueError(f"feature cache {self.manifest_path}: field '{field}' is missing")
        for field in ("weights_sha256", "embed_dim"):
            if field not in manifest["teacher"]:
                raise ValueError(f"feature cache {self.manifest_path}: field 'teacher.{field}' is missing")
        if manifest["dtype"] != DTYPE:
            raise ValueError(f"feature cache {self.manifest_path}: dtype is {manifest['dtype']}, expected {DTYPE}")
        self.manifest = manifest
        self.teacher: dict = manifest["teacher"]
        self.embed_dim: int = int(self.teacher["embed_dim"])
        self.views: int = int(manifest.get("views", {}).get("count", 0))  # caches before views have none
        self.complete: bool = bool(manifest["complete"])
        self._recent_stem: Optional[str] = None
        self._recent: Optional[ShardFeatures] = None

    def shard_samples(self) -> dict[str, int]:
        """``{stem: samples}`` of every shard of a complete cache."""
        if not self.complete:
            raise ValueError(f"feature cache {self.manifest_path}: complete is false "
                             "(finish python -m data_tools.extract first)")
        if not isinstance(self.manifest.get("shards"), dict):
            raise ValueError(f"feature cache {self.manifest_path}: field 'shards' is missing")
        return _samples(self.manifest)

    def check_teacher(self, expected: dict) -> None:
        """Raise ValueError naming every field of ``expected`` that the cache's teacher does not match."""
        lines = teacher_mismatches(f"feature cache {self.manifest_path}", self.teacher, expected)
        if lines:
            raise ValueError("\n".join(lines))

    def lookup(self, stem: str) -> Optional[ShardFeatures]:
        """The features of shard ``stem``, or None if the cache has no file for it. The last shard is kept."""
        if stem != self._recent_stem:
            self._recent_stem, self._recent = stem, self._load(stem)
        return self._recent

    def _load(self, stem: str) -> Optional[ShardFeatures]:
        path = shard_file(self.dir, stem)
        if not os.path.isfile(path):
            return None
        with np.load(path) as npz:
            keys, image, text = npz["keys"], npz["image"], npz["text"]
            views = {name: npz[name] for name in ("view_image", "view_box")
                     if self.views and self.with_views and name in npz}
            sha = str(npz["teacher_sha256"])
            skipped = frozenset(npz["corrupt_image"].tolist()) | frozenset(npz["missing_caption"].tolist())
        if sha != self.teacher["weights_sha256"]:
            raise DataError(f"{path}: teacher_sha256 is {_short(sha)} but {self.manifest_path} says "
                             f"{_short(self.teacher['weights_sha256'])}")
        shapes = {"image": (len(keys), self.embed_dim), "text": (len(keys), self.embed_dim)}
        if self.views and self.with_views:
            shapes |= {"view_image": (len(keys), self.views, self.embed_dim), "view_box": (len(keys), self.views, 5)}
        arrays = {"image": image, "text": text} | views
        for name, shape in shapes.items():
            if name not in arrays:
                raise DataError(f"{path}: field '{name}' is missing ({self.manifest_path} says views.count = "
                                 f"{self.views})")
            if arrays[name].shape != shape:
                raise DataError(f"{path}: field '{name}' has shape {arrays[name].shape}, expected {shape}")
        return ShardFeatures({k: i for i, k in enumerate(keys.tolist())}, image, text, skipped, **views)
