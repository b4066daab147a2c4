"""launch.ablate: one command runs a list of experiments on the same data for the same steps through the
deepspeed launcher, evaluates each, and writes a Markdown + JSON table with a row per experiment."""
import glob
import json
import os

import pytest

from cid_ds.config import load_config
from cid_ds.io import read_json
from launch.ablate import main, read_spec, write_tables
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
        [run] = entry["runs"]
        assert 0 <= run["eval"]["shapes"]["top1"] <= 1 and run["wall_seconds"] > 0
        assert run["samples_per_s_steady"] > 0 and run["samples_per_s_run_average"] > 0
    online = read_json(os.path.join(out, "clip-kd-mix-online-teacher", "results.json"))
    assert set(online["losses"]) == {"clip", "crd", "fd", "icl", "total"} and online["step"] == 3

    again = main([spec, "--out", out, *common])  # finished rows are not trained again
    assert again == table


def test_a_difference_within_the_seed_spread_is_reported_as_such(tmp_path):
    def row(top1: list[float]) -> dict:
        return {"runs": [{"seed": s, "eval": {"shapes": {"type": "zeroshot_classification", "top1": v}},
                          "samples_per_s_steady": 100.0, "samples_per_s_run_average": 90.0, "wall_seconds": 10.0}
                         for s, v in enumerate(top1)]}
    markdown = write_tables(str(tmp_path), {"baseline": row([0.50, 0.52, 0.54]), "clear win": row([0.70, 0.71, 0.72]),
                                            "noise": row([0.51, 0.53, 0.55])})
    assert "| baseline | 0.520 ± 0.020 |" in markdown and "| clear win | 0.710 ± 0.010 |" in markdown
    assert "- clear win vs baseline: shapes top-1 +0.190" in markdown
    assert "- noise vs baseline: no difference beyond the spread (within the seed spread: shapes top-1 +0.010)" \
        in markdown


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
    rows, _, _ = read_spec(spec)
    for row in rows:
        load_config(row.config, row.overrides, check_paths=False)
