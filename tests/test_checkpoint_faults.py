"""Hostile checkpoints and hostile disks: a pickle that runs code is refused naming the file wherever the project
loads one (resume, export, --pretrained); a full disk during a save stops the job naming the path and the free
space, leaving the previous complete checkpoint for resume; rotation never counts an incomplete checkpoint; a
stage asked to write where it cannot stops at start naming the folder."""
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from cid_ds.checkpoints import COMPLETE, is_complete, mark_complete, newest_complete_tag, stale_tags
from cid_ds.safe_load import UnsafeCheckpoint
from tests.helpers import REPO_ROOT, make_data_and_features


class RunsCode:
    """What a crafted checkpoint holds: unpickling it would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_crafted_pickle(path, marker) -> str:
    torch.save({"module": {"w": torch.zeros(2)}, "payload": RunsCode(str(marker))}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_data_and_features(str(tmp_path_factory.mktemp("ckfaults")), train_samples=96, shards=2)


def overrides(dataset, out, steps, **extra):
    items = {"output_dir": out, "data.train_shards": dataset["shards"], "data.features": dataset["feats"],
             "data.batch_size": 16, "data.shuffle_buffer": 10, "data.views": "center", "eval.at_end": "false",
             "eval.sets": "[]", "optim.steps": steps, "optim.warmup_steps": 1, "logging.every": 1,
             "checkpoint.every": 1, "checkpoint.keep": 2} | extra
    return ["--config", "ds_configs/experiments/demo_distill.yaml"] + [f"{k}={v}" for k, v in items.items()]


def train_one_process(args, timeout=300):
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "cid_ds.train"] + args, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A run of one step: its checkpoint folder holds the complete step00000001."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    proc = train_one_process(overrides(dataset, out, 1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(out, "checkpoints")


def crafted_checkpoint(trained, root, marker) -> str:
    """A copy of ``trained`` whose model file is a crafted pickle, marked complete again (as a checkpoint
    passed between teams would be); returns the crafted file."""
    shutil.copytree(trained, root)
    tag_dir = os.path.join(root, "step00000001")
    crafted = write_crafted_pickle(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), marker)
    mark_complete(tag_dir, {"zero_stage": 0, "bf16_mode": False})
    return crafted


def test_a_crafted_deepspeed_file_is_refused_on_resume_naming_it(dataset, trained, tmp_path):
    out, marker = str(tmp_path / "run"), tmp_path / "code_ran"
    crafted = crafted_checkpoint(trained, os.path.join(out, "checkpoints"), marker)
    proc = train_one_process(overrides(dataset, out, 2))
    assert proc.returncode != 0
    assert f"config error: checkpoint.resume: {crafted}: refused, its pickle calls posix.system" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


def test_export_refuses_a_crafted_checkpoint_naming_it(trained, tmp_path):
    from cid_ds.export import main
    marker = tmp_path / "code_ran"
    crafted = crafted_checkpoint(trained, str(tmp_path / "checkpoints"), marker)
    with pytest.raises(SystemExit, match=f"export: {crafted}: refused, its pickle calls posix.system"):
        main(["--checkpoint", str(tmp_path / "checkpoints"), "--model", "demo-student", "--out", str(tmp_path / "x")])
    assert not marker.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec", ["demo-student", "RN50"], ids=["ds_configs model", "open_clip built-in"])
def test_a_crafted_pretrained_file_is_refused_naming_it(tmp_path, spec):
    from cid_ds.models import create_model
    marker = tmp_path / "code_ran"
    crafted = write_crafted_pickle(tmp_path / "weights.pt", marker)
    with pytest.raises(UnsafeCheckpoint, match=f"{crafted}: refused, its pickle calls posix.system"):
        create_model(spec, crafted)
    assert not marker.exists()


def test_a_crafted_weights_file_inside_a_local_dir_model_is_refused_naming_it(tmp_path):
    from cid_ds.models import MODEL_CONFIG_DIR, create_model
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(os.path.join(MODEL_CONFIG_DIR, "demo-student", "open_clip_config.json"), folder)
    crafted = write_crafted_pickle(folder / "open_clip_pytorch_model.bin", tmp_path / "code_ran")
    with pytest.raises(UnsafeCheckpoint, match=f"{crafted}: refused, its pickle calls posix.system"):
        create_model(f"local-dir:{folder}")
    assert not (tmp_path / "code_ran").exists()


def mount_tmpfs(path, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"a full or read-only disk is made with a tmpfs mount, which needs root: {proc.stderr.decode()}")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs the test sizes and remounts; unmounted after."""
    path = tmp_path / "disk"
    yield path
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def folder_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_a_full_disk_stops_the_save_naming_path_and_free_space_and_resume_takes_the_last_complete(
        dataset, trained, small_disk):
    checkpoint = folder_bytes(os.path.join(trained, "step00000001"))
    mount_tmpfs(small_disk, str(int(checkpoint * 1.5)))  # one checkpoint fits, the second does not
    out = str(small_disk / "run")
    start = time.monotonic()
    proc = train_one_process(overrides(dataset, out, 3))
    assert time.monotonic() - start < 100
    assert proc.returncode != 0
    root = os.path.join(out, "checkpoints")
    # torch.save reports the full disk in its own words ("unexpected pos ..."): the file and the free space tell
    assert f"checkpoint {root}/step00000002 could not be saved: {root}/step00000002/mp_rank_00_model_states.pt: " \
        in proc.stderr
    assert f"MiB free on {root}/step00000002); stopped" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(t for t in os.listdir(root) if t.startswith("step")) == ["step00000001"]
    assert newest_complete_tag(root) == "step00000001"

    subprocess.run(["mount", "-o", f"remount,size={checkpoint * 4}", str(small_disk)], check=True)
    resumed = train_one_process(overrides(dataset, out, 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "start step 1/2" in resumed.stdout
    assert newest_complete_tag(root) == "step00000002"


def test_rotation_keeps_complete_checkpoints_only_and_drops_incomplete_older_ones(tmp_path):
    for step, complete in ((1, True), (2, True), (3, False), (4, True), (5, False)):
        tag = tmp_path / f"step{step:08d}"
        tag.mkdir()
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
        if complete:
            mark_complete(str(tag))
    # keep 2: steps 2 and 4 (complete); step 3 never counted, and older than the newest complete; step 5 may
    # still be being written
    assert stale_tags(str(tmp_path), 2) == ["step00000001", "step00000003"]
    assert not is_complete(str(tmp_path / "step00000005")) and not (tmp_path / "step00000005" / COMPLETE).exists()


@pytest.fixture
def readonly_dir(small_disk):
    mount_tmpfs(small_disk, "1m")
    (small_disk / "old_output").mkdir()
    (small_disk / "old_output" / "manifest.json").write_text("{}")  # what a failed run must leave untouched
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    return small_disk


def stage_commands(dataset, out):
    feats, shards = dataset["feats"], dataset["shards"]
    return {
        "data_tools.extract": ["--shards", shards, "--teacher", "demo-teacher", "--out", out],
        "data_tools.cluster": ["--features", feats, "--k", "2", "--out", out],
        "data_tools.balance": ["--features", feats, "--clusters", feats, "--out", out],
        "data_tools.pack": ["--shards", shards, "--features", feats, "--tokenizer", "demo-student", "--out", out],
        "cid_ds.export": ["--checkpoint", "unused", "--model", "demo-student", "--out", os.path.join(out, "export")],
        "cid_ds.evaluate": ["--model", "demo-student", "--sets", dataset["eval"][0], "--out",
                            os.path.join(out, "eval.json")],
        "cid_ds.train": overrides(dataset, out, 1),
    }


def test_every_stage_stops_at_start_naming_an_output_folder_it_cannot_write(dataset, readonly_dir):
    """In-process (each CLI's ``main``): the message is what the process prints before exit 1."""
    import importlib
    out = str(readonly_dir / "old_output")
    for module, args in stage_commands(dataset, out).items():
        with pytest.raises(SystemExit) as stopped:
            importlib.import_module(module).main(args)
        assert f"{out}: cannot write there (Read-only file system" in str(stopped.value), module
    assert os.listdir(out) == ["manifest.json"] and (readonly_dir / "old_output" / "manifest.json").read_text() == "{}"


def test_a_stage_refuses_to_write_over_a_manifest_that_no_stage_wrote(dataset, tmp_path):
    """A manifest.json in --out that is not a JSON object (another tool's file): each data stage stops naming it,
    and the file is as it was."""
    import importlib
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "manifest.json").write_text("[1, 2]")
    from data_tools.cluster import main as cluster_main
    cluster_main(["--features", dataset["feats"], "--k", "2", "--out", str(tmp_path / "clusters")])
    commands = list(stage_commands(dataset, str(out)).items())[:4]  # the data stages
    commands[0][1].append("--random-teacher-ok")
    commands[2][1][commands[2][1].index("--clusters") + 1] = str(tmp_path / "clusters")
    for module, args in commands:
        with pytest.raises(SystemExit) as stopped:
            importlib.import_module(module).main(args)
        assert f"{out / 'manifest.json'} is not a JSON object" in str(stopped.value), module
    assert os.listdir(out) == ["manifest.json"] and (out / "manifest.json").read_text() == "[1, 2]"


def test_resume_auto_refuses_to_start_over_when_every_checkpoint_is_incomplete(tmp_path):
    """A requeued 3-day job whose checkpoints were all cut short must not silently start from step 0 (and then
    rotate them away): it says what it found and how to start over on purpose."""
    from cid_ds.checkpoints import resume
    from cid_ds.run_state import Run
    from cid_ds.config import Config, ConfigError
    cfg = Config()
    cfg.output_dir = str(tmp_path)
    root = tmp_path / "checkpoints"
    for step in (500, 1000):
        tag = root / f"step{step:08d}"
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
        mark_complete(str(tag))
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated by a failing disk
    with pytest.raises(ConfigError, match=f"only incomplete checkpoints in {root} \\(step00000500, step00001000: "
                                          ".*set checkpoint.resume=none"):
        resume(Run(cfg, engine=None, guard=None))
    cfg.checkpoint.resume = "none"
    assert resume(Run(cfg, engine=None, guard=None))[0] == 0
    assert sorted(os.listdir(root)) == ["step00000500", "step00001000"]  # nothing deleted by the refusal
