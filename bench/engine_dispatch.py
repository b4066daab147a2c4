"""What a training step asks of the host under each shipped DeepSpeed JSON's GPU precision: DeepSpeed's stock
engine, and the engine as the trainer runs it (``cid_ds.engine.build_engine``: ``make_step_host_light`` with the
non-finite verdict on the device, ``cid_ds.step_guard``), against a plain torch autocast step with gradient clipping
(open_clip's ``--precision amp_bf16 --grad-clip-norm 1``).

    python bench/engine_dispatch.py [--student ViT-B-32] [--width 64] [--batch 4] [--reps 10]

On a GPU a small student's step can be bound by the host: every op is a kernel launch from Python, and every
sync (a value read back, ``bool(t)``, ``nonzero``) stops the host running ahead of the device. Per configuration
this prints the ops (views not counted) and syncs of one step, counted with ``cid_ds.profiling.DispatchCount``
(the same on CPU and GPU), the ratio to the plain step, and the median step time.

Without CUDA the student is ``--student``'s open_clip architecture at ``--width`` (default 64: every layer and
parameter tensor of ViT-B/32 with little arithmetic) and DeepSpeed runs bf16 autocast on the CPU. The CPU times
do not show the host-bound case: the CPU runs each op to completion before the next, and these small ones cost
it about 3 us each. With CUDA: the full-width student at ``--batch`` 256, and its times are the ones that matter.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.* from a script

from bench.timing import clocked, interleaved  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from cid_ds.config import Config  # noqa: E402
from cid_ds.losses.clip import clip_loss  # noqa: E402
from cid_ds.losses.instance import instance_loss  # noqa: E402
from cid_ds.models import DistillStudent, model_config  # noqa: E402
from cid_ds.profiling import DispatchCount  # noqa: E402
from cid_ds.engine import build_engine, build_optimizer, compute_dtype, init_distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("zero0", "zero1", "zero2", "zero3")
TEACHER_DIM = 768  # ViT-L/14's


def student_factory(name: str, width: int | None) -> Callable[[], DistillStudent]:
    """``name``'s architecture, random weights (seed 0); ``width`` replaces both towers' widths."""
    from open_clip.model import CLIP
    cfg = copy.deepcopy(model_config(name))
    if width:
        cfg["vision_cfg"]["width"] = cfg["text_cfg"]["width"] = width
        cfg["vision_cfg"]["head_width"] = width // 2
        cfg["text_cfg"]["heads"] = 2

    def make() -> DistillStudent:
        torch.manual_seed(0)
        return DistillStudent(CLIP(**cfg), TEACHER_DIM)
    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--student", default="ViT-B-32")
    parser.add_argument("--width", type=int, default=None if gpu else 64)
    parser.add_argument("--batch", type=int, default=256 if gpu else 4)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    init_distributed()
    device = torch.device("cuda" if gpu else "cpu")
    make_student = student_factory(args.student, args.width)
    size = model_config(args.student)["vision_cfg"]["image_size"]
    context = model_config(args.student)["text_cfg"].get("context_length", 77)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    tokens = torch.randint(1, 49000, (args.batch, context), generator=g).to(device)
    teacher = torch.nn.functional.normalize(torch.randn(2, args.batch, TEACHER_DIM, generator=g), dim=-1).to(device)

    def loss(out: dict) -> torch.Tensor:
        f = {k: v.float() for k, v in out.items()}
        return clip_loss(f["image"], f["text"], f["logit_scale"]) + instance_loss(
            f["image_in_teacher"], f["text_in_teacher"], teacher[0], teacher[1], f["logit_scale"])

    cfg = Config()
    cfg.data.batch_size = args.batch
    plain_model = make_student().to(device)
    plain_optimizer = build_optimizer(plain_model, cfg)

    def plain_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = plain_model(image, tokens)
        loss(out).backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), cfg.optim.grad_clip, foreach=True)
        plain_optimizer.step()
        plain_optimizer.zero_grad(set_to_none=True)

    plain = "plain torch autocast + clipping"
    steps = {plain: plain_step}
    for name in SHIPPED:
        cfg.deepspeed_config = os.path.join(REPO, "ds_configs", f"{name}.json")
        for how in ("stock", "cid_ds"):
            cfg.perf.host_light_step = how == "cid_ds"
            engine, guard = build_engine(make_student(), cfg, on_gpu=True)
            guard = guard if how == "cid_ds" else None  # the stock engine steps as DeepSpeed alone does

            def engine_step(engine=engine, guard=guard) -> None:
                total = loss(engine(image.to(compute_dtype(engine)), tokens))
                if guard is not None:
                    guard.backward_and_step(engine, total)
                else:
                    engine.backward(total)
                    engine.step()
            steps[f"{name}.json {how}"] = engine_step

    counts = {}
    for name, step in steps.items():
        for _ in range(2):  # optimizer state, DeepSpeed's buffers
            step()
        with DispatchCount() as counts[name]:
            step()
    seconds = interleaved({name: clocked(step) for name, step in steps.items()}, args.reps)

    parameters = len(list(plain_model.parameters()))
    print(f"{args.student}{f' at width {args.width}' if args.width else ''}, {parameters} parameter tensors, batch "
          f"{args.batch}, {torch.cuda.get_device_name() if gpu else 'CPU'}, median of {args.reps} steps each:")
    for name in steps:
        ms = seconds[name] * 1e3
        print(f"  {name:34s} {counts[name].ops:6d} ops ({counts[name].ops / counts[plain].ops:5.2f}x plain, "
              f"{(counts[name].ops - counts[plain].ops) / parameters:+5.1f} per parameter tensor)  "
              f"{counts[name].syncs:4d} syncs  {ms:8.1f} ms/step")


if __name__ == "__main__":
    main()
