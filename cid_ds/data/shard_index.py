"""Index files for DALI's webdataset reader, written by us rather than DALI's ``wds2idx`` because ours
also decide which samples DALI may read.

DALI's reader cannot drop a sample: a batch holds whatever the reader gave it, and an image its decoder
cannot read stops the pipeline. So a sample the webdataset loader would skip (no caption, an image PIL
cannot open or a truncated one, a missing array field) is left out of the index, and the index records
the key and the reason. A decoder failure at run time adds the key to that list (``exclude``).

Per shard ``S.tar`` the cache holds ``S.tar.idx`` (DALI's ``v1.2`` format: per sample, ``ext offset
size name`` for each component it lists) and ``S.tar.idx.json`` (what the index was built from: shard
size and mtime, required fields, index version; the kept count, the skipped keys, and for a damaged
shard its ShardDamage: the index lists the samples before the damage, cid_ds.data.damage). A shard whose
size or mtime changed, or a request for other fields, rebuilds it. The cache lives in ``_dali_index/``
beside the shards, or, when that folder cannot be written, under
``$XDG_CACHE_HOME/cid_ds/dali_index/<hash of the shard folder>/`` (default ``~/.cache``).
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from typing import Optional

from PIL import Image
from webdataset.tariterators import base_plus_ext

from cid_ds.data.damage import ShardDamage
from cid_ds.data.errors import DataError
from cid_ds.data.packed import decode_array
from cid_ds.data.tars import Member, tar_sample_members, until_damage
from cid_ds.data.samples import DECODE_ERRORS, IMAGE_EXTS, MAX_CAPTION_BYTES, caption_of
from cid_ds.io import atomic_path, read_json, write_json

INDEX_VERSION = 1
INDEX_FOLDER = "_dali_index"
NO_CAPTION = "no caption"  # the skip reason data_tools.extract files under missing_caption
# Formats DALI's decoders read; PIL reads more (GIF, ...), and a GIF named .jpg would stop the pipeline.
DALI_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM", "JPEG2000"}


@dataclass
class ShardIndex:
    shard: str
    path: str                # the DALI index file: the kept samples, in tar order
    samples: int             # kept samples
    skipped: dict[str, str]  # key -> why the index leaves it out
    signature: dict          # what it was built from (see the module docstring)
    damage: Optional[ShardDamage] = None  # a damaged shard: the index lists the samples before the damage


def image_problem(data: bytes) -> Optional[str]:
    """Why DALI could not decode these image bytes, from the header and the end of the data (no
    decode), or None. Truncation (a partial download) is the common case: no end marker."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except DECODE_ERRORS as e:
        return f"not a readable image ({type(e).__name__})"
    if fmt not in DALI_FORMATS:
        return f"{fmt} image: DALI cannot decode it"
    # Markers are unambiguous after the first SOS (entropy-coded 0xFF bytes are stuffed), so a complete
    # JPEG has its EOI after its last SOS; a thumbnail's EOI sits before the main SOS.
    if fmt == "JPEG" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return "truncated JPEG (no end marker)"
    if fmt == "PNG" and b"IEND\xaeB`\x82" not in data:
        return "truncated PNG (no IEND chunk)"
    if fmt == "WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        return "truncated WebP"
    return None


def _check(shard: str, key: str, parts: dict[str, Member], fields: dict[str, int]
           ) -> tuple[Optional[str], list[Member]]:
    """``(reason to skip or None, the members the index lists)``, checked in the webdataset loader's
    order: caption, arrays, image. A wrong-sized array is a DataError: a packing bug, not bad data."""
    if "txt" not in parts or caption_of({"txt": parts["txt"].data[:MAX_CAPTION_BYTES]}) is None:
        return NO_CAPTION, []
    for name, length in fields.items():
        if name not in parts:
            return f"no .{name}", []
        decode_array(parts[name].data, name, length, f"shard {shard} key {key}")
    image = next((parts[ext] for ext in IMAGE_EXTS if ext in parts), None)
    if image is None:
        return "no image", []
    problem = image_problem(image.data)
    return problem, [image, parts["txt"], *(parts[name] for name in fields)]


def _scan(shard: str, fields: dict[str, int]) -> tuple[list[str], dict[str, str], Optional[ShardDamage]]:
    """The index lines of the usable samples (up to any damage), the skipped keys with their reasons,
    and the shard's damage."""
    lines, skipped, damaged = [], {}, []
    for key, parts in until_damage(shard, tar_sample_members(shard, plain_only=True), damaged):
        problem, members = _check(shard, key, parts, fields)
        if problem is None and any(c.isspace() for m in members for c in m.name):
            problem = "a file name with white space (the DALI index is space-separated)"
        if problem is not None:
            skipped[key] = problem
            continue
        lines.append(" ".join(f"{base_plus_ext(m.name)[1]} {m.offset} {len(m.data)} {m.name}" for m in members))
    return lines, skipped, damaged[0] if damaged else None


def _signature(shard: str, fields: dict[str, int]) -> dict:
    stat = os.stat(shard)
    return {"version": INDEX_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "fields": fields}


def _folders(shard: str) -> list[str]:
    """Where a shard's index may be: beside it, then the user cache (for read-only shard folders)."""
    folder = os.path.dirname(os.path.abspath(shard))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(folder, INDEX_FOLDER),
            os.path.join(cache, "cid_ds", "dali_index", hashlib.sha1(folder.encode()).hexdigest()[:16])]


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _cached(shard: str, signature: dict) -> Optional[ShardIndex]:
    for folder in _folders(shard):
        path = os.path.join(folder, f"{os.path.basename(shard)}.idx")
        try:
            meta = read_json(path + ".json")
        except (OSError, ValueError):
            continue
        if meta.get("signature") == signature and os.path.isfile(path):
            damage = ShardDamage(**meta["damage"]) if meta.get("damage") else None
            return ShardIndex(shard, path, meta["samples"], meta["skipped"], signature, damage)
    return None


def _build(shard: str, signature: dict) -> ShardIndex:
    lines, skipped, damage = _scan(shard, signature["fields"])
    folders = _folders(shard)
    folder = next((f for f in folders if _writable(f)), None)
    if folder is None:
        raise DataError(f"shard {shard}: no writable folder for its DALI index (tried {' and '.join(folders)})")
    index = ShardIndex(shard, os.path.join(folder, f"{os.path.basename(shard)}.idx"), len(lines), skipped, signature,
                       damage)
    _write(index, lines)
    return index


def _write(index: ShardIndex, lines: list[str]) -> None:
    """The index, then its description: a description is only there once its index is complete."""
    write_lines(index.path, lines)
    write_json(index.path + ".json", {"signature": index.signature, "samples": index.samples,
                                      "skipped": index.skipped,
                                      "damage": index.damage.as_dict() if index.damage is not None else None})


def write_lines(path: str, lines: list[str]) -> None:
    """A DALI index file holding ``lines``."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f"v1.2 {len(lines)}\n")
        f.writelines(line + "\n" for line in lines)


def index_lines(index: ShardIndex) -> list[str]:
    with open(index.path) as f:
        return f.read().splitlines()[1:]


def shard_indexes(shards: list[str], fields: dict[str, int]) -> list[ShardIndex]:
    """Each shard's index for samples with an image, a caption and every array in ``fields`` (name ->
    element count): from the cache when it is current, else built and cached now."""
    start, built, indexes = time.perf_counter(), 0, []
    for shard in shards:
        signature = _signature(shard, fields)
        index = _cached(shard, signature)
        if index is None:
            index, built = _build(shard, signature), built + 1
        indexes.append(index)
    if built:
        print(f"[cid_ds] DALI: indexed {built} shard(s) in {time.perf_counter() - start:.1f} s "
              f"({os.path.dirname(indexes[-1].path)})", flush=True)
    return indexes


def exclude(index: ShardIndex, key: str, reason: str) -> None:
    """Leave ``key`` out of the index from now on (DALI's decoder failed on it), in place and on disk."""
    lines = [line for line in index_lines(index) if base_plus_ext(line.split(" ", 4)[3])[0] != key]
    index.samples = len(lines)
    index.skipped[key] = reason
    _write(index, lines)
