"""Checkpoints: where they live, saving, completion, rotation, the layout check and resume, and each rank's
position in the data saved beside them.

* A checkpoint is complete when ``checkpoint_complete.json`` (every file of the tag and its size, written by
  rank 0 after all ranks saved) is present and every size still matches. ``resume: auto`` takes the newest
  complete one, whatever DeepSpeed's ``latest`` says: a save cut short by a node failure or a full disk is
  passed over. ``latest`` and the rotation of old checkpoints come only after the marker.
* A rank whose checkpoint write fails (ENOSPC, EROFS, EIO) records the failure and still goes through every
  collective of DeepSpeed's save; the ranks then agree on the failure, so all of them stop with the path and
  the free space instead of one raising while the others wait in a barrier.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
from typing import Any, Callable, Iterator, Optional

import torch

from cid_ds.config import Config, ConfigError
from cid_ds.io import atomic_path, free_space, fsync_file, read_json, write_json
from cid_ds.run_state import DataPosition, Run

COMPLETE = "checkpoint_complete.json"
LATEST = "latest"  # DeepSpeed's name for the file holding the newest tag
WRITE_ERRORS = (OSError, RuntimeError)  # torch.save reports a failed write as a RuntimeError


def checkpoint_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def mark_complete(tag_dir: str, about: Optional[dict] = None) -> None:
    """Write the completion marker: every file's size, and ``about`` (how the checkpoint was made)."""
    sizes = {name: os.path.getsize(os.path.join(tag_dir, name)) for name in sorted(os.listdir(tag_dir))
             if name != COMPLETE and os.path.isfile(os.path.join(tag_dir, name))}
    write_json(os.path.join(tag_dir, COMPLETE), {"files": sizes, **(about or {})})


def checkpoint_about(tag_dir: str) -> dict:
    """What ``mark_complete`` recorded besides the files: empty for an older checkpoint, and for one without
    a marker (``checkpoint.resume`` may name any DeepSpeed checkpoint directory)."""
    marker = os.path.join(tag_dir, COMPLETE)
    if not os.path.isfile(marker):
        return {}
    return {k: v for k, v in read_json(marker).items() if k != "files"}


def bf16_mode_of_files(tag_dir: str) -> Optional[bool]:
    """Whether DeepSpeed's bf16 mode saved a checkpoint, by the names of its ZeRO optimizer files
    (``bf16_zero_pp_rank_*`` or ``zero_pp_rank_*``); None where there are none (no ZeRO)."""
    names = os.listdir(tag_dir)
    if any(name.startswith("bf16_zero_pp_rank_") for name in names):
        return True
    if any(name.startswith("zero_pp_rank_") for name in names):
        return False
    return None


def is_complete(tag_dir: str) -> bool:
    marker = os.path.join(tag_dir, COMPLETE)
    if not os.path.isfile(marker):
        return False
    try:
        sizes = read_json(marker)["files"]
    except (ValueError, KeyError, TypeError):
        return False
    return all(os.path.isfile(os.path.join(tag_dir, name)) and os.path.getsize(os.path.join(tag_dir, name)) == size
               for name, size in sizes.items())


def newest_complete_tag(root: str) -> Optional[str]:
    """The newest ``step*`` checkpoint under ``root`` that is complete, or None."""
    if not os.path.isdir(root):
        return None
    tags = sorted((t for t in os.listdir(root) if t.startswith("step")), reverse=True)
    return next((t for t in tags if is_complete(os.path.join(root, t))), None)


def step_tags(root: str) -> list[str]:
    """The checkpoint folders (``step*``) under ``root``, oldest first."""
    return sorted(t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t)))


def stale_tags(root: str, keep: int) -> list[str]:
    """The ``step*`` tags under ``root`` to delete once the newest is complete: complete ones beyond the newest
    ``keep``, and incomplete ones older than the newest complete one (never counted toward ``keep``)."""
    tags = step_tags(root)
    complete = [t for t in tags if is_complete(os.path.join(root, t))]
    if not complete:
        return []
    kept = set(complete[-keep:])
    return [t for t in tags if t not in kept and (t in complete or t < complete[-1])]


def complete_and_rotate(root: str, tag: str, about: dict, keep: int) -> None:
    """Once every rank saved ``tag``: its completion marker, then DeepSpeed's ``latest`` pointing at it (the
    export's default), then the stale tags deleted."""
    mark_complete(os.path.join(root, tag), about)
    with atomic_path(os.path.join(root, LATEST)) as tmp, open(tmp, "w") as f:
        f.write(tag)
    for stale in stale_tags(root, keep):
        shutil.rmtree(os.path.join(root, stale), ignore_errors=True)


def recorded(failures: list[str], path: str, write: Callable[[], Any]) -> None:
    """Call ``write()``, which writes ``path``; a failure is appended to ``failures`` instead of raised."""
    try:
        write()
    except WRITE_ERRORS as e:
        failures.append(f"{path}: {e}")


def _save_synced(save: Callable, state_dict: Any, path: str) -> None:
    save(state_dict, path)
    fsync_file(path)  # the completion marker must not reach the disk before the file's bytes


@contextlib.contextmanager
def recording_write_failures(engine) -> Iterator[list[str]]:
    """Within the block, the writes of ``engine.save_checkpoint`` (its files, folders and rank 0's copy of
    the zero_to_fp32 scripts) record their failures in the yielded list instead of raising them."""
    checkpoint_engine, failures = engine.checkpoint_engine, []
    save, makedirs = checkpoint_engine.save, checkpoint_engine.makedirs
    copy_scripts = engine._copy_recovery_script
    checkpoint_engine.save = lambda state_dict, path: recorded(
        failures, path, lambda: _save_synced(save, state_dict, path))
    checkpoint_engine.makedirs = lambda path, exist_ok=False: recorded(
        failures, path, lambda: makedirs(path, exist_ok=exist_ok))
    engine._copy_recovery_script = lambda path: recorded(failures, path, lambda: copy_scripts(path))
    try:
        yield failures
    finally:  # the instance attributes shadowed the class's methods
        del checkpoint_engine.save, checkpoint_engine.makedirs, engine._copy_recovery_script


def stop_if_any_rank_failed(failures: list[str], tag_dir: str, rank: int, device: torch.device) -> None:
    """All ranks learn whether any failed to write ``tag_dir`` (a collective, which also serves as a
    barrier); on failure rank 0 removes the incomplete tag, and every rank exits naming it."""
    import torch.distributed as dist
    failed = torch.tensor([float(bool(failures))], device=device)
    dist.all_reduce(failed, dist.ReduceOp.MAX)
    if not failed.item():
        return
    what = "; ".join(failures) if failures else "the write failed on another rank (see its message)"
    message = (f"[cid_ds] rank {rank}: checkpoint {tag_dir} could not be saved: {what} ({free_space(tag_dir)}); "
               "stopped; the incomplete checkpoint was removed, resume takes the newest complete one")
    if rank == 0:
        shutil.rmtree(tag_dir, ignore_errors=True)
    raise SystemExit(message)


def save_checkpoint(run: Run) -> None:
    """The run at its step: every rank writes its files; once all have, rank 0 marks the checkpoint complete,
    points ``latest`` at it and only then deletes the stale ones. A failed write on any rank stops every rank,
    naming the path. A complete checkpoint of the step is kept as it is: no update happened since (a stop after
    non-finite steps), and writing over it could lose the only good checkpoint to a full disk."""
    import torch.distributed as dist
    engine, cfg, rank, step = run.engine, run.cfg, run.rank, run.step
    tag = f"step{step:08d}"
    root = checkpoint_dir(cfg)
    tag_dir = os.path.join(root, tag)
    complete_everywhere = torch.tensor([float(is_complete(tag_dir))], device=engine.device)
    dist.all_reduce(complete_everywhere, dist.ReduceOp.MIN)  # every rank takes the same branch
    if complete_everywhere.item():
        return
    position_file = os.path.join(tag_dir, f"data_position_rank{rank}.json")
    with recording_write_failures(engine) as failures:
        recorded(failures, position_file, lambda: write_json(position_file, run.position.state()))
        if run.cluster_term is not None:
            recorded(failures, tag_dir, lambda: run.cluster_term.save(tag_dir))
        engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    stop_if_any_rank_failed(failures, tag_dir, rank, engine.device)
    if rank == 0:
        about = {"zero_stage": engine.zero_optimization_stage(), "bf16_mode": engine.bfloat16_enabled(),
                 "world_size": dist.get_world_size(), "batch_size": cfg.data.batch_size}
        recorded(failures, tag_dir, lambda: complete_and_rotate(root, tag, about, cfg.checkpoint.keep))
    stop_if_any_rank_failed(failures, tag_dir, rank, engine.device)


def check_checkpoint_layout(tag_dir: str, zero_stage: int, bf16_mode: bool, ds_path: str) -> None:
    """DeepSpeed cannot load a checkpoint into an engine of another layout: it fails deep inside, or starts the
    optimizer afresh. A ZeRO checkpoint keeps the optimizer state in per-rank partitions, one without ZeRO as a
    whole; and DeepSpeed's bf16 mode saves its own optimizer files (``bf16_zero_pp_rank_*``), which an engine
    without it (torch autocast, or fp32 on CPU) does not look for. With bf16 the file names do not tell the
    ZeRO stage apart, so the completion marker records both; a checkpoint from before that is judged by its
    file names where they tell."""
    about = checkpoint_about(tag_dir)
    saved = about.get("zero_stage")
    if saved is not None and (saved > 0) != (zero_stage > 0):
        raise ConfigError(f"checkpoint.resume: {tag_dir} was saved " + (
            f"with ZeRO stage {saved}" if saved else "without ZeRO (stage 0)") + f", but deepspeed_config "
            f"{ds_path} runs ZeRO stage {zero_stage}: resume with a JSON of the kind it was saved with (the "
            "run's config.yaml names it)")
    saved_bf16 = about.get("bf16_mode", bf16_mode_of_files(tag_dir))
    if saved_bf16 is not None and saved_bf16 != bf16_mode:
        raise ConfigError(
            f"checkpoint.resume: {tag_dir} was saved in DeepSpeed's bf16 mode, and deepspeed_config {ds_path} "
            "does not run it (on CPU the trainer turns bf16 off): resume on GPUs with a JSON that sets \"bf16\": "
            "{\"enabled\": true} (ds_configs' zero0/1/2.json did before they moved to torch autocast)"
            if saved_bf16 else
            f"checkpoint.resume: {tag_dir} was saved without DeepSpeed's bf16 mode, and deepspeed_config {ds_path} "
            "runs it: resume with a JSON without it (torch_autocast, as ds_configs' zero0/1/2.json)")


def saved_world_size(tag_dir: str) -> int:
    """How many ranks saved ``tag_dir``: the marker's record, else its per-rank data positions."""
    recorded_size = checkpoint_about(tag_dir).get("world_size")
    return int(recorded_size) if recorded_size else len(glob.glob(os.path.join(tag_dir, "data_position_rank*.json")))


def incomplete_tags(root: str) -> list[str]:
    return [t for t in step_tags(root) if not is_complete(os.path.join(root, t))] if os.path.isdir(root) else []


def resume(run: Run) -> tuple[int, DataPosition]:
    """Load the newest checkpoint into the run's engine and cluster term if ``checkpoint.resume`` asks to; return
    (next step, data position). A checkpoint saved by another number of ranks is loaded too: with ZeRO 1/2
    through DeepSpeed's universal checkpoint (``load_on_another_world_size``)."""
    from cid_ds.safe_load import load_deepspeed_files_safely, refuse_code_in_checkpoint
    engine, cfg, rank = run.engine, run.cfg, run.rank
    if cfg.checkpoint.resume == "none":
        return 0, DataPosition()
    root = cfg.checkpoint.resume if cfg.checkpoint.resume != "auto" else checkpoint_dir(cfg)
    tag = None
    if cfg.checkpoint.resume != "auto" and os.path.basename(os.path.normpath(root)).startswith("step"):
        root, tag = os.path.split(os.path.normpath(root))
    if tag is None:
        tag = newest_complete_tag(root)
        if tag is None:
            if cfg.checkpoint.resume != "auto":
                raise ConfigError(f"checkpoint.resume: no complete checkpoint in {root}")
            passed_over = incomplete_tags(root)
            if passed_over:  # a requeued job must not start over silently, nor rotate these away
                raise ConfigError(
                    f"checkpoint.resume: auto found only incomplete checkpoints in {root} ({', '.join(passed_over)}: "
                    f"a file missing or of another size than its {COMPLETE} records, or no marker), none to resume "
                    "from. To start again from step 0 set checkpoint.resume=none (its first save deletes them)")
            return 0, DataPosition()
    tag_dir = os.path.join(root, tag)
    zero_stage = engine.zero_optimization_stage()
    check_checkpoint_layout(tag_dir, zero_stage, engine.bfloat16_enabled(), cfg.deepspeed_config)
    refuse_code_in_checkpoint(tag_dir)
    load_deepspeed_files_safely(engine)
    import torch.distributed as dist
    saved_ranks, world_size = saved_world_size(tag_dir), dist.get_world_size()
    if zero_stage > 0 and saved_ranks != world_size:
        client = load_on_another_world_size(engine, root, tag, saved_ranks, rank, cfg.deepspeed_config)
    else:
        path, client = engine.load_checkpoint(root, tag=tag)
        if path is None:
            raise RuntimeError(f"checkpoint.resume: could not load the checkpoint {tag_dir}")
    if run.cluster_term is not None:
        run.cluster_term.load(tag_dir)
    return int(client["step"]), data_position(tag_dir, rank, saved_ranks, world_size, cfg.data.batch_size)


def load_on_another_world_size(engine, root: str, tag: str, saved_ranks: int, rank: int, ds_path: str) -> dict:
    """Load a ZeRO 1/2 checkpoint of ``saved_ranks`` ranks into this engine of another number. ZeRO keeps the
    optimizer state as flat per-rank partitions padded for that rank count; DeepSpeed's universal checkpoint
    (``ds_to_universal``) stores it per parameter, which any rank count can slice. Rank 0 converts the tag into
    ``root/universal-TAG`` (the original is left as it was), every rank loads it, and the converted copy is
    removed once loaded: the next save is in this world size's own layout."""
    import torch.distributed as dist
    stage = engine.zero_optimization_stage()
    if stage > 2:
        raise ConfigError(f"checkpoint.resume: {os.path.join(root, tag)} was saved by {saved_ranks} ranks and this "
                          f"run has {dist.get_world_size()}: with ZeRO stage 3 ({ds_path}) resume on {saved_ranks} "
                          "ranks (the rank count changes with ZeRO 0, 1 and 2)")
    universal = os.path.join(root, f"universal-{tag}")
    failure = None
    if rank == 0:
        print(f"[cid_ds] {os.path.join(root, tag)} was saved by {saved_ranks} ranks, this run has "
              f"{dist.get_world_size()}: converting it to DeepSpeed's universal checkpoint in {universal}", flush=True)
        try:
            to_universal(os.path.join(root, tag), os.path.join(universal, tag))
        except Exception as e:  # shared, or the other ranks would wait for this one in the barrier below
            failure = f"{type(e).__name__}: {e}"
    failures: list = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    if any(failures):
        raise ConfigError(f"checkpoint.resume: {os.path.join(root, tag)} could not be converted to a universal "
                          f"checkpoint for {dist.get_world_size()} ranks: {next(f for f in failures if f)}")
    engine._config.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(universal, tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
    dist.barrier()
    if rank == 0:
        shutil.rmtree(universal, ignore_errors=True)
    if path is None:
        raise RuntimeError(f"checkpoint.resume: could not load the universal checkpoint {universal}")
    return client


def to_universal(tag_dir: str, out_dir: str) -> None:
    """DeepSpeed's ``ds_to_universal`` of ``tag_dir`` into ``out_dir`` (written beside it, then renamed).
    ``inject_missing_state``: ZeRO 1/2 engines outside Megatron save no ``universal_checkpoint_info``."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    shutil.rmtree(out_dir + ".tmp", ignore_errors=True)
    ds_to_universal(Namespace(input_folder=tag_dir, output_folder=out_dir + ".tmp", num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(out_dir + ".tmp", out_dir)


def data_position(tag_dir: str, rank: int, saved_ranks: int, world_size: int, batch_size: int) -> DataPosition:
    """This rank's place in the data. With the rank count of the save, its own saved position. With another,
    the shards split over ranks differently, so no rank can continue another's sequence: every rank starts in
    the epoch the run was in (the earliest of the saved ranks'), past the share of it already consumed."""
    own = os.path.join(tag_dir, f"data_position_rank{rank}.json")
    if saved_ranks == world_size and os.path.isfile(own):
        return DataPosition(**read_json(own))
    saved = [read_json(p) for p in sorted(glob.glob(os.path.join(tag_dir, "data_position_rank*.json")))]
    if not saved:
        return DataPosition()
    epoch = min(p["epoch"] for p in saved)
    saved_batch = checkpoint_about(tag_dir).get("batch_size", batch_size)
    consumed = sum(p["batch_in_epoch"] for p in saved if p["epoch"] == epoch) * saved_batch
    position = DataPosition(epoch, consumed // (batch_size * world_size))
    if rank == 0:
        print(f"[cid_ds] data position: saved by {len(saved)} ranks, resumed by {world_size}: epoch {epoch}, "
              f"{position.batch_in_epoch} batches into it on each rank ({consumed} samples of it consumed)", flush=True)
    return position
