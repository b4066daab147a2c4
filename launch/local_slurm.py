"""A real two-node SLURM cluster on this machine, for the tests and ``make slurm-demo``: a munged of its own, one
slurmctld and two slurmd daemons (nodes n1 and n2, one CPU each), every socket on the loopback address. Debian's
slurm-wlm is built with multiple-slurmd support, so SLURM treats the two slurmds as two nodes (``sbatch -N 2``: one
task on each, SLURM_NODEID 0 and 1). Started and stopped by its user (``local_slurm``); ``missing()`` says why it
cannot start here."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Callable, Iterator, Optional

# SLURM's default is 30 s; what a rank needs to checkpoint after a stop signal here is ~3 s, and a rank left
# waiting on a dead peer is ended this much after its step was told to stop
KILL_WAIT = 15
# A requeued job may start again this long after its requeue (AuthInfo cred_expire: SLURM's default is 120 s).
# SLURM's own guard, as a real cluster has it: slurmd refuses to relaunch a job under a credential older than the
# job's revocation. Forcing an earlier start (scontrol update StartTime=now) left the requeued job pending for good
# on the CI machine, though not here.
REQUEUE_DELAY = 10
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def missing() -> Optional[str]:
    """Why no cluster can start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]
    if absent:
        return f"SLURM is not installed (no {', '.join(absent)}: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    return None


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on the loopback address (the two slurmds' ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two consecutive free ports")


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for name in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_RESTART_COUNT"):  # a test itself run under SLURM
            self.env.pop(name, None)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        ctld_port, node_port = _free_port_pair(), _free_port_pair()
        r = self.root
        lines = [
            "ClusterName=cidtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={r}/munge/munge.socket,cred_expire={REQUEUE_DELAY}",
            "CredType=cred/munge",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n", f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.%n.pid", f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log", f"SlurmctldPort={ctld_port}", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SwitchType=switch/none", "MpiDefault=none", "ReturnToService=2",
            "SelectType=select/cons_tres", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", f"KillWait={KILL_WAIT}",
            # the scheduler's passes every 5 s (default: 60 s, backfill 30 s): a requeued job starts soon after
            # its begin time, a test's submission at once
            "SchedulerParameters=sched_interval=5,bf_interval=5",
            # NodeAddr: the rendezvous address slurm.sbatch takes; the names n1/n2 do not resolve
            f"NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 CPUs=1 RealMemory=10000 "
            f"Port={node_port}-{node_port + 1} State=UNKNOWN",
            "PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP"]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        munge = os.path.join(self.root, "munge")
        os.chmod(munge, 0o711)  # munged refuses a socket folder others can write to
        key = os.path.join(munge, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        subprocess.run([_tool("munged"), "--force", f"--socket={munge}/munge.socket", f"--key-file={key}",
                        f"--pid-file={munge}/munged.pid", f"--log-file={munge}/munged.log",
                        f"--seed-file={munge}/seed"], check=True)
        self._write_conf()
        subprocess.run([_tool("slurmctld"), "-f", self.conf], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run([_tool("slurmd"), "-f", self.conf, "-N", node], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            idle = self.run("sinfo", "-h", "-o", "%D %t", check=False).stdout.split()
            if idle == ["2", "idle"]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM did not come up: {self.run('sinfo', check=False).stdout}")

    def run(self, *command: str, check: bool = True, cwd: Optional[str] = None,
            **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([_tool(command[0]), *command[1:]], env=dict(self.env, **env), cwd=cwd, check=check,
                              capture_output=True, text=True)

    def submit(self, *args: str, cwd: str, **env: str) -> str:
        """``sbatch --parsable ARGS`` from ``cwd``; the job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, **env).stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        fields = self.run("scontrol", "show", "job", "-o", job, check=False).stdout.split()
        return next((f.split("=", 1)[1] for f in fields if f.startswith("JobState=")), "GONE")

    def describe(self, job: str) -> str:
        """What SLURM says of ``job`` and its nodes, and the end of slurmctld's log: for a message when a wait fails."""
        with open(os.path.join(self.root, "log", "slurmctld.log"), errors="replace") as f:
            log = f.readlines()[-30:]
        return "\n".join([self.run("scontrol", "show", "job", job, check=False).stdout,
                          self.run("sinfo", "-N", "-o", "%N %t %E", check=False).stdout, "slurmctld.log:", *log])

    def wait(self, condition: Callable[[], object], seconds: float, what: str, job: Optional[str] = None,
             log: Optional[str] = None) -> float:
        """Poll ``condition`` until it holds; the seconds it took. Past ``seconds``, a TimeoutError with the end of
        the job's ``log`` and what SLURM says of ``job``."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > seconds:
                tail = open(log, errors="replace").read()[-6000:] if log and os.path.exists(log) else ""
                raise TimeoutError(f"not within {seconds:.0f} s: {what}\n{tail}\n{self.describe(job) if job else ''}")
            time.sleep(0.5)
        return time.monotonic() - start

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        time.sleep(1)
        for pid_file in ("slurmd.n1.pid", "slurmd.n2.pid", "slurmctld.pid", "munge/munged.pid"):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(self.root, pid_file)) as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)


@contextlib.contextmanager
def local_slurm(root: str) -> Iterator[LocalSlurm]:
    cluster = LocalSlurm(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
