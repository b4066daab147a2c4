"""Evaluation of an open_clip model on clip_benchmark ``wds/`` folders: zero-shot classification,
retrieval, and a linear probe.

A set folder holds ``test/0.tar .. test/{N-1}.tar`` and ``test/nshards.txt`` (N); a classification set
with a ``train/`` split in the same layout also gets a linear probe on frozen image features
(``cid_ds.linear_probe``).

* Classification sets: samples are an image (jpg/jpeg/png/webp) + ``.cls`` (class index as text), with
  ``classnames.txt`` (one name per line, in index order) and ``zeroshot_classification_templates.txt``
  (one template per line, ``{c}`` is replaced by the class name) beside ``test/``.
* Retrieval sets: ``dataset_type.txt`` says ``retrieval``; samples are an image + ``.txt`` holding one
  caption per line (clip_benchmark splits the ``.txt`` with ``str.splitlines``).

Metrics follow clip_benchmark: a class embedding is the re-normalised mean of its normalised template
embeddings; retrieval Recall@k counts a query as found when any of its positives is in the top k.
clip_benchmark's ``image_retrieval_recall@k`` is ``text_to_image_R@k`` here, ``text_retrieval_recall@k``
is ``image_to_text_R@k``.

A damaged shard (cid_ds.data.damage) is read up to its damage; the set's result lists it under
``damaged_shards`` (file, byte, samples kept). More damaged shards in a set than ``max_damaged_fraction``
accepts stop the evaluation.

    python -m cid_ds.evaluate --model local-dir:runs/x/export --sets data/eval/shapes data/eval/captions
"""
from __future__ import annotations

import argparse
import functools
import io
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION, DamageBudget, ShardDamage, TooMuchDamage
from cid_ds.data.tars import samples_until_damage
from cid_ds.io import OutputNotWritable, check_writable, write_json
from cid_ds.linear_probe import linear_probe
from cid_ds.models import create_model
from cid_ds.safe_load import UnsafeCheckpoint

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RECALL_KS = (1, 5, 10)
TOP_K = 5
CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"


@dataclass
class EvalSet:
    name: str
    path: str
    kind: str                     # "zeroshot_classification" | "retrieval"
    shards: list[str]
    train_shards: list[str] = field(default_factory=list)  # linear probe; empty when the set has no train split
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)


def read_lines(path: str) -> list[str]:
    """Stripped lines of a text file; blank lines are an error (they would shift class indices)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file missing")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty")
    for number, line in enumerate(lines, 1):
        if not line:
            raise ValueError(f"{path}: line {number} is blank")
    return lines


def split_shards(path: str, split: str) -> list[str]:
    """The tars of ``path/split`` as its ``nshards.txt`` lists them; each must exist."""
    nshards_path = os.path.join(path, split, "nshards.txt")
    if not os.path.isfile(nshards_path):
        raise ValueError(f"{nshards_path}: file missing ({path} is not a clip_benchmark wds/ set folder)")
    with open(nshards_path) as f:
        text = f.read().strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{nshards_path}: expected a positive integer, got {text!r}")
    shards = [os.path.join(path, split, f"{i}.tar") for i in range(int(text))]
    for shard in shards:
        if not os.path.isfile(shard):
            raise ValueError(f"{shard}: file missing ({nshards_path} says {text} shards)")
    return shards


def read_set(path: str) -> EvalSet:
    """Check a set folder's layout and read its metadata (no image is read)."""
    name = os.path.basename(os.path.normpath(path))
    shards = split_shards(path, "test")

    type_path = os.path.join(path, DATASET_TYPE)
    declared = read_lines(type_path)[0].lower() if os.path.isfile(type_path) else "classification"
    if declared == "retrieval":
        return EvalSet(name, path, "retrieval", shards)
    if declared != "classification":
        raise ValueError(f"{type_path}: unsupported dataset type {declared!r} (expected retrieval or classification)")

    classnames = read_lines(os.path.join(path, CLASSNAMES))
    templates_path = os.path.join(path, TEMPLATES)
    templates = read_lines(templates_path)
    for number, template in enumerate(templates, 1):
        if "{c}" not in template:
            raise ValueError(f"{templates_path}: line {number} {template!r} has no {{c}} placeholder")
    train_shards = split_shards(path, "train") if os.path.isdir(os.path.join(path, "train")) else []
    return EvalSet(name, path, "zeroshot_classification", shards, train_shards, classnames, templates)


def _decode(sample: dict, preprocess: Callable, label_ext: str, num_classes: int) -> tuple:
    where = f"{sample['__url__']}: {sample['__key__']}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        raise ValueError(f"{where} has no image ({'/'.join(IMAGE_EXTENSIONS)})")
    if label_ext not in sample:
        raise ValueError(f"{where} has no .{label_ext}")
    try:
        with Image.open(io.BytesIO(sample[image_ext])) as image:
            pixels = preprocess(image.convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}.{image_ext}: cannot decode image: {e}") from None

    text = sample[label_ext].decode("utf-8", errors="replace")
    if label_ext == "txt":
        captions = [line.strip() for line in text.splitlines() if line.strip()]
        if not captions:
            raise ValueError(f"{where}.txt: no caption")
        return pixels, captions
    if not text.strip().lstrip("-").isdigit():
        raise ValueError(f"{where}.cls: expected an integer class index, got {text.strip()!r}")
    label = int(text)
    if not 0 <= label < num_classes:
        raise ValueError(f"{where}.cls: class index {label} is out of range for {num_classes} classes")
    return pixels, label


def _read_shards(shards: Iterator[dict]) -> Iterator[dict]:
    """A pipeline stage: the samples of each shard up to any damage, then the damage record as an item
    of its own (``_decode_or_damage`` and ``_collate`` pass it through to the main process)."""
    for shard in shards:
        damaged: list[ShardDamage] = []
        yield from samples_until_damage(shard["url"], damaged)
        yield from ({"damage": record} for record in damaged)


def _decode_or_damage(sample: dict, **decode) -> tuple | ShardDamage:
    return sample["damage"] if "damage" in sample else _decode(sample, **decode)


def _collate(items: list) -> tuple[Optional[torch.Tensor], list, list[ShardDamage]]:
    samples = [item for item in items if not isinstance(item, ShardDamage)]
    damage = [item for item in items if isinstance(item, ShardDamage)]
    images = torch.stack([pixels for pixels, _ in samples]) if samples else None
    return images, [label for _, label in samples], damage


def _batches(eval_set: EvalSet, preprocess: Callable, batch_size: int, workers: int, budget: DamageBudget,
             split: str = "test") -> Iterator[tuple[torch.Tensor, list]]:
    """Preprocessed ``(images, labels)`` batches of a split; labels are class indices or lists of captions.
    Damaged shards are counted in ``budget``.

    With workers the shards are split between them, so sample order changes but pairs stay together.
    """
    label_ext = "txt" if eval_set.kind == "retrieval" else "cls"
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(eval_set.shards if split == "test" else eval_set.train_shards),
        wds.split_by_worker,
        _read_shards,
        wds.map(functools.partial(_decode_or_damage, preprocess=preprocess, label_ext=label_ext,
                                  num_classes=len(eval_set.classnames))),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
    )
    for images, labels, damage in DataLoader(pipeline, batch_size=None, num_workers=workers):
        for record in damage:
            budget.add(record)
        if images is not None:
            yield images, labels


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def encode_images(model: nn.Module, images: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    features = model.encode_image(images.to(device, _model_dtype(model)))
    return F.normalize(features.float(), dim=-1)


def encode_texts(model: nn.Module, tokenizer: Callable, texts: list[str], device: str | torch.device,
                 batch_size: int) -> torch.Tensor:
    features = [model.encode_text(tokenizer(texts[i:i + batch_size]).to(device))
                for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(features).float(), dim=-1)


def zeroshot_classifier(model: nn.Module, tokenizer: Callable, classnames: list[str], templates: list[str],
                        device: str | torch.device, batch_size: int) -> torch.Tensor:
    """``[C, D]`` class embeddings: mean of the normalised template embeddings, normalised again."""
    texts = [template.replace("{c}", name) for name in classnames for template in templates]
    per_template = encode_texts(model, tokenizer, texts, device, batch_size)
    return F.normalize(per_template.view(len(classnames), len(templates), -1).mean(dim=1), dim=-1)


def _classification(model: nn.Module, preprocess: Callable, tokenizer: Callable, eval_set: EvalSet,
                    batch_size: int, device: str | torch.device, workers: int, budget: DamageBudget) -> dict:
    classifier = zeroshot_classifier(model, tokenizer, eval_set.classnames, eval_set.templates, device,
                                     batch_size)
    k = min(TOP_K, len(eval_set.classnames))
    features, labels = _image_features(model, preprocess, eval_set, batch_size, device, workers, budget, "test")
    hits = (features @ classifier.T).topk(k, dim=1).indices == labels[:, None]
    result = {"type": "zeroshot_classification", "top1": int(hits[:, 0].sum()) / len(labels)}
    if k > 1:  # with fewer than 5 classes this is top-C, and named so
        result[f"top{k}"] = int(hits.any(dim=1).sum()) / len(labels)
    if eval_set.train_shards:
        train_features, train_labels = _image_features(model, preprocess, eval_set, batch_size, device, workers,
                                                       budget, "train")
        result.update(linear_probe(train_features, train_labels, features, labels, len(eval_set.classnames)))
    return {**result, "samples": len(labels), "classes": len(eval_set.classnames)}


def _image_features(model: nn.Module, preprocess: Callable, eval_set: EvalSet, batch_size: int,
                    device: str | torch.device, workers: int, budget: DamageBudget, split: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features [N, D] and class indices [N] of a classification split."""
    features, labels = [], []
    for images, batch_labels in _batches(eval_set, preprocess, batch_size, workers, budget, split):
        features.append(encode_images(model, images, device))
        labels += batch_labels
    if not labels:
        raise ValueError(f"{os.path.join(eval_set.path, split)}: the shards hold no samples")
    return torch.cat(features), torch.tensor(labels, device=features[0].device)


def _top_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """``[Q, k]`` indices of the k most similar keys per query, a chunk of queries at a time."""
    return torch.cat([(queries[i:i + chunk] @ keys.T).topk(k, dim=1).indices
                      for i in range(0, len(queries), chunk)])


def _retrieval(model: nn.Module, preprocess: Callable, tokenizer: Callable, eval_set: EvalSet,
               batch_size: int, device: str | torch.device, workers: int, budget: DamageBudget) -> dict:
    image_features, text_features, text_owner = [], [], []
    for images, captions in _batches(eval_set, preprocess, batch_size, workers, budget):
        first = sum(len(f) for f in image_features)
        image_features.append(encode_images(model, images, device))
        text_features.append(encode_texts(model, tokenizer, [c for cs in captions for c in cs], device,
                                          batch_size))
        text_owner += [first + i for i, cs in enumerate(captions) for _ in cs]
    if not image_features:
        raise ValueError(f"{os.path.join(eval_set.path, 'test')}: the shards hold no samples")
    images, texts = torch.cat(image_features), torch.cat(text_features)
    owner = torch.tensor(text_owner, device=images.device)

    max_k = max(RECALL_KS)
    image_hits = _top_indices(texts, images, min(max_k, len(images))) == owner[:, None]
    caption_hits = owner[_top_indices(images, texts, min(max_k, len(texts)))] \
        == torch.arange(len(images), device=images.device)[:, None]
    result = {"type": "retrieval"}
    for k in RECALL_KS:
        result[f"image_to_text_R@{k}"] = int(caption_hits[:, :k].any(dim=1).sum()) / len(images)
    for k in RECALL_KS:
        result[f"text_to_image_R@{k}"] = int(image_hits[:, :k].any(dim=1).sum()) / len(texts)
    return {**result, "images": len(images), "texts": len(texts)}


def evaluate(model: nn.Module, preprocess: Callable, tokenizer: Callable, sets: list[str],
             batch_size: int = 256, device: str | torch.device = "cpu", workers: int = 0,
             max_damaged_fraction: float = DEFAULT_MAX_DAMAGED_FRACTION) -> dict:
    """Zero-shot metrics of an open_clip model (already on ``device``) for each set folder, keyed by the
    folder name, with ``damaged_shards`` where a set has damaged shards. Every folder's layout is checked
    before the model runs; the model's train/eval mode is restored afterwards."""
    eval_sets = [read_set(path) for path in sets]
    names = [s.name for s in eval_sets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several eval sets are named {duplicates}: results are keyed by folder name")

    was_training = model.training
    model.eval()
    results = {}
    try:
        with torch.inference_mode():
            for eval_set in eval_sets:
                run = _retrieval if eval_set.kind == "retrieval" else _classification
                budget = DamageBudget(len(eval_set.shards) + len(eval_set.train_shards), max_damaged_fraction,
                                      "--max-damaged-fraction")
                results[eval_set.name] = run(model, preprocess, tokenizer, eval_set, batch_size, device, workers,
                                             budget)
                if budget.damaged:
                    results[eval_set.name]["damaged_shards"] = [r.as_dict() for r in budget.damaged.values()]
    finally:
        model.train(was_training)
    return results


def headline(results: dict) -> dict[str, float]:
    """The numbers a comparison table shows per set: zero-shot top-1 (and linear probe top-1) for
    classification, R@1 both ways for retrieval."""
    numbers = {}
    for name, metrics in results.items():
        if metrics["type"] == "retrieval":
            numbers[f"{name} i2t R@1"] = metrics["image_to_text_R@1"]
            numbers[f"{name} t2i R@1"] = metrics["text_to_image_R@1"]
        else:
            numbers[f"{name} top-1"] = metrics["top1"]
            if "linear_probe_top1" in metrics:
                numbers[f"{name} probe top-1"] = metrics["linear_probe_top1"]
    return numbers


def format_table(results: dict) -> str:
    rows = [("set", "metric", "value")]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            if metric == "damaged_shards":
                rows.append((name, metric, ", ".join(f"{d['shard']} at byte {d['byte']}" for d in value)))
            elif metric != "type":
                rows.append((name, metric, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cid_ds.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="open_clip name, local-dir:PATH (e.g. an export) or ds_configs/models/<name>")
    parser.add_argument("--pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    parser.add_argument("--sets", nargs="+", required=True, help="clip_benchmark wds/ set folders")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-damaged-fraction", type=float, default=DEFAULT_MAX_DAMAGED_FRACTION,
                        help="damaged shards of a set are recorded and read up to their damage; more than this "
                             "fraction of them (at least one is accepted) stops the evaluation")
    args = parser.parse_args(argv)

    for path in args.sets:  # a layout error should not wait for the model to load
        read_set(path)
    try:
        if args.out:
            check_writable(os.path.dirname(os.path.abspath(args.out)))
        model, _, preprocess, tokenizer = create_model(args.model, args.pretrained, device=args.device)
    except (OutputNotWritable, UnsafeCheckpoint) as e:
        raise SystemExit(f"evaluate: {e}") from None
    try:
        results = evaluate(model, preprocess, tokenizer, args.sets, args.batch_size, args.device, args.workers,
                           args.max_damaged_fraction)
    except TooMuchDamage as e:
        raise SystemExit(f"evaluate: {e}") from None
    print(format_table(results))
    if args.out:
        write_json(args.out, {"model": args.model, "pretrained": args.pretrained, "results": results})
    return results


if __name__ == "__main__":
    main()
