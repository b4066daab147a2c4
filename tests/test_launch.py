"""The cluster launch kit: launch scripts, DeepSpeed JSONs and the Dockerfile. The scripts start real
DeepSpeed jobs on CPU (2 processes through a hostfile, 1 through the single-node script); SLURM and
docker cannot run here, so those are checked for what they pass on."""
import glob
import ipaddress
import json
import os
import signal
import subprocess
import sys

import pytest

from cid_ds.io import read_json
from tests.helpers import REPO_ROOT, free_port, listening_addresses, make_data_and_features

SHELL_SCRIPTS = ["launch/lib.sh", "launch/single_node.sh", "launch/multi_node.sh", "launch/slurm.sbatch",
                 "launch/docker_entrypoint.sh", "launch/install_faiss_gpu.sh", "bench/gpu_check.sh"]
YAML_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "gradient_clipping", "optimizer", "scheduler")


def start(cmd: list[str], cwd: str = REPO_ROOT, **env) -> subprocess.Popen:
    """A launch script started as a user would, with the venv's ``deepspeed`` first on PATH."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    env = dict(os.environ, PATH=path, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    try:
        output = proc.communicate(timeout=300)[0]
    finally:
        try:  # the launcher's process group: ranks left waiting for a failed peer
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def launch(cmd: list[str], cwd: str = REPO_ROOT, **env) -> str:
    return finish(start(cmd, cwd, **env))


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", os.path.join(REPO_ROOT, script)], check=True)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO_ROOT, "ds_configs", "*.json"))),
                         ids=os.path.basename)
def test_deepspeed_json_sets_a_zero_stage_and_nothing_the_yaml_owns(path):
    with open(path) as f:
        ds = json.load(f)
    assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)
    assert not set(YAML_OWNED_KEYS) & set(ds)


def test_offload_and_fp16_variants_exist():
    with open(os.path.join(REPO_ROOT, "ds_configs", "zero3_offload.json")) as f:
        zero = json.load(f)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    with open(os.path.join(REPO_ROOT, "ds_configs", "zero2_fp16.json")) as f:
        fp16 = json.load(f)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0: dynamic loss scaling


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    with open(os.path.join(REPO_ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


def test_dockerfile_installs_like_the_makefile_runs_as_a_user_and_starts_the_entrypoint():
    instructions = dockerfile_instructions()
    kinds = [kind for kind, _ in instructions]
    assert kinds[0] in ("FROM", "ARG") and "FROM" in kinds
    runs = " ".join(args for kind, args in instructions if kind == "RUN")
    assert "pip install --no-cache-dir -r requirements.txt" in runs  # the one list of pinned versions
    assert "pip install --no-cache-dir --no-deps --no-build-isolation -e ." in runs  # as the Makefile
    assert runs.index("-r requirements.txt") < runs.index("--no-deps")
    users = [args for kind, args in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "6006") in instructions
    # tini as PID 1 forwards docker stop's SIGTERM to the entrypoint and reaps orphans
    assert ("ENTRYPOINT", '["tini", "--", "launch/docker_entrypoint.sh"]') in instructions
    assert " tini" in runs
    assert any(kind == "WORKDIR" for kind in kinds)
    # faiss's GPU build by default, from the script GPU hosts run (make setup-gpu), FAISS=cpu to keep faiss-cpu
    assert ("ARG", "FAISS=gpu") in instructions and "gpu) launch/install_faiss_gpu.sh" in runs
    with open(os.path.join(REPO_ROOT, "Makefile")) as f:
        makefile = f.read()
    assert "pip install --quiet -r requirements.txt" in makefile
    assert "pip install --quiet --no-deps --no-build-isolation -e ." in makefile
    assert 'PIP="$(PY) -m pip" launch/install_faiss_gpu.sh' in makefile


def test_gpu_hosts_swap_faiss_cpu_for_faiss_gpu_of_the_pinned_version():
    with open(os.path.join(REPO_ROOT, "requirements.txt")) as f:
        pinned = [line.split("==")[1].strip() for line in f if line.startswith("faiss-cpu==")]
    assert len(pinned) == 1  # CI and CPU machines install faiss-cpu from requirements.txt
    out = subprocess.run(["launch/install_faiss_gpu.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PIP="python -m pip"), check=True).stdout.splitlines()
    assert out == ["python -m pip uninstall --yes faiss-cpu",
                   f"python -m pip install --no-cache-dir faiss-gpu=={pinned[0]}"]


def test_on_gpu_nodes_slurm_script_starts_one_rank_per_gpu_and_meets_at_the_first_nodes_address(tmp_path):
    """The local SLURM has no GPUs (tests/test_slurm.py runs the script there); a GPU allocation is what SLURM
    tells the script in SLURM_GPUS_ON_NODE: stand-in ``scontrol`` and ``srun`` on PATH show what it hands on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = os.path.join(REPO_ROOT, "launch", "slurm.sbatch")
    (bin_dir / "scontrol").write_text(f"""#!/bin/sh
case "$2" in
  job) echo "JobId=424242 Command={script} WorkDir=/somewhere" ;;
  hostnames) printf 'gpu-a17\\ngpu-b03\\n' ;;
  node) echo "NodeName=$4 Arch=x86_64 NodeAddr=10.1.2.17 NodeHostName=$4" ;;
esac
""")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nenv | grep -E '^(MASTER_|CID_DS_STOP)' > {tmp_path}/srun_env\n"
                                  f"printf '%s\\n' \"$@\" > {tmp_path}/srun_args\n")
    for tool in ("scontrol", "srun"):
        os.chmod(bin_dir / tool, 0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="424242",
               SLURM_JOB_NODELIST="gpu-[a17,b03]", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_GPUS_ON_NODE="4",
               SLURM_CPUS_ON_NODE="64")
    subprocess.run(["bash", script, "ds_configs/experiments/demo_cid.yaml", "optim.lr=3e-4"],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, text=True)
    srun_args = (tmp_path / "srun_args").read_text().splitlines()
    assert srun_args[:3] == ["--ntasks-per-node=4", "--cpus-per-task=16", "--kill-on-bad-exit=1"]
    assert srun_args[-4:] == [os.path.join(REPO_ROOT, "launch", "train.py"), "--config",
                              "ds_configs/experiments/demo_cid.yaml", "optim.lr=3e-4"]
    assert any("RANK=$SLURM_PROCID" in a and "WORLD_SIZE=$SLURM_NTASKS" in a for a in srun_args)
    srun_env = (tmp_path / "srun_env").read_text()
    assert "MASTER_ADDR=10.1.2.17\n" in srun_env and "MASTER_PORT=24242\n" in srun_env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_data_and_features(str(tmp_path_factory.mktemp("launch")), train_samples=96, shards=2)


def tiny_run(dataset, out: str) -> list[str]:
    return ["ds_configs/experiments/demo_distill.yaml", f"output_dir={out}", f"data.train_shards={dataset['shards']}",
            f"data.features={dataset['feats']}", "data.batch_size=8", "data.shuffle_buffer=10", "optim.steps=2",
            "optim.warmup_steps=1", "logging.every=1", "checkpoint.every=2", "eval.at_end=false", "eval.sets=[]"]


def test_multi_node_hostfile_runs_two_ranks_and_single_node_runs_one(dataset, tmp_path):
    """...and a run on one machine listens on the loopback address only (rendezvous, gloo)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one machine, two CPU ranks\nlocalhost slots=2\n")
    two = str(tmp_path / "two")
    port = free_port()
    proc = start(["launch/multi_node.sh", str(hostfile), *tiny_run(dataset, two)], MASTER_PORT=str(port))
    with listening_addresses(proc.pid) as listening:
        output = finish(proc)
    assert ("127.0.0.1", port) in listening  # the rendezvous (rank 0's TCPStore)
    assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in listening), listening
    assert "[launch] deepspeed --hostfile" in output and "--no_ssh_check" in output
    assert "world 2" in output
    assert read_json(os.path.join(two, "results.json"))["step"] == 2

    # from a directory of the user's: relative paths in the overrides land there, not in the repository
    config, *overrides = tiny_run(dataset, "one")
    output = launch([os.path.join(REPO_ROOT, "launch", "single_node.sh"), os.path.join(REPO_ROOT, config), *overrides,
                     f"deepspeed_config={os.path.join(REPO_ROOT, 'ds_configs', 'zero0.json')}"],
                    str(tmp_path), NUM_GPUS="1", MASTER_PORT=str(free_port()))
    assert "[launch] deepspeed --num_gpus 1" in output
    assert "world 1" in output
    assert read_json(str(tmp_path / "one" / "results.json"))["step"] == 2


def test_no_ssh_launch_one_call_per_node_forms_one_job(dataset, tmp_path):
    """What a scheduler that starts one command per machine does (Kubernetes, srun with DeepSpeed's launcher),
    with two "nodes" on this machine: the same command on each, NODE_RANK telling it which hostfile line it is."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    out = str(tmp_path / "run")
    port = str(free_port())
    nodes = [start(["launch/multi_node.sh", str(hostfile), *tiny_run(dataset, out)], NODE_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in (0, 1)]
    outputs = [finish(node) for node in nodes]
    assert all("--no_ssh --node_rank" in output for output in outputs)
    assert "world 2" in outputs[0]
    assert read_json(os.path.join(out, "results.json"))["step"] == 2


def test_ssh_launch_hands_the_network_settings_to_the_remote_machines(tmp_path):
    """Two hosts mean pdsh over ssh, which this machine cannot do; the .deepspeed_env the script
    writes for the remote shells is printed before DeepSpeed's ssh check fails."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    proc = start(["launch/multi_node.sh", str(hostfile), "ds_configs/experiments/demo_distill.yaml"],
                 NCCL_SOCKET_IFNAME="ib0", NCCL_DEBUG="INFO", HOME=str(tmp_path))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "not reachable via ssh" in output
    env_file = output.split("[launch] .deepspeed_env for the remote machines (")[1].split("):")[0]
    for line in ("NCCL_SOCKET_IFNAME=ib0", "NCCL_DEBUG=INFO", "DS_ACCELERATOR=cpu"):
        assert f"\n    {line}\n" in output, line
    assert not os.path.exists(env_file)  # a per-launch file, removed on exit


def test_where_the_libuv_store_takes_no_listening_socket_the_rendezvous_uses_the_legacy_store(monkeypatch):
    """torch 2.5's libuv TCPStore refuses the socket the rendezvous bound to MASTER_ADDR (NotImplementedError, as
    on a lent machine's older torch): the rendezvous hands the same socket to torch's legacy store instead."""
    from torch.distributed import TCPStore

    from cid_ds import rendezvous
    made = []

    def store_refusing_libuv(*args, use_libuv: bool, **kwargs):
        made.append(use_libuv)
        if use_libuv:
            raise NotImplementedError("The libuv TCPStore backend does not support initialization with an listen fd")
        return TCPStore(*args, use_libuv=use_libuv, **kwargs)
    monkeypatch.setattr(rendezvous, "TCPStore", store_refusing_libuv)
    port = free_port()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    store, rank, world_size = next(rendezvous._bound_rendezvous(rendezvous.INIT_METHOD))
    store.set("key", "value")
    assert (made, store.get("key"), rank, world_size) == ([True, False], b"value", 0, 1)
    import psutil
    assert ("127.0.0.1", port) in {tuple(c.laddr) for c in psutil.Process().net_connections("tcp")
                                   if c.status == psutil.CONN_LISTEN}
