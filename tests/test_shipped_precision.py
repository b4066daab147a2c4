"""The precision the shipped DeepSpeed JSONs run at on a GPU, checked on CPU (DeepSpeed runs bf16 and torch
autocast there too; the trainer itself turns them off on CPU).

On a GPU a small student's step is bound by the host: each op is a kernel launch from Python and each
value read back is a device sync. DeepSpeed's bf16 mode checks every gradient tensor for inf/NaN on its
own before each step (ZeRO 1/2: about 15 ops per parameter tensor; without ZeRO, one device sync per
parameter tensor too). So zero0/1/2.json train fp32 weights under torch autocast bf16, as open_clip's
``--precision amp_bf16`` does, and a step dispatches only a few ops per parameter tensor more than a plain
torch autocast step, and reads at most a few values back (the gradient norm). The checkpoints export the
trained weights. ``bench/engine_dispatch.py`` prints the counts before and after, and the step times on a GPU.
"""
import os
import subprocess
import sys

import pytest

from cid_ds.config import Config
from cid_ds.io import read_json
from cid_ds.engine import deepspeed_config
from tests.helpers import REPO_ROOT, deepspeed_cmd, one_rank_env, run

SHIPPED = ("zero0", "zero1", "zero2", "zero3")
EXTRA_OPS_PER_PARAMETER_TENSOR = 8
SYNCS = 4


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "dist_scripts", "shipped_json_step.py"),
                          str(out)] + [os.path.join(REPO_ROOT, "ds_configs", f"{name}.json") for name in SHIPPED],
                         env=one_rank_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {name: read_json(str(out / f"{name}.json")) for name in SHIPPED}


@pytest.mark.parametrize("name", SHIPPED)
def test_a_gpu_step_has_no_per_parameter_overflow_checks(steps, name):
    step = steps[name]
    assert step["compute_dtype"] == "torch.bfloat16"
    extra = (step["ops"] - step["plain_ops"]) / step["parameter_tensors"]
    assert extra <= EXTRA_OPS_PER_PARAMETER_TENSOR, \
        f"{name}.json: {extra:.1f} ops per parameter tensor more than a plain autocast step ({step})"
    assert step["syncs"] <= SYNCS, f"{name}.json: {step['syncs']} syncs in a step"


@pytest.mark.parametrize("name", SHIPPED)
def test_a_gpu_checkpoint_exports_the_trained_weights(steps, name):
    step = steps[name]
    if step["weights_dtype"] == "torch.float32":  # autocast: the fp32 weights are the trained ones
        assert step["export_max_abs_diff"] == 0
    else:  # ZeRO-3 bf16: the export is the fp32 master copy, the module its bf16 rounding
        assert step["export_max_abs_diff"] <= 2 ** -8 * step["largest_weight"]


@pytest.mark.parametrize("name", SHIPPED + ("zero3_offload", "zero2_fp16"))
def test_on_cpu_the_trainer_runs_every_shipped_json_in_fp32(name):
    cfg = Config()
    cfg.deepspeed_config = os.path.join(REPO_ROOT, "ds_configs", f"{name}.json")
    ds = deepspeed_config(cfg, on_gpu=False)
    assert not any(ds.get(key, {}).get("enabled") for key in ("bf16", "fp16", "torch_autocast"))


def test_fp16_autocast_is_refused_with_the_cluster_term(tmp_path):
    from cid_ds.config import ConfigError
    path = tmp_path / "autocast_fp16.json"
    path.write_text('{"zero_optimization": {"stage": 0}, "torch_autocast": {"enabled": true, "dtype": "float16"}}')
    cfg = Config()
    cfg.deepspeed_config, cfg.loss.cluster = str(path), 0.1
    with pytest.raises(ConfigError, match="autocast_fp16.json: fp16 loss scaling"):
        deepspeed_config(cfg, on_gpu=True)


def test_two_ranks_at_the_gpu_precision_keep_the_same_weights(tmp_path):
    """ZeRO-1/2 under autocast reduce Linear gradients in bf16 (DeepSpeed's comm_dtype); each rank trains on
    its own data and the ranks still hold the same weights."""
    cmd = deepspeed_cmd(2)
    cmd[-1] = os.path.join(REPO_ROOT, "tests", "dist_scripts", "shipped_json_two_ranks.py")
    run(cmd + ["--out", str(tmp_path)] + [os.path.join(REPO_ROOT, "ds_configs", f"{n}.json") for n in SHIPPED])
    result = read_json(str(tmp_path / "two_ranks.json"))
    assert result == {f"{n}.json": {"ranks_agree": True, "trained": True} for n in SHIPPED}
