"""Webdataset samples of a local uncompressed tar, read ten times faster than through ``tarfile``.

Python's ``tarfile`` builds a TarInfo per member (about 30 µs); for a packed sample of 6-7 small members
that was 23 ms of loader CPU per batch of 128, taken from the training step's cores. This reader parses
the 512-byte headers itself (ustar, GNU long names, pax path/size records; checksums verified) and groups
members into samples as webdataset's ``tarfile_to_samples`` does: the key is the name up to the first dot
of its base name, the lower-cased rest is the field, a key's members are consecutive, ``__*__`` metadata
and non-regular members are skipped. A compressed tar falls back to webdataset itself.
"""
from __future__ import annotations

import re
from typing import BinaryIO, Iterator, Optional

from webdataset.tariterators import base_plus_ext

BLOCK = 512
REGULAR = (b"0", b"\0", b"7")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")
_META = re.compile(r"__[^/]*__($|/)")


class TarFormatError(ValueError):
    """The file is not a readable tar: the message says where."""


def _octal(field: bytes, path: str, offset: int) -> int:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"{path}: bad header at byte {offset}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _members(f: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every regular member, in tar order."""
    offset, long_name, pax = 0, None, {}
    while True:
        header = f.read(BLOCK)
        if len(header) < BLOCK or header.count(0) == BLOCK:  # end-of-archive blocks, or a tar without them
            if not header and offset == 0:
                raise TarFormatError(f"{path}: empty file")
            if header and header.count(0) != len(header):
                raise TarFormatError(f"{path}: truncated header at byte {offset}")
            return
        stored = _octal(header[148:156], path, offset)
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise TarFormatError(f"{path}: header checksum mismatch at byte {offset}")
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136], path, offset)
        kind = header[156:157]
        padded = size + -size % BLOCK
        data = f.read(padded)
        if len(data) < padded:
            raise TarFormatError(f"{path}: member at byte {offset} is truncated ({len(data)} of {padded} bytes)")
        data = data[:size] if padded != size else data
        offset += BLOCK + padded
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":
            try:
                pax = _pax_records(data)
            except (ValueError, UnicodeDecodeError):
                raise TarFormatError(f"{path}: bad pax header at byte {offset - BLOCK - padded}") from None
            continue
        if kind == b"S":
            raise TarFormatError(f"{path}: sparse member at byte {offset - BLOCK - padded} (not written by shard writers)")
        if kind in (b"g", b"K"):
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind in REGULAR:
            yield name, data


def tar_samples(path: str) -> Iterator[dict]:
    """``{field: bytes, "__key__": key, "__url__": path}`` per sample of a local tar."""
    with open(path, "rb", buffering=1 << 20) as f:
        if f.read(6).startswith(COMPRESSED_MAGIC):
            yield from _webdataset_samples(path)
            return
        f.seek(0)
        sample: Optional[dict] = None
        for name, data in _members(f, path):
            if "/" not in name and name.startswith("__") and name.endswith("__") or _META.match(name):
                continue
            key, field = base_plus_ext(name)
            if key is None:
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": path}
            field = field.lower()
            if field in sample:
                raise TarFormatError(f"{path}: {name}: duplicate file name in the tar")
            sample[field] = data
        if sample is not None:
            yield sample


def _webdataset_samples(path: str) -> Iterator[dict]:
    import webdataset as wds
    yield from wds.tarfile_to_samples()([{"url": path}])
