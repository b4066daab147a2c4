"""Checkpoint files in and out.

* In: a ``torch.save`` file is a pickle, and a pickle may name any function to call while it loads. Every
  ``.pt`` file the project takes from outside (resume, export, ``--pretrained``, centroid shards) is loaded by
  torch's ``weights_only`` unpickler, which builds only tensors, containers and the few DeepSpeed classes
  listed here; any other name refuses the file, naming it.
* Out: a rank whose checkpoint write fails (ENOSPC, EROFS, EIO) records the failure and still goes through
  every collective of DeepSpeed's save; the ranks then agree on the failure, so all of them stop with the
  path and the free space instead of one raising while the others wait in a barrier.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import re
import shutil
import zipfile
from typing import Any, Callable, Iterator, Sequence

import torch

from cid_ds.config import ConfigError
from cid_ds.faults import is_complete, mark_complete
from cid_ds.io import atomic_path, free_space, fsync_file

LATEST = "latest"  # DeepSpeed's name for the file holding the newest tag


# loaded without unpickling: safetensors, and numpy's formats (open_clip's np.load keeps allow_pickle=False)
UNPICKLED_SUFFIXES = (".safetensors", ".npz", ".npy")


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file whose pickle would call something other than the allowed classes."""


def deepspeed_classes() -> tuple[type, ...]:
    """What DeepSpeed pickles besides tensors and containers (in its checkpoints of ZeRO 0-3, fp16, bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address


def load_weights(path: str, map_location: Any = "cpu", allowed: Sequence[type] = (), mmap: bool = False) -> Any:
    """``torch.load`` that runs no code from the file: tensors, containers and ``allowed`` only."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        called = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UnsafeCheckpoint(
            f"{path}: refused, its pickle calls {called.group(1) if called else 'something'} on load, which is "
            "not a tensor, a container or an allowed DeepSpeed class (a file that could run code is never "
            "loaded: re-save its weights from code you trust)") from None


def refuse_code(paths: Sequence[str], allowed: Sequence[type] = ()) -> None:
    """Unpickle each file with ``load_weights``, raising ``UnsafeCheckpoint`` for the first that calls code. A
    zip (torch's format since 1.6) is memory-mapped: only its pickle is read, not the tensor bytes."""
    for path in paths:
        load_weights(path, allowed=allowed, mmap=zipfile.is_zipfile(path))


def refuse_code_in_weights_file(path: str) -> None:
    """A ``--pretrained`` file: refused if a pickle that calls code (safetensors and numpy files hold none)."""
    if not path.endswith(UNPICKLED_SUFFIXES):
        refuse_code([path])


def checkpoint_files(tag_dir: str) -> list[str]:
    """Every pickle of a DeepSpeed checkpoint tag (its model, optimizer and centroid shard files)."""
    return sorted(glob.glob(os.path.join(tag_dir, "*.pt")))


def refuse_code_in_checkpoint(tag_dir: str) -> None:
    """Every rank checks its share of the tag's files, and every rank raises the first refusal any found
    (a collective: DeepSpeed's loader then runs on all ranks or on none)."""
    import torch.distributed as dist
    rank, world_size = dist.get_rank(), dist.get_world_size()
    refusal = None
    try:
        refuse_code(checkpoint_files(tag_dir)[rank::world_size], deepspeed_classes())
    except UnsafeCheckpoint as e:
        refusal = str(e)
    except Exception as e:  # unreadable (a cut zip, say): shared too, or the other ranks would wait for this one
        refusal = f"{tag_dir}: a checkpoint file cannot be read ({type(e).__name__}: {e})"
    refusals: list = [None] * world_size
    dist.all_gather_object(refusals, refusal)
    found = next((r for r in refusals if r is not None), None)
    if found is not None:
        raise UnsafeCheckpoint(f"checkpoint.resume: {found}")


def load_deepspeed_files_safely(engine) -> None:
    """DeepSpeed's checkpoint engine unpickles with ``weights_only=False``; route its loads through
    ``load_weights`` (every load of ``engine.load_checkpoint`` goes through ``checkpoint_engine.load``)."""
    allowed = deepspeed_classes()
    engine.checkpoint_engine.load = lambda path, map_location=None: load_weights(path, map_location, allowed)


WRITE_ERRORS = (OSError, RuntimeError)  # torch.save reports a failed write as a RuntimeError


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


def stale_tags(root: str, keep: int) -> list[str]:
    """The ``step*`` tags under ``root`` to delete once the newest is complete: complete ones beyond the newest
    ``keep``, and incomplete ones older than the newest complete one (never counted toward ``keep``)."""
    tags = sorted(t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t)))
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
