"""The demo data generator: img2dataset-style training shards and clip_benchmark ``wds/`` evaluation
sets of coloured shapes, deterministic from the seed, resumable, and with shapes a model can see."""
from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cid_ds.io import read_json
from data_tools import make_demo_data as demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(train_samples=120, shards=3, eval_scale=0.05)  # eval: 36 / 36 / 25 images


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """{key: {extension: payload}}, in file order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def all_files(root: str) -> dict[str, bytes]:
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def foreground(pixels: np.ndarray) -> np.ndarray:
    """The object's pixels: the background is nearly grey, every object colour is saturated."""
    pixels = pixels.astype(int)
    return pixels.max(-1) - pixels.min(-1) > 60


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    # eval_scale 0.5: shapes and colored_shapes span two tars each
    manifest = demo.generate(out, train_samples=300, shards=4, seed=0, eval_scale=0.5, progress=False)
    return out, manifest


def test_layout_is_img2dataset_train_and_clip_benchmark_eval(data):
    out, manifest = data
    expected = {"manifest.json"} | {f"train/{i:05d}.tar" for i in range(4)}
    for name, shards in (("shapes", 2), ("colored_shapes", 2)):
        expected |= {f"eval/{name}/{split}/{i}.tar" for i in range(shards) for split in ("test", "train")}
        expected |= {f"eval/{name}/train/nshards.txt"}
        expected |= {f"eval/{name}/test/nshards.txt", f"eval/{name}/classnames.txt",
                     f"eval/{name}/zeroshot_classification_templates.txt"}
    expected |= {"eval/retrieval/test/0.tar", "eval/retrieval/test/nshards.txt", "eval/retrieval/dataset_type.txt"}
    assert set(all_files(out)) == expected

    def text(rel):
        with open(os.path.join(out, rel)) as f:
            return f.read()

    assert text("eval/shapes/test/nshards.txt").strip() == "2"
    assert text("eval/retrieval/test/nshards.txt").strip() == "1"
    assert text("eval/retrieval/dataset_type.txt").strip() == "retrieval"
    # classification sets carry a train split of their own for the linear probe; retrieval sets do not
    assert text("eval/shapes/train/nshards.txt").strip() == "2"
    assert not os.path.exists(os.path.join(out, "eval", "retrieval", "train"))
    assert text("eval/shapes/classnames.txt").splitlines() == ["circle", "square", "triangle", "cross", "star", "ring"]
    colored = text("eval/colored_shapes/classnames.txt").splitlines()
    assert len(colored) == 36 and colored[:2] == ["red circle", "red square"] and colored[-1] == "orange ring"
    for name in ("shapes", "colored_shapes"):
        templates = text(f"eval/{name}/zeroshot_classification_templates.txt").splitlines()
        assert 4 <= len(templates) <= 6 and all("{c}" in t for t in templates)

    assert manifest["complete"] and manifest["seed"] == 0 and manifest["code_version"]
    assert manifest["train"]["samples_per_shard"] == [75, 75, 75, 75]
    assert {k: v["samples"] for k, v in manifest["eval"].items()} == {"shapes": 300, "colored_shapes": 360,
                                                                      "retrieval": 250}
    assert manifest["attributes"]["shapes"] == list(demo.SHAPES)
    assert read_json(os.path.join(out, "manifest.json")) == manifest


def test_training_samples_match_their_metadata(data):
    out, _ = data
    keys = []
    for path in sorted(glob.glob(os.path.join(out, "train", "*.tar"))):
        for key, fields in read_tar(path).items():
            keys.append(key)
            assert sorted(fields) == ["jpg", "json", "txt"]
            meta = json.loads(fields["json"])
            caption = fields["txt"].decode()
            assert meta["key"] == key and meta["caption"] == caption
            assert meta["shape"] in caption and meta["colour"] in caption, caption

            image = Image.open(io.BytesIO(fields["jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
            ys, xs = np.nonzero(foreground(np.asarray(image)))
            side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            # small: 35-45 % of 64 px, large: 60-75 %, +-1 px of anti-aliasing and JPEG
            assert side <= 32 if meta["size"] == "small" else side >= 32, (key, meta, side)
            x, y = (xs.max() + xs.min() + 1) / 2, (ys.max() + ys.min() + 1) / 2
            where = {"left": x < 24 and abs(y - 32) < 8, "right": x > 40 and abs(y - 32) < 8,
                     "top": y < 24 and abs(x - 32) < 8, "bottom": y > 40 and abs(x - 32) < 8,
                     "center": abs(x - 32) < 6 and abs(y - 32) < 6}
            assert where[meta["position"]], (key, meta, x, y)
    assert len(keys) == len(set(keys)) == 300
    assert keys[0] == "000000_00000000"


def test_every_caption_names_shape_and_colour_size_and_position_sometimes():
    assert len(demo.CAPTION_TEMPLATES) >= 5
    with_size, with_position = set(), set()
    for template_id in range(len(demo.CAPTION_TEMPLATES)):
        for shape in demo.SHAPES:
            for colour in demo.COLOURS:
                for position in demo.POSITIONS:
                    spec = demo.ObjectSpec(shape, colour, "small", position)
                    text = demo.caption(spec, template_id)
                    assert shape in text and colour in text, text
                    assert " a orange" not in f" {text}"
                    if "small" in text:
                        with_size.add(template_id)
                    if position in text:
                        with_position.add(template_id)
    assert 0 < len(with_size) < len(demo.CAPTION_TEMPLATES)
    assert 0 < len(with_position) < len(demo.CAPTION_TEMPLATES)


def test_eval_sets_read_as_clip_benchmark_reads_them(data):
    out, _ = data

    def load(name):
        # clip_benchmark 1.6.2 build_wds_dataset: "{0..N-1}.tar", image + "cls" (int) or "txt" (splitlines)
        with open(os.path.join(out, "eval", name, "test", "nshards.txt")) as f:
            n = int(f.read())
        urls = os.path.join(out, "eval", name, "test", "{0..%d}.tar" % (n - 1))
        label = "txt" if name == "retrieval" else "cls"
        return list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", label))

    shapes = load("shapes")
    assert len(shapes) == 300
    assert np.bincount([label for _, label in shapes]).tolist() == [50] * 6

    colored = load("colored_shapes")
    assert np.bincount([label for _, label in colored]).tolist() == [10] * 36
    palette = np.array(list(demo.COLOURS.values()))
    for image, label in colored:
        pixels = np.asarray(image)
        mean = pixels[foreground(pixels)].mean(0)
        assert np.argmin(((palette - mean) ** 2).sum(1)) == label // 6, (label, mean)

    retrieval = load("retrieval")
    assert len(retrieval) == 250
    for image, text in retrieval:
        captions = text.splitlines()
        assert len(captions) == 1
        assert any(s in captions[0] for s in demo.SHAPES) and any(c in captions[0] for c in demo.COLOURS)


def test_eval_images_never_repeat_training_images(data):
    out, _ = data
    train = {f["jpg"] for p in glob.glob(os.path.join(out, "train", "*.tar")) for f in read_tar(p).values()}
    evaluation = [f["jpg"] for p in glob.glob(os.path.join(out, "eval", "*", "test", "*.tar"))
                  for f in read_tar(p).values()]
    probe_train = [f["jpg"] for p in glob.glob(os.path.join(out, "eval", "*", "train", "*.tar"))
                   for f in read_tar(p).values()]
    assert len(evaluation) == 910 and not train.intersection(evaluation)
    assert len(probe_train) == 660 and not train.intersection(probe_train)
    assert len(set(evaluation + probe_train)) == len(evaluation) + len(probe_train)


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    demo.generate(a, seed=7, progress=False, **SMALL)
    demo.generate(b, seed=7, progress=False, **SMALL)
    demo.generate(c, seed=8, progress=False, **SMALL)
    files_a, files_b, files_c = all_files(a), all_files(b), all_files(c)
    assert files_a == files_b
    assert set(files_a) == set(files_c)
    tars = [name for name in files_a if name.endswith(".tar")]
    assert all(files_a[name] != files_c[name] for name in tars)


def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    out = str(tmp_path / "out")
    demo.generate(out, seed=3, progress=False, **SMALL)
    finished = all_files(out)
    kept = os.path.join(out, "train", "00000.tar")
    kept_mtime = os.stat(kept).st_mtime_ns

    # A run killed while writing shard 1: that tar is missing, its temp file half written.
    os.remove(os.path.join(out, "train", "00001.tar"))
    os.remove(os.path.join(out, "eval", "retrieval", "test", "0.tar"))
    with open(os.path.join(out, "train", "00001.tar.tmp4242"), "wb") as f:
        f.write(b"half a tar")

    manifest = demo.generate(out, seed=3, progress=False, **SMALL)
    assert manifest["complete"]
    assert all_files(out) == finished  # also: no *.tmp* file left behind
    assert os.stat(kept).st_mtime_ns == kept_mtime  # finished tars are not rewritten


def test_web_captions_keep_the_images_and_eval_labels_and_add_the_stated_noise(data, tmp_path):
    clean_dir, clean_manifest = data
    web_dir = str(tmp_path / "web")
    manifest = demo.generate(web_dir, train_samples=300, shards=4, seed=0, eval_scale=0.5, progress=False,
                             captions="web")
    assert manifest["captions"] == "web" and manifest["web_caption_mix"] == demo.WEB_CAPTION_MIX
    clean, web = all_files(clean_dir), all_files(web_dir)
    assert {n: b for n, b in web.items() if n.startswith("eval")} == {n: b for n, b in clean.items() if n.startswith("eval")}
    kinds = []
    for shard in sorted(glob.glob(os.path.join(web_dir, "train", "*.tar"))):
        clean_samples = read_tar(os.path.join(clean_dir, "train", os.path.basename(shard)))
        for key, sample in read_tar(shard).items():
            assert sample["jpg"] == clean_samples[key]["jpg"]  # the same image
            meta, text = json.loads(sample["json"]), sample["txt"].decode()
            kinds.append(meta["caption_kind"])
            if meta["caption_kind"] == "clean":
                assert text == clean_samples[key]["txt"].decode()
            if meta["caption_kind"] == "vague":
                assert meta["shape"] not in text and meta["colour"] in text
    share = {kind: kinds.count(kind) / len(kinds) for kind in demo.WEB_CAPTION_MIX}
    assert all(abs(share[kind] - p) < 0.08 for kind, p in demo.WEB_CAPTION_MIX.items()), share
    with pytest.raises(ValueError, match="captions"):  # a folder of clean captions is not made web in place
        demo.generate(clean_dir, train_samples=300, shards=4, seed=0, eval_scale=0.5, progress=False, captions="web")


def test_other_parameters_into_the_same_folder_are_refused(tmp_path):
    out = str(tmp_path / "out")
    demo.generate(out, seed=0, progress=False, **SMALL)
    with pytest.raises(ValueError, match="seed"):
        demo.generate(out, seed=1, progress=False, **SMALL)
    with pytest.raises(ValueError, match="train_samples"):
        demo.generate(out, seed=0, progress=False, **{**SMALL, "train_samples": 99})

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="no manifest.json"):
        demo.generate(str(foreign), seed=0, progress=False, **SMALL)


def test_cli_writes_data_and_names_the_differing_field(tmp_path):
    out = str(tmp_path / "out")
    args = [sys.executable, "-m", "data_tools.make_demo_data", "--out", out, "--train-samples", "40",
            "--shards", "2", "--eval-samples-scale", "0.05"]
    done = subprocess.run(args + ["--seed", "0"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "samples/s" in done.stdout
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["00000.tar", "00001.tar"]

    refused = subprocess.run(args + ["--seed", "1"], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2
    assert "seed=0" in refused.stderr and "seed=1" in refused.stderr and "manifest.json" in refused.stderr


def test_shape_is_visible_at_32px():
    """Nearest-centroid over object silhouettes (cropped from the 32 px image by pixel colour, no
    metadata) tells the six shapes apart: shape is learnable, not only colour."""
    rng = np.random.default_rng(0)
    backgrounds = demo.make_backgrounds(rng)

    def silhouettes(per_shape):
        features, labels = [], []
        for i in range(per_shape * len(demo.SHAPES)):
            label = i % len(demo.SHAPES)
            spec = demo.random_spec(rng, shape=demo.SHAPES[label], colour="purple")
            jpeg = demo.encode_jpeg(demo.draw_object(spec, rng, backgrounds))
            image = Image.open(io.BytesIO(jpeg)).resize((32, 32), Image.BICUBIC)
            ys, xs = np.nonzero(foreground(np.asarray(image)))
            crop = image.convert("L").crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
            f = np.asarray(crop.resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel()
            features.append((f - f.mean()) / (f.std() + 1e-6))
            labels.append(label)
        return np.array(features), np.array(labels)

    train_x, train_y = silhouettes(30)
    test_x, test_y = silhouettes(30)
    centroids = np.stack([train_x[train_y == k].mean(0) for k in range(len(demo.SHAPES))])
    predicted = ((test_x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test_y).mean() > 0.8
