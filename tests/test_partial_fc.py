"""The sharded centroid classifier: on one rank each loss equals a hand-written reference; 2 ranks (real
torch.distributed, gloo) give the same loss and the same gradients as 1 rank holding the full matrix, for
every margin, with and without class sampling (the 1-rank run scoring the classes the 2 ranks sampled), hard,
multi-label and soft labels, with row weights; shards checkpoint per rank and re-shard onto another world size."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cid_ds.parallel.partial_fc import ShardedCentroidClassifier, shard_range
from tests.helpers import free_port

C, D, B, W, L = 41, 8, 3, 2, 3  # C % W != 0: rank 0 owns one row more; L positives per row (multi-label)


def inputs():
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(C, D, generator=g)
    embeddings = torch.randn(W * B, D, generator=g)
    teacher = torch.randn(W * B, D, generator=g)
    labels = torch.stack([torch.randperm(C, generator=g)[:L] for _ in range(W * B)])  # distinct, like top-k ids
    weights = torch.rand(W * B, generator=g) + 0.5
    return centroids, embeddings, teacher, labels, weights


def run_classifier(kind, margin, rate, rank=None, world_size=None, rows=slice(None), scored=None):
    """``scored``: the classes a 1-rank classifier scores instead of its own sample."""
    centroids, embeddings, teacher, labels, weights = inputs()
    clf = ShardedCentroidClassifier(centroids, margin=margin, scale=16.0, margin_value=0.3, sample_rate=rate,
                                    soft=kind == "soft", seed=3, rank=rank, world_size=world_size)
    if scored is not None:
        clf.sample = lambda labels, step: scored
    local = embeddings[rows].clone().requires_grad_()
    if kind == "hard":
        out = clf(local, labels[rows, 0], step=7, weights=weights[rows])
    elif kind == "multi":
        out = clf(local, labels[rows], step=7, weights=weights[rows])
    else:
        out = clf.soft_forward(local, teacher[rows], labels[rows], step=7, temperature=0.5, weights=weights[rows])
    out["loss"].backward()
    index, row_grad = clf.sampled_grad()
    weight_grad = torch.zeros_like(clf.weight).index_put((index,), row_grad)
    return {"loss": out["loss"].detach(), "accuracy": out["accuracy"], "fraction": out["sampled_fraction"],
            "emb_grad": local.grad, "weight_grad": weight_grad, "sampled": index + clf.start}


CASES = [(kind, margin, rate) for kind in ("hard", "multi") for margin in ("arcface", "cosface", "none")
         for rate in (1.0, 0.5)] + [("soft", "none", 1.0), ("soft", "none", 0.5)]


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    results = {}
    for case in CASES:
        results[case] = run_classifier(*case, rows=slice(rank * B, (rank + 1) * B))
    out[rank] = results
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results():
    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), out), nprocs=W)
    return dict(out)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_match_one_rank_with_the_full_matrix(two_rank_results, case):
    sampled = torch.cat([two_rank_results[r][case]["sampled"] for r in range(W)])
    full = run_classifier(*case, rank=0, world_size=1, scored=sampled)
    for rank in range(W):
        part = two_rank_results[rank][case]
        torch.testing.assert_close(part["loss"], full["loss"])
        torch.testing.assert_close(part["accuracy"], full["accuracy"])
        torch.testing.assert_close(part["fraction"], torch.tensor(len(sampled) / C))
        # local embeddings get W x dL/dE: DeepSpeed's data-parallel average divides it back out
        torch.testing.assert_close(part["emb_grad"] / W, full["emb_grad"][rank * B:(rank + 1) * B])
        start, count = shard_range(C, rank, W)
        torch.testing.assert_close(part["weight_grad"], full["weight_grad"][start:start + count])
    assert len(sampled) < C if case[2] < 1 else torch.equal(sampled, torch.arange(C))


def reference_logits(centroids, embeddings, labels, margin, scale, margin_value):
    """Scaled cosines to every class, the margin on each row's labels: written out row by row."""
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(centroids, dim=-1).T
    logits = cosine.clone()
    for row, positives in enumerate(labels.tolist()):
        for c in positives:
            if margin == "arcface":
                logits[row, c] = torch.cos(torch.acos(cosine[row, c]) + margin_value)
            elif margin == "cosface":
                logits[row, c] = cosine[row, c] - margin_value
    return logits * scale


@pytest.mark.parametrize("margin", ["arcface", "cosface", "none"])
def test_one_rank_losses_equal_their_written_out_definitions(margin):
    centroids, embeddings, teacher, labels, weights = inputs()
    clf = ShardedCentroidClassifier(centroids, margin=margin, scale=16.0, margin_value=0.3, soft=True,
                                    rank=0, world_size=1)
    # hard labels: the margin softmax's cross-entropy, weighted mean over rows
    logits = reference_logits(centroids, embeddings, labels[:, :1], margin, 16.0, 0.3)
    ce = F.cross_entropy(logits, labels[:, 0], reduction="none")
    torch.testing.assert_close(clf(embeddings, labels[:, 0], weights=weights)["loss"],
                               (ce * weights).sum() / weights.sum())
    # multi-label (MLCD): log(1 + sum over positives e^-s) + log(1 + sum over negatives e^s)
    logits = reference_logits(centroids, embeddings, labels, margin, 16.0, 0.3)
    rows = []
    for row, positives in enumerate(labels.tolist()):
        negatives = [c for c in range(C) if c not in positives]
        rows.append(torch.log(1 + torch.exp(-logits[row, positives]).sum())
                    + torch.log(1 + torch.exp(logits[row, negatives]).sum()))
    torch.testing.assert_close(clf(embeddings, labels, weights=weights)["loss"],
                               (torch.stack(rows) * weights).sum() / weights.sum())
    # soft labels: KL from the teacher's softmax over the fixed centroids, no margin
    cos = lambda x: F.normalize(x, dim=-1) @ F.normalize(centroids, dim=-1).T  # noqa: E731
    kl = F.kl_div(F.log_softmax(cos(embeddings) * 8.0, 1), F.log_softmax(cos(teacher) * 8.0, 1),
                  log_target=True, reduction="none").sum(1)
    torch.testing.assert_close(clf.soft_forward(embeddings, teacher, labels, temperature=2.0)["loss"], kl.mean())


def test_sampling_keeps_every_positive_class_of_the_global_batch_in_a_fixed_number_of_rows():
    labels = torch.tensor([0, 5, 17, 17, 99, 42])
    clf = ShardedCentroidClassifier(torch.randn(100, 4), sample_rate=0.1, seed=1, rank=0, world_size=1)
    for step in range(20):
        index = clf.sample(labels, step)
        assert set(labels.tolist()) <= set(index.tolist())
        assert len(index) == 10 and torch.equal(index, index.unique())  # the rate's share, sorted, no repeats
    assert not torch.equal(clf.sample(labels, 0), clf.sample(labels, 1))
    # more labels than the rate's share: room for each to be a different positive, and a warning that says so
    many = torch.arange(0, 60, 4)
    with pytest.warns(UserWarning, match="sample_rate 0.1: rank 0 scores 15 of its 100 classes, not 10"):
        assert set(many.tolist()) == set(clf.sample(many, 0).tolist())


def test_sampling_scores_each_other_class_at_the_sample_rate():
    labels = torch.tensor([0, 5, 17, 17, 99, 42])
    clf = ShardedCentroidClassifier(torch.randn(4000, 4), sample_rate=0.25, seed=1, rank=0, world_size=1)
    others = [len(set(clf.sample(labels, step).tolist()) - set(labels.tolist())) / (4000 - 5) for step in range(10)]
    assert abs(sum(others) / len(others) - 0.25) < 0.01


def test_a_sample_of_its_own_centroid_is_classified_correctly():
    centroids = F.normalize(torch.randn(50, 16), dim=-1)
    labels = torch.arange(50)
    clf = ShardedCentroidClassifier(centroids, margin="none", scale=32.0, rank=0, world_size=1)
    out = clf(centroids, labels)
    assert out["accuracy"] == 1.0
    wrong = clf(centroids, labels.roll(1))
    assert wrong["loss"] > out["loss"] + 5


def test_frozen_centroids_get_no_gradient_and_do_not_move():
    clf = ShardedCentroidClassifier(torch.randn(10, 4), learnable=False, rank=0, world_size=1)
    before = clf.weight.clone()
    emb = torch.randn(3, 4, requires_grad=True)
    clf(emb, torch.tensor([1, 2, 3]))["loss"].backward()
    clf.update(lr=0.1)
    assert emb.grad is not None and torch.equal(clf.weight, before)


def test_an_update_moves_only_the_sampled_rows_and_lowers_the_loss():
    labels = torch.tensor([3, 3, 7])
    emb = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    clf = ShardedCentroidClassifier(torch.randn(200, 16), margin="cosface", sample_rate=0.05, seed=0,
                                    rank=0, world_size=1)
    before = clf.weight.clone()
    first = clf(emb, labels, step=0)["loss"]
    first.backward()
    index, _ = clf.sampled_grad()
    clf.update(lr=0.05)
    moved = (clf.weight != before).any(dim=1).nonzero().squeeze(1)
    assert set(moved.tolist()) <= set(index.tolist()) and {3, 7} <= set(moved.tolist())
    assert len(index) < 40
    losses = [first.item()]
    for step in range(1, 20):
        loss = clf(emb, labels, step=step)["loss"]
        loss.backward()
        clf.update(lr=0.05)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="margin must be one of"):
        ShardedCentroidClassifier(torch.randn(4, 2), margin="sphereface")
    with pytest.raises(ValueError, match="sample_rate must be in"):
        ShardedCentroidClassifier(torch.randn(4, 2), sample_rate=0)


def save_worker(rank, port, directory):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=W)
    centroids, embeddings, _, labels, _ = inputs()
    clf = ShardedCentroidClassifier(centroids, sample_rate=1.0)
    clf(embeddings[rank * B:(rank + 1) * B], labels[rank * B:(rank + 1) * B, 0])["loss"].backward()
    clf.update(lr=0.1)
    clf.save(directory)
    dist.destroy_process_group()


def test_shards_checkpoint_per_rank_and_reshard_onto_one_rank(tmp_path):
    mp.spawn(save_worker, args=(free_port(), str(tmp_path)), nprocs=W)
    saved = [torch.load(tmp_path / f"centroid_classifier_rank{r}.pt", weights_only=False) for r in range(W)]
    assert [s["weight"].shape[0] for s in saved] == [21, 20]
    assert not torch.allclose(saved[0]["weight"], F.normalize(inputs()[0][:21], dim=-1))  # it trained

    centroids, embeddings, _, labels, _ = inputs()
    one = ShardedCentroidClassifier(centroids, rank=0, world_size=1)
    one.load(str(tmp_path))
    for name in ("weight", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(getattr(one, name), torch.cat([s[name] for s in saved]))
    assert one.updates == 1
    # the re-sharded classifier gives the logits the two shards gave together
    emb = F.normalize(embeddings, dim=-1)
    torch.testing.assert_close(emb @ F.normalize(one.weight, dim=-1).T,
                               torch.cat([emb @ F.normalize(s["weight"], dim=-1).T for s in saved], dim=1))

    # the same world size restores exactly what that rank saved
    again = ShardedCentroidClassifier(centroids, rank=1, world_size=W)
    again.load(str(tmp_path))
    torch.testing.assert_close(again.weight, saved[1]["weight"])

    with pytest.raises(ValueError, match="41 classes saved, the classifier has 42"):
        ShardedCentroidClassifier(torch.randn(42, D), rank=0, world_size=1).load(str(tmp_path))


def test_after_a_deepspeed_step_student_weights_agree_and_shards_do_not(tmp_path):
    """Proof that the shard stays out of data-parallel averaging while the student goes through it."""
    from tests.helpers import REPO_ROOT, deepspeed_cmd, run
    cmd = deepspeed_cmd(2)
    cmd[-1] = os.path.join(REPO_ROOT, "tests", "dist_scripts", "engine_and_shard_step.py")
    run(cmd + ["--out", str(tmp_path)])
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for name, value in r0["student"].items():
        torch.testing.assert_close(value, r1["student"][name], rtol=0, atol=0)
    torch.manual_seed(0)
    initial = torch.nn.Linear(6, 16)
    assert not torch.equal(r0["student"]["0.weight"], initial.weight.detach())  # it trained
    assert (r0["start"], r1["start"]) == (0, 5)
    centroids = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert not torch.allclose(r0["shard"], centroids[:5]) and not torch.allclose(r1["shard"], centroids[5:])
