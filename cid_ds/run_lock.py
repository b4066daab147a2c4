"""One run per output folder: rank 0 holds ``OUTPUT_DIR/run.lock`` while the run trains.

The lock names its holder (host, pid and the pid's start time, SLURM job and restart) and is a lease: the
holder renews its time every ``RENEW_SECONDS``. A second run on the folder is refused with the holder named,
unless the holder is gone, which is known
  - on the holder's own host: its pid is not running (or is another process by its start time);
  - for a requeued SLURM job (same job id, a later restart): SLURM starts a requeued job only after the
    previous run of it has ended; for another SLURM job: the controller says it ended;
  - anywhere else: the lease ran out (no renewal for ``LEASE_SECONDS``: a node lost with its processes).
Taking a stale lock over renames it first, which one taker wins; then it is created anew (O_EXCL).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from typing import Optional

import psutil

LOCK = "run.lock"
RENEW_SECONDS = 30.0
LEASE_SECONDS = 120.0
# a requeued job waits PENDING, and its earlier run may still be COMPLETING
SLURM_LIVE_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "PENDING",
                     "REQUEUED", "RESIZING", "REQUEUE_HOLD", "REQUEUE_FED", "STAGE_OUT"}


class OutputDirLocked(Exception):
    """Another run holds the output folder."""


def this_holder() -> dict:
    me = psutil.Process()
    return {"host": socket.gethostname(), "pid": me.pid, "pid_started": me.create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "since": time.time()}


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # torn or unreadable: judged by its age alone


def _pid_alive(holder: dict) -> bool:
    try:
        return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["pid_started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def slurm_job_state(job: str) -> Optional[str]:
    """The job's state as SLURM's controller knows it ("" once it forgot the job), or None without SLURM here."""
    try:
        found = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return "" if "Invalid job id" in found.stderr else None
    return found.stdout.strip()


def holder_is_gone(holder: dict, renewed_ago: float, me: dict) -> Optional[str]:
    """Why ``holder`` no longer holds the lock, or None while it may still run."""
    if holder.get("host") == me["host"] and "pid" in holder:
        return None if _pid_alive(holder) else f"its process {holder['pid']} on {holder['host']} has ended"
    if me["slurm_job"] is not None and holder.get("slurm_job") == me["slurm_job"] \
            and int(holder.get("slurm_restart", 0)) < me["slurm_restart"]:
        return f"SLURM requeued job {me['slurm_job']} (restart {me['slurm_restart']}): its earlier run has ended"
    if holder.get("slurm_job") and holder.get("slurm_job") != me["slurm_job"]:
        state = slurm_job_state(holder["slurm_job"])
        if state is not None and state not in SLURM_LIVE_STATES:
            return f"its SLURM job {holder['slurm_job']} is {state or 'gone'}"
    if renewed_ago > LEASE_SECONDS:
        return f"its lease ran out ({renewed_ago:.0f} s without renewal, the limit is {LEASE_SECONDS:.0f} s)"
    return None


def describe(holder: dict, renewed_ago: float) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, renewed {renewed_ago:.0f} s ago")


class RunLock:
    """``acquire`` or raise OutputDirLocked; renewed in the background until ``release``."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK)
        self.me = this_holder()
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns whose lock was taken over, and why (None for a free folder)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        taken_over = None
        while not self._create():
            holder = _read(self.path)
            if holder is None:  # released meanwhile
                continue
            renewed_ago = time.time() - os.path.getmtime(self.path)
            gone = holder_is_gone(holder, renewed_ago, self.me)
            if gone is None:
                raise OutputDirLocked(
                    f"{os.path.dirname(self.path)} is in use by another run ({describe(holder, renewed_ago)}; "
                    f"{self.path}): two runs would train and checkpoint into one folder. Stop that run, or "
                    f"choose another output_dir; a holder that is gone releases it by itself within "
                    f"{LEASE_SECONDS:.0f} s") from None
            # a rename succeeds for one taker only; the others find the winner's new lock and are refused
            stale = f"{self.path}.stale{os.getpid()}"
            try:
                os.rename(self.path, stale)
                os.unlink(stale)
            except FileNotFoundError:
                continue
            taken_over = f"{describe(holder, renewed_ago)}: {gone}"
        self._renewer = threading.Thread(target=self._renew, name="run_lock", daemon=True)
        self._renewer.start()
        return taken_over

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the next renewal tries again; the lease is four renewals long

    def release(self) -> None:
        self._stop.set()
        if _read(self.path) == self.me:
            os.unlink(self.path)
