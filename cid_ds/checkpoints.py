"""Checkpoints: where they live, saving (every rank, then the completion marker, then rotation), the
layout check and resume, and each rank's position in the data saved beside them."""
from __future__ import annotations

import os

import torch

from cid_ds.config import Config, ConfigError
from cid_ds.faults import bf16_mode_of_files, checkpoint_about, is_complete, newest_complete_tag
from cid_ds.io import read_json, write_json

class DataPosition:
    """Where this rank is in the data: epoch and batches consumed in it. Saved per rank beside each
    checkpoint so a resume continues the same batch sequence (the loader's order is a function of
    seed, epoch, rank and worker count)."""

    def __init__(self, epoch: int = 0, batch_in_epoch: int = 0):
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


def checkpoint_dir(cfg: Config) -> str:
    return os.path.join(cfg.output_dir, "checkpoints")


def save_checkpoint(engine, cfg: Config, step: int, position: DataPosition, rank: int, cluster_term) -> None:
    """Every rank writes its files; once all have, rank 0 marks the checkpoint complete, points ``latest`` at it
    and only then deletes the stale ones. A failed write on any rank stops every rank, naming the path.
    A complete checkpoint of ``step`` is kept as it is: no update happened since (a stop after non-finite
    steps), and writing over it could lose the only good checkpoint to a full disk."""
    import torch.distributed as dist
    from cid_ds.checkpoint_io import complete_and_rotate, recorded, recording_write_failures, stop_if_any_rank_failed
    tag = f"step{step:08d}"
    root = checkpoint_dir(cfg)
    tag_dir = os.path.join(root, tag)
    complete_everywhere = torch.tensor([float(is_complete(tag_dir))], device=engine.device)
    dist.all_reduce(complete_everywhere, dist.ReduceOp.MIN)  # every rank takes the same branch
    if complete_everywhere.item():
        return
    position_file = os.path.join(tag_dir, f"data_position_rank{rank}.json")
    with recording_write_failures(engine) as failures:
        recorded(failures, position_file, lambda: write_json(position_file, position.state()))
        if cluster_term is not None:
            recorded(failures, tag_dir, lambda: cluster_term.save(tag_dir))
        engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    stop_if_any_rank_failed(failures, tag_dir, rank, engine.device)
    if rank == 0:
        about = {"zero_stage": engine.zero_optimization_stage(), "bf16_mode": engine.bfloat16_enabled()}
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


def resume(engine, cfg: Config, rank: int, cluster_term) -> tuple[int, DataPosition]:
    """Load the newest checkpoint if asked to; return (next step, data position)."""
    from cid_ds.checkpoint_io import load_deepspeed_files_safely, refuse_code_in_checkpoint
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
            return 0, DataPosition()
    tag_dir = os.path.join(root, tag)
    check_checkpoint_layout(tag_dir, engine.zero_optimization_stage(), engine.bfloat16_enabled(),
                            cfg.deepspeed_config)
    refuse_code_in_checkpoint(tag_dir)
    load_deepspeed_files_safely(engine)
    path, client = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"checkpoint.resume: could not load the checkpoint {tag_dir}")
    if cluster_term is not None:
        cluster_term.load(tag_dir)
    position_file = os.path.join(tag_dir, f"data_position_rank{rank}.json")
    if not os.path.isfile(position_file):  # saved by fewer ranks: this rank starts its data afresh
        print(f"[cid_ds] rank {rank}: no {position_file}, starting the data at epoch 0", flush=True)
        return int(client["step"]), DataPosition()
    return int(client["step"]), DataPosition(**read_json(position_file))
