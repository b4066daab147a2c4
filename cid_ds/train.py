"""The training loop: the run's sources checked and joined, the engine built, steps, logging, then export and
eval. Its rooms: cid_ds.sources (the artifacts trained against, and every cross-check of them), cid_ds.engine
(DeepSpeed JSON, optimizer, schedule, distributed start-up), cid_ds.run_state (the ``Run`` that a step, a
logging window, a checkpoint and a resume take), cid_ds.data.loader (the loaders' one door),
cid_ds.checkpoints (save, resume, layout), cid_ds.objective (every loss term from one batch).

Run it with the DeepSpeed launcher (``deepspeed --num_gpus N launch/train.py --config X.yaml``) or
as a single process (``python -m cid_ds.train --config X.yaml``). Overrides: ``key=value`` after the
options, e.g. ``optim.lr=1e-3 data.batch_size=64``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

import psutil
import torch
import yaml

from cid_ds.checkpoints import checkpoint_dir, resume, save_checkpoint
from cid_ds.config import Config, ConfigError, config_source, load_config
from cid_ds.data.batch import Batch, LoaderSpec
from cid_ds.data.damage import RunDamage
from cid_ds.data.errors import DataError
from cid_ds.data.loader import batches
from cid_ds.engine import build_engine, cosine_with_warmup, init_distributed
from cid_ds.faults import StopSignal, exit_within
from cid_ds.io import OutputNotWritable, check_writable, read_json, write_json
from cid_ds.objective import compute_losses, loss_weights
from cid_ds.profiling import start_profiler
from cid_ds.run_lock import OutputDirLocked, RunLock
from cid_ds.run_state import Run, Window
from cid_ds.sources import Sources, check_sources, open_sources

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from cid_ds.teacher import OnlineTeacher

EXIT_SECONDS = 60  # from the end of the run (or its error) to the process's exit, at most


def on_device(run: Run, batch: Batch, online_teacher: Optional[OnlineTeacher]) -> Batch:
    """A new batch: the loader's tensors on the run's device (images in its compute dtype, NHWC with
    ``perf.channels_last``), with an online teacher's ``t_img``/``t_txt`` added."""
    # Only the images go NHWC: convolutions then compute and return NHWC. The weights stay NCHW, because
    # DeepSpeed views every parameter as contiguous bytes (broadcast, ZeRO's flat buffers).
    memory_format = torch.channels_last if run.cfg.perf.channels_last else torch.preserve_format
    moved = batch | {k: batch[k].to(run.device, non_blocking=True) for k in ("tokens", "t_img", "t_txt", "cluster")
                     if k in batch}
    moved["image"] = batch["image"].to(run.device, dtype=run.dtype, non_blocking=True, memory_format=memory_format)
    if online_teacher is not None:
        moved["t_img"], moved["t_txt"] = online_teacher(moved["image"],
                                                        batch["teacher_tokens"].to(run.device, non_blocking=True))
    return moved


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def run(cfg: Config, stop: Optional[StopSignal] = None) -> dict[str, Any]:
    """Train as ``cfg`` says. ``stop``: the stop-signal flag, installed by the caller as early as it can (a
    signal during start-up then stops the run at its first check instead of killing the rank)."""
    try:
        check_writable(cfg.output_dir)  # before start-up, and on every rank: a shared folder may be read-only on one node
    except OutputNotWritable as e:
        raise ConfigError(f"output_dir: {e}") from None
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    lock = hold_output_dir(cfg.output_dir, rank, get_accelerator().current_device_name())
    try:
        return train(cfg, stop or StopSignal(), rank, world_size)
    finally:
        if lock is not None:
            lock.release()


def hold_output_dir(output_dir: str, rank: int, device: str) -> Optional[RunLock]:
    """Rank 0 takes ``output_dir``'s run lock (cid_ds.run_lock); every rank learns whether it could (a
    collective), so a refused run ends on every rank with the holder named, before anything is written."""
    import torch.distributed as dist
    lock, refusal = None, None
    if rank == 0:
        lock = RunLock(output_dir)
        try:
            taken_over = lock.acquire()
            if taken_over:
                print(f"[cid_ds] output_dir lock taken over from {taken_over}", flush=True)
        except OutputDirLocked as e:
            lock, refusal = None, str(e)
    refused = torch.tensor([float(refusal is not None)], device=device)
    dist.all_reduce(refused, dist.ReduceOp.MAX)
    if refused.item():
        raise ConfigError(f"output_dir: {refusal or 'rank 0 could not take the run lock (see its message)'}")
    return lock


def train(cfg: Config, stop: StopSignal, rank: int, world_size: int) -> dict[str, Any]:
    """``run``'s body, with the distributed start-up done and the output folder held: the student, its sources
    and engine, the resume, then the loop."""
    from cid_ds.models import create_model
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    clip_model, preprocess_train, preprocess_val, tokenizer = create_model(
        cfg.model.student, cfg.model.student_pretrained)
    sources = open_sources(cfg, clip_model)
    run = start_run(cfg, clip_model, sources, rank, world_size)
    finished = os.path.join(cfg.output_dir, "results.json")
    if run.step >= cfg.optim.steps and os.path.isfile(finished):  # e.g. a resubmission chain's link after the end
        if rank == 0:
            print(f"[cid_ds] {cfg.name}: finished already at step {run.step} ({finished}): nothing to do", flush=True)
        return read_json(finished)
    if rank == 0:
        run.writer = open_writer(run)
    teacher = sources.online_teacher
    spec = LoaderSpec(sources.shards, preprocess_val if cfg.data.views == "center" else preprocess_train, tokenizer,
                      cfg.data.batch_size, workers=cfg.data.workers, seed=cfg.seed, rank=rank, world_size=world_size,
                      shuffle_buffer=cfg.data.shuffle_buffer, replay_views=sources.replay_views,
                      teacher_tokenizer=teacher.tokenizer if teacher is not None else None, side=sources.side)
    return train_loop(run, batches(spec, cfg.data, run.position), stop, teacher,
                      RunDamage(len(sources.shards), cfg.data.max_damaged_fraction))


def start_run(cfg: Config, clip_model: torch.nn.Module, sources: Sources, rank: int, world_size: int) -> Run:
    """The student (with the heads its teacher terms need) in its engine, the cluster term, and the step and
    data position a resume continues from."""
    from deepspeed.accelerator import get_accelerator

    from cid_ds.models import DistillStudent
    targets = sources.targets
    if cfg.perf.grad_checkpointing:
        clip_model.set_grad_checkpointing(True)
    heads = targets.head_dims if targets is not None else None
    student = DistillStudent(clip_model, sum(heads) if heads else None, teacher_blocks=heads,
                             cross_scale=cfg.loss.icl > 0, fusion=cfg.loss.afd > 0,
                             mask_ratio=cfg.kd.mask_ratio if cfg.loss.mfd > 0 else 0.0)
    lr_factor = cosine_with_warmup(cfg.optim.warmup_steps, cfg.optim.steps)
    engine, guard = build_engine(student, cfg, get_accelerator().device_name() == "cuda", lr_factor)
    run = Run(cfg, engine, guard, rank, world_size, targets=targets)
    if sources.online_teacher is not None:
        sources.online_teacher.to(run.device, run.dtype)
    if cfg.loss.cluster > 0:
        from cid_ds.losses.cluster import cluster_term
        run.cluster_term = cluster_term(cfg, lr_factor, run.device, sources.cluster_index)
    run.step, run.position = resume(run)
    return run


def open_writer(run: Run) -> SummaryWriter:
    """Rank 0's TensorBoard writer, with the run's config saved beside it and shown in it."""
    from torch.utils.tensorboard import SummaryWriter
    cfg = run.cfg
    os.makedirs(cfg.output_dir, exist_ok=True)
    config = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(config)
    writer = SummaryWriter(cfg.logging.tensorboard_dir or os.path.join(cfg.output_dir, "tensorboard"))
    writer.add_text("config", "```\n" + config + "```", run.step)
    print(f"[cid_ds] {cfg.name}: world {run.world_size}, device {run.device}, dtype {run.dtype}, "
          f"start step {run.step}/{cfg.optim.steps}, epoch {run.position.epoch}", flush=True)
    return writer


def train_loop(run: Run, data: Iterator[Batch], stop: StopSignal, online_teacher: Optional[OnlineTeacher],
               damage: RunDamage) -> dict[str, Any]:
    """Steps until ``optim.steps``: the damage and non-finite checks and the stop signal every
    ``checkpoint.stop_check_every`` steps, a logging window every ``logging.every``, checkpoints every
    ``checkpoint.every`` and at the end or a stop. Returns the run's results."""
    cfg = run.cfg
    start, first_step = time.perf_counter(), run.step
    last_losses: dict[str, float] = {}
    window_rates: list[float] = []  # samples/s over every rank, per logging window
    profiler = start_profiler(cfg.logging.profile_steps, cfg.logging.every, cfg.output_dir, run.rank,
                              run.device.type == "cuda")
    run.engine.train()
    run.window = Window()  # the first window times steps, not the start-up before them
    while run.step < cfg.optim.steps:
        t_wait = time.perf_counter()
        batch = next(data)
        run.window.data_wait += time.perf_counter() - t_wait
        run.window.skipped += int(batch.get("n_skipped", 0))
        damage.add(batch["damaged_shards"])
        out, losses, metrics = train_step(run, on_device(run, batch, online_teacher))
        run.step += 1
        run.window.steps += 1
        if profiler is not None:
            profiler.step()
        stop_check, log, last = (run.step % cfg.checkpoint.stop_check_every == 0, run.step % cfg.logging.every == 0,
                                 run.step == cfg.optim.steps)
        if stop_check or log:
            damage.check(run.device)
            stop_if_nonfinite_in_a_row(run, losses)
        if log or last:
            scalars = log_window(run, metrics, out, damage.count)
            last_losses = {k.split("/")[-1]: v for k, v in scalars.items() if k.startswith("loss/")} or last_losses
            window_rates.append(scalars["perf/samples_per_s"])
        stopping = stop_check and stop.agreed(run.device)
        if run.step % cfg.checkpoint.every == 0 or last or stopping:
            save_checkpoint(run)
        if stopping:
            report_stop(run, stop)
            return {"step": run.step, "losses": last_losses, "stopped": True}
    if profiler is not None:
        profiler.stop()
    seconds = time.perf_counter() - start
    return finish(run, {
        "step": run.step, "losses": last_losses, "train_seconds": seconds,
        "samples_per_s_steady": steady_rate(window_rates),
        "samples_per_s_run_average": (run.step - first_step) * cfg.data.batch_size * run.world_size / seconds})


def report_stop(run: Run, stop: StopSignal) -> None:
    """Rank 0 says where the stopped run's checkpoint is, and leaves the note launch/slurm.sbatch requeues on."""
    if run.rank != 0:
        return
    note = (f"stop signal ({stop.received or 'on another rank'}): checkpoint of step {run.step} saved in "
            f"{checkpoint_dir(run.cfg)}; resume with checkpoint.resume=auto")
    print(f"[cid_ds] {note}", flush=True)
    if os.environ.get("CID_DS_STOP_NOTE"):
        with open(os.environ["CID_DS_STOP_NOTE"], "w") as f:
            f.write(note + "\n")


def finish(run: Run, results: dict[str, Any]) -> dict[str, Any]:
    """The trained run's end: rank 0 exports and evaluates the student and writes results.json, with the
    evaluation in TensorBoard too."""
    import torch.distributed as dist
    dist.barrier()
    if run.rank == 0:
        results.update(export_and_evaluate(run.cfg))
        write_json(os.path.join(run.cfg.output_dir, "results.json"), results)
        if run.writer is not None:
            for set_name, metrics in results.get("eval", {}).items():
                for metric, value in metrics.items():
                    if isinstance(value, (int, float)) and metric != "samples":
                        run.writer.add_scalar(f"eval/{set_name}/{metric}", value, run.step)
            run.writer.close()
    dist.barrier()
    return results


def train_step(run: Run, batch: Batch) -> tuple[dict, dict, dict]:
    """Step ``run.step`` on a batch already on the device: forward, every loss term, the non-finite verdict,
    backward, the engine's step and the classifier's (a non-finite step leaves everything as it was,
    cid_ds.step_guard). Returns the student's outputs, the losses and the metrics. With fused AdamW it reads nothing
    back from the device (tests/test_step_syncs.py counts it)."""
    cfg = run.cfg
    if cfg.perf.cuda_graphs:  # a new step: the last step's graph outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    fusion_inputs = tuple(run.targets.combine(batch[k]).to(run.dtype) for k in ("t_img", "t_txt")) \
        if cfg.loss.afd > 0 else ()
    out = run.engine(batch["image"], batch["tokens"], *fusion_inputs)
    losses, metrics = compute_losses(cfg, out, batch, run.cluster_term, run.step, run.targets)
    weights = loss_weights(cfg, run.step)
    run.guard.backward_and_step(run.engine, sum(weights[k] * v for k, v in losses.items()), losses)
    if run.cluster_term is not None:
        run.cluster_term.step(run.step, run.guard.skip)
    return out, losses, metrics


def steady_rate(window_rates: list[float]) -> Optional[float]:
    """The median samples/s of the logging windows after the first (whose time holds the loader's start and
    the first steps' warm-up); None with a single window."""
    return statistics.median(window_rates[1:]) if len(window_rates) > 1 else None


def stop_if_nonfinite_in_a_row(run: Run, losses: dict) -> None:
    """Save a checkpoint and end the job when ``checkpoint.max_nonfinite_in_a_row`` steps in a row were skipped
    (read here, at a stop check: the steps themselves never wait for the device)."""
    in_a_row = run.guard.longest_run()
    if in_a_row < run.cfg.checkpoint.max_nonfinite_in_a_row:
        return
    save_checkpoint(run)
    now = sorted(k for k, v in losses.items() if not torch.isfinite(v))
    raise SystemExit(f"[cid_ds] rank {run.rank}: {in_a_row} steps in a row with a non-finite loss or gradient norm "
                     f"by step {run.step}" + (f" (non-finite now: {now})" if now else "") + f"; stopped, the weights "
                     f"(which skipped steps leave as they were) saved in {checkpoint_dir(run.cfg)} as step {run.step}")


def log_window(run: Run, metrics: dict, out: dict, damaged_shards: int) -> dict[str, float]:
    """Read scalars once per logging window (each read is a device sync): the losses averaged over the window's
    applied steps and over ranks (none when every step was skipped), the last step's ``metrics``, and the
    counters; then a new window. Returns them by their TensorBoard names (written by rank 0). ``damaged_shards``:
    the run's so far, over every rank (cid_ds.data.damage.RunDamage)."""
    import torch.distributed as dist
    window, world_size = run.window, run.world_size
    elapsed = time.perf_counter() - window.t0
    losses, skipped, applied = run.guard.take_window()
    # skipped and applied are the same on every rank (the verdict is global): their mean over ranks is themselves
    averaged = {f"loss/{k}": v for k, v in losses.items()} | metrics | {"skipped": skipped, "applied": applied}
    names = sorted(averaged)
    values = torch.stack([averaged[k].detach().float().reshape(()) for k in names])
    dist.all_reduce(values)
    values = (values / world_size).tolist()
    rank_rate = torch.tensor([window.steps * run.cfg.data.batch_size / elapsed], device=run.device)
    rates = [torch.zeros_like(rank_rate) for _ in range(world_size)]
    dist.all_gather(rates, rank_rate)
    scalars = dict(zip(names, values))
    skipped, applied = round(scalars.pop("skipped")), scalars.pop("applied")
    if not applied:
        scalars = {k: v for k, v in scalars.items() if not k.startswith("loss/")}
    scalars.update({
        "train/lr": run.engine.get_lr()[0],
        "train/logit_scale": float(out["logit_scale"].detach()),
        **{f"train/{k}": float(out[k].detach()) for k in ("cross_logit_scale", "fusion_logit_scale") if k in out},
        "perf/samples_per_s": float(sum(r.item() for r in rates)),
        "perf/data_wait_fraction": window.data_wait / elapsed,
        "perf/memory_gib": memory_bytes(run.device) / 2**30,
        "data/skipped_samples": window.skipped,
        "data/damaged_shards": damaged_shards,
        "train/nonfinite_steps_skipped": skipped,
    })
    scalars.update({f"perf/samples_per_s_rank{r}": rates[r].item() for r in range(world_size)})
    if run.writer is not None:
        for k, v in scalars.items():
            run.writer.add_scalar(k, v, run.step)
        run.writer.flush()
        shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in scalars.items() if k.startswith("loss/"))
        print(f"[cid_ds] step {run.step}/{run.cfg.optim.steps} {shown} lr={scalars['train/lr']:.3g} "
              f"{scalars['perf/samples_per_s']:.0f} samples/s data_wait={scalars['perf/data_wait_fraction']:.0%}",
              flush=True)
    run.window = Window()
    return scalars


def export_and_evaluate(cfg: Config) -> dict[str, Any]:
    """Export the final checkpoint as an open_clip folder and evaluate that folder: what users get."""
    from cid_ds.evaluate import evaluate
    from cid_ds.export import export_checkpoint
    from cid_ds.models import create_model
    export_dir = os.path.join(cfg.output_dir, "export")
    export_checkpoint(checkpoint_dir(cfg), cfg.model.student, export_dir, pretrained=cfg.model.student_pretrained)
    results: dict[str, Any] = {"export": export_dir}
    if cfg.eval.at_end and cfg.eval.sets:
        model, _, preprocess_val, tokenizer = create_model(f"local-dir:{export_dir}")
        results["eval"] = evaluate(model, preprocess_val, tokenizer, cfg.eval.sets, batch_size=cfg.eval.batch_size)
        print(f"[cid_ds] eval: {json.dumps(results['eval'])}", flush=True)
    return results


def main(argv: Optional[list[str]] = None, stop: Optional[StopSignal] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3")
    args = parser.parse_args(argv)
    stop = stop or StopSignal()
    try:
        cfg = load_config(args.config, args.overrides)
        check_sources(cfg, config_source(args.config, args.overrides))
        results = run(cfg, stop)
    except ConfigError as e:  # a setting or input the run cannot use, found before or after start-up
        raise SystemExit(f"config error: {e}") from None
    except DataError as e:  # input data the run cannot use (too much damage, too few samples for a batch)
        raise SystemExit(f"data error: {e}") from None
    return results


def process_main(stop: Optional[StopSignal] = None) -> None:
    """``main`` as a process of its own (the launcher's rank, ``python -m cid_ds.train``): whatever the run
    left running (loader workers, threads, the process group's teardown), the process ends within
    ``EXIT_SECONDS`` of it."""
    try:
        main(stop=stop)
    except BaseException:
        exit_within(EXIT_SECONDS, 1)
        raise
    exit_within(EXIT_SECONDS, 0)
    if torch.distributed.is_initialized():  # NCCL warns of leaked resources at exit otherwise
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    process_main()
