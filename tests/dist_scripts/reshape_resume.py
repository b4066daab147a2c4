"""Run under `deepspeed --num_gpus N`: a small model's engine as the trainer builds it (cid_ds.engine.build_engine) with
the DeepSpeed JSON given, saved and resumed by the trainer's own functions (cid_ds.checkpoints).
    reshape_resume.py save JSON OUT          three steps (each rank its own data), then a checkpoint in OUT
    reshape_resume.py resume JSON OUT OUT2   resume from OUT (saved by any number of ranks), then a checkpoint of
                                             the same step in OUT2, with no step between"""
import sys

import torch
import torch.distributed as dist

from cid_ds.checkpoints import resume, save_checkpoint
from cid_ds.config import Config
from cid_ds.engine import build_engine, cosine_with_warmup, init_distributed
from cid_ds.run_state import DataPosition, Run

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's
mode, json_path, out = args[:3]
init_distributed()
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
cfg = Config()
cfg.deepspeed_config, cfg.output_dir, cfg.data.batch_size = json_path, out, 4
engine, guard = build_engine(model, cfg, on_gpu=False, lr_factor=cosine_with_warmup(1, 10))
run = Run(cfg, engine, guard, rank, dist.get_world_size())
if mode == "save":
    g = torch.Generator().manual_seed(1 + rank)
    for step in range(3):
        x = torch.randn(cfg.data.batch_size, 16, generator=g)
        guard.backward_and_step(engine, engine(x).square().mean())
    run.step, run.position = 3, DataPosition(0, 3)
    save_checkpoint(run)
else:
    run.step, run.position = resume(run)
    cfg.output_dir = args[3]
    save_checkpoint(run)
