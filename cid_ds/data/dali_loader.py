"""The DALI loader: the second backend behind the batch contract (``cid_ds.data.batch.Batch``).

It reads distill-ready shards (``cid_ds.data.packed``) with ``fn.readers.webdataset`` and our own index
files (``cid_ds.data.shard_index``), decodes JPEGs with nvJPEG (``device="mixed"``) when a GPU is there
and on the CPU otherwise, and crops, resizes and normalises where it decoded. On the CPU the resize is
torchvision's uint8 kernel, called by the graph (``_resized_on_host``): DALI's CPU resampler is 3-4x
slower than Pillow's, which would make the CPU pipeline slower than the webdataset loader. Token ids, teacher
embeddings and cluster ids are the shards' raw little-endian bytes, read with their dtype and cast.
One pipeline function serves both devices; ``data_tools.extract`` uses it too (``read_shard``).

How it keeps the webdataset loader's promises:

* **Ranks.** Rank r reads ``LoaderSpec.rank_shards`` (the webdataset loader's split) with a reader of
  its own (``num_shards=1``), rather than DALI's ``shard_id``/``num_shards``, which splits the samples of
  all shards into contiguous ranges (so every rank would index every shard) and pads or wraps ranges
  of unequal length. An epoch is ``kept // batch_size`` full batches; DALI's shuffle buffer only draws
  from the current epoch, so those batches hold each sample at most once, and the next epoch's samples
  reach no batch we keep.
* **Order.** Fixed by (seed, epoch, rank, world size): the rank's shard list in ``rank_shards``' order,
  the reader's shuffle buffer (``shuffle_buffer`` samples) and the random
  crops have seeds drawn from the same values. Not by the thread count.
* **Bad samples.** DALI cannot drop a sample inside a batch, and a sample its decoder cannot read stops
  the pipeline. So the index leaves out what the webdataset loader would skip (no caption, an image PIL
  cannot open or a truncated one, a missing field), and a decoder failure all the same excludes the
  sample from its index and restarts the pipeline where it was. Both are counted in ``n_skipped`` and
  logged once per key with the shard.
* **Damaged shards.** A shard's index lists the samples before its damage (cid_ds.data.damage). The
  indexes are built before the epoch starts, so its first batch carries the rank's damage records in
  ``damaged_shards`` (the trainer counts them against ``data.max_damaged_fraction``, cid_ds.data.damage).
* **Resume.** ``skip_batches=N`` starts reading at sample ``N * batch_size`` of the rank's read order
  (whole shards dropped, the partly read one through a trimmed index), so nothing is decoded twice.
  Without shuffling it is exact; with it, the samples that were in the shuffle buffer at the cut (at
  most ``shuffle_buffer``) are missed and as many already seen are read again.
* **View replay.** With ``replay_views=N`` (``cid_ds.data.preprocess``) the reader also reads each
  sample's stored views (``v_img``, ``v_box``), and in epoch ``e`` the graph takes row
  ``replay_slot(e, N)`` of both, a constant per pipeline: only that view's box is decoded
  (``fn.decoders.image_slice``; ROI decoding with nvJPEG), resized to the preprocess's size and
  antialiased as PIL resizes, flipped where the view says so, and normalised; ``t_img`` is that view's
  teacher embedding. The webdataset loader replays the same view of the same sample in the same epoch.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
import re
import tempfile
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as F2
from torch.utils.dlpack import to_dlpack
from torchvision.transforms import InterpolationMode
from webdataset.tariterators import base_plus_ext

from cid_ds.data.batch import Batch, LoaderSpec
from cid_ds.data.errors import DataError
from cid_ds.data.packed import ARRAY_FIELDS, VIEW_ARRAYS
from cid_ds.data.preprocess import ImageSpec, check_stored_views, image_spec, replay_slot
from cid_ds.data.shard_index import ShardIndex, exclude, index_lines, shard_indexes, write_lines
from cid_ds.data.samples import IMAGE_EXTS, MAX_CAPTION_BYTES, caption_of, decode_image

_LOGGED: set[tuple[str, str]] = set()  # (shard, key) already logged by this process


def default_device_id() -> Optional[int]:
    """The current CUDA device (the trainer has set the rank's), or None: the CPU pipeline."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def _pipeline(paths: list[str], index_paths: list[str], spec: ImageSpec, fields: list[str], captions: bool,
              batch_size: int, threads: int, device_id: Optional[int], shuffle: int, seed: int,
              replay: Optional[tuple[int, int]] = None):
    """Outputs ``image`` (float [B,3,H,W]), ``source`` (the reader's "shard:offset:name", NUL-padded
    bytes), each of ``fields`` but the view arrays (int64 or float32), and with ``captions`` ``caption``
    (its first MAX_CAPTION_BYTES, NUL-padded) and ``caption_length``. Decoding and image work run on GPU
    ``device_id``, or on the CPU when it is None. ``replay`` (slot, stored views), with the view arrays
    in ``fields``: the image is stored view ``slot`` and ``t_img`` its embedding."""
    from nvidia.dali import Pipeline, fn, types
    dtypes = {np.dtype("<i4"): types.INT32, np.dtype("<f2"): types.FLOAT16}
    rng = random.Random(seed)
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=rng.getrandbits(31))
    with pipe:
        # Our index lists complete samples only: a missing component means a stale index, an error.
        encoded, *arrays = fn.readers.webdataset(
            paths=paths, index_paths=index_paths, name="reader", missing_component_behavior="error",
            ext=[";".join(IMAGE_EXTS), *fields] + (["txt"] if captions else []),
            dtypes=[types.UINT8, *(dtypes[ARRAY_FIELDS[f]] for f in fields)] + ([types.UINT8] if captions else []),
            random_shuffle=shuffle > 1, initial_fill=max(shuffle, 1), seed=rng.getrandbits(31))
        named = dict(zip(fields, arrays))
        device = "cpu" if device_id is None else "mixed"
        if replay is None:
            images = _image_view(encoded, spec, device)
        else:
            slot, views = replay
            images = _replayed_view(encoded, fn.reshape(named["v_box"], shape=[views, 5])[slot], spec, device)
            named["t_img"] = fn.reshape(named["v_img"], shape=[views, -1])[slot]
        outputs = [images, fn.pad(fn.get_property(encoded, key="source_info"), fill_value=0)]
        for name in _array_outputs(fields):
            values = fn.cast(named[name], dtype=types.FLOAT if ARRAY_FIELDS[name].kind == "f" else types.INT64)
            outputs.append(values if device_id is None else values.gpu())
        if captions:
            text = arrays[-1][:MAX_CAPTION_BYTES]
            outputs += [fn.pad(text, fill_value=0), text.shape()]
        pipe.set_outputs(*outputs)
    return pipe


def _image_view(encoded, spec: ImageSpec, device: str):
    """Decode (``device`` "mixed": nvJPEG on the GPU) and make the student's view, as torchvision would.
    EXIF orientation is ignored, as PIL (and so the teacher's extraction) ignores it."""
    from nvidia.dali import fn, math, types
    decoding = dict(device=device, output_type=types.RGB, adjust_orientation=False)
    if device == "cpu":
        return _normalized(_host_view(encoded, spec, decoding), spec)
    interpolation = _interpolation(spec)
    images = fn.decoders.image(encoded, **decoding)
    if spec.crop_scale is not None:
        images = fn.random_resized_crop(images, size=spec.size, random_area=spec.crop_scale,
                                        random_aspect_ratio=spec.crop_ratio, interp_type=interpolation)
    else:
        # torchvision's arithmetic, not DALI's resize_shorter and centred crop: the longer side is
        # truncated, not rounded, and the crop offset rounds half to even; either one is a pixel's shift.
        shape = fn.peek_image_shape(encoded, adjust_orientation=False)
        height, width = shape[0], shape[1]
        shorter = math.min(height, width)
        height, width = height * spec.resize // shorter, width * spec.resize // shorter
        images = fn.resize(images, resize_y=fn.cast(height, dtype=types.FLOAT),
                           resize_x=fn.cast(width, dtype=types.FLOAT), interp_type=interpolation)
        anchor = fn.stack(_half_to_even(height - spec.size[0]), _half_to_even(width - spec.size[1]))
        images = fn.slice(images, fn.cast(anchor, dtype=types.INT32), np.array(spec.size, dtype=np.int32),
                          axis_names="HW")
    return _normalized(images, spec)


def _host_view(encoded, spec: ImageSpec, decoding: dict):
    """The CPU pipeline's view, uint8 HWC: decoded by DALI, resized by torchvision (``_resized_on_host``).
    A training view's box is drawn by the decoder, which decodes only that box."""
    from nvidia.dali import fn
    if spec.crop_scale is not None:
        images = fn.decoders.image_random_crop(encoded, random_area=spec.crop_scale,
                                               random_aspect_ratio=spec.crop_ratio, **decoding)
        return _resized_on_host(images, _to_size(spec))
    mode = InterpolationMode(spec.interpolation)

    def shorter_then_centre(image: torch.Tensor) -> torch.Tensor:
        return F2.center_crop(F2.resize(image, [spec.resize], mode, antialias=True), list(spec.size))
    return _resized_on_host(fn.decoders.image(encoded, **decoding), shorter_then_centre)


def _to_size(spec: ImageSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    return functools.partial(F2.resize, size=list(spec.size), interpolation=InterpolationMode(spec.interpolation),
                             antialias=True)


def _resized_on_host(images, view: Callable[[torch.Tensor], torch.Tensor]):
    """``view`` (uint8 CHW -> uint8 CHW) applied by torch to each uint8 HWC image of the batch, inside the
    graph. DALI's CPU resampler takes about 5 ms per antialiased bicubic 224-px view (Pillow 1.5 ms);
    torchvision's uint8 tensor kernels take 0.3 ms and stay within one level of PIL."""
    from nvidia.dali import fn

    def each(hwc_images: list) -> list:
        return [to_dlpack(view(torch.from_dlpack(image).permute(2, 0, 1)).permute(1, 2, 0).contiguous())
                for image in hwc_images]
    return fn.dl_tensor_python_function(images, function=each, batch_processing=True, output_layouts="HWC")


def _replayed_view(encoded, view, spec: ImageSpec, device: str):
    """A stored view (int32 [5]: top, left, height, width, flip) as ``ViewTransform`` makes it with PIL:
    decode only the box, resize it to the spec's size (antialiased when shrinking, as PIL), flip."""
    from nvidia.dali import fn, types
    images = fn.decoders.image_slice(encoded, view[0:2], view[2:4], axis_names="HW", device=device,
                                     output_type=types.RGB, adjust_orientation=False)
    if device == "cpu":
        images = _resized_on_host(images, _to_size(spec))
    else:
        images = fn.resize(images, resize_y=float(spec.size[0]), resize_x=float(spec.size[1]),
                           interp_type=_interpolation(spec), antialias=True)
    return _normalized(images, spec, mirror=view[4])


def _interpolation(spec: ImageSpec):
    from nvidia.dali import types
    return {"nearest": types.INTERP_NN, "bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
            "lanczos": types.INTERP_LANCZOS3}[spec.interpolation]


def _normalized(images, spec: ImageSpec, mirror=0):
    """Float CHW, normalised by the spec; ``mirror`` 1 (a constant or per-sample input) flips horizontally."""
    from nvidia.dali import fn, types
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std])


def _half_to_even(margin):
    """Python's round(margin / 2) in DALI integer arithmetic: torchvision's CenterCrop offset."""
    half = margin // 2
    return half + (margin & 1) * (half & 1)


def _array_outputs(fields: list[str]) -> list[str]:
    """The arrays a pipeline outputs: the view arrays are read only to pick the replayed view."""
    return [name for name in fields if name not in VIEW_ARRAYS]


def _output_names(fields: list[str], captions: bool) -> list[str]:
    return ["image", "source", *_array_outputs(fields)] + (["caption", "caption_length"] if captions else [])


def _split_source(source: str, shards: set[str]) -> tuple[str, str]:
    """``(shard, key)`` of a DALI source_info ``SHARD:OFFSET:NAME`` (a path may hold colons too)."""
    for colon in (m.start() for m in re.finditer(":", source)):
        if source[:colon] in shards:
            return source[:colon], base_plus_ext(source[colon + 1:].split(":", 1)[1])[0]
    raise ValueError(f"DALI source {source!r} names none of the shards read")


def _strings(rows: torch.Tensor) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode() for row in rows.numpy()]


def _read_order(indexes: list[ShardIndex]) -> Iterator[tuple[ShardIndex, str]]:
    return ((index, line) for index in indexes for line in index_lines(index))


def _readers_from(indexes: list[ShardIndex], start: int, folder: str) -> tuple[list[str], list[str]]:
    """Shard and index paths that read ``indexes`` from sample ``start`` of their read order on: the
    shards before it dropped, the one it falls in through a trimmed index written in ``folder``."""
    paths, index_paths, position = [], [], 0
    for index in indexes:
        first, position = max(0, start - position), position + index.samples
        if first >= index.samples:
            continue
        index_path = index.path
        if first:
            index_path = os.path.join(folder, "resume.idx")
            write_lines(index_path, index_lines(index)[first:])
        paths.append(index.shard)
        index_paths.append(index_path)
    return paths, index_paths


def _log_skipped(index: ShardIndex, key: str) -> None:
    if (index.shard, key) not in _LOGGED:
        _LOGGED.add((index.shard, key))
        print(f"[cid_ds] DALI: shard {index.shard} key {key}: skipped, {index.skipped[key]}", flush=True)


def _exclude_failed(error: RuntimeError, indexes: list[ShardIndex], start: int, window: int) -> int:
    """After a decoder failure: exclude the sample DALI names, or, when it names none, the samples PIL
    cannot decode among the ``window`` read from ``start`` on. Returns how many were excluded."""
    by_shard = {index.shard: index for index in indexes}
    named = re.search(r"Failed to decode sample #\d+ : (.*)", str(error))
    if named is not None:
        shard, key = _split_source(named.group(1).strip(), set(by_shard))
        bad = [(by_shard[shard], key)]
    else:
        candidates = list(itertools.islice(_read_order(indexes), start, start + window))
        bad = [(index, base_plus_ext(line.split(" ")[3])[0]) for index, line in candidates
               if decode_image({line.split(" ")[0]: _first_component(index.shard, line)}) is None]
        if not bad:
            shards = sorted({index.shard for index, _ in candidates})
            raise DataError(f"DALI failed in shard(s) {shards}, and PIL decodes every image it may have been "
                            f"reading, so no sample can be blamed:\n{error}")
    for index, key in bad:
        exclude(index, key, "DALI could not decode the image")
        _log_skipped(index, key)
    return len(bad)


def _first_component(shard: str, line: str) -> bytes:
    """The bytes of the first component (the image) an index line lists."""
    _, offset, size = line.split(" ")[:3]
    with open(shard, "rb") as f:
        f.seek(int(offset))
        return f.read(int(size))


def _pipeline_batches(indexes: list[ShardIndex], start: int, batch_size: int, shuffle: int,
                      make: Callable[[list[str], list[str]], object], names: list[str]) -> Iterator[tuple[dict, int]]:
    """``(outputs, excluded)`` batch after batch, reading from sample ``start``, with ``excluded`` the
    samples dropped since the previous batch. On a decoder failure the culprit leaves its index and a
    new pipeline starts where the batches delivered so far end. Ends when nothing is left to read;
    runs on into the next epoch otherwise (the caller stops)."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator
    delivered, excluded = 0, 0
    while True:
        with tempfile.TemporaryDirectory() as folder:
            paths, index_paths = _readers_from(indexes, start + delivered * batch_size, folder)
            if not paths:
                return
            pipe = make(paths, index_paths)
            pipe.build()  # reads the index files
        try:
            for outputs in DALIGenericIterator([pipe], names):
                yield outputs[0], excluded
                delivered, excluded = delivered + 1, 0
        except RuntimeError as e:
            # The failing batch came from the shuffle buffer (read up to `shuffle` samples before or
            # after the delivered ones) or from the batches in flight in the prefetch queues.
            position = start + delivered * batch_size
            excluded += _exclude_failed(e, indexes, max(0, position - shuffle), 2 * shuffle + 4 * batch_size)


def build_dali_loader(spec: LoaderSpec, device_id: Union[int, None, str] = "auto") -> Iterator[Batch]:
    """One epoch of ``spec``'s full batches from packed shards, in the webdataset loader's batch contract
    (cid_ds.data.batch): ``image`` (on the GPU with one), ``tokens``, ``key``, ``n_skipped``,
    ``damaged_shards``, ``t_img``, ``t_txt``, ``cluster`` (int64 [B] top-1, or [B, topk]) when the shards
    were packed with clusters, and with a teacher tokenizer ``teacher_tokens``. ``spec.workers`` DALI CPU
    threads; ``device_id`` "auto" (the current GPU, else the CPU), a CUDA device, or None for the CPU. The
    module docstring says how epochs, order, bad samples and ``skip_batches`` behave."""
    shards, tokenizer, batch_size = spec.shards, spec.tokenizer, spec.batch_size
    epoch, seed, rank, replay_views = spec.epoch, spec.seed, spec.rank, spec.replay_views
    packed = spec.side_data().packed
    if packed is None:
        raise DataError(f"the DALI loader reads distill-ready shards (data_tools.pack), and {shards[:1]} has no "
                        "packed manifest.json beside it; use data.backend=wds for plain shards")
    if replay_views:
        check_stored_views(replay_views, packed.views, packed.manifest_path)
    replay = (replay_slot(epoch, replay_views), packed.views) if replay_views else None
    fields = [name for name in packed.lengths() if replay or name not in VIEW_ARRAYS]
    retokenize = not packed.tokens_usable(tokenizer)
    captions = retokenize or spec.teacher_tokenizer is not None
    rank_shards = spec.rank_shards()
    # indexed for every field the manifest promises, whether read or not: one index serves replaying and
    # non-replaying runs (an ablation alternating them would otherwise rescan every shard per run)
    indexes = shard_indexes(rank_shards, packed.lengths())
    shard_set = set(rank_shards)
    image = image_spec(spec.preprocess)
    device_id = default_device_id() if device_id == "auto" else device_id

    def make(paths: list[str], index_paths: list[str]):
        return _pipeline(paths, index_paths, image, fields, captions, batch_size, max(1, spec.workers), device_id,
                         spec.shuffle_buffer, seed=random.Random(f"dali:{seed}:{epoch}:{rank}").getrandbits(63),
                         replay=replay)

    def epoch_batches() -> Iterator[dict]:
        start = spec.skip_batches * batch_size
        # skipped samples are counted when the reader reaches their shard (those before `start` were)
        pending, position = [], 0
        for index in indexes:
            if position >= start:
                pending.append((position, index))
            position += index.samples
        outputs = _pipeline_batches(indexes, start, batch_size, spec.shuffle_buffer, make, _output_names(fields, captions))
        for number in itertools.count(spec.skip_batches):
            if number >= sum(index.samples for index in indexes) // batch_size:
                return
            out, excluded = next(outputs, (None, 0))
            if out is None:
                return
            reached = [index for at, index in pending if at < (number + 1) * batch_size]
            pending = pending[len(reached):]
            for index in reached:
                for key in index.skipped:
                    _log_skipped(index, key)
            n_skipped = excluded + sum(len(index.skipped) for index in reached)
            batch = _batch(out, shard_set, n_skipped, tokenizer if retokenize else None, spec.teacher_tokenizer)
            batch["damaged_shards"] = [index.damage for index in indexes if index.damage is not None] \
                if number == spec.skip_batches else []
            yield batch

    return epoch_batches()


def _captions(out: dict) -> list[str]:
    return [caption_of({"txt": bytes(row[:n])})
            for row, n in zip(out["caption"].numpy(), out["caption_length"].view(-1).tolist())]


def _batch(out: dict, shards: set[str], n_skipped: int, tokenizer: Optional[Callable],
           teacher_tokenizer: Optional[Callable]) -> Batch:
    """The batch (less ``damaged_shards``, which the epoch adds) from the pipeline's outputs; ``tokenizer`` set:
    tokens from the captions."""
    batch = {"image": out["image"], "tokens": out["tokens"],
             "key": [_split_source(source, shards)[1] for source in _strings(out["source"])],
             "n_skipped": n_skipped}
    if "caption" in out:
        texts = _captions(out)
        if tokenizer is not None:
            batch["tokens"] = tokenizer(texts)
        if teacher_tokenizer is not None:
            batch["teacher_tokens"] = teacher_tokenizer(texts)
    batch["t_img"], batch["t_txt"] = out["t_img"], out["t_txt"]
    if "cluster" in out:
        batch["cluster"] = out["cluster"][:, 0] if out["cluster"].shape[1] == 1 else out["cluster"]
    return batch


ExtractBatch = tuple[list[str], torch.Tensor, list[str]]  # keys, images, captions


def read_shard(shard: str, preprocess: Callable, batch_size: int, threads: int,
               device_id: Union[int, None, str] = "auto") -> tuple[ShardIndex, Iterator[ExtractBatch]]:
    """For ``data_tools.extract``: ``(index, batches)`` of a plain (img2dataset) shard, its usable
    samples in tar order as ``(keys, images, captions)``, the last batch short. ``index.skipped``
    (key -> reason) is complete once the batches are."""
    index = shard_indexes([shard], {})[0]
    spec = image_spec(preprocess)
    device_id = default_device_id() if device_id == "auto" else device_id

    def make(paths: list[str], index_paths: list[str]):
        return _pipeline(paths, index_paths, spec, [], True, batch_size, max(1, threads), device_id, 0, seed=0)

    def batches() -> Iterator[ExtractBatch]:
        outputs = _pipeline_batches([index], 0, batch_size, 0, make, _output_names([], True))
        for number in itertools.count():
            left = index.samples - number * batch_size  # the reader wraps round: the rest is the next epoch
            out, _ = next(outputs, (None, 0)) if left > 0 else (None, 0)
            if out is None:
                return
            keys = [_split_source(source, {shard})[1] for source in _strings(out["source"])[:left]]
            yield keys, out["image"][:left], _captions(out)[:left]

    return index, batches()
