"""The teacher feature cache: `python -m data_tools.extract` writes it, `FeatureCache` reads it."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file

from cid_ds.data.features import FeatureCache, shard_file, shard_stem
from cid_ds.data.samples import read_samples
from cid_ds.models import MODEL_CONFIG_DIR, create_model, weights_fingerprint
from data_tools.extract import ExtractOptions, extract, main
from data_tools.spread import Share
from tests.helpers import write_shard_tar

CORRUPT_KEY, EMPTY_CAPTION_KEY = "000000045", "000000050"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return [write_shard_tar(root / "00000.tar", 0, 40),
            write_shard_tar(root / "00001.tar", 40, 40, corrupt={CORRUPT_KEY}, empty_caption={EMPTY_CAPTION_KEY})]


@pytest.fixture(scope="module")
def cache_dir(shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "feats")
    extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=16, workers=2,
                           random_teacher_ok=True, device="cpu"))
    return out


def rows(cache_dir, stem):
    with np.load(shard_file(cache_dir, stem)) as npz:
        return {name: npz[name] for name in ("keys", "image", "text")}


def test_cache_rows_are_the_teachers_embeddings_of_the_eval_view(shards, cache_dir):
    torch.manual_seed(0)  # a teacher without weights is seeded with 0, as extract does
    teacher, _, preprocess_val, tokenizer = create_model("demo-teacher")
    teacher.eval()
    cache = FeatureCache(cache_dir)
    assert cache.embed_dim == 256 and cache.complete
    assert cache.teacher["weights_sha256"] == weights_fingerprint(teacher)
    assert cache.teacher["image_size"] == [32, 32] and cache.teacher["context_length"] == 24

    samples = [s for s in read_samples(shards) if s["__key__"] not in (CORRUPT_KEY, EMPTY_CAPTION_KEY)]
    with torch.no_grad():
        images = torch.stack([preprocess_val(Image.open(io.BytesIO(s["jpg"]))) for s in samples])
        image = F.normalize(teacher.encode_image(images), dim=-1).numpy()
        text = F.normalize(teacher.encode_text(tokenizer([s["txt"].decode() for s in samples])), dim=-1).numpy()

    cached_image, cached_text = [], []
    for sample in samples:
        features = cache.lookup(shard_stem(sample["__url__"]))
        row = features.row[sample["__key__"]]
        cached_image.append(features.image[row])
        cached_text.append(features.text[row])
    assert len(samples) == 78 and cached_image[0].dtype == np.float16
    np.testing.assert_allclose(np.stack(cached_image).astype(np.float32), image, atol=2e-3)
    np.testing.assert_allclose(np.stack(cached_text).astype(np.float32), text, atol=2e-3)


def test_manifest_records_teacher_and_counts_skipped_samples(shards, cache_dir):
    with open(os.path.join(cache_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["complete"] is True and manifest["views"]["count"] == 0 and manifest["dtype"] == "float16"
    assert manifest["teacher"]["spec"] == "demo-teacher" and manifest["teacher"]["preprocess"]["mean"] == [0.5] * 3
    assert manifest["shards"]["00000"] == {"source": shards[0], "samples": 40, "corrupt_image": 0, "missing_caption": 0}
    assert manifest["shards"]["00001"] == {"source": shards[1], "samples": 38, "corrupt_image": 1, "missing_caption": 1}
    dim = manifest["teacher"]["embed_dim"]
    assert manifest["totals"] == {"shards": 2, "samples": 78, "corrupt_image": 1, "missing_caption": 1,
                                  "damaged_shards": 0, "bytes": 78 * 4 * dim}  # fp16 image and text rows

    features = FeatureCache(cache_dir).lookup("00001")
    assert CORRUPT_KEY not in features.row and EMPTY_CAPTION_KEY not in features.row
    assert features.skipped == {CORRUPT_KEY, EMPTY_CAPTION_KEY}
    assert FeatureCache(cache_dir).lookup("00042") is None


def test_rerun_after_a_crash_redoes_only_the_unfinished_shard(shards, cache_dir, tmp_path):
    out = str(tmp_path / "feats")
    shutil.copytree(cache_dir, out)
    os.remove(shard_file(out, "00001"))
    with open(shard_file(out, "00001") + ".tmp12345", "wb") as f:  # what a crash mid-write leaves
        f.write(b"PK\x03\x04 half a zip")
    kept_mtime = os.stat(shard_file(out, "00000")).st_mtime_ns

    result = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=16, workers=1,
                                    random_teacher_ok=True, device="cpu"))

    assert result["extracted"] == ["00001"] and result["skipped"] == ["00000"] and result["samples"] == 38
    assert os.stat(shard_file(out, "00000")).st_mtime_ns == kept_mtime
    assert sorted(os.listdir(out)) == ["00000.npz", "00001.npz", "manifest.json"]
    for name, array in rows(cache_dir, "00001").items():
        np.testing.assert_array_equal(rows(out, "00001")[name], array)
    assert result["manifest"]["complete"] and result["manifest"]["totals"]["samples"] == 78

    again = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=16, workers=1,
                                   random_teacher_ok=True, device="cpu"))
    assert again["extracted"] == [] and again["samples"] == 0 and again["manifest"]["complete"]


def test_two_ranks_split_the_shards_and_the_last_one_writes_the_manifest(shards, cache_dir, tmp_path):
    out = str(tmp_path / "feats")
    first = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=16, workers=1,
                                   random_teacher_ok=True, device="cpu"), share=Share(0, 2))
    assert first["extracted"] == ["00000"] and first["manifest"] is None
    assert FeatureCache(out).complete is False
    second = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=16, workers=1,
                                    random_teacher_ok=True, device="cpu"), share=Share(1, 2))
    assert second["extracted"] == ["00001"] and second["manifest"]["complete"]
    assert FeatureCache(out).complete
    for stem in ("00000", "00001"):
        for name, array in rows(cache_dir, stem).items():
            np.testing.assert_array_equal(rows(out, stem)[name], array)


def test_a_different_teacher_is_refused_before_any_work(shards, cache_dir, tmp_path):
    out = str(tmp_path / "feats")
    shutil.copytree(cache_dir, out)
    os.remove(shard_file(out, "00001"))
    with open(os.path.join(out, "manifest.json")) as f:
        manifest_before = f.read()

    with pytest.raises(ValueError, match=r"manifest.json: teacher.weights_sha256 is [0-9a-f]{12}\.\. "
                                         r"but the teacher given is [0-9a-f]{12}\.\.") as error:
        extract(ExtractOptions(shards=shards, teacher="demo-student", out=out, batch_size=16, workers=1,
                               random_teacher_ok=True, device="cpu"))
    assert "teacher.embed_dim is 256 but the teacher given is 128" in str(error.value)
    assert not os.path.exists(shard_file(out, "00001"))
    with open(os.path.join(out, "manifest.json")) as f:
        assert f.read() == manifest_before


def test_same_teacher_name_with_new_weights_is_refused(shards, tmp_path):
    folder = tmp_path / "my-teacher"
    folder.mkdir()
    shutil.copy(os.path.join(MODEL_CONFIG_DIR, "demo-teacher", "open_clip_config.json"), folder)

    def save_weights(seed):
        torch.manual_seed(seed)
        model = create_model("demo-teacher")[0]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "open_clip_model.safetensors"))

    save_weights(1)
    out = str(tmp_path / "feats")
    extract(ExtractOptions(shards=shards[:1], teacher=f"local-dir:{folder}", out=out, batch_size=16, workers=0,
                           device="cpu"))
    save_weights(2)
    with pytest.raises(ValueError, match=r"teacher\.weights_sha256 is .* but the teacher given is") as error:
        extract(ExtractOptions(shards=shards, teacher=f"local-dir:{folder}", out=out, batch_size=16, workers=0,
                               device="cpu"))
    assert "embed_dim" not in str(error.value)


def test_feature_cache_names_the_file_when_the_manifest_is_missing_or_broken(cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"feature cache {tmp_path}: no manifest.json"):
        FeatureCache(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        FeatureCache(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"dtype": "float16", "complete": True}))
    with pytest.raises(ValueError, match="manifest.json: field 'teacher' is missing"):
        FeatureCache(str(tmp_path))

    cache = FeatureCache(cache_dir)
    cache.check_teacher({"embed_dim": 256, "weights_sha256": cache.teacher["weights_sha256"]})
    with pytest.raises(ValueError, match=f"feature cache {cache_dir}/manifest.json: teacher.weights_sha256 is "
                                         f"{cache.teacher['weights_sha256'][:12]}.. but the teacher given is cd34"):
        cache.check_teacher({"embed_dim": 256, "weights_sha256": "cd34"})


def test_an_unreadable_shard_is_recorded_and_done(shards, tmp_path):
    """A cut shard gives its whole samples and counts as done (more in tests/test_damaged_shards.py)."""
    broken = tmp_path / "00007.tar"
    with open(shards[0], "rb") as f:
        broken.write_bytes(f.read()[:30000])
    out = str(tmp_path / "feats")
    result = extract(ExtractOptions(shards=[shards[0], str(broken)], teacher="demo-teacher", out=out, batch_size=16,
                                    workers=1, random_teacher_ok=True, device="cpu"))
    assert os.path.isfile(shard_file(out, "00000")) and os.path.isfile(shard_file(out, "00007"))
    damage = result["manifest"]["shards"]["00007"]["damage"]
    assert damage["shard"] == str(broken) and 0 < damage["byte"] < 30000 and damage["samples_kept"] > 0


def test_a_key_twice_in_a_shard_is_an_error_naming_shard_and_key(tmp_path):
    shard = str(tmp_path / "00000.tar")
    with wds.TarWriter(shard) as tar:
        for key in ("a1", "b2", "a1"):
            tar.write({"__key__": key, "jpg": b"unused", "txt": b"a caption"})
    with pytest.raises(ValueError, match=f"shard {shard}: key a1 appears twice"):
        extract(ExtractOptions(shards=[shard], teacher="demo-teacher", out=str(tmp_path / "feats"), workers=1,
                               random_teacher_ok=True, device="cpu"))


def test_shard_names_must_be_unique(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    paths = [write_shard_tar(a / "00000.tar", 0, 2), write_shard_tar(b / "00000.tar", 2, 2)]
    with pytest.raises(ValueError, match=f"shards {paths[0]} and {paths[1]} have the same name '00000'"):
        extract(ExtractOptions(shards=paths, teacher="demo-teacher", out=str(tmp_path / "feats"), device="cpu"))


def test_command_line(shards, cache_dir, tmp_path, capsys):
    main(["--shards", os.path.join(os.path.dirname(shards[0]), "{00000..00001}.tar"), "--teacher", "demo-teacher",
          "--out", cache_dir, "--workers", "1", "--device", "auto", "--random-teacher-ok"])
    assert "feature cache complete" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="shard not found: .*00002.tar"):
        main(["--shards", os.path.join(os.path.dirname(shards[0]), "{00000..00002}.tar"),
              "--teacher", "demo-teacher", "--out", str(tmp_path / "feats")])
