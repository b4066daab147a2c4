"""A new user's first try: `data_tools.prepare` on their own shards and teacher with only the defaults, then
training from the YAML it writes. The teacher here is not the demo's: the demo teacher's architecture with
random weights from another seed, loaded from a checkpoint file. Its image embeddings all lie close
together, so a fixed similarity threshold would call nearly every pair a duplicate; the defaults must not."""
import contextlib
import dataclasses
import io
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from cid_ds.config import load_config
from cid_ds.io import read_json
from data_tools.prepare import EPOCHS, RECIPE
from tests.helpers import REPO_ROOT, one_rank_env


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    from safetensors.torch import save_file

    import torch
    from cid_ds.models import create_model
    from data_tools.make_demo_data import generate
    root = tmp_path_factory.mktemp("own")
    generate(str(root / "data"), train_samples=320, shards=4, seed=3, eval_scale=0.1)
    torch.manual_seed(7)
    weights = root / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("demo-teacher")[0].state_dict().items()}, str(weights))
    return {"shards": str(root / "data" / "train" / "{00000..00003}.tar"), "teacher": str(weights), "root": root}


def prepare_args(data: dict, out, *extra: str) -> list[str]:
    return ["--shards", data["shards"], "--teacher", "demo-teacher", "--pretrained", data["teacher"],
            "--student", "demo-student", "--out", str(out), "--ranks", "1", "--workers", "2", *extra]


@pytest.fixture(scope="module")
def prepared(own_data) -> tuple:
    """``(out, what it printed)`` of prepare run with the defaults."""
    from data_tools.prepare import main
    out, printed = own_data["root"] / "prepared", io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(prepare_args(own_data, out))
    return out, printed.getvalue()


def test_prepare_with_defaults_then_train_from_the_yaml_it_writes(prepared):
    out, printed = prepared

    for stage, artifact in (("feats", "manifest.json"), ("clusters", "centroids.npy"), ("balance", "manifest.json"),
                            ("packed", "manifest.json")):
        assert (out / stage / artifact).is_file(), stage
    report = read_json(str(out / "balance" / "balance_report.json"))
    assert 0.4 < report["kept_fraction"] < 0.7  # the default keep fraction, whatever the teacher's similarities
    packed = read_json(str(out / "packed" / "manifest.json"))
    assert packed["complete"] and len(packed["shards"]) >= 2  # one shard at least per loader worker
    clusters = read_json(str(out / "clusters" / "manifest.json"))
    assert f"k = {clusters['k']} (from the sample count" in printed
    summary = printed[printed.index("[prepare] "):]
    assert summary.startswith("[prepare] balance kept ")  # the summary leads with the kept fraction

    config = yaml.safe_load((out / "train.yaml").read_text())
    assert config["data"]["train_shards"] == str(out / "packed" / "*.tar")
    assert config["cluster"]["dir"] == str(out / "clusters") and config["model"]["student"] == "demo-student"
    recipe = load_config(RECIPE, check_paths=False)  # its loss weights and cluster keys, pointed at the data
    assert config["loss"] == {name: w for name, w in dataclasses.asdict(recipe.loss).items() if w > 0}
    assert {key: config["cluster"][key] for key in ("margin", "scale", "positives", "text_weight")} == \
        {key: getattr(recipe.cluster, key) for key in ("margin", "scale", "positives", "text_weight")}
    assert config["deepspeed_config"] == str(out / "deepspeed.json") and (out / "deepspeed.json").is_file()
    assert config["logging"] == {"every": recipe.logging.every}  # the recipe's intervals, not the defaults
    assert config["checkpoint"] == {"every": recipe.checkpoint.every, "keep": recipe.checkpoint.keep}
    assert f"NUM_GPUS=1 {REPO_ROOT}/launch/single_node.sh {out / 'train.yaml'}" in printed
    assert "sbatch --nodes=1 " in printed and f"{REPO_ROOT}/launch/slurm.sbatch {out / 'train.yaml'}" in printed

    run = subprocess.run([sys.executable, "-m", "cid_ds.train", "--config", str(out / "train.yaml"),
                          "optim.steps=2", "checkpoint.every=2", "logging.every=1"],
                         cwd=REPO_ROOT, env=one_rank_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert os.path.isfile(os.path.join(config["output_dir"], "export", "open_clip_config.json"))


def test_two_processes_prepare_the_same_data_as_one(own_data, prepared):
    """``--processes 2``: every stage spread (data_tools.spread), process 0 prints the summary; the same packed
    shards, byte for byte, as one process's."""
    one = prepared[0]
    two = one.parent / "two_processes"
    run = subprocess.run([sys.executable, "-m", "data_tools.prepare", *prepare_args(own_data, two), "--processes", "2"],
                         cwd=REPO_ROOT, env=one_rank_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[prepare 4/4] pack -> " in run.stdout and "(process 1 of 2)" in run.stdout
    assert run.stdout.count("[prepare] balance kept ") == 1
    assert "process 0 writes the summary" in run.stdout
    tars = sorted(name for name in os.listdir(one / "packed") if name.endswith(".tar"))
    assert tars and tars == sorted(name for name in os.listdir(two / "packed") if name.endswith(".tar"))
    for name in tars:
        assert (one / "packed" / name).read_bytes() == (two / "packed" / name).read_bytes(), name
    for stage in ("feats", "clusters", "balance", "packed"):
        assert read_json(str(two / stage / "manifest.json"))["complete"], stage
    assert (two / "train.yaml").is_file()


def test_plan_measures_the_stages_on_a_cut_of_the_data_and_scales_them_to_the_job(own_data, tmp_path):
    """``--plan`` for 200M samples on 4 nodes x 8: every stage runs on a cut of the user's data with their
    teacher; the plan scales what it measured and leaves nothing but plan.json."""
    out = tmp_path / "plan"
    args = ["--shards", own_data["shards"], "--teacher", "demo-teacher", "--pretrained", own_data["teacher"],
            "--student", "demo-student", "--out", str(out), "--nodes", "4", "--gpus-per-node", "8", "--plan",
            "--plan-samples", "200000000"]
    run = subprocess.run([sys.executable, "-m", "data_tools.prepare", *args], cwd=REPO_ROOT, env=one_rank_env(),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert os.listdir(out) == ["plan.json"]
    plan = read_json(str(out / "plan.json"))
    assert (plan["samples"], plan["k"], plan["processes"]) == (200_000_000, 500_000, 32)  # k: one per 400
    stages, measured = {row["stage"]: row for row in plan["stages"]}, plan["measured"]
    assert list(stages) == ["extract", "cluster fit", "assign", "balance", "pack"]
    for name, row in stages.items():
        assert f"[plan] {name}" in run.stdout and row["hours"] > 0
    assert stages["assign"]["hours"] == pytest.approx(200e6 * 500e3 / (measured["pairs_per_s"] * 32) / 3600)
    assert stages["extract"]["hours"] == pytest.approx(200e6 / (measured["extract_per_s"] * 32) / 3600)
    assert stages["extract"]["disk_bytes"] == pytest.approx(measured["bytes_per_sample"]["feats"] * 200e6)
    assert measured["bytes_per_sample"]["feats"] > 2 * 32 * 2  # the demo teacher's 32-d image and text rows, fp16
    assert 0.4 < measured["kept_fraction"] < 0.7 and measured["cluster_size"] == 400
    assert stages["cluster fit"]["memory_bytes"] <= 64 * 2**30  # the default --fit-memory-gb holds


def test_a_balance_that_would_remove_most_of_the_data_stops_prepare_with_the_numbers(own_data, prepared, tmp_path):
    from data_tools.prepare import main
    out = tmp_path / "strict"
    for stage in ("feats", "clusters"):  # done before: prepare resumes them
        shutil.copytree(prepared[0] / stage, out / stage)
    with pytest.raises(SystemExit) as stop:
        main(prepare_args(own_data, out, "--semantic", "0.5"))
    message = str(stop.value)
    assert message.startswith("prepare: ") and "--max-removed-fraction" in message and "%" in message
    assert f"needs {out / 'balance'} deleted first" in message  # how to change the balance's flags under prepare
    assert not (out / "packed").exists() and not (out / "train.yaml").exists()


def test_flags_a_later_stage_refuses_stop_prepare_before_work_or_name_what_to_delete(own_data, prepared, tmp_path):
    from data_tools.prepare import main
    never = tmp_path / "never"
    for flags, message in ((["--workers", "0"], "--workers must be >= 1"),
                           (["--target-keep-fraction", "0.3"], "would remove 70.0% of the samples")):
        with pytest.raises(SystemExit, match=message):
            main(prepare_args(own_data, never, *flags))
        assert not (never / "feats").exists()  # refused before the first stage
    out = prepared[0]
    with pytest.raises(SystemExit) as stop:  # another k into a prepared folder: its clustering is kept, not mixed
        main(prepare_args(own_data, out, "--k", "20"))
    assert f"delete {out / 'clusters'} and {out / 'balance'} and {out / 'packed'})" in str(stop.value)


def test_the_steps_are_the_recipes_epochs_over_every_rank_of_the_job(tmp_path):
    """4 nodes x 8 GPUs is one job of 32 ranks: the same steps as --ranks 32, a quarter of one 8-GPU node's."""
    from data_tools.prepare import job_shape, write_train_yaml
    recipe = load_config(RECIPE, check_paths=False)
    summary = {"packed_samples": 10_000_000, "k": 25_000}  # enough for the recipe's batch on every rank

    def written(nodes=None, gpus_per_node=None, ranks=None) -> dict:
        path = tmp_path / f"{nodes}x{gpus_per_node}r{ranks}" / "train.yaml"
        path.parent.mkdir()
        write_train_yaml(str(path), recipe, "packed", "clusters", "ViT-B-16", summary,
                         job_shape(nodes, gpus_per_node, ranks, gpus=True), workers=8)
        return yaml.safe_load(path.read_text())

    four_nodes, all_ranks, one_node = written(4, 8), written(ranks=32), written(ranks=8)
    assert four_nodes["data"]["batch_size"] == recipe.data.batch_size  # per rank: the global batch is 32x it
    assert four_nodes["optim"] == all_ranks["optim"]
    assert four_nodes["optim"]["steps"] == math.ceil(EPOCHS * 10_000_000 / (recipe.data.batch_size * 32))
    assert abs(4 * four_nodes["optim"]["steps"] - one_node["optim"]["steps"]) < 4
    for config in (four_nodes, one_node):  # the recipe's intervals whatever the shape
        assert (config["logging"]["every"], config["checkpoint"]["every"], config["checkpoint"]["keep"]) == \
            (recipe.logging.every, recipe.checkpoint.every, recipe.checkpoint.keep)


def test_a_job_of_several_nodes_is_told_to_sbatch_not_to_start_every_rank_on_one_machine():
    from data_tools.prepare import job_shape, next_commands
    yaml_path, script = "/data/prepared/train.yaml", f"{REPO_ROOT}/launch/slurm.sbatch"
    printed = "\n".join(next_commands(job_shape(4, 8, None, gpus=True), yaml_path))
    assert f"sbatch --nodes=4 --gpus-per-node=8 {script} {yaml_path}" in printed
    assert "NUM_GPUS" not in printed and "single_node.sh" not in printed
    assert "NUM_GPUS=32" not in "\n".join(next_commands(job_shape(None, 8, 32, gpus=True), yaml_path))
    cpu = "\n".join(next_commands(job_shape(2, 4, None, gpus=False), yaml_path))  # a cluster without GPUs
    assert f"CID_RANKS_PER_NODE=4 sbatch --nodes=2 {script} {yaml_path}" in cpu and "--gpus-per-node" not in cpu
    one = next_commands(job_shape(None, None, 2, gpus=True), yaml_path)
    assert one[0] == f"train with: NUM_GPUS=2 {REPO_ROOT}/launch/single_node.sh {yaml_path}"
    assert f"sbatch --nodes=1 --gpus-per-node=2 {script} {yaml_path}" in one[1]


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "4", "--gpus-per-node", "8", "--ranks", "8"], "--ranks 8 .* does not agree with --nodes 4 and "
                                                               "--gpus-per-node 8"),
    (["--nodes", "3", "--ranks", "8"], "--ranks 8 .* does not agree with --nodes 3"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
])
def test_a_shape_the_flags_contradict_is_refused_naming_them(own_data, tmp_path, flags, message):
    from data_tools.prepare import main
    with pytest.raises(SystemExit, match=f"^prepare: {message}"):  # a message, no traceback; a later --ranks
        main(prepare_args(own_data, tmp_path / "never", *flags))   # wins over prepare_args' --ranks 1
    assert not (tmp_path / "never").exists()  # refused before any work


def test_the_stages_are_commands_too():
    from importlib.metadata import entry_points
    commands = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("cid-ds-")}
    assert commands == {f"cid-ds-{stage}": f"data_tools.{stage}:main"
                        for stage in ("prepare", "extract", "cluster", "balance", "pack")}
