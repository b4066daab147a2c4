"""The trainer's step reads nothing back from the device: a training step as ``cid_ds.train.train_step`` runs it
(forward; CLIP, instance, feature and cluster terms, the cluster term with class sampling, two positives and the
text side; the non-finite verdict; backward; the engine's step; the classifier's row update) asks the host to wait
for the device zero times, under zero0.json and zero2.json: no value read back and no tensor made from host data
(``cid_ds.profiling.DispatchCount``), and no call of the accelerator's synchronize. A step on teacher embeddings that
are NaN leaves the student and the classifier as they were and is counted: skipped on the device, or, with an AdamW
that cannot skip there (``perf.adamw: foreach``), by its step reading the verdict back. Without clipping, which
computes no gradient norm, a finite loss with an infinite gradient is skipped too."""
import json
import subprocess
import sys

import numpy as np

from tests.helpers import one_rank_env

STEPS_COUNTED = r"""
import json, sys, numpy as np, torch
from cid_ds.config import Config
from cid_ds.engine import build_engine, init_distributed
from cid_ds.losses.clip import clip_loss
from cid_ds.losses.cluster import ClusterDiscrimination
from cid_ds.profiling import DispatchCount
from cid_ds.run_state import Run
from cid_ds.train import train_step
from tests.test_fast_paths import BATCH, fixed_batch, tiny_student
from deepspeed.accelerator import get_accelerator
init_distributed(dist_backend="gloo")
accelerator, synchronized = get_accelerator(), []
stock_synchronize = accelerator.synchronize
accelerator.synchronize = lambda *args, **kwargs: synchronized.append(1) or stock_synchronize(*args, **kwargs)
centroids_dir, result = sys.argv[2], {}
for json_name, adamw in (("zero0", "fused"), ("zero2", "fused"), ("zero0", "foreach")):
    cfg = Config()
    cfg.deepspeed_config, cfg.data.batch_size, cfg.perf.adamw = f"ds_configs/{json_name}.json", BATCH, adamw
    cfg.loss.instance, cfg.loss.fd, cfg.loss.cluster = 1.0, 1.0, 0.3
    cfg.cluster.dir, cfg.cluster.sample_rate, cfg.cluster.positives = centroids_dir, 0.5, 2
    cfg.cluster.text_weight = 0.5
    student = tiny_student()
    engine, guard = build_engine(student, cfg, on_gpu=False)
    term = ClusterDiscrimination(cfg.cluster, cfg.optim.lr, (0.9, 0.98), 1e-6, lambda step: 1.0, 0, engine.device)
    batch = fixed_batch() | {"cluster": torch.stack([torch.randperm(64)[:2] for _ in range(BATCH)])}
    run = Run(cfg, engine, guard, cluster_term=term)
    for run.step in range(3):
        synchronized.clear()
        with DispatchCount() as count:
            train_step(run, batch)
    before = [p.detach().clone() for p in student.parameters()] + [term.classifier.weight.clone()]
    nan_batch = batch | {"t_img": torch.full_like(batch["t_img"], float("nan"))}
    run.step = 3
    train_step(run, nan_batch)
    after = [p.detach().clone() for p in student.parameters()] + [term.classifier.weight.clone()]
    result[f"{json_name} {adamw}"] = {
        "syncs": count.syncs, "accelerator_syncs": len(synchronized), "updates": int(term.classifier.updates),
        "nan_step_changed_nothing": all(torch.equal(a, b) for a, b in zip(before, after)),
        "skipped_counted": guard.take_window()[1].item()}

cfg = Config()
cfg.deepspeed_config, cfg.data.batch_size, cfg.optim.grad_clip = "ds_configs/zero0.json", BATCH, 0.0
student = tiny_student()
engine, guard = build_engine(student, cfg, on_gpu=False)
for infinite_gradient in (False, True):
    before = [p.detach().clone() for p in student.parameters()]
    out = engine(batch["image"], batch["tokens"])
    image = out["image"].sum()
    total = clip_loss(out["image"], out["text"], out["logit_scale"])
    total = total + (image - image.detach()) ** 0.5 if infinite_gradient else total  # 0, d/dx sqrt(x) at 0: inf
    guard.backward_and_step(engine, total)
result["no clipping"] = {"infinite_gradient_changed_nothing": all(
    torch.equal(a, b.detach()) for a, b in zip(before, student.parameters())),
    "skipped_counted": guard.take_window()[1].item()}
json.dump(result, open(sys.argv[1], "w"))
"""


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path):
    np.save(tmp_path / "centroids.npy", np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32))
    out = tmp_path / "counted.json"
    env = one_rank_env()
    run = subprocess.run([sys.executable, "-c", STEPS_COUNTED, str(out), str(tmp_path)], env=env, cwd=env["PYTHONPATH"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    counted = json.loads(out.read_text())
    on_device = {"syncs": 0, "accelerator_syncs": 0, "updates": 3, "nan_step_changed_nothing": True,
                 "skipped_counted": 1}
    assert counted["zero0 fused"] == counted["zero2 fused"] == on_device, counted
    assert counted["no clipping"] == {"infinite_gradient_changed_nothing": True, "skipped_counted": 1}, counted
    host = counted["zero0 foreach"]  # its step reads the verdict (and torch's foreach AdamW its step counts)
    assert host["syncs"] > 0 and host["nan_step_changed_nothing"] and host["skipped_counted"] == 1, host
