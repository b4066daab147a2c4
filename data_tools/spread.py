"""How an offline stage spreads over processes: through the launchers the trainer uses.

A stage started as N processes reads its place from the launcher's environment, RANK and WORLD_SIZE
(``deepspeed``, ``torchrun``, launch/slurm.sbatch's ranks) or, in an ``srun`` step, SLURM_PROCID and
SLURM_NTASKS; on one machine ``python -m data_tools.spread -n N -- python -m data_tools.pack ...`` starts them.
Each process takes a disjoint share of the stage's units of work (source shards ``shards[rank::world]``, a
contiguous block of output shards, the parts of a hierarchical k-means fit), writes one file per unit
(atomically; a unit whose file exists is done), and whichever process finds every unit done at its end writes
the complete manifest. A process waits for another only where it needs what that one makes (process 0's k-means
sample and centroids, the parts of the fit), so any process count resumes any interrupted run, and the files
are the same bytes whatever the count. Why this model rather than SLURM job arrays: it is the same on every
scheduler and on one machine, the GPU of a process is its LOCAL_RANK as in training, and it needs no separate
finishing job.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, TypeVar

from cid_ds.io import read_manifest

T = TypeVar("T")


@dataclass(frozen=True)
class Share:
    """Process ``rank`` of ``world``."""
    rank: int = 0
    world: int = 1

    def mine(self, units: Sequence[T]) -> list[T]:
        """Every ``world``-th unit, from ``rank``: for units of similar cost in any order."""
        return list(units[self.rank::self.world])

    def block(self, units: Sequence[T]) -> list[T]:
        """A contiguous ``1/world`` of the units: for units whose cost depends on their neighbours (packed shards
        that share a source tar, each read from its start up to its last sample)."""
        return list(units[len(units) * self.rank // self.world:len(units) * (self.rank + 1) // self.world])

    def __str__(self) -> str:
        return f"process {self.rank} of {self.world}"


def accept_local_rank(parser: argparse.ArgumentParser) -> None:
    """The ``--local_rank`` the deepspeed launcher passes every process it starts (a stage reads its place from
    RANK and WORLD_SIZE, share_from_env)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def share_from_env(env: Optional[dict] = None) -> Share:
    """This process's share: RANK/WORLD_SIZE, else an srun step's SLURM_PROCID/SLURM_NTASKS, else the whole."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE")
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS")
    else:
        return Share()
    try:
        share = Share(int(env[names[0]]), int(env[names[1]]))
    except (KeyError, ValueError):
        raise ValueError(f"{names[0]}={env.get(names[0])!r} and {names[1]}={env.get(names[1])!r}: both must be "
                         "set, as integers") from None
    if not 0 <= share.rank < share.world:
        raise ValueError(f"{names[0]}={share.rank} is not a rank of {names[1]}={share.world}")
    return share


def wait_for(done: Callable[[], bool], message: str, poll_seconds: float = 2.0) -> None:
    """Poll ``done`` until it holds, saying ``message`` once if it does not at first: a process that needs what
    another writes (process 0's k-means fit, a stage the last process completes). A launcher ends every
    process when one fails, so none waits for a dead one."""
    said = False
    while not done():
        if not said:
            print(message, flush=True)
            said = True
        time.sleep(poll_seconds)


def complete_manifest(out_dir: str, share: Share, stage: str) -> dict:
    """``out_dir``'s manifest once a process has completed it (``complete`` true), waiting for it."""
    wait_for(lambda: (read_manifest(out_dir) or {}).get("complete", False),
             f"{stage}: {share} waits for the other processes to complete {out_dir}")
    return read_manifest(out_dir)


def cpus_per_process(env: Optional[dict] = None) -> int:
    """The CPUs this process may use, shared with the other processes on its machine (LOCAL_WORLD_SIZE from
    torchrun and run_local, LOCAL_SIZE from the deepspeed launcher and launch/slurm.sbatch,
    SLURM_NTASKS_PER_NODE in an srun step): a stage's default worker pool per process."""
    env = os.environ if env is None else env
    local = next((int(env[name]) for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
                  if env.get(name, "").isdigit() and int(env[name]) > 0), 1)
    return max(1, len(os.sched_getaffinity(0)) // local)


def process_device(device: str) -> str:
    """``auto`` or ``cuda``: this process's GPU, its local rank (LOCAL_RANK, or SLURM_LOCALID in an srun step)
    modulo the GPUs it sees (under srun --gpus-per-task=1 each process sees its own GPU as cuda:0), or the CPU
    when there is none; any other device as it is."""
    if device not in ("auto", "cuda"):
        return device
    import torch
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def own_gpu(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with CUDA_VISIBLE_DEVICES cut to this process's GPU: of the devices it lists, the one at its local
    rank (LOCAL_RANK, or SLURM_LOCALID), modulo their number. A launcher that shows each process every GPU of
    the machine (deepspeed's, this module's) would leave faiss using all of them in every process: N processes
    on N GPUs each. Unchanged where it lists one device or none, or no local rank is set. Only effective before
    the process first touches CUDA."""
    devices = [device for device in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if device.strip()]
    local_rank = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", ""))
    if len(devices) < 2 or not local_rank.isdigit():
        return dict(env)
    return dict(env, CUDA_VISIBLE_DEVICES=devices[int(local_rank) % len(devices)])


def keep_own_gpu() -> None:
    """This process's environment cut to its own GPU (``own_gpu``): a stage's first step, before anything touches
    CUDA, so that a launcher that shows every process all GPUs (deepspeed's) gives each its own."""
    os.environ.update(own_gpu(os.environ))


def visible_gpus() -> str:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES lists them: the variable's value where it is set, else one
    index per GPU ``nvidia-smi -L`` lists (none without it). Not torch's count: it would cost the launcher a
    torch import (seconds, and ~300 MiB held while it waits), and the indices only need to be distinct."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return os.environ["CUDA_VISIBLE_DEVICES"]
    if shutil.which("nvidia-smi") is None:
        return ""
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")] if listed.returncode == 0 else []
    return ",".join(map(str, range(len(gpus))))


def run_local(command: list[str], processes: int) -> None:
    """``command`` as ``processes`` processes on this machine (RANK, WORLD_SIZE, LOCAL_RANK set, each its own GPU
    where there are GPUs: ``own_gpu``); waits for all. When one fails the others are ended (as a launcher does: a
    process may be waiting for the failed one's work), and the error names it."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    gpus = visible_gpus()
    gpus = {"CUDA_VISIBLE_DEVICES": gpus} if gpus else {}
    started = [subprocess.Popen(command, env=own_gpu(dict(os.environ, RANK=str(r), LOCAL_RANK=str(r),
                                                          WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
                                                          **gpus)))
               for r in range(processes)]
    while True:
        codes = [p.poll() for p in started]  # every one polled: a later process's failure must not wait for an earlier
        failed = next(((r, code) for r, code in enumerate(codes) if code not in (None, 0)), None)
        if failed or None not in codes:
            break
        time.sleep(0.2)
    for p in started:
        if p.poll() is None:
            p.terminate()
        p.wait()
    if failed:
        raise RuntimeError(f"{' '.join(command)}: process {failed[0]} of {processes} exited with {failed[1]}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_tools.spread", description=__doc__.split("\n")[0],
                                     usage="python -m data_tools.spread -n N -- COMMAND ...")
    parser.add_argument("-n", "--processes", type=int, required=True, help="how many processes")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the stage's command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    try:
        run_local(command, args.processes)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"spread: {e}")


if __name__ == "__main__":
    main()
