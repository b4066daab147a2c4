"""The SLURM path on a real two-node SLURM (launch/local_slurm.py: one slurmctld, two slurmds on this machine,
loopback only), the CID student as a user submits it: `sbatch launch/slurm.sbatch CONFIG ...` from a directory of
their own. A stop signal to the job's ranks (`scancel --signal=TERM`, as a preemption or `--signal=USR1@...` before
the time limit sends one) turns into a checkpoint on both nodes, the job requeues itself and resumes, and it ends
with the weights of an uninterrupted run. A node whose ranks are killed outright ends the job with a message in a
bounded time, and the next submission takes the output folder over and resumes from the newest complete
checkpoint."""
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from cid_ds.checkpoints import newest_complete_tag
from cid_ds.io import read_json
from cid_ds.run_lock import LOCK
from tests.helpers import REPO_ROOT, deepspeed_cmd, make_data_and_features, run
from launch.local_slurm import KILL_WAIT, local_slurm, missing
from tests.test_fault_tolerance import losses

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

SBATCH = os.path.join(REPO_ROOT, "launch", "slurm.sbatch")
CONFIG = os.path.join(REPO_ROOT, "ds_configs", "experiments", "demo_cid.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_slurm(str(tmp_path_factory.mktemp("slurm"))) as slurm:
        yield slurm


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_tools.cluster import ClusterOptions, cluster
    data = make_data_and_features(str(tmp_path_factory.mktemp("slurm_data")), train_samples=192, shards=2)
    data["clusters"] = os.path.join(os.path.dirname(data["feats"]), "clusters")
    cluster(ClusterOptions(features=data["feats"], k=9, out=data["clusters"]))
    return data


def overrides(dataset, out: str, steps: int, **extra) -> list[str]:
    items = {"output_dir": out, "deepspeed_config": os.path.join(REPO_ROOT, "ds_configs", "zero2.json"),
             "data.train_shards": dataset["shards"], "data.features": dataset["feats"],
             "cluster.dir": dataset["clusters"], "cluster.sample_rate": 0.6, "data.batch_size": 16,
             "data.shuffle_buffer": 20, "data.views": "center", "eval.at_end": "false", "eval.sets": "[]",
             "optim.steps": steps, "optim.warmup_steps": 2, "logging.every": 1, "checkpoint.every": 100,
             "checkpoint.stop_check_every": 1} | extra
    return [f"{k}={v}" for k, v in items.items()]


def read(path) -> str:
    return open(path).read() if os.path.exists(path) else ""


def exported(out) -> dict:
    return load_file(os.path.join(out, "export", "open_clip_model.safetensors"))


def test_a_preempted_two_node_job_checkpoints_requeues_and_ends_as_an_uninterrupted_run(cluster, dataset, tmp_path):
    straight = str(tmp_path / "straight")
    run(deepspeed_cmd(2) + ["--config", CONFIG] + overrides(dataset, straight, 10))

    user_dir = tmp_path / "user"  # submitted from a directory of the user's, with a relative output_dir
    user_dir.mkdir()
    job = cluster.submit(SBATCH, CONFIG, *overrides(dataset, "run", 10), cwd=str(user_dir))
    log = user_dir / f"cid_ds-{job}.out"
    cluster.wait(lambda: "[cid_ds] step 3/10" in read(log), 300, "step 3", job, log)
    assert "world 2" in read(log) and "rendezvous 127.0.0.1:" in read(log)
    cluster.run("scancel", "--signal=TERM", job)
    to_requeue = cluster.wait(lambda: cluster.state(job) == "PENDING", KILL_WAIT, "requeued within KillWait", job, log)
    print(f"signal to a complete checkpoint on both nodes and the job requeued: {to_requeue:.1f} s")
    stopped = re.search(r"stop signal \(SIGTERM\): checkpoint of step (\d+) saved", read(log))
    assert stopped, read(log)[-4000:]
    stop_step = int(stopped.group(1))
    assert 3 <= stop_step < 10
    assert newest_complete_tag(str(user_dir / "run" / "checkpoints")) == f"step{stop_step:08d}"
    assert f"requeueing job {job}" in read(log)

    cluster.wait(lambda: cluster.state(job) == "COMPLETED", 300, "the requeued job to finish", job, log)
    text = read(log)
    assert "(restart 1)" in text and f"start step {stop_step}/10" in text
    assert read_json(str(user_dir / "run" / "results.json"))["step"] == 10
    assert not (user_dir / "run" / LOCK).exists()

    expected, got = losses(straight), losses(str(user_dir / "run"))
    assert sorted(got) == list(range(1, 11))  # no step lost, none repeated
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [expected[s] for s in range(1, 11)], rtol=1e-5)
    weights, reference = exported(str(user_dir / "run")), exported(straight)
    assert sorted(weights) == sorted(reference)
    for name in reference:
        np.testing.assert_allclose(weights[name], reference[name], rtol=1e-5, atol=1e-6, err_msg=name)


def ranks_of(job: str, node: str) -> list[psutil.Process]:
    """The training processes the job runs on ``node`` (a rank and its loader workers)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            env = process.environ()
        except psutil.Error:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURMD_NODENAME") == node and \
                any("launch/train.py" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def test_a_node_killed_outright_ends_the_job_and_the_next_submission_resumes(cluster, dataset, tmp_path):
    args = overrides(dataset, "run", 6, **{"checkpoint.every": 2})
    job = cluster.submit(SBATCH, CONFIG, *args, cwd=str(tmp_path))
    log = tmp_path / f"cid_ds-{job}.out"
    cluster.wait(lambda: "[cid_ds] step 3/6" in read(log), 300, "step 3", job, log)
    for process in ranks_of(job, "n1"):  # rank 0's node: its lock on the output folder stays behind
        process.kill()
    ended = cluster.wait(lambda: cluster.state(job) not in ("RUNNING", "COMPLETING"), 90, "the job to end", job, log)
    print(f"node killed -> job ended: {ended:.1f} s")
    assert cluster.state(job) == "FAILED"
    assert "[slurm] the ranks failed" in read(log)
    assert (tmp_path / "run" / LOCK).exists()
    saved = int(newest_complete_tag(str(tmp_path / "run" / "checkpoints"))[len("step"):])
    assert saved in (2, 4)  # the checkpoints every 2 steps: the kill came after step 3

    again = cluster.submit(SBATCH, CONFIG, *args, cwd=str(tmp_path))
    log = tmp_path / f"cid_ds-{again}.out"
    cluster.wait(lambda: cluster.state(again) == "COMPLETED", 300, "the resubmitted job to finish", again, log)
    text = read(log)
    assert "output_dir lock taken over from host" in text and "has ended" in text
    assert f"start step {saved}/6" in text
    results = tmp_path / "run" / "results.json"
    assert read_json(str(results))["step"] == 6

    # one more link of a resubmission chain, after the end: it leaves the finished run as it is
    written = results.stat().st_mtime_ns
    late = cluster.submit(SBATCH, CONFIG, *args, cwd=str(tmp_path))
    cluster.wait(lambda: cluster.state(late) == "COMPLETED", 300, "the late link to end", late,
                 tmp_path / f"cid_ds-{late}.out")
    assert "finished already at step 6" in read(tmp_path / f"cid_ds-{late}.out")
    assert results.stat().st_mtime_ns == written


def test_the_time_limit_signal_and_scontrol_requeue_each_checkpoint_and_bring_the_job_back(cluster, dataset, tmp_path):
    """``--signal=USR1@100`` with a 2-minute limit: SLURM sends USR1 well before the limit (its timer runs every
    ~30 s). Then ``scontrol requeue`` of the running job: SIGTERM to every process, KillWait, SIGKILL."""
    job = cluster.submit("--time=2", "--signal=USR1@100", SBATCH, CONFIG,
                         *overrides(dataset, "run", 1000, **{"logging.every": 10}), cwd=str(tmp_path))
    log = tmp_path / f"cid_ds-{job}.out"
    cluster.wait(lambda: "requeueing job" in read(log), 120, "the time-limit signal", job, log)
    first = int(re.search(r"stop signal \(SIGUSR1\): checkpoint of step (\d+) saved", read(log)).group(1))
    assert newest_complete_tag(str(tmp_path / "run" / "checkpoints")) == f"step{first:08d}"

    cluster.wait(lambda: f"start step {first}/1000" in read(log), 120, "the requeued job to resume", job, log)
    cluster.run("scontrol", "requeue", job)
    cluster.wait(lambda: cluster.state(job) == "PENDING", KILL_WAIT, "the job requeued", job, log)
    second = int(re.search(r"stop signal \(SIGTERM\): checkpoint of step (\d+) saved", read(log)).group(1))
    assert second > first
    assert newest_complete_tag(str(tmp_path / "run" / "checkpoints")) == f"step{second:08d}"
    cluster.run("scancel", job)


def test_prepare_under_srun_spreads_every_stage_over_both_nodes(cluster, dataset, tmp_path):
    """`srun --kill-on-bad-exit=1 python -m data_tools.prepare ...` (as the README has it) in a two-node job: a
    process on each node (SLURM_PROCID of SLURM_NTASKS), each its share of every stage, a part of the hierarchical
    fit on each node; the centroids and packed shards are those one process writes alone."""
    args = ["-m", "data_tools.prepare", "--shards", dataset["shards"], "--teacher", "demo-teacher", "--parts", "2",
            "--random-teacher-ok", "--student", "demo-student", "--ranks", "1", "--workers", "2", "--device", "cpu"]
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "prepare.out"
    subprocess.run([sys.executable, *args, "--out", str(one)], cwd=REPO_ROOT, check=True, capture_output=True,
                   env=dict(os.environ, DS_ACCELERATOR="cpu"))
    job = cluster.submit("--nodes=2", "--ntasks-per-node=1", f"--output={log}", f"--chdir={REPO_ROOT}",
                         "--wrap", shlex.join(["srun", "--kill-on-bad-exit=1", sys.executable, *args, "--out", str(two)]),
                         cwd=str(tmp_path))
    cluster.wait(lambda: cluster.state(job) not in ("PENDING", "RUNNING", "COMPLETING"), 300, "prepare under srun",
                 job, log)
    text = read(log)
    assert cluster.state(job) == "COMPLETED", text[-3000:]
    assert "(process 0 of 2)" in text and "(process 1 of 2)" in text and text.count("[prepare] balance kept") == 1
    assert "fit parts process 1 of 2" in text
    assert (one / "clusters" / "centroids.npy").read_bytes() == (two / "clusters" / "centroids.npy").read_bytes()
    tars = sorted(name for name in os.listdir(one / "packed") if name.endswith(".tar"))
    assert tars == sorted(name for name in os.listdir(two / "packed") if name.endswith(".tar"))
    for name in tars:
        assert (one / "packed" / name).read_bytes() == (two / "packed" / name).read_bytes(), name
