"""What keeps a multi-day job alive: a stop signal turned into a checkpoint at a step boundary, and
checkpoints that are only trusted once complete.

* SIGTERM / SIGINT / SIGUSR1 (SLURM sends USR1 ahead of preemption with ``--signal=USR1@120``; launch/
  supervise.py forwards all three from the launcher to the ranks) set a flag; every ``stop_check_every``
  steps the ranks all-reduce it, so all of them stop after the same step, save one checkpoint together and
  exit 0. DataLoader workers ignore these signals: a terminal or DeepSpeed's own launcher signals the whole
  process tree, and the main process, not its workers, decides when to stop. Once stopped, a rank's exit is
  bounded (``exit_within``): workers or loader threads stuck in a read cannot keep it alive.
* A checkpoint is complete when ``checkpoint_complete.json`` (every file of the tag and its size,
  written by rank 0 after all ranks saved) is present and every size still matches. ``resume: auto``
  takes the newest complete one, whatever DeepSpeed's ``latest`` says: a save cut short by a node
  failure or a full disk is passed over.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Optional

import psutil

from cid_ds.io import read_json, write_json

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
COMPLETE = "checkpoint_complete.json"


class StopSignal:
    def __init__(self) -> None:
        self.received: Optional[str] = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device) -> bool:
        """True on every rank when any rank received a stop signal (a collective: call on all ranks)."""
        import torch  # here, not at the top: the rank's entry point installs the handler before torch's import
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.received else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: leave stopping to the main process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_within(seconds: float, status: int) -> None:
    """Make sure this process ends ``seconds`` from now with ``status``: its child processes (loader workers)
    are killed and the interpreter's own shutdown (joining worker processes and threads) is cut short.
    A daemon thread, so a shutdown that finishes sooner is not held up."""
    def deadline() -> None:
        time.sleep(seconds)
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        print(f"[cid_ds] exit took longer than {seconds:.0f} s (a loader worker or thread stuck): "
              "killed its workers and left", file=sys.stderr, flush=True)
        os._exit(status)
    threading.Thread(target=deadline, name="exit_within", daemon=True).start()


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
