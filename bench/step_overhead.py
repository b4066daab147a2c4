"""Step time of the teacher terms, side by side: the trainer's own step (``cid_ds.train.train_step`` on a
``build_engine`` engine) for the plain CLIP student, cached-teacher instance distillation, the CLIP-CID recipe
(instance + cluster discrimination, as ``data_tools.prepare``'s train.yaml sets it) and an online teacher.

    python bench/step_overhead.py [--student demo-student] [--teacher demo-teacher] [--batch 128] [--k 64]
                                  [--profile CASE]

The cases share the student's initial weights, the batch and the DeepSpeed JSON (prepare's: ZeRO-2; fp32 on the
CPU); they run interleaved (plain, instance, CID, online, plain, ...) so machine noise hits them alike, and the
median of each is reported. Target: CID <= 1.10x the plain step. The online row is what open_clip's ``--distill``
does: the teacher's forward pass inside every step. ``--profile CASE``: torch.profiler's top ops of that case
beside the plain step's, to see where the difference goes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.* from a script
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a CPU bench: the engines and the batch on the CPU, GPU or not

from bench.timing import clocked, interleaved, machine  # noqa: E402
from cid_ds.config import Config  # noqa: E402
from cid_ds.engine import build_engine, init_distributed  # noqa: E402
from cid_ds.models import DistillStudent, create_model, embed_dim  # noqa: E402
from cid_ds.run_state import Run  # noqa: E402
from cid_ds.teacher import OnlineTeacher  # noqa: E402
from cid_ds.train import train_step  # noqa: E402

RECIPE = "ds_configs/experiments/clip_cid.yaml"  # prepare's recipe: its loss and cluster keys


def case_config(case: str, batch: int, centroids_dir: str) -> Config:
    cfg = Config()
    cfg.deepspeed_config, cfg.data.batch_size = "ds_configs/zero2.json", batch
    cfg.loss.instance = 0.0 if case == "plain" else 1.0
    if case == "CID":
        with open(RECIPE) as f:
            recipe = yaml.safe_load(f)
        for section in ("loss", "cluster"):
            for key, value in recipe[section].items():
                setattr(getattr(cfg, section), key, value)
        cfg.cluster.dir = centroids_dir
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="demo-student")
    parser.add_argument("--teacher", default="demo-teacher")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--k", type=int, default=64, help="clusters (the demo's k)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", choices=("instance", "CID", "online"), default=None)
    args = parser.parse_args()
    init_distributed(dist_backend="gloo")
    teacher_model, _, _, tokenizer = create_model(args.teacher)
    dim = embed_dim(teacher_model)
    centroids_dir = tempfile.mkdtemp()
    np.save(os.path.join(centroids_dir, "centroids.npy"),
            np.random.default_rng(0).standard_normal((args.k, dim)).astype(np.float32))

    runs, online = {}, None
    for case in ("plain", "instance", "CID", "online"):
        cfg = case_config(case, args.batch, centroids_dir)
        torch.manual_seed(0)
        clip_model, _, _, tokenizer = create_model(args.student)
        student = DistillStudent(clip_model, None if case == "plain" else dim)
        engine, guard = build_engine(student, cfg, on_gpu=False)
        run = Run(cfg, engine, guard)
        if case == "CID":
            from cid_ds.losses.cluster import cluster_term
            run.cluster_term = cluster_term(cfg, lambda step: 1.0, engine.device)
        if case == "online":
            online = OnlineTeacher(args.teacher, None, clip_model, random_ok=True).to(engine.device, torch.float32)
        runs[case] = run
    size = clip_model.visual.image_size
    g = torch.Generator().manual_seed(1)
    captions = [f"a photo of a small red circle number {i}" for i in range(args.batch)]
    teacher_rows = torch.nn.functional.normalize(torch.randn(2, args.batch, dim, generator=g), dim=-1)
    batch = {"image": torch.randn(args.batch, 3, *(size if isinstance(size, tuple) else (size, size)), generator=g),
             "tokens": tokenizer(captions), "t_img": teacher_rows[0], "t_txt": teacher_rows[1],
             "cluster": torch.randint(0, args.k, (args.batch,), generator=g)}

    def step(case: str) -> None:
        run = runs[case]
        given = batch
        if case == "online":
            t_img, t_txt = online(batch["image"], online.tokenizer(captions))
            given = batch | {"t_img": t_img, "t_txt": t_txt}
        train_step(run, given)
        run.step += 1

    median = interleaved({case: clocked(lambda case=case: step(case)) for case in runs}, args.repeats)
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch}, k {args.k}, fp32, "
          f"median of {args.repeats}; {machine()}")
    for case in runs:
        print(f"  {case:8s} step {median[case] * 1e3:8.1f} ms  {args.batch / median[case]:8.0f} samples/s")
    print(f"CID / plain step:      {median['CID'] / median['plain']:.3f}x  (target <= 1.10x)")
    print(f"instance / plain step: {median['instance'] / median['plain']:.3f}x")
    print(f"online / plain step:   {median['online'] / median['plain']:.3f}x")
    if args.profile:
        for case in ("plain", args.profile):
            with torch.profiler.profile() as prof:
                for _ in range(3):
                    step(case)
            print(f"\n{case}: top ops by self CPU time over 3 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
