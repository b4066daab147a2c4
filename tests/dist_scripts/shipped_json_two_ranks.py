"""Run under `deepspeed --num_gpus 2`: two steps of a small student through each DeepSpeed JSON given, at the
precision the trainer uses on a GPU (DeepSpeed runs it on CPU too), each rank on its own data; rank 0 writes
whether the ranks' weights agree afterwards and whether they moved. --out DIR, then the JSON paths."""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # for tests.*

from cid_ds.config import Config  # noqa: E402
from cid_ds.engine import build_optimizer, compute_dtype, deepspeed_config, init_distributed  # noqa: E402
from tests.test_fast_paths import BATCH, batch_loss, fixed_batch, tiny_student  # noqa: E402

out_dir = sys.argv[sys.argv.index("--out") + 1]
json_paths = sys.argv[sys.argv.index("--out") + 2:]
init_distributed()
rank = dist.get_rank()
result = {}
for path in json_paths:
    cfg = Config()
    cfg.deepspeed_config, cfg.data.batch_size = path, BATCH
    student = tiny_student()
    initial = torch.cat([p.detach().float().flatten() for p in student.parameters()])
    engine, *_ = deepspeed.initialize(model=student, optimizer=build_optimizer(student, cfg),
                                      config=deepspeed_config(cfg, on_gpu=True))
    batch = fixed_batch()
    torch.manual_seed(rank)  # each rank its own images
    batch["image"] = torch.randn_like(batch["image"]).to(compute_dtype(engine))
    for _ in range(2):
        engine.backward(batch_loss(engine, batch, outputs_in_fp32=True))
        engine.step()
    weights = torch.cat([p.detach().float().flatten() for p in student.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(2)]
    dist.all_gather(gathered, weights)
    result[os.path.basename(path)] = {"ranks_agree": torch.equal(gathered[0], gathered[1]),
                                      "trained": not torch.equal(weights, initial)}
if rank == 0:
    with open(os.path.join(out_dir, "two_ranks.json"), "w") as f:
        json.dump(result, f)
