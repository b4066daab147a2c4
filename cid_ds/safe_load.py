"""Loading weights without running code: a ``torch.save`` file is a pickle, and a pickle may name any function
to call while it loads. Every ``.pt`` file the project takes from outside (resume, export, ``--pretrained``,
centroid shards) is loaded by torch's ``weights_only`` unpickler, which builds only tensors, containers and the
few DeepSpeed classes listed here; any other name refuses the file, naming it.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
import zipfile
from typing import Any, Sequence

import torch

from cid_ds.config import ConfigError


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
