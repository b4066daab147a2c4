"""Every join of artifacts checks the teacher fingerprint (cid_ds.data.joins): feature caches, clusterings,
keep-lists and packed shards made by two different teachers (same architecture, other weights) are refused
in every combination by the stage or the trainer that joins them, naming both manifest files and both
fingerprints; a side cache extracted over the packed shards with their own teacher is joined by key."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cid_ds.config import ConfigError, expand_shards, load_config
from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.features import FeatureCache, shard_stem
from cid_ds.data.batch import LoaderSpec, open_side_data
from cid_ds.data.wds_loader import build_train_loader
from cid_ds.models import create_model
from data_tools.balance import BalanceOptions, balance
from data_tools.cluster import ClusterOptions, cluster
from data_tools.extract import ExtractOptions, extract
from data_tools.pack import PackOptions, pack
from tests.helpers import REPO_ROOT, one_rank_env, write_shard_tar

PER_SHARD = 24
TEACHER_CONFIG = os.path.join(REPO_ROOT, "ds_configs", "models", "demo-student", "open_clip_config.json")


def write_teacher(folder: str, seed: int) -> str:
    """A ``local-dir:`` teacher: a small architecture with weights of its own (random, from ``seed``)."""
    from safetensors.torch import save_file
    os.makedirs(folder)
    shutil.copy(TEACHER_CONFIG, folder)
    torch.manual_seed(seed)
    model = create_model(f"local-dir:{folder}")[0]
    save_file(model.state_dict(), os.path.join(folder, "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Per teacher "a" and "b": a feature cache, a clustering and keep-lists of the same source shards; the
    packed shards of teacher a; and side caches extracted over those packed shards by each teacher."""
    root = str(tmp_path_factory.mktemp("joins"))
    os.makedirs(os.path.join(root, "src"))
    shards = [write_shard_tar(os.path.join(root, "src", f"{i:05d}.tar"), i * PER_SHARD, PER_SHARD) for i in range(2)]
    made = {"root": root, "shards": shards}
    for name, seed in (("a", 1), ("b", 2)):
        teacher = write_teacher(os.path.join(root, f"teacher_{name}"), seed)
        feats, clusters, keep = (os.path.join(root, f"{what}_{name}") for what in ("feats", "clusters", "balance"))
        extract(ExtractOptions(shards=shards, teacher=teacher, out=feats, batch_size=64, workers=0, device="cpu"))
        cluster(ClusterOptions(features=feats, k=2, out=clusters, topk=1))
        balance(BalanceOptions(features=feats, clusters=clusters, out=keep, semantic=0.999, perceptual=0.9995,
                               workers=1))
        made[name] = {"teacher": teacher, "feats": feats, "clusters": clusters, "balance": keep}
    made["packed"] = os.path.join(root, "packed_a")
    pack(PackOptions(shards=shards, features=made["a"]["feats"], tokenizer="demo-student", out=made["packed"],
                     clusters=made["a"]["clusters"], balance=made["a"]["balance"], samples_per_shard=20),
         progress=False)
    made["packed_shards"] = expand_shards(os.path.join(made["packed"], "*.tar"))
    for name in ("a", "b"):
        made[name]["side"] = os.path.join(root, f"side_{name}")
        extract(ExtractOptions(shards=made["packed_shards"], teacher=made[name]["teacher"], out=made[name]["side"],
                               batch_size=64, workers=0, device="cpu"))
    return made


def manifest(folder: str) -> str:
    return os.path.join(folder, "manifest.json")


def fingerprint(folder: str) -> str:
    """How a message shows the teacher of an artifact: the first 12 hex digits of its weights' sha256."""
    from cid_ds.io import read_json
    return read_json(manifest(folder))["teacher"]["weights_sha256"][:12] + ".."


def names_both(message: str, odd: str, reference: str) -> None:
    """The message says that the artifact in ``odd`` has another teacher than the one in ``reference``."""
    assert (f"{manifest(odd)}: teacher.weights_sha256 is {fingerprint(odd)} but" in message
            and f"{manifest(reference)} has {fingerprint(reference)}" in message), message


@pytest.mark.parametrize("stage", ["cluster rerun", "balance", "balance rerun", "pack clusters", "pack balance"])
def test_each_offline_stage_refuses_inputs_of_another_teacher(made, stage):
    a, b, shards = made["a"], made["b"], made["shards"]
    out = os.path.join(made["root"], "out_" + stage.replace(" ", "_"))
    run, odd, reference = {
        "cluster rerun": (lambda: cluster(ClusterOptions(features=b["feats"], k=2, out=a["clusters"], topk=1)),
                          a["clusters"], b["feats"]),
        "balance": (lambda: balance(BalanceOptions(features=a["feats"], clusters=b["clusters"], out=out, workers=1)),
                    b["clusters"], a["feats"]),
        "balance rerun": (lambda: balance(BalanceOptions(features=b["feats"], clusters=b["clusters"],
                                                         out=a["balance"], semantic=0.999, perceptual=0.9995,
                                                         workers=1)), a["balance"], b["feats"]),
        "pack clusters": (lambda: pack(PackOptions(shards=shards, features=a["feats"], tokenizer="demo-student",
                                                   out=out, clusters=b["clusters"]), progress=False),
                          b["clusters"], a["feats"]),
        "pack balance": (lambda: pack(PackOptions(shards=shards, features=a["feats"], tokenizer="demo-student",
                                                  out=out, clusters=a["clusters"], balance=b["balance"]),
                                      progress=False), b["balance"], a["feats"]),
    }[stage]
    with pytest.raises(ValueError) as refused:
        run()
    names_both(str(refused.value), odd, reference)
    assert not os.path.exists(out) or not os.listdir(out)  # refused before writing anything


def train_refusal(made, overrides: list[str]) -> str:
    """The trainer's message when it refuses ``overrides`` (it must, before any step)."""
    cmd = [sys.executable, "-m", "cid_ds.train", "--config", "ds_configs/experiments/demo_cid.yaml",
           f"output_dir={made['root']}/run", "eval.sets=[]", "data.workers=0", "data.batch_size=8", *overrides]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=one_rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "config error:" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr


def test_trainer_refuses_a_side_cache_and_a_clustering_of_another_teacher_than_the_packed_shards(made):
    b = made["b"]
    message = train_refusal(made, [f"data.train_shards={made['packed']}/*.tar", f"data.features={b['side']}",
                                   f"cluster.dir={b['clusters']}"])
    names_both(message, b["side"], made["packed"])
    names_both(message, b["clusters"], made["packed"])


def test_trainer_refuses_a_clustering_of_another_teacher_than_the_side_cache(made):
    message = train_refusal(made, [f"data.train_shards={made['root']}/src/*.tar", f"data.features={made['a']['feats']}",
                                   f"cluster.dir={made['b']['clusters']}"])
    names_both(message, made["b"]["clusters"], made["a"]["feats"])


def test_an_online_teacher_is_joined_to_the_clustering(made):
    from cid_ds.teacher import OnlineTeacher
    from cid_ds.sources import check_teachers
    cfg = load_config(os.path.join(REPO_ROOT, "ds_configs/experiments/demo_cid.yaml"),
                      ["kd.teacher=online", f"model.teacher={made['a']['teacher']}"], check_paths=False)
    online = OnlineTeacher(cfg.model.teacher, None, create_model("demo-student")[0])
    check_teachers(cfg, None, None, ClusterAssignments(made["a"]["clusters"]), online)
    with pytest.raises(ConfigError) as refused:
        check_teachers(cfg, None, None, ClusterAssignments(made["b"]["clusters"]), online)
    assert (f"cluster assignments {manifest(made['b']['clusters'])}: teacher.weights_sha256 is "
            f"{fingerprint(made['b']['clusters'])} but model.teacher {made['a']['teacher']} has "
            f"{fingerprint(made['a']['feats'])}" in str(refused.value))


def loader(made, features: str) -> list[dict]:
    _, preprocess, _, tokenizer = create_model("demo-student")
    return list(build_train_loader(LoaderSpec(made["packed_shards"], preprocess, tokenizer, batch_size=4,
                                              side=open_side_data(made["packed_shards"], features_dir=features))))


def test_a_side_cache_over_the_packed_shards_replaces_their_embeddings_and_keeps_their_clusters(made):
    side, rows = FeatureCache(made["a"]["side"]), {}
    for path in made["packed_shards"]:
        features = side.lookup(shard_stem(path))
        rows |= {key: features.image[row] for key, row in features.row.items()}
    batches = loader(made, made["a"]["side"])
    assert batches and sum(len(b["key"]) for b in batches) == len(rows) // 4 * 4
    for batch in batches:
        np.testing.assert_array_equal(batch["t_img"].numpy(), np.stack([rows[k] for k in batch["key"]]).astype(np.float32))
        assert "cluster" in batch


def test_the_loader_refuses_a_side_cache_of_another_teacher_or_over_the_source_shards(made):
    with pytest.raises(ConfigError) as refused:
        loader(made, made["b"]["side"])
    names_both(str(refused.value), made["b"]["side"], made["packed"])
    with pytest.raises(ConfigError, match=rf"feature cache {manifest(made['a']['feats'])} was extracted over the "
                                          rf"source shards \(e.g. .*/src/00000.tar\) that the packed shards of "
                                          rf"{manifest(made['packed'])} were made from"):
        loader(made, made["a"]["feats"])


def test_more_positives_than_stored_nearest_centroids_are_refused_before_any_work(made):
    from cid_ds.sources import check_sources
    packed = [f"data.train_shards={made['packed']}/*.tar", f"cluster.dir={made['a']['clusters']}", "eval.sets=[]"]
    joined = [f"data.train_shards={made['root']}/src/*.tar", f"data.features={made['a']['feats']}",
              f"cluster.dir={made['a']['clusters']}", "eval.sets=[]"]
    for overrides, where in ((packed, made["packed"]), (joined, made["a"]["clusters"])):
        cfg = load_config(os.path.join(REPO_ROOT, "ds_configs/experiments/demo_cid.yaml"),
                          overrides + ["cluster.positives=2"])
        with pytest.raises(ConfigError, match=f"'cluster.positives' is 2, but {where}/manifest.json stores the 1 "
                                              "nearest centroid.* --topk 2"):
            check_sources(cfg, "demo_cid.yaml")
        check_sources(load_config(os.path.join(REPO_ROOT, "ds_configs/experiments/demo_cid.yaml"), overrides), "x")


class _Payload:
    """An object whose unpickling would write ``path``: what a hostile centroids.npy could run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_centroids_file_of_python_objects_is_refused_naming_it_and_never_unpickled(made, tmp_path):
    clusters = str(tmp_path / "clusters")
    shutil.copytree(made["a"]["clusters"], clusters)
    ran = tmp_path / "the_pickle_ran"
    np.save(os.path.join(clusters, "centroids.npy"), np.array([_Payload(str(ran)), None], dtype=object),
            allow_pickle=True)
    cmd = [sys.executable, "-m", "cid_ds.train", "--config", "ds_configs/experiments/demo_cid.yaml",
           f"output_dir={tmp_path}/run", "eval.sets=[]", f"data.train_shards={made['packed']}/*.tar",
           f"cluster.dir={clusters}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=one_rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert f"{clusters}/centroids.npy: not an array of numbers" in proc.stderr
    from cid_ds.data.errors import DataError
    from data_tools.cluster import assign
    with pytest.raises(DataError, match=f"{clusters}/centroids.npy: not an array of numbers"):
        assign(made["a"]["feats"], os.path.join(clusters, "centroids.npy"), str(tmp_path / "assigned"))
    assert not ran.exists()
