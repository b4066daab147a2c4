"""One CPU rank (the test sets RANK etc.): for each DeepSpeed JSON given, a student trained three steps through
the engine the trainer builds on a GPU (``build_engine(..., on_gpu=True)``: the JSON's bf16 or autocast, which
DeepSpeed also runs on CPU), and its checkpoint exported.

    python tests/dist_scripts/shipped_json_step.py OUT ds_configs/zero0.json [...]   -> OUT/<json name without .json>.json
"""
import os
import sys

import deepspeed
import torch

from cid_ds.config import Config
from cid_ds.export import export_checkpoint
from cid_ds.io import write_json
from cid_ds.losses.clip import clip_loss
from cid_ds.losses.instance import instance_loss
from cid_ds.models import DistillStudent, create_model
from cid_ds.engine import build_engine, compute_dtype, init_distributed

BATCH, TEACHER_DIM = 4, 256
out_dir, json_paths = sys.argv[1], sys.argv[2:]
init_distributed(dist_backend="gloo")
g = torch.Generator().manual_seed(1)
image, tokens = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(1, 49000, (BATCH, 24), generator=g)
teacher = torch.nn.functional.normalize(torch.randn(2, BATCH, TEACHER_DIM, generator=g), dim=-1)


def student() -> DistillStudent:
    torch.manual_seed(0)
    return DistillStudent(create_model("demo-student")[0], TEACHER_DIM)


def loss(out: dict) -> torch.Tensor:
    f = {k: v.float() for k, v in out.items()}
    return clip_loss(f["image"], f["text"], f["logit_scale"]) + instance_loss(
        f["image_in_teacher"], f["text_in_teacher"], teacher[0], teacher[1], f["logit_scale"])


cfg = Config()
cfg.data.batch_size = BATCH
for path in json_paths:
    cfg.deepspeed_config = path
    engine, guard = build_engine(student(), cfg, on_gpu=True)
    for _ in range(3):
        guard.backward_and_step(engine, loss(engine(image.to(compute_dtype(engine)), tokens)))
    name = os.path.splitext(os.path.basename(path))[0]
    checkpoint = os.path.join(out_dir, name, "checkpoints")
    engine.save_checkpoint(checkpoint)
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO-3
        trained = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    exported = create_model(f"local-dir:{export_checkpoint(checkpoint, 'demo-student', os.path.join(out_dir, name, 'export'))}")[0]
    write_json(os.path.join(out_dir, f"{name}.json"), {
        "compute_dtype": str(compute_dtype(engine)),
        "weights_dtype": str(next(engine.module.parameters()).dtype),
        "export_max_abs_diff": max((t.float() - trained["clip." + k].reshape(t.shape)).abs().max().item()
                                   for k, t in exported.state_dict().items()),
        "largest_weight": max(t.abs().max().item() for t in trained.values())})
