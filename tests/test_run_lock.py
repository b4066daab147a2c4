"""One run per output folder: a second run on a folder in use is refused naming the holder, and the first run is
unharmed; a holder that is gone (its process ended, its lease ran out) is taken over."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cid_ds.run_lock import LEASE_SECONDS, LOCK, OutputDirLocked, RunLock
from tests.helpers import REPO_ROOT, one_rank_env, write_shard_tar

HOLD = "import sys, time; from cid_ds.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def holder_process(output_dir: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, output_dir], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_takes_over_once_the_holder_is_killed(tmp_path):
    holder = holder_process(str(tmp_path))
    try:
        with pytest.raises(OutputDirLocked, match=f"in use by another run .*pid {holder.pid}"):
            RunLock(str(tmp_path)).acquire()
        assert json.load(open(tmp_path / LOCK))["pid"] == holder.pid  # the holder's lock is untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path))
    assert f"its process {holder.pid}" in lock.acquire()
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_from_another_host_holds_until_its_lease_runs_out(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": "gpu-node-17", "pid": 4242, "pid_started": 0.0}))
    with pytest.raises(OutputDirLocked, match="host gpu-node-17 pid 4242"):
        RunLock(str(tmp_path)).acquire()
    long_ago = time.time() - LEASE_SECONDS - 5
    os.utime(tmp_path / LOCK, (long_ago, long_ago))
    lock = RunLock(str(tmp_path))
    assert "lease ran out" in lock.acquire()
    lock.release()


def test_the_trainer_refuses_a_folder_in_use_before_it_writes_anything(tmp_path):
    out = tmp_path / "run"
    shard = write_shard_tar(tmp_path / "000000.tar", 0, 16)
    holder = holder_process(str(out))
    try:
        proc = subprocess.run([sys.executable, "-m", "cid_ds.train", "--config",
                               "ds_configs/experiments/demo_distill.yaml", f"output_dir={out}",
                               f"data.train_shards={shard}", "loss.instance=0", "eval.sets=[]"], cwd=REPO_ROOT, env=one_rank_env(),
                              capture_output=True, text=True, timeout=300)
        assert holder.poll() is None  # the first run is unharmed
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"output_dir: {out} is in use by another run (host" in proc.stderr
    assert sorted(os.listdir(out)) == [LOCK]
