"""The DALI loader (CPU pipeline, real DALI) against the batch contract and the webdataset loader: same
keys, tokens, embeddings and eval-view pixels; ranks, epochs, resume; bad samples skipped and counted;
index files cached and rebuilt; stored views replayed as the webdataset loader replays them."""
import copy
import io
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, ImageDraw

from cid_ds.data.batch import LoaderSpec
from cid_ds.data.dali_loader import build_dali_loader, read_shard
from cid_ds.data.errors import DataError
from cid_ds.data.packed import FORMAT, encode_array, tokenizer_fingerprint
from cid_ds.data.preprocess import image_spec
from cid_ds.data.shard_index import INDEX_FOLDER, image_problem
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.io import read_json, write_json
from cid_ds.models import create_model

SHARDS, PER_SHARD, BATCH, DIM, TOPK = 4, 24, 8, 16, 2


def jpeg(i: int, size=(72, 56)) -> bytes:
    image = Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, i * 53 % 256))
    ImageDraw.Draw(image).ellipse([i % 20, 6, 30 + i % 30, 50], fill=(255 - i % 256, 40, 200))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def bad_huffman_table(data: bytes) -> bytes:
    """A JPEG whose header and end look whole but whose Huffman table is zeroed: only decoding finds it."""
    at = data.find(b"\xff\xc4")
    return data[:at + 4] + b"\x00" * 30 + data[at + 34:]


def embedding(i: int, salt: int) -> np.ndarray:
    return np.random.default_rng(i * 7 + salt).standard_normal(DIM).astype(np.float16)


def write_packed(folder, tokenizer, shards=SHARDS, per_shard=PER_SHARD, damage=None) -> list[str]:
    """Packed shards in cid_ds.data.packed's format, sample keys = global numbers; ``damage`` maps a key
    to "truncated" (half a JPEG), "no caption" or "bad huffman"."""
    damage = damage or {}
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with wds.TarWriter(path) as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                key, caption, image = f"{i:06d}", f"a drawing, number {i}", jpeg(i)
                sample = {"__key__": key, "jpg": image, "txt": caption.encode(),
                          "tokens": encode_array(tokenizer([caption])[0].numpy(), "tokens"),
                          "t_img": encode_array(embedding(i, 0), "t_img"),
                          "t_txt": encode_array(embedding(i, 1), "t_txt"),
                          "cluster": encode_array(np.array([i % 5, (i + 1) % 5]), "cluster")}
                if damage.get(key) == "truncated":
                    sample["jpg"] = image[:len(image) // 2]
                elif damage.get(key) == "bad huffman":
                    sample["jpg"] = bad_huffman_table(image)
                elif damage.get(key) == "no caption":
                    del sample["txt"]
                tar.write(sample)
        paths.append(path)
    context_length = int(tokenizer(["x"]).shape[1])
    write_json(os.path.join(folder, "manifest.json"), {
        "format": FORMAT, "tokenizer": {"spec": "demo-student", "context_length": context_length,
                                        "probe_ids": tokenizer_fingerprint(tokenizer)},
        "teacher": {"weights_sha256": "0" * 64}, "embed_dim": DIM, "topk": TOPK, "k": 5,
        "shards": [{"samples": per_shard}] * shards, "complete": True})
    return paths


@pytest.fixture(scope="module")
def student():
    _, preprocess_train, preprocess_val, tokenizer = create_model("demo-student")
    return preprocess_train, preprocess_val, tokenizer


@pytest.fixture(scope="module")
def shards(student, tmp_path_factory):
    return write_packed(str(tmp_path_factory.mktemp("packed")), student[2])


def dali_epoch(shards, student, augment=False, **kwargs):
    preprocess_train, preprocess_val, tokenizer = student
    device = {"device_id": kwargs.pop("device_id")} if "device_id" in kwargs else {}
    options = dict(batch_size=BATCH, workers=2, shuffle_buffer=16) | kwargs
    return list(build_dali_loader(LoaderSpec(shards, preprocess_train if augment else preprocess_val, tokenizer,
                                             **options), **device))


def keys_of(batches):
    return [key for batch in batches for key in batch["key"]]


def test_dali_and_webdataset_loaders_give_the_same_samples(shards, student):
    """Augmentation off: same keys, tokens, embeddings and cluster ids; pixels within decoder tolerance."""
    _, preprocess_val, tokenizer = student
    dali = dali_epoch(shards, student)
    reference = list(build_train_loader(LoaderSpec(shards, preprocess_val, tokenizer, batch_size=BATCH)))
    assert len(dali) == len(reference) == SHARDS * PER_SHARD // BATCH
    assert sorted(keys_of(dali)) == sorted(keys_of(reference))
    by_key = {key: (batch, i) for batch in reference for i, key in enumerate(batch["key"])}
    std = torch.tensor(image_spec(preprocess_val).std).view(3, 1, 1)
    for batch in dali:
        assert batch["image"].shape == (BATCH, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["tokens"].dtype == torch.int64 and batch["t_img"].dtype == torch.float32
        assert batch["cluster"].shape == (BATCH, TOPK) and batch["cluster"].dtype == torch.int64
        assert batch["n_skipped"] == 0
        for i, key in enumerate(batch["key"]):
            ref, j = by_key[key]
            for name in ("tokens", "t_img", "t_txt", "cluster"):
                assert torch.equal(batch[name][i], ref[name][j]), (key, name)
            assert torch.equal(batch["t_img"][i], torch.from_numpy(embedding(int(key), 0).astype(np.float32)))
            pixels = ((batch["image"][i] - ref["image"][j]).abs() * std).mean().item()  # in [0, 1] units
            assert pixels < 2 / 255, (key, pixels)


def test_captions_are_tokenised_for_another_tokenizer_and_for_an_online_teacher(shards, student):
    _, preprocess_val, tokenizer = student
    short = lambda texts: tokenizer(texts)[:, :10]  # noqa: E731  (not the packer's tokenizer)
    batch = next(build_dali_loader(LoaderSpec(shards, preprocess_val, short, batch_size=BATCH, workers=1,
                                              teacher_tokenizer=tokenizer)))
    captions = [f"a drawing, number {int(key)}" for key in batch["key"]]
    assert torch.equal(batch["tokens"], short(captions)) and torch.equal(batch["teacher_tokens"], tokenizer(captions))


def test_training_view_is_a_random_crop_fixed_by_seed_and_epoch_not_by_threads(shards, student):
    first = dali_epoch(shards, student, augment=True, seed=3)
    again = dali_epoch(shards, student, augment=True, seed=3, workers=1)
    assert keys_of(first) == keys_of(again)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert first[0]["image"].shape == (BATCH, 3, 32, 32) and torch.isfinite(first[0]["image"]).all()
    next_epoch = dali_epoch(shards, student, augment=True, seed=3, epoch=1)
    assert keys_of(next_epoch) != keys_of(first) and sorted(keys_of(next_epoch)) == sorted(keys_of(first))
    assert keys_of(dali_epoch(shards, student, augment=True, seed=4)) != keys_of(first)


def test_a_training_view_cropping_the_whole_image_gives_the_webdataset_loaders_pixels(shards, student):
    """RandomResizedCrop with one possible box (all of the 72x56 image): DALI's box and resize are
    torchvision's, within decoder tolerance."""
    preprocess_train, _, tokenizer = student
    whole = copy.deepcopy(preprocess_train)
    whole.transforms[0].scale, whole.transforms[0].ratio = (1.0, 1.0), (72 / 56, 72 / 56)
    dali = list(build_dali_loader(LoaderSpec(shards, whole, tokenizer, batch_size=BATCH, workers=2, shuffle_buffer=16)))
    reference = {key: image for batch in build_train_loader(LoaderSpec(shards, whole, tokenizer, batch_size=BATCH))
                 for key, image in zip(batch["key"], batch["image"])}
    std = torch.tensor(image_spec(whole).std).view(3, 1, 1)
    assert len(dali) == SHARDS * PER_SHARD // BATCH
    for batch in dali:
        for key, image in zip(batch["key"], batch["image"]):
            assert ((image - reference[key]).abs() * std).mean().item() < 2 / 255, key


def test_two_ranks_read_every_sample_once_per_epoch(shards, student):
    ranks = [keys_of(dali_epoch(shards, student, rank=r, world_size=2, epoch=5)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 * PER_SHARD
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == [f"{i:06d}" for i in range(SHARDS * PER_SHARD)]
    for r in (0, 1):  # the webdataset loader's split: shards r, r + 2
        assert {int(k) // PER_SHARD for k in ranks[r]} == {r, r + 2}


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_resume_starts_at_the_batch_after_the_checkpoint(shards, student, shuffle_buffer):
    full = dali_epoch(shards, student, shuffle_buffer=shuffle_buffer, seed=1, epoch=2)
    resumed = dali_epoch(shards, student, shuffle_buffer=shuffle_buffer, seed=1, epoch=2, skip_batches=5)
    assert len(resumed) == len(full) - 5
    seen, rest = keys_of(full[:5]), keys_of(resumed)
    if shuffle_buffer == 0:
        assert rest == keys_of(full[5:])
    else:  # the shuffle buffer's content at the cut is lost and as many seen samples come again
        assert len(set(seen) & set(rest)) <= shuffle_buffer and len(set(rest)) == len(rest)


def test_trainer_dispatches_on_data_backend_and_resumes_at_its_epoch(shards, student, with_views):
    from cid_ds.config import Config
    from cid_ds.run_state import DataPosition
    from cid_ds.data.batch import SideData
    from cid_ds.data.features import FeatureCache
    from cid_ds.data.loader import batches, resolve_backend
    cfg = Config()
    cfg.data.batch_size, cfg.data.workers, cfg.data.shuffle_buffer, cfg.data.backend = BATCH, 1, 16, "dali"
    position = DataPosition(epoch=3, batch_in_epoch=2)
    spec = LoaderSpec(shards, student[1], student[2], BATCH, workers=1, seed=cfg.seed, shuffle_buffer=16)
    stream = batches(spec, cfg.data, position)
    per_epoch = SHARDS * PER_SHARD // BATCH
    got = [next(stream) for _ in range(per_epoch - 2 + 1)]
    expected = dali_epoch(shards, student, seed=cfg.seed, epoch=3, skip_batches=2, workers=1)
    assert [b["key"] for b in got[:-1]] == [b["key"] for b in expected]
    assert got[-1]["key"] == dali_epoch(shards, student, seed=cfg.seed, epoch=4, workers=1)[0]["key"]
    assert (position.epoch, position.batch_in_epoch) == (4, 1)
    assert resolve_backend("auto", spec) == ("dali" if torch.cuda.is_available() else "wds")
    joining = replace(spec, side=SideData(spec.side_data().packed, FeatureCache(with_views["feats"])))
    with pytest.raises(DataError, match="data.backend=dali"):
        resolve_backend("dali", joining)


def test_bad_samples_are_skipped_counted_and_logged_once(tmp_path, student, capsys):
    damage = {"000003": "truncated", "000010": "no caption", "000030": "bad huffman"}
    shards = write_packed(str(tmp_path / "packed"), student[2], shards=2, per_shard=20, damage=damage)
    logs = []
    for epoch in (0, 1):  # epoch 0 meets the bad Huffman table in the decoder, epoch 1 finds it in the index
        batches = dali_epoch(shards, student, epoch=epoch, shuffle_buffer=4)
        assert len(batches) == (40 - 3) // BATCH and not set(keys_of(batches)) & set(damage)
        assert sum(b["n_skipped"] for b in batches) == 3
        logs.append(capsys.readouterr().out)
    for key in damage:
        assert logs[0].count(f"key {key}: skipped") == 1 and f"key {key}" not in logs[1]
    assert f"shard {shards[0]} key 000003: skipped, truncated JPEG" in logs[0]
    index = read_json(os.path.join(tmp_path, "packed", INDEX_FOLDER, "00001.tar.idx.json"))
    assert index["skipped"] == {"000030": "DALI could not decode the image"} and index["samples"] == 19


def test_a_decoder_error_naming_its_sample_excludes_that_sample(tmp_path, student):
    from cid_ds.data.dali_loader import _exclude_failed
    from cid_ds.data.shard_index import shard_indexes
    shards = write_packed(str(tmp_path / "packed"), student[2], shards=2, per_shard=4)
    indexes = shard_indexes(shards, {})
    error = RuntimeError(f"Error in CPU operator ...\nFailed to decode sample #2 : {shards[1]}:9728:000006.jpg\n")
    assert _exclude_failed(error, indexes, start=0, window=8) == 1
    assert indexes[1].samples == 3 and indexes[1].skipped == {"000006": "DALI could not decode the image"}
    assert shard_indexes(shards, {})[1].skipped == indexes[1].skipped  # on disk too
    with pytest.raises(DataError, match="no sample can be blamed"):
        _exclude_failed(RuntimeError("nvImageCodec failure: '#3'"), indexes, start=0, window=8)


def test_a_broken_shard_is_read_up_to_the_damage_and_recorded(tmp_path, student):
    shards = write_packed(str(tmp_path / "packed"), student[2], shards=2, per_shard=8)
    with open(shards[1], "r+b") as f:
        f.truncate(5000)
    batches = dali_epoch(shards, student)
    assert sorted(keys_of(batches)) == [f"{i:06d}" for i in range(8)]
    assert [(r.shard, r.byte, r.samples_kept) for r in batches[0]["damaged_shards"]] == [(shards[1], 3072, 0)]


def test_image_checks_find_truncation_without_decoding():
    good = jpeg(1)
    assert image_problem(good) is None and image_problem(good + b"trailing bytes") is None
    assert "truncated JPEG" in image_problem(good[:-2]) and "truncated JPEG" in image_problem(good[:len(good) // 2])
    assert "not a readable image" in image_problem(b"<html>")
    png = io.BytesIO()
    Image.new("RGB", (30, 20)).save(png, "PNG")
    assert image_problem(png.getvalue()) is None and "PNG" in image_problem(png.getvalue()[:-12])
    gif = io.BytesIO()
    Image.new("RGB", (30, 20)).save(gif, "GIF")
    assert "DALI cannot decode" in image_problem(gif.getvalue())


def test_index_files_are_made_once_reused_and_rebuilt_when_a_shard_changes(tmp_path, student, monkeypatch):
    shards = write_packed(str(tmp_path / "packed"), student[2], shards=2, per_shard=16)
    index = os.path.join(tmp_path, "packed", INDEX_FOLDER, "00000.tar.idx")
    dali_epoch(shards, student)
    first = os.stat(index).st_mtime_ns
    dali_epoch(shards, student)
    assert os.stat(index).st_mtime_ns == first
    with open(shards[0], "ab") as f:
        f.write(b"\0" * 10240)  # a changed shard: same samples, new size
    dali_epoch(shards, student)
    assert os.stat(index).st_mtime_ns != first
    assert read_json(index + ".json")["signature"]["size"] == os.path.getsize(shards[0])

    # no index folder can be made beside the shards (here a file is in the way; a read-only folder
    # is the usual reason): the index goes to the user cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    elsewhere = write_packed(str(tmp_path / "elsewhere"), student[2], shards=2, per_shard=16)
    (tmp_path / "elsewhere" / INDEX_FOLDER).write_text("not a folder")
    assert len(dali_epoch(elsewhere, student)) == 4
    assert len([f for _, _, files in os.walk(tmp_path / "cache") for f in files if f.endswith(".idx")]) == 2


def test_unsupported_preprocess_and_plain_shards_are_clear_errors(tmp_path, student):
    import torchvision.transforms as T
    with pytest.raises(ValueError, match="ColorJitter"):
        image_spec(T.Compose([
            T.RandomResizedCrop(32), T.ColorJitter(0.4), T.ToTensor(),
            T.Normalize([0.5] * 3, [1] * 3)]))
    spec = image_spec(student[0])
    assert spec.crop_scale == (0.9, 1.0) and spec.interpolation == "bicubic" and spec.size == (32, 32)
    plain = str(tmp_path / "00000.tar")
    with wds.TarWriter(plain) as tar:
        tar.write({"__key__": "a", "jpg": jpeg(0), "txt": b"a caption"})
    with pytest.raises(DataError, match="distill-ready"):
        build_dali_loader(LoaderSpec([plain], student[1], student[2], batch_size=1, workers=1))


def test_read_shard_gives_every_usable_sample_in_tar_order(tmp_path, student):
    """data_tools.extract's DALI path: plain shards, tar order, a short last batch, the skipped keys."""
    plain = str(tmp_path / "00000.tar")
    with wds.TarWriter(plain) as tar:
        for i in range(11):
            tar.write({"__key__": f"{i:03d}", "jpg": jpeg(i)[:1000] if i == 4 else jpeg(i),
                       "txt": b" " if i == 7 else f"caption {i}".encode()})
    index, batches = read_shard(plain, student[1], batch_size=4, threads=1)
    batches = list(batches)
    assert [keys for keys, _, _ in batches] == [["000", "001", "002", "003"], ["005", "006", "008", "009"], ["010"]]
    assert batches[2][2] == ["caption 10"] and batches[2][1].shape == (1, 3, 32, 32)
    assert index.skipped == {"004": "truncated JPEG (no end marker)", "007": "no caption"}


def test_extract_with_dali_writes_the_feature_cache_the_wds_backend_writes(tmp_path):
    """Same keys in the same order, same skipped keys by kind, embeddings of the same pixels."""
    from cid_ds.data.features import FeatureCache, shard_file
    from data_tools.extract import ExtractOptions, extract
    from tests.helpers import write_shard_tar
    shards = [write_shard_tar(tmp_path / "00000.tar", 0, 12, corrupt={"000000003"}, empty_caption={"000000005"}),
              write_shard_tar(tmp_path / "00001.tar", 12, 9)]
    caches = {}
    for backend in ("wds", "dali"):
        out = str(tmp_path / backend)
        extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=4, workers=1,
                               backend=backend, random_teacher_ok=True, device="cpu"))
        caches[backend] = FeatureCache(out)
    for stem in ("00000", "00001"):
        wds_rows, dali_rows = caches["wds"].lookup(stem), caches["dali"].lookup(stem)
        assert dali_rows.row == wds_rows.row and dali_rows.skipped == wds_rows.skipped
        cosine = (dali_rows.image.astype(np.float32) * wds_rows.image.astype(np.float32)).sum(1)
        assert cosine.min() > 0.999
        np.testing.assert_array_equal(dali_rows.text, wds_rows.text)
    with np.load(shard_file(str(tmp_path / "dali"), "00000")) as npz:
        assert npz["corrupt_image"].tolist() == ["000000003"] and npz["missing_caption"].tolist() == ["000000005"]


VIEW_BATCH = 32


@pytest.fixture(scope="module")
def with_views(tmp_path_factory):
    """Demo data, a feature cache of the demo teacher with 2 stored views per image (crops of 30% to all
    of it, some flipped), packed into 2 distill-ready shards; the teacher itself."""
    from cid_ds.teacher import load_teacher
    from data_tools.extract import ExtractOptions, extract
    from data_tools.make_demo_data import generate
    from data_tools.pack import PackOptions, pack
    root = tmp_path_factory.mktemp("views")
    generate(str(root / "data"), train_samples=192, shards=2, seed=0, eval_scale=0.1, progress=False)
    sources = sorted(str(p) for p in (root / "data" / "train").glob("*.tar"))
    extract(ExtractOptions(shards=sources, teacher="demo-teacher", out=str(root / "feats"), batch_size=64, workers=1,
                           views=2, view_scale=(0.3, 1.0), random_teacher_ok=True, device="cpu"))
    pack(PackOptions(shards=sources, features=str(root / "feats"), tokenizer="demo-teacher", out=str(root / "packed"),
                     samples_per_shard=96), progress=False)
    model, preprocess_val, tokenizer, _ = load_teacher("demo-teacher", None, random_ok=True)
    return {"shards": sorted(str(p) for p in (root / "packed").glob("*.tar")), "feats": str(root / "feats"),
            "manifest": str(root / "packed" / "manifest.json"), "model": model.eval(), "preprocess": preprocess_val,
            "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def replayed(with_views):
    """``{(loader, epoch): {key: (image, t_img)}}``: every sample of epochs 0 and 1 of both loaders,
    replaying 2 stored views."""
    d = with_views
    epochs = {}
    for epoch in (0, 1):
        dali = build_dali_loader(LoaderSpec(d["shards"], d["preprocess"], d["tokenizer"], batch_size=VIEW_BATCH, workers=2,
                                            epoch=epoch, shuffle_buffer=16, replay_views=2), device_id=None)
        wds_ = build_train_loader(LoaderSpec(d["shards"], d["preprocess"], d["tokenizer"], batch_size=VIEW_BATCH,
                                             workers=1, epoch=epoch, shuffle_buffer=16, replay_views=2))
        for name, loader in (("dali", dali), ("wds", wds_)):
            batches = list(loader)
            assert len(batches) == 192 // VIEW_BATCH
            for batch in batches:
                assert batch["image"].shape == (VIEW_BATCH, 3, 32, 32) and batch["image"].dtype == torch.float32
                assert batch["t_img"].shape == (VIEW_BATCH, 256) and batch["t_img"].dtype == torch.float32
                assert batch["t_txt"].shape == (VIEW_BATCH, 256) and batch["tokens"].dtype == torch.int64
                assert batch["n_skipped"] == 0
            epochs[name, epoch] = {key: (batch["image"][i], batch["t_img"][i])
                                   for batch in batches for i, key in enumerate(batch["key"])}
            assert len(epochs[name, epoch]) == 192
    return epochs


def test_the_replayed_crop_reproduces_the_stored_view(with_views, replayed):
    """The teacher, shown a loader's replayed image, gives back the stored embedding of that view."""
    for (loader, epoch), samples in replayed.items():
        images = torch.stack([image for image, _ in samples.values()])
        stored = torch.stack([t_img for _, t_img in samples.values()])
        with torch.no_grad():
            cosine = (F.normalize(with_views["model"].encode_image(images), dim=-1) * stored).sum(1)
        assert cosine.min() > 0.999, (loader, epoch, cosine.min().item())


def test_the_two_loaders_replay_the_same_box_for_the_same_sample_and_epoch(with_views, replayed):
    """Same stored embedding, pixels within resampling tolerance; the next epoch is another view."""
    from cid_ds.data.features import FeatureCache
    boxes = np.concatenate([FeatureCache(with_views["feats"]).lookup(stem).view_box for stem in ("00000", "00001")])
    assert set(boxes[:, :, 4].ravel()) == {0, 1}  # flipped views and unflipped ones
    std = torch.tensor(image_spec(with_views["preprocess"]).std).view(3, 1, 1)
    for epoch in (0, 1):
        dali, reference = replayed["dali", epoch], replayed["wds", epoch]
        assert dali.keys() == reference.keys()
        for key, (image, t_img) in dali.items():
            assert torch.equal(t_img, reference[key][1]), key
            pixels = ((image - reference[key][0]).abs() * std).mean().item()  # in [0, 1] units
            assert pixels < 2 / 255, (key, epoch, pixels)
    for key, (image, t_img) in replayed["dali", 0].items():
        other_image, other_t_img = replayed["dali", 1][key]
        assert not torch.equal(t_img, other_t_img) and ((image - other_image).abs() * std).mean() > 2 / 255, key


def test_replay_views_beyond_what_was_stored_is_refused_clearly(with_views):
    d = with_views
    with pytest.raises(DataError, match=re.escape(f"{d['manifest']} stores 2 views")):
        build_dali_loader(LoaderSpec(d["shards"], d["preprocess"], d["tokenizer"], batch_size=VIEW_BATCH, workers=1,
                                     replay_views=3), device_id=None)


def test_replaying_and_plain_runs_share_one_index_per_shard(with_views, replayed, capsys):
    """An ablation alternating data.views replay and random on the same shards does not rescan them."""
    d = with_views
    capsys.readouterr()
    plain = build_dali_loader(LoaderSpec(d["shards"], d["preprocess"], d["tokenizer"], batch_size=VIEW_BATCH,
                                         workers=1), device_id=None)
    batch = next(plain)
    assert "indexed" not in capsys.readouterr().out  # the replaying epochs' index files were reused
    assert batch["t_img"].shape == (VIEW_BATCH, 256) and "v_img" not in batch
