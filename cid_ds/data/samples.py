"""A webdataset sample as cid_ds reads it: ``{ext: bytes, "__key__", "__url__"}`` from a shard, its caption
and its image. The training loaders, extract, pack and the DALI shard index share these rules."""
from __future__ import annotations

import io
from typing import Iterable, Iterator, Optional

from PIL import Image

from cid_ds.data.damage import ShardDamage
from cid_ds.data.tars import samples_until_damage

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_samples(shards: Iterable[str], damaged: Optional[list[ShardDamage]] = None) -> Iterator[dict]:
    """Raw samples of the shards in order: ``{ext: bytes, "__key__": str, "__url__": shard}``; a damaged
    shard's up to the damage, recorded in ``damaged`` (and printed)."""
    damaged = [] if damaged is None else damaged
    for shard in shards:
        yield from samples_until_damage(shard, damaged)


# Tokenizers keep only the first context_length (77 for CLIP) tokens; BPE over a runaway caption (a
# scraped 10 MB page) would stall a worker for minutes, so only its head is kept.
MAX_CAPTION_BYTES = 4096


def caption_of(sample: dict) -> Optional[str]:
    """The sample's caption (non-UTF-8 bytes replaced, at most ``MAX_CAPTION_BYTES`` read), or None
    when it has no ``.txt`` or only whitespace."""
    raw = sample.get("txt")
    text = raw[:MAX_CAPTION_BYTES].decode("utf-8", errors="replace").strip() if raw is not None else ""
    return text or None


def decode_image(sample: dict) -> Optional[Image.Image]:
    """The sample's image, fully decoded, or None when it has none or PIL cannot read it."""
    data = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
    if data is None:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except DECODE_ERRORS:
        return None
    return image
