"""Run under `deepspeed --num_gpus 2`: one training step of a data-parallel DeepSpeed (ZeRO-2) student
with the sharded centroid classifier beside it; each rank dumps its student weights and its shard."""
import os
import sys

import torch
import torch.distributed as dist

from cid_ds.config import Config
from cid_ds.engine import build_engine, init_distributed
from cid_ds.parallel.partial_fc import ShardedCentroidClassifier

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

out_dir = sys.argv[sys.argv.index("--out") + 1]
init_distributed()
rank = dist.get_rank()
torch.manual_seed(0)
student = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
cfg = Config()
cfg.deepspeed_config, cfg.data.batch_size, cfg.optim.lr = os.path.join(REPO, "ds_configs", "zero2.json"), 4, 0.05
engine, guard = build_engine(student, cfg, on_gpu=False)
classifier = ShardedCentroidClassifier(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)))

g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
x, labels = torch.randn(4, 6, generator=g), torch.randint(0, 10, (4,), generator=g)
guard.backward_and_step(engine, classifier(engine(x), labels)["loss"])
classifier.update(lr=0.05)
torch.save({"student": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "shard": classifier.weight.detach().clone(), "start": classifier.start},
           f"{out_dir}/rank{rank}.pt")
dist.barrier()  # no rank leaves while another is still in the step's collectives (its gloo peer would abort)
dist.destroy_process_group()
