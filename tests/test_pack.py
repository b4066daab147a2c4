"""`python -m data_tools.pack` writes the distill-ready shards (only kept samples: source image bytes, caption,
token ids, teacher embeddings, cluster ids) and the training loader reads them as it reads the side cache."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cid_ds.config import expand_shards
from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.features import FeatureCache, shard_file
from cid_ds.data.packed import decode_array
from cid_ds.data.batch import LoaderSpec, open_side_data
from cid_ds.data.samples import IMAGE_EXTS, read_samples
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.io import read_json
from cid_ds.models import create_model
from data_tools.pack import PackOptions, default_samples_per_shard, pack, too_few_shards
from tests.helpers import REPO_ROOT, make_data_and_features


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_tools.cluster import ClusterOptions, cluster
    data = make_data_and_features(str(tmp_path_factory.mktemp("pack")), train_samples=160, shards=2)
    data["clusters"] = os.path.join(os.path.dirname(data["feats"]), "clusters")
    cluster(ClusterOptions(features=data["feats"], k=4, out=data["clusters"], topk=2))
    data["keep"] = os.path.join(os.path.dirname(data["feats"]), "keep")
    write_keep_lists(data, drop_every=3)
    return data


def write_keep_lists(data, drop_every):
    """Keep-lists in data_tools.balance's format that drop every third sample of the cache."""
    from cid_ds.io import write_json
    cache = FeatureCache(data["feats"])
    os.makedirs(data["keep"], exist_ok=True)
    for path in expand_shards(data["shards"]):
        stem = os.path.basename(path)[:-4]
        keys = sorted(cache.lookup(stem).row)
        with open(shard_file(data["keep"], stem), "wb") as f:
            np.savez(f, kept=np.asarray([k for i, k in enumerate(keys) if i % drop_every]),
                     removed=np.asarray([k for i, k in enumerate(keys) if not i % drop_every]))
    write_json(os.path.join(data["keep"], "manifest.json"), {"complete": True, "teacher": cache.teacher})


def packed_samples(out):
    return {s["__key__"]: s for s in read_samples(sorted(expand_shards(os.path.join(out, "*.tar"))))}


def source_samples(data):
    return {s["__key__"]: s for s in read_samples(expand_shards(data["shards"]))}


def test_packed_shards_hold_exactly_the_kept_samples_with_their_bytes_embeddings_tokens_and_clusters(dataset, tmp_path,
                                                                                                    monkeypatch):
    import data_tools.pack as stage
    opened = []

    def counted_read_samples(shards, damaged=None):
        opened.extend(shards)
        return read_samples(shards, damaged)

    monkeypatch.setattr(stage, "read_samples", counted_read_samples)
    out = str(tmp_path / "packed")
    manifest = pack(PackOptions(shards=expand_shards(dataset["shards"]), features=dataset["feats"],
                                tokenizer="demo-student", out=out, clusters=dataset["clusters"],
                                balance=dataset["keep"], samples_per_shard=40), progress=False)
    cache, clusters = FeatureCache(dataset["feats"]), ClusterAssignments(dataset["clusters"])
    kept = {k for stem in ("00000", "00001") for k in np.load(shard_file(dataset["keep"], stem))["kept"].tolist()}
    packed, source = packed_samples(out), source_samples(dataset)
    assert set(packed) == kept and len(kept) == manifest["totals"]["samples"]
    assert manifest["totals"]["removed_by_balance"] == 160 - len(kept)
    assert [s["samples"] for s in manifest["shards"]] == [40, 40, len(kept) - 80]
    assert sorted(opened) == sorted(expand_shards(dataset["shards"]))  # each tar read once, though shards share them
    assert set(manifest["upstream"]) == {"features", "clusters", "balance"}

    _, _, tokenizer = create_model("demo-student")[1:]
    for key, sample in packed.items():
        stem = os.path.basename(source[key]["__url__"])[:-4]
        image_ext = next(ext for ext in IMAGE_EXTS if ext in sample)
        assert sample[image_ext] == source[key][image_ext]  # not re-encoded
        assert sample["txt"] == source[key]["txt"].strip()
        features, row = cache.lookup(stem), cache.lookup(stem).row[key]
        np.testing.assert_array_equal(decode_array(sample["t_img"], "t_img", 256, key), features.image[row])
        np.testing.assert_array_equal(decode_array(sample["t_txt"], "t_txt", 256, key), features.text[row])
        assignments = clusters.lookup(stem)
        np.testing.assert_array_equal(decode_array(sample["cluster"], "cluster", 2, key),
                                      assignments.ids[assignments.row[key]])
        np.testing.assert_array_equal(decode_array(sample["tokens"], "tokens", 24, key),
                                      tokenizer([sample["txt"].decode()])[0].numpy())


def test_the_loader_reads_packed_shards_as_it_joins_the_side_cache(dataset, tmp_path):
    out = str(tmp_path / "packed")
    pack(PackOptions(shards=expand_shards(dataset["shards"]), features=dataset["feats"], tokenizer="demo-student",
                     out=out, clusters=dataset["clusters"], samples_per_shard=50), progress=False)
    _, _, preprocess, tokenizer = create_model("demo-student")

    def batches(shards, **join):
        loader = build_train_loader(LoaderSpec(shards, preprocess, tokenizer, batch_size=16, shuffle_buffer=1,
                                               side=open_side_data(shards, **join)))
        return {key: (b["image"][i], b["tokens"][i], b["t_img"][i], b["cluster"][i])
                for b in loader for i, key in enumerate(b["key"])}

    from_packed = batches(expand_shards(os.path.join(out, "*.tar")), features_dir=None)
    joined = batches(expand_shards(dataset["shards"]), features_dir=dataset["feats"], clusters_dir=dataset["clusters"])
    assert len(from_packed) == 160 and set(from_packed) == set(joined)
    for key, (image, tokens, t_img, cluster) in from_packed.items():
        torch.testing.assert_close(image, joined[key][0])
        torch.testing.assert_close(tokens, joined[key][1])
        torch.testing.assert_close(t_img, joined[key][2])
        torch.testing.assert_close(cluster, joined[key][3])


def test_another_students_tokenizer_retokenises_the_captions(dataset, tmp_path):
    out = str(tmp_path / "packed")
    pack(PackOptions(shards=expand_shards(dataset["shards"]), features=dataset["feats"], tokenizer="demo-student",
                     out=out), progress=False)
    _, _, preprocess, tokenizer = create_model("ViT-B-32")  # context length 77, not the demo's 24
    batch = next(iter(build_train_loader(LoaderSpec(expand_shards(os.path.join(out, "*.tar")), preprocess,
                                                    tokenizer, batch_size=4))))
    assert batch["tokens"].shape == (4, 77)


def test_spread_over_processes_a_killed_run_resumes_to_the_same_bytes_and_other_parameters_are_refused(
        dataset, tmp_path):
    """One process, two, then three finishing what two left (data_tools.spread): the same shards, byte for byte,
    and the same manifest."""
    args = [sys.executable, "-m", "data_tools.pack", "--shards", dataset["shards"], "--features", dataset["feats"],
            "--tokenizer", "demo-student", "--samples-per-shard", "30"]
    spread = [sys.executable, "-m", "data_tools.spread", "-n"]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    subprocess.run(args + ["--out", whole], cwd=REPO_ROOT, check=True, capture_output=True)
    two = subprocess.run(spread + ["2", "--"] + args + ["--out", resumed], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True)
    assert "process 0 of 2" in two.stdout + two.stderr or "process 1 of 2" in two.stdout + two.stderr
    tars = sorted(name for name in os.listdir(whole) if name.endswith(".tar"))
    assert len(tars) == 6
    for name in tars:
        assert open(os.path.join(whole, name), "rb").read() == open(os.path.join(resumed, name), "rb").read()
    assert read_json(os.path.join(whole, "manifest.json")) == read_json(os.path.join(resumed, "manifest.json"))

    for name in ("00002.tar", "00005.tar"):  # as if killed before these were written
        os.remove(os.path.join(resumed, name))
    open(os.path.join(resumed, "00002.tar.tmp123"), "wb").write(b"half a tar")
    subprocess.run(spread + ["3", "--"] + args + ["--out", resumed], cwd=REPO_ROOT, check=True, capture_output=True)
    for name in tars:
        assert open(os.path.join(whole, name), "rb").read() == open(os.path.join(resumed, name), "rb").read()
    assert not os.path.exists(os.path.join(resumed, "00002.tar.tmp123"))
    assert read_json(os.path.join(whole, "manifest.json")) == read_json(os.path.join(resumed, "manifest.json"))

    other = subprocess.run(args[:-1] + ["40", "--out", resumed], cwd=REPO_ROOT, capture_output=True, text=True)
    assert other.returncode != 0 and "samples_per_shard is 30 but this run has samples_per_shard = 40" in other.stderr


def test_corrupt_source_input_is_counted_not_fatal(dataset, tmp_path):
    shards = [shutil.copy(p, tmp_path) for p in expand_shards(dataset["shards"])]
    with open(shards[1], "r+b") as f:  # the second tar breaks after extraction: cut in the middle
        f.truncate(os.path.getsize(shards[1]) // 2)
    manifest = pack(PackOptions(shards=shards, features=dataset["feats"], tokenizer="demo-student",
                                out=str(tmp_path / "packed")), progress=False)
    totals = manifest["totals"]
    assert totals["unreadable_source_shards"] == 1
    assert 80 <= totals["samples"] < 160 and totals["samples"] + totals["missing_in_source"] == 160


def test_a_tar_damaged_midway_is_listed_by_each_output_shard_it_cut_short_and_a_lost_shard_is_rewritten(dataset,
                                                                                                            tmp_path):
    """Output shards of 20 samples, 4 of them fed by the second tar, which breaks halfway: the shards whose samples
    all came before the damage list nothing, those it cut short list it; a shard lost afterwards (a middle one) is
    written again, alone, to the same bytes."""
    from data_tools.pack import STATS_DIR
    shards = [shutil.copy(p, tmp_path) for p in expand_shards(dataset["shards"])]
    with open(shards[1], "r+b") as f:
        f.truncate(os.path.getsize(shards[1]) // 2)
    out = tmp_path / "packed"
    options = PackOptions(shards=shards, features=dataset["feats"], tokenizer="demo-student", out=str(out),
                          samples_per_shard=20)
    manifest = pack(options, progress=False)
    entries = manifest["shards"]
    assert len(entries) == 8 and all(not e["damaged_sources"] and not e["missing_in_source"] for e in entries[:4])
    second = entries[4:]
    assert any(e["missing_in_source"] == 0 for e in second) and any(e["missing_in_source"] == 20 for e in second)
    for entry in second:
        assert [d["shard"] for d in entry["damaged_sources"]] == ([shards[1]] if entry["missing_in_source"] else [])
    assert manifest["totals"]["unreadable_source_shards"] == 1

    written = {name: (out / name).read_bytes() for name in os.listdir(out) if name.endswith(".tar")}
    os.remove(out / "00005.tar")
    os.remove(out / STATS_DIR / "00005.json")
    again = pack(options, progress=False)
    assert {name: (out / name).read_bytes() for name in written} == written
    assert again["shards"] == entries


def test_bad_upstream_is_refused_naming_the_file(dataset, tmp_path):
    incomplete = str(tmp_path / "keep")
    shutil.copytree(dataset["keep"], incomplete)
    from cid_ds.io import write_json
    write_json(os.path.join(incomplete, "manifest.json"), {"complete": False})
    with pytest.raises(ValueError, match=r"keep/manifest\.json is incomplete"):
        pack(PackOptions(shards=expand_shards(dataset["shards"]), features=dataset["feats"], tokenizer="demo-student",
                         out=str(tmp_path / "o"), balance=incomplete), progress=False)


@pytest.mark.parametrize("samples, readers, size", [(160, 8, 20), (100, 32, 3), (20_000, 32, 625), (5, 8, 1),
                                                    (22_524, 16, 1408), (400_000_000, 8, 10000)])
def test_the_default_shard_size_makes_a_shard_for_every_reader_up_to_10000_samples(samples, readers, size):
    assert default_samples_per_shard(samples, readers) == size
    assert -(-samples // size) >= min(readers, samples)


def test_without_samples_per_shard_pack_sizes_the_shards_for_ranks_x_workers_and_says_so(dataset, tmp_path, capsys):
    manifest = pack(PackOptions(shards=expand_shards(dataset["shards"]), features=dataset["feats"],
                                tokenizer="demo-student", out=str(tmp_path / "packed"), ranks=3, workers=5),
                                progress=False)
    assert manifest["samples_per_shard"] == 11 and len(manifest["shards"]) == 15  # 160 samples, 15 readers
    printed = capsys.readouterr()
    assert "pack: 11 samples per shard: 160 samples / (3 ranks x 5 workers = 15 readers), at most 10000; " \
           "pass --samples-per-shard to choose" in printed.out and not printed.err


def test_fewer_shards_than_ranks_x_workers_are_warned_about_with_the_numbers(dataset, tmp_path, capsys):
    manifest = pack(PackOptions(shards=expand_shards(dataset["shards"]), features=dataset["feats"],
                                tokenizer="demo-student", out=str(tmp_path / "packed"), samples_per_shard=80, ranks=4,
                                workers=2), progress=False)
    assert len(manifest["shards"]) == 2
    assert "pack: warning: 2 shards for 4 ranks x 2 workers = 8 readers: ranks or workers with no shard sit idle " \
           "or the epoch has no full batch; use --samples-per-shard <= 20" in capsys.readouterr().err
    assert too_few_shards(5, 1, 4, 2).endswith("5 samples cannot feed them all: train on fewer ranks x workers")
