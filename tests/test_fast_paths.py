"""Every fast path gives the plain path's numbers (speed is measured by bench/fast_paths.py, not tested).

On one fixed batch through a tiny student with its distillation heads, the loss (CLIP + instance) and every
gradient of the compiled (inductor) and gradient-checkpointed ViT students, and of NHWC (channels-last)
images into a ViT and a ResNet student, match the plain path's; fused and foreach AdamW steps match the
for-loop step. Tolerances are relative, to the loss and to the model's largest gradient (a nearly cancelling
gradient, like an attention key projection's, carries the rounding of the large terms it is made of): 1e-6
for checkpointing (the same ops, recomputed), 1e-5 where other kernels sum in another order (NHWC
convolutions; inductor's fused ones). The optimizers' parameters agree within 1e-6 relative plus 1e-4 of
a step. The pre-tokenised path (token ids stored at pack time equal tokenising the caption at load time) is
tested in tests/test_pack.py. At one rank without ZeRO the engine skips DeepSpeed's all-reduce of the
gradients with themselves and trains bitwise the same weights.
"""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from open_clip.model import CLIP

from cid_ds.config import Config
from cid_ds.losses.clip import clip_loss
from cid_ds.losses.instance import instance_loss
from cid_ds.models import DistillStudent
from cid_ds.engine import build_optimizer
from tests.helpers import one_rank_env

BATCH, TEACHER_DIM = 8, 48
VIT = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
RESNET = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}  # open_clip's ModifiedResNet


def tiny_student(vision: dict = VIT) -> DistillStudent:
    torch.manual_seed(0)
    clip = CLIP(32, vision, {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1})
    return DistillStudent(clip, TEACHER_DIM)


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    teacher = torch.nn.functional.normalize(torch.randn(2, BATCH, TEACHER_DIM, generator=g), dim=-1)
    return {"image": torch.randn(BATCH, 3, 32, 32, generator=g), "t_img": teacher[0], "t_txt": teacher[1],
            "tokens": torch.randint(1, 100, (BATCH, 8), generator=g)}


def batch_loss(student: torch.nn.Module, batch: dict, memory_format=torch.preserve_format,
               outputs_in_fp32: bool = False) -> torch.Tensor:
    """CLIP + instance loss; ``outputs_in_fp32``: of the outputs in fp32, as the trainer (a bf16 student)."""
    out = student(batch["image"].to(memory_format=memory_format), batch["tokens"])
    out = {k: v.float() for k, v in out.items()} if outputs_in_fp32 else out
    return clip_loss(out["image"], out["text"], out["logit_scale"]) + instance_loss(
        out["image_in_teacher"], out["text_in_teacher"], batch["t_img"], batch["t_txt"], out["logit_scale"])


def loss_and_grads(student: torch.nn.Module, batch: dict, memory_format=torch.preserve_format
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = batch_loss(student, batch, memory_format)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"{what}: max error {error:.3g} > {tolerance:.3g}"


def check_same(fast: torch.nn.Module, rtol: float, memory_format=torch.preserve_format, vision: dict = VIT) -> None:
    batch = fixed_batch()
    loss, grads = loss_and_grads(tiny_student(vision), batch)
    fast_loss, fast_grads = loss_and_grads(fast, batch, memory_format)
    assert_close(fast_loss, loss, rtol * loss.abs().item(), "loss")
    assert fast_grads.keys() == grads.keys()
    largest = max(grad.abs().max().item() for grad in grads.values())
    for name, grad in grads.items():
        assert_close(fast_grads[name], grad, rtol * largest, f"gradient of {name}")


def test_compiled_student_gives_the_same_loss_and_gradients():
    student = tiny_student()
    student.compile()  # what the trainer's engine.compile() does (perf.compile)
    check_same(student, rtol=1e-5)


def test_gradient_checkpointed_student_gives_the_same_loss_and_gradients():
    student = tiny_student()
    student.clip.set_grad_checkpointing(True)  # perf.grad_checkpointing
    check_same(student, rtol=1e-6)


@pytest.mark.parametrize("vision", [VIT, RESNET], ids=["vit", "resnet"])
def test_channels_last_images_give_the_same_loss_and_gradients(vision):
    check_same(tiny_student(vision), rtol=1e-5, memory_format=torch.channels_last, vision=vision)  # perf.channels_last


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_fused_and_foreach_adamw_steps_equal_the_for_loop(impl):
    """Three steps on the same gradients (so the moments and bias corrections are exercised): every
    parameter ends within a few float32 ulps (1e-6 relative) plus 1e-4 of a step (lr) of the for-loop's."""
    _, grads = loss_and_grads(tiny_student(), fixed_batch())
    params = {}
    for name in ("for_loop", impl):
        cfg = Config()
        cfg.perf.adamw = name
        student = tiny_student()
        optimizer = build_optimizer(student, cfg)
        for _ in range(3):
            for param_name, p in student.named_parameters():
                p.grad = grads[param_name].clone() if param_name in grads else None
            optimizer.step()
        params[name] = {k: v.detach() for k, v in student.named_parameters()}
    assert optimizer.defaults["fused" if impl == "fused" else "foreach"]
    for name, expected in params["for_loop"].items():
        torch.testing.assert_close(params[impl][name], expected, rtol=1e-6, atol=1e-4 * cfg.optim.lr,
                                   msg=lambda m, name=name: f"{impl} AdamW, {name}: {m}")


@pytest.mark.parametrize("view", ["train", "eval"])
def test_the_loaders_batched_normalisation_equals_the_preprocess_per_image(view, monkeypatch):
    """The wds loader makes uint8 pixels per image (the training crop's box drawn from its own RNG) and
    scales + normalises the batch at once: bitwise the same tensors as the open_clip preprocess applied image
    by image to the same boxes."""
    from PIL import Image

    from cid_ds.data.preprocess import random_resized_box, split_normalize
    from cid_ds.models import create_model
    _, preprocess_train, preprocess_val, _ = create_model("demo-student")
    preprocess = preprocess_train if view == "train" else preprocess_val
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)) for i in range(6)]
    images.append(images[0].convert("L"))  # a grey image is converted to RGB first, as by the preprocess
    pixels, normalize = split_normalize(preprocess)
    assert normalize is not None
    batched = normalize(torch.stack([pixels(image, random.Random(3)) for image in images]))
    if view == "train":
        crop = preprocess.transforms[0]
        boxes = iter([random_resized_box(*image.size, crop.scale, crop.ratio, random.Random(3)) for image in images])
        monkeypatch.setattr(type(crop), "get_params", staticmethod(lambda image, scale, ratio: next(boxes)))
    assert torch.equal(batched, torch.stack([preprocess(image) for image in images]))


class TorchvisionDraws:
    """torchvision's random numbers (one-element torch tensors from torch's RNG) behind random.Random's
    interface."""

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()

    def randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, size=(1,)).item())


@pytest.mark.parametrize("size", [(56, 40), (640, 480), (300, 20), (20, 300)])
def test_the_loaders_crop_box_follows_torchvisions_rule(size):
    """Given the same random numbers, the loader's box is torchvision's RandomResizedCrop box (wide and
    tall images exercise its fallback to a centred box)."""
    import torchvision.transforms as T
    from PIL import Image

    from cid_ds.data.preprocess import random_resized_box
    image = Image.new("RGB", size)
    for seed in range(200):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert random_resized_box(*size, (0.08, 1.0), (3 / 4, 4 / 3), TorchvisionDraws()) == expected, seed


def one_rank_result(script: str, tmp_path, timeout: int = 300) -> dict:
    """``script`` run as one CPU DeepSpeed rank, given its output file and ``tmp_path``; the JSON it wrote."""
    out, env = tmp_path / "result.json", one_rank_env()
    run = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path)], env=env, cwd=env["PYTHONPATH"],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


# Two one-rank zero0.json engines (fp32 on CPU) from the same weights, one as the trainer sets it up (perf.host_light_step),
# one with DeepSpeed's stock step; three steps on one batch each.
ENGINES_WITH_AND_WITHOUT_ALLREDUCE = r"""
import json, sys, torch
from cid_ds.config import Config
from cid_ds.profiling import DispatchCount
from cid_ds.engine import build_engine, init_distributed
from tests.test_fast_paths import batch_loss, fixed_batch, tiny_student
init_distributed(dist_backend="gloo")
result = {}
for skip in (False, True):
    cfg = Config()
    cfg.deepspeed_config, cfg.data.batch_size, cfg.perf.host_light_step = "ds_configs/zero0.json", 8, skip
    student = tiny_student()
    engine, _ = build_engine(student, cfg, on_gpu=False)
    for _ in range(3):
        with DispatchCount() as count:
            engine.backward(batch_loss(engine, fixed_batch()))
            engine.step()
    result[skip] = {"ops": count.ops, "weights": {k: v.tolist() for k, v in student.state_dict().items()}}
json.dump({"skipped": result[True], "reduced": result[False]}, open(sys.argv[1], "w"))
"""


def test_one_rank_skips_the_gradient_allreduce_and_trains_the_same_weights(tmp_path):
    result = one_rank_result(ENGINES_WITH_AND_WITHOUT_ALLREDUCE, tmp_path)
    assert result["skipped"]["weights"] == result["reduced"]["weights"]  # bitwise
    assert result["skipped"]["ops"] < result["reduced"]["ops"]


# The trainer's engine on a DeepSpeed other than the one cid_ds.deepspeed_ops was written against: two steps.
ENGINE_ON_ANOTHER_DEEPSPEED = r"""
import json, sys, warnings
import cid_ds.deepspeed_ops
from cid_ds.config import Config
from cid_ds.engine import build_engine, init_distributed
from tests.test_fast_paths import batch_loss, fixed_batch, tiny_student
init_distributed(dist_backend="gloo")
cid_ds.deepspeed_ops.DEEPSPEED_VERSION = "0.0.1"
cfg = Config()
cfg.deepspeed_config, cfg.data.batch_size = "ds_configs/zero0.json", 8
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    engine, guard = build_engine(tiny_student(), cfg, on_gpu=False)
losses = []
for _ in range(2):
    loss = batch_loss(engine, fixed_batch())
    guard.backward_and_step(engine, loss)
    losses.append(loss.item())
json.dump({"warnings": [str(w.message) for w in caught], "losses": losses,
           "replaced": sorted(name for name in ("clip_fp32_gradients", "allreduce_and_copy") if name in vars(engine))},
          open(sys.argv[1], "w"))
"""


def test_on_another_deepspeed_version_the_stock_step_runs_with_a_warning(tmp_path):
    result = one_rank_result(ENGINE_ON_ANOTHER_DEEPSPEED, tmp_path)
    assert result["replaced"] == []  # DeepSpeed's own methods
    assert any("perf.host_light_step" in w and "0.0.1" in w and "stock step" in w for w in result["warnings"])
    assert all(np.isfinite(result["losses"])) and result["losses"][1] != result["losses"][0]


# Two one-rank zero2.json engines from the same weights, one with perf.cuda_graphs; three trainer steps each (the
# cluster term on, sampling classes) on one batch.
TRAINER_STEPS_WITH_AND_WITHOUT_CUDA_GRAPHS = r"""
import json, sys, numpy as np, torch
from cid_ds.config import Config
from cid_ds.engine import build_engine, init_distributed
from cid_ds.losses.cluster import ClusterDiscrimination
from cid_ds.profiling import DispatchCount
from cid_ds.run_state import Run
from cid_ds.train import train_step
from tests.test_fast_paths import BATCH, TEACHER_DIM, fixed_batch, tiny_student
init_distributed(dist_backend="gloo")
np.save(sys.argv[2] + "/centroids.npy", np.random.default_rng(0).standard_normal((64, TEACHER_DIM)).astype(np.float32))
result = {}
for graphs in (False, True):
    cfg = Config()
    cfg.deepspeed_config, cfg.data.batch_size, cfg.perf.cuda_graphs = "ds_configs/zero2.json", BATCH, graphs
    cfg.loss.instance, cfg.loss.cluster, cfg.cluster.dir, cfg.cluster.sample_rate = 1.0, 0.3, sys.argv[2], 0.25
    student = tiny_student()
    engine, guard = build_engine(student, cfg, on_gpu=False)
    term = ClusterDiscrimination(cfg.cluster, cfg.optim.lr, (0.9, 0.98), 1e-6, lambda step: 1.0, 0, engine.device)
    batch = fixed_batch() | {"cluster": torch.randint(0, 64, (BATCH,), generator=torch.Generator().manual_seed(2))}
    run, losses = Run(cfg, engine, guard, cluster_term=term), []
    for run.step in range(3):
        with DispatchCount() as count:
            step_losses = train_step(run, batch)[1]
        losses.append({k: v.item() for k, v in step_losses.items()})
    result[graphs] = {"losses": losses, "syncs": count.syncs,
                      "weights": {k: v.tolist() for k, v in student.state_dict().items()}}
json.dump({"graphs": result[True], "plain": result[False]}, open(sys.argv[1], "w"))
"""


def test_the_cuda_graphs_step_gives_the_plain_steps_losses_and_weights(tmp_path):
    """perf.cuda_graphs as the trainer sets it up: on CPU it compiles (inductor) in reduce-overhead mode; its three
    steps' every loss term within 1e-5 relative of the plain engine's, its weights within 1e-5 plus 1e-4 of a
    step (lr), and its steps wait for the device no more than the plain ones (zero times)."""
    result = one_rank_result(TRAINER_STEPS_WITH_AND_WITHOUT_CUDA_GRAPHS, tmp_path, timeout=600)
    graphs, plain = result["graphs"], result["plain"]
    assert graphs["syncs"] == plain["syncs"] == 0
    for got, expected in zip(graphs["losses"], plain["losses"]):
        assert got.keys() == expected.keys() == {"clip", "instance", "cluster"}
        for name, value in expected.items():
            assert abs(got[name] - value) <= 1e-5 * abs(value), (name, got, expected)
    lr = Config().optim.lr
    for name, expected in plain["weights"].items():
        np.testing.assert_allclose(graphs["weights"][name], expected, rtol=1e-5, atol=1e-4 * lr, err_msg=name)

