"""Zero-shot evaluation on clip_benchmark wds/ folders: what a user points it at, what comes out, what bad
layouts get. Metrics are checked against a reference computed here, image by image and text by text,
from the same real open_clip model's embeddings."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cid_ds.evaluate import evaluate, main
from cid_ds.models import create_model

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "yellow": (240, 230, 30),
           "white": (250, 250, 250), "black": (5, 5, 5)}
TEMPLATES = ["a photo of {c}.", "{c}", "a solid {c} square."]
CAPTIONS = [  # image colour, captions (several per image, as in COCO/Flickr); no two images alike
    (COLOURS["red"], ["a red square", "something red"]),
    (COLOURS["green"], ["green"]),
    (COLOURS["blue"], ["a blue picture", "blue", "the colour of the sky"]),
    (COLOURS["yellow"], ["a yellow square"]),
    (COLOURS["white"], ["white", "snow"]),
    (COLOURS["black"], ["a black square"]),
    ((160, 0, 50), ["crimson"]),
]


def image_bytes(rgb, fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def write_shards(set_dir, samples, per_shard, split="test"):
    """samples: list of {member suffix: bytes}; written as KEY.suffix into {split}/{i}.tar."""
    test_dir = os.path.join(set_dir, split)
    os.makedirs(test_dir, exist_ok=True)
    chunks = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for shard, chunk in enumerate(chunks):
        with tarfile.open(os.path.join(test_dir, f"{shard}.tar"), "w") as tar:
            for offset, sample in enumerate(chunk):
                for suffix, data in sample.items():
                    info = tarfile.TarInfo(f"s{shard:02d}{offset:04d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    with open(os.path.join(test_dir, "nshards.txt"), "w") as f:
        f.write(f"{len(chunks)}\n")


def write_text(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def classification_set(root, name="colours", classes=tuple(COLOURS), labels=None):
    """Two solid-colour images per class over 3 shards; the class index is the colour's."""
    set_dir = os.path.join(root, name)
    labels = labels if labels is not None else [i for i in range(len(classes)) for _ in range(2)]
    write_shards(set_dir, [{"jpg": image_bytes(COLOURS[classes[label % len(classes)]], "JPEG"),
                            "cls": str(label).encode()} for label in labels], per_shard=5)
    write_text(os.path.join(set_dir, "classnames.txt"), classes)
    write_text(os.path.join(set_dir, "zeroshot_classification_templates.txt"), TEMPLATES)
    return set_dir


def retrieval_set(root, name="captions"):
    set_dir = os.path.join(root, name)
    write_shards(set_dir, [{"png": image_bytes(colour, "PNG"), "txt": "\n".join(caps).encode()}
                           for colour, caps in CAPTIONS], per_shard=4)
    write_text(os.path.join(set_dir, "dataset_type.txt"), ["retrieval"])
    return set_dir


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("demo-student")
    return model, preprocess, tokenizer


def embed_one_by_one(student, images, texts):
    model, preprocess, tokenizer = student
    model.eval()
    with torch.no_grad():
        image_emb = [F.normalize(model.encode_image(preprocess(im)[None]), dim=-1)[0] for im in images]
        text_emb = [F.normalize(model.encode_text(tokenizer([t])), dim=-1)[0] for t in texts]
    return torch.stack(image_emb).numpy().astype(np.float64), torch.stack(text_emb).numpy().astype(np.float64)


def reference_classification(student, classes, labels):
    images = [Image.new("RGB", (40, 36), COLOURS[classes[label]]) for label in labels]
    texts = [t.replace("{c}", c) for c in classes for t in TEMPLATES]
    image_emb, text_emb = embed_one_by_one(student, images, texts)
    class_emb = text_emb.reshape(len(classes), len(TEMPLATES), -1).mean(axis=1)
    class_emb /= np.linalg.norm(class_emb, axis=1, keepdims=True)
    scores = image_emb @ class_emb.T
    rank = np.array([(scores[i] > scores[i, label]).sum() for i, label in enumerate(labels)])
    return (rank < 1).mean(), (rank < 5).mean()


def reference_retrieval(student):
    images = [Image.new("RGB", (40, 36), colour) for colour, _ in CAPTIONS]
    texts = [c for _, caps in CAPTIONS for c in caps]
    owner = [i for i, (_, caps) in enumerate(CAPTIONS) for _ in caps]
    image_emb, text_emb = embed_one_by_one(student, images, texts)
    scores = text_emb @ image_emb.T                                  # [texts, images]
    text_rank = np.array([(scores[t] > scores[t, owner[t]]).sum() for t in range(len(texts))])
    image_rank = np.array([min((scores[:, i] > scores[t, i]).sum() for t in range(len(texts)) if owner[t] == i)
                           for i in range(len(images))])            # best-ranked own caption
    return ({k: (image_rank < k).mean() for k in (1, 5, 10)}, {k: (text_rank < k).mean() for k in (1, 5, 10)},
            len(images), len(texts))


def test_zeroshot_classification_matches_reference(student, tmp_path):
    set_dir = classification_set(tmp_path)
    labels = [i for i in range(len(COLOURS)) for _ in range(2)]
    model, preprocess, tokenizer = student

    result = evaluate(model, preprocess, tokenizer, [set_dir], batch_size=4)

    top1, top5 = reference_classification(student, list(COLOURS), labels)
    assert result == {"colours": {"type": "zeroshot_classification", "top1": pytest.approx(top1, abs=1e-9),
                                  "top5": pytest.approx(top5, abs=1e-9), "samples": 12, "classes": 6}}


def test_a_classification_set_with_a_train_split_gets_a_linear_probe(student, tmp_path):
    set_dir = classification_set(tmp_path)
    train_labels = [i for i in range(len(COLOURS)) for _ in range(3)]
    write_shards(set_dir, [{"jpg": image_bytes(COLOURS[list(COLOURS)[label]], "JPEG"), "cls": str(label).encode()}
                           for label in train_labels], per_shard=7, split="train")
    model, preprocess, tokenizer = student

    result = evaluate(model, preprocess, tokenizer, [set_dir], batch_size=4)["colours"]
    # one solid colour per class: the frozen features of a class coincide, so a linear probe is exact
    assert result["linear_probe_top1"] == 1.0
    assert result["linear_probe_train_samples"] == 18
    assert result["linear_probe_weight_decay"] > 0


def test_fewer_than_five_classes_reports_top_c_under_its_own_name(student, tmp_path):
    classes = ("red", "green", "blue")
    labels = [0, 1, 2, 2]
    set_dir = classification_set(tmp_path, "rgb", classes, labels)
    model, preprocess, tokenizer = student

    result = evaluate(model, preprocess, tokenizer, [set_dir])["rgb"]

    top1, _ = reference_classification(student, classes, labels)
    assert result["top1"] == pytest.approx(top1, abs=1e-9)
    assert result["top3"] == 1.0 and "top5" not in result


def test_retrieval_counts_every_caption_of_an_image(student, tmp_path):
    set_dir = retrieval_set(tmp_path)
    model, preprocess, tokenizer = student

    result = evaluate(model, preprocess, tokenizer, [set_dir], batch_size=3)["captions"]

    image_to_text, text_to_image, n_images, n_texts = reference_retrieval(student)
    assert result["type"] == "retrieval"
    assert (result["images"], result["texts"]) == (n_images, n_texts) == (7, 11)
    for k in (1, 5, 10):
        assert result[f"image_to_text_R@{k}"] == pytest.approx(image_to_text[k], abs=1e-9)
        assert result[f"text_to_image_R@{k}"] == pytest.approx(text_to_image[k], abs=1e-9)
    assert result["image_to_text_R@10"] == result["text_to_image_R@10"] == 1.0  # fewer than 10 candidates


def test_results_do_not_depend_on_batch_size_or_workers(student, tmp_path):
    sets = [classification_set(tmp_path), retrieval_set(tmp_path)]
    model, preprocess, tokenizer = student

    one_batch = evaluate(model, preprocess, tokenizer, sets, batch_size=256)
    split = evaluate(model, preprocess, tokenizer, sets, batch_size=2, workers=2)

    assert split.keys() == one_batch.keys() == {"colours", "captions"}
    for name in one_batch:
        assert split[name] == pytest.approx(one_batch[name], abs=1e-6)


def test_model_mode_is_restored(student, tmp_path):
    model, preprocess, tokenizer = student
    model.train()
    evaluate(model, preprocess, tokenizer, [classification_set(tmp_path)])
    assert model.training
    model.eval()


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    sets = [classification_set(tmp_path), retrieval_set(tmp_path)]
    out = tmp_path / "results" / "eval.json"

    results = main(["--model", "demo-student", "--sets", *sets, "--out", str(out), "--batch-size", "5"])

    table = capsys.readouterr().out
    assert "colours" in table and "top5" in table and "text_to_image_R@1" in table
    written = json.loads(out.read_text())
    assert written["model"] == "demo-student"
    assert written["results"] == results
    assert sorted(os.listdir(out.parent)) == ["eval.json"]


# --- bad input: a clear error naming the file ---------------------------------------------------------

def test_folder_without_nshards_is_rejected(student, tmp_path):
    set_dir = classification_set(tmp_path)
    os.remove(os.path.join(set_dir, "test", "nshards.txt"))
    with pytest.raises(ValueError, match=r"colours/test/nshards\.txt: file missing"):
        evaluate(*student, [set_dir])


def test_shard_listed_but_missing_is_rejected(student, tmp_path):
    set_dir = classification_set(tmp_path)
    os.remove(os.path.join(set_dir, "test", "2.tar"))
    with pytest.raises(ValueError, match=r"test/2\.tar: file missing"):
        evaluate(*student, [set_dir])


@pytest.mark.parametrize("missing", ["classnames.txt", "zeroshot_classification_templates.txt"])
def test_classification_set_without_metadata_is_rejected(student, tmp_path, missing):
    set_dir = classification_set(tmp_path)
    os.remove(os.path.join(set_dir, missing))
    with pytest.raises(ValueError, match=f"colours/{missing}: file missing"):
        evaluate(*student, [set_dir])


def test_template_without_placeholder_is_rejected(student, tmp_path):
    set_dir = classification_set(tmp_path)
    write_text(os.path.join(set_dir, "zeroshot_classification_templates.txt"), ["a photo of {c}", "a photo"])
    with pytest.raises(ValueError, match=r"zeroshot_classification_templates\.txt: line 2 'a photo' has no \{c\}"):
        evaluate(*student, [set_dir])


def test_class_index_out_of_range_names_the_sample(student, tmp_path):
    set_dir = classification_set(tmp_path, "rgb", ("red", "green", "blue"), labels=[0, 1, 2, 1, 0, 3])
    with pytest.raises(ValueError, match=r"test/1\.tar: s010000\.cls: class index 3 is out of range for 3 classes"):
        evaluate(*student, [set_dir])


def test_layout_errors_come_before_any_set_is_evaluated(student, tmp_path):
    good = classification_set(tmp_path)
    bad = retrieval_set(tmp_path)
    write_text(os.path.join(bad, "dataset_type.txt"), ["multilabel"])
    with pytest.raises(ValueError, match=r"captions/dataset_type\.txt: unsupported dataset type 'multilabel'"):
        evaluate(*student, [good, bad])


def test_retrieval_sample_without_caption_is_rejected(student, tmp_path):
    set_dir = os.path.join(tmp_path, "captions")
    write_shards(set_dir, [{"jpg": image_bytes(COLOURS["red"], "JPEG"), "txt": b"a red square"},
                           {"jpg": image_bytes(COLOURS["blue"], "JPEG"), "txt": b"\n  \n"}], per_shard=2)
    write_text(os.path.join(set_dir, "dataset_type.txt"), ["retrieval"])
    with pytest.raises(ValueError, match=r"test/0\.tar: s000001\.txt: no caption"):
        evaluate(*student, [set_dir])


def test_two_sets_with_one_name_are_rejected(student, tmp_path):
    first = classification_set(tmp_path / "a")
    second = classification_set(tmp_path / "b")
    with pytest.raises(ValueError, match="several eval sets are named \\['colours'\\]"):
        evaluate(*student, [first, second])
