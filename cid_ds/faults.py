"""Stopping on a signal: a stop signal turned into a checkpoint at a step boundary, and an exit that cannot
hang (checkpoint completion and rotation: cid_ds.checkpoints).

* SIGTERM / SIGINT / SIGUSR1 (SLURM sends USR1 ahead of preemption with ``--signal=USR1@120``; launch/
  supervise.py forwards all three from the launcher to the ranks) set a flag; every ``stop_check_every``
  steps the ranks all-reduce it, so all of them stop after the same step, save one checkpoint together and
  exit 0. DataLoader workers ignore these signals: a terminal or DeepSpeed's own launcher signals the whole
  process tree, and the main process, not its workers, decides when to stop. Once stopped, a rank's exit is
  bounded (``exit_within``): workers or loader threads stuck in a read cannot keep it alive.
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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


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
