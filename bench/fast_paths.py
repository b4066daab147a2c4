"""The step's fast paths, before and after, in this process on the trainer benches' student and a real batch of
their shards (bench/workbench.py), each pair interleaved, median of --reps: AdamW implementations inside the engine
step, the engine step at ZeRO stage 2 and 0, backward + step with and without the one-rank gradient all-reduce,
torch.compile, gradient checkpointing, the SDPA kernel, channels-last (the ViT student and a small ResNet), stored
token ids against tokenising, the loader's CPU time per batch, the per-step non-finite verdict and the logging window.

    python bench/fast_paths.py [--work runs/bench_vs_open_clip] [--reps 10]

bench/trainer_throughput.py runs these after its trainer runs (unless --no-fast-paths), and sets the whole
trainer's samples/s before and after beside the lines of perf.adamw, perf.compile and the ZeRO stage; run alone,
this reads those from WORK/results.json where a trainer_throughput run with every system left one. Results:
printed, and WORK/fast_paths.json.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import logging
import os
import random
import statistics
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.* from a script

from bench.timing import (clocked, interleaved, median_runs, on_gpu, proc_status_bytes,  # noqa: E402
                          reset_peak_rss, sync)
from bench.workbench import Workbench, add_workload_args, prepare  # noqa: E402
from cid_ds.io import read_json, write_json  # noqa: E402
from cid_ds.models import DistillStudent, create_model, model_config  # noqa: E402


def peak_step_bytes(step: Callable[[], None]) -> int:
    """Memory a step adds at its peak: the CUDA allocator's peak, or on CPU the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) over its RSS before, after handing free heap back to the OS."""
    gc.collect()
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = proc_status_bytes("VmRSS")
    reset_peak_rss()
    step()
    return proc_status_bytes("VmHWM") - base


def conv_student(bench: Workbench) -> tuple[DistillStudent, torch.Tensor]:
    """A ResNet student (open_clip's ModifiedResNet: RN50 on GPU, a 4-stage width-32 one at 64 px on CPU) and
    an image batch for it."""
    from open_clip.model import CLIP
    if on_gpu():
        clip, size = create_model("RN50")[0], 224
    else:
        text = model_config(bench.args.student)["text_cfg"]
        clip, size = CLIP(128, {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32}, text), 64
    image = torch.randn(bench.args.batch, 3, size, size, device=bench.device, dtype=bench.dtype)
    return bench.student(clip), image


def measure(bench: Workbench) -> dict[str, dict[str, float]]:
    """Before/after seconds (and bytes) of each fast path, each pair interleaved."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    reps, results = bench.args.reps, {}

    engines = {impl: bench.engine(impl) for impl in ("for_loop", "foreach", "fused")}
    results["adamw"] = interleaved({impl: lambda e=e: engine_step_seconds(e, bench)
                                    for impl, e in engines.items()}, reps)
    engine_with = {name: bench.engine(deepspeed_json=f"ds_configs/{name}") for name in ("zero2.json", "zero0.json")}
    results["zero_stage"] = interleaved({name: lambda e=e: engine_step_seconds(e, bench)
                                         for name, e in engine_with.items()}, reps)
    # DeepSpeed's stock step all-reduces a single rank's gradients with themselves; the host-light one skips that
    allreduce = {"allreduce": bench.engine(host_light_step=False), "skipped": engines["fused"]}
    results["one_rank_allreduce"] = interleaved({name: lambda e=e: engine_step_seconds(e, bench, with_backward=True)
                                                 for name, e in allreduce.items()}, reps)

    eager, compiled = bench.student(), bench.student()
    compiled.compile()
    first = clocked(bench.step(compiled))()
    results["compile"] = interleaved({"eager": clocked(bench.step(eager)),
                                      "compiled": clocked(bench.step(compiled))}, reps) | {"first_call": first}

    checkpointed = bench.student()
    checkpointed.clip.set_grad_checkpointing(True)
    results["grad_checkpointing"] = interleaved({"off": clocked(bench.step(eager)),
                                                 "on": clocked(bench.step(checkpointed))}, reps)
    results["grad_checkpointing_bytes"] = {
        k: statistics.median(peak_step_bytes(bench.step(m)) for _ in range(3))
        for k, m in (("off", eager), ("on", checkpointed))}

    def math_attention() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            bench.step(eager)()
    results["sdpa"] = interleaved({"math": clocked(math_attention), "default": clocked(bench.step(eager))}, reps)

    vit_nhwc = bench.student().to(memory_format=torch.channels_last)
    image_nhwc = bench.batch["image"].to(memory_format=torch.channels_last)
    results["channels_last_vit"] = interleaved({"off": clocked(bench.step(eager)),
                                                "on": clocked(bench.step(vit_nhwc, image=image_nhwc))}, reps)
    resnet, image = conv_student(bench)
    resnet_nhwc = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
    results["channels_last_resnet"] = interleaved({
        "off": clocked(bench.step(resnet, image=image)),
        "on": clocked(bench.step(resnet_nhwc, image=image.to(memory_format=torch.channels_last)))}, reps)

    results["tokens"] = stored_ids_vs_tokenising(bench)
    results["loader"] = loader_cpu_seconds(bench)
    results["step_guard"] = step_guard_seconds(bench)
    results["log_window"] = log_window_seconds(bench, engines["fused"])
    return results


def engine_step_seconds(engine, bench: Workbench, with_backward: bool = False) -> float:
    """Forward untimed; engine.step(), and engine.backward if ``with_backward``, timed."""
    loss = bench.losses(engine)
    sync()
    start = time.perf_counter()
    engine.backward(loss)
    if not with_backward:
        sync()
        start = time.perf_counter()
    engine.step()
    sync()
    return time.perf_counter() - start


def stored_ids_vs_tokenising(bench: Workbench) -> dict[str, float]:
    """A batch's token ids from the packed bytes vs tokenising its captions (the loader's two paths);
    tests/test_pack.py checks that they are the same ids."""
    import itertools
    from cid_ds.data.packed import decode_array
    from cid_ds.data.samples import caption_of, read_samples
    samples = list(itertools.islice(read_samples(bench.shards), bench.args.batch))
    captions = [caption_of(s) for s in samples]
    length = bench.batch["tokens"].shape[1]

    def stored() -> torch.Tensor:
        ids = [decode_array(s["tokens"], "tokens", length, s["__key__"]) for s in samples]
        return torch.from_numpy(np.stack(ids).astype(np.int64))
    assert torch.equal(stored(), bench.tokenizer(captions))
    return interleaved({"tokenised": clocked(lambda: bench.tokenizer(captions)), "stored": clocked(stored)},
                       bench.args.reps)


def loader_cpu_seconds(bench: Workbench) -> dict[str, dict[str, float]]:
    """CPU seconds per batch of the webdataset loader (in this process: on a CPU its workers take their cores
    from the step), and before/after for its two fast paths: reading a batch of samples from a shard with
    webdataset's tarfile reader and with ours, and the images' transforms per image (open_clip's preprocess)
    and as uint8 pixels normalised once per batch."""
    import itertools

    import torch
    import webdataset as wds

    from cid_ds.data.preprocess import split_normalize
    from cid_ds.data.tars import tar_samples
    from cid_ds.data.samples import decode_image
    from cid_ds.data.batch import LoaderSpec
    from cid_ds.data.wds_loader import build_train_loader
    batches = iter(build_train_loader(LoaderSpec(bench.shards, bench.preprocess, bench.tokenizer, bench.args.batch,
                                                 shuffle_buffer=bench.cfg["CID"].data.shuffle_buffer)))

    def first(samples) -> list[dict]:
        return list(itertools.islice(samples, bench.args.batch))
    images = [decode_image(sample) for sample in first(tar_samples(bench.shards[0]))]
    pixels, normalize = split_normalize(bench.preprocess)
    augment = random.Random(0)
    cases = {"batch": lambda: next(batches),
             "tar webdataset": lambda: first(wds.tarfile_to_samples()([{"url": bench.shards[0]}])),
             "tar ours": lambda: first(tar_samples(bench.shards[0])),
             "per image": lambda: torch.stack([bench.preprocess(image) for image in images]),
             "per batch": lambda: normalize(torch.stack([pixels(image, augment) for image in images]))}
    return interleaved({name: clocked(case, time.process_time) for name, case in cases.items()}, bench.args.reps)


def idle_guard(device: torch.device):
    """A StepGuard whose optimizer is not stepped (the bench times the guard's own work)."""
    from cid_ds.step_guard import StepGuard
    return StepGuard(torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True), device)


def step_guard_seconds(bench: Workbench) -> dict[str, float]:
    """The trainer's per-step non-finite verdict (cid_ds.step_guard): one all-reduce, no read."""
    loss = bench.losses(bench.student()).detach()
    guard = idle_guard(loss.device)

    def call() -> None:
        guard.check_loss(loss)
        guard.end_step({"total": loss})
    return interleaved({"call": clocked(call)}, 10 * bench.args.reps)


def log_window_seconds(bench: Workbench, engine) -> dict[str, float]:
    """One logging window of the trainer: all-reduce of the losses, samples/s gather, TensorBoard write, print."""
    import io

    from torch.utils.tensorboard import SummaryWriter

    from cid_ds.objective import compute_losses
    from cid_ds.run_state import Run, Window
    from cid_ds.train import log_window
    cfg = bench.cfg["instance"]
    out = engine(bench.batch["image"], bench.batch["tokens"])
    losses, metrics = compute_losses(cfg, out, bench.batch, None, 0)
    total = sum(losses.values())
    run = Run(cfg=cfg, engine=engine, guard=idle_guard(total.device), step=1,
              writer=SummaryWriter(os.path.join(bench.args.work, "log_window_tensorboard")))

    def call() -> None:
        run.window = Window(t0=time.perf_counter() - 1, steps=1)
        run.guard.end_step(losses | {"total": total})
        with contextlib.redirect_stdout(io.StringIO()):
            log_window(run, metrics, out, 0)
    return interleaved({"call": clocked(call)}, bench.args.reps)


def whole_trainer(trainer: dict[str, dict[str, float]], before: str, after: str) -> str:
    """The trainer's samples/s from system ``before`` to ``after`` (bench/trainer_throughput.py's medians), where
    both ran."""
    if before not in trainer or after not in trainer:
        return ""
    rate_before, rate_after = trainer[before]["samples_per_s"], trainer[after]["samples_per_s"]
    return (f"; whole trainer, cid_ds CID: {rate_before:.1f} -> {rate_after:.1f} samples/s "
            f"({rate_after / rate_before:.2f}x)")


def report(fast: dict, reps: int, batch: int, trainer: dict[str, dict[str, float]]) -> list[str]:
    """The fast-path lines; ``trainer``: the median of each trainer system's runs (empty: none ran)."""
    ms = {k: {case: v * 1e3 for case, v in d.items()} for k, d in fast.items() if not k.endswith("_bytes")}
    mib = {case: v / 2**20 for case, v in fast["grad_checkpointing_bytes"].items()}
    saved = (ms["compile"]["eager"] - ms["compile"]["compiled"]) / 1e3
    payback = (f"pays back after {ms['compile']['first_call'] / 1e3 / saved:.0f} steps" if saved > 0
               else "never pays back")
    return [f"fast paths, before -> after (median of {reps}, interleaved; batch {batch}):",
            f"  AdamW in the engine step (perf.adamw): for_loop {ms['adamw']['for_loop']:.1f} ms -> fused "
            f"{ms['adamw']['fused']:.1f} ms (foreach {ms['adamw']['foreach']:.1f} ms)"
            + whole_trainer(trainer, "cid_ds CID for-loop AdamW", "cid_ds CID"),
            f"  torch.compile (perf.compile): forward+backward {ms['compile']['eager']:.1f} -> "
            f"{ms['compile']['compiled']:.1f} ms; first call (compiling) {ms['compile']['first_call'] / 1e3:.0f} s, "
            f"{payback}" + whole_trainer(trainer, "cid_ds CID", "cid_ds CID perf.compile"),
            f"  gradient checkpointing (perf.grad_checkpointing): forward+backward "
            f"{ms['grad_checkpointing']['off']:.1f} -> {ms['grad_checkpointing']['on']:.1f} ms, "
            f"step memory {mib['off']:.0f} -> {mib['on']:.0f} MiB",
            f"  attention kernel: math {ms['sdpa']['math']:.1f} -> default SDPA {ms['sdpa']['default']:.1f} ms "
            "(nn.MultiheadAttention calls F.scaled_dot_product_attention in training)",
            f"  channels-last (perf.channels_last), ViT student: {ms['channels_last_vit']['off']:.1f} -> "
            f"{ms['channels_last_vit']['on']:.1f} ms; ResNet student: {ms['channels_last_resnet']['off']:.1f} -> "
            f"{ms['channels_last_resnet']['on']:.1f} ms",
            f"  token ids per batch: tokenising captions {ms['tokens']['tokenised']:.2f} -> stored ids "
            f"{ms['tokens']['stored']:.2f} ms (in the loader workers)",
            f"  loader CPU per batch: reading the samples, webdataset's tarfile {ms['loader']['tar webdataset']:.1f} "
            f"-> our tar reader {ms['loader']['tar ours']:.1f} ms; the images' transforms, per image "
            f"{ms['loader']['per image']:.1f} -> uint8 + one normalise per batch {ms['loader']['per batch']:.1f} ms; "
            f"the whole loader now {ms['loader']['batch']:.0f} ms per batch, a worker's core taken from the step",
            f"  per-step non-finite verdict (cid_ds.step_guard, no read): {ms['step_guard']['call']:.3f} ms; logging "
            f"window {ms['log_window']['call']:.1f} ms, read every logging.every steps",
            f"  ZeRO at one rank (the demo YAMLs' deepspeed_config): engine step, zero2.json "
            f"{ms['zero_stage']['zero2.json']:.1f} ms -> zero0.json {ms['zero_stage']['zero0.json']:.1f} ms "
            f"(ZeRO's flat fp32 copies and fp64 gradient norm)"
            + whole_trainer(trainer, "cid_ds CID zero2.json", "cid_ds CID"),
            f"  one rank without ZeRO: engine backward + step with DeepSpeed's all-reduce of the gradients "
            f"{ms['one_rank_allreduce']['allreduce']:.1f} ms -> skipped {ms['one_rank_allreduce']['skipped']:.1f} ms"]


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reps", type=int, default=10, help="repetitions of each in-process measurement")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(parser)
    add_args(parser)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns at every random-init student built here
    args.work = os.path.abspath(args.work)
    paths = prepare(args)
    from cid_ds.engine import init_distributed
    init_distributed()  # the in-process engines and the cluster term are 1-rank jobs
    fast = measure(Workbench(args, paths))
    trainer_results = os.path.join(args.work, "results.json")
    trainer = median_runs(read_json(trainer_results)["runs"]) if os.path.isfile(trainer_results) else {}
    print("\n" + "\n".join(report(fast, args.reps, args.batch, trainer)), flush=True)
    write_json(os.path.join(args.work, "fast_paths.json"), fast)
    return fast


if __name__ == "__main__":
    main()
