"""Richer offline teacher targets: stored augmented views replayed by the loader, and teacher ensembles.

A user extracts with ``--views K`` (and ``--teacher`` repeated), packs, and trains with ``data.views:
replay`` / ``kd.ensemble``; the student must then see exactly the pixels each stored embedding describes,
and an ensemble must reduce to its teacher when that teacher is its only member.
(The DALI loader's replay is tested in test_dali_loader.py.)"""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from cid_ds.config import ConfigError, expand_shards, load_config
from cid_ds.data.errors import DataError
from cid_ds.data.features import FeatureCache
from cid_ds.data.preprocess import draw_views
from cid_ds.data.batch import LoaderSpec, open_side_data
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.io import read_json
from cid_ds.losses.ensemble import TeacherTargets, teacher_targets
from cid_ds.models import DistillStudent, create_model
from cid_ds.objective import compute_losses
from cid_ds.sources import resolve_replay_views
from cid_ds.teacher import load_teacher
from data_tools.cluster import ClusterOptions, cluster
from data_tools.extract import ExtractOptions, extract
from data_tools.make_demo_data import generate
from data_tools.pack import PackOptions, pack
from tests.helpers import run

VIEWS = dict(views=2, view_scale=(0.3, 1.0))  # wide crops, so a replayed view is far from the eval view
BATCH = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    generate(str(root / "data"), train_samples=128, shards=2, seed=0, eval_scale=0.1)
    shards = expand_shards(str(root / "data" / "train" / "*.tar"))
    single, pair = str(root / "feats"), str(root / "feats_pair")
    extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=single, batch_size=64, workers=1, **VIEWS,
                           random_teacher_ok=True, device="cpu"))
    extract(ExtractOptions(shards=shards, teacher=["demo-teacher", "demo-teacher"], out=pair, batch_size=64,
                           workers=1, **VIEWS, random_teacher_ok=True, device="cpu"))
    packed = str(root / "packed")
    pack(PackOptions(shards=shards, features=single, tokenizer="demo-teacher", out=packed, samples_per_shard=64),
                     progress=False)
    return {"root": root, "shards": shards, "single": single, "pair": pair,
            "packed": expand_shards(os.path.join(packed, "*.tar"))}


@pytest.fixture(scope="module")
def teacher():
    model, preprocess_val, tokenizer, _ = load_teacher("demo-teacher", None, random_ok=True)
    return model, preprocess_val, tokenizer


def test_extract_stores_each_views_box_flip_and_embedding_and_records_the_cost(data):
    cache = FeatureCache(data["single"])
    features = cache.lookup("00000")
    n, dim = len(features.row), cache.embed_dim
    assert cache.views == 2
    assert features.view_image.shape == (n, 2, dim) and features.view_box.shape == (n, 2, 5)
    top, left, height, width, flip = features.view_box.reshape(-1, 5).T
    assert (top >= 0).all() and (left >= 0).all() and (height > 0).all() and (width > 0).all()
    assert set(flip.tolist()) == {0, 1}
    norms = np.linalg.norm(features.view_image.astype(np.float32), axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    views = read_json(cache.manifest_path)["views"]
    assert views["count"] == 2 and views["scale"] == [0.3, 1.0] and views["flip"] is True
    assert views["bytes_per_sample"] == 2 * 2 * dim + 2 * (2 * dim + 4 * 5)


def test_views_depend_only_on_seed_and_key_not_on_batching(data, tmp_path):
    again = str(tmp_path / "feats")
    extract(ExtractOptions(shards=data["shards"][:1], teacher="demo-teacher", out=again, batch_size=7, workers=1,
                           **VIEWS, random_teacher_ok=True, device="cpu"))
    first, second = FeatureCache(data["single"]).lookup("00000"), FeatureCache(again).lookup("00000")
    np.testing.assert_array_equal(first.view_box, second.view_box)
    np.testing.assert_allclose(first.view_image.astype(np.float32), second.view_image.astype(np.float32), atol=2e-3)
    assert (draw_views(64, 48, 3, "k", 0, (0.3, 1), (0.75, 4 / 3), True)
            == draw_views(64, 48, 3, "k", 0, (0.3, 1), (0.75, 4 / 3), True)).all()
    assert (draw_views(64, 48, 3, "k", 0, (0.3, 1), (0.75, 4 / 3), True)
            != draw_views(64, 48, 3, "k", 1, (0.3, 1), (0.75, 4 / 3), True)).any()


def embed(model, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_image(images), dim=-1)


@pytest.mark.parametrize("source", ["feature cache", "packed shards"])
def test_the_replayed_crop_reproduces_the_stored_view(data, teacher, source):
    model, preprocess_val, tokenizer = teacher
    shards, features = (data["shards"], data["single"]) if source == "feature cache" else (data["packed"], None)
    side = open_side_data(shards, features_dir=features)
    centre = next(iter(build_train_loader(LoaderSpec(shards, preprocess_val, tokenizer, BATCH, workers=1, shuffle_buffer=1,
                                                     side=side))))
    for epoch in (0, 1):
        batch = next(iter(build_train_loader(LoaderSpec(shards, preprocess_val, tokenizer, BATCH, workers=1, epoch=epoch,
                                                        shuffle_buffer=1, replay_views=2, side=side))))
        cosine = (embed(model, batch["image"]) * F.normalize(batch["t_img"], dim=-1)).sum(-1)
        assert cosine.min() > 0.999, (epoch, cosine.min())
        if epoch == 0:
            assert batch["key"] == centre["key"]
            # a stored view is not the eval view: the embeddings differ, so replay is not a no-op
            assert (F.normalize(batch["t_img"], dim=-1) * F.normalize(centre["t_img"], dim=-1)).sum(-1).min() < 0.99
            epoch0 = batch
    assert not torch.equal(batch["t_img"], epoch0["t_img"])  # epoch 1 replays the other stored view


def test_a_view_index_beyond_what_was_stored_is_refused(data, teacher, tmp_path):
    _, preprocess_val, tokenizer = teacher
    with pytest.raises(DataError, match=r"data.replay_views is 3 but .*feats/manifest.json stores 2 views"):
        build_train_loader(LoaderSpec(data["shards"], preprocess_val, tokenizer, BATCH, workers=1, replay_views=3,
                                      side=open_side_data(data["shards"], features_dir=data["single"])))
    with pytest.raises(DataError, match=r"data.replay_views is 3 but .*packed/manifest.json stores 2 views"):
        build_train_loader(LoaderSpec(data["packed"], preprocess_val, tokenizer, BATCH, workers=1, replay_views=3))
    cfg = load_config(*write_yaml(tmp_path, data, ["data.views=replay", "data.replay_views=3"]))
    with pytest.raises(ConfigError, match="data.replay_views is 3 but feats stores 2 views per sample"):
        resolve_replay_views(cfg, 2, "feats")
    with pytest.raises(ConfigError, match="stores no views: extract with data_tools.extract --views K"):
        resolve_replay_views(cfg, 0, "old_feats")
    with pytest.raises(ConfigError, match="'data.replay_views' is set but data.views is random"):
        load_config(*write_yaml(tmp_path, data, ["data.replay_views=1"]))


def write_yaml(tmp_path, data, overrides: list[str]) -> tuple[str, list[str]]:
    """An experiment YAML on the test's cache; ``overrides`` checked by load_config as a user's would be."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"student": "demo-student"},
                                    "data": {"train_shards": data["shards"][0], "features": data["single"]}}))
    return str(path), overrides


def test_an_ensemble_of_a_teacher_with_itself_holds_that_teacher_twice(data):
    single, pair = FeatureCache(data["single"]).lookup("00001"), FeatureCache(data["pair"]).lookup("00001")
    dim = single.image.shape[1]
    for name in ("image", "text", "view_image"):
        np.testing.assert_array_equal(getattr(pair, name)[..., :dim], getattr(single, name))
        np.testing.assert_array_equal(getattr(pair, name)[..., dim:], getattr(single, name))
    np.testing.assert_array_equal(pair.view_box, single.view_box)  # views are shared by every teacher
    manifest = FeatureCache(data["pair"]).teacher
    assert [m["spec"] for m in manifest["members"]] == ["demo-teacher"] * 2 and manifest["embed_dim"] == 2 * dim


@pytest.mark.parametrize("mode", ["mean", "per_teacher"])
def test_an_ensemble_of_a_teacher_with_itself_gives_that_teachers_losses(data, mode):
    cfg = load_config("ds_configs/experiments/demo_clipkd.yaml", check_paths=False)
    cfg.loss.gd, cfg.loss.mfd = 1.0, 100.0
    single_cache, pair_cache = FeatureCache(data["single"]), FeatureCache(data["pair"])
    dim = single_cache.embed_dim
    one = teacher_targets([single_cache.teacher], mode, [], None, "single")
    two = teacher_targets(pair_cache.teacher["members"], mode, [], None, "pair")
    rows = {name: torch.from_numpy(getattr(pair_cache.lookup("00000"), name)[:BATCH].astype(np.float32))
            for name in ("image", "text")}
    torch.manual_seed(0)
    clip, *_ = create_model("demo-student")
    student = DistillStudent(clip, dim, cross_scale=True, mask_ratio=0.5).eval()
    images, tokens = torch.randn(BATCH, 3, 32, 32), torch.randint(1, 400, (BATCH, clip.context_length))
    with torch.no_grad():
        out = student(images, tokens)
        if mode == "per_teacher":  # the same head twice: one per (identical) teacher
            paired = DistillStudent(clip, 2 * dim, cross_scale=True, mask_ratio=0.5, teacher_blocks=(dim, dim)).eval()
            for name in ("proj_image", "proj_text"):
                getattr(paired, name).weight.copy_(torch.cat([getattr(student, name).weight] * 2))
            paired.cross_logit_scale.copy_(student.cross_logit_scale)
            torch.manual_seed(1)
            out_two = paired(images, tokens)
            torch.manual_seed(1)
            out = student(images, tokens)
        else:
            out_two = out
        alone, _ = compute_losses(cfg, out, {"t_img": rows["image"][:, :dim], "t_txt": rows["text"][:, :dim]},
                                  None, 0, one)
        both, _ = compute_losses(cfg, out_two, {"t_img": rows["image"], "t_txt": rows["text"]}, None, 0, two)
    assert sorted(both) == sorted(alone) == ["clip", "crd", "fd", "gd", "icl", "mfd"]
    for name in alone:
        torch.testing.assert_close(both[name], alone[name], rtol=1e-5, atol=1e-6)


def test_clustering_one_teacher_of_an_ensemble_equals_clustering_it_alone(data, tmp_path):
    alone = cluster(ClusterOptions(features=data["single"], k=4, out=str(tmp_path / "alone"), seed=0, gpu="off"))
    first = cluster(ClusterOptions(features=data["pair"], k=4, out=str(tmp_path / "first"), seed=0, gpu="off",
                                   teacher_index=0))
    both = cluster(ClusterOptions(features=data["pair"], k=4, out=str(tmp_path / "both"), seed=0, gpu="off"))
    assert first["dim"] == alone["dim"] and both["dim"] == 2 * alone["dim"] and first["teacher_index"] == 0
    ids = {name: np.load(tmp_path / name / "00000.npz")["ids"] for name in ("alone", "first", "both")}
    np.testing.assert_array_equal(ids["first"], ids["alone"])
    np.testing.assert_array_equal(ids["both"], ids["alone"])  # [x, x] renormalised has x's cosines
    with pytest.raises(ValueError, match=r"teacher_index 2: feature cache .* holds 2 teacher\(s\), indices 0..1"):
        cluster(ClusterOptions(features=data["pair"], k=4, out=str(tmp_path / "bad"), seed=0, gpu="off",
                               teacher_index=2))


def test_a_cache_from_another_teacher_set_or_view_setting_is_refused(data):
    with pytest.raises(ValueError, match=r"(?s)teacher.weights_sha256 is .*refusing to mix two teacher sets"):
        extract(ExtractOptions(shards=data["shards"], teacher=["demo-teacher", "demo-student"], out=data["pair"],
                               **VIEWS, random_teacher_ok=True, device="cpu"))
    with pytest.raises(ValueError, match=r"views.count is 2 but this run asks for 3"):
        extract(ExtractOptions(shards=data["shards"], teacher="demo-teacher", out=data["single"], views=3,
                               view_scale=(0.3, 1.0), random_teacher_ok=True, device="cpu"))


def test_ensemble_weights_and_widths_are_checked_against_the_cache(data):
    members = FeatureCache(data["pair"]).teacher["members"]
    with pytest.raises(ValueError, match=r"kd.teacher_weights has 3 weights but pair holds 2 teacher\(s\)"):
        teacher_targets(members, "mean", [1, 1, 1], None, "pair")
    narrow = dict(members[1], spec="narrow", embed_dim=128)
    with pytest.raises(ValueError, match=r"different widths \(demo-teacher: 256, narrow: 128\): use kd.ensemble "
                                         r"per_teacher"):
        teacher_targets([members[0], narrow], "mean", [], None, "mixed")
    targets = teacher_targets([members[0], narrow], "per_teacher", [3, 1], None, "mixed")
    assert targets.head_dims == (256, 128) and targets.weights == (0.75, 0.25)
    assert TeacherTargets.single(8).combine(torch.ones(2, 8)).equal(torch.ones(2, 8))


def test_training_replays_views_against_one_head_per_teacher(data, tmp_path):
    """What a user runs: the trainer on an ensemble cache (teacher widths 256 + 128) with replayed views."""
    mixed = str(tmp_path / "feats_mixed")
    extract(ExtractOptions(shards=data["shards"], teacher=["demo-teacher", "demo-student"], out=mixed, batch_size=64,
                           workers=1, **VIEWS, random_teacher_ok=True, device="cpu"))
    out = str(tmp_path / "run")
    run([sys.executable, "-m", "cid_ds.train", "--config", "ds_configs/experiments/demo_clipkd.yaml",
         f"output_dir={out}", f"data.train_shards={data['root']}/data/train/*.tar", f"data.features={mixed}",
         "data.views=replay", "kd.ensemble=per_teacher", "kd.teacher_weights=[3, 1]", "data.batch_size=32",
         "data.shuffle_buffer=20", "optim.steps=3", "optim.warmup_steps=1", "checkpoint.every=3",
         "logging.every=1", "eval.sets=[]"])
    results = read_json(os.path.join(out, "results.json"))
    assert results["step"] == 3 and set(results["losses"]) == {"clip", "crd", "fd", "icl", "total"}
    assert all(np.isfinite(v) for v in results["losses"].values())
    with pytest.raises(AssertionError, match="kd.ensemble mean averages the teachers' embeddings"):
        run([sys.executable, "-m", "cid_ds.train", "--config", "ds_configs/experiments/demo_clipkd.yaml",
             f"output_dir={out}_mean", f"data.train_shards={data['root']}/data/train/*.tar",
             f"data.features={mixed}", "optim.steps=1", "eval.sets=[]"])
