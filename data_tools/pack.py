"""Write the distill-ready shards: the kept samples with everything the trainer reads, in one place.

  python -m data_tools.pack --shards '/data/laion/{00000..41407}.tar' --features /data/feats \\
      --tokenizer ViT-B-16 --out /data/distill [--clusters /data/clusters] [--balance /data/balance] \\
      [--ranks 8] [--workers 1] [--samples-per-shard S]

Each output sample holds the source image bytes (not re-encoded), the caption, its token ids (by the
``--tokenizer`` model's tokenizer: the student's), the teacher's image and caption embeddings from the
feature cache (and its stored views, when extracted with ``--views``), and, with ``--clusters``, the
sample's cluster ids; the format is in
``cid_ds.data.packed``. With ``--balance`` only the samples the balance stage kept are written; without
it, every sample the feature cache holds.

The training loader gives each rank whole shards (``shards[rank::world_size]``) and each of its DataLoader
workers a slice of those: ranks x workers readers. Without ``--samples-per-shard`` the shards are sized
for ``--ranks`` x ``--workers`` readers (default one 8-GPU node with the trainer's default ``data.workers``)
by the rule in ``default_samples_per_shard``: N / readers samples per shard (rounded up where that still
makes a shard per reader, else down), at most 10000, so that there are at least as many shards as readers. Fewer shards than readers (too large a ``--samples-per-shard``, or
fewer samples than readers) is warned about: a reader without a shard sits idle.

The output order is the input shards' order, and which samples go to output shard ``j`` is planned
from the cache (and keep-lists) before any tar is read: so a re-run skips finished output shards and
writes the rest exactly as an uninterrupted run would. A planned sample that is missing from its source
tar (the tar changed or broke after extraction) is counted and reported, not fatal; so is a damaged
source tar (cid_ds.data.damage): its samples before the damage are written, and the damage (file, byte)
is listed in the manifest's ``damaged_sources`` and in the output shard's entry. More damaged source
tars than ``--max-damaged-fraction`` accepts stop the run. ``manifest.json`` chains the manifests of the
cache, the clusters and the balance.

Started as N processes (data_tools.spread: a launcher's RANK/WORLD_SIZE, or ``python -m data_tools.spread -n N
-- python -m data_tools.pack ...``), each writes a contiguous block of the output shards and the last to finish
writes the manifest: the same bytes as one process writes, and any process count resumes an interrupted packing.
"""
from __future__ import annotations

import glob
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import open_clip
import webdataset as wds
from tqdm import tqdm

import cid_ds
from cid_ds.config import DataConfig
from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.damage import DEFAULT_MAX_DAMAGED_FRACTION, DamageBudget, ShardDamage
from cid_ds.data.errors import DataError
from cid_ds.data.features import FeatureCache, shard_file, shard_stem, stems_by_shard
from cid_ds.data.joins import balance_artifact, check_join
from cid_ds.data.packed import FORMAT, encode_array, tokenizer_fingerprint
from cid_ds.data.samples import IMAGE_EXTS, caption_of, read_samples
from cid_ds.io import MANIFEST, atomic_path, read_json, read_manifest, write_json
from cid_ds.models import resolve_spec
from data_tools.options import flag, run_stage, shard_paths
from data_tools.outputs import check_rerun
from data_tools.spread import Share

STATS_DIR = ".stats"  # per output shard: what it holds; written before the tar, which commits the shard
MAX_SAMPLES_PER_SHARD = 10000  # the cap of the default size
DEFAULT_RANKS = 8  # one 8-GPU node
DEFAULT_WORKERS = DataConfig.workers  # the trainer's default DataLoader workers per rank (data.workers)


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """What data_tools.pack is asked: its flags, with their defaults."""
    shards: list[str] = flag(help="source webdataset tars: brace pattern or glob", parse=shard_paths)
    features: str = flag(help="feature cache folder (data_tools.extract)")
    tokenizer: str = flag(help="the student's model spec: its tokenizer makes the token ids")
    out: str = flag(help="folder for the distill-ready shards")
    clusters: Optional[str] = flag(None, "cluster assignments folder (data_tools.cluster)")
    balance: Optional[str] = flag(None, "keep-lists folder (data_tools.balance)")
    ranks: int = flag(DEFAULT_RANKS, "the world size the shards will be trained on (default: one 8-GPU node)")
    workers: int = flag(DEFAULT_WORKERS, "the loader's data.workers per rank (default: the trainer's default, "
                                         f"{DEFAULT_WORKERS}; the shipped clip_cid and clip_kd YAMLs use 8)")
    samples_per_shard: Optional[int] = flag(None, "default: planned samples / (ranks x workers), at most "
                                                  f"{MAX_SAMPLES_PER_SHARD}: at least one shard per reader", type=int)
    max_damaged_fraction: float = flag(DEFAULT_MAX_DAMAGED_FRACTION,
                                       "damaged source tars are recorded and read up to their damage; more than "
                                       "this fraction of them (at least one is accepted) stops the run")

    def check(self) -> None:
        for name, value in (("samples_per_shard", self.samples_per_shard), ("ranks", self.ranks),
                            ("workers", self.workers)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        twice = next((path for path, count in Counter(self.shards).items() if count > 1), None)
        if twice is not None:
            raise ValueError(f"shards lists {twice} more than once")


@dataclass(frozen=True)
class Planned:
    """One sample to write: its source shard path and key."""
    source: str
    key: str


def default_samples_per_shard(samples: int, readers: int) -> int:
    """Samples per output shard for ``readers`` loader readers (ranks x DataLoader workers per rank) when
    none is given: at most ``MAX_SAMPLES_PER_SHARD``, and otherwise the even split ``ceil(samples / readers)``,
    which makes ``readers`` shards of (nearly) one size; where rounding up makes fewer shards than readers
    (100 samples, 32 readers: 4 per shard make 25), ``samples // readers``, which makes at least ``readers``
    whenever ``samples >= readers``."""
    even = -(-samples // readers)
    size = even if -(-samples // even) >= readers else max(1, samples // readers)
    return min(MAX_SAMPLES_PER_SHARD, size)


def chosen_samples_per_shard(samples: int, ranks: int, workers: int) -> tuple[int, str]:
    """``default_samples_per_shard`` for ``ranks`` x ``workers`` readers, and the line that says so."""
    readers = ranks * workers
    size = default_samples_per_shard(samples, readers)
    return size, (f"pack: {size} samples per shard: {samples:,} samples / ({ranks} ranks x {workers} workers = "
                  f"{readers} readers), at most {MAX_SAMPLES_PER_SHARD}; pass --samples-per-shard to choose")


def too_few_shards(samples: int, samples_per_shard: int, ranks: int, workers: int) -> Optional[str]:
    """A warning when the shards are fewer than the loader's ranks x workers readers, else None."""
    readers = ranks * workers
    shards = -(-samples // samples_per_shard)
    if shards >= readers:
        return None
    advice = f"use --samples-per-shard <= {samples // readers}" if samples >= readers \
        else f"{samples} samples cannot feed them all: train on fewer ranks x workers"
    return (f"pack: warning: {shards} shards for {ranks} ranks x {workers} workers = {readers} readers: ranks or "
            f"workers with no shard sit idle or the epoch has no full batch; {advice}")


def read_keep_list(balance_dir: str, stem: str) -> Optional[frozenset[str]]:
    path = shard_file(balance_dir, stem)
    if not os.path.isfile(path):
        return None
    with np.load(path) as npz:
        return frozenset(npz["kept"].tolist())


def check_upstream(cache: FeatureCache, clusters: Optional[ClusterAssignments], balance_dir: Optional[str]) -> dict:
    """The upstream manifests, each complete and made from this cache's teacher."""
    if not cache.complete:
        raise ValueError(f"feature cache {cache.manifest_path} is incomplete: finish data_tools.extract first")
    upstream = {"features": cache.manifest}
    if clusters is not None:
        if not clusters.complete:
            raise ValueError(f"cluster assignments {clusters.manifest_path} are incomplete: finish data_tools.cluster")
        upstream["clusters"] = clusters.manifest
    balance = balance_artifact(balance_dir) if balance_dir is not None else None
    if balance is not None:
        upstream["balance"] = read_manifest(balance_dir)
        if not upstream["balance"].get("complete"):
            raise ValueError(f"balance {balance.path} is incomplete: finish data_tools.balance first")
    check_join(cache, clusters, balance)
    return upstream


def plan(shards: list[str], cache: FeatureCache, clusters: Optional[ClusterAssignments],
         balance_dir: Optional[str]) -> tuple[list[Planned], dict[str, int]]:
    """The samples to write, in input order, and counts of what was left out and why."""
    planned: list[Planned] = []
    left_out = {"not_in_cache": 0, "removed_by_balance": 0, "not_clustered": 0}
    for path in shards:
        stem = shard_stem(path)
        features = cache.lookup(stem)
        if features is None:
            raise DataError(f"feature cache {cache.dir}: no file for shard {stem} ({path}); extract it first")
        keys = sorted(features.row, key=features.row.get)
        keep = read_keep_list(balance_dir, stem) if balance_dir is not None else None
        if balance_dir is not None and keep is None:
            raise DataError(f"balance {balance_dir}: no keep-list {shard_file(balance_dir, stem)} for shard {stem}")
        assigned = clusters.lookup(stem).row if clusters is not None else None
        for key in keys:
            if keep is not None and key not in keep:
                left_out["removed_by_balance"] += 1
            elif assigned is not None and key not in assigned:
                left_out["not_clustered"] += 1
            else:
                planned.append(Planned(path, key))
    return planned, left_out


Found = dict[tuple[str, str], dict]  # (source tar, key) -> raw sample


def shard_sources(chunks: list[list[Planned]]) -> Iterator[tuple[Found, list[ShardDamage]]]:
    """For each chunk (the members of consecutive output shards), its planned samples found in their source tars,
    and the damaged tars that cut a search for them short. Each tar is read once, from its start up to the last
    sample any chunk wants of it: a tar's samples run on into the next output shard, and reading it from the start
    for every shard read the sources ~1.5x over at LAION's shapes and 3x where 5 output shards share a tar."""
    tars = list(dict.fromkeys(planned.source for chunk in chunks for planned in chunk))  # in order of first use
    order = {path: i for i, path in enumerate(tars)}
    wanted: dict[str, set[str]] = {}
    for chunk in chunks:
        for planned in chunk:
            wanted.setdefault(planned.source, set()).add(planned.key)
    damage: dict[str, ShardDamage] = {}
    stream = _wanted_samples(tars, wanted, damage)
    found: Found = {}  # read, not yet yielded: a sample read ahead belongs to a later chunk
    reading = -1  # the tar the stream is in
    for chunk in chunks:
        members = {(planned.source, planned.key) for planned in chunk}
        remaining = members - found.keys()
        left = Counter(path for path, _ in remaining)  # per tar: its samples still to find
        while left and reading <= max(order[path] for path in left):  # past a tar, what it lacks is not in it
            path, sample = next(stream, (None, None))
            if path is None:
                break
            reading, key = order[path], (path, sample["__key__"])
            found[key] = sample
            if key in remaining:
                remaining.discard(key)
                left[path] -= 1
                if not left[path]:
                    del left[path]
        mine = {key: found.pop(key) for key in members if key in found}
        cut_short = sorted({path for path, _ in members - mine.keys() if path in damage}, key=order.get)
        yield mine, [damage[path] for path in cut_short]


def _wanted_samples(tars: list[str], wanted: dict[str, set[str]], damage: dict[str, ShardDamage]
                    ) -> Iterator[tuple[str, dict]]:
    """``(tar, raw sample)`` of the wanted keys, each tar read up to its last wanted key, a damaged one up to its
    damage, recorded in ``damage``."""
    for path in tars:
        keys, records = set(wanted[path]), []
        for sample in read_samples([path], records):
            if sample["__key__"] in keys:
                keys.discard(sample["__key__"])
                yield path, sample
                if not keys:
                    break
        if records:
            damage[path] = records[0]


def write_output_shard(out_dir: str, index: int, members: list[Planned], found: Found, damaged: list[ShardDamage],
                       cache: FeatureCache, clusters: Optional[ClusterAssignments], tokenizer, bar: tqdm,
                       budget: DamageBudget) -> dict:
    """Write output shard ``index`` of ``members`` (``found``: their raw samples, ``shard_sources``'); its damaged
    sources are counted in ``budget`` before it is written, so that one past the threshold is not committed."""
    for record in damaged:
        budget.add(record)
    problems = {"missing_in_source": 0, "unreadable_source_shards": len(damaged),
                "damaged_sources": [record.as_dict() for record in damaged]}
    name = f"{index:05d}.tar"
    written = 0
    with atomic_path(os.path.join(out_dir, name)) as tmp:
        with wds.TarWriter(tmp, encoder=False, mtime=0) as tar:  # mtime fixed: a re-run writes the same bytes
            samples = [(p, found.get((p.source, p.key))) for p in members]
            present = [(p, s) for p, s in samples if s is not None and caption_of(s) is not None
                       and any(ext in s for ext in IMAGE_EXTS)]
            problems["missing_in_source"] = len(members) - len(present)
            captions = [caption_of(s) for _, s in present]
            tokens = np.asarray(tokenizer(captions)) if captions else np.zeros((0, 0), np.int32)
            for (planned, sample), caption, ids in zip(present, captions, tokens):
                tar.write(_packed_sample(planned, sample, caption, ids, cache, clusters))
                written += 1
            bar.update(len(members))
        stats = {"samples": written, **problems}
        write_json(os.path.join(out_dir, STATS_DIR, f"{index:05d}.json"), stats)
    return stats


def _packed_sample(planned: Planned, sample: dict, caption: str, token_ids: np.ndarray, cache: FeatureCache,
                   clusters: Optional[ClusterAssignments]) -> dict:
    stem = shard_stem(planned.source)
    features = cache.lookup(stem)
    row = features.row[planned.key]
    image_ext = next(ext for ext in IMAGE_EXTS if ext in sample)
    out = {"__key__": planned.key, image_ext: sample[image_ext], "txt": caption.encode(),
           "tokens": encode_array(token_ids, "tokens"),
           "t_img": encode_array(features.image[row], "t_img"), "t_txt": encode_array(features.text[row], "t_txt")}
    if cache.views:
        out["v_img"] = encode_array(features.view_image[row], "v_img")
        out["v_box"] = encode_array(features.view_box[row], "v_box")
    if clusters is not None:
        assignments = clusters.lookup(stem)
        out["cluster"] = encode_array(assignments.ids[assignments.row[planned.key]], "cluster")
    if "json" in sample:
        out["json"] = sample["json"]
    return out


def pack(options: PackOptions, share: Share = Share(), progress: bool = True) -> Optional[dict]:
    """Write (or finish writing) ``share``'s output shards (data_tools.spread: a contiguous block of the planned
    shards, so that the source tars they share are read by one process); return the complete manifest, written by
    whichever process finds every shard written, or None when others are still to finish theirs.
    ``samples_per_shard`` None: sized for ``ranks`` x ``workers`` loader readers (default_samples_per_shard).
    More damaged source shards than ``max_damaged_fraction`` accepts raise TooMuchDamage (cid_ds.data.damage)."""
    options.check()
    shards, out_dir, balance_dir = options.shards, options.out, options.balance
    ranks, workers, max_damaged_fraction = options.ranks, options.workers, options.max_damaged_fraction
    budget = DamageBudget(len(shards), max_damaged_fraction, "--max-damaged-fraction")
    stems_by_shard(shards)
    cache = FeatureCache(options.features)
    clusters = ClusterAssignments(options.clusters) if options.clusters is not None else None
    upstream = check_upstream(cache, clusters, balance_dir)
    tokenizer = open_clip.get_tokenizer(resolve_spec(options.tokenizer))
    planned, left_out = plan(shards, cache, clusters, balance_dir)
    if not planned:
        raise ValueError(f"nothing to pack: no sample of {len(shards)} shards is in the cache and kept")
    samples_per_shard = options.samples_per_shard
    if samples_per_shard is None:
        samples_per_shard, rule = chosen_samples_per_shard(len(planned), ranks, workers)
        if share.rank == 0:
            print(rule)
    warning = too_few_shards(len(planned), samples_per_shard, ranks, workers)
    if warning is not None and share.rank == 0:
        print(warning, file=sys.stderr)
    identity = {
        "format": FORMAT, "sources": [os.path.abspath(p) for p in shards], "samples_per_shard": samples_per_shard,
        "tokenizer": {"spec": options.tokenizer, "context_length": int(np.asarray(tokenizer(["x"])).shape[1]),
                      "probe_ids": tokenizer_fingerprint(tokenizer)},
        "teacher": cache.teacher, "embed_dim": cache.embed_dim,
        "topk": clusters.topk if clusters is not None else 0, "k": clusters.k if clusters is not None else None,
    }
    if cache.views:  # packings of caches without views (older ones too) have no entry
        identity["views"] = upstream["features"]["views"]
    chunks = [planned[i:i + samples_per_shard] for i in range(0, len(planned), samples_per_shard)]
    mine = share.block(range(len(chunks)))
    _check_existing(out_dir, identity, mine)
    write_json(os.path.join(out_dir, MANIFEST), identity | {"complete": False})

    with tqdm(total=sum(len(chunks[i]) for i in mine), unit="sample", desc="pack" if share.world == 1 else
              f"pack {share}", disable=not progress) as bar:
        todo = [index for index in mine if _finished_stats(out_dir, index) is None]
        bar.update(sum(len(chunks[index]) for index in set(mine) - set(todo)))
        for index, (found, damaged) in zip(todo, shard_sources([chunks[index] for index in todo])):
            write_output_shard(out_dir, index, chunks[index], found, damaged, cache, clusters, tokenizer, bar, budget)
    stats = {index: _finished_stats(out_dir, index) for index in range(len(chunks))}
    if any(done is None for done in stats.values()):
        return None
    budget = DamageBudget(len(shards), max_damaged_fraction, "--max-damaged-fraction")  # over every process's
    for done in stats.values():
        for record in done.get("damaged_sources", []):
            budget.add(ShardDamage(**record))
    # a damaged source feeding several output shards is in each one's entry, and once in the totals
    totals = {"planned": len(planned), **left_out, "unreadable_source_shards": len(budget.damaged),
              **{k: sum(s[k] for s in stats.values()) for k in ("samples", "missing_in_source")}}
    manifest = identity | {
        "shards": [{"name": f"{i:05d}.tar", **stats[i]} for i in range(len(chunks))], "totals": totals,
        "damaged_sources": [record.as_dict() for record in budget.damaged.values()],
        "upstream": upstream, "code_version": cid_ds.__version__, "complete": True}
    write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


def _finished_stats(out_dir: str, index: int) -> Optional[dict]:
    stats = os.path.join(out_dir, STATS_DIR, f"{index:05d}.json")
    tar = os.path.join(out_dir, f"{index:05d}.tar")
    return read_json(stats) if os.path.isfile(stats) and os.path.isfile(tar) else None


def _check_existing(out_dir: str, identity: dict, mine: list[int]) -> None:
    """A re-run must repeat the inputs and parameters; temp files a killed run left of this process's shards
    are removed (another process's may be in flight)."""
    if check_rerun(out_dir, identity, "packings") is None and os.path.isdir(out_dir) and \
            any(name != MANIFEST and not name.startswith(MANIFEST + ".tmp") for name in os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: not empty and has no {MANIFEST}; refusing to write packed shards into it")
    for index in mine:
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), f"{index:05d}.tar.tmp*")) \
                + glob.glob(os.path.join(glob.escape(out_dir), STATS_DIR, f"{index:05d}.json.tmp*")):
            os.remove(tmp)


def main(argv: Optional[list[str]] = None) -> None:
    run_stage("pack", PackOptions, __doc__, pack, _print_result, argv)


def _print_result(options: PackOptions, manifest: Optional[dict], share: Share) -> None:
    if manifest is None:
        print(f"pack: {share} wrote its shards; the last process to finish writes "
              f"{os.path.join(options.out, MANIFEST)}")
        return
    totals = manifest["totals"]
    print(f"packed {totals['samples']} samples into {len(manifest['shards'])} shards in {options.out} "
          f"(removed by balance {totals['removed_by_balance']}, missing in source {totals['missing_in_source']}, "
          f"damaged source shards {totals['unreadable_source_shards']}, listed in "
          f"{os.path.join(options.out, MANIFEST)})")


if __name__ == "__main__":
    main()
