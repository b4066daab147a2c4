"""Distill-ready shards: what ``data_tools.pack`` writes and both loaders (webdataset+PIL, DALI) read.

A folder of webdataset tars ``00000.tar ..`` and ``manifest.json``. Each sample ``KEY`` holds

  KEY.jpg|jpeg|png|webp   the source image bytes, untouched (no re-encode)
  KEY.txt                 the caption, UTF-8
  KEY.tokens              int32 little-endian [context_length]: token ids by the manifest's tokenizer
  KEY.t_img, KEY.t_txt    float16 little-endian [D]: teacher image / caption embeddings, L2-normalised
                          (the feature cache's rows)
  KEY.cluster             int32 little-endian [topk]: nearest centroids, nearest first (when clustered)
  KEY.v_img               float16 little-endian [V, D]: teacher embeddings of V stored views (extract --views)
  KEY.v_box               int32 little-endian [V, 5]: their crop boxes and flips (cid_ds.data.preprocess)
  KEY.json                the source's metadata, when it had any

Raw little-endian arrays rather than ``.npy`` so that DALI can reinterpret the bytes without a parser.
``manifest.json`` holds ``format``, the ``tokenizer`` (spec, context length, and the ids of a probe text,
which identify the vocabulary), the ``teacher`` (copied from the feature cache), ``embed_dim``, ``topk``,
``k``, ``views`` (the feature cache's), every upstream manifest, per-shard sample counts and ``complete``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np

from cid_ds.data.errors import DataError
from cid_ds.io import MANIFEST, read_json, read_manifest

FORMAT = "cid_ds.packed/1"
# field -> little-endian dtype of its raw bytes
ARRAY_FIELDS = {"tokens": np.dtype("<i4"), "t_img": np.dtype("<f2"), "t_txt": np.dtype("<f2"),
                "cluster": np.dtype("<i4"), "v_img": np.dtype("<f2"), "v_box": np.dtype("<i4")}
VIEW_ARRAYS = ("v_img", "v_box")  # read only when replaying views
# Tokenised by the packer and by the trainer: equal ids mean the same tokenizer (vocabulary, lowercasing,
# context length), whatever its name.
TOKENIZER_PROBE = ["a photo of a Cat on a mat, 1984!", "Ünïcödé — ok", ""]


def encode_array(values: np.ndarray, field: str) -> bytes:
    return np.ascontiguousarray(values, dtype=ARRAY_FIELDS[field]).tobytes()


def decode_array(data: bytes, field: str, length: int, where: str) -> np.ndarray:
    """The array stored in a sample's ``field``; a wrong byte count is a DataError naming ``where``."""
    dtype = ARRAY_FIELDS[field]
    if len(data) != length * dtype.itemsize:
        raise DataError(f"{where}.{field}: {len(data)} bytes, expected {length} x {dtype.itemsize} "
                        f"({dtype.name}, length {length} from the packed manifest)")
    return np.frombuffer(data, dtype=dtype)


def tokenizer_fingerprint(tokenizer: Callable) -> list[list[int]]:
    return np.asarray(tokenizer(TOKENIZER_PROBE)).tolist()


def packed_manifest_path(shards: list[str]) -> Optional[str]:
    """The packed manifest beside the first shard, or None when the shards are not distill-ready shards."""
    if not shards:
        return None
    manifest = read_manifest(os.path.dirname(shards[0]))
    return os.path.join(os.path.dirname(shards[0]), MANIFEST) if (manifest or {}).get("format") == FORMAT else None


def listed_samples(manifest_path: str) -> dict[str, int]:
    """``{shard path: samples}`` of the shards a packed manifest lists so far."""
    folder = os.path.dirname(os.path.abspath(manifest_path))
    return {os.path.join(folder, entry["name"]): entry["samples"]
            for entry in (read_manifest(folder) or {}).get("shards", []) if "name" in entry}


def removed_before_packing(manifest_path: str) -> Optional[tuple[int, int]]:
    """``(samples the balance removed, samples it saw)`` of shards packed after a balance; None: not balanced,
    or not told."""
    manifest = read_manifest(os.path.dirname(os.path.abspath(manifest_path))) or {}
    totals = manifest.get("totals", {})
    if "balance" not in manifest.get("upstream", {}) or "removed_by_balance" not in totals:
        return None
    kept = totals["planned"] + totals.get("not_clustered", 0)
    return totals["removed_by_balance"], totals["removed_by_balance"] + kept


def stored_positives(manifest_path: str) -> int:
    """The nearest centroids each packed sample carries (0: no cluster ids)."""
    return int((read_manifest(os.path.dirname(os.path.abspath(manifest_path))) or {}).get("topk") or 0)


class PackedShards:
    """Read access to a packed folder's manifest: what each sample's arrays hold."""

    def __init__(self, manifest_path: str):
        self.manifest_path = manifest_path
        manifest = read_json(manifest_path)
        for field in ("format", "tokenizer", "teacher", "embed_dim", "topk", "complete"):
            if not isinstance(manifest, dict) or field not in manifest:
                raise ValueError(f"packed shards {manifest_path}: field '{field}' is missing")
        if manifest["format"] != FORMAT:
            raise ValueError(f"packed shards {manifest_path}: format is {manifest['format']!r}, expected {FORMAT!r}")
        self.manifest = manifest
        self.teacher: dict = manifest["teacher"]
        self.embed_dim: int = int(manifest["embed_dim"])
        self.topk: int = int(manifest["topk"])  # 0: not clustered
        self.views: int = int(manifest.get("views", {}).get("count", 0))  # stored views per sample
        self.context_length: int = int(manifest["tokenizer"]["context_length"])
        self.complete: bool = bool(manifest["complete"])

    def tokens_usable(self, tokenizer: Callable) -> bool:
        """Whether the stored token ids are what ``tokenizer`` would produce (else captions are re-tokenised)."""
        return tokenizer_fingerprint(tokenizer) == self.manifest["tokenizer"]["probe_ids"]

    def lengths(self) -> dict[str, int]:
        """The element count of each array field."""
        lengths = {"tokens": self.context_length, "t_img": self.embed_dim, "t_txt": self.embed_dim}
        if self.topk:
            lengths["cluster"] = self.topk
        if self.views:
            lengths |= {"v_img": self.views * self.embed_dim, "v_box": self.views * 5}
        return lengths
