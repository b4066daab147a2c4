"""`make demo` at a tiny scale: every stage runs for real (data, teacher through the deepspeed launcher,
feature cache, clusters, balance, packed shards, baseline, distilled and CID students, eval, export) and the table
comes out; a second run finds everything finished and only prints the table again."""
import json
import subprocess
import sys
import time

from tests.helpers import REPO_ROOT


def test_demo_pipeline_end_to_end_at_tiny_scale(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "launch.demo", "--out", str(out), "--scale", "0.01"]
    env = {"DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HOME": str(__import__("pathlib").Path.home())}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| student distilled |" in proc.stdout

    summary = json.loads((out / "results.json").read_text())
    assert set(summary["table"]) == {"teacher", "student baseline", "student distilled", "student CID"}
    for row in summary["table"].values():
        assert set(row) == {"shapes top-1", "shapes probe top-1", "colored_shapes top-1",
                            "colored_shapes probe top-1", "retrieval i2t R@1", "retrieval t2i R@1"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
    for run in ("teacher", "baseline", "distill", "cid"):
        assert (out / run / "export" / "open_clip_config.json").is_file()
    assert (out / "feats" / "manifest.json").is_file() and (out / "clusters" / "centroids.npy").is_file()
    assert 0 < summary["balance"]["removed_fraction"] < 1 and "image semantic balance removed" in proc.stdout
    packed = json.loads((out / "packed" / "manifest.json").read_text())
    assert packed["complete"] and packed["totals"]["samples"] == packed["totals"]["planned"]
    assert str(out / "packed") in (out / "distill" / "config.yaml").read_text()  # students read the packed shards

    start = time.time()
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "| student distilled |" in again.stdout
    assert time.time() - start < 60  # nothing retrained
