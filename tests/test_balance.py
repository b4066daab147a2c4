"""Image semantic balance: `python -m data_tools.balance` groups near-duplicate images inside each cluster
(cosine above a threshold, union-find), keeps the member nearest each group's mean and writes a keep-list
per shard, a report, a plot and a manifest. By default the threshold is tuned to keep CLIP-CID's fraction,
and a balance that would remove more than --max-removed-fraction stops before writing anything complete."""
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from cid_ds.data.clusters import ClusterAssignments
from cid_ds.data.features import FeatureCache, shard_file, write_complete_manifest, write_shard, write_started_manifest
from cid_ds.io import read_json, write_json
from data_tools.balance import (DEFAULT_KEEP_FRACTION, BalanceOptions, TooMuchRemoved, balance, group_cluster, main,
                                spanning_similarities)
from data_tools.cluster import ClusterOptions, cluster, unit_rows
from data_tools.spread import Share
from tests.helpers import REPO_ROOT
from tests.helpers import run as run_ok

DIM, CLUSTERS, BASES, GROUPS, SHARDS = 64, 8, 300, 60, 3
TEACHER = {"weights_sha256": "a" * 64, "embed_dim": DIM}
SEMANTIC, PERCEPTUAL = 0.9, 0.98
# Cosine of each planted kind to its base image; distinct images of a cluster stay below ~0.76.
KINDS = {"copy": 1.0, "near": 0.995, "semantic": 0.94}
FIT = dict(max_points_per_centroid=100, seed=0, init="kmeans++", nredo=3)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def at_cosine(x, cos, rng):
    """Unit vectors at cosine ``cos`` from the unit rows of ``x``, in random directions."""
    noise = rng.standard_normal(x.shape)
    noise = unit(noise - (noise * x).sum(-1, keepdims=True) * x)
    return unit(cos * x + np.sqrt(1 - cos ** 2) * noise)


def planted_rows(seed=0):
    """CLUSTERS x BASES distinct rows (cosine ~0.65 to their cluster's centre); GROUPS bases per cluster get
    2 or 3 planted duplicates of random kinds. Returns rows (shuffled), keys, and for the keys of planted groups
    their group (the base's key) and kind ('base' or a KINDS name)."""
    rng = np.random.default_rng(seed)
    bases = at_cosine(np.repeat(unit(rng.standard_normal((CLUSTERS, DIM))), BASES, 0), 0.65, rng)
    rows, keys, group, kind = list(bases), [f"b{i:05d}" for i in range(len(bases))], {}, {}
    for i in np.flatnonzero(np.arange(len(bases)) % BASES < GROUPS):
        base = keys[i]
        group[base], kind[base] = base, "base"
        for d, name in enumerate(rng.choice(list(KINDS), 2 + i % 2)):
            keys.append(f"{base}-{d}{name}")
            rows.append(bases[i] if name == "copy" else at_cosine(bases[i], KINDS[name], rng))
            group[keys[-1]], kind[keys[-1]] = base, name
    order = rng.permutation(len(rows))
    return np.asarray(rows)[order], [keys[i] for i in order], group, kind


def write_cache(cache_dir, rows, keys, teacher=TEACHER):
    """A feature cache as data_tools.extract writes it: SHARDS shards, fp16 rows."""
    stems = [f"{s:05d}" for s in range(SHARDS)]
    for stem, part in zip(stems, np.array_split(np.arange(len(rows)), SHARDS)):
        image = rows[part].astype(np.float16)
        write_shard(cache_dir, stem, [keys[i] for i in part], image, image, [], [], teacher["weights_sha256"])
    write_complete_manifest(cache_dir, [f"/data/{stem}.tar" for stem in stems], teacher)
    return cache_dir


def keep_lists(out):
    """{stem: {field: list}} of every keep-list file in ``out``."""
    lists = {}
    for name in sorted(n for n in os.listdir(out) if n.endswith(".npz")):
        with np.load(os.path.join(out, name)) as npz:
            lists[name[:-4]] = {field: npz[field].tolist() for field in npz.files}
    return lists


def reference(x, semantic, perceptual):
    """All pairs in one matrix, textbook union-find, the member nearest the group mean (first of equals):
    ``(rep, perceptual_link)``."""
    sims = x @ x.T
    parent = list(range(len(x)))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(sims > semantic, 1))):
        parent[find(i)] = find(j)
    groups = defaultdict(list)
    for i in range(len(x)):
        groups[find(i)].append(i)
    rep = np.arange(len(x))
    for members in groups.values():
        rows = x[members].astype(np.float64)
        rep[members] = members[int(np.argmax((rows * rows.sum(0)).sum(1)))]
    near = np.triu(sims > perceptual, 1)
    return rep, near.any(0) | near.any(1)


@pytest.fixture(scope="module")
def planted():
    return planted_rows()


@pytest.fixture(scope="module")
def inputs(planted, tmp_path_factory):
    """The planted cache and its clusters (real k-means, data_tools.cluster)."""
    root = tmp_path_factory.mktemp("inputs")
    rows, keys, _, _ = planted
    cache = write_cache(str(root / "feats"), rows, keys)
    cluster(ClusterOptions(features=cache, k=CLUSTERS, out=str(root / "clusters"), **FIT))
    return cache, str(root / "clusters")


@pytest.fixture(scope="module")
def balanced(inputs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("balanced") / "b")
    return out, balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, perceptual=PERCEPTUAL,
                                       semantic=SEMANTIC, workers=1))


def test_planted_duplicates_are_removed_and_every_group_keeps_its_member_nearest_the_mean(planted, inputs, balanced):
    rows, keys, group, kind = planted
    out, report = balanced
    lists = keep_lists(out)
    assert sorted(lists) == ["00000", "00001", "00002"]
    kept = {key for shard in lists.values() for key in shard["kept"]}
    removed = {key: (shard["merged_into"][i], shard["merged_into_shard"][i], shard["perceptual"][i])
               for shard in lists.values() for i, key in enumerate(shard["removed"])}
    assert not kept & set(removed) and len(kept) + len(removed) == len(keys)

    members = defaultdict(list)
    for key, base in group.items():
        members[base].append(key)
    truly_removed = [key for key in removed if key in group]
    precision = len(truly_removed) / len(removed)
    recall = len(truly_removed) / sum(len(m) - 1 for m in members.values())
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)

    row = {key: i for i, key in enumerate(keys)}
    x = unit_rows(rows.astype(np.float16))
    for group_keys in members.values():
        [keeper] = [key for key in group_keys if key in kept]
        scores = x[[row[key] for key in group_keys]] @ x[[row[key] for key in group_keys]].sum(0)
        assert scores[group_keys.index(keeper)] == pytest.approx(scores.max(), abs=1e-6)
        for key in group_keys:
            if key != keeper:
                assert removed[key][0] == keeper and keeper in lists[removed[key][1]]["kept"]
    # a removed row is a perceptual duplicate when it has a near-identical twin (a copy or a 0.995 row)
    for key, (_, _, perceptual) in removed.items():
        twins = [k for k in members[group[key]] if k != key and kind[k] in ("copy", "near")]
        expected = kind[key] in ("copy", "near") or (kind[key] == "base" and bool(twins))
        assert perceptual == expected, key

    for shard in lists.values():
        assert shard["kept"] == sorted(shard["kept"]) and shard["removed"] == sorted(shard["removed"])
        assert shard["teacher_sha256"] == TEACHER["weights_sha256"]
    assert report["samples"] == len(keys) and report["kept"] == len(kept) and report["removed"] == len(removed)
    assert report["kept_fraction"] == pytest.approx(len(kept) / len(keys))
    assert report["removed_perceptual"] == sum(p for _, _, p in removed.values())
    assert report["removed_perceptual"] + report["removed_semantic"] == len(removed)
    assert report["removed_semantic"] > 0 and report["removed_perceptual"] > 0
    assert report["groups"] == len(members)
    assert report["semantic"] == SEMANTIC and report["perceptual"] == PERCEPTUAL and report["tuning"] is None
    assert report["teacher"] == TEACHER and report["complete"]

    assignments = ClusterAssignments(inputs[1])
    top1 = {key: shard.ids[i, 0] for stem in lists for shard in [assignments.lookup(stem)]
            for key, i in shard.row.items()}
    before = np.bincount(list(top1.values()), minlength=CLUSTERS)
    after = np.bincount([top1[key] for key in kept], minlength=CLUSTERS)
    assert report["cluster_sizes"] == {"before": before.tolist(), "after": after.tolist()}
    assert report["clusters"]["largest_before"] == before.max() and report["clusters"]["largest_after"] == after.max()
    with open(os.path.join(out, "balance_sizes.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    manifest = read_json(os.path.join(out, "manifest.json"))
    assert manifest["complete"] and manifest["teacher"] == TEACHER
    assert manifest["upstream"]["features"] == read_json(os.path.join(inputs[0], "manifest.json"))
    assert manifest["upstream"]["clusters"] == read_json(os.path.join(inputs[1], "manifest.json"))
    assert manifest["totals"] == {"samples": len(keys), "kept": len(kept), "removed": len(removed)}
    assert not copies(out)
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def largest_cluster_rows(inputs):
    """The unit float32 rows of the largest cluster, in cache order."""
    cache, assignments = FeatureCache(inputs[0]), ClusterAssignments(inputs[1])
    stems = [f"{s:05d}" for s in range(SHARDS)]
    ids = np.concatenate([assignments.lookup(stem).ids[:, 0] for stem in stems])
    image = np.concatenate([cache.lookup(stem).image for stem in stems])
    return unit_rows(image[ids == np.bincount(ids).argmax()])


def test_the_blocked_path_gives_exactly_the_all_pairs_result(inputs, balanced, tmp_path):
    x = largest_cluster_rows(inputs)
    all_pairs = group_cluster(x, SEMANTIC, PERCEPTUAL, block_size=len(x))
    assert all_pairs[2] == (len(x), len(x))
    rep, perceptual = reference(x, SEMANTIC, PERCEPTUAL)
    assert (rep != np.arange(len(x))).sum() > 20 and perceptual.sum() > 20
    np.testing.assert_array_equal(all_pairs[0], rep)
    np.testing.assert_array_equal(all_pairs[1], perceptual)
    for block in (7, 64, len(x) - 1):
        blocked = group_cluster(x, SEMANTIC, PERCEPTUAL, block_size=block)
        assert blocked[2] == (block, block)
        np.testing.assert_array_equal(blocked[0], rep)
        np.testing.assert_array_equal(blocked[1], perceptual)

    out = str(tmp_path / "blocked")
    report = balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, perceptual=PERCEPTUAL,
                                    semantic=SEMANTIC, workers=1, block_size=50))
    assert report["largest_tile"] == [50, 50] and balanced[1]["largest_tile"][0] > 50
    assert keep_lists(out) == keep_lists(balanced[0])


def same_result(out, reference_out):
    assert keep_lists(out) == keep_lists(reference_out)
    report, expected = (read_json(os.path.join(d, "balance_report.json")) for d in (out, reference_out))
    for changing in ("timing", "workers", "processes", "block_size", "largest_tile", "parts"):
        report.pop(changing), expected.pop(changing)
    assert report == expected


def test_two_worker_processes_give_the_same_result_as_one(inputs, balanced, tmp_path):
    out = str(tmp_path / "two")
    balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, perceptual=PERCEPTUAL, semantic=SEMANTIC,
                           workers=2, part_rows=500))
    assert len(os.listdir(os.path.join(out, "parts"))) > 2
    same_result(out, balanced[0])


def copies(out):
    """The processes' copies of the embeddings in cluster order."""
    return glob.glob(os.path.join(out, "by_cluster.*.npy"))


def test_spread_over_processes_gives_the_same_result_and_any_process_count_finishes_a_run(inputs, balanced, tmp_path):
    """Two processes (data_tools.spread), then a run that process 0 of 2 left half done, finished by three: each
    writes the keep-lists of one process's run; a process with parts left to others returns None."""
    two = str(tmp_path / "two")
    args = ["--features", inputs[0], "--clusters", inputs[1], "--perceptual", str(PERCEPTUAL),
            "--semantic", str(SEMANTIC), "--workers", "1", "--part-rows", "500"]
    done = run_ok([sys.executable, "-m", "data_tools.spread", "-n", "2", "--", sys.executable, "-m",
                   "data_tools.balance", "--out", two, *args])
    assert f"written to {two}" in done.stdout  # by the last to finish (both, when they finish together)
    same_result(two, balanced[0])
    assert read_json(os.path.join(two, "balance_report.json"))["processes"] == 2 and not copies(two)

    three = str(tmp_path / "three")
    options = dict(perceptual=PERCEPTUAL, semantic=SEMANTIC, workers=1, part_rows=500)
    assert balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=three, **options),
                   share=Share(0, 2)) is None  # process 1 of 2 never ran
    left = len(os.listdir(os.path.join(three, "parts")))
    assert 0 < left < len(os.listdir(os.path.join(two, "parts")))
    open(os.path.join(three, "by_cluster.1-of-2.0123456789ab.npy"), "wb").write(b"a copy cut short")
    reports = [balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=three, **options),
                       share=Share(rank, 3)) for rank in range(3)]
    assert reports[:2] == [None, None] and reports[2]["processes"] == 3
    same_result(three, balanced[0])
    assert not copies(three)


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_a_clusters_spanning_tree_counts_what_grouping_keeps_at_every_threshold(n):
    """The tuning counts a cluster's kept samples at every threshold from one maximum spanning tree: exactly what
    group_cluster keeps, on near-duplicates, exact duplicates and spread rows, at thresholds between and on the
    similarities themselves."""
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((max(1, n // 20), 16))
    x = centres[rng.integers(0, len(centres), n)] + rng.choice([0.0, 0.05, 0.5], (n, 1)) * rng.standard_normal((n, 16))
    x[n // 2:n // 2 + n // 10] = x[0]  # exact duplicates: ties
    x = unit_rows(x.astype(np.float16))
    tree = spanning_similarities(x, block_size=512)
    assert len(tree) == n - 1
    for t in [-1.0, 0.0, 0.5, 0.9, 0.97, 0.99, 0.999, *map(float, tree[:20])]:
        rep, _, _ = group_cluster(x, t, 1.0, block_size=512)
        assert int((rep == np.arange(n)).sum()) == n - int((tree > np.float32(t)).sum()), t


def test_every_process_tunes_the_threshold_to_the_same_value(inputs, tmp_path):
    one = balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=str(tmp_path / "one"),
                                 perceptual=PERCEPTUAL, target_keep_fraction=0.7, workers=1, tune_samples=300,
                                 part_rows=500))
    spread = [balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=str(tmp_path / "two"),
                                     perceptual=PERCEPTUAL, target_keep_fraction=0.7, workers=1, tune_samples=300,
                                     part_rows=500), share=Share(rank, 2)) for rank in range(2)]
    assert spread[0] is None
    same_result(str(tmp_path / "two"), str(tmp_path / "one"))
    assert spread[1]["semantic"] == one["semantic"]


def test_a_process_without_parts_neither_copies_nor_tunes_and_the_run_completes(inputs, tmp_path, monkeypatch):
    """One part for two processes (process 1's): process 0 has nothing to balance, so it copies no rows and tunes
    nothing. (One that tuned could still be tuning on its copy when the last to finish removed every copy, and its
    manifest, tuned but not complete, overwrote the complete one.) Then the same run as two real processes."""
    import data_tools.balance as stage
    calls = []

    def counted(name):
        real = getattr(stage, name)

        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("write_by_cluster", "_tune"):
        monkeypatch.setattr(stage, name, counted(name))
    options = dict(perceptual=PERCEPTUAL, target_keep_fraction=0.7, workers=1, tune_samples=300, part_rows=10**6)
    out = str(tmp_path / "one_part")
    assert balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, **options), Share(0, 2)) is None
    assert calls == [] and not copies(out)
    done = balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, **options), Share(1, 2))
    assert calls == ["write_by_cluster", "_tune"] and done["processes"] == 2
    assert read_json(os.path.join(out, "manifest.json"))["complete"] and not copies(out)

    two = str(tmp_path / "two")
    run_ok([sys.executable, "-m", "data_tools.spread", "-n", "2", "--", sys.executable, "-m", "data_tools.balance",
            "--out", two, "--features", inputs[0], "--clusters", inputs[1], "--perceptual", str(PERCEPTUAL),
            "--target-keep-fraction", "0.7", "--workers", "1", "--tune-samples", "300", "--part-rows", str(10**6)])
    same_result(two, out)


def test_a_run_killed_mid_way_resumes_to_the_same_result(inputs, balanced, tmp_path):
    out = str(tmp_path / "killed")
    # one part per cluster; small tiles make each part take a while, so the kill lands mid-run
    cmd = [sys.executable, "-m", "data_tools.balance", "--features", inputs[0], "--clusters", inputs[1],
           "--out", out, "--perceptual", str(PERCEPTUAL), "--semantic", str(SEMANTIC), "--workers", "1",
           "--part-rows", "1", "--block-size", "4"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = os.path.join(out, "parts")
    deadline = time.time() + 120
    while not (os.path.isdir(parts) and [n for n in os.listdir(parts) if n.endswith(".npz")]):
        assert proc.poll() is None and time.time() < deadline, "the run ended before writing its first part"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {name: os.stat(os.path.join(parts, name)).st_mtime_ns for name in os.listdir(parts) if name.endswith(".npz")}
    assert 1 <= len(done) < CLUSTERS and not os.path.exists(os.path.join(out, "balance_report.json"))
    assert len(copies(out)) == 1

    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({balanced[1]['kept']:,} of {balanced[1]['samples']:,})" in result.stdout
    assert {name: os.stat(os.path.join(parts, name)).st_mtime_ns for name in done} == done
    same_result(out, balanced[0])
    assert not [name for name in os.listdir(out) + os.listdir(parts) if ".tmp" in name]


def test_target_keep_fraction_finds_the_threshold_that_keeps_it(inputs, tmp_path):
    target = 0.75  # between what 0.9 keeps (2/3: every planted duplicate removed) and what 0.98 keeps (~0.78)
    report = balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=str(tmp_path / "t"),
                                    perceptual=PERCEPTUAL, target_keep_fraction=target, tune_samples=10 ** 6,
                                    workers=1))
    tuning = report["tuning"]
    assert tuning["sample_samples"] == report["samples"] and tuning["sample_clusters"] == CLUSTERS
    assert report["semantic"] == tuning["semantic"] and report["target_keep_fraction"] == target
    assert report["kept_fraction"] == tuning["sample_keep_fraction"] >= target
    # the bisection's precision: 1e-4 lower, the threshold keeps less than the target
    lower = balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=str(tmp_path / "lower"),
                                   perceptual=PERCEPTUAL, semantic=tuning["semantic"] - 1e-4, workers=1))
    assert lower["kept_fraction"] < target < report["kept_fraction"] + 0.01
    # a sample of clusters (seeded): the same draw twice, and close to the whole
    sampled = [balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=str(tmp_path / f"s{i}"),
                                      perceptual=PERCEPTUAL, target_keep_fraction=target, tune_samples=1000,
                                      workers=1))["tuning"] for i in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]["sample_clusters"] < CLUSTERS
    assert sampled[0]["sample_samples"] >= 1000 and abs(sampled[0]["semantic"] - tuning["semantic"]) < 0.05


def test_without_threshold_flags_the_threshold_is_tuned_to_keep_clip_cids_fraction(inputs, tmp_path):
    out = str(tmp_path / "default")
    report = balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, workers=1))
    assert DEFAULT_KEEP_FRACTION == 0.563 and report["target_keep_fraction"] == DEFAULT_KEEP_FRACTION
    assert report["mode"] == "threshold tuned to keep 0.563 (default)"
    assert report["tuning"]["sample_samples"] == report["samples"]  # the sample is every cluster here
    assert DEFAULT_KEEP_FRACTION <= report["kept_fraction"] < DEFAULT_KEEP_FRACTION + 0.01
    with open(os.path.join(out, "balance_report.json")) as f:
        assert list(json.load(f))[:2] == ["kept_fraction", "mode"]
    # the default target is the run's identity: a fixed threshold into the same folder is another run
    with pytest.raises(ValueError, match="target_keep_fraction is 0.563 but this run has target_keep_fraction = None"):
        balance(BalanceOptions(features=inputs[0], clusters=inputs[1], out=out, semantic=SEMANTIC, workers=1))


COLLAPSED_CLUSTERS, COLLAPSED_SIZE = 4, 50


@pytest.fixture(scope="module")
def collapsed(tmp_path_factory):
    """A cache and its clusters where each cluster's images are near-identical (cosine ~0.98 to each other):
    at semantic 0.5 every cluster is one group, and the balance keeps one sample in COLLAPSED_SIZE."""
    root = tmp_path_factory.mktemp("collapsed")
    rng = np.random.default_rng(1)
    centres = np.repeat(unit(rng.standard_normal((COLLAPSED_CLUSTERS, DIM))), COLLAPSED_SIZE, 0)
    rows = at_cosine(centres, 0.99, rng)[rng.permutation(len(centres))]
    cache = write_cache(str(root / "feats"), rows, [f"c{i:04d}" for i in range(len(rows))])
    cluster(ClusterOptions(features=cache, k=COLLAPSED_CLUSTERS, out=str(root / "clusters"), **FIT))
    return cache, str(root / "clusters")


def assert_nothing_complete(out):
    assert not [name for name in os.listdir(out) if name.endswith((".npz", ".json", ".png")) and name != "manifest.json"]
    assert not read_json(os.path.join(out, "manifest.json"))["complete"]


def test_a_teacher_that_maps_each_cluster_within_the_perceptual_threshold_is_tuned_above_it(collapsed, tmp_path):
    """Cosine ~0.98 within every cluster: no threshold up to --perceptual keeps 0.563, so the default's tuning
    goes on between --perceptual and 1, and every sample it removes is a perceptual duplicate."""
    report = balance(BalanceOptions(features=collapsed[0], clusters=collapsed[1], out=str(tmp_path / "out"), workers=1))
    assert report["tuning"]["above_perceptual"] and report["semantic"] > report["perceptual"]
    assert DEFAULT_KEEP_FRACTION - 0.05 < report["kept_fraction"] < DEFAULT_KEEP_FRACTION + 0.05
    assert report["removed_perceptual"] == report["removed"] and report["removed_semantic"] == 0


REFUSED_AT_0_5 = ("semantic threshold 0.5000, fixed --semantic 0.5, would keep {kept} of {samples} samples "
                  "({kept_percent}) and remove {removed_percent}, more than --max-removed-fraction 0.6 allows ({scope})."
                  "\nTo accept it: --max-removed-fraction 1 (or any value from {least}); a re-run into the same "
                  "--out resumes. To keep more: --target-keep-fraction F or a higher --semantic, into another --out.")


def test_a_fixed_threshold_that_would_remove_most_of_the_data_stops_on_the_tuning_sample_before_the_full_pass(
        collapsed, tmp_path):
    out = str(tmp_path / "b")
    with pytest.raises(TooMuchRemoved) as refused:
        balance(BalanceOptions(features=collapsed[0], clusters=collapsed[1], out=out, semantic=0.5, tune_samples=60,
                               workers=1))  # draws 2 of the 4 clusters
    [copy] = copies(out)
    assert str(refused.value) == REFUSED_AT_0_5.format(
        kept=2, samples=100, kept_percent="2.0%", removed_percent="98.0%", least=0.98,
        scope=f"estimated on a seeded sample of 2 clusters (100 samples), before the full pass; {copy}, "
              "the embeddings in cluster order, stays for a re-run here")
    assert not os.path.exists(os.path.join(out, "parts")) or not os.listdir(os.path.join(out, "parts"))
    assert_nothing_complete(out)

    report = balance(BalanceOptions(features=collapsed[0], clusters=collapsed[1], out=out, semantic=0.5,
                                    tune_samples=60, workers=1, max_removed_fraction=1))
    assert (report["kept"], report["samples"]) == (COLLAPSED_CLUSTERS, COLLAPSED_CLUSTERS * COLLAPSED_SIZE)
    assert report["max_removed_fraction"] == 1 and read_json(os.path.join(out, "manifest.json"))["complete"]


def test_a_balance_that_would_remove_most_of_the_data_writes_nothing_complete_and_resumes_once_accepted(
        collapsed, tmp_path):
    out, samples = str(tmp_path / "b"), COLLAPSED_CLUSTERS * COLLAPSED_SIZE
    # the tuning sample would be every cluster: no estimate, the full pass is checked before anything is written
    with pytest.raises(TooMuchRemoved) as refused:
        balance(BalanceOptions(features=collapsed[0], clusters=collapsed[1], out=out, semantic=0.5, workers=1,
                               part_rows=COLLAPSED_SIZE))
    assert str(refused.value) == REFUSED_AT_0_5.format(
        kept=4, samples=200, kept_percent="2.0%", removed_percent="98.0%", least=0.98,
        scope=f"over all samples; nothing complete is written and the finished parts stay in {out}/parts")
    assert_nothing_complete(out)
    assert not copies(out)
    parts = {name: os.stat(os.path.join(out, "parts", name)).st_mtime_ns for name in os.listdir(os.path.join(out, "parts"))}
    assert len(parts) == COLLAPSED_CLUSTERS

    report = balance(BalanceOptions(features=collapsed[0], clusters=collapsed[1], out=out, semantic=0.5, workers=1,
                                    part_rows=COLLAPSED_SIZE, max_removed_fraction=1))
    assert {name: os.stat(os.path.join(out, "parts", name)).st_mtime_ns for name in parts} == parts
    assert (report["kept"], report["samples"], report["mode"]) == (COLLAPSED_CLUSTERS, samples, "fixed --semantic 0.5")
    assert sum(len(shard["kept"]) for shard in keep_lists(out).values()) == COLLAPSED_CLUSTERS
    assert read_json(os.path.join(out, "manifest.json"))["complete"]


def test_the_cli_states_a_refusal_without_a_traceback_and_leads_its_summary_with_the_kept_fraction(
        collapsed, tmp_path, capsys):
    argv = ["--features", collapsed[0], "--clusters", collapsed[1], "--out", str(tmp_path / "b"), "--semantic", "0.5",
            "--workers", "1"]
    with pytest.raises(SystemExit) as refused:
        main(argv)
    assert refused.value.code.startswith("balance: semantic threshold 0.5000, fixed --semantic 0.5, would keep 4 of "
                                         "200 samples (2.0%) and remove 98.0%, more than --max-removed-fraction 0.6")
    assert "To accept it: --max-removed-fraction 1" in refused.value.code
    capsys.readouterr()
    main(argv + ["--max-removed-fraction", "1"])
    assert capsys.readouterr().out.startswith("kept 2.0% (4 of 200), fixed --semantic 0.5: semantic threshold 0.5000; "
                                              "removed 196 in 4 groups")


def test_bad_input_is_named(planted, inputs, balanced, tmp_path):
    cache, clusters = inputs
    out = str(tmp_path / "out")
    for kwargs, message in (
            (dict(semantic=1.2), r"semantic threshold must be a cosine similarity in \(0, 1\), got 1.2"),
            (dict(perceptual=0), r"perceptual threshold must be a cosine similarity in \(0, 1\), got 0"),
            (dict(perceptual=0.8, semantic=0.9), r"perceptual threshold \(0.8\) must not be below the semantic "
                                                 r"threshold \(0.9\)"),
            (dict(target_keep_fraction=1.5), r"target_keep_fraction must be in \(0, 1\], got 1.5"),
            (dict(max_removed_fraction=1.5), r"max_removed_fraction must be in \[0, 1\], got 1.5"),
            (dict(target_keep_fraction=0.3), r"target_keep_fraction 0.3 would remove 70.0% of the samples, more than "
                                             r"--max-removed-fraction 0.6 allows: to accept it, "
                                             r"--max-removed-fraction 0.7 or more"),
            (dict(semantic=0.9, target_keep_fraction=0.5), "give exactly one of semantic"),
            (dict(block_size=0), "block_size must be >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            balance(BalanceOptions(features=cache, clusters=clusters, out=out, **kwargs))
    assert not os.path.exists(out)
    with pytest.raises(ValueError, match=r"target_keep_fraction 0.999 is out of reach: even at a semantic threshold "
                                         r"just below 1 the tuning sample keeps 0\.[0-9]+ \(identical embeddings\)"):
        balance(BalanceOptions(features=cache, clusters=clusters, out=str(tmp_path / "reach"),
                               target_keep_fraction=0.999, workers=1))

    unfinished = str(tmp_path / "unfinished")
    write_started_manifest(unfinished, TEACHER)
    with pytest.raises(ValueError, match=f"feature cache {unfinished}/manifest.json: complete is false"):
        balance(BalanceOptions(features=unfinished, clusters=clusters, out=out))
    partial = str(tmp_path / "partial")
    shutil.copytree(clusters, partial)
    manifest = read_json(os.path.join(partial, "manifest.json"))
    write_json(os.path.join(partial, "manifest.json"), dict(manifest, complete=False))
    with pytest.raises(ValueError, match=f"cluster assignments {partial}/manifest.json: complete is false"):
        balance(BalanceOptions(features=cache, clusters=partial, out=out))
    write_json(os.path.join(partial, "manifest.json"), manifest)
    os.remove(shard_file(partial, "00001"))
    with pytest.raises(FileNotFoundError, match=f"cluster assignments {partial}: no {partial}/00001.npz for shard "
                                                "00001 of the feature cache"):
        balance(BalanceOptions(features=cache, clusters=partial, out=out))

    rows, keys, _, _ = planted
    other = write_cache(str(tmp_path / "other"), rows, keys, teacher={"weights_sha256": "b" * 64, "embed_dim": DIM})
    with pytest.raises(ValueError, match=rf"cluster assignments {clusters}/manifest.json: teacher.weights_sha256 is "
                                         rf"aaaaaaaaaaaa.. but feature cache {other}/manifest.json has bbbbbbbbbbbb.."):
        balance(BalanceOptions(features=other, clusters=clusters, out=out))
    shuffled = write_cache(str(tmp_path / "shuffled"), rows[::-1], keys[::-1])
    with pytest.raises(ValueError, match=f"{shuffled}/00000.npz: its keys are not those of the cluster "
                                         "assignments' file for shard 00000, in the same order"):
        balance(BalanceOptions(features=shuffled, clusters=clusters, out=str(tmp_path / "shuffled-out"), workers=1))

    done = str(tmp_path / "done")
    shutil.copytree(balanced[0], done)
    with pytest.raises(ValueError, match=f"{done}/manifest.json: semantic is 0.9 but this run has semantic = 0.8"):
        balance(BalanceOptions(features=cache, clusters=clusters, out=done, perceptual=PERCEPTUAL, semantic=0.8))
    with pytest.raises(SystemExit, match=f"balance: feature cache {tmp_path}/none: no manifest.json"):
        main(["--features", str(tmp_path / "none"), "--clusters", clusters, "--out", out])


def jpeg(pixels, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def planted_shards(data_dir, images=240, shards=2, seed=0):
    """Shards of distinct random-colour-block images, and planted duplicates of one image in five: an exact
    copy, a re-encode after +-3 pixel jitter, or a re-encode at JPEG quality 60. Returns the shard paths and
    {duplicate key: original key}."""
    from data_tools.make_demo_data import write_tar
    rng = np.random.default_rng(seed)
    samples, planted = [], {}
    for i in range(images):
        key = f"{i:06d}"
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        original = jpeg(np.asarray(Image.fromarray(blocks).resize((64, 64), Image.BILINEAR)))
        samples.append((key, {"jpg": original, "txt": b"colour blocks"}))
        pixels = np.asarray(Image.open(io.BytesIO(original)).convert("RGB")).astype(np.int16)
        duplicate = {0: original, 1: jpeg(np.clip(pixels + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)),
                     2: jpeg(pixels.astype(np.uint8), quality=60)}.get(i % 5)
        if duplicate is not None:
            samples.append((f"{key}-dup", {"jpg": duplicate, "txt": b"colour blocks"}))
            planted[f"{key}-dup"] = key
    samples = [samples[i] for i in rng.permutation(len(samples))]
    paths = []
    for s, part in enumerate(np.array_split(np.arange(len(samples)), shards)):
        paths.append(os.path.join(data_dir, f"{s:05d}.tar"))
        write_tar(paths[-1], iter([samples[i] for i in part]))
    return paths, planted


def test_real_teacher_over_real_images_removes_copies_jitter_and_re_encodes(tmp_path):
    from data_tools.extract import ExtractOptions, extract
    shards, planted = planted_shards(str(tmp_path / "data"))
    feats, clusters, out = (str(tmp_path / name) for name in ("feats", "clusters", "out"))
    extract(ExtractOptions(shards=shards, teacher="demo-teacher", out=feats, batch_size=128, workers=1,
                           random_teacher_ok=True, device="cpu"))
    cluster(ClusterOptions(features=feats, k=4, out=clusters, seed=0))
    # The random-init demo teacher puts distinct images up to ~0.996 apart and re-encodes above ~0.9998.
    report = balance(BalanceOptions(features=feats, clusters=clusters, out=out, perceptual=0.99995, semantic=0.999,
                                    workers=1))

    lists = keep_lists(out)
    kept = {key for shard in lists.values() for key in shard["kept"]}
    removed = {key for shard in lists.values() for key in shard["removed"]}
    groups = [{dup, original} for dup, original in planted.items()]
    truly_removed = [key for key in removed if any(key in g for g in groups)]
    precision, recall = len(truly_removed) / len(removed), len(truly_removed) / len(groups)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)
    assert all(len(g & kept) == 1 for g in groups)
    copies = [dup for dup in planted if int(dup[:6]) % 5 == 0]
    assert report["removed_perceptual"] >= len(copies) and report["removed"] == len(removed)
    with open(os.path.join(out, "balance_report.json")) as f:
        assert json.load(f)["kept"] == len(kept) == report["kept"]
