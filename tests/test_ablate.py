"""launch.ablate: one command runs a list of experiments on the same data for the same steps through the
deepspeed launcher, evaluates each, and writes a Markdown + JSON table with a row per experiment."""
import glob
import json
import os

import pytest

from cid_ds.config import load_config
from cid_ds.io import read_json
from launch.ablate import main, read_spec
from tests.helpers import REPO_ROOT, make_data_and_features


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_data_and_features(str(tmp_path_factory.mktemp("ablate")), train_samples=192, shards=2)


def write_spec(path, rows, steps=3):
    path.write_text(json.dumps({"steps": steps, "rows": rows}))  # JSON is YAML
    return str(path)


def test_a_tiny_ablation_gives_a_table_row_per_experiment_and_resumes(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    spec = write_spec(tmp_path / "ablation.yaml", [
        {"name": "FD, cached teacher", "config": "ds_configs/experiments/demo_distill.yaml",
         "overrides": ["loss.instance=0", "loss.fd=2000", f"data.features={dataset['feats']}"]},
        {"name": "CLIP-KD mix, online teacher", "config": "ds_configs/experiments/demo_clipkd.yaml",
         "overrides": ["kd.teacher=online", "model.teacher=demo-teacher",
                       "model.teacher_random_ok=true", "data.features=null"]},
    ])
    out = str(tmp_path / "out")
    common = [f"data.train_shards={dataset['shards']}", f"eval.sets=[{dataset['eval'][0]}]", "data.batch_size=16",
              "data.shuffle_buffer=20", "logging.every=1"]
    table = main([spec, "--out", out, *common])

    assert list(table) == ["FD, cached teacher", "CLIP-KD mix, online teacher"]
    markdown = open(os.path.join(out, "ablation.md")).read().splitlines()
    assert markdown[0] == "| row | shapes top-1 | shapes probe top-1 | samples/s steady | wall s |"
    assert [line.split(" | ")[0] for line in markdown[2:]] == ["| FD, cached teacher", "| CLIP-KD mix, online teacher"]
    saved = read_json(os.path.join(out, "ablation.json"))
    for name, entry in saved["rows"].items():
        assert "optim.steps=3" in entry["overrides"]
        assert 0 <= entry["eval"]["shapes"]["top1"] <= 1 and entry["wall_seconds"] > 0
        assert entry["samples_per_s_steady"] > 0 and entry["samples_per_s_run_average"] > 0
    online = read_json(os.path.join(out, "clip-kd-mix-online-teacher", "results.json"))
    assert set(online["losses"]) == {"clip", "crd", "fd", "icl", "total"} and online["step"] == 3

    again = main([spec, "--out", out, *common])  # finished rows are not trained again
    assert {k: v["wall_seconds"] for k, v in again.items()} == {k: v["wall_seconds"] for k, v in table.items()}


def test_bad_rows_are_refused_before_anything_trains(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    good = {"name": "baseline", "config": "ds_configs/experiments/demo_baseline.yaml"}
    common = [f"data.train_shards={dataset['shards']}", "eval.sets=[]"]
    out = str(tmp_path / "out")
    cases = [
        ([good, {"name": "typo", "config": "ds_configs/experiments/demo_distill.yaml", "overrides": ["loss.fdd=1"]}],
         r"unknown key 'loss\.fdd'"),
        ([good, {"name": "Baseline", "config": "ds_configs/experiments/demo_baseline.yaml"}],
         r"share the run folder name 'baseline'"),
        ([good, {"name": "x", "config": "no/such.yaml"}], r"config file not found: no/such\.yaml"),
        ([{"name": "x", "config": "ds_configs/experiments/demo_baseline.yaml", "seed": 1}], r"rows\[0\]: unknown key 'seed'"),
    ]
    for rows, message in cases:
        with pytest.raises(SystemExit, match=message):
            main([write_spec(tmp_path / "bad.yaml", rows), "--out", out, *common])
    assert not os.path.exists(out)


@pytest.mark.parametrize("spec", sorted(glob.glob(os.path.join(REPO_ROOT, "ds_configs", "ablations", "*.yaml"))))
def test_every_shipped_ablation_row_is_a_valid_experiment(spec, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    rows, _ = read_spec(spec)
    for row in rows:
        load_config(row.config, row.overrides, check_paths=False)
