"""Export: a student becomes an open_clip ``local-dir:`` folder that plain open_clip (no project code)
loads to the same embeddings, written from memory or from a real DeepSpeed checkpoint (ZeRO 0, 2, 3)."""
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cid_ds.export import export_checkpoint, export_open_clip, main, pretrained_preprocess_cfg
from cid_ds.models import create_model
from tests.helpers import REPO_ROOT, one_rank_env

STAGES = (0, 2, 3)

# Run in a fresh interpreter: open_clip only, cid_ds must stay unimported.
LOAD_WITH_PLAIN_OPEN_CLIP = r"""
import sys, torch, open_clip
from PIL import Image
folder, out = sys.argv[1], sys.argv[2]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
images = torch.stack([preprocess(Image.new("RGB", (50, 40), c)) for c in [(200, 30, 30), (10, 90, 220)]])
with torch.no_grad():
    result = {"image": model.encode_image(images), "text": model.encode_text(tokenizer(["a red square", "blue"])),
              "pixels": images, "logit_scale": model.logit_scale.detach().clone()}
assert not any(name.startswith("cid_ds") for name in sys.modules), "project code was imported"
torch.save(result, out)
"""

# A one-step training run on CPU (1 rank, gloo) per ZeRO stage, in the engine the trainer builds from the shipped
# zero<stage>.json, saved with engine.save_checkpoint.
TRAIN_AND_SAVE = r"""
import os, sys, torch, deepspeed
from cid_ds.config import Config
from cid_ds.models import DistillStudent, create_model
from cid_ds.engine import build_engine, init_distributed
out, ds_configs = sys.argv[1], sys.argv[3]
init_distributed(dist_backend="gloo")
cfg = Config()
cfg.data.batch_size, cfg.optim.lr = 2, 1e-2
for stage in [int(s) for s in sys.argv[2].split(",")]:
    torch.manual_seed(0)
    clip = create_model("demo-student")[0]
    # DeepSpeed 0.19 cannot broadcast a 0-dim parameter (view as uint8): train logit_scale as shape [1]
    clip.logit_scale = torch.nn.Parameter(clip.logit_scale.detach().reshape(1))
    cfg.deepspeed_config = os.path.join(ds_configs, f"zero{stage}.json")
    engine, guard = build_engine(DistillStudent(clip, teacher_dim=256), cfg, on_gpu=False)
    y = engine(torch.randn(2, 3, 32, 32), torch.randint(1, 49000, (2, 24)))
    loss = (y["logit_scale"] * y["image"] @ y["text"].T).logsumexp(1).sum() \
        + (y["image_in_teacher"] * y["text_in_teacher"]).sum()
    guard.backward_and_step(engine, loss)
    engine.save_checkpoint(f"{out}/stage{stage}")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO-3
        trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    torch.save(trained, f"{out}/stage{stage}.trained.pt")
"""


def load_in_fresh_open_clip(folder, tmp_path):
    out = tmp_path / "plain_open_clip.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", LOAD_WITH_PLAIN_OPEN_CLIP, str(folder), str(out)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    return torch.load(out)


def embed_in_memory(model, preprocess, tokenizer):
    model.eval()
    images = torch.stack([preprocess(Image.new("RGB", (50, 40), c)) for c in [(200, 30, 30), (10, 90, 220)]])
    with torch.no_grad():
        return {"image": model.encode_image(images), "text": model.encode_text(tokenizer(["a red square", "blue"])),
                "pixels": images}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """DeepSpeed checkpoints of one training step at ZeRO stages 0, 2, 3, and the weights they hold."""
    out = tmp_path_factory.mktemp("deepspeed")
    # the first DeepSpeed CPU run on a machine compiles its shared-memory comm op (~1 min, then cached)
    run = subprocess.run([sys.executable, "-c", TRAIN_AND_SAVE, str(out), ",".join(map(str, STAGES)),
                          os.path.join(REPO_ROOT, "ds_configs")],
                         env=one_rank_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_export_loads_in_plain_open_clip_with_the_same_embeddings(tmp_path):
    torch.manual_seed(0)
    model, _, preprocess, tokenizer = create_model("demo-student")
    with torch.no_grad():
        model.logit_scale.fill_(3.3)

    folder = export_open_clip(model, "demo-student", str(tmp_path / "export"))

    assert folder == str(tmp_path / "export")
    assert sorted(os.listdir(folder)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind
    config = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["preprocess_cfg"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                        "resize_mode": "shortest"}
    weights = load_file(os.path.join(folder, "open_clip_model.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in weights.values())

    plain = load_in_fresh_open_clip(folder, tmp_path)
    ours = embed_in_memory(model, preprocess, tokenizer)
    torch.testing.assert_close(plain["pixels"], ours["pixels"], rtol=0, atol=0)
    torch.testing.assert_close(plain["image"], ours["image"], rtol=0, atol=1e-5)
    torch.testing.assert_close(plain["text"], ours["text"], rtol=0, atol=1e-5)
    assert plain["logit_scale"].item() == pytest.approx(3.3)


def test_reexport_replaces_the_previous_export(tmp_path):
    torch.manual_seed(0)
    first = create_model("demo-student")[0]
    second = create_model("demo-student")[0]
    out = str(tmp_path / "export")
    export_open_clip(first, "demo-student", out)

    export_open_clip(second, "demo-student", out)

    weights = load_file(os.path.join(out, "open_clip_model.safetensors"))
    torch.testing.assert_close(weights["text_projection"], second.text_projection.detach(), rtol=0, atol=0)
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_a_folder_that_is_not_an_export_is_never_replaced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"run: exists and holds more than an export \(notes.txt\)"):
        export_open_clip(create_model("demo-student")[0], "demo-student", str(out))
    assert os.listdir(out) == ["notes.txt"]


def test_an_export_that_would_not_load_leaves_the_old_one_in_place(tmp_path):
    out = str(tmp_path / "export")
    export_open_clip(create_model("demo-student")[0], "demo-student", out)
    before = load_file(os.path.join(out, "open_clip_model.safetensors"))

    with pytest.raises(ValueError, match="model 'demo-teacher' does not load back in open_clip"):
        export_open_clip(create_model("demo-student")[0], "demo-teacher", out)  # wrong architecture

    after = load_file(os.path.join(out, "open_clip_model.safetensors"))
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("stage", STAGES)
def test_export_from_a_deepspeed_checkpoint_holds_the_trained_weights(checkpoints, tmp_path, stage):
    folder = export_checkpoint(str(checkpoints / f"stage{stage}"), "demo-student", str(tmp_path / "export"))

    trained = torch.load(checkpoints / f"stage{stage}.trained.pt")
    torch.manual_seed(0)  # the training run's seed: these are the weights before its one step
    initial = create_model("demo-student")[0].state_dict()
    exported = load_file(os.path.join(folder, "open_clip_model.safetensors"))
    assert exported.keys() == initial.keys()  # no proj_* heads, no "clip." prefix
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, trained["clip." + name].reshape(tensor.shape), rtol=0, atol=0)
    assert not torch.equal(exported["visual.conv1.weight"], initial["visual.conv1.weight"])  # one step was taken
    assert exported["logit_scale"].shape == ()  # trained as [1], exported in open_clip's shape

    model = open_clip.create_model(f"local-dir:{folder}")
    assert model.state_dict()["text_projection"].equal(exported["text_projection"])


def test_cli_exports_a_checkpoint(checkpoints, tmp_path, capsys):
    out = main(["--checkpoint", str(checkpoints / "stage2"), "--model", "demo-student", "--out",
                str(tmp_path / "export"), "--tag", "global_step1"])
    assert out == str(tmp_path / "export")
    assert "local-dir:" + out in capsys.readouterr().out
    open_clip.create_model_and_transforms(f"local-dir:{out}")


def test_a_pretrained_tag_contributes_its_preprocessing_but_not_its_weights():
    # a student that started from a tag was trained with the tag's mean/std: the export must keep them
    assert pretrained_preprocess_cfg("MobileCLIP-S1", "datacompdr") == {
        "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "interpolation": "bilinear", "resize_mode": "shortest"}
    assert pretrained_preprocess_cfg("ViT-B-32", "openai")["mean"] == open_clip.OPENAI_DATASET_MEAN
    assert pretrained_preprocess_cfg("demo-student", None) == {}


def test_bad_checkpoint_input_names_the_problem(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"nowhere: no such checkpoint directory"):
        export_checkpoint(str(tmp_path / "nowhere"), "demo-student", str(tmp_path / "export"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty/latest: file missing"):
        export_checkpoint(str(tmp_path / "empty"), "demo-student", str(tmp_path / "export"))
    with pytest.raises(ValueError, match=r"stage2/global_step9: no such checkpoint \(tag 'global_step9'"):
        export_checkpoint(str(checkpoints / "stage2"), "demo-student", str(tmp_path / "export"), tag="global_step9")
    with pytest.raises(ValueError, match=r"stage2: the student weights do not fit model 'demo-teacher'"):
        export_checkpoint(str(checkpoints / "stage2"), "demo-teacher", str(tmp_path / "export"))
    with pytest.raises(ValueError, match=r"'laion2b' is not a pretrained tag of model 'demo-student'"):
        export_checkpoint(str(checkpoints / "stage2"), "demo-student", str(tmp_path / "export"), pretrained="laion2b")
    assert not (tmp_path / "export").exists()
