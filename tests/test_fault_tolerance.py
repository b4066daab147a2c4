"""A multi-day job survives: SIGTERM, SIGINT or SLURM's USR1 to the launcher turns into a checkpoint at the
next step boundary on every rank and a clean exit (ranks that do not stop in time are killed, nothing outlives
the launcher), the resumed run continues the same loss curve, a half-written checkpoint is passed over on resume, and non-finite losses are skipped and counted (too many in a row stop the job)."""
import contextlib
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cid_ds.checkpoints import COMPLETE, newest_complete_tag
from cid_ds.config import ConfigError
from tests.helpers import REPO_ROOT, deepspeed_cmd, free_port, make_data_and_features, run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_data_and_features(str(tmp_path_factory.mktemp("faults")))


def overrides(dataset, out, steps, **extra):
    items = {"output_dir": out, "data.train_shards": dataset["shards"], "data.features": dataset["feats"],
             "data.batch_size": 24, "data.shuffle_buffer": 50, "data.views": "center",
             "eval.at_end": "false", "eval.sets": "[]",
             "optim.steps": steps, "optim.warmup_steps": 2, "logging.every": 1, "checkpoint.every": 1000,
             "checkpoint.stop_check_every": 1, "checkpoint.keep": 2} | extra
    return ["--config", "ds_configs/experiments/demo_distill.yaml"] + [f"{k}={v}" for k, v in items.items()]


def losses(out):
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss/total")}


def start_launcher(script: str, args: list[str], ranks: int, port: int, **env) -> subprocess.Popen:
    """A launch script started as a user (or docker, whose PID 1 passes on its signals) starts it."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", NUM_GPUS=str(ranks), MASTER_PORT=str(port), **env)
    return subprocess.Popen([script] + args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def signal_launcher_at(launcher: subprocess.Popen, line: str, sig: signal.Signals) -> tuple[list, list[str], float]:
    """Read the launch's output until ``line``, send ``sig`` to the launcher process alone; return every
    process the launch had started by then, the whole output once the launcher has exited, and the seconds
    from the signal to that exit."""
    lines = []
    for out in launcher.stdout:
        lines.append(out)
        if line in out:
            started = psutil.Process(launcher.pid).children(recursive=True)
            os.kill(launcher.pid, sig)
            signalled = time.monotonic()
            break
    else:
        raise AssertionError("".join(lines[-40:]))
    lines.extend(launcher.stdout)
    try:
        launcher.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
    return started, lines, time.monotonic() - signalled


def assert_nothing_outlived_the_launcher(started: list, port: int) -> None:
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [p.cmdline() for p in alive]
    listening = [c for c in psutil.net_connections("inet") if c.laddr.port == port and c.status == psutil.CONN_LISTEN]
    assert not listening, listening
    with socket.socket() as s:  # the next run's rendezvous can bind the port (as TCPStore does, past TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", port))


def test_sigterm_to_the_launcher_checkpoints_exits_0_and_the_resumed_curve_matches_an_uninterrupted_run(
        dataset, tmp_path):
    straight = str(tmp_path / "straight")
    run(deepspeed_cmd(2) + overrides(dataset, straight, 12))

    out = str(tmp_path / "interrupted")
    # docker stop: SIGTERM to the entrypoint (it execs single_node.sh, which execs the supervised launch)
    port = free_port()
    launcher = start_launcher("launch/docker_entrypoint.sh", overrides(dataset, out, 12)[1:], 2, port)
    started, lines, _ = signal_launcher_at(launcher, "[cid_ds] step 4/12", signal.SIGTERM)
    assert launcher.returncode == 0, "".join(lines[-40:])
    assert_nothing_outlived_the_launcher(started, port)
    stopped = [l for l in lines if "stop signal (SIGTERM)" in l]
    assert stopped, "".join(lines[-40:])
    stop_step = int(stopped[0].split("checkpoint of step ")[1].split()[0])
    assert 4 <= stop_step < 12
    assert newest_complete_tag(os.path.join(out, "checkpoints")) == f"step{stop_step:08d}"

    resumed = run(deepspeed_cmd(2) + overrides(dataset, out, 12))
    assert f"start step {stop_step}/12" in resumed.stdout
    expected, got = losses(straight), losses(out)
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [expected[s] for s in range(1, 13)], rtol=1e-5)

    # a truncated newest checkpoint is passed over: resume takes the previous complete one (that the trainer resumes
    # from what newest_complete_tag picks: tests/test_checkpoint_faults.py's full disk)
    newest = os.path.join(out, "checkpoints", "step00000012")
    model_file = glob.glob(os.path.join(newest, "*model_states.pt"))[0]
    with open(model_file, "r+b") as f:
        f.truncate(100)
    assert newest_complete_tag(os.path.join(out, "checkpoints")) == f"step{stop_step:08d}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_to_the_launcher_also_checkpoint_and_exit_0(dataset, tmp_path, sig):
    out, port = str(tmp_path / "run"), free_port()
    args = overrides(dataset, out, 50, **{"data.batch_size": 8})[1:]
    started, lines, _ = signal_launcher_at(start_launcher("launch/single_node.sh", args, 2, port),
                                        "[cid_ds] step 2/50", sig)
    output = "".join(lines)
    assert f"stop signal ({sig.name})" in output, output[-3000:]
    stop_step = int(output.split("checkpoint of step ")[1].split()[0])
    assert newest_complete_tag(os.path.join(out, "checkpoints")) == f"step{stop_step:08d}"
    assert_nothing_outlived_the_launcher(started, port)


def test_ranks_that_do_not_stop_in_the_grace_period_are_killed_with_everything_they_started(dataset, tmp_path):
    out, port = str(tmp_path / "run"), free_port()
    never_checks = overrides(dataset, out, 500, **{"data.batch_size": 8, "data.workers": 2,
                                                   "checkpoint.stop_check_every": 100000})[1:]
    launcher = start_launcher("launch/single_node.sh", never_checks, 2, port, CID_DS_STOP_GRACE="3")
    started, lines, seconds = signal_launcher_at(launcher, "[cid_ds] step 2/500", signal.SIGTERM)
    assert launcher.returncode == 128 + signal.SIGKILL, "".join(lines[-40:])
    assert "ranks still running after 3 s: killing the launch" in "".join(lines)
    assert seconds < 30
    assert_nothing_outlived_the_launcher(started, port)
    assert newest_complete_tag(os.path.join(out, "checkpoints")) is None


def test_a_rank_whose_worker_ignores_sigterm_and_is_stuck_still_exits_in_time(tmp_path):
    """multiprocessing's exit joins every daemon worker after a SIGTERM that loader workers ignore: one stuck
    in a read (a dead mount) would hold the rank forever. ``exit_within`` kills it and ends the process."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import multiprocessing, os, time\n"
        "from cid_ds.faults import exit_within, ignore_stop_signals\n"
        "def stuck():\n"
        "    ignore_stop_signals()\n"
        "    open('%s', 'w').close()\n"
        "    time.sleep(3600)\n"
        "if __name__ == '__main__':\n"
        "    worker = multiprocessing.Process(target=stuck, daemon=True)\n"
        "    worker.start()\n"
        "    print(worker.pid, flush=True)\n"
        "    while not os.path.exists('%s'):\n"
        "        time.sleep(0.01)\n"
        "    exit_within(2, 0)\n" % (tmp_path / "started", tmp_path / "started"))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 30
    assert "exit took longer than 2 s" in proc.stderr
    assert not psutil.pid_exists(int(proc.stdout.split()[0])) or \
        psutil.Process(int(proc.stdout.split()[0])).status() == psutil.STATUS_ZOMBIE


def test_a_checkpoint_without_its_completion_marker_is_not_trusted(tmp_path):
    for step in (5, 10):
        tag = tmp_path / f"step{step:08d}"
        tag.mkdir()
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    from cid_ds.checkpoints import mark_complete
    mark_complete(str(tmp_path / "step00000005"))
    assert newest_complete_tag(str(tmp_path)) == "step00000005"  # step 10 was never marked complete
    (tmp_path / "step00000010" / COMPLETE).write_text("{not json")
    assert newest_complete_tag(str(tmp_path)) == "step00000005"


# the check is symmetric: one direction, for make test's time
@pytest.mark.parametrize("saved, resumed", [("zero2", "zero0")])
def test_resuming_with_a_json_of_the_other_zero_layout_is_refused_naming_both(dataset, tmp_path, saved, resumed):
    out = str(tmp_path / "run")
    first = train_one_process(overrides(dataset, out, 2, **{"deepspeed_config": f"ds_configs/{saved}.json"}))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    again = train_one_process(overrides(dataset, out, 4, **{"deepspeed_config": f"ds_configs/{resumed}.json"}))
    assert again.returncode != 0
    saved_as = "with ZeRO stage 2" if saved == "zero2" else "without ZeRO (stage 0)"
    stage = 2 if resumed == "zero2" else 0
    assert (f"config error: checkpoint.resume: {out}/checkpoints/step00000002 was saved {saved_as}, but "
            f"deepspeed_config {REPO_ROOT}/ds_configs/{resumed}.json runs ZeRO stage {stage}") in again.stderr


def test_a_checkpoint_named_by_path_without_a_marker_skips_the_layout_check(tmp_path):
    from cid_ds.checkpoints import check_checkpoint_layout
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    check_checkpoint_layout(str(tmp_path), 2, False, "ds_configs/zero2.json")  # nothing recorded: DeepSpeed decides


@pytest.mark.parametrize("recorded", [True, False], ids=["in the marker", "by its file names"])
@pytest.mark.parametrize("saved_bf16", [True, False])
def test_resuming_across_deepspeeds_bf16_mode_is_refused(tmp_path, saved_bf16, recorded):
    """A checkpoint from DeepSpeed's bf16 mode (the shipped ZeRO JSONs before they moved to torch autocast)
    has its own optimizer files; an engine without that mode would fail looking for its own names."""
    from cid_ds.checkpoints import check_checkpoint_layout, mark_complete
    prefix = "bf16_" if saved_bf16 else ""
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    (tmp_path / f"{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    if recorded:
        mark_complete(str(tmp_path), {"zero_stage": 2, "bf16_mode": saved_bf16})
    check_checkpoint_layout(str(tmp_path), 2, saved_bf16, "ds_configs/zero2.json")  # the same mode loads
    saved_as = "saved in DeepSpeed's bf16 mode" if saved_bf16 else "saved without DeepSpeed's bf16 mode"
    with pytest.raises(ConfigError, match=f"{tmp_path} was {saved_as}, and deepspeed_config ds_configs/zero2.json"):
        check_checkpoint_layout(str(tmp_path), 2, not saved_bf16, "ds_configs/zero2.json")


def poison_cache(feats, shards):
    """Overwrite the teacher image rows of the given cache shards with NaN (a broken extraction)."""
    for stem in shards:
        path = os.path.join(feats, f"{stem}.npz")
        data = dict(np.load(path))
        data["image"] = np.full_like(data["image"], np.nan)
        np.savez(path, **data)


def train_one_process(args, timeout=300):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "cid_ds.train"] + args, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_nonfinite_losses_are_skipped_and_counted_and_too_many_in_a_row_stop_the_job(tmp_path):
    data = make_data_and_features(str(tmp_path / "data"))
    poison_cache(data["feats"], ["00001"])
    out = str(tmp_path / "partly")
    proc = train_one_process(overrides(data, out, 20, **{"data.shuffle_buffer": 1}))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert sum(e.value for e in acc.Scalars("train/nonfinite_steps_skipped")) > 0
    assert all(np.isfinite(e.value) for e in acc.Scalars("loss/total"))

    poison_cache(data["feats"], ["00000", "00002", "00003"])
    out = str(tmp_path / "all")
    proc = train_one_process(overrides(data, out, 20, **{"checkpoint.max_nonfinite_in_a_row": 3}))
    assert proc.returncode != 0
    assert "3 steps in a row with a non-finite loss or gradient norm by step 3 (non-finite now: ['instance'])" \
        in proc.stderr  # read at each stop check (checkpoint.stop_check_every: 1 here), never inside a step
    assert newest_complete_tag(os.path.join(out, "checkpoints")) == "step00000003"

    # an AdamW that cannot skip on the device: its step reads the verdict back, and the job stops the same way
    out = str(tmp_path / "host")
    proc = train_one_process(overrides(data, out, 20, **{"checkpoint.max_nonfinite_in_a_row": 3,
                                                         "perf.adamw": "foreach"}))
    assert proc.returncode != 0
    assert "3 steps in a row with a non-finite loss or gradient norm by step 3" in proc.stderr
    assert newest_complete_tag(os.path.join(out, "checkpoints")) == "step00000003"
