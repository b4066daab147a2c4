"""The precision the shipped DeepSpeed JSONs run at on a GPU, and what a step asks of the host there, checked on
CPU (DeepSpeed runs bf16 and torch autocast there too; the trainer itself turns them off on CPU).

On a GPU a student's step is bound by the host: each op is a kernel launch from Python and each value read back
is a device sync. So zero0/1/2.json train fp32 weights under torch autocast bf16, as open_clip's ``--precision
amp_bf16`` does, and the trainer replaces DeepSpeed's per-parameter-tensor step work with multi-tensor ops
(cid_ds.deepspeed_ops): at one and at two ranks a step dispatches at most 1.10x the ops of a plain torch autocast
step with clipping of the same student (ViT-B/32's 304 parameter tensors), reads no value back (the trainer's
non-finite verdict, cid_ds.step_guard, stays on the device), and ends with the weights DeepSpeed's own engine ends
with, bit for bit. A step whose loss (on one rank) or gradient is not finite leaves weights and optimizer state as
they were, bit for bit, and is counted. The checkpoints export the trained weights. ``bench/engine_dispatch.py`` prints the counts, and the step times on a GPU.
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
HOST_LIGHT = ("zero0", "zero1", "zero2")  # ZeRO-3 is left as DeepSpeed runs it
MAX_OPS_OVER_PLAIN = 1.10
ZERO3_EXTRA_OPS_PER_PARAMETER_TENSOR = 8


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision")
    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests", "dist_scripts", "shipped_json_step.py"),
                          str(out)] + [os.path.join(REPO_ROOT, "ds_configs", f"{name}.json") for name in SHIPPED],
                         env=one_rank_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {name: read_json(str(out / f"{name}.json")) for name in SHIPPED}


@pytest.fixture(scope="module", params=[2], ids=["2 ranks"])  # 1 rank runs the same step without the collectives
def counted(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"host_light_{request.param}")
    cmd = deepspeed_cmd(request.param)
    cmd[-1] = os.path.join(REPO_ROOT, "tests", "dist_scripts", "host_light_steps.py")
    run(cmd + ["--out", str(out)] + [os.path.join(REPO_ROOT, "ds_configs", f"{name}.json") for name in SHIPPED])
    return read_json(str(out / "steps.json"))


@pytest.mark.parametrize("name", HOST_LIGHT)
def test_a_gpu_step_dispatches_at_most_1_10x_a_plain_step_and_reads_no_value(counted, name):
    step, plain = counted[f"{name}.json"]["cid_ds"], counted["plain_ops"]
    assert step["ops"] <= MAX_OPS_OVER_PLAIN * plain, f"{name}.json: {step['ops']} ops, a plain step {plain}"
    assert step["syncs"] == 0, f"{name}.json: {step['syncs']} syncs in a step"


@pytest.mark.parametrize("name", HOST_LIGHT)
def test_a_step_with_a_nan_loss_or_an_infinite_gradient_changes_nothing_and_is_counted(counted, name):
    entry = counted[f"{name}.json"]
    assert entry["skipped_steps_left_all_as_it_was"] and entry["skipped_steps_counted"] == 2, entry


@pytest.mark.parametrize("name", SHIPPED)
def test_the_trainers_engine_ends_with_deepspeeds_weights_and_the_ranks_agree(counted, name):
    entry = counted[f"{name}.json"]
    assert entry["same_weights"] and entry["stock"]["ranks_agree"] and entry["cid_ds"]["ranks_agree"], entry


def test_zero3_has_no_per_parameter_overflow_checks(counted):
    extra = (counted["zero3.json"]["cid_ds"]["ops"] - counted["plain_ops"]) / counted["parameter_tensors"]
    assert extra <= ZERO3_EXTRA_OPS_PER_PARAMETER_TENSOR and counted["zero3.json"]["cid_ds"]["syncs"] <= 4


def test_a_gpu_step_computes_in_bf16(steps):
    assert all(step["compute_dtype"] == "torch.bfloat16" for step in steps.values()), steps


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


def test_cuda_graphs_are_refused_with_zero3():
    from cid_ds.config import ConfigError
    cfg = Config()
    cfg.deepspeed_config, cfg.perf.cuda_graphs = os.path.join(REPO_ROOT, "ds_configs", "zero3.json"), True
    with pytest.raises(ConfigError, match="zero3.json: perf.cuda_graphs replays .* use a ZeRO stage of 0 to 2"):
        deepspeed_config(cfg, on_gpu=True)
    cfg.deepspeed_config = os.path.join(REPO_ROOT, "ds_configs", "zero2.json")
    assert deepspeed_config(cfg, on_gpu=True)["zero_optimization"]["stage"] == 2
