"""The cluster term as the trainer uses it: the student's text embeddings classified into their images'
clusters weigh cluster.text_weight against the image rows; the first cluster.positives stored ids are the
labels; the term's weight rises over cluster.warmup_steps."""
import numpy as np
import pytest
import torch

from cid_ds.config import ClusterConfig, Config
from cid_ds.losses.cluster import ClusterDiscrimination
from cid_ds.objective import loss_weights


def term(tmp_path, **options) -> ClusterDiscrimination:
    np.save(tmp_path / "centroids.npy", np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32))
    cfg = ClusterConfig(dir=str(tmp_path), **options)
    return ClusterDiscrimination(cfg, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, lr_factor=lambda step: 1.0, seed=0,
                                 device=torch.device("cpu"))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(6, 8, generator=g), "text": torch.randn(6, 8, generator=g),
            "cluster": torch.stack([torch.randperm(12, generator=g)[:4] for _ in range(6)])}


def test_text_rows_weigh_text_weight_against_the_image_rows(tmp_path, batch):
    both = term(tmp_path, text_weight=0.5)(batch["image"], batch, 0, batch["text"])["loss"]
    image_only = term(tmp_path)(batch["image"], batch, 0)["loss"]
    text_only = term(tmp_path)(batch["text"], batch, 0)["loss"]
    torch.testing.assert_close(both, (image_only + 0.5 * text_only) / 1.5)


def test_the_first_positives_of_the_stored_ids_are_the_labels(tmp_path, batch):
    one = term(tmp_path)(batch["image"], batch, 0)["loss"]
    torch.testing.assert_close(one, term(tmp_path)(batch["image"], batch | {"cluster": batch["cluster"][:, 0]}, 0)["loss"])
    two = term(tmp_path, positives=2)(batch["image"], batch, 0)["loss"]
    torch.testing.assert_close(two, term(tmp_path, positives=2)(
        batch["image"], batch | {"cluster": batch["cluster"][:, :2]}, 0)["loss"])
    assert not torch.isclose(one, two)


def test_the_cluster_weight_rises_linearly_over_its_warm_up():
    cfg = Config()
    cfg.loss.cluster, cfg.cluster.warmup_steps = 0.4, 4
    assert [loss_weights(cfg, step)["cluster"] for step in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    assert loss_weights(cfg)["cluster"] == 0.4 and loss_weights(cfg, 0)["clip"] == 1.0
