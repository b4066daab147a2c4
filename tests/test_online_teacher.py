"""kd.teacher: online runs the teacher on the student's own input tensor: on the eval view it gives the
embeddings the offline cache holds for the same samples."""
import json

import pytest
import torch

from cid_ds.config import expand_shards
from cid_ds.data.batch import LoaderSpec, open_side_data
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.models import create_model
from cid_ds.teacher import OnlineTeacher
from tests.helpers import make_data_and_features


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_data_and_features(str(tmp_path_factory.mktemp("online")), train_samples=96, shards=2)


def test_online_teacher_reproduces_the_cached_embeddings_of_the_same_pixels(dataset):
    student, _, preprocess_val, tokenizer = create_model("demo-student")
    teacher = OnlineTeacher("demo-teacher", None, student, random_ok=True).to(torch.device("cpu"), torch.float32)
    shards = expand_shards(dataset["shards"])
    loader = build_train_loader(LoaderSpec(shards, preprocess_val, tokenizer, batch_size=32,
                                           teacher_tokenizer=teacher.tokenizer,
                                           side=open_side_data(shards, features_dir=dataset["feats"])))
    batch = next(iter(loader))
    t_img, t_txt = teacher(batch["image"], batch["teacher_tokens"])
    # the cache stores fp16: agreement to fp16 precision
    assert torch.nn.functional.cosine_similarity(t_img, batch["t_img"]).min() > 0.999
    assert torch.nn.functional.cosine_similarity(t_txt, batch["t_txt"]).min() > 0.999
    assert teacher.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)  # open_clip's initial scale, random-init teacher


def test_online_teacher_sees_the_student_crop_at_its_own_size_and_normalisation(tmp_path):
    # a teacher trained at 48 px with its own mean/std, as a real one at 336 px beside a 224 px student
    (tmp_path / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 64, "vision_cfg": {"image_size": 48, "layers": 1, "width": 64, "patch_size": 16},
                      "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}},
        "preprocess_cfg": {"mean": [0.25, 0.25, 0.25], "std": [0.2, 0.2, 0.2]}}))
    student, _, _, _ = create_model("demo-student")  # 32 px, mean 0.5, std 0.5
    teacher = OnlineTeacher(f"local-dir:{tmp_path}", None, student, random_ok=True)
    seen = []
    teacher.model.visual.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    image = torch.zeros(2, 3, 32, 32)  # student-normalised 0 is the raw value 0.5
    t_img, t_txt = teacher(image, teacher.tokenizer(["a red circle", "a blue star"]))
    assert seen[0].shape == (2, 3, 48, 48)
    torch.testing.assert_close(seen[0], torch.full((2, 3, 48, 48), (0.5 - 0.25) / 0.2))
    assert t_img.shape == t_txt.shape == (2, 64) and not t_img.requires_grad
