"""Step time of cached-teacher distillation vs the plain CLIP step vs an online teacher, side by side.

    python bench/step_overhead.py [--student demo-student] [--teacher demo-teacher] [--batch 128]

The three steps share the student, batch and optimizer; they run interleaved (plain, cached, online,
plain, ...) so machine noise hits them alike, and the median of each is reported. Target: cached
distillation <= 1.10x the plain step. The online row is what open_clip's ``--distill`` does: the
teacher's forward pass inside every step.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.* from a script

from bench.timing import clocked, interleaved  # noqa: E402
from cid_ds.losses.clip import clip_loss  # noqa: E402
from cid_ds.losses.instance import instance_loss  # noqa: E402
from cid_ds.models import DistillStudent, create_model, embed_dim  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="demo-student")
    parser.add_argument("--teacher", default="demo-teacher")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)

    clip_model, _, _, tokenizer = create_model(args.student)
    teacher, _, _, _ = create_model(args.teacher)
    teacher.eval().requires_grad_(False)
    student = DistillStudent(clip_model, embed_dim(teacher))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    size = clip_model.visual.image_size
    image = torch.randn(args.batch, 3, *(size if isinstance(size, tuple) else (size, size)))
    tokens = tokenizer([f"a photo of a small red circle number {i}" for i in range(args.batch)])
    with torch.no_grad():
        t_img = torch.nn.functional.normalize(teacher.encode_image(image), dim=-1)
        t_txt = torch.nn.functional.normalize(teacher.encode_text(tokens), dim=-1)

    def step(kind: str) -> None:
        out = student(image, tokens)
        loss = clip_loss(out["image"], out["text"], out["logit_scale"])
        if kind != "plain":
            if kind == "online":
                with torch.no_grad():
                    ti = torch.nn.functional.normalize(teacher.encode_image(image), dim=-1)
                    tt = torch.nn.functional.normalize(teacher.encode_text(tokens), dim=-1)
            else:
                ti, tt = t_img, t_txt
            loss = loss + instance_loss(out["image_in_teacher"], out["text_in_teacher"], ti, tt, out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    kinds = ("plain", "cached", "online")
    median = interleaved({kind: clocked(lambda kind=kind: step(kind)) for kind in kinds}, args.repeats)
    print(f"student {args.student}, teacher {args.teacher}, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for kind in kinds:
        print(f"  {kind:7s} step {median[kind] * 1e3:8.1f} ms  {args.batch / median[kind]:8.0f} samples/s")
    print(f"cached distillation / plain step: {median['cached'] / median['plain']:.3f}x  (target <= 1.10x)")
    print(f"online teacher / plain step:      {median['online'] / median['plain']:.3f}x")
    print(f"online teacher / cached:          {median['online'] / median['cached']:.3f}x")


if __name__ == "__main__":
    main()
