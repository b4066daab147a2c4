"""Clustering the teacher's image embeddings: `python -m data_tools.cluster` fits spherical k-means on a
sample of the feature cache, assigns every sample its nearest centroids per shard, and
`ClusterAssignments` reads the result."""
import json
import os
import shutil

import numpy as np
import pytest

from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.features import FeatureCache, shard_file, write_complete_manifest, write_shard, write_started_manifest
from cid_ds.data.joins import check_join
from data_tools.cluster import ClusterOptions, assign, cluster, default_k, kmeans, main

CLUSTERS, PER_CLUSTER, DIM, SHARDS = 20, 150, 32, 3
TEACHER = {"weights_sha256": "a" * 64, "embed_dim": DIM}
CORRUPT_KEY = "corrupt-0"
# k-means++ with the best of 3: random initial centroids leave planted clusters merged and split.
FIT = dict(max_points_per_centroid=40, topk=2, seed=0, init="kmeans++", nredo=3)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted_points(seed=0):
    """Points around CLUSTERS random directions on the unit sphere (cosine to their centre ~0.998),
    in random order, and the cluster each was drawn from."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((CLUSTERS, DIM)))
    labels = rng.permutation(np.repeat(np.arange(CLUSTERS), PER_CLUSTER))
    return unit(centres[labels] + 0.01 * rng.standard_normal((len(labels), DIM))), labels


def write_cache(cache_dir, points, teacher=TEACHER):
    """A feature cache (as data_tools.extract writes it) whose image rows are ``points``, split into
    SHARDS shards; the first shard also lists a key the extractor skipped."""
    keys = [f"{i:09d}" for i in range(len(points))]
    stems = [f"{s:05d}" for s in range(SHARDS)]
    for stem, rows in zip(stems, np.array_split(np.arange(len(points)), SHARDS)):
        image = points[rows].astype(np.float16)
        write_shard(cache_dir, stem, [keys[i] for i in rows], image, image,
                    [CORRUPT_KEY] if stem == stems[0] else [], [], teacher["weights_sha256"])
    write_complete_manifest(cache_dir, [f"/data/{stem}.tar" for stem in stems], teacher)
    return cache_dir


def assigned_ids(out_dir, n):
    """The [n, topk] ids of samples 0..n-1, looked up by key as the loader does."""
    assignments = ClusterAssignments(out_dir)
    by_key = {}
    for stem in (f"{s:05d}" for s in range(SHARDS)):
        shard = assignments.lookup(stem)
        by_key.update({key: shard.ids[row] for key, row in shard.row.items()})
    return np.stack([by_key[f"{i:09d}"] for i in range(n)])


def adjusted_rand_index(a, b):
    """Hubert & Arabie's ARI of two labelings, from their contingency table."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    pairs = lambda n: n * (n - 1) / 2  # noqa: E731
    together, rows, cols = pairs(table).sum(), pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum()
    expected = rows * cols / pairs(len(a))
    return (together - expected) / ((rows + cols) / 2 - expected)


@pytest.fixture(scope="module")
def planted():
    return planted_points()


@pytest.fixture(scope="module")
def cache_dir(planted, tmp_path_factory):
    return write_cache(str(tmp_path_factory.mktemp("cache") / "feats"), planted[0])


@pytest.fixture(scope="module")
def clustered(cache_dir, tmp_path_factory):
    """The planted cache clustered into CLUSTERS, fitted on 800 of its 3000 rows, top-2 stored."""
    out = str(tmp_path_factory.mktemp("clusters") / "c")
    return out, cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=out, **FIT))


def test_planted_clusters_are_recovered_and_every_output_describes_them(planted, clustered, cache_dir):
    points, labels = planted
    out, manifest = clustered
    ids = assigned_ids(out, len(points))
    assert ids.shape == (len(points), 2) and ids.dtype == np.int32
    assert adjusted_rand_index(ids[:, 0], labels) > 0.95

    centroids = np.load(os.path.join(out, "centroids.npy"))
    assert centroids.shape == (CLUSTERS, DIM) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert np.array_equal(ClusterAssignments(out).centroids(), centroids)
    shard = ClusterAssignments(out).lookup("00000")
    similarities = points[:1000] @ centroids.T
    assert np.array_equal(shard.ids[:, 0], similarities.argmax(1))
    np.testing.assert_allclose(shard.sims.astype(np.float32), np.take_along_axis(similarities, shard.ids, 1), atol=2e-3)
    assert shard.sims.dtype == np.float16 and (shard.sims[:, 0] >= shard.sims[:, 1]).all()
    assert shard.skipped == {CORRUPT_KEY}

    sizes = np.bincount(ids[:, 0], minlength=CLUSTERS)
    assert manifest["complete"] and manifest["k"] == CLUSTERS and manifest["dim"] == DIM and manifest["topk"] == 2
    assert manifest["fit_points"] == CLUSTERS * 40 and manifest["objective"] > 0.9 * CLUSTERS * 40
    assert manifest["teacher"] == TEACHER and manifest["features"] == os.path.abspath(cache_dir)
    assert manifest["cluster_sizes"] | {"mean_top1_sim": None} == {
        "samples": 3000, "min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
        "mean": 150.0, "empty": 0, "mean_top1_sim": None}
    assert 0.9 < manifest["cluster_sizes"]["mean_top1_sim"] < 1
    assert set(manifest["timing"]) == {"sample_s", "fit_s", "assign_s"} and manifest["code_version"]
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f) == manifest
    with open(os.path.join(out, "cluster_sizes.json")) as f:
        assert json.load(f) == {"k": CLUSTERS, "sizes": sizes.tolist()}
    with open(os.path.join(out, "cluster_sizes.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


HIERARCHICAL = dict(max_points_per_centroid=120, parts=3, seed=1, init="kmeans++", nredo=3)


@pytest.fixture(scope="module")
def hierarchical(cache_dir, tmp_path_factory):
    """The planted cache clustered by a hierarchical fit: 3 parts of 800 of its rows, each into CLUSTERS."""
    out = str(tmp_path_factory.mktemp("hierarchical") / "c")
    return out, cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=out, **HIERARCHICAL))


def test_hierarchical_fit_recovers_the_planted_clusters(planted, hierarchical):
    points, labels = planted
    out, manifest = hierarchical
    assert manifest["parts"] == 3 and manifest["fit_points"] == 2400
    assert adjusted_rand_index(assigned_ids(out, len(points))[:, 0], labels) > 0.95
    assert sorted(os.listdir(out)) == sorted(["manifest.json", "centroids.npy", "cluster_sizes.json",
                                              "cluster_sizes.png", "00000.npz", "00001.npz", "00002.npz"])


def test_assignment_in_small_batches_equals_assignment_in_one(clustered, cache_dir, tmp_path):
    centroids = os.path.join(clustered[0], "centroids.npy")
    one = assign(cache_dir, centroids, str(tmp_path / "one"), topk=3, batch_size=100_000)
    many = assign(cache_dir, centroids, str(tmp_path / "many"), topk=3, batch_size=37)
    assert one["assigned"] == many["assigned"] == ["00000", "00001", "00002"] and many["samples"] == 3000
    for stem in many["assigned"]:
        with np.load(shard_file(str(tmp_path / "one"), stem)) as a, np.load(shard_file(str(tmp_path / "many"), stem)) as b:
            for field in ("keys", "ids", "sims", "skipped"):
                np.testing.assert_array_equal(a[field], b[field])


def test_rerun_after_a_lost_shard_redoes_only_that_shard(clustered, cache_dir, tmp_path):
    out = str(tmp_path / "c")
    shutil.copytree(clustered[0], out)
    with np.load(shard_file(out, "00001")) as npz:
        before = {field: npz[field] for field in npz.files}
    os.remove(shard_file(out, "00001"))
    with open(shard_file(out, "00001") + ".tmp4242", "wb") as f:  # what a crash mid-write leaves
        f.write(b"PK\x03\x04 half a zip")
    kept = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in ("00000.npz", "00002.npz", "centroids.npy")}

    manifest = cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=out, **FIT))

    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in kept} == kept
    with np.load(shard_file(out, "00001")) as npz:
        for field, array in before.items():
            np.testing.assert_array_equal(npz[field], array)
    assert manifest["cluster_sizes"] == clustered[1]["cluster_sizes"]
    assert manifest["objective"] == clustered[1]["objective"] and manifest["timing"]["fit_s"] == clustered[1]["timing"]["fit_s"]
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def test_a_rerun_with_other_parameters_or_from_another_teacher_is_refused(planted, clustered, tmp_path):
    out = str(tmp_path / "c")
    shutil.copytree(clustered[0], out)
    manifest_path = os.path.join(out, "manifest.json")
    with pytest.raises(ValueError, match=f"{manifest_path}: niter is 20 but this run has niter = 5"):
        cluster(ClusterOptions(features=clustered[1]["features"], k=CLUSTERS, out=out, **FIT, niter=5))

    other = write_cache(str(tmp_path / "other"), planted[0], teacher={"weights_sha256": "b" * 64, "embed_dim": DIM})
    with pytest.raises(ValueError, match=rf"{manifest_path}: teacher.weights_sha256 is aaaaaaaaaaaa.. but "
                                         rf"feature cache {other}/manifest.json has bbbbbbbbbbbb.."):
        cluster(ClusterOptions(features=other, k=CLUSTERS, out=out, **FIT))
    with pytest.raises(ValueError, match=rf"cluster assignments {manifest_path}: teacher.weights_sha256 .* "
                                         rf"feature cache {other}/manifest.json has"):
        check_join(FeatureCache(other), ClusterAssignments(out))
    check_join(FeatureCache(clustered[1]["features"]), ClusterAssignments(out))


def test_centroids_of_another_dimension_are_refused(cache_dir, tmp_path):
    path = str(tmp_path / "wide.npy")
    np.save(path, np.ones((CLUSTERS, 64), np.float32))
    with pytest.raises(ValueError, match=rf"centroids {path} have shape \(20, 64\), but feature cache "
                                         rf"{cache_dir}/manifest.json has 32-d rows"):
        assign(cache_dir, path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_bad_input_is_named(cache_dir, tmp_path, capsys):
    unfinished = str(tmp_path / "unfinished")
    write_started_manifest(unfinished, TEACHER)
    with pytest.raises(ValueError, match=f"feature cache {unfinished}/manifest.json: complete is false"):
        cluster(ClusterOptions(features=unfinished, k=CLUSTERS, out=str(tmp_path / "out")))
    with pytest.raises(ValueError, match="3000 samples, 3000 drawn for the fit, too few for 1 part.* k = 5000"):
        cluster(ClusterOptions(features=cache_dir, k=5000, out=str(tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")  # nothing written: the corrected k is not refused as another run
    with pytest.raises(SystemExit, match=f"cluster: feature cache {tmp_path}/none: no manifest.json"):
        main(["--features", str(tmp_path / "none"), "--k", "4", "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match=f"cluster assignments {tmp_path}: no manifest.json"):
        ClusterAssignments(str(tmp_path))


@pytest.mark.parametrize("samples, k", [(10, 1), (200, 10), (3000, 16), (20_000, 50), (400_000_000, 1_000_000)])
def test_default_k_is_one_cluster_per_400_samples_at_least_16_and_at_least_20_samples_each(samples, k):
    assert default_k(samples) == k


def test_without_k_the_rule_chooses_it_says_why_and_a_rerun_resumes_it(tmp_path, capsys):
    rng = np.random.default_rng(1)
    cache = write_cache(str(tmp_path / "feats"), unit(rng.standard_normal((8000, DIM))))
    out = str(tmp_path / "c")
    main(["--features", cache, "--out", out, "--max-points-per-centroid", "20"])
    assert capsys.readouterr().out.startswith(
        "k = 20: 8,000 samples / 400 per cluster (CLIP-CID: 1M clusters for 400M samples); pass --k to choose\n")
    first = ClusterAssignments(out)
    assert first.k == 20 and first.centroids().shape == (20, DIM)

    fitted = os.stat(os.path.join(out, "centroids.npy")).st_mtime_ns
    os.remove(shard_file(out, "00002"))
    main(["--features", cache, "--out", out, "--max-points-per-centroid", "20"])
    assert "in 20 clusters" in capsys.readouterr().out
    assert os.stat(os.path.join(out, "centroids.npy")).st_mtime_ns == fitted and os.path.isfile(shard_file(out, "00002"))


@pytest.mark.parametrize("processes", [2, 3])
def test_spread_over_processes_the_assignment_gives_what_one_process_gives(clustered, cache_dir, tmp_path, processes):
    """data_tools.spread: process 0 fits while the others wait for its centroids, each assigns every N-th shard,
    and the last to finish completes the manifest."""
    import sys

    from tests.helpers import run
    out = str(tmp_path / "c")
    launcher = [sys.executable, "-m", "data_tools.spread", "-n", str(processes), "--"]
    run(launcher + cluster_command(cache_dir, out, **FIT), timeout=300)
    one, spread = clustered[1], json.load(open(os.path.join(out, "manifest.json")))
    assert spread["complete"] and spread["shards"] == SHARDS
    for field in ("cluster_sizes", "objective", "fit_points", "k", "topk"):
        assert spread[field] == one[field], field
    np.testing.assert_array_equal(np.load(os.path.join(out, "centroids.npy")),
                                  np.load(os.path.join(clustered[0], "centroids.npy")))
    for stem in (f"{s:05d}" for s in range(SHARDS)):
        with np.load(shard_file(out, stem)) as a, np.load(shard_file(clustered[0], stem)) as b:
            assert sorted(a.files) == sorted(b.files)
            for field in a.files:
                np.testing.assert_array_equal(a[field], b[field])


def cluster_command(cache_dir, out, **fit):
    import sys
    return [sys.executable, "-m", "data_tools.cluster", "--features", cache_dir, "--k", str(CLUSTERS), "--out", out,
            "--gpu", "off", *[a for name, value in fit.items() for a in (f"--{name.replace('_', '-')}", str(value))]]


def fit_files(out):
    return [name for name in os.listdir(out) if name.startswith(("fit_sample", "fit_parts"))]


def test_spread_over_processes_the_parts_of_a_hierarchical_fit_give_one_process_centroids(hierarchical, cache_dir,
                                                                                           tmp_path):
    """Each process fits every N-th part; process 0 clusters the parts' centroids once all are written."""
    import sys

    from tests.helpers import run
    out = str(tmp_path / "c")
    run([sys.executable, "-m", "data_tools.spread", "-n", "2", "--", *cluster_command(cache_dir, out, **HIERARCHICAL)],
        timeout=300)
    one, spread = hierarchical[1], json.load(open(os.path.join(out, "manifest.json")))
    for field in ("cluster_sizes", "objective", "fit_points", "parts"):
        assert spread[field] == one[field], field
    np.testing.assert_array_equal(np.load(os.path.join(out, "centroids.npy")),
                                  np.load(os.path.join(hierarchical[0], "centroids.npy")))
    assert fit_files(out) == []  # the sample and the parts lived on disk during the fit only


def test_an_interrupted_hierarchical_fit_resumes_at_the_parts_not_yet_written(hierarchical, cache_dir, tmp_path,
                                                                               monkeypatch):
    """Process 0 of 2 fits parts 0 and 2 of 3 and is killed while it waits for part 1; one process run again on the
    folder fits part 1 alone, then the second level: the centroids of an uninterrupted run."""
    import glob
    import subprocess
    import time

    import data_tools.cluster as stage
    from tests.helpers import REPO_ROOT
    out = str(tmp_path / "c")
    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    written = lambda: sorted(glob.glob(os.path.join(out, "fit_parts.*", "*.npz")))  # noqa: E731
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cluster_command(cache_dir, out, **HIERARCHICAL), cwd=REPO_ROOT, stdout=log,
                                 stderr=subprocess.STDOUT, env=dict(env, RANK="0", WORLD_SIZE="2"))
        deadline = time.time() + 120
        while len(written()) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        first.kill()
        first.wait()
    assert [os.path.basename(path) for path in written()] == ["000000.npz", "000002.npz"], \
        (tmp_path / "first.log").read_text()[-2000:]

    fits = []

    def counted_kmeans(x, *args, **kwargs):
        fits.append(len(x))
        return kmeans(x, *args, **kwargs)

    monkeypatch.setattr(stage, "kmeans", counted_kmeans)
    manifest = cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=out, **HIERARCHICAL))
    assert fits == [800, 3 * CLUSTERS]  # part 1's 800 rows, then the union of the 3 parts' centroids
    assert manifest["objective"] == hierarchical[1]["objective"]
    np.testing.assert_array_equal(np.load(os.path.join(out, "centroids.npy")),
                                  np.load(os.path.join(hierarchical[0], "centroids.npy")))
    assert fit_files(out) == []


def test_a_sample_of_another_draw_is_never_taken_for_this_fits(hierarchical, cache_dir, tmp_path):
    """A fit cut off after its manifest left samples of other draws (an earlier version wrote its sample in place,
    unfinished; another cache's; a write cut off): the re-run removes them, draws its own and fits what an
    uninterrupted run fits."""
    out = tmp_path / "c"
    out.mkdir()
    started = {name: value for name, value in hierarchical[1].items() if name in
               ("k", "dim", "niter", "max_points_per_centroid", "topk", "seed", "parts", "nredo", "init",
                "teacher_index", "teacher", "features", "code_version")}
    (out / "manifest.json").write_text(json.dumps(dict(started, complete=False)))
    for name in ("fit_sample.npy", "fit_sample.0123456789abcdef.npy"):
        np.save(out / name, np.zeros((2400, DIM), np.float16))
    (out / "fit_sample.0123456789abcdef.npy.tmp77").write_bytes(b"cut off")
    (out / "fit_parts.0123456789abcdef").mkdir()
    manifest = cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=str(out), **HIERARCHICAL))
    assert manifest["objective"] == hierarchical[1]["objective"]
    np.testing.assert_array_equal(np.load(out / "centroids.npy"),
                                  np.load(os.path.join(hierarchical[0], "centroids.npy")))
    assert fit_files(str(out)) == []


def test_a_fit_over_the_memory_budget_is_hierarchical_by_default_and_refused_in_one_part(cache_dir, tmp_path):
    out = str(tmp_path / "c")
    budget = 0.0001  # GiB: 107 KB; the fit of 800 32-d rows into 20 holds ~212 KB whole, ~77 KB in 3 parts
    with pytest.raises(ValueError, match=r"holds ~0\.0 GiB of host memory, over --fit-memory-gb 0\.0001: use --parts 3"):
        cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=out, fit_memory_gb=budget, **dict(FIT, parts=1)))
    assert not os.path.exists(out)
    manifest = cluster(ClusterOptions(features=cache_dir, k=CLUSTERS, out=out, fit_memory_gb=budget, **FIT))
    assert manifest["complete"] and manifest["parts"] == 3
    assert fit_files(out) == []  # the sample lived on disk during the fit only
