"""Run under `deepspeed --num_gpus N`: per DeepSpeed JSON given, two engines from the same weights at the precision
the trainer uses on a GPU (DeepSpeed runs it on CPU too): DeepSpeed's stock engine and the engine as the trainer runs
it (cid_ds.engine.build_engine: make_step_host_light with cid_ds.step_guard's guard). Each takes three steps, each
rank on its own data; the third is counted with DispatchCount, as is a plain torch autocast step with clipping of the
same student. Then the trainer's engine takes two steps that must be skipped, one with a NaN loss on
rank 0 only and one with a finite loss whose gradient is infinite. The student has ViT-B/32's every layer and
parameter tensor at width 64 (bench/engine_dispatch.py's). Rank 0 writes OUT/steps.json: per JSON the ops and syncs
of both engines, the plain step's ops, whether the two engines end with bitwise equal weights, whether the ranks
agree, and whether the skipped steps left weights and optimizer state bitwise as they were and were counted.
--out DIR, then the JSON paths."""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from bench.engine_dispatch import TEACHER_DIM, student_factory  # noqa: E402
from cid_ds.config import Config  # noqa: E402
from cid_ds.engine import build_engine, build_optimizer, compute_dtype, init_distributed  # noqa: E402
from cid_ds.losses.clip import clip_loss  # noqa: E402
from cid_ds.losses.instance import instance_loss  # noqa: E402
from cid_ds.profiling import DispatchCount  # noqa: E402

BATCH = 4
out_dir = sys.argv[sys.argv.index("--out") + 1]
json_paths = sys.argv[sys.argv.index("--out") + 2:]
init_distributed()
rank = dist.get_rank()
student = student_factory("ViT-B-32", 64)
g = torch.Generator().manual_seed(1 + rank)  # each rank its own data
image, tokens = torch.randn(BATCH, 3, 224, 224, generator=g), torch.randint(1, 49000, (BATCH, 77), generator=g)
teacher = torch.nn.functional.normalize(torch.randn(2, BATCH, TEACHER_DIM, generator=g), dim=-1)


def loss(out: dict) -> torch.Tensor:
    f = {k: v.float() for k, v in out.items()}
    return clip_loss(f["image"], f["text"], f["logit_scale"]) + instance_loss(
        f["image_in_teacher"], f["text_in_teacher"], teacher[0], teacher[1], f["logit_scale"])


def infinite_gradient(out: dict) -> torch.Tensor:
    """0 in the forward, an infinite gradient into the image tower in the backward (d sqrt(x)/dx at x = 0)."""
    image = out["image"].float().sum()
    return (image - image.detach()) ** 0.5


def snapshot(model, optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()] + \
        [v.clone() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def zero_stage(path: str) -> int:
    with open(path) as f:
        return json.load(f).get("zero_optimization", {}).get("stage", 0)


def third_step_counted(step) -> DispatchCount:
    for _ in range(2):  # optimizer state and DeepSpeed's buffers are made in the first steps
        step()
    with DispatchCount() as count:
        step()
    return count


cfg = Config()
cfg.data.batch_size = BATCH
plain_model = student()
plain_optimizer = build_optimizer(plain_model, cfg)


def plain_step() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain_model(image, tokens)
    loss(out).backward()
    torch.nn.utils.clip_grad_norm_(plain_model.parameters(), cfg.optim.grad_clip, foreach=True)
    plain_optimizer.step()
    plain_optimizer.zero_grad(set_to_none=True)


result = {"plain_ops": third_step_counted(plain_step).ops, "parameter_tensors": len(list(plain_model.parameters()))}
for path in json_paths:
    cfg.deepspeed_config = path
    entry, weights = {}, {}
    # make_step_host_light leaves ZeRO-3 as DeepSpeed runs it: one engine is both
    for how in ("stock", "cid_ds") if zero_stage(path) < 3 else ("cid_ds",):
        model = student()
        cfg.perf.host_light_step = how == "cid_ds"
        engine, guard = build_engine(model, cfg, on_gpu=True)
        guard = guard if how == "cid_ds" else None  # the stock engine steps as DeepSpeed alone does

        def engine_step(extra=lambda out: 0.0) -> None:
            out = engine(image.to(compute_dtype(engine)), tokens)
            total = loss(out) + extra(out)
            if guard is not None:
                guard.backward_and_step(engine, total)
            else:
                engine.backward(total)
                engine.step()
        count = third_step_counted(engine_step)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):  # no-op below ZeRO-3
            weights[how] = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(weights[how]) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, weights[how])
        entry[how] = {"ops": count.ops, "syncs": count.syncs,
                      "ranks_agree": all(torch.equal(gathered[0], w) for w in gathered)}
        if guard is not None and zero_stage(path) < 3:  # ZeRO-3 decides on the host, as DeepSpeed runs it
            before = snapshot(model, guard.optimizer)
            guard.take_window()
            engine_step(lambda out: float("nan") if rank == 0 else 0.0)
            engine_step(infinite_gradient)
            after = snapshot(model, guard.optimizer)
            entry["skipped_steps_left_all_as_it_was"] = all(torch.equal(a, b) for a, b in zip(before, after))
            entry["skipped_steps_counted"] = guard.take_window()[1].item()
    entry.setdefault("stock", entry["cid_ds"])
    entry["same_weights"] = torch.equal(weights.get("stock", weights["cid_ds"]), weights["cid_ds"])
    result[os.path.basename(path)] = entry
if rank == 0:
    with open(os.path.join(out_dir, "steps.json"), "w") as f:
        json.dump(result, f)
