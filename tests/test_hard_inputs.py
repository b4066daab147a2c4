"""Hard inputs a scraped dataset really contains: each is a clear error naming the shard, or a counted
skip that lets training go on; and data too small for one batch, an error that says why."""
import io
import os
import time

import pytest
import webdataset as wds
from PIL import Image

from cid_ds import train
from cid_ds.run_state import DataPosition
from cid_ds.config import expand_shards
from cid_ds.data.batch import LoaderSpec
from cid_ds.data.loader import batches
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.models import create_model
from tests.helpers import REPO_ROOT, make_data_and_features, write_shard_tar


@pytest.fixture(scope="module")
def student():
    _, _, preprocess, tokenizer = create_model("demo-student")
    return preprocess, tokenizer


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (i * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def write_samples(path, samples):
    with wds.TarWriter(str(path)) as tar:
        for i, (key, image, caption) in enumerate(samples):
            tar.write({"__key__": key, "jpg": image, "txt": caption})
    return str(path)


def epoch(shards, student, batch_size=4):
    preprocess, tokenizer = student
    return list(build_train_loader(LoaderSpec(shards, preprocess, tokenizer, batch_size=batch_size)))


def test_bad_samples_are_skipped_and_counted(tmp_path, student):
    shard = write_samples(tmp_path / "00000.tar", [
        ("a", jpeg(0), b"a red circle"),
        ("b", b"<html>not an image</html>", b"a blue square"),   # not an image
        ("c", jpeg(2), b"   "),                                 # empty caption
        ("d", jpeg(3), "une \xe9toile".encode("latin-1")),       # not UTF-8: kept, bytes replaced
        ("e", jpeg(4), b"a green star"),
        ("f", jpeg(5), b"a yellow ring"),
    ])
    batches = epoch([shard], student)
    assert len(batches) == 1 and sorted(batches[0]["key"]) == ["a", "d", "e", "f"]
    assert batches[0]["n_skipped"] == 2


def test_a_10_mb_caption_is_cut_to_what_the_tokenizer_keeps(tmp_path, student):
    huge = ("word " * 2_100_000).encode()[:10 * 2**20]
    shard = write_samples(tmp_path / "00000.tar", [(k, jpeg(i), huge) for i, k in enumerate("abcd")])
    start = time.time()
    batches = epoch([shard], student)
    assert time.time() - start < 20
    assert batches[0]["tokens"].shape == (4, 24) and (batches[0]["tokens"] != 0).all()


@pytest.mark.parametrize("damage", ["empty file", "not a tar", "truncated"])
def test_a_broken_shard_is_recorded_and_its_samples_before_the_damage_used(tmp_path, student, damage):
    good = write_shard_tar(tmp_path / "00000.tar", 0, 8)
    bad = tmp_path / "00001.tar"
    if damage == "empty file":
        bad.write_bytes(b"")
    elif damage == "not a tar":
        bad.write_bytes(b"PK\x03\x04 this is a zip file" * 100)
    else:
        write_shard_tar(bad, 8, 8)
        bad.write_bytes(bad.read_bytes()[:9000])  # sample 8 whole, sample 9's image (header at 8192) cut
    batches = epoch([good, str(bad)], student, batch_size=3)
    keys = sorted(key for batch in batches for key in batch["key"])
    kept = 1 if damage == "truncated" else 0
    assert len(keys) == (8 + kept) // 3 * 3 and set(keys) <= {f"{i:09d}" for i in range(8 + kept)}
    records = [record for batch in batches for record in batch["damaged_shards"]]
    assert [(r.shard, r.byte, r.samples_kept) for r in records] == [(str(bad), 8192 if kept else 0, kept)]


def test_a_valid_tar_with_no_samples_contributes_nothing(tmp_path, student):
    empty = tmp_path / "00000.tar"
    with wds.TarWriter(str(empty)):
        pass
    assert os.path.getsize(empty) > 0
    batches = epoch([str(empty), write_shard_tar(tmp_path / "00001.tar", 0, 8)], student, batch_size=8)
    assert len(batches) == 1 and sorted(batches[0]["key"]) == [f"{i:09d}" for i in range(8)]


@pytest.fixture(scope="module")
def balanced_packed(tmp_path_factory) -> str:
    """48 samples, of which the balance keeps 24, packed 8 to a shard: the packed shards' pattern."""
    from data_tools.balance import BalanceOptions, balance
    from data_tools.cluster import ClusterOptions, cluster
    from data_tools.pack import PackOptions, pack
    root = str(tmp_path_factory.mktemp("balanced"))
    data = make_data_and_features(root, train_samples=48, shards=2)
    cluster(ClusterOptions(features=data["feats"], k=2, out=os.path.join(root, "clusters")))
    balance(BalanceOptions(features=data["feats"], clusters=os.path.join(root, "clusters"), out=os.path.join(root,
                           "balance"), perceptual=0.9999, target_keep_fraction=0.5, workers=1))
    pack(PackOptions(shards=expand_shards(data["shards"]), features=data["feats"], tokenizer="demo-student",
                     out=os.path.join(root, "packed"), balance=os.path.join(root, "balance"), samples_per_shard=8),
                     progress=False)
    return os.path.join(root, "packed", "*.tar")


def test_an_epoch_without_a_full_batch_names_the_samples_the_balance_removed_and_what_a_step_needs(
        balanced_packed, student, tmp_path, monkeypatch, capsys):
    def first_batch_of_rank_0_of_2(cfg, stop):  # run() as far as the loader's first batch
        spec = LoaderSpec(expand_shards(cfg.data.train_shards), *student, cfg.data.batch_size,
                          workers=cfg.data.workers, rank=0, world_size=2)
        return next(batches(spec, cfg.data, DataPosition()))
    monkeypatch.setattr(train, "run", first_batch_of_rank_0_of_2)
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exited:
        train.main(["--config", "ds_configs/experiments/demo_distill.yaml", f"output_dir={tmp_path}",
                    f"data.train_shards={balanced_packed}", "data.batch_size=16", "data.workers=2", "eval.sets=[]"])
    message = str(exited.value)
    assert message.startswith("data error: rank 0: an epoch gave no full batch of data.batch_size 16. The data: "
                              f"data.train_shards {balanced_packed}, 3 shards holding 24 samples (counted in ")
    assert "; before packing, the balance (data_tools.balance) removed 24 of 48 samples (50.0%)" in message
    assert ("A step takes 16 x 2 ranks = 32 samples, and each rank fills its batches from its own shards, "
            "shards[rank::2]: this rank reads 2 of the 3 shards, holding 16 samples, split over 2 DataLoader "
            "workers (data.workers)") in message
    # and before the first epoch, rank 0 warned that 3 shards leave one of the 2 x 2 loader readers idle
    assert ("[cid_ds] warning: 3 shards for 2 ranks x 2 loader workers = 4 readers: the readers without a shard "
            "sit idle; pack more shards (data_tools.pack --ranks 2 --workers 2) or lower data.workers") \
        in capsys.readouterr().out
