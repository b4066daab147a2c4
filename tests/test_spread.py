"""`python -m data_tools.spread -n N -- COMMAND` starts N copies of a stage's command on this machine, each with its
place (RANK, WORLD_SIZE, LOCAL_RANK) and its own GPU; a stage reads its share from a launcher's or srun's
environment."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from data_tools.spread import Share, own_gpu, share_from_env
from tests.helpers import REPO_ROOT

# each process writes its place to its own file: lines printed by several processes to one pipe can interleave
WRITE_PLACE = ("import json, os, sys; json.dump({name: os.environ.get(name) for name in "
               "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'CUDA_VISIBLE_DEVICES')}, "
               "open(os.path.join(sys.argv[1], os.environ['RANK'] + '.json'), 'w'))")


def spread(processes: int, command: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools.spread", "-n", str(processes), "--", *command],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def places(processes: int, env: dict, folder) -> list[dict]:
    """What each of ``processes`` processes that data_tools.spread starts finds in its environment, by rank."""
    folder.mkdir()
    done = spread(processes, [sys.executable, "-c", WRITE_PLACE, str(folder)], env)
    assert done.returncode == 0, done.stderr
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in range(processes)]


def test_each_process_gets_its_place_and_one_of_the_gpus_in_turn(tmp_path):
    assert places(3, dict(os.environ, CUDA_VISIBLE_DEVICES="4,6"), tmp_path / "places") == [
        {"RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r), "CUDA_VISIBLE_DEVICES": gpu}
        for r, gpu in enumerate(["4", "6", "4"])]


def test_without_a_device_list_the_gpus_nvidia_smi_lists_are_dealt_out(tmp_path):
    """No CUDA_VISIBLE_DEVICES: the GPUs come from ``nvidia-smi -L`` (a stand-in listing two, on this GPU-less
    machine); without nvidia-smi, no GPU and no variable."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name != "CUDA_VISIBLE_DEVICES"}
    listed = places(2, dict(env, PATH=f"{smi.parent}:{env['PATH']}"), tmp_path / "listed")
    assert [place["CUDA_VISIBLE_DEVICES"] for place in listed] == ["0", "1"]
    if not shutil.which("nvidia-smi"):
        assert [place["CUDA_VISIBLE_DEVICES"] for place in places(2, env, tmp_path / "none")] == [None, None]


def test_a_failed_process_ends_the_others_and_is_named():
    failing = "import os, sys, time; sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    done = spread(2, [sys.executable, "-c", failing], dict(os.environ))
    assert done.returncode != 0
    assert "process 1 of 2 exited with 3" in done.stderr


@pytest.mark.parametrize("env,gpus", [
    ({"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, "3"),  # the deepspeed launcher: all, each
    ({"SLURM_LOCALID": "9", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "1"),  # srun without --gpus-per-task
    ({"SLURM_LOCALID": "2", "CUDA_VISIBLE_DEVICES": "0"}, "0"),  # srun --gpus-per-task=1: its own already
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "0,1"),  # one process, no local rank: every GPU
    ({"LOCAL_RANK": "1"}, None),  # no list: nothing to cut
])
def test_a_process_keeps_only_its_own_gpu(env, gpus):
    assert own_gpu(env).get("CUDA_VISIBLE_DEVICES") == gpus


@pytest.mark.parametrize("env,share", [
    ({"RANK": "2", "WORLD_SIZE": "4"}, Share(2, 4)),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, Share(1, 2)),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, Share()),  # a batch script's own process, outside an srun step
    ({}, Share()),
])
def test_the_share_comes_from_the_launcher_or_srun(env, share):
    assert share_from_env(env) == share


def test_a_broken_place_is_refused_naming_the_variables():
    with pytest.raises(ValueError, match="RANK=4 is not a rank of WORLD_SIZE=4"):
        share_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="both must be set, as integers"):
        share_from_env({"RANK": "x", "WORLD_SIZE": "2"})
