"""Run a DeepSpeed launch so that a stop signal reaches every rank and nothing outlives the launch.

    python -m launch.supervise [--grace SECONDS] -- deepspeed [launcher args] launch/train.py --config X.yaml

DeepSpeed's runner (the ``deepspeed`` command) has no handler for SIGTERM on one node: ``docker stop`` or a
scheduler's SIGTERM ends it at once while its per-node launcher and the ranks train on unattended and hold
the rendezvous port. Its per-node launcher (``deepspeed.launcher.launch``) turns SIGINT/SIGTERM into SIGTERM
to the whole process tree, SIGKILL 30 s later and exit status 1, whatever the ranks did. So this process:

* starts the launch in a session of its own (a terminal's Ctrl-C reaches only this process);
* on SIGTERM, SIGINT or SIGUSR1 sends that signal to the ranks (the children of DeepSpeed's per-node
  launcher) and to no launcher. The ranks agree on a step, save a checkpoint and exit 0
  (``cid_ds.faults.StopSignal``); DeepSpeed's launchers then exit as the ranks did, and so does this process.
  A rank started after the signal gets it too. With several machines the ranks' all-reduce carries the stop
  to the other machines' ranks (run one supervised launch per machine: launch/multi_node.sh with NODE_RANK;
  under SLURM, launch/slurm.sbatch needs none of this: srun starts the ranks, which take SLURM's signals
  themselves);
* is bounded: ``--grace`` seconds after the first signal, or at a second SIGTERM/SIGINT, it kills the
  session (every process the launch started, DataLoader workers included) and exits 128 + signal.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
POLL_SECONDS = 0.2
RESEND_SECONDS = 5


def ranks(launch: psutil.Process) -> list[psutil.Process]:
    """The training processes under ``launch``: children of DeepSpeed's per-node launcher."""
    found = []
    for process in launch.children(recursive=True):
        try:
            if any(DEEPSPEED_NODE_LAUNCHER in part for part in process.cmdline()):
                found.extend(process.children())
        except psutil.Error:  # gone meanwhile
            continue
    return found


def _ignore_usr1() -> None:
    """DeepSpeed's launchers have no SIGUSR1 handler, and its default action ends a process: SLURM's
    ``--signal=USR1`` reaches every process of the job. The ranks install their own handler."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _runs_pdsh(launch: psutil.Process) -> bool:
    try:
        return any(p.name() == "pdsh" for p in launch.children(recursive=True))
    except psutil.Error:
        return False


def kill_session(launch: subprocess.Popen) -> None:
    """SIGKILL every process of the launch's session, wherever it was reparented."""
    members = [p for p in psutil.process_iter() if _session_of(p) == launch.pid]
    for process in members:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(members, timeout=10)
    launch.wait()


def _session_of(process: psutil.Process) -> Optional[int]:
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


class Supervisor:
    def __init__(self, command: list[str], grace: float):
        self.grace = grace
        self.received: list[int] = []
        self.signalled: dict[int, float] = {}  # pid -> when it was last sent the stop signal
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.launch = subprocess.Popen(command, start_new_session=True, preexec_fn=_ignore_usr1)
        self.process = psutil.Process(self.launch.pid)

    def _on_signal(self, signum: int, frame) -> None:
        self.received.append(signum)

    def _forward(self) -> None:
        found = ranks(self.process)
        if not found and self.launch.pid not in self.signalled and _runs_pdsh(self.process):
            # pdsh started every machine's ranks over ssh: none is ours to signal. DeepSpeed's runner then
            # stops them itself (SIGTERM over pdsh, no checkpoint): one launch per machine keeps it.
            self.launch.send_signal(self.received[0])
            self.signalled[self.launch.pid] = time.monotonic()
        now = time.monotonic()
        for rank in found:
            # again every few seconds: a rank still starting may not have its handler yet (and SIGUSR1,
            # ignored until then, would be lost); to one that has, a repeat changes nothing
            if now - self.signalled.get(rank.pid, -RESEND_SECONDS) >= RESEND_SECONDS:
                try:
                    rank.send_signal(self.received[0])
                except psutil.Error:
                    continue
                self.signalled[rank.pid] = now

    def wait(self) -> int:
        """The launch's exit status (128 + signal where it was killed)."""
        deadline = None
        while self.launch.poll() is None:
            if self.received:
                if deadline is None:
                    deadline = time.monotonic() + self.grace
                    print(f"[supervise] {signal.Signals(self.received[0]).name}: asking the ranks to checkpoint "
                          f"and stop (at most {self.grace:.0f} s)", file=sys.stderr, flush=True)
                self._forward()
                again = any(s in (signal.SIGTERM, signal.SIGINT) for s in self.received[1:])
                if again or time.monotonic() > deadline:
                    print("[supervise] " + ("second signal" if again else f"ranks still running after "
                          f"{self.grace:.0f} s") + ": killing the launch", file=sys.stderr, flush=True)
                    kill_session(self.launch)
                    return 128 + signal.SIGKILL
            time.sleep(POLL_SECONDS)
        # A process the launch left behind (a rank whose launcher died) must not outlive it either.
        kill_session(self.launch)
        code = self.launch.returncode
        return 128 - code if code < 0 else code


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grace", type=float, default=float(os.environ.get("CID_DS_STOP_GRACE", 600)),
                        help="seconds the ranks get to checkpoint after a stop signal (env CID_DS_STOP_GRACE; "
                             "default 600)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launch command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")
    return Supervisor(command, args.grace).wait()


if __name__ == "__main__":
    sys.exit(main())
