"""logging.profile_steps: a user asks for a profile of a few steps and gets, beside the normal run, a Chrome
trace and a table of the ops by their own time, per rank, and the top of that table in the log."""
import json
import os
import subprocess
import sys

from tests.helpers import REPO_ROOT, make_data_and_features


def train(data, out, *extra):
    args = ["--config", "ds_configs/experiments/demo_distill.yaml", f"output_dir={out}",
            f"data.train_shards={data['shards']}", f"data.features={data['feats']}", "data.batch_size=24",
            "data.views=center", "eval.at_end=false", "eval.sets=[]", "optim.steps=8", "optim.warmup_steps=2",
            "logging.every=2", "checkpoint.every=1000", *extra]
    return subprocess.run([sys.executable, "-m", "cid_ds.train", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, DS_ACCELERATOR="cpu"))


def test_profile_steps_write_a_trace_and_an_op_table_and_print_the_top_ops(tmp_path):
    data = make_data_and_features(str(tmp_path / "data"))
    proc = train(data, str(tmp_path / "run"), "logging.profile_steps=3")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[cid_ds] profile of 3 steps (ops by self_cpu_time_total" in proc.stdout
    folder = tmp_path / "run" / "profile"
    with open(folder / "rank0.json") as f:
        trace = json.load(f)
    # the 3 recorded steps, each marked by the profiler, and the student's matrix products inside them
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"}
    table = (folder / "rank0_ops.txt").read_text()
    assert "aten::addmm" in table or "aten::mm" in table
    assert json.load(open(tmp_path / "run" / "results.json"))["step"] == 8


def test_a_negative_profile_steps_is_refused_by_name(tmp_path):
    data = make_data_and_features(str(tmp_path / "data"), train_samples=48, shards=1)
    proc = train(data, str(tmp_path / "run"), "logging.profile_steps=-1")
    assert proc.returncode != 0
    assert "override 'logging.profile_steps=-1': key 'logging.profile_steps' must be >= 0, got -1" in proc.stderr
