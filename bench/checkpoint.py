"""Checkpoint cost: save and load time and size of a DeepSpeed ZeRO-2 checkpoint, 2 ranks on CPU.

    python bench/checkpoint.py [--models demo-student ViT-B-32] [--batch 8]

For each student it launches ``deepspeed --num_gpus 2`` on this script, takes a few real training
steps (random images and captions), then times ``save_checkpoint`` and ``load_checkpoint`` (with
their barriers) and prints seconds per GB and the fraction of a 1000-step interval spent saving.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)  # bench.* from a script


def worker(model: str, batch: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from bench.timing import clocked, interleaved
    from cid_ds.config import Config
    from cid_ds.engine import build_engine, init_distributed
    from cid_ds.losses.clip import clip_loss
    from cid_ds.models import DistillStudent, create_model

    init_distributed()
    torch.manual_seed(0)
    clip, _, _, tokenizer = create_model(model)
    student = DistillStudent(clip)
    cfg = Config()
    cfg.deepspeed_config, cfg.data.batch_size = os.path.join(REPO_ROOT, "ds_configs", "zero2.json"), batch
    engine, guard = build_engine(student, cfg, on_gpu=False)
    size = clip.visual.image_size
    image = torch.randn(batch, 3, *(size if isinstance(size, tuple) else (size, size)))
    tokens = tokenizer([f"a photo of thing {i}" for i in range(batch)])

    def step() -> None:
        out = engine(image, tokens)
        guard.backward_and_step(engine, clip_loss(out["image"], out["text"], out["logit_scale"]))

    def between_barriers(fn: Callable[[], object]) -> Callable[[], None]:
        def call() -> None:
            dist.barrier()
            fn()
            dist.barrier()
        return call

    step_s = interleaved({"step": clocked(step)}, 3)["step"]
    save = clocked(between_barriers(lambda: engine.save_checkpoint(out_dir, tag="bench")))()
    load = clocked(between_barriers(lambda: engine.load_checkpoint(out_dir, tag="bench")))()
    if dist.get_rank() == 0:
        size_bytes = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(out_dir) for f in files)
        print("RESULT " + json.dumps({
            "model": model, "params": sum(p.numel() for p in student.parameters()), "bytes": size_bytes,
            "save_s": save, "load_s": load, "step_s": step_s}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo-student", "ViT-B-32"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batch, args.out)
        return
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    rows = []
    for model in args.models:
        out = tempfile.mkdtemp(prefix="cid_ckpt_bench_")
        try:
            proc = subprocess.run([deepspeed, "--num_gpus", "2", "--master_port", "29650", __file__,
                                   "--worker", model, "--batch", str(args.batch), "--out", out],
                                  cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{model}: benchmark run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
        finally:
            shutil.rmtree(out, ignore_errors=True)
    print("DeepSpeed ZeRO-2 checkpoint, 2 CPU ranks (gloo), batch", args.batch, "per rank")
    print(f"  {'model':14s} {'params':>9s} {'size GB':>8s} {'save s':>7s} {'load s':>7s} {'save s/GB':>9s} "
          f"{'load s/GB':>9s} {'step s':>7s} {'save / 1000-step interval':>26s}")
    for r in rows:
        gb = r["bytes"] / 1e9
        fraction = r["save_s"] / (1000 * r["step_s"] + r["save_s"])
        print(f"  {r['model']:14s} {r['params'] / 1e6:8.1f}M {gb:8.3f} {r['save_s']:7.2f} {r['load_s']:7.2f} "
              f"{r['save_s'] / gb:9.2f} {r['load_s'] / gb:9.2f} {r['step_s']:7.3f} {fraction:26.2%}")


if __name__ == "__main__":
    main()
