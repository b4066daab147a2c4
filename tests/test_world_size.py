"""A run comes back on another number of ranks: a ZeRO 1/2 checkpoint saved by 2 ranks resumes on 1 and one saved
by 1 resumes on 2 (through DeepSpeed's universal checkpoint) with every parameter, Adam moment, the step and the
schedule as saved, and the data position carried as the share of the epoch consumed."""
import glob
import os

import pytest
import torch

from cid_ds.checkpoints import checkpoint_about, to_universal
from cid_ds.io import read_json
from tests.helpers import REPO_ROOT, deepspeed_cmd, run

SCRIPT = os.path.join(REPO_ROOT, "tests", "dist_scripts", "reshape_resume.py")


def launch(ranks: int, *args: str) -> str:
    return run(deepspeed_cmd(ranks)[:-1] + [SCRIPT, *map(str, args)]).stdout


def per_parameter_state(tag_dir: str, scratch: str) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 value and Adam moments, whatever the number of ranks that saved ``tag_dir``."""
    to_universal(tag_dir, scratch)
    return {os.path.relpath(path, scratch): torch.load(path, weights_only=False)["param"]
            for path in glob.glob(os.path.join(scratch, "zero", "*", "*.pt")) if not path.endswith("step.pt")}


@pytest.mark.parametrize("json_name,saved_ranks,resumed_ranks", [("zero2.json", 2, 1), ("zero1.json", 1, 2)])
def test_a_zero_checkpoint_resumes_on_another_rank_count_as_it_was_saved(tmp_path, json_name, saved_ranks,
                                                                        resumed_ranks):
    ds_json = os.path.join(REPO_ROOT, "ds_configs", json_name)
    saved, again = tmp_path / "saved", tmp_path / "again"
    launch(saved_ranks, "save", ds_json, saved)
    output = launch(resumed_ranks, "resume", ds_json, saved, again)
    assert f"saved by {saved_ranks} ranks, this run has {resumed_ranks}: converting it" in output
    assert glob.glob(str(saved / "checkpoints" / "universal-*")) == []  # the converted copy is gone once loaded

    before = per_parameter_state(str(saved / "checkpoints" / "step00000003"), str(tmp_path / "u_before"))
    after = per_parameter_state(str(again / "checkpoints" / "step00000003"), str(tmp_path / "u_after"))
    assert len(before) == 4 * 3  # 4 parameter tensors x fp32, exp_avg, exp_avg_sq
    assert sorted(before) == sorted(after)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    engine_state = [torch.load(glob.glob(str(d / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt"))[0],
                               weights_only=False) for d in (saved, again)]
    assert engine_state[0]["lr_scheduler"] == engine_state[1]["lr_scheduler"]
    assert engine_state[0]["global_steps"] == engine_state[1]["global_steps"] == 3
    assert checkpoint_about(str(again / "checkpoints" / "step00000003"))["world_size"] == resumed_ranks

    # each rank consumed 3 batches of 4: the same share of the epoch, split over the new ranks
    consumed = 3 * 4 * saved_ranks
    for rank in range(resumed_ranks):
        position = read_json(str(again / "checkpoints" / "step00000003" / f"data_position_rank{rank}.json"))
        assert position == {"epoch": 0, "batch_in_epoch": consumed // (4 * resumed_ranks)}

