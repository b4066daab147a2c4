"""Damaged shards (issue 18, class 1) in every stage that reads shards: extract, pack, the webdataset and
DALI training loaders, evaluate. The shards are made here and damaged four ways (empty, random bytes,
cut mid-member, a .tar.gz cut in the middle); each stage must use the samples before the damage, record
file and byte, go on, count the shard as done, and stop with a message past the damaged fraction."""
import glob
import gzip
import io
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cid_ds.data.damage import DamageBudget, RunDamage, ShardDamage, TooMuchDamage
from cid_ds.data.batch import LoaderSpec
from cid_ds.data.dali_loader import build_dali_loader
from cid_ds.data.features import shard_file
from cid_ds.data.tars import samples_until_damage
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.evaluate import evaluate
from cid_ds.io import read_json
from cid_ds.models import create_model
from data_tools.extract import ExtractOptions, extract
from data_tools.pack import PackOptions, pack
from tests.helpers import REPO_ROOT, make_data_and_features, write_shard_tar

PER_SHARD = 8
CUT_AT = 9000  # write_shard_tar's sample 1 image header is at byte 8192: sample 0 whole, then the cut


def damaged_shard(folder, name: str, kind: str, first: int) -> str:
    """A shard of samples ``first..first+7`` damaged as ``kind`` says."""
    path = os.path.join(folder, name)
    write_shard_tar(path, first, PER_SHARD)
    data = open(path, "rb").read()
    if kind == "empty":
        data = b""
    elif kind == "random bytes":
        data = random.Random(first).randbytes(5000)
    elif kind == "cut mid-member":
        data = data[:CUT_AT]
    elif kind == "gzip cut":
        os.remove(path)
        path += ".gz"
        compressed = gzip.compress(data)
        data = compressed[:len(compressed) // 2]
    with open(path, "wb") as f:
        f.write(data)
    return path


def keys(first: int, count: int) -> list[str]:
    return [f"{i:09d}" for i in range(first, first + count)]


@pytest.fixture(scope="module")
def student():
    _, _, preprocess, tokenizer = create_model("demo-student")
    return preprocess, tokenizer


@pytest.mark.parametrize("kind", ["empty", "random bytes", "cut mid-member", "gzip cut"])
def test_the_reader_keeps_the_samples_before_the_damage_and_names_file_and_byte(tmp_path, kind):
    path = damaged_shard(tmp_path, "00000.tar", kind, 0)
    damaged = []
    samples = list(samples_until_damage(path, damaged))
    [record] = damaged
    assert [s["__key__"] for s in samples] == keys(0, record.samples_kept)
    assert record.shard == path and (str(record.byte) in record.problem or record.problem == "empty file")
    if kind == "cut mid-member":
        assert (record.byte, record.samples_kept) == (8192, 1)
    if kind == "gzip cut":  # about half the samples survive the cut of the compressed stream
        assert 1 <= record.samples_kept < PER_SHARD and "EOFError" in record.problem
    if kind in ("empty", "random bytes"):
        assert (record.byte, record.samples_kept) == (0, 0)


def test_the_threshold_accepts_one_damaged_shard_of_a_small_set_and_stops_at_the_fraction():
    record = ShardDamage("a.tar", 0, 0, "empty file")
    small = DamageBudget(4, 0.01, "data.max_damaged_fraction")
    small.add(record)
    small.add(record)  # the same shard again (a second epoch) is not a second one
    with pytest.raises(TooMuchDamage, match=r"2 of 4 shards are damaged \(50.0%\), more than "
                                            r"data.max_damaged_fraction = 0.01 accepts \(1\)"):
        small.add(ShardDamage("b.tar", 512, 3, "truncated"))
    large = DamageBudget(1000, 0.01, "x")
    for i in range(10):
        large.add(ShardDamage(f"{i}.tar", 0, 0, "empty file"))
    with pytest.raises(TooMuchDamage, match=r"11 of 1000 shards are damaged \(1.1%\)"):
        large.add(ShardDamage("10.tar", 0, 0, "empty file"))
    with pytest.raises(TooMuchDamage):
        DamageBudget(4, 0.0, "x").add(record)
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\], got 1.5"):
        DamageBudget(4, 1.5, "x")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Three whole shards, one cut mid-member and one cut .tar.gz, extracted (accepting 2 of 5 damaged)."""
    root = tmp_path_factory.mktemp("damaged")
    data = str(root / "data")
    os.makedirs(data)
    shards = [write_shard_tar(os.path.join(data, f"{i:05d}.tar"), i * PER_SHARD, PER_SHARD) for i in range(3)]
    shards += [damaged_shard(data, "00003.tar", "cut mid-member", 3 * PER_SHARD),
               damaged_shard(data, "00004.tar", "gzip cut", 4 * PER_SHARD)]
    feats = str(root / "feats")
    result = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=feats, batch_size=16, workers=1,
                                    random_teacher_ok=True, max_damaged_fraction=0.4, device="cpu"))
    return {"root": root, "shards": shards, "feats": feats, "result": result}


def test_extract_records_the_damage_in_the_shard_file_and_manifest_and_a_rerun_completes(extracted):
    shards, feats, result = extracted["shards"], extracted["feats"], extracted["result"]
    manifest = result["manifest"]
    assert manifest["complete"] and manifest["totals"]["damaged_shards"] == 2
    cut = manifest["shards"]["00003"]
    assert (cut["damage"]["shard"], cut["damage"]["byte"], cut["damage"]["samples_kept"]) == (shards[3], 8192, 1)
    assert cut["damage"]["problem"].startswith("member at byte 8192 is truncated") and cut["samples"] == 1
    zipped = manifest["shards"]["00004.tar"]  # shard_stem keeps ".tar" of ".tar.gz"
    assert zipped["damage"]["shard"] == shards[4] and zipped["samples"] == zipped["damage"]["samples_kept"] >= 1
    with np.load(shard_file(feats, "00003")) as npz:
        assert npz["keys"].tolist() == keys(3 * PER_SHARD, 1) and json.loads(str(npz["damage"]))["byte"] == 8192
    again = extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=feats, batch_size=16, workers=1,
                                   random_teacher_ok=True, max_damaged_fraction=0.4, device="cpu"))
    assert again["extracted"] == [] and again["manifest"]["complete"]


def test_extract_stops_past_the_damaged_fraction_and_leaves_those_shards_to_redo(tmp_path):
    data = str(tmp_path)
    shards = [write_shard_tar(os.path.join(data, "00000.tar"), 0, PER_SHARD),
              damaged_shard(data, "00001.tar", "empty", 8), damaged_shard(data, "00002.tar", "random bytes", 16)]
    out = str(tmp_path / "feats")
    with pytest.raises(TooMuchDamage, match=r"2 of 3 shards are damaged \(66.7%\), more than "
                                            r"--max-damaged-fraction = 0.01 accepts \(1\)(.|\n)*re-run reads them"):
        extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=out, batch_size=16, workers=1,
                               random_teacher_ok=True, device="cpu"))
    assert not os.path.exists(shard_file(out, "00001")) and not os.path.exists(shard_file(out, "00002"))


@pytest.fixture(scope="module")
def packed(extracted):
    """The extracted shards packed, with whole shard 1 cut after extraction (as a copy in ``broken/``)."""
    shards = list(extracted["shards"])
    broken = os.path.join(extracted["root"], "broken")
    os.makedirs(broken)
    for i in range(3):
        shards[i] = os.path.join(broken, os.path.basename(shards[i]))
        data = open(extracted["shards"][i], "rb").read()
        open(shards[i], "wb").write(data[:CUT_AT] if i == 1 else data)
    out = str(extracted["root"] / "packed")
    manifest = pack(PackOptions(shards=shards, features=extracted["feats"], tokenizer="demo-student", out=out,
                                samples_per_shard=10, max_damaged_fraction=0.5), progress=False)
    return {"dir": out, "manifest": manifest, "sources": shards}


def test_pack_writes_what_precedes_a_source_damaged_after_extraction_and_lists_it(packed):
    manifest, sources = packed["manifest"], packed["sources"]
    [record] = manifest["damaged_sources"]
    assert (record["shard"], record["byte"], record["samples_kept"]) == (sources[1], 8192, 1)
    assert manifest["totals"]["missing_in_source"] == PER_SHARD - 1
    assert manifest["totals"]["samples"] == manifest["totals"]["planned"] - (PER_SHARD - 1)
    assert read_json(os.path.join(packed["dir"], "manifest.json"))["damaged_sources"] == [record]


def loader_epoch(shards, student, **kwargs):
    preprocess, tokenizer = student
    return list(build_train_loader(LoaderSpec(shards, preprocess, tokenizer, batch_size=3, **kwargs)))


def test_the_training_loader_uses_what_precedes_the_damage_and_reports_it_from_its_worker(tmp_path, student):
    good = write_shard_tar(tmp_path / "00000.tar", 0, PER_SHARD)
    cut = damaged_shard(tmp_path, "00001.tar", "cut mid-member", PER_SHARD)
    batches = loader_epoch([good, cut], student, workers=1)
    assert sorted(k for b in batches for k in b["key"]) == keys(0, PER_SHARD + 1)
    assert [(r.shard, r.byte) for b in batches for r in b["damaged_shards"]] == [(cut, 8192)]
    empty = [damaged_shard(tmp_path, f"0000{i}.tar", "empty", 8 * i) for i in (2, 3)]
    reported = [r.shard for b in loader_epoch([good, cut] + empty, student, workers=0) for r in b["damaged_shards"]]
    assert sorted(reported) == [cut] + empty  # the loader reports; the trainer counts (RunDamage)


def test_the_trainer_counts_each_damaged_shard_once_over_epochs_against_all_the_runs_shards():
    record = lambda name: ShardDamage(name, 512, 1, "truncated")  # noqa: E731
    run = RunDamage(shards=200, max_fraction=0.01)  # accepts 2 of the run's 200 shards
    run.add([record("a.tar"), record("b.tar")])
    run.add([record("a.tar")])  # the next epoch reads it again
    run.check("cpu")
    assert run.count == 2
    run.add([record("c.tar")])
    with pytest.raises(TooMuchDamage, match=r"3 of 200 shards are damaged \(1.5%\)"):
        run.check("cpu")


def test_the_dali_loader_on_cpu_reads_a_packed_shard_up_to_its_damage(packed, student, tmp_path):
    folder = shutil.copytree(packed["dir"], tmp_path / "packed")
    shards = sorted(str(path) for path in folder.glob("*.tar"))
    whole = open(shards[0], "rb").read()
    open(shards[0], "wb").write(whole[:len(whole) // 2])
    preprocess, tokenizer = student
    batches = list(build_dali_loader(LoaderSpec(shards, preprocess, tokenizer, batch_size=4, workers=1,
                                                shuffle_buffer=0), device_id=None))
    [record] = batches[0]["damaged_shards"]
    assert record.shard == shards[0] and 0 < record.byte < len(whole) and 0 < record.samples_kept < 10
    assert all(not b["damaged_shards"] for b in batches[1:])
    index = read_json(str(folder / "_dali_index" / "00000.tar.idx.json"))
    assert index["damage"] == record.as_dict()  # on disk: a later epoch reports it without reading the tar again
    read = [key for batch in batches for key in batch["key"]]
    assert len(read) == len(set(read)) == len(batches) * 4 and len(batches) >= 1


def test_evaluate_uses_what_precedes_a_damaged_eval_shard_and_reports_it(tmp_path, student):
    folder = tmp_path / "shapes"
    os.makedirs(folder / "test")
    (folder / "classnames.txt").write_text("zero\none\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a {c}\n")
    (folder / "test" / "nshards.txt").write_text("2")
    for shard, first in ((0, 0), (1, PER_SHARD)):
        path = folder / "test" / f"{shard}.tar"
        write_classification_tar(path, first)
        if shard == 1:
            path.write_bytes(path.read_bytes()[:CUT_AT])
    model, _, _, _ = create_model("demo-student")
    preprocess, tokenizer = student
    [result] = evaluate(model, preprocess, tokenizer, [str(folder)], batch_size=4).values()
    [record] = result["damaged_shards"]
    assert record["shard"] == str(folder / "test" / "1.tar") and 0 < record["byte"] < CUT_AT
    assert record["samples_kept"] >= 1 and result["samples"] == PER_SHARD + record["samples_kept"]


def write_classification_tar(path, first: int) -> None:
    """A clip_benchmark classification shard: an image and a class index per sample."""
    with wds.TarWriter(str(path)) as tar:
        for i in range(first, first + PER_SHARD):
            buf = io.BytesIO()
            Image.new("RGB", (48, 40), (i * 37 % 256, 90, 160)).save(buf, "JPEG", quality=90)
            tar.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "cls": str(i % 2).encode()})


def train_on(data, out: str, extra: dict) -> subprocess.CompletedProcess:
    items = {"output_dir": out, "data.train_shards": data["shards"], "data.features": data["feats"],
             "data.batch_size": 16, "data.shuffle_buffer": 10, "data.views": "center", "eval.at_end": "false",
             "eval.sets": "[]", "optim.steps": 4, "optim.warmup_steps": 1, "logging.every": 2,
             "checkpoint.every": 1000} | extra
    return subprocess.run([sys.executable, "-m", "cid_ds.train", "--config", "ds_configs/experiments/demo_distill.yaml"]
                          + [f"{k}={v}" for k, v in items.items()], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"), timeout=300)


def test_training_goes_on_past_a_damaged_shard_counts_it_in_tensorboard_and_stops_when_damage_is_systemic(tmp_path):
    data = make_data_and_features(str(tmp_path / "data"), train_samples=128, shards=4)
    shards = sorted(glob.glob(data["shards"]))
    whole = open(shards[1], "rb").read()
    open(shards[1], "wb").write(whole[:len(whole) // 2])  # cut after extraction: the cache lists every key
    out = str(tmp_path / "one")
    proc = train_on(data, out, {})
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/damaged_shards")][-1] == 1
    assert f"shard {shards[1]} is damaged at byte" in proc.stdout + proc.stderr

    open(shards[2], "wb").close()  # a second of 4: more than max(1, 1% of 4) accepts
    proc = train_on(data, str(tmp_path / "two"), {"optim.steps": 8})  # an epoch and more: every shard read
    assert proc.returncode != 0
    assert "data error: 2 of 4 shards are damaged (50.0%), more than data.max_damaged_fraction = 0.01" in proc.stderr
    assert "Traceback" not in proc.stderr
