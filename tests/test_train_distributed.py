"""A real 2-rank DeepSpeed run on CPU (ZeRO-2, gloo) through the ``deepspeed`` launcher with the CLIP-CID
mix (clip + instance + cluster): the loss decreases, TensorBoard gets every promised scalar, checkpoints
(engine + one classifier shard per rank) are written, no shared memory is left behind, and a second run
with ``resume: auto`` continues from the saved step; the same checkpoint resumes on one rank."""
import glob
import shutil
import os
import statistics

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cid_ds.io import read_json
from tests.helpers import deepspeed_cmd, make_data_and_features, run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_tools.cluster import ClusterOptions, cluster
    data = make_data_and_features(str(tmp_path_factory.mktemp("distill")))
    data["clusters"] = os.path.join(os.path.dirname(data["feats"]), "clusters")
    cluster(ClusterOptions(features=data["feats"], k=9,
                           out=data["clusters"]))  # 9 clusters: the 2 ranks own 5 and 4 rows
    return data


def experiment(dataset, out: str, steps: int) -> list[str]:
    return ["--config", "ds_configs/experiments/demo_cid.yaml", f"output_dir={out}",
            f"data.train_shards={dataset['shards']}", f"data.features={dataset['feats']}",
            f"cluster.dir={dataset['clusters']}", "cluster.sample_rate=0.6", "loss.cluster=0.5",
            f"eval.sets=[{dataset['eval'][0]}]", "data.batch_size=24", "data.shuffle_buffer=50",
            f"optim.steps={steps}", "optim.warmup_steps=2", "optim.lr=2e-3", "logging.every=1",
            "checkpoint.every=4", "checkpoint.keep=2", "deepspeed_config=ds_configs/zero2.json"]


def scalars(out: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_two_rank_zero2_run_learns_checkpoints_and_resumes(dataset, tmp_path):
    out = str(tmp_path / "run")
    launch = deepspeed_cmd(2)
    first = run(launch + experiment(dataset, out, steps=8))
    assert "world 2" in first.stdout
    port = launch[launch.index("--master_port") + 1]
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []  # DeepSpeed's CPU op leaves none

    series, acc = scalars(out)
    for tag in ("loss/clip", "loss/instance", "loss/cluster", "cluster/accuracy", "cluster/sampled_fraction",
                "loss/total", "train/lr", "train/logit_scale",
                "perf/samples_per_s", "perf/samples_per_s_rank0", "perf/samples_per_s_rank1",
                "perf/data_wait_fraction", "perf/memory_gib", "data/skipped_samples"):
        assert tag in series, tag
    assert "config" in "".join(acc.Tags()["tensors"])  # the config as text at step 0
    total = [v for _, v in series["loss/total"]]
    assert len(total) == 8
    assert sum(total[-3:]) / 3 < sum(total[:3]) / 3 - 0.1, total

    ckpts = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoints", "step*")))
    assert ckpts == ["step00000004", "step00000008"]
    for rank in (0, 1):
        # each rank holds 2 shards of 96 samples: 8 batches of 24 make its whole first epoch
        position = read_json(os.path.join(out, "checkpoints", "step00000008", f"data_position_rank{rank}.json"))
        assert position == {"epoch": 0, "batch_in_epoch": 8}
    shards = [torch.load(os.path.join(out, "checkpoints", "step00000008", f"centroid_classifier_rank{r}.pt"))
              for r in (0, 1)]
    assert [s["weight"].shape[0] for s in shards] == [5, 4] and shards[0]["updates"] == 8
    assert os.path.isfile(os.path.join(out, "export", "open_clip_model.safetensors"))
    results = read_json(os.path.join(out, "results.json"))
    assert results["eval"]["shapes"]["samples"] > 0
    # steady: the median of TensorBoard's per-window samples/s after the first window (start-up); the average
    # over the run's steps counts that first window too
    window_rates = [v for _, v in series["perf/samples_per_s"]]
    assert results["samples_per_s_steady"] == pytest.approx(statistics.median(window_rates[1:]), rel=1e-5)
    assert 0 < results["samples_per_s_run_average"]

    resumes_on_one_rank(dataset, out, str(tmp_path / "one"))

    second = run(deepspeed_cmd(2) + experiment(dataset, out, steps=11))
    assert "start step 8/11" in second.stdout
    assert read_json(os.path.join(out, "results.json"))["step"] == 11
    steps_logged = [s for s, _ in scalars(out)[0]["loss/total"]]
    assert steps_logged[-3:] == [9, 10, 11]
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "checkpoints", "step*"))) == \
        ["step00000008", "step00000011"]
    # the resumed run continued each rank's data where it stopped: epoch 0 was whole, 3 batches into epoch 1
    for rank in (0, 1):
        position = read_json(os.path.join(out, "checkpoints", "step00000011", f"data_position_rank{rank}.json"))
        assert position == {"epoch": 1, "batch_in_epoch": 3}
    resumed = torch.load(os.path.join(out, "checkpoints", "step00000011", "centroid_classifier_rank1.pt"))
    assert resumed["updates"] == 11  # the shard continued from step 8's rows and moments



def resumes_on_one_rank(dataset, two: str, one: str) -> None:
    """The 2-rank run's step-4 checkpoint on 1 rank, with the same global batch: the classifier's two shards
    become one, the engine's ZeRO-2 partitions are re-split (DeepSpeed's universal checkpoint), and the curve
    goes on from where the 2 ranks left it, not from the start."""
    os.makedirs(os.path.join(one, "checkpoints"))
    shutil.copytree(os.path.join(two, "checkpoints", "step00000004"), os.path.join(one, "checkpoints", "step00000004"))
    resumed = run(deepspeed_cmd(1) + experiment(dataset, one, steps=8) + ["data.batch_size=48"])
    assert "saved by 2 ranks, this run has 1: converting it to DeepSpeed's universal checkpoint" in resumed.stdout
    assert "start step 4/8" in resumed.stdout
    shard = torch.load(os.path.join(one, "checkpoints", "step00000008", "centroid_classifier_rank0.pt"))
    assert shard["weight"].shape[0] == 9 and shard["updates"] == 8

    two_ranks, one_rank = (dict(scalars(out)[0]["loss/total"]) for out in (two, one))
    assert sorted(one_rank) == [5, 6, 7, 8]
    # the same global batch from another split of the data: not the same numbers, but the same curve (within
    # 5%), far below where training starts
    print("relative differences:", {s: round(abs(one_rank[s] - two_ranks[s]) / two_ranks[s], 4) for s in one_rank})
    for step in (5, 6, 7, 8):
        assert abs(one_rank[step] - two_ranks[step]) < 0.05 * two_ranks[step], (step, one_rank, two_ranks)
    assert max(one_rank.values()) < two_ranks[1] - 0.5 * (two_ranks[1] - two_ranks[4]), (one_rank, two_ranks)
