"""The webdataset training loader: one epoch of batches in the batch contract, split by rank and worker,
reproducible from (seed, epoch), resumable mid-epoch, joined with the teacher feature cache and the
cluster assignments by key."""
import os
import shutil

import numpy as np
import pytest
import torch

from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.batch import LoaderSpec, open_side_data
from cid_ds.data.features import FeatureCache, shard_file, write_shard
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.io import read_json, write_json
from cid_ds.models import create_model
from data_tools.cluster import ClusterOptions, cluster
from data_tools.extract import ExtractOptions, extract
from tests.helpers import write_shard_tar

SHARDS, PER_SHARD, BATCH = 4, 40, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return [write_shard_tar(root / f"{s:05d}.tar", s * PER_SHARD, PER_SHARD) for s in range(SHARDS)]


@pytest.fixture(scope="module")
def features_dir(shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "feats")
    extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=64, workers=0,
                           random_teacher_ok=True, device="cpu"))
    return out


@pytest.fixture(scope="module")
def student():
    _, preprocess_train, preprocess_val, tokenizer = create_model("demo-student")
    return preprocess_train, preprocess_val, tokenizer


def batches(shards, student, features_dir, **kwargs):
    preprocess_train, _, tokenizer = student
    join = {name: kwargs.pop(name) for name in ("missing_features", "clusters_dir") if name in kwargs}
    options = dict(batch_size=BATCH, workers=2, shuffle_buffer=50) | kwargs
    side = open_side_data(shards, features_dir, **join)
    return list(build_train_loader(LoaderSpec(shards, preprocess_train, tokenizer, side=side, **options)))


def keys_of(batch_list):
    return [batch["key"] for batch in batch_list]


def test_batches_follow_the_contract_and_carry_the_cached_rows(shards, student, features_dir):
    result = batches(shards, student, features_dir)
    assert len(result) == SHARDS * PER_SHARD // BATCH
    cache = FeatureCache(features_dir)
    for batch in result:
        assert batch["image"].shape == (BATCH, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["tokens"].shape == (BATCH, 24) and batch["tokens"].dtype == torch.int64
        assert batch["t_img"].shape == (BATCH, 256) and batch["t_img"].dtype == torch.float32
        assert batch["t_txt"].shape == (BATCH, 256) and batch["t_txt"].dtype == torch.float32
        assert len(batch["key"]) == BATCH and batch["n_skipped"] == 0
        for i, key in enumerate(batch["key"]):
            features = cache.lookup(f"{int(key) // PER_SHARD:05d}")
            row = features.row[key]
            assert torch.equal(batch["t_img"][i], torch.from_numpy(features.image[row].astype(np.float32)))
            assert torch.equal(batch["t_txt"][i], torch.from_numpy(features.text[row].astype(np.float32)))


def test_two_ranks_cover_every_sample_once(shards, student, features_dir):
    rank_keys = [sum(keys_of(batches(shards, student, features_dir, rank=r, world_size=2)), []) for r in (0, 1)]
    assert not set(rank_keys[0]) & set(rank_keys[1])
    assert sorted(rank_keys[0] + rank_keys[1]) == [f"{i:09d}" for i in range(SHARDS * PER_SHARD)]


def test_order_is_fixed_by_seed_and_epoch(shards, student, features_dir):
    first = keys_of(batches(shards, student, features_dir, seed=3, epoch=0))
    assert keys_of(batches(shards, student, features_dir, seed=3, epoch=0)) == first
    next_epoch = keys_of(batches(shards, student, features_dir, seed=3, epoch=1))
    assert next_epoch != first and sorted(sum(next_epoch, [])) == sorted(sum(first, []))
    assert keys_of(batches(shards, student, features_dir, seed=4, epoch=0)) != first


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_the_same_sequence_without_decoding_the_skipped(shards, student, features_dir, workers):
    preprocess_train, _, tokenizer = student
    full = batches(shards, student, features_dir, workers=workers, seed=1)
    for skip in (3, 7):
        resumed = batches(shards, student, features_dir, workers=workers, seed=1, skip_batches=skip)
        assert keys_of(resumed) == keys_of(full)[skip:]
        assert torch.equal(resumed[0]["t_img"], full[skip]["t_img"])

    decoded = []

    def counting_preprocess(image):
        decoded.append(image)
        return preprocess_train(image)

    list(build_train_loader(LoaderSpec(shards, counting_preprocess, tokenizer, BATCH, skip_batches=5,
                                       side=open_side_data(shards, features_dir))))
    assert len(decoded) == SHARDS * PER_SHARD - 5 * BATCH


def test_a_key_missing_from_the_cache_is_an_error_naming_shard_and_key_or_is_skipped(shards, student,
                                                                                    features_dir, tmp_path):
    stale = str(tmp_path / "stale")  # a cache written before sample 85 was added to shard 00002
    shutil.copytree(features_dir, stale)
    with np.load(os.path.join(stale, "00002.npz")) as npz:
        keep = npz["keys"] != "000000085"
        write_shard(stale, "00002", npz["keys"][keep].tolist(), npz["image"][keep], npz["text"][keep],
                    [], [], str(npz["teacher_sha256"]))

    with pytest.raises(ValueError, match="shard 00002 .* key 000000085: key not in the cache"):
        batches(shards, student, stale, workers=2)
    result = batches(shards, student, stale, missing_features="skip")
    assert sum(b["n_skipped"] for b in result) == 1
    assert "000000085" not in sum(keys_of(result), [])


def test_a_shard_missing_from_the_cache_is_an_error_naming_shard_and_key_or_is_skipped(shards, student,
                                                                                      features_dir, tmp_path):
    partial = str(tmp_path / "partial")
    shutil.copytree(features_dir, partial)
    os.remove(os.path.join(partial, "00003.npz"))

    with pytest.raises(ValueError, match=r"shard 00003 \(.*00003.tar\) key 000000120: no file .*00003.npz"):
        batches(shards, student, partial, workers=0)
    result = batches(shards, student, partial, missing_features="skip", workers=0)
    assert sum(b["n_skipped"] for b in result) == PER_SHARD
    assert len(result) == (SHARDS - 1) * PER_SHARD // BATCH


def test_cluster_ids_are_joined_by_key_with_the_same_rules_as_the_features(shards, student, features_dir, tmp_path):
    for topk in (1, 2):
        clusters = str(tmp_path / f"top{topk}")
        cluster(ClusterOptions(features=features_dir, k=4, out=clusters, topk=topk))
        assignments = ClusterAssignments(clusters)
        result = batches(shards, student, features_dir, clusters_dir=clusters, workers=0)
        assert len(result) == SHARDS * PER_SHARD // BATCH
        for batch in result:
            assert batch["cluster"].dtype == torch.int64
            assert batch["cluster"].shape == ((BATCH,) if topk == 1 else (BATCH, topk))
            for i, key in enumerate(batch["key"]):
                shard = assignments.lookup(f"{int(key) // PER_SHARD:05d}")
                assert batch["cluster"][i].tolist() == shard.ids[shard.row[key], :topk].squeeze().tolist()

    os.remove(shard_file(clusters, "00003"))
    with pytest.raises(ValueError, match=rf"cluster assignments {clusters}: shard 00003 \(.*00003.tar\) "
                                         r"key 000000120: no file .*00003.npz"):
        batches(shards, student, features_dir, clusters_dir=clusters, workers=0)
    result = batches(shards, student, features_dir, clusters_dir=clusters, missing_features="skip", workers=0)
    assert sum(b["n_skipped"] for b in result) == PER_SHARD

    other_teacher = str(tmp_path / "other")  # a cache of the same shards from another teacher
    manifest = read_json(os.path.join(features_dir, "manifest.json"))
    manifest["teacher"]["weights_sha256"] = "0" * 64
    write_json(os.path.join(other_teacher, "manifest.json"), manifest)
    with pytest.raises(ValueError, match=r"teacher.weights_sha256 is .* but feature cache .*other/manifest.json"):
        batches(shards, student, other_teacher, clusters_dir=clusters)


def test_corrupt_images_and_empty_captions_are_skipped_and_counted(tmp_path, student):
    shard = write_shard_tar(tmp_path / "00000.tar", 0, 34, corrupt={"000000003"}, empty_caption={"000000010"})
    no_cache = batches([shard], student, None, batch_size=4, workers=0)
    assert "t_img" not in no_cache[0]
    assert sum(b["n_skipped"] for b in no_cache) == 2 and len(no_cache) == 8

    # With a cache the extractor's own skips are known: no error, the same two are counted.
    cache = str(tmp_path / "feats")
    extract(ExtractOptions(shards=[shard], teacher="demo-teacher", out=cache, batch_size=16, workers=0,
                           random_teacher_ok=True, device="cpu"))
    with_cache = batches([shard], student, cache, batch_size=4, workers=0)
    assert sum(b["n_skipped"] for b in with_cache) == 2
    assert {"000000003", "000000010"}.isdisjoint(sum(keys_of(with_cache), []))


def test_bad_arguments_are_named(shards, student, tmp_path):
    with pytest.raises(ValueError, match="missing_features must be 'error' or 'skip'"):
        batches(shards, student, None, missing_features="ignore")
    with pytest.raises(FileNotFoundError, match=f"feature cache {tmp_path}: no manifest.json"):
        batches(shards, student, str(tmp_path))


def test_the_trainers_batches_read_the_side_folders_opened_once_for_every_epoch(shards, student, features_dir,
                                                                               monkeypatch):
    """Epoch after epoch, the trainer's loader (cid_ds.data.loader.batches) joins from the feature cache opened
    once for the run (cid_ds.sources opens it): nothing is reopened or re-checked per epoch."""
    from cid_ds.config import DataConfig
    from cid_ds.data import joins
    from cid_ds.data.loader import batches as trainer_batches
    from cid_ds.run_state import DataPosition
    preprocess_train, _, tokenizer = student
    spec = LoaderSpec(shards, preprocess_train, tokenizer, BATCH, side=open_side_data(shards, features_dir))

    def opened_again(*args, **kwargs):
        raise AssertionError("a side folder was opened again")
    monkeypatch.setattr(FeatureCache, "__init__", opened_again)
    monkeypatch.setattr(joins, "check_join", opened_again)
    position = DataPosition()
    stream = trainer_batches(spec, DataConfig(features=features_dir), position)
    per_epoch = SHARDS * PER_SHARD // BATCH
    got = [next(stream) for _ in range(2 * per_epoch + 1)]
    assert (position.epoch, position.batch_in_epoch) == (2, 1)
    assert all(batch["t_img"].shape == (BATCH, got[0]["t_img"].shape[1]) for batch in got)
